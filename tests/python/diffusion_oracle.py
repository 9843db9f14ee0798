"""Reference values for core/diffusion: diffusers 0.42.1's schedulers and the timestep-sampling
formulas of musubi-tuner/sd-scripts, printed as one JSON object on stdout.

Run by core/diffusion/tests/diffusers_oracle.rs through $LIKENESS_PYTHON."""
import json
import math

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

out = {"ddpm": {}, "ddim": [], "ddim_step": [], "euler": [], "flow": [], "transforms": {}}

for name, kw in [
    ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("linear", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    ("squaredcos_cap_v2", dict(beta_schedule="squaredcos_cap_v2")),
]:
    s = DDPMScheduler(num_train_timesteps=1000, **kw)
    out["ddpm"][name] = {"betas": s.betas.double().tolist(), "alphas_cumprod": s.alphas_cumprod.double().tolist()}

sd15 = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
for spacing in ["leading", "trailing", "linspace"]:
    for steps in [1, 3, 7, 20, 50, 999, 1000]:
        for offset in [0, 1]:
            s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, **sd15)
            s.set_timesteps(steps)
            out["ddim"].append(dict(spacing=spacing, steps=steps, offset=offset, timesteps=s.timesteps.tolist()))
            e = EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset, **sd15)
            e.set_timesteps(steps)
            out["euler"].append(dict(spacing=spacing, steps=steps, offset=offset,
                                     timesteps=e.timesteps.double().tolist(), sigmas=e.sigmas.double().tolist()))

g = torch.Generator().manual_seed(0)
for pred in ["epsilon", "v_prediction", "sample"]:
    for one in [True, False]:
        s = DDIMScheduler(prediction_type=pred, set_alpha_to_one=one, clip_sample=False, **sd15)
        s.set_timesteps(50)
        for t in [981, 501, 1]:
            m = torch.randn(64, generator=g)
            x = torch.randn(64, generator=g)
            prev = s.step(m, t, x, eta=0.0).prev_sample
            out["ddim_step"].append(dict(pred=pred, one=one, t=t, m=m.tolist(), x=x.tolist(), prev=prev.tolist()))

for shift in [1.0, 3.0]:
    for steps in [1, 4, 28, 50]:
        f = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        f.set_timesteps(steps)
        out["flow"].append(dict(dynamic=False, shift=shift, mu=None, steps=steps,
                                timesteps=f.timesteps.double().tolist(), sigmas=f.sigmas.double().tolist()))
for mu in [0.5, 1.15, 2.2]:
    f = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                        time_shift_type="exponential")
    f.set_timesteps(28, mu=mu)
    out["flow"].append(dict(dynamic=True, shift=1.0, mu=mu, steps=28,
                            timesteps=f.timesteps.double().tolist(), sigmas=f.sigmas.double().tolist()))

# Timestep transforms on shared draws, written as musubi-tuner writes them (float64 torch here so
# the comparison measures the formula, not float32 rounding).
rng = np.random.default_rng(1234)
u = torch.tensor(rng.uniform(1e-6, 1 - 1e-6, 512), dtype=torch.float64)
n = torch.tensor(rng.standard_normal(512), dtype=torch.float64)
out["draws"] = {"u": u.tolist(), "n": n.tolist()}


def lin(x1, y1, x2, y2):
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + (y1 - m * x1)


def time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


T = out["transforms"]
T["uniform"] = u.tolist()
T["sigmoid_1.5"] = torch.sigmoid(1.5 * n).tolist()
T["logit_normal_0.2_1.3"] = torch.sigmoid(n * 1.3 + 0.2).tolist()
T["mode_1.29"] = (1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)).tolist()
t = torch.sigmoid(1.0 * n)
T["shift_3.0"] = ((t * 3.0) / (1 + (3.0 - 1) * t)).tolist()
mu = lin(256, 0.5, 4096, 1.15)((128 // 2) * (96 // 2))
T["flux_shift_128x96"] = time_shift(mu, 1.0, t).tolist()
mu = lin(256, 0.5, 8192, 0.9)(6889)
T["qwen_shift_6889"] = time_shift(mu, 1.0, t).tolist()

# Loss weightings: diffusers.training_utils (compute_snr, compute_loss_weighting_for_sd3) and
# sd-scripts' apply_snr_weight / apply_debiased_estimation formulas, in float64.
from diffusers.training_utils import compute_loss_weighting_for_sd3, compute_snr

ddpm = DDPMScheduler(**sd15)
ddpm.alphas_cumprod = ddpm.alphas_cumprod.double()
ts = torch.arange(0, 1000, 37)
snr = compute_snr(ddpm, ts).double()
W = {"timesteps": ts.tolist(), "snr": snr.tolist()}
for g in [1.0, 5.0]:
    m = torch.minimum(snr, torch.full_like(snr, g))
    W[f"min_snr_eps_{g}"] = (m / snr).tolist()
    W[f"min_snr_v_{g}"] = (m / (snr + 1)).tolist()
c = torch.minimum(snr, torch.ones_like(snr) * 1000)
W["debiased_eps"] = (1 / torch.sqrt(c)).tolist()
W["debiased_v"] = (1 / (c + 1)).tolist()
sig = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
W["sigmas"] = sig.tolist()
for scheme in ["sigma_sqrt", "cosmap", "none"]:
    W[scheme] = compute_loss_weighting_for_sd3(scheme, sig).double().tolist()
out["weighting"] = W

print(json.dumps(out))
