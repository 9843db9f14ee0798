#!/usr/bin/env python3
"""Reference value and gradient of the `identity` loss plugin, by torch autograd.

    identity_loss_oracle.py --seed N --batch B --dim D --mode cosine|seed004|triplet
                            [--threshold 0.3] [--margin 0.2] --out result.json

Generates a seeded (numpy) f32 pair of un-normalised embeddings `embedding` [B, D] and
`reference_embedding` [B, D] (references are noisy copies with a per-row noise level, so the
cosine distances spread over roughly [0.005, 0.9]), and u8 flags `valid` / `reference_valid`
[B]. Some rows are invalid on purpose (B >= 6): row 2 has valid = 0, row 4 has
reference_valid = 0, row 5's embedding is all zeros (flags 1: a zero-norm row must count as
invalid). Then, in float64, over the valid rows only:

    cos = F.cosine_similarity(e, r),  d = 1 - cos
    cosine : loss = mean d
    seed004: loss = mean torch.where(d > threshold, d**2, d)        (seed 004's weighting)
    triplet: negative of valid row k = reference of valid row k+1 (cyclic);
             loss = mean relu(d_pos - d_neg + margin); 0 with < 2 valid rows

and writes {"shape", "mode", "embedding", "reference_embedding", "valid", "reference_valid",
"value", "terms": {"similarity", "valid_pairs", "invalid_pairs"}, "grad", "kink_distance"}
as JSON (flat row-major lists; f32 inputs as exact doubles). `kink_distance` is how close
any valid row is to a point where the loss is not differentiable (|d - threshold| for
seed004, |hinge| for triplet, null otherwise) and `above` how many valid rows take the
non-linear branch (d > threshold, or an active hinge), so the caller can tell the check is
meaningful.
"""

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--mode", choices=["cosine", "seed004", "triplet"], required=True)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    b, d = args.batch, args.dim

    rng = np.random.default_rng(args.seed)
    scale = rng.uniform(0.5, 3.0, size=(b, 1))
    emb = (rng.normal(0.0, 1.0, size=(b, d)) * scale).astype(np.float32)
    # Relative noise level per row: d ~ 1 - 1/sqrt(1 + level^2), from ~0.005 to ~0.88.
    levels = np.linspace(0.1, 8.0, b)[rng.permutation(b)].reshape(b, 1)
    ref = ((emb + levels * scale * rng.normal(0.0, 1.0, size=(b, d))) * rng.uniform(0.5, 2.0, size=(b, 1))).astype(np.float32)
    valid = np.ones(b, dtype=np.uint8)
    ref_valid = np.ones(b, dtype=np.uint8)
    if b >= 6:
        valid[2] = 0
        ref_valid[4] = 0
        emb[5] = 0.0

    e = torch.from_numpy(emb).to(torch.float64).requires_grad_(True)
    r = torch.from_numpy(ref).to(torch.float64)
    mask = (
        torch.from_numpy(valid).bool()
        & torch.from_numpy(ref_valid).bool()
        & (e.detach().norm(dim=1) > 0)
        & (r.norm(dim=1) > 0)
    )
    n = int(mask.sum())
    zero = torch.zeros((), dtype=torch.float64)

    cos = F.cosine_similarity(e, r, dim=1)
    dist = 1.0 - cos
    kink = math.inf
    above = 0  # seed004: valid rows with d > threshold; triplet: active hinges
    if args.mode == "cosine":
        per_row = dist
    elif args.mode == "seed004":
        per_row = torch.where(dist > args.threshold, dist**2, dist)
        if n:
            kink = float((dist.detach()[mask] - args.threshold).abs().min())
            above = int((dist.detach()[mask] > args.threshold).sum())
    else:
        idx = torch.nonzero(mask).flatten()
        per_row = torch.zeros(b, dtype=torch.float64)
        if n >= 2:
            neg = idx.roll(-1)
            d_pos = 1.0 - F.cosine_similarity(e[idx], r[idx], dim=1)
            d_neg = 1.0 - F.cosine_similarity(e[idx], r[neg], dim=1)
            hinge = d_pos - d_neg + args.margin
            per_row = per_row.index_put((idx,), F.relu(hinge))
            kink = float(hinge.detach().abs().min())
            above = int((hinge.detach() > 0).sum())
    loss = torch.where(mask, per_row, zero).sum() / n if n else torch.where(mask, per_row, zero).sum() * 0.0
    loss.backward()
    grad = e.grad if e.grad is not None else torch.zeros_like(e)
    assert torch.isfinite(grad).all() and math.isfinite(loss.item())

    similarity = float(torch.where(mask, cos.detach(), zero).sum() / n) if n else 0.0
    result = {
        "shape": [b, d],
        "mode": args.mode,
        "threshold": args.threshold,
        "margin": args.margin,
        "embedding": [float(v) for v in emb.reshape(-1)],
        "reference_embedding": [float(v) for v in ref.reshape(-1)],
        "valid": [int(v) for v in valid],
        "reference_valid": [int(v) for v in ref_valid],
        "value": loss.item(),
        "terms": {"similarity": similarity, "valid_pairs": float(n), "invalid_pairs": float(b - n)},
        "grad": grad.reshape(-1).tolist(),
        "kink_distance": kink if math.isfinite(kink) else None,
        "above": above,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"mode={args.mode} value={result['value']!r} terms={result['terms']} kink={kink} above={above}")


if __name__ == "__main__":
    main()
