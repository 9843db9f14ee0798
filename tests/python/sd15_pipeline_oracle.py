"""Oracle for core/diffusion-torch's text encoder, tokenizer, denoising loop and training helpers:
diffusers 0.42.1's StableDiffusionPipeline (and transformers 5.24's CLIPTextModel/CLIPTokenizer) on
a model folder written by make_tiny_sd15.py.

usage: sd15_pipeline_oracle.py --model DIR --out OUT
writes OUT/oracle.json (shapes, ids, timesteps) and OUT/<name>.f32 (little-endian float32).

- tokenizer: CLIPTokenizer(DIR/tokenizer) ids (padding="max_length" to 77, truncation) of ~50
  varied prompts;
- text encoder: CLIPTextModel(DIR/text_encoder) last_hidden_state, hidden_states[-2] and
  pooler_output for 4 prompts;
- pipelines: the pipeline's own prompt embeddings (encode_prompt) and, from the SAME initial
  latents, 10 steps at guidance 7.5 with DDIMScheduler / EulerDiscreteScheduler (epsilon and
  v_prediction; Euler also with linspace spacing), output_type="latent", then the pipeline's
  decode + postprocess (image in [0, 1]);
- DDPMScheduler.add_noise / get_velocity on fixed tensors.
"""

import argparse
import json
import os

import torch

PROMPTS = [
    "a photo of sks person",
    "",
    "A Portrait of a WOMAN, smiling; soft light (85mm), 4k!!",
    "ein Foto von einer Katze auf dem Sofa, übermäßig süß — café ☕",
]

TOKENIZER_PROMPTS = PROMPTS + [
    "a photo of a dog",
    "photo of sks man wearing sunglasses, highly detailed, trending on artstation",
    "UPPER lower MiXeD",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "punctuation!!! ??? ... --- ___ *** ### @@@",
    "emoji 😀🎉👍 and flags 🇫🇷",
    "日本語のプロンプト、東京の夜景",
    "中文提示词：一只猫",
    "Ελληνικά και русский текст",
    "tabs\tand\nnewlines   and    spaces",
    "  leading and trailing spaces  ",
    "it's don't we're they've I'm you'll he'd",
    "(masterpiece:1.2), [best quality], {very detailed}",
    "a, b, c, d, e, f, g",
    "hyphen-ated words and under_scored_words",
    "URL https://example.com/path?x=1&y=2",
    "email someone@example.org",
    "html &amp; entities &lt;tag&gt;",
    "accents: naïve café résumé façade jalapeño",
    "German ß and ẞ, Turkish İı",
    "<|startoftext|> literal specials <|endoftext|>",
    "a" * 100,
    "word " * 90,
    "long prompt: " + ", ".join(f"detail number {i}" for i in range(40)),
    "sks",
    "ohwx person",
    "a photograph of an astronaut riding a horse",
    "cyberpunk city at night, neon lights, rain, reflections, 8k uhd",
    "oil painting by Rembrandt van Rijn",
    "$100 & 50% off #sale",
    "math: x^2 + y^2 = z^2, a<b>c",
    "quotes \"double\" and 'single' and `back`",
    "slashes / \\ | and brackets < > [ ] { }",
    "ümlaut Ö Ä Ü",
    "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "combining e\u0301 vs é",
    "zero\u200bwidth space",
    "one",
    "two words",
    "The Quick Brown Fox Jumps Over The Lazy Dog.",
    "close-up portrait, 50mm, f/1.8, bokeh",
    "woman, red hair, green eyes, freckles",
    "man with a beard, black and white photo",
    "child playing in the park, sunny day",
    "elderly person, wrinkles, warm smile",
    "a person in the style of Studio Ghibli",
]


def save(out, meta, name, t):
    t = t.detach().to(torch.float32).contiguous()
    t.numpy().astype("<f4").tofile(os.path.join(out, name + ".f32"))
    meta[name] = list(t.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = a.out
    os.makedirs(out, exist_ok=True)

    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    meta = {}
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.model, "tokenizer"))
    ids = tok(TOKENIZER_PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True)["input_ids"]
    meta["tokenizer"] = [{"text": t, "ids": i} for t, i in zip(TOKENIZER_PROMPTS, ids)]

    te = CLIPTextModel.from_pretrained(os.path.join(a.model, "text_encoder")).eval()
    text_ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    meta["text_ids"] = text_ids.tolist()
    with torch.no_grad():
        o = te(text_ids, output_hidden_states=True)
    save(out, meta, "text_last", o.last_hidden_state)
    save(out, meta, "text_penultimate", o.hidden_states[-2])
    save(out, meta, "text_pooled", o.pooler_output)
    # A shorter sequence (no padding): positions narrow, the pooled token is the last.
    short = tok(PROMPTS[2:3], return_tensors="pt").input_ids
    meta["text_short_ids"] = short.tolist()
    with torch.no_grad():
        save(out, meta, "text_short_last", te(short).last_hidden_state)

    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True, negative_prompt="")
    save(out, meta, "pipe_cond", cond)
    save(out, meta, "pipe_uncond", uncond)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=g)
    save(out, meta, "pipe_latents", latents)
    meta["pipe_size"] = size * vae_scale
    base = dict(pipe.scheduler.config)
    runs = {
        "ddim_eps": (DDIMScheduler, {}),
        "ddim_v": (DDIMScheduler, {"prediction_type": "v_prediction"}),
        "euler_eps": (EulerDiscreteScheduler, {}),
        "euler_v": (EulerDiscreteScheduler, {"prediction_type": "v_prediction"}),
        "euler_linspace": (EulerDiscreteScheduler, {"timestep_spacing": "linspace"}),
    }
    meta["runs"] = {}
    for name, (cls, over) in runs.items():
        pipe.scheduler = cls.from_config({**base, **over})
        with torch.no_grad():
            lat = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(),
                       num_inference_steps=10, guidance_scale=7.5, output_type="latent",
                       height=size * vae_scale, width=size * vae_scale).images
            img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
            img = pipe.image_processor.postprocess(img, output_type="pt")
        save(out, meta, name + "_latents", lat)
        save(out, meta, name + "_image", img)
        meta["runs"][name] = {"scheduler": dict(pipe.scheduler.config),
                              "timesteps": [float(t) for t in pipe.scheduler.timesteps],
                              "init_noise_sigma": float(pipe.scheduler.init_noise_sigma)}

    ddpm = DDPMScheduler.from_config(base)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    save(out, meta, "ddpm_x0", x0)
    save(out, meta, "ddpm_noise", noise)
    meta["ddpm_t"] = t.tolist()
    save(out, meta, "ddpm_noisy", ddpm.add_noise(x0, noise, t))
    save(out, meta, "ddpm_velocity", ddpm.get_velocity(x0, noise, t))
    save(out, meta, "ddpm_alphas_cumprod", ddpm.alphas_cumprod)

    with open(os.path.join(out, "oracle.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
