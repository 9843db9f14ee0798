"""Writes a complete, random-weight Qwen-Image-Edit-2509-shaped model: a diffusers
QwenImageEditPlusPipeline folder saved by diffusers 0.42.1 itself, plus musubi-tuner's three
single files (--dit, --vae, --text_encoder) of the same weights.

usage: make_tiny_qwen_edit.py --out DIR [--seed N] [--preset tiny|bench]

Output (stable: other tests call this script):
  DIR/model_index.json
  DIR/transformer/   QwenImageTransformer2DModel: in 64 (16 latent channels packed 2×2), out 16,
                     2 blocks, 3 heads of 16, joint_attention_dim 16 (= the text hidden size), RoPE axes 8+4+4
  DIR/vae/           AutoencoderKLQwenImage: base_dim 8, z_dim 16, dim_mult [1,2,4,4], temperal_downsample
                     [False,True,True] (factor 8, both time_convs), non-trivial latents_mean/std
  DIR/text_encoder/  transformers Qwen2_5_VLForConditionalGeneration on qwen_vl_oracle.py's TINY config
  DIR/processor/, DIR/tokenizer/   qwen_vl_oracle.py's offline byte-level Qwen2 tokenizer + Qwen2VLProcessor
  DIR/scheduler/scheduler_config.json   Qwen-Image-Edit-2509's FlowMatchEulerDiscreteScheduler config
  DIR/qwen_image_edit_2509_tiny.safetensors   the transformer as one file (ComfyUI's `--dit` layout: diffusers names)
  DIR/stamp.json     script hash + arguments (re-running is instant)

Every parameter is perturbed by 0.05·N(0,1) (a swapped tensor shows).

--preset bench (scripts/bench_diffusion.sh qwen): the same files at benchmark widths, not
perturbed (the default init): transformer width 384 (6 heads of 64, RoPE axes 8+28+28), 4 blocks,
joint_attention_dim 128; Qwen2.5-VL text hidden 128 (2 layers, 4 heads, tied embeddings, so both
loaders hold the same weights), vision hidden 64 (2 blocks), out 128; VAE base_dim 32 (widths
32/64/128/128, factor 8). The default preset's output is unchanged by this option.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Qwen-Image-Edit-2509's scheduler/scheduler_config.json.
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                 time_shift_type="exponential")
TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True],
           latents_mean=[round(-1 + 2 * i / 15, 4) for i in range(16)],
           latents_std=[round(0.5 + 1.5 * i / 15, 4) for i in range(16)])
BENCH_TRANSFORMER = dict(TRANSFORMER, num_layers=4, attention_head_dim=64, num_attention_heads=6,
                         joint_attention_dim=128, axes_dims_rope=(8, 28, 28))
BENCH_VAE = dict(VAE, base_dim=32)
BENCH_VL = dict(
    text_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6}},
    vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                   "fullatt_block_indexes": [1]},
    vocab_size=152064, tie_word_embeddings=True,
)


def stamp_of(args):
    h = hashlib.sha256()
    for f in ("make_tiny_qwen_edit.py", "qwen_vl_oracle.py"):
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(fh.read())
    stamp = {"scripts_sha256": h.hexdigest(), "seed": args.seed}
    if args.preset != "tiny":  # the default preset's stamp.json stays as before the option
        stamp["preset"] = args.preset
    return stamp


def perturb(model, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=["tiny", "bench"], default="tiny")
    args = ap.parse_args()
    out = os.path.abspath(args.out.rstrip("/"))
    stamp = stamp_of(args)
    stamp_path = os.path.join(out, "stamp.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                print(f"{out}: up to date")
                return

    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import qwen_vl_oracle

    bench = args.preset == "bench"
    torch.manual_seed(args.seed)
    transformer = QwenImageTransformer2DModel(**(BENCH_TRANSFORMER if bench else TRANSFORMER)).eval()
    vae = AutoencoderKLQwenImage(**(BENCH_VAE if bench else VAE)).eval()
    text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**(BENCH_VL if bench else qwen_vl_oracle.TINY))).eval()
    if not bench:
        for i, m in enumerate([transformer, vae, text]):
            perturb(m, args.seed * 10 + i + 1)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tok, proc = qwen_vl_oracle.tokenizer_parts(tmp)
    shutil.rmtree(os.path.join(tmp, "tokenizer_bpe"), ignore_errors=True)
    sched = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
    pipe = QwenImageEditPlusPipeline(scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok, processor=proc,
                                     transformer=transformer)
    pipe.save_pretrained(tmp, safe_serialization=True)
    sd = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    save_file(sd, os.path.join(tmp, "qwen_image_edit_2509_tiny.safetensors"))
    with open(os.path.join(tmp, "stamp.json"), "w") as f:
        json.dump(stamp, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{out}: written")


if __name__ == "__main__":
    main()
