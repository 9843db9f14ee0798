"""The Python side of scripts/bench_diffusion.sh qwen: diffusers 0.42.1 + peft on the same model
folder (make_tiny_qwen_edit.py --preset bench) doing the work `host train` / `host generate` do
with qwen-edit-lora.

usage:
  bench_qwen.py train  --model DIR --target IMG --control IMG --steps N --warmup W --precision fp32|bf16
                       --threads T --json OUT [--checkpointing]
  bench_qwen.py sample --model DIR --control IMG --images N --steps S --size PX --cfg G --threads T --json OUT
  bench_qwen.py flops  --model DIR --target IMG --control IMG --threads T --json OUT

train: musubi-tuner's edit-plus step (qwen_image_train_network.py), batch 1, with the encoder
  work qwen-edit-lora does every step: qwen-edit-lora caches the target's latents but not the
  conditioning (Qwen2.5-VL reads the caption and the control images together), so each step here
  (a) embeds the caption with the control image (resized to the pipeline's ~384² VL size) through
  QwenImageEditPlusPipeline.encode_prompt and (b) VAE-encodes the control (posterior mode,
  normalised) at its own size, both without gradient, exactly as ours; then t = k/1000 with k
  uniform on 1..1000 (musubi-tuner's default `sigma` sampling), x_t = (1 − t)·x0 + t·ε, the target
  packed 2×2 with the packed control after it, img_shapes [(1, h/2, w/2), (1, hc/2, wc/2)], the
  DiT at timestep (t·1000 + 1)/1000, the prediction sliced to the target's tokens, MSE (mean) to
  ε − x0, backward, clip_grad_norm_(1.0), AdamW(lr 1e-4, weight decay 0.01), zero_grad. The target
  latents are encoded once before the clock. LoRA rank 16 (alpha 16) on musubi-tuner's
  networks.lora_qwen_image set (every Linear of the blocks, img_mod.1/txt_mod.1 included).
  bf16 = torch.autocast("cpu", bfloat16) over fp32 weights (the encoders too).
  --checkpointing: transformer.enable_gradient_checkpointing() (torch.utils.checkpoint per block).
  Reports the median step time and, separately, the median of its encoder part (a + b), and the
  process's peak RSS.
sample: QwenImageEditPlusPipeline with one control image, `steps` steps, true CFG `cfg` with the
  negative prompt "" (as `host generate`'s default), size×size, one image per call after one
  warm-up call. The pipeline VAE-encodes controls at ~1024² area (VAE_IMAGE_SIZE); `host generate`
  encodes a --control at its own size, so the module constant is set to the control's area here
  to make both do the same work.
flops: torch.utils.flop_counter's count of one fp32 training step of the DiT (forward + backward)
  and of one step's encoder work, one sampling forward, and this machine's sgemm throughput.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sd15 import peak_rss_bytes  # noqa: E402  (the shared RSS reader)

PROMPT = "a photo of a person 1"
# musubi-tuner's networks.lora_qwen_image: every Linear of the transformer blocks (peft matches
# these as suffixes, so img_in / txt_in / proj_out / the time embedding stay untouched).
MUSUBI = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
          "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
          "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


def load_pipe(a, lora):
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from peft import LoraConfig

    torch.set_num_threads(a.threads)
    pipe = QwenImageEditPlusPipeline.from_pretrained(a.model, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    if lora:
        pipe.transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                                target_modules=MUSUBI))
    return pipe


def image(path, side):
    """The image as the engine's musubi loader makes a 256² bucket: cover, centre-crop."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = side / min(w, h)
    im = im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BICUBIC)
    w, h = im.size
    return im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))


def encoders(pipe, control, vae_in):
    """One step's conditioning, as qwen-edit-lora's `condition`: the VL embedding of the caption
    with the control at the pipeline's ~384² VL size, and the control's normalised latents."""
    import torch
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    w, h = control.size
    cw, ch = calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPT, image=[pipe.image_processor.resize(control, ch, cw)], device="cpu")
        ctrl = pipe._encode_vae_image(vae_in, generator=None)
    return embeds, mask, ctrl


def step_inputs(pipe, x0, ctrl, g):
    """The edit-plus step's noisy sequence, timestep, shapes and target (musubi-tuner's math)."""
    import torch

    _, c, _, h, w = x0.shape
    _, _, _, hc, wc = ctrl.shape
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(1, 1001, (1,), generator=g).float() / 1000
    x_t = (1 - t) * x0 + t * noise
    pack = pipe._pack_latents
    hidden = torch.cat([pack(x_t, 1, c, h, w), pack(ctrl, 1, c, hc, wc)], dim=1)
    shapes = [[(1, h // 2, w // 2), (1, hc // 2, wc // 2)]]
    return hidden, (t * 1000 + 1) / 1000, shapes, pack(noise - x0, 1, c, h, w), (h // 2) * (w // 2)


def setup_train(a):
    import torch

    pipe = load_pipe(a, lora=True)
    tr = pipe.transformer
    params = [p for p in tr.parameters() if p.requires_grad]
    if a.checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    control = image(a.control, a.size)
    vae_in = pipe.image_processor.preprocess(control, a.size, a.size).unsqueeze(2)
    with torch.no_grad():  # the cached target latents
        x0 = pipe._encode_vae_image(pipe.image_processor.preprocess(image(a.target, a.size), a.size, a.size)
                                    .unsqueeze(2), generator=None)
    return pipe, params, control, vae_in, x0


def train(a):
    import torch

    torch.manual_seed(0)
    pipe, params, control, vae_in, x0 = setup_train(a)
    tr = pipe.transformer
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    times, enc_times = [], []
    bf16 = a.precision == "bf16"
    if a.cached_encoders:  # musubi-tuner's way: encoded once before training, off the clock
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cached = encoders(pipe, control, vae_in)
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        if a.cached_encoders:
            embeds, mask, ctrl = cached
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                embeds, mask, ctrl = encoders(pipe, control, vae_in)
        t1 = time.perf_counter()
        hidden, timestep, shapes, target, n = step_inputs(pipe, x0, ctrl.float(), g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = tr(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds,
                   encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0][:, :n]
        loss = torch.nn.functional.mse_loss(v.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            enc_times.append(t1 - t0)
    return {"side": "diffusers+peft", "what": "train", "precision": a.precision, "threads": a.threads,
            "gradient_checkpointing": a.checkpointing, "tokens": {"image": hidden.shape[1], "text": embeds.shape[1]},
            "step_seconds": times, "median_step_s": statistics.median(times),
            "encoder_seconds": enc_times, "median_encoder_s": statistics.median(enc_times),
            "trainable": sum(p.numel() for p in params), "peak_rss_bytes": peak_rss_bytes()}


def flops(a):
    """torch's FLOP count of one fp32 training step of the DiT (forward + backward) and of the
    step's encoder work (VL + control VAE), one sampling forward of the DiT, and this machine's
    sgemm throughput at a.threads threads (a 2048³ fp32 matmul, median of 5)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pipe, params, control, vae_in, x0 = setup_train(a)
    tr = pipe.transformer
    with FlopCounterMode(display=False) as fe:
        embeds, mask, ctrl = encoders(pipe, control, vae_in)
    hidden, timestep, shapes, target, n = step_inputs(pipe, x0, ctrl, torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as fc:
        v = tr(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
               img_shapes=shapes, return_dict=False)[0][:, :n]
        torch.nn.functional.mse_loss(v, target).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as fs:
        tr(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
           img_shapes=shapes, return_dict=False)
    m = torch.randn(2048, 2048)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        m @ m
        times.append(time.perf_counter() - t0)
    return {"side": "torch", "what": "flops", "train_step_flops": fc.get_total_flops(),
            "encoder_flops": fe.get_total_flops(), "sample_forward_flops": fs.get_total_flops(),
            "sgemm_flops_per_s": 2 * 2048**3 / statistics.median(times[1:]), "threads": a.threads,
            "tokens": {"image": hidden.shape[1], "text": embeds.shape[1]}}


def sample(a):
    import torch
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qep

    pipe = load_pipe(a, lora=False)
    control = image(a.control, a.size)
    qep.VAE_IMAGE_SIZE = a.size * a.size  # the control at its own size, as `host generate` encodes it
    times = []
    for i in range(a.images + 1):
        g = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(image=[control], prompt="a photo of a person", negative_prompt="", true_cfg_scale=a.cfg,
                 num_inference_steps=a.steps, height=a.size, width=a.size, generator=g, output_type="np")
        if i > 0:
            times.append(time.perf_counter() - t0)
    return {"side": "diffusers", "what": "sample", "steps": a.steps, "size": a.size, "cfg": a.cfg,
            "image_seconds": times, "median_image_s": statistics.median(times), "peak_rss_bytes": peak_rss_bytes()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "sample", "flops"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--target", help="the training image (train, flops)")
    ap.add_argument("--control", required=True, help="the control image")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="transformer.enable_gradient_checkpointing()")
    ap.add_argument("--cached-encoders", action="store_true",
                    help="train: VL-encode the caption + control and VAE-encode the control once, before the clock")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    if a.what != "sample" and not a.target:
        ap.error(f"{a.what} needs --target")
    r = {"train": train, "sample": sample, "flops": flops}[a.what](a)
    with open(a.json, "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main()
