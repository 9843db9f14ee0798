"""Measures what one Flux block keeps for its backward (torch autograd's saved tensors, through
saved_tensors_hooks) in diffusers' FluxTransformer2DModel with a peft LoRA on every Linear of the
blocks, per token and hidden width, and extrapolates the real FLUX.1-dev (width 3072, 19 double +
38 single blocks) training memory at 512² and 1024² for docs/flux.md. flux-lora's transformer runs
the same libtorch ops in the same order (core/diffusion-torch/tests/flux.rs: bitwise-equal
outputs), so it saves the same tensors.

usage: flux_memory_model.py [--json OUT]
"""

import argparse
import json

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
           "norm1.linear", "norm1_context.linear", "norm.linear"]


def saved_bytes(model, n_img, n_txt, dtype):
    """Bytes of distinct tensors autograd saves during one forward (storage de-duplicated)."""
    seen = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    c = model.config
    side = int(n_img ** 0.5)
    x = torch.randn(1, n_img, c.in_channels, dtype=dtype)
    ctx = torch.randn(1, n_txt, c.joint_attention_dim, dtype=dtype)
    pooled = torch.randn(1, c.pooled_projection_dim, dtype=dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                  timestep=torch.tensor([0.5], dtype=dtype), img_ids=img_ids, txt_ids=torch.zeros(n_txt, 3),
                  guidance=torch.tensor([1.0], dtype=dtype), return_dict=False)[0]
    del y
    return sum(seen.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    dim, heads = 256, 4
    res = {}
    for kind, nd, ns in [("double", 2, 0), ("single", 0, 2), ("none", 0, 0)]:
        m = FluxTransformer2DModel(in_channels=64, num_layers=nd, num_single_layers=ns, attention_head_dim=dim // heads,
                                   num_attention_heads=heads, joint_attention_dim=dim, pooled_projection_dim=64,
                                   guidance_embeds=True, axes_dims_rope=[16, 24, 24]).to(torch.bfloat16)
        m.requires_grad_(False)
        m.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
        res[kind] = {n: saved_bytes(m, n, 64, torch.bfloat16) for n in (256, 1024)}
    # The identity loss decodes x̂0 through the VAE with gradient: FLUX.1's VAE decoder (128/256/
    # 512/512, 2 layers per block, 16 latent channels), saved bytes per output pixel (convolutions:
    # linear in the pixel count; the mid-block attention at 1/64 of the pixels is quadratic in
    # them, measured at two sizes to see it).
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                        layers_per_block=2, latent_channels=16, use_quant_conv=False,
                        use_post_quant_conv=False).to(torch.bfloat16)
    vae.requires_grad_(False)
    vres = {}
    for px in (64, 128):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
            return t

        z = torch.randn(1, 16, px // 8, px // 8, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vae.decode(z).sample.sum()
        vres[px] = sum(seen.values())
    per_px = (vres[128] - vres[64]) / (128 * 128 - 64 * 64)
    res["vae_decode"] = vres
    # Per block and per (token · width): the slope in tokens at this width, blocks 2 → 1.
    per = {}
    for kind in ("double", "single"):
        d = {n: (res[kind][n] - res["none"][n]) / 2 for n in (256, 1024)}
        per[kind] = (d[1024] - d[256]) / ((1024 - 256) * dim)
    out = {"measured_bytes": res, "bytes_per_token_width_per_block": per, "vae_decode_bytes_per_pixel": per_px}
    # FLUX.1-dev: width 3072, 19 double + 38 single blocks; 512 T5 tokens; (px/16)² image tokens.
    D, weights_bf16 = 3072, 11.9e9 * 2
    for px in (512, 1024):
        n = (px // 16) ** 2 + 512
        act = n * D * (19 * per["double"] + 38 * per["single"])
        ckpt = n * D * 2 * (19 + 38) + n * D * max(per["double"], per["single"])
        out[f"{px}px"] = {"tokens": n, "activations_gb": act / 1e9, "checkpointed_gb": ckpt / 1e9,
                          "vae_decode_with_grad_gb": per_px * px * px / 1e9,
                          "weights_bf16_gb": weights_bf16 / 1e9, "weights_fp8_gb": weights_bf16 / 2e9}
    print(json.dumps(out, indent=1))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
