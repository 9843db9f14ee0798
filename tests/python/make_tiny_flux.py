"""Writes a complete, random-weight Flux.1-dev-shaped model: a diffusers FluxPipeline folder saved
by diffusers 0.42.1 itself.

usage: make_tiny_flux.py --out DIR [--seed N] [--preset tiny|bench]

Output (stable: other tests call this script):
  DIR/model_index.json
  DIR/transformer/   FluxTransformer2DModel (flux_oracle.py's TINY_FLUX with in_channels 64, guidance_embeds=True)
  DIR/vae/           AutoencoderKL, 16 latent channels, no quant convs, Flux's scaling/shift factors,
                     two blocks (latent scale 2)
  DIR/text_encoder/  transformers CLIPTextModel, hidden 24 (= the transformer's pooled width)
  DIR/tokenizer/     CLIPTokenizer over the REAL CLIP BPE vocab (make_tiny_sd15.py's)
  DIR/text_encoder_2/ transformers T5EncoderModel, d_model 32 (= joint_attention_dim), gated-gelu
  DIR/tokenizer_2/   T5TokenizerFast: a Unigram model trained here on generated prompts (no T5
                     vocab can be downloaded), with T5's normaliser, Metaspace pre-tokeniser, `</s>`
                     appended, `<pad>` = 0, `</s>` = 1, `<unk>` = 2 (T5's special ids)
  DIR/scheduler/scheduler_config.json   FLUX.1-dev's FlowMatchEulerDiscreteScheduler config
  DIR/transformer-bfl.safetensors  the same transformer weights in the original Black Forest Labs
                     single-file layout (flux1-dev.safetensors's names, fused qkv / linear1), checked
                     by diffusers' own single-file converter (flux_oracle.py's diffusers_to_bfl)
  DIR/stamp.json     script hash + arguments (re-running is instant)

Presets:
  tiny:  the above (every parameter perturbed by 0.05·N(0,1): a swapped tensor shows).
  bench: a tiny-but-not-trivial model for scripts/bench_flux.sh: transformer width 384 (6 heads of
         64, RoPE axes 8+28+28), 2 double + 4 single blocks, T5/CLIP widths 256/128 as above but
         wider; a 4-block VAE (32/64/128/128: factor 8, so 256-px images are 32×32 latents, 256
         packed tokens). Default initialisation, not perturbed.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)
T5_VOCAB = 200
TINY_T5 = dict(vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


BENCH_FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                  num_attention_heads=6, joint_attention_dim=256, pooled_projection_dim=128, axes_dims_rope=[8, 28, 28])
BENCH_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 128, 128], layers_per_block=1,
                 latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159)


def stamp_of(args):
    h = hashlib.sha256()
    for f in ("make_tiny_flux.py", "flux_oracle.py", "make_tiny_sd15.py"):
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(fh.read())
    return {"scripts_sha256": h.hexdigest(), "seed": args.seed, "preset": args.preset}


# The tiny Unigram's training text: prompts built from these words (self-contained, so the
# vocabulary is the same on every machine).
WORDS = """a an the photo portrait picture image of person man woman child face smiling serious
looking at camera in on with wearing suit shirt dress hat glasses beard hair short long dark light
studio outdoor indoor park beach street city forest mountain sunset morning night rain snow soft
sharp lighting background blurred close up side view front profile happy sad calm young old sks
barack obama joe biden president standing sitting walking holding flowers book coffee cup phone
red green blue black white yellow brown gray painting drawing sketch cinematic film grain high
quality detailed realistic""".split()


def corpus():
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", ",", "!", ""])
            for _ in range(4000)]


def t5_tokenizer(tmp):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    # T5's tokenizer.json: NFKC-free precompiled charsmap is SentencePiece's; we use the same
    # whitespace rules (collapse runs of spaces) and Metaspace with prepend_scheme "always".
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=T5_VOCAB, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() == T5_VOCAB, tok.get_vocab_size()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    assert fast.pad_token_id == 0 and fast.eos_token_id == 1 and fast.unk_token_id == 2
    return fast


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
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    import make_tiny_sd15
    from flux_oracle import TINY_FLUX, TINY_FLUX_VAE

    torch.manual_seed(args.seed)
    bench = args.preset == "bench"
    # 16 latent channels packed 2×2 → 64 input channels (FLUX.1-dev's in_channels).
    tcfg = BENCH_FLUX if bench else dict(TINY_FLUX, in_channels=64)
    transformer = FluxTransformer2DModel(**tcfg, guidance_embeds=True).eval()
    vae = AutoencoderKL(**(BENCH_VAE if bench else TINY_FLUX_VAE)).eval()
    clip_width = tcfg["pooled_projection_dim"]
    text = CLIPTextModel(make_tiny_sd15.text_config(dict(hidden_size=clip_width, intermediate_size=2 * clip_width,
                                                         num_hidden_layers=2, num_attention_heads=4))).eval()
    t5 = T5EncoderModel(T5Config(**dict(TINY_T5, d_model=tcfg["joint_attention_dim"],
                                        d_ff=TINY_T5["d_ff"] * (8 if bench else 1)))).eval()
    if not bench:
        for i, m in enumerate([transformer, vae, text, t5]):
            make_tiny_sd15.perturb(m, args.seed * 10 + i + 1, 0.05)
    tok_files = tempfile.mkdtemp(prefix="make_tiny_flux-")
    tok = make_tiny_sd15.tokenizer(tok_files)
    tok2 = t5_tokenizer(tok_files)
    sched = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=transformer)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tok_files, name), os.path.join(tmp, "tokenizer", name))
    shutil.rmtree(tok_files)
    from flux_oracle import check_bfl, diffusers_to_bfl
    from safetensors.torch import save_file

    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    bfl = diffusers_to_bfl(sd, tcfg["num_layers"], tcfg["num_single_layers"])
    check_bfl(bfl, sd, tcfg["num_attention_heads"] * tcfg["attention_head_dim"])
    save_file(bfl, os.path.join(tmp, "transformer-bfl.safetensors"))
    with open(os.path.join(tmp, "stamp.json"), "w") as f:
        json.dump(stamp, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{out}: written")


if __name__ == "__main__":
    main()
