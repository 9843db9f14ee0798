"""Oracle for core/diffusion-torch's flow-matching sampler (tests/flow_sampling.rs).

diffusers 0.42.1's FlowMatchEulerDiscreteScheduler set as FluxPipeline sets it
(`sigmas = np.linspace(1.0, 1 / N, N)`, `mu = calculate_shift(image_seq_len, ...)` from the
scheduler config) for several configs, plus FluxPipeline's denoising loop on a deterministic toy
velocity model (so the Rust side can feed the same model outputs):

- "schedules": per case the config, steps, image_seq_len, mu, diffusers' float32 sigmas and
  timesteps, and the same formulas evaluated in float64 by the scheduler's own methods
  (`time_shift`, `stretch_shift_to_terminal`) so the Rust f64 maths is checked tightly.
- "loops": latents, contexts, every step's latents for true CFG (+ embedded guidance) and for
  embedded guidance alone.

Usage: python flow_sampling_oracle.py --out DIR  (writes DIR/oracle.json)
"""
import argparse
import json
import os

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

FLUX_DEV = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
FLUX_SCHNELL = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
QWEN = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
            num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
            use_dynamic_shifting=True, invert_sigmas=False, stochastic_sampling=False,
            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
STATIC3 = dict(num_train_timesteps=1000, shift=3.0)


def scheduler(cfg):
    s = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    c = dict(s.config)
    c["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    return s, {k: v for k, v in c.items() if not k.startswith("_") or k == "_class_name"}


def mu_of(s, seq):
    c = s.config
    return calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def schedule_case(name, cfg, steps, seq):
    s, full = scheduler(cfg)
    sig_in = np.linspace(1.0, 1 / steps, steps)
    mu = mu_of(s, seq)
    s.set_timesteps(sigmas=sig_in, mu=mu)
    # The same formulas in float64, through the scheduler's own methods.
    x = sig_in.astype(np.float64)
    if s.config.use_dynamic_shifting:
        x = s.time_shift(mu, 1.0, x)
    else:
        x = s.shift * x / (1 + (s.shift - 1) * x)
    if s.config.shift_terminal:
        x = s.stretch_shift_to_terminal(x)
    return dict(name=name, config=full, steps=steps, image_seq_len=seq, mu=mu,
                sigmas=s.sigmas.double().tolist(), timesteps=s.timesteps.double().tolist(),
                sigmas_f64=list(x) + [0.0], timesteps_f64=list(x * s.config.num_train_timesteps))


def toy(x, tau, g, ctx, w):
    """A velocity depending on every input: x, the timestep (as FluxPipeline passes it, /1000),
    the embedded guidance and the context (of any length)."""
    v = -0.5 * x * tau[:, None, None] + w * (1 - tau[:, None, None]) + 0.3 * ctx.mean(dim=(1, 2))[:, None, None]
    if g is not None:
        v = v + 0.05 * g[:, None, None]
    return v


def loop_case(name, steps, true_cfg, embedded):
    s, full = scheduler(FLUX_DEV)
    gen = torch.Generator().manual_seed(7)
    b, seq, ch = 2, 16, 8
    latents = torch.randn(b, seq, ch, generator=gen)
    w = torch.randn(1, seq, ch, generator=gen)
    pos = torch.randn(b, 7, 4, generator=gen)
    neg = torch.randn(b, 3, 4, generator=gen)
    mu = mu_of(s, seq)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    guidance = torch.full([1], embedded, dtype=torch.float32).expand(b) if embedded is not None else None
    x = latents.clone()
    xs = []
    for t in s.timesteps:
        timestep = t.expand(b).to(x.dtype)
        pred = toy(x, timestep / 1000, guidance, pos, w)
        if true_cfg is not None:
            npred = toy(x, timestep / 1000, guidance, neg, w)
            pred = npred + true_cfg * (pred - npred)
        x = s.step(pred, t, x, return_dict=False)[0]
        xs.append(x.flatten().tolist())
    return dict(name=name, config=full, steps=steps, image_seq_len=seq, true_cfg=true_cfg, embedded=embedded,
                shape=[b, seq, ch], latents=latents.flatten().tolist(), w=w.flatten().tolist(),
                pos=pos.flatten().tolist(), pos_shape=list(pos.shape), neg=neg.flatten().tolist(),
                neg_shape=list(neg.shape), steps_x=xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cases = []
    for steps in [1, 4, 28, 50]:
        for seq in [256, 1024, 4096]:
            cases.append(schedule_case(f"flux_dev_{steps}_{seq}", FLUX_DEV, steps, seq))
        cases.append(schedule_case(f"flux_schnell_{steps}", FLUX_SCHNELL, steps, 1024))
        cases.append(schedule_case(f"static3_{steps}", STATIC3, steps, 1024))
        if steps > 1:  # one step ends at σ = 1, which stretch_shift_to_terminal divides by 0 (NaN)
            cases.append(schedule_case(f"qwen_{steps}", QWEN, steps, 6889))
    loops = [loop_case("true_cfg_embedded", 6, 4.0, 3.5), loop_case("embedded", 6, None, 3.5)]
    with open(os.path.join(a.out, "oracle.json"), "w") as f:
        json.dump(dict(schedules=cases, loops=loops), f)


if __name__ == "__main__":
    main()
