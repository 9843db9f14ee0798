"""Oracle for core/diffusion-torch's Wan-2.1 / ComfyUI layout of the Qwen-Image VAE (the names
of ComfyUI's `qwen_image_vae.safetensors`, which musubi-tuner's --vae also reads).

A tiny random AutoencoderKLQwenImage (make_tiny_qwen_edit.py's VAE and its perturbation, but
with Qwen-Image's own topology: num_res_blocks 2, so decoder.upsamples.0..14 with the shortcut at
4 and the time_convs at 3 and 7 — the only topology diffusers' converter knows) is saved twice:

  DIR/vae/                         save_pretrained (config.json + diffusers names)
  DIR/comfy/qwen_image_vae.safetensors   the same tensors under the Wan-2.1 names
  DIR/comfy/config.json            a copy of vae/config.json (a real ComfyUI file has none: the
                                   loader then uses Qwen-Image's config, see wan_manifest.json)
  DIR/wan_manifest.json            {"tensors": {Wan name: shape}, "num_params"} of the full-size
                                   AutoencoderKLQwenImage() (Qwen-Image's config), built on `meta`
  DIR/*.f32, DIR/oracle.json       two images, two latents, and diffusers' encode / decode of them

The Wan names are written by `wan_name` below and checked against diffusers' own conversion,
`diffusers.loaders.single_file_utils.convert_wan_vae_to_diffusers` (the single-file loader of
AutoencoderKLWan, whose layout AutoencoderKLQwenImage shares): converting the Wan file back must
give exactly the diffusers state dict (the same names, bit-identical tensors) — for the tiny model
and for the full-size one — so the mapping the Rust test relies on is diffusers', not ours.

usage: qwen_vae_wan_layout.py --out DIR
"""

import argparse
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# A residual block's modules: diffusers' name → its index in Wan's `residual` Sequential
# (RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv) or `shortcut`.
RESIDUAL = {"norm1": ["residual", "0"], "conv1": ["residual", "2"], "norm2": ["residual", "3"],
            "conv2": ["residual", "6"], "conv_shortcut": ["shortcut"]}
# conv_in / norm_out / conv_out of either coder: Wan's conv1 and its `head` Sequential.
ENDS = {"conv_in": ["conv1"], "norm_out": ["head", "0"], "conv_out": ["head", "2"]}
TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}


def decoder_slots(cfg):
    """Wan's decoder is one flat `upsamples` list: per stage num_res_blocks + 1 residual blocks
    (each followed by an attention block where the stage's scale is in attn_scales), then the
    stage's Resample (not after the last stage)."""
    n = len(cfg["dim_mult"])
    scale, k, res, up = 1.0 / 2 ** (n - 2), 0, {}, {}
    for i in range(n):
        for j in range(cfg["num_res_blocks"] + 1):
            res[(i, j)] = k
            k += 1 + (scale in cfg["attn_scales"])
        if i != n - 1:
            up[i] = k
            k += 1
            scale *= 2
    return res, up


def block(tail):
    return RESIDUAL[tail[0]] + tail[1:] if tail[0] in RESIDUAL else tail


def wan_name(key, cfg):
    p = key.split(".")
    if p[0] in TOP:
        return ".".join([TOP[p[0]]] + p[1:])
    coder, rest = p[0], p[1:]
    if rest[0] in ENDS:
        out = ENDS[rest[0]] + rest[1:]
    elif rest[0] == "mid_block":
        slot = 1 if rest[1] == "attentions" else 2 * int(rest[2])
        out = ["middle", str(slot)] + block(rest[3:])
    elif rest[0] == "down_blocks":  # the encoder's list is flat in both layouts
        out = ["downsamples", rest[1]] + block(rest[2:])
    elif rest[0] == "up_blocks":
        res, up = decoder_slots(cfg)
        i = int(rest[1])
        if rest[2] == "resnets":
            out = ["upsamples", str(res[(i, int(rest[3]))])] + block(rest[4:])
        else:  # upsamplers.0.{resample.1, time_conv}
            out = ["upsamples", str(up[i])] + rest[4:]
    else:
        raise KeyError(key)
    return ".".join([coder] + out)


def to_wan(sd, cfg):
    wan = {wan_name(k, cfg): v for k, v in sd.items()}
    assert len(wan) == len(sd), "two diffusers names map to one Wan name"
    return wan


def check_with_diffusers(sd, wan, what):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    back = convert_wan_vae_to_diffusers(dict(wan))
    missing, extra = sorted(set(sd) - set(back)), sorted(set(back) - set(sd))
    assert not missing and not extra, f"{what}: diffusers' conversion gives missing {missing[:5]}, extra {extra[:5]}"
    for k, v in sd.items():
        b = back[k]
        assert b.shape == v.shape and b.dtype == v.dtype, f"{what}: {k}: {b.shape} {b.dtype} vs {v.shape} {v.dtype}"
        if v.device.type != "meta":
            assert torch.equal(b, v), f"{what}: {k} differs after diffusers' conversion"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)

    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file

    import make_tiny_qwen_edit
    import qwen_vae_oracle

    cfg = dict(make_tiny_qwen_edit.VAE, num_res_blocks=2)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**cfg).eval()
    make_tiny_qwen_edit.perturb(vae, 7)
    vae.save_pretrained(os.path.join(out, "vae"))
    sd = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    wan = to_wan(sd, cfg)
    check_with_diffusers(sd, wan, "tiny")
    comfy = os.path.join(out, "comfy")
    os.makedirs(comfy, exist_ok=True)
    save_file(wan, os.path.join(comfy, "qwen_image_vae.safetensors"))
    shutil.copy(os.path.join(out, "vae", "config.json"), os.path.join(comfy, "config.json"))

    # The full-size layout (Qwen-Image's config, the defaults), shapes only.
    with torch.device("meta"):
        big = AutoencoderKLQwenImage()
    big_cfg = dict(big.config)
    big_sd = big.state_dict()
    big_wan = to_wan(big_sd, big_cfg)
    check_with_diffusers(big_sd, big_wan, "full size")
    manifest = {"tensors": {k: list(v.shape) for k, v in sorted(big_wan.items())},
                "num_params": sum(v.numel() for v in big_sd.values())}
    with open(os.path.join(out, "wan_manifest.json"), "w") as f:
        json.dump(manifest, f)

    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    latents = torch.randn(2, cfg["z_dim"], 2, 3, generator=g)
    qwen_vae_oracle.save_outputs(vae, out, images, latents, {"diffusers_tensors": len(sd)})


if __name__ == "__main__":
    main()
