"""The Python side of scripts/bench_sd15.sh: diffusers 0.42.1 + peft 0.21.2 on the same model
folder (make_tiny_sd15.py --preset half) doing the work `host train` / `host generate` do.

usage:
  bench_sd15.py train  --model DIR --steps N --warmup W --precision fp32|bf16 --threads T --json OUT [--checkpointing]
  bench_sd15.py sample --model DIR --images N --steps S --size PX --cfg G --threads T --json OUT

train: SD1.5's training step as sd-scripts / DRIP run it, with fixed latents and text embeddings
  (batch 2, 32×32 latents from 256×256 images through the half preset's factor-8 VAE): DDPM noise
  and a uniform integer timestep per sample, scheduler.add_noise, UNet(ε) with LoRA rank 16
  (alpha 16) on to_q/to_k/to_v/to_out.0 (peft), MSE to the noise, backward, clip_grad_norm_(1.0),
  AdamW(lr 1e-4, weight decay 0.01), zero_grad. bf16 = torch.autocast("cpu", bfloat16) with fp32
  weights (the issue's measurement); fp32 = no autocast. --checkpointing: diffusers'
  unet.enable_gradient_checkpointing() (torch.utils.checkpoint per resnet/transformer).
  Reports the median step time over the
  timed steps (after `warmup` untimed ones) and the process's peak RSS.
sample: StableDiffusionPipeline with a DDIMScheduler (the folder's betas), `steps` steps,
  classifier-free guidance `cfg`, size×size, one image per call after one warm-up call.
"""

import argparse
import json
import resource
import statistics
import time


def peak_rss_bytes():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(a):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    g = torch.Generator().manual_seed(1)
    side = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return {"side": "diffusers+peft", "what": "train", "precision": a.precision, "threads": a.threads,
            "gradient_checkpointing": a.checkpointing,
            "step_seconds": times, "median_step_s": statistics.median(times),
            "trainable": sum(p.numel() for p in params), "peak_rss_bytes": peak_rss_bytes()}


def sample(a):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(a.images + 1):
        g = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a person", num_inference_steps=a.steps, guidance_scale=a.cfg, height=a.size,
                 width=a.size, generator=g, output_type="np")
        if i > 0:
            times.append(time.perf_counter() - t0)
    return {"side": "diffusers", "what": "sample", "steps": a.steps, "size": a.size, "cfg": a.cfg,
            "image_seconds": times, "median_image_s": statistics.median(times), "peak_rss_bytes": peak_rss_bytes()}


def run(commands, cfg_default, checkpointing_help):
    """The command line both benches share (bench_flux.py calls it too): `commands` maps each
    subcommand to its function of the parsed arguments; the result is written as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=sorted(commands))
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cfg", type=float, default=cfg_default)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help=checkpointing_help)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    r = commands[a.what](a)
    json.dump(r, open(a.json, "w"), indent=1)
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}))


def main():
    run({"train": train, "sample": sample}, 7.5, "unet.enable_gradient_checkpointing()")


if __name__ == "__main__":
    main()
