"""Oracle for core/diffusion-torch's Qwen-Image transformer: a tiny random
QwenImageTransformer2DModel built with diffusers 0.42.1 (every parameter perturbed so a swapped or
ignored tensor shows), saved with save_pretrained, and its output for edit-plus-shaped inputs: a
batch of 2, the noisy target's tokens followed by one control image's (img_shapes of two images of
different sizes), a text mask with padding that differs per sample, and two timesteps.

usage: qwen_image_oracle.py --out DIR   (writes DIR/transformer/..., DIR/*.f32, DIR/oracle.json)
"""

import argparse
import json
import os

import torch
from diffusers import QwenImageTransformer2DModel

# 2 blocks, 2 heads of 16 (RoPE axes 4+6+6), 4 latent channels (16 packed), text width 32.
TINY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)
IMG_SHAPES = [(1, 2, 3), (1, 2, 2)]  # (frames, h, w) in packed tokens: target, then one control
S_TXT = 5


def write(out, meta, name, t):
    t = t.detach().to(torch.float32).contiguous()
    t.numpy().tofile(os.path.join(out, f"{name}.f32"))
    meta[name] = list(t.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out, "transformer"))
    s_img = sum(f * h * w for f, h, w in IMG_SHAPES)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, s_img, TINY["in_channels"], generator=g)
    ctx = torch.randn(2, S_TXT, TINY["joint_attention_dim"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.long)
    timestep = torch.tensor([0.7, 0.3])
    meta = {"img_shapes": IMG_SHAPES}
    with torch.no_grad():
        y = model(
            hidden_states=hidden,
            encoder_hidden_states=ctx,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=[IMG_SHAPES] * 2,
            return_dict=False,
        )[0]
        y_nomask = model(
            hidden_states=hidden,
            encoder_hidden_states=ctx,
            timestep=timestep,
            img_shapes=[IMG_SHAPES] * 2,
            return_dict=False,
        )[0]
    for name, t in [("hidden", hidden), ("ctx", ctx), ("mask", mask), ("timestep", timestep), ("out", y),
                    ("out_nomask", y_nomask)]:
        write(out, meta, name, t)
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
