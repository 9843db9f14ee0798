#!/usr/bin/env python3
"""Reference numbers of `host eval-faces` with the `testing-color-metric` fixture, by numpy.

    eval_faces_oracle.py --pairs pairs.json --out expected.json

`pairs.json` is {"pairs": [{"control": PATH, "generated": PATH, "step": KEY}, ...]} — the
pairs the test expects the host to find. Each image is read with Pillow, converted to RGB and
scaled to [0, 1] (the test writes images already at the evaluation size, so no resizing is
involved). The fixture's embedding, re-implemented here independently of the Rust code:

    f = [mean R, mean G, mean B, mean R^2, mean G^2, mean B^2] - 0.25
    invalid ("no face") when every pixel is 0 or |f| <= 1e-12, else u = f / |f|

The pair's similarity is cos(u_control, u_generated) (float64); a pair is valid when both
images are. Statistics follow seed 004's `evaluate_face_consistency.py`: np.mean, np.std
(population, ddof=0), np.min, np.max over all valid pairs and per step. Writes
{"similarities": [float|null per pair], "report": {total_pairs, valid_pairs, overall_mean,
overall_std, overall_min, overall_max, by_step}} (overall_* null when no pair is valid).
"""

import argparse
import json

import numpy as np
from PIL import Image


def embed(path):
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0  # H, W, 3
    if np.all(x == 0.0):
        return None
    f = np.concatenate([x.mean(axis=(0, 1)), (x * x).mean(axis=(0, 1))]) - 0.25
    n = np.linalg.norm(f)
    if not n > 1e-12:
        return None
    return f / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    pairs = json.load(open(a.pairs))["pairs"]
    sims = []
    by_step = {}
    for p in pairs:
        c, g = embed(p["control"]), embed(p["generated"])
        if c is None or g is None:
            sims.append(None)
            continue
        s = float(np.dot(c, g) / (np.linalg.norm(c) * np.linalg.norm(g)))
        sims.append(s)
        by_step.setdefault(str(p["step"]), []).append(s)
    valid = [s for s in sims if s is not None]
    report = {
        "total_pairs": len(pairs),
        "valid_pairs": len(valid),
        "overall_mean": float(np.mean(valid)) if valid else None,
        "overall_std": float(np.std(valid)) if valid else None,
        "overall_min": float(np.min(valid)) if valid else None,
        "overall_max": float(np.max(valid)) if valid else None,
        "by_step": {
            k: {"count": len(v), "mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for k, v in by_step.items()
        },
    }
    json.dump({"similarities": sims, "report": report}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
