"""The Python side of scripts/bench_flux.sh: diffusers 0.42.1 + peft on the same model folder
(make_tiny_flux.py --preset bench) doing the work `host train` / `host generate` do with flux-lora.

usage:
  bench_flux.py train  --model DIR --steps N --warmup W --precision fp32|bf16 --threads T --json OUT [--checkpointing]
  bench_flux.py sample --model DIR --images N --steps S --size PX --cfg G --threads T --json OUT
  bench_flux.py flops  --model DIR --threads T --json OUT

train: Flux LoRA's training step as musubi-tuner / diffusers' train_dreambooth_lora_flux.py run it,
  with fixed latents and text embeddings (batch 2, 32×32 latents from 256×256 images through the
  factor-8 VAE, T5 states of 128 tokens, CLIP pooled): σ ~ U(0, 1) per sample, x_t = (1 − σ)·x0 +
  σ·ε, packed 2×2, transformer(timestep σ, guidance 1.0) with LoRA rank 16 (alpha 16) on both
  streams' attention (peft), MSE to ε − x0, backward, clip_grad_norm_(1.0), AdamW(lr 1e-4,
  weight decay 0.01), zero_grad. bf16 = torch.autocast("cpu", bfloat16) over fp32 weights.
  --checkpointing: transformer.enable_gradient_checkpointing() (torch.utils.checkpoint per block).
  Reports the median step time over the timed steps and the process's peak RSS.
sample: FluxPipeline, `steps` Euler steps, embedded guidance `cfg`, size×size, 128 T5 tokens, one
  image per call after one warm-up call.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sd15 import peak_rss_bytes, run  # noqa: E402  (the shared command line and RSS reader)

MAX_SEQ = 128
ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def train(a):
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tr = FluxTransformer2DModel.from_pretrained(a.model, subfolder="transformer")
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=ATTN))
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    if a.checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    g = torch.Generator().manual_seed(1)
    c, side = tr.config.in_channels // 4, a.size // 8
    latents = torch.randn(2, c, side, side, generator=g)
    text = torch.randn(2, MAX_SEQ, tr.config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, tr.config.pooled_projection_dim, generator=g)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_SEQ, 3)
    guidance = torch.ones(2)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        sigma = torch.rand(2, generator=g)
        s = sigma.view(2, 1, 1, 1)
        noisy = FluxPipeline._pack_latents((1 - s) * latents + s * noise, 2, c, side, side)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            v = tr(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                   img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - latents, 2, c, side, side)
        loss = torch.nn.functional.mse_loss(v.float(), target)
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


def flops(a):
    """torch's own FLOP count (torch.utils.flop_counter) of one fp32 training step (forward and
    backward, the train() step's shapes), and this machine's sgemm throughput at a.threads threads
    (a 2048³ fp32 matmul, median of 5): the practical ceiling both sides' libtorch kernels share."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(a.threads)
    tr = FluxTransformer2DModel.from_pretrained(a.model, subfolder="transformer")
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=ATTN))
    c, side = tr.config.in_channels // 4, a.size // 8
    x = FluxPipeline._pack_latents(torch.randn(2, c, side, side), 2, c, side, side)
    text = torch.randn(2, MAX_SEQ, tr.config.joint_attention_dim)
    pooled = torch.randn(2, tr.config.pooled_projection_dim)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, side // 2, side // 2, "cpu", torch.float32)
    with FlopCounterMode(display=False) as fc:
        v = tr(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.rand(2),
               img_ids=img_ids, txt_ids=torch.zeros(MAX_SEQ, 3), guidance=torch.ones(2), return_dict=False)[0]
        v.square().mean().backward()
    # One sampling forward at batch 1 (what each of FluxPipeline's steps runs).
    with torch.no_grad(), FlopCounterMode(display=False) as fs:
        tr(hidden_states=x[:1], encoder_hidden_states=text[:1], pooled_projections=pooled[:1],
           timestep=torch.rand(1), img_ids=img_ids, txt_ids=torch.zeros(MAX_SEQ, 3), guidance=torch.ones(1),
           return_dict=False)
    m = torch.randn(2048, 2048)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        m @ m
        times.append(time.perf_counter() - t0)
    sgemm = 2 * 2048**3 / statistics.median(times[1:])
    return {"side": "torch", "what": "flops", "train_step_flops": fc.get_total_flops(),
            "sample_forward_flops": fs.get_total_flops(), "sgemm_flops_per_s": sgemm,
            "threads": a.threads}


def sample(a):
    import torch
    from diffusers import FluxPipeline

    torch.set_num_threads(a.threads)
    pipe = FluxPipeline.from_pretrained(a.model, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(a.images + 1):
        g = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a person", num_inference_steps=a.steps, guidance_scale=a.cfg, height=a.size,
                 width=a.size, generator=g, max_sequence_length=MAX_SEQ, output_type="np")
        if i > 0:
            times.append(time.perf_counter() - t0)
    return {"side": "diffusers", "what": "sample", "steps": a.steps, "size": a.size, "cfg": a.cfg,
            "image_seconds": times, "median_image_s": statistics.median(times), "peak_rss_bytes": peak_rss_bytes()}


def main():
    run({"train": train, "sample": sample, "flops": flops}, 3.5, "transformer.enable_gradient_checkpointing()")


if __name__ == "__main__":
    main()
