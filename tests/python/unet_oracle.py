"""Oracle for core/diffusion-torch: tiny random SD1.5-shaped UNet2DConditionModel and AutoencoderKL
built with diffusers 0.42.1, saved with save_pretrained (safetensors), their outputs for fixed
inputs, a peft LoRA on the UNet (random non-zero lora_B), and the same weights in the original
single-file (LDM) key layout.

The LDM file is written by inverting diffusers' convert_ldm_{unet,vae}_checkpoint mapping below,
and then *checked* by running diffusers' own converter on it: it must give back exactly the
save_pretrained state dict, so the file's layout is diffusers', not ours.

usage: unet_oracle.py --out DIR   (writes DIR/{unet,unet_linear,vae}/..., DIR/*.safetensors, DIR/oracle.json)
"""

import argparse
import json
import os
import sys

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_sd15  # noqa: E402  (beside this file; it imports torch & co. only in main())

# The tiny configs are make_tiny_sd15.py's (its "tiny" preset): one definition for every tiny
# SD1.5 of the tests. UNET and perturb are imported from here by lora_oracle.py.
UNET = make_tiny_sd15.TINY_UNET
# SD2-style variant: linear projections, per-block head counts.
UNET_LINEAR = dict(UNET, use_linear_projection=True, attention_head_dim=[2, 4, 4])
VAE = make_tiny_sd15.TINY_VAE


def perturb(model, seed):
    # Every parameter + 0.05·N(0,1), so that a swapped or ignored tensor changes the output.
    make_tiny_sd15.perturb(model, seed, make_tiny_sd15.TINY_PERTURB)


def unet_to_ldm(sd, cfg):
    n = cfg["layers_per_block"]
    res = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]

    def resnet(r):
        for d, l in res:
            if r.startswith(d):
                return l + r[len(d):]
        raise KeyError(r)

    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("conv_in."):
            nk = "input_blocks.0.0." + k[len("conv_in."):]
        elif k.startswith("time_embedding.linear_1."):
            nk = "time_embed.0." + parts[-1]
        elif k.startswith("time_embedding.linear_2."):
            nk = "time_embed.2." + parts[-1]
        elif k.startswith("conv_norm_out."):
            nk = "out.0." + parts[-1]
        elif k.startswith("conv_out."):
            nk = "out.2." + parts[-1]
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "resnets":
                nk = f"input_blocks.{(n + 1) * i + int(parts[3]) + 1}.0.{resnet(rest)}"
            elif kind == "attentions":
                nk = f"input_blocks.{(n + 1) * i + int(parts[3]) + 1}.1.{rest}"
            else:  # downsamplers.0.conv.*
                nk = f"input_blocks.{(n + 1) * (i + 1)}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            nk = f"middle_block.{2 * int(parts[2])}.{resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "resnets":
                nk = f"output_blocks.{(n + 1) * i + int(parts[3])}.0.{resnet(rest)}"
            elif kind == "attentions":
                nk = f"output_blocks.{(n + 1) * i + int(parts[3])}.1.{rest}"
            else:
                at = 2 if cfg["up_block_types"][i] == "CrossAttnUpBlock2D" else 1
                nk = f"output_blocks.{(n + 1) * i + n}.{at}.conv.{parts[-1]}"
        else:
            raise KeyError(k)
        out["model.diffusion_model." + nk] = v
    return out


def vae_to_ldm(sd, cfg):
    nb = len(cfg["block_out_channels"])
    out = {}
    for k, v in sd.items():
        nk = k.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        p = nk.split(".")
        if p[1] == "down_blocks":
            nk = f"{p[0]}.down.{p[2]}." + (f"block.{p[4]}." + ".".join(p[5:]) if p[3] == "resnets" else "downsample.conv." + p[-1])
        elif p[1] == "up_blocks":
            li = nb - 1 - int(p[2])
            nk = f"{p[0]}.up.{li}." + (f"block.{p[4]}." + ".".join(p[5:]) if p[3] == "resnets" else "upsample.conv." + p[-1])
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                nk = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
            else:
                m = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[p[4]]
                nk = f"{p[0]}.mid.attn_1.{m}.{p[-1]}"
                if m != "norm" and p[-1] == "weight":
                    v = v[:, :, None, None]  # LDM's attention uses 1x1 convs
        out["first_stage_model." + nk] = v
    return out


def check_roundtrip(ldm, converted, sd, what):
    assert set(converted) == set(sd), f"{what}: diffusers' converter disagrees: {set(converted) ^ set(sd)}"
    for k in sd:
        assert torch.equal(converted[k].reshape(sd[k].shape), sd[k]), f"{what}: {k} differs after conversion"


def save(out, name, t):
    t.detach().contiguous().numpy().astype("<f4").tofile(os.path.join(out, name + ".f32"))
    return list(t.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = args.out
    torch.manual_seed(0)
    meta = {}

    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    timestep = torch.tensor([10.0, 731.0])
    ctx = torch.randn(2, 77, 32, generator=g)
    meta["sample"] = save(out, "sample", sample)
    meta["timestep"] = save(out, "timestep", timestep)
    meta["ctx"] = save(out, "ctx", ctx)

    unets = {}
    for name, cfg, seed in [("unet", UNET, 2), ("unet_linear", UNET_LINEAR, 3)]:
        unet = UNet2DConditionModel(**cfg).eval()
        perturb(unet, seed)
        unet.save_pretrained(os.path.join(out, name), safe_serialization=True)
        with torch.no_grad():
            meta[name + "_out"] = save(out, name + "_out", unet(sample, timestep, ctx).sample)
        unets[name] = unet

    unet = unets["unet"]
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    ldm_u = unet_to_ldm(sd, dict(unet.config))
    check_roundtrip(ldm_u, convert_ldm_unet_checkpoint(ldm_u, dict(unet.config)), sd, "unet")

    vae = AutoencoderKL(**VAE).eval()
    perturb(vae, 4)
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    latent = torch.randn(1, 4, 16, 16, generator=g)
    meta["image"] = save(out, "image", image)
    meta["latent"] = save(out, "latent", latent)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        meta["vae_mean"] = save(out, "vae_mean", dist.mean)
        meta["vae_logvar"] = save(out, "vae_logvar", dist.logvar)
        meta["vae_decoded"] = save(out, "vae_decoded", vae.decode(latent).sample)
    vsd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    ldm_v = vae_to_ldm(vsd, dict(vae.config))
    check_roundtrip(ldm_v, convert_ldm_vae_checkpoint(ldm_v, dict(vae.config)), vsd, "vae")
    # One single-file checkpoint with both networks, as SD1.5's v1-5-pruned.safetensors.
    save_file({k: v.contiguous() for k, v in {**ldm_u, **ldm_v}.items()}, os.path.join(out, "single_file.safetensors"))

    # peft LoRA on the attention projections, and LoCon on the resnet convs.
    for name, targets, r, alpha in [
        ("lora", ["to_q", "to_k", "to_v", "to_out.0"], 4, 8),
        ("locon", ["conv1", "conv2", "to_v"], 3, 6),
    ]:
        u = UNet2DConditionModel(**UNET).eval()
        u.load_state_dict(unet.state_dict())
        u.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=True))
        gl = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in u.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gl) * 0.1)
        with torch.no_grad():
            meta[name + "_out"] = save(out, name + "_out", u(sample, timestep, ctx).sample)
        lsd = get_peft_model_state_dict(u)
        save_file({k: v.contiguous() for k, v in lsd.items()}, os.path.join(out, name + ".safetensors"))
        meta[name] = {"r": r, "alpha": alpha, "targets": targets, "tensors": len(lsd)}

    # 10 DDIM steps (eta 0) with classifier-free guidance, then the VAE decode (SD1.5's
    # scheduler_config values, spelled out).
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                          timestep_spacing="leading")
    sched.set_timesteps(10)
    lat = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)
    uncond = torch.randn(1, 77, 32, generator=g)
    meta["ddim_latents"] = save(out, "ddim_latents", lat)
    meta["ddim_cond"] = save(out, "ddim_cond", cond)
    meta["ddim_uncond"] = save(out, "ddim_uncond", uncond)
    meta["ddim_timesteps"] = [int(t) for t in sched.timesteps]
    x = lat * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
            eu, ec = eps.chunk(2)
            x = sched.step(eu + 7.5 * (ec - eu), t, x, eta=0.0).prev_sample
        meta["ddim_x"] = save(out, "ddim_x", x)
        meta["ddim_image"] = save(out, "ddim_image", vae.decode(x / vae.config.scaling_factor).sample)

    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
