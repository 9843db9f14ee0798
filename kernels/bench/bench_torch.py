"""The torch baselines of kernels/examples/bench_kernels.rs, on the same shapes (CUDA, bf16).

Prints one JSON object. The LoRA branch is timed as the separate ops torch runs for it
(dropout, two skinny matmuls and the add forward; autograd's four matmuls, the mask and the
adds backward), written out explicitly so that the base GEMMs are excluded on both sides; the
base GEMMs (x·Wᵀ, dy·W with W 3072×3072) are timed too, for the whole-layer ratio; and the
autograd version of the whole branch for reference. Embedding: F.normalize ×2, a@b.T, topk,
the paired loss's autograd gradient. AdamW: torch.optim.AdamW(foreach=True and fused=True) over
the same 228 tensors of 16×3072.
"""
import json
import sys

import torch
import torch.nn.functional as F


def time_ms(fn, iters):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def lora(iters):
    n, k, m, r, p, s = 4096, 3072, 3072, 16, 0.1, 1.0
    dev, bf = "cuda", torch.bfloat16
    x = torch.rand(n, k, device=dev, dtype=bf) * 2 - 1
    w = torch.rand(m, k, device=dev, dtype=bf) * 2 - 1
    a = torch.rand(r, k, device=dev, dtype=bf) * 2 - 1
    b = torch.rand(m, r, device=dev, dtype=bf) * 2 - 1
    y0, dy, dx_base = (torch.rand(n, m, device=dev, dtype=bf) for _ in range(3))
    state = {}

    def fwd():
        mask = torch.rand(n, k, device=dev) >= p
        xd = x * mask / (1 - p)
        h = xd @ a.T
        state.update(mask=mask, xd=xd, h=h)
        return y0 + s * (h @ b.T)

    def bwd():
        g = s * (dy @ b)
        db = s * (dy.T @ state["h"])
        da = g.T @ state["xd"]
        dx = dx_base + (g @ a) * state["mask"] / (1 - p)
        return dx, da, db

    fwd()
    out = {"torch_lora_fwd_ms": time_ms(fwd, iters), "torch_lora_bwd_ms": time_ms(bwd, iters)}
    out["torch_base_fwd_ms"] = time_ms(lambda: x @ w.T, iters)
    out["torch_base_bwd_ms"] = time_ms(lambda: dy @ w, iters)
    ap, bp, xp = a.clone().requires_grad_(True), b.clone().requires_grad_(True), x.clone().requires_grad_(True)

    def autograd():
        y = y0 + s * (F.dropout(xp, p, training=True) @ ap.T @ bp.T)
        y.backward(dy)

    out["torch_lora_autograd_fwd_bwd_ms"] = time_ms(autograd, iters)
    return out


def embed(iters):
    n, m, d, k = 64, 10_000, 512, 5
    a = (torch.rand(n, d, device="cuda", dtype=torch.bfloat16) * 2 - 1).requires_grad_(True)
    b = torch.rand(m, d, device="cuda", dtype=torch.bfloat16) * 2 - 1

    def run():
        an, bn = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
        torch.topk(an.detach() @ bn.T, k, dim=1)
        loss = (1 - (an * bn[:n]).sum(1)).mean()
        loss.backward()

    return {"torch_embed_ms": time_ms(run, iters)}


def adamw(iters):
    params = [torch.zeros(16 * 3072, device="cuda", requires_grad=True) for _ in range(228)]
    for q in params:
        q.grad = torch.zeros_like(q)
    out = {}
    for kind in ("foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-3, **{kind: True})
        out[f"torch_adamw_{kind}_ms"] = time_ms(opt.step, iters)
    return out


if __name__ == "__main__":
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    for f in (lora, embed, adamw):
        res.update(f(iters))
    print(json.dumps(res))
