"""Oracle for core/diffusion-torch's Flux transformer: tiny random FluxTransformer2DModels built
with diffusers 0.42.1 (one Flux-dev-like with the guidance embedding, one schnell-like without),
every parameter perturbed so a swapped or ignored tensor shows, saved with save_pretrained
(safetensors), and their outputs for fixed packed latents, text states, pooled vectors,
timesteps, guidance and position ids built as FluxPipeline builds them.

usage: flux_oracle.py --out DIR   (writes DIR/{dev,schnell}/transformer/..., DIR/*.f32, DIR/oracle.json)
"""

import argparse
import copy
import json
import os

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

# Not trivial: 2 double + 2 single blocks, 2 heads of 16 (RoPE axes 4+6+6), 16 packed channels
# (a 4-channel latent), text width 32, pooled width 24.
TINY_FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=[4, 6, 6],
)

# The Flux VAE's shape at tiny size: 16 latent channels, no quant convs, scaling and shift
# factors (FLUX.1-dev's values), two blocks (a factor-2 VAE).
TINY_FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def diffusers_to_bfl(sd, n_double, n_single):
    """The original Black Forest Labs layout (flux1-dev.safetensors) of a diffusers state dict: the
    inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers, checked against it below."""
    out = {}
    g = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
         "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
         "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
         "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
         "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
         "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
         "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
    for b, d in g.items():
        for leaf in ("weight", "bias"):
            if f"{d}.{leaf}" in sd:
                out[f"{b}.{leaf}"] = sd[f"{d}.{leaf}"]
    for leaf in ("weight", "bias"):  # BFL's final modulation is (shift, scale); diffusers' (scale, shift)
        scale, shift = sd[f"norm_out.linear.{leaf}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            for stream, parts in [("img", ["to_q", "to_k", "to_v"]), ("txt", ["add_q_proj", "add_k_proj", "add_v_proj"])]:
                out[f"{b}{stream}_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.{p}.{leaf}"] for p in parts])
            for bb, dd in [("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                           ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                           ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                           ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out")]:
                out[f"{b}{bb}.{leaf}"] = sd[f"{d}{dd}.{leaf}"]
        for bb, dd in [("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                       ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")]:
            out[f"{b}{bb}.scale"] = sd[f"{d}attn.{dd}.weight"]
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{b}linear1.{leaf}"] = torch.cat([sd[f"{d}{p}.{leaf}"] for p in
                                                    ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]])
            out[f"{b}linear2.{leaf}"] = sd[f"{d}proj_out.{leaf}"]
            out[f"{b}modulation.lin.{leaf}"] = sd[f"{d}norm.linear.{leaf}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_sd_of(bfl, inner_dim):
    """diffusers' own single-file converter (convert_flux_transformer_checkpoint_to_diffusers) on a
    BFL state dict; it must consume every key. It hard-codes FLUX.1's width (`inner_dim = 3072`)
    for splitting linear1: its source is recompiled with the tiny width in that one line,
    everything else is diffusers' code."""
    import inspect

    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1, "diffusers' converter changed: update diffusers_sd_of"
    ns = dict(sfu.__dict__)
    exec(compile(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), sfu.__file__, "exec"), ns)
    left = dict(bfl)
    back = ns["convert_flux_transformer_checkpoint_to_diffusers"](left)
    assert not left, f"keys diffusers did not consume: {sorted(left)[:5]}"
    return back


def check_bfl(bfl, sd, inner_dim):
    """`bfl` is `sd` in BFL's layout: diffusers' converter gives `sd` back exactly."""
    back = diffusers_sd_of(bfl, inner_dim)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:5]
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def fp8_scaled(bfl):
    """ComfyUI's "fp8 scaled" single files: every 2-d weight in float8_e4m3fn with a per-tensor
    `scale_weight` (max |w| / 448), the rest as they are; and the weights they stand for."""
    out, dequant = {}, {}
    for k, v in bfl.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = (v.abs().max() / 448.0).reshape(1)
            q = (v / scale).to(torch.float8_e4m3fn)
            out[k] = q
            out[k[: -len("weight")] + "scale_weight"] = scale
            dequant[k] = q.to(torch.float32) * scale
        else:
            out[k] = v
            dequant[k] = v
    return out, dequant


def dump(out, meta, name, t):
    t = t.detach().to(torch.float32).contiguous()
    t.numpy().tofile(os.path.join(out, f"{name}.f32"))
    meta[name] = list(t.shape)


# "All linears" of musubi-tuner's / ai-toolkit's Flux LoRA, as peft target names.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm1_context.linear", "norm.linear"]


def lora_on(model, out, meta, inputs):
    """A peft LoRA (random non-zero lora_B) on a copy of `model`: its output and its state dict."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    m = copy.deepcopy(model)
    r, alpha = 4, 6
    m.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=True))
    gl = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gl) * 0.1)
        dump(out, meta, "lora_out", m(**inputs, return_dict=False)[0])
    sd = get_peft_model_state_dict(m)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "lora.safetensors"))
    meta["lora"] = {"r": r, "alpha": alpha, "targets": LORA_TARGETS, "tensors": len(sd)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    meta = {}
    g = torch.Generator().manual_seed(0)
    b, c, h, w, m = 2, 4, 8, 6, 7
    latents = torch.randn(b, c, h, w, generator=g)
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(m, 3)
    ctx = torch.randn(b, m, TINY_FLUX["joint_attention_dim"], generator=g)
    pooled = torch.randn(b, TINY_FLUX["pooled_projection_dim"], generator=g)
    timestep = torch.tensor([0.83, 0.21])
    guidance = torch.tensor([3.5, 1.0])
    for name, t in [("latents", latents), ("packed", packed), ("img_ids", img_ids), ("txt_ids", txt_ids),
                    ("ctx", ctx), ("pooled", pooled), ("timestep", timestep), ("guidance", guidance)]:
        dump(out, meta, name, t)
    unpacked = FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8)
    assert torch.equal(unpacked, latents)
    for variant, guided in [("dev", True), ("schnell", False)]:
        torch.manual_seed(1 if guided else 2)
        model = FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=guided).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(os.path.join(out, variant, "transformer"), safe_serialization=True)
        with torch.no_grad():
            y = model(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=pooled,
                      timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                      guidance=guidance if guided else None, return_dict=False)[0]
            dump(out, meta, f"{variant}_out", y)
        if guided:
            from safetensors.torch import save_file

            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bfl = diffusers_to_bfl(sd, TINY_FLUX["num_layers"], TINY_FLUX["num_single_layers"])
            check_bfl(bfl, sd, TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"])
            save_file(bfl, os.path.join(out, "dev_bfl.safetensors"))
            q, dequant = fp8_scaled(bfl)
            save_file(q, os.path.join(out, "dev_bfl_fp8_scaled.safetensors"))
            m8 = copy.deepcopy(model)
            # The dequantised weights in diffusers' layout, through the same verified converter.
            m8.load_state_dict(diffusers_sd_of(dequant, TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"]))
            with torch.no_grad():
                dump(out, meta, "dev_fp8_out", m8(hidden_states=packed, encoder_hidden_states=ctx,
                                                  pooled_projections=pooled, timestep=timestep, img_ids=img_ids,
                                                  txt_ids=txt_ids, guidance=guidance, return_dict=False)[0])
            # fp8 storage of every block Linear weight (musubi-tuner's --fp8_base): scale =
            # max|w| / 448 in f32, q = float8_e4m3fn(w / scale), used as q.float() · scale.
            mq = copy.deepcopy(model)
            with torch.no_grad():
                for name, mod in mq.named_modules():
                    if isinstance(mod, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
                        w = mod.weight.float()
                        sc = w.abs().max() / 448.0
                        mod.weight.copy_((w / sc).to(torch.float8_e4m3fn).float() * sc)
                dump(out, meta, "dev_fp8base_out", mq(hidden_states=packed, encoder_hidden_states=ctx,
                                                      pooled_projections=pooled, timestep=timestep, img_ids=img_ids,
                                                      txt_ids=txt_ids, guidance=guidance, return_dict=False)[0])
            lora_on(model, out, meta, dict(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=pooled,
                                           timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance))
        with torch.no_grad():
            # bf16 weights and activations, as Flux is trained: our bf16 must track this.
            mb = model.to(torch.bfloat16)
            yb = mb(hidden_states=packed.bfloat16(), encoder_hidden_states=ctx.bfloat16(),
                    pooled_projections=pooled.bfloat16(), timestep=timestep.bfloat16(), img_ids=img_ids,
                    txt_ids=txt_ids, guidance=guidance.bfloat16() if guided else None, return_dict=False)[0]
            dump(out, meta, f"{variant}_out_bf16", yb)
    torch.manual_seed(3)
    vae = AutoencoderKL(**TINY_FLUX_VAE).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    image = torch.rand(1, 3, 16, 12, generator=g) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
        # FluxPipeline's latent convention: (z − shift) · scale in, z / scale + shift out.
        scaled = (mean - vae.config.shift_factor) * vae.config.scaling_factor
        decoded = vae.decode(scaled / vae.config.scaling_factor + vae.config.shift_factor).sample
    dump(out, meta, "vae_image", image)
    dump(out, meta, "vae_mean", mean)
    dump(out, meta, "vae_scaled", scaled)
    dump(out, meta, "vae_decoded", decoded)
    cos, sin = model.pos_embed(torch.cat([txt_ids, img_ids]))
    dump(out, meta, "rope_cos", cos)
    dump(out, meta, "rope_sin", sin)
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
