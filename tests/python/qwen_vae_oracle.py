"""Oracle for core/diffusion-torch's single-frame Qwen-Image VAE: a tiny random
AutoencoderKLQwenImage built with diffusers 0.42.1 (every parameter perturbed, the RMS-norm gammas
included, so a swapped or ignored tensor shows; one temporal and one spatial-only downsampling, so
both Resample kinds and their time_conv weights are present), saved with save_pretrained, and its
posterior (mean, logvar) of two images and its decode of two latents, each as one frame.

usage: qwen_vae_oracle.py --out DIR   (writes DIR/vae/..., DIR/*.f32, DIR/oracle.json)
"""

import argparse
import json
import os

import torch
from diffusers import AutoencoderKLQwenImage

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.7, 2.0, 1.0])


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
    vae = AutoencoderKLQwenImage(**TINY).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(os.path.join(out, "vae"))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 12, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 4, 3, generator=g)
    save_outputs(vae, out, images, latents, {})


def save_outputs(vae, out, images, latents, meta):
    """Single-frame encode (posterior mean, logvar) of `images` and decode of `latents`, written
    as `<name>.f32` with their shapes in `oracle.json` (with `meta`'s other entries)."""
    with torch.no_grad():
        dist = vae.encode(images.unsqueeze(2)).latent_dist
        decoded = vae.decode(latents.unsqueeze(2)).sample[:, :, 0]
    for name, t in [("images", images), ("latents", latents), ("mean", dist.mean[:, :, 0]),
                    ("logvar", dist.logvar[:, :, 0]), ("decoded", decoded)]:
        write(out, meta, name, t)
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
