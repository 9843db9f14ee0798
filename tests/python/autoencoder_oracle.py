#!/usr/bin/env python3
"""PyTorch oracle for the `identity-autoencoder` plugin.

An independent torch.nn.Module of the architecture the plugin documents (written from that
specification, not from the Rust code), used by the plugin's parity tests:

  1. build the module from the config stored in `<dir>/model.safetensors`
     (metadata `likeness.config`, defaults for missing keys) and load the weights with
     `load_state_dict(strict=True)` -- so names and shapes must match exactly;
  2. forward on `reference` from `<dir>/inputs.safetensors`;
  3. the vector-Jacobian product with the upstream gradient `grad_pixels` via
     torch.autograd (pixels.backward(grad_pixels));
  4. one torch.optim.AdamW step (foreach=False) with the given hyper-parameters, after
     torch.nn.utils.clip_grad_norm_ when --max-grad-norm > 0;
  5. write `<dir>/oracle.safetensors`: `pixels`, `grad.<param>`, `param.<param>` (after the
     step) and `grad_norm` ([1], the global L2 norm before clipping, accumulated in f64).

Needs torch and the `safetensors` package.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEFAULTS = {"image_size": 64, "base_channels": 32, "depth": 3, "latent_dim": 256}
GROUPS = 8


class ConvBlock(nn.Module):
    """conv3x3 (stride s, padding 1) -> GroupNorm(8) -> SiLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(GROUPS, cout, eps=1e-5, affine=True)

    def forward(self, x):
        return F.silu(self.norm(self.conv(x)))


class IdentityAutoencoder(nn.Module):
    def __init__(self, image_size, base_channels, depth, latent_dim):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList(
            ConvBlock(3 if i == 0 else widths[i - 1], widths[i], stride=2) for i in range(depth)
        )
        self.side = image_size // 2**depth
        self.top = widths[-1]
        flat = self.top * self.side * self.side
        self.to_code = nn.Linear(flat, latent_dim)
        self.from_code = nn.Linear(latent_dim, flat)
        # Mirror of the encoder: widths[-1] -> ... -> widths[0] -> widths[0].
        dec_out = list(reversed(widths))[1:] + [widths[0]]
        self.decoder = nn.ModuleList(
            ConvBlock(cin, cout, stride=1) for cin, cout in zip(reversed(widths), dec_out)
        )
        self.to_rgb = nn.Conv2d(widths[0], 3, kernel_size=3, padding=1)

    def forward(self, x):
        for block in self.encoder:
            x = block(x)
        code = self.to_code(torch.flatten(x, start_dim=1))
        x = F.silu(self.from_code(code)).view(-1, self.top, self.side, self.side)
        for block in self.decoder:
            x = block(F.interpolate(x, scale_factor=2, mode="nearest"))
        return torch.sigmoid(self.to_rgb(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="holds model.safetensors and inputs.safetensors")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    weights_path = os.path.join(a.dir, "model.safetensors")
    with safe_open(weights_path, framework="pt") as f:
        meta = f.metadata() or {}
    assert meta.get("likeness.plugin") == "identity-autoencoder", f"metadata: {meta}"
    cfg = dict(DEFAULTS)
    cfg.update(json.loads(meta.get("likeness.config", "{}")))

    model = IdentityAutoencoder(**cfg)
    model.load_state_dict(load_file(weights_path), strict=True)
    model.train()

    inputs = load_file(os.path.join(a.dir, "inputs.safetensors"))
    x = inputs["reference"].float()
    g = inputs["grad_pixels"].float()

    pixels = model(x)
    pixels.backward(g)

    params = dict(model.named_parameters())
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in params.items()}
    # The reported norm is computed in float64: torch's float32 CPU norm of a 2M-element
    # tensor is off by ~1e-4 relative, too coarse to check the plugin's (f64) report against.
    norm = sum(float(p.grad.detach().double().square().sum()) for p in params.values()) ** 0.5
    if a.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=a.lr,
        betas=(a.beta1, a.beta2),
        eps=a.eps,
        weight_decay=a.weight_decay,
        foreach=False,
    )
    opt.step()

    out = {"pixels": pixels.detach().contiguous()}
    out.update({k: v.contiguous() for k, v in grads.items()})
    out.update({f"param.{n}": p.detach().clone().contiguous() for n, p in params.items()})
    out["grad_norm"] = torch.tensor([float(norm)], dtype=torch.float32)
    save_file(out, os.path.join(a.dir, "oracle.safetensors"))
    print(json.dumps({"config": cfg, "grad_norm": float(norm), "params": len(params)}))


if __name__ == "__main__":
    main()
