"""Oracle for plugins/flux-lora: diffusers' FluxPipeline on the tiny model of make_tiny_flux.py —
its prompt encoding (T5 and CLIP token ids, T5 states, CLIP's pooled output), and a whole
sampling run from fixed initial latents (FLUX.1-dev's scheduler: Euler over
linspace(1, 1/N, N) sigmas, dynamic exponential shift at μ(image_seq_len), embedded guidance
3.5), as packed latents and as the decoded image.

usage: flux_pipeline_oracle.py --model DIR --out DIR   (writes DIR/*.f32, DIR/oracle.json)
"""

import argparse
import json
import os

import torch
from diffusers import FluxPipeline

PROMPTS = ["a photo of sks person, smiling", "a dog on a beach at sunset"]
MAX_SEQ = 16  # plugins/flux-lora/tests/common/mod.rs MAX_SEQ
HEIGHT, WIDTH = 16, 12
STEPS = 4
GUIDANCE = 3.5


def dump(out, meta, name, t):
    t = t.detach().to(torch.float32).contiguous()
    t.numpy().tofile(os.path.join(out, f"{name}.f32"))
    meta[name] = list(t.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    pipe = FluxPipeline.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    meta = {"prompts": PROMPTS, "max_sequence_length": MAX_SEQ, "height": HEIGHT, "width": WIDTH,
            "steps": STEPS, "guidance": GUIDANCE}
    t5_ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=MAX_SEQ, truncation=True,
                              return_tensors="pt").input_ids
    clip_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    dump(out, meta, "t5_ids", t5_ids)
    dump(out, meta, "clip_ids", clip_ids)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=MAX_SEQ)
    dump(out, meta, "prompt_embeds", embeds)
    dump(out, meta, "pooled", pooled)
    c = pipe.transformer.config.in_channels // 4
    h, w = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, c, h, w, generator=g)
    dump(out, meta, "init_latents", latents)
    packed = FluxPipeline._pack_latents(latents, 1, c, h, w)
    with torch.no_grad():
        run = dict(prompt=PROMPTS[0], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, max_sequence_length=MAX_SEQ)
        z = pipe(**run, latents=packed.clone(), output_type="latent").images
        dump(out, meta, "final_latents", FluxPipeline._unpack_latents(z, HEIGHT, WIDTH, pipe.vae_scale_factor))
        img = pipe(**run, latents=packed.clone(), output_type="pt").images
        dump(out, meta, "image", img)
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
