"""Oracle for plugins/sd15-lora: diffusers 0.42.1 + peft on the same tiny SD1.5 pipeline folder,
with the LoRA the plugin exported loaded by diffusers' own `pipe.load_lora_weights`.

usage: sd15_lora_oracle.py --request REQUEST.json --out DIR

REQUEST.json (written by tests/oracle.rs):
  model       the diffusers folder (tests/python/make_tiny_sd15.py --preset tiny)
  loras       {"kohya": FILE, "diffusers": DIR}: the plugin's exports of one trained adapter
  prompts, negative_prompts, steps, guidance, samplers ["ddim", "euler"]
  latents     a raw little-endian f32 file of the initial noise [B, 4, h, w] (shape in latents_shape)
  train       [{"latents": FILE, "shape": [...], "noise": FILE, "timesteps": [...], "captions": [...],
                "min_snr_gamma": G, "prediction_type": "epsilon" | "v_prediction"}]: training forwards

Writes DIR/oracle.json (shapes, losses) and raw f32 files:
  sample_<format>_<sampler>.f32   StableDiffusionPipeline(..., latents=noise, output_type="pt")
  pixels_<format>_<k>.f32         x̂0 of training forward k decoded by the VAE, (x+1)/2
and the diffusion loss of each training forward: MSE(unet(add_noise(z0, ε, t), t, text), target)
per sample (target ε, or get_velocity(z0, ε, t) for v-prediction), weighted by sd-scripts'
min-SNR-γ, averaged over the batch.
"""

import argparse
import json
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline


def read_f32(path, shape):
    return torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(shape).copy())


def write_f32(path, t):
    t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tofile(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--request", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    req = json.load(open(a.request))
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(req["model"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = read_f32(req["latents"], req["latents_shape"])
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    out = {"losses": {}, "shapes": {}}
    for fmt, path in req["loras"].items():
        if os.path.isdir(path):
            pipe.load_lora_weights(path)
        else:
            pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
        # Every tensor of the file must have been consumed: diffusers warns on unexpected keys
        # and PEFT on missing ones; check the adapter is really on (non-zero lora_B somewhere).
        n_lora = sum(1 for n, _ in pipe.unet.named_parameters() if "lora_B" in n)
        n_te = sum(1 for n, _ in pipe.text_encoder.named_parameters() if "lora_B" in n)
        out[f"modules_{fmt}"] = [n_lora, n_te]
        for sampler in req["samplers"]:
            cls = DDIMScheduler if sampler == "ddim" else EulerDiscreteScheduler
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
            with torch.no_grad():
                img = pipe(
                    prompt=req["prompts"],
                    negative_prompt=req["negative_prompts"],
                    num_inference_steps=req["steps"],
                    guidance_scale=req["guidance"],
                    latents=noise.clone(),
                    height=req["height"],
                    width=req["width"],
                    output_type="pt",
                ).images
            write_f32(os.path.join(a.out, f"sample_{fmt}_{sampler}.f32"), img)
            out["shapes"][f"sample_{fmt}_{sampler}"] = list(img.shape)
        out["losses"][fmt] = []
        for k, tr in enumerate(req["train"]):
            with torch.no_grad():
                z0 = read_f32(tr["latents"], tr["shape"])
                eps = read_f32(tr["noise"], tr["shape"])
                t = torch.tensor(tr["timesteps"], dtype=torch.long)
                ids = pipe.tokenizer(
                    tr["captions"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                    truncation=True, return_tensors="pt",
                ).input_ids
                text = pipe.text_encoder(ids)[0]
                x_t = ddpm.add_noise(z0, eps, t)
                pred = pipe.unet(x_t, t, encoder_hidden_states=text).sample
                v = tr["prediction_type"] == "v_prediction"
                target = ddpm.get_velocity(z0, eps, t) if v else eps
                mse = ((pred.float() - target.float()) ** 2).mean(dim=[1, 2, 3])
                ac = ddpm.alphas_cumprod[t]
                snr = ac / (1 - ac)
                g = tr.get("min_snr_gamma")
                # sd-scripts' apply_snr_weight: min(SNR, γ)/SNR, or /(SNR + 1) for v-prediction.
                w = torch.minimum(snr, torch.full_like(snr, g)) / (snr + 1 if v else snr) if g else torch.ones_like(snr)
                out["losses"][fmt].append(float((mse * w).mean()))
                sa = ac.sqrt().view(-1, 1, 1, 1)
                sb = (1 - ac).sqrt().view(-1, 1, 1, 1)
                x0 = sa * x_t - sb * pred if v else (x_t - sb * pred) / sa
                px = (pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample + 1) / 2
                write_f32(os.path.join(a.out, f"pixels_{fmt}_{k}.f32"), px)
        pipe.unload_lora_weights()
    json.dump(out, open(os.path.join(a.out, "oracle.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
