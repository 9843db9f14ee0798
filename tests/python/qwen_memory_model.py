"""Measures what one Qwen-Image block keeps for its backward (torch autograd's saved tensors,
through saved_tensors_hooks) in diffusers' QwenImageTransformer2DModel with a peft LoRA on
musubi-tuner's 14 Linears per block, per token and hidden width, and extrapolates the real
Qwen-Image-Edit-2509 (width 3072, 60 blocks, 20.4 B parameters) training memory at 1024², batch
1, one 1024² control, for docs/qwen-edit.md. qwen-edit-lora's transformer (core/diffusion-torch's
qwen_image.rs) runs the same libtorch ops as diffusers (its parity tests), so it saves the same
tensors.

Token counts: the noisy target and the control are 4096 packed tokens each at 1024²
((1024/16)²); the VL prompt is the edit-plus template after its first 64 tokens are dropped: the
control's 196 vision tokens (384² → the processor's 392² → 28² patches merged 2×2) plus about 34
template and caption tokens (≈ 230 with the real Qwen2 tokenizer). musubi-tuner's published table
(docs/qwen_image.md) is Qwen-Image at 1024² (4096 image tokens, no control): modelled too, for
the comparison.

usage: qwen_memory_model.py [--json OUT]
"""

import argparse
import json

import torch
from diffusers import QwenImageTransformer2DModel
from peft import LoraConfig

MUSUBI = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
          "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
          "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]
GB, GIB = 1e9, 2**30


def saved_bytes(model, side, n_txt, dtype):
    """Bytes of distinct tensors autograd saves during one forward (storage de-duplicated), for a
    target and one control of side×side packed tokens each and n_txt text tokens."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    c = model.config
    x = torch.randn(1, 2 * side * side, c.in_channels, dtype=dtype)
    ctx = torch.randn(1, n_txt, c.joint_attention_dim, dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.5], dtype=dtype),
                  img_shapes=[[(1, side, side), (1, side, side)]], return_dict=False)[0]
    del y
    return sum(seen.values())


def lora_params(d, rank, mlp):
    """LoRA parameters of musubi-tuner's 840-module set on one block: A (in×r) + B (r×out) each."""
    shapes = [(d, d)] * 8 + [(d, mlp), (mlp, d)] * 2 + [(d, 6 * d)] * 2
    return rank * sum(i + o for i, o in shapes)


def measure():
    torch.manual_seed(0)
    dim, heads, n_txt = 256, 4, 64
    res = {}
    for blocks in (1, 3):
        m = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=blocks,
                                        attention_head_dim=dim // heads, num_attention_heads=heads,
                                        joint_attention_dim=dim, axes_dims_rope=(8, 28, 28)).to(torch.bfloat16)
        m.requires_grad_(False)
        m.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=MUSUBI))
        res[blocks] = {side: saved_bytes(m, side, n_txt, torch.bfloat16) for side in (8, 16)}
    # Per block: (3 blocks − 1 block) / 2; per token·width: the slope from 2·8²+64 to 2·16²+64 tokens.
    tokens = {side: 2 * side * side + n_txt for side in (8, 16)}
    per_block = {side: (res[3][side] - res[1][side]) / 2 for side in (8, 16)}
    slope = (per_block[16] - per_block[8]) / ((tokens[16] - tokens[8]) * dim)
    return {"width": dim, "tokens": tokens, "measured_bytes": res, "per_block_bytes": per_block,
            "bytes_per_token_width_per_block": slope}


def extrapolate(slope, n_tokens, name):
    """The real model's memory (bytes) for n_tokens, each configuration of the docs' table."""
    d, blocks, mlp = 3072, 60, 4 * 3072
    block_params = 36 * d * d  # attention 8·D², two MLPs 16·D², two modulations 12·D² (+ biases)
    params = 20.4e9
    lora = lora_params(d, 16, mlp) * blocks
    act = n_tokens * d * slope * blocks
    # Per-block checkpointing: each block's two input streams (bf16) + one block's saved tensors
    # while it is recomputed.
    ckpt = n_tokens * d * 2 * blocks + n_tokens * d * slope
    w = {"bf16": params * 2, "fp8": params * 1}
    out = {"tokens": n_tokens, "block_params": block_params, "weights_bf16": w["bf16"], "weights_fp8": w["fp8"],
           "lora_params": lora, "lora_adamw_fp32": lora * 16, "lora_adamw8bit": lora * 10,
           "activations": act, "activations_checkpointed": ckpt}
    rows = {}
    for label, prec, swap, checkpointing in [
        ("bf16", "bf16", 0, False), ("bf16 + checkpointing", "bf16", 0, True),
        ("fp8 + checkpointing", "fp8", 0, True), ("fp8 + checkpointing + 16 blocks swapped", "fp8", 16, True),
        ("fp8 + checkpointing + 45 blocks swapped", "fp8", 45, True), ("fp8, no checkpointing", "fp8", 0, False),
    ]:
        per_w = w[prec] / params
        weights = w[prec] - swap * block_params * per_w
        total = weights + lora * 16 + (ckpt if checkpointing else act)
        rows[label] = {"weights": weights, "total": total}
    out["configs"] = rows
    out["name"] = name
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    m = measure()
    s = m["bytes_per_token_width_per_block"]
    out = {"measured": m,
           "edit_2509_1024_one_control": extrapolate(s, 2 * 4096 + 230, "2509 edit, 1024² + one 1024² control"),
           "qwen_image_1024": extrapolate(s, 4096 + 100, "Qwen-Image t2i at 1024² (musubi's table's case)")}
    print(json.dumps(out, indent=1))
    for k in ("edit_2509_1024_one_control", "qwen_image_1024"):
        e = out[k]
        print(f"\n{e['name']}: {e['tokens']} tokens; activations {e['activations'] / GB:.1f} GB, "
              f"checkpointed {e['activations_checkpointed'] / GB:.2f} GB; LoRA {e['lora_params'] / 1e6:.1f} M params, "
              f"+ grads + AdamW {e['lora_adamw_fp32'] / GB:.2f} GB")
        for label, r in e["configs"].items():
            print(f"  {label}: weights {r['weights'] / GB:.1f} GB, total {r['total'] / GB:.1f} GB "
                  f"({r['total'] / GIB:.1f} GiB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
