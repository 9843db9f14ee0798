"""Writes a complete, random-weight Stable Diffusion 1.5-shaped model: a diffusers
StableDiffusionPipeline folder saved by diffusers 0.42.1 itself, plus the same weights as one
original (LDM/CompVis) single-file checkpoint.

usage: make_tiny_sd15.py --out DIR [--preset tiny|half] [--seed N] [--single FILE] [--scheduler pndm|ddim]

Output (stable: other tests and plugins call this script):
  DIR/model_index.json
  DIR/unet/{config.json,diffusion_pytorch_model.safetensors}
  DIR/vae/{config.json,diffusion_pytorch_model.safetensors}
  DIR/text_encoder/{config.json,model.safetensors}      transformers 5 CLIPTextModel (keys without
                                                        the `text_model.` prefix, as transformers 5 saves)
  DIR/tokenizer/{tokenizer.json,tokenizer_config.json,vocab.json,merges.txt}  the REAL
                                                        CLIP BPE vocab (open_clip's bpe_simple_vocab_16e6)
  DIR/scheduler/scheduler_config.json                   SD1.5's (PNDMScheduler, or DDIMScheduler with
                                                        --scheduler ddim; same betas/offset)
  DIR/stamp.json                                        script hash + arguments (re-running is instant)
  FILE (default DIR/../<basename DIR>-single.safetensors): LDM keys `model.diffusion_model.*`,
        `first_stage_model.*`, `cond_stage_model.transformer.text_model.*` (+ the
        `...embeddings.position_ids` buffer, as SD1.5's v1-5-pruned file has it).

Presets:
  tiny: UNet block_out 32/64/64, cross_attention 32, sample_size 16 (tests/python/unet_oracle.py's),
        VAE block_out 32/64 (latent scale 2, 4 latent channels, scaling 0.18215), CLIP text hidden 32,
        2 layers, 4 heads, vocab 49408, 77 positions, quick_gelu. Every parameter is perturbed by
        0.05·N(0,1) so that a swapped or ignored tensor changes outputs (norms would otherwise be 1/0).
  half: SD1.5's UNet with widths halved (160/320/640/640, cross 768, 2 layers/block, head dim 8,
        sample_size 32), a small VAE (32/64/128/128, latent scale 8), CLIP text hidden 768, 2 layers,
        12 heads. Default initialisation (a benchmark model; large-fan-in weights are not perturbed).

The single file is written by inverting diffusers' convert_ldm_* mappings and then CHECKED: loading
it with StableDiffusionPipeline.from_single_file(FILE, config=DIR) must give back every tensor of
the saved pipeline exactly; diffusers' own convert_ldm_{unet,vae,clip}_checkpoint are checked too.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
)

# The tiny UNet2DConditionModel and AutoencoderKL configs: the "tiny" preset below, and the
# models of tests/python/unet_oracle.py (and, through it, lora_oracle.py), which import them from
# here so that every tiny SD1.5 in the tests has one definition.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 64],
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.18215,
)
# Standard deviation of the noise added to every parameter of a tiny model (see perturb()).
TINY_PERTURB = 0.05

PRESETS = {
    "tiny": dict(
        unet=TINY_UNET,
        vae=TINY_VAE,
        text=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        perturb=TINY_PERTURB,
    ),
    "half": dict(
        unet=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[160, 320, 640, 640],
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[32, 64, 128, 128],
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=256,
            scaling_factor=0.18215,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12),
        perturb=0.0,
    ),
}


def text_config(t):
    from transformers import CLIPTextConfig

    # SD1.5's text_encoder/config.json values (CLIP ViT-L/14's text tower), widths from the preset.
    # bos/eos/pad ids as SD1.5's file has them (0/2/1: the legacy ids, for which transformers pools
    # at argmax(input_ids), the EOT token being the largest id).
    return CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        attention_dropout=0.0,
        dropout=0.0,
        **t,
    )


def tokenizer(tmp):
    """transformers' CLIPTokenizer over open_clip's real BPE vocab (tests/python/clip_oracle.py's way)."""
    from transformers import CLIPTokenizer

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    home = os.environ.get("LIKENESS_HOME") or os.path.join(cache, "likeness")
    data = os.environ.get("LIKENESS_DATA") or os.path.join(home, "data")
    bpe = os.path.join(data, "reference", "open_clip-3.3.0", "open_clip", "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(bpe):
        sys.exit(f"{bpe}: missing; run scripts/setup.sh (it unpacks open_clip 3.3.0 into $LIKENESS_DATA/reference)")
    sys.path.insert(0, os.path.dirname(os.path.dirname(bpe)))
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer(bpe)
    # open_clip's vocab with transformers' special names (same ids 49406 / 49407).
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    # SD1.5's tokenizer pads with <|endoftext|> to 77.
    tok = CLIPTokenizer.from_pretrained(tmp, pad_token="<|endoftext|>", model_max_length=77)
    with gzip.open(bpe) as f:  # sanity: the vocab really is the 49408-entry CLIP vocab
        assert f.readline()
    assert len(tok) == 49408, len(tok)
    return tok


def perturb(model, seed, scale):
    """Adds scale·N(0, 1) (a generator seeded with `seed`) to every parameter: default init leaves
    norms at 1/0 and some biases at 0, so a swapped or ignored tensor would not change outputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def text_to_ldm(sd):
    import torch

    out = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in sd.items()}
    # SD1.5's single file carries the (then persistent) position_ids buffer; loaders must skip it.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def stamp_of(args):
    with open(os.path.abspath(__file__), "rb") as f:
        h = hashlib.sha256(f.read()).hexdigest()
    return {"script_sha256": h, "preset": args.preset, "seed": args.seed, "scheduler": args.scheduler,
            "single": os.path.abspath(args.single)}


def check_equal(a, b, what):
    import torch

    assert set(a) == set(b), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        assert torch.equal(a[k].reshape(b[k].shape), b[k]), f"{what}: {k} differs"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single", help="single-file path (default DIR/../<name>-single.safetensors)")
    ap.add_argument("--scheduler", choices=["pndm", "ddim"], default="pndm")
    args = ap.parse_args()
    out = os.path.abspath(args.out.rstrip("/"))
    if args.single is None:
        args.single = os.path.join(os.path.dirname(out), os.path.basename(out) + "-single.safetensors")
    stamp = stamp_of(args)
    stamp_path = os.path.join(out, "stamp.json")
    if os.path.exists(stamp_path) and os.path.exists(args.single):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                print(f"{out}: up to date")
                return

    # Imported only when there is work to do: an up-to-date folder answers without loading torch.
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import save_file
    from transformers import CLIPTextModel
    from unet_oracle import unet_to_ldm, vae_to_ldm

    p = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**p["unet"]).eval()
    vae = AutoencoderKL(**p["vae"]).eval()
    text = CLIPTextModel(text_config(p["text"])).eval()
    if p["perturb"]:
        for i, m in enumerate([unet, vae, text]):
            perturb(m, args.seed * 10 + i + 1, p["perturb"])
    tok_files = tempfile.mkdtemp(prefix="make_tiny_sd15-")
    tok = tokenizer(tok_files)
    sched_cls = PNDMScheduler if args.scheduler == "pndm" else DDIMScheduler
    # from_config, as diffusers reads SD1.5's file: keys a class does not take are ignored.
    sched = sched_cls.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves tokenizer.json only; SD1.5's folder also has vocab.json + merges.txt
    # (what older loaders read). Both describe the same BPE.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tok_files, name), os.path.join(out, "tokenizer", name))
    shutil.rmtree(tok_files)

    usd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    vsd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    tsd = {k: v.contiguous() for k, v in text.state_dict().items()}
    ldm_u = unet_to_ldm(usd, dict(unet.config))
    ldm_v = vae_to_ldm(vsd, dict(vae.config))
    ldm_t = text_to_ldm(tsd)
    # diffusers' converters must give back the saved state dicts exactly.
    check_equal(convert_ldm_unet_checkpoint(ldm_u, dict(unet.config)), usd, "unet")
    check_equal(convert_ldm_vae_checkpoint(ldm_v, dict(vae.config)), vsd, "vae")
    conv_t = convert_ldm_clip_checkpoint(ldm_t)
    conv_t.pop("text_model.embeddings.position_ids")
    check_equal({k[len("text_model."):]: v for k, v in conv_t.items()}, tsd, "text encoder")
    os.makedirs(os.path.dirname(args.single), exist_ok=True)
    tmp = args.single + ".tmp"
    save_file({k: v.contiguous() for k, v in {**ldm_u, **ldm_v, **ldm_t}.items()}, tmp)
    os.replace(tmp, args.single)

    # And the whole file through diffusers' own single-file loader (offline: config = our folder).
    single = StableDiffusionPipeline.from_single_file(args.single, config=out, local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    check_equal({k: v for k, v in single.unet.state_dict().items()}, usd, "from_single_file unet")
    check_equal({k: v for k, v in single.vae.state_dict().items()}, vsd, "from_single_file vae")
    check_equal({k: v for k, v in single.text_encoder.state_dict().items()}, tsd, "from_single_file text encoder")

    with open(stamp_path + ".tmp", "w") as f:
        json.dump(stamp, f, indent=1)
    os.replace(stamp_path + ".tmp", stamp_path)
    print(f"{out}: written ({args.preset}); single file {args.single}")


if __name__ == "__main__":
    main()
