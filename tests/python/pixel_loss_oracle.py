#!/usr/bin/env python3
"""Reference value and gradient of the `pixel` loss plugin, by torch autograd.

    pixel_loss_oracle.py --seed N --shape B,C,H,W --weights l1,mse,ssim --out result.json

Generates a seeded (numpy) f32 prediction/target pair in [0, 1], computes in float64

    total = l1 * mean|p - t| + mse * mean((p - t)^2) + ssim * (1 - mean SSIM(p, t))

and writes {"prediction", "target", "shape", "weights", "value", "terms", "grad"} as JSON
(flat row-major lists; the f32 inputs are written as exact doubles).

SSIM is an independent implementation of Wang et al. (2004) with the conventions of
`pytorch_msssim.ssim(data_range=1, size_average=True, win_size=11, win_sigma=1.5)`: a
normalised 11x11 Gaussian window (sigma 1.5) applied per channel with F.conv2d (groups=C,
no padding, i.e. "valid"), C1 = 0.01^2, C2 = 0.03^2, mean over positions, channels and batch.
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

WIN_SIZE = 11
WIN_SIGMA = 1.5
C1 = (0.01 * 1.0) ** 2
C2 = (0.03 * 1.0) ** 2


def gaussian_kernel_2d(channels: int) -> torch.Tensor:
    coords = torch.arange(WIN_SIZE, dtype=torch.float64) - WIN_SIZE // 2
    g = torch.exp(-(coords**2) / (2 * WIN_SIGMA**2))
    g = g / g.sum()
    k2 = torch.outer(g, g)  # the separable window as one 2-D kernel
    return k2.expand(channels, 1, WIN_SIZE, WIN_SIZE).contiguous()


def ssim_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = gaussian_kernel_2d(c)

    def filt(z):
        return F.conv2d(z, k, padding=0, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x * mu_x
    var_y = filt(y * y) - mu_y * mu_y
    cov = filt(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + C1) / (mu_x**2 + mu_y**2 + C1)
    contrast_structure = (2 * cov + C2) / (var_x + var_y + C2)
    return (luminance * contrast_structure).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--shape", required=True, help="B,C,H,W")
    ap.add_argument("--weights", required=True, help="l1,mse,ssim")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()

    shape = [int(s) for s in args.shape.split(",")]
    assert len(shape) == 4, "--shape must be B,C,H,W"
    w_l1, w_mse, w_ssim = (float(s) for s in args.weights.split(","))

    rng = np.random.default_rng(args.seed)
    target = rng.random(shape, dtype=np.float32)
    # A prediction near the target (SSIM well away from 0), clipped to [0, 1].
    noise = rng.normal(0.0, 0.15, size=shape).astype(np.float32)
    prediction = np.clip(target + noise, 0.0, 1.0).astype(np.float32)

    p = torch.from_numpy(prediction).to(torch.float64).requires_grad_(True)
    t = torch.from_numpy(target).to(torch.float64)

    terms = {}
    total = torch.zeros((), dtype=torch.float64)
    if w_l1 > 0:
        l1 = (p - t).abs().mean()
        terms["l1"] = l1.item()
        total = total + w_l1 * l1
    if w_mse > 0:
        mse = ((p - t) ** 2).mean()
        terms["mse"] = mse.item()
        total = total + w_mse * mse
    if w_ssim > 0:
        s = ssim_mean(p, t)
        terms["ssim"] = s.item()
        total = total + w_ssim * (1.0 - s)
    total.backward()

    result = {
        "shape": shape,
        "weights": {"l1": w_l1, "mse": w_mse, "ssim": w_ssim},
        "prediction": [float(v) for v in prediction.reshape(-1)],
        "target": [float(v) for v in target.reshape(-1)],
        "value": total.item(),
        "terms": terms,
        "grad": p.grad.reshape(-1).tolist(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"value={result['value']!r} terms={terms}")


if __name__ == "__main__":
    main()
