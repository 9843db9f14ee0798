#!/usr/bin/env python3
"""insightface 0.7.3 oracle for `plugins/arcface` (alignment and SCRFD decoding).

    arcface_oracle.py align --data DIR --out OUT
    arcface_oracle.py scrfd --data DIR --out OUT --outputs {6,9,10,15} [--batched] [--seed N]
                             [--input-w W --input-h H]

align: for real photos ($LIKENESS_DATA/photos/face_recognition/*.jpg and
  photos/insightface/t1.jpg) and fixed, hand-set 5-point landmarks (derived below from the face
  boxes of scripts/prepare_data.py), runs `insightface.utils.face_align.estimate_norm` and
  `norm_crop` and writes to OUT:
    <stem>.png             the image as cv2 decoded it (so both sides warp the same pixels);
    <stem>_<i>_crop.png    norm_crop(img, kps) with float32 key points (the detector's dtype);
    align.json             [{image, width, height, kps, m_f32, m_f64, crop}] — m_f32 /
                           m_f64: estimate_norm's 2x3 matrix for float32 / float64 key points.

scrfd: builds seeded, plausible output tensors of an SCRFD graph with the given number of
  outputs (6/9: 3 levels, 2 anchors; 10/15: 5 levels, 1 anchor; 9/15 with key points), plants a
  few faces (clusters of overlapping high-score anchors) among random candidates, makes every
  score distinct, and runs insightface's own `SCRFD.detect` on t1.jpg with a stand-in
  onnxruntime session (so `_init_vars`, `forward`, `nms` and the max_num choice are the
  package's code). Writes:
    out_<i>.f32            output i, little-endian float32, row-major;
    blob.f32               the [1,3,H,W] blob SCRFD fed to the session (its pre-processing);
    scrfd.json             {outputs, shapes, batched, input_w, input_h, image, width, height,
                            det_scale, runs: [{max_num, metric, det, kps}]}.
Needs insightface==0.7.3, opencv-python-headless, numpy (scripts/requirements.txt).
"""
import argparse
import json
import os
import sys

import cv2
import numpy as np
import insightface
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align

# Face boxes (x1, y1, x2, y2) of scripts/prepare_data.py's FACE_BOXES.
FACE_BOXES = {
    "face_recognition/obama.jpg": [(345, 95, 640, 410)],
    "face_recognition/obama2.jpg": [(200, 215, 520, 640)],
    "face_recognition/obama3.jpg": [(600, 250, 905, 630)],
    "face_recognition/biden.jpg": [(400, 115, 755, 510)],
    "insightface/t1.jpg": [
        (45, 262, 140, 382), (290, 140, 378, 264), (460, 248, 565, 400),
        (744, 312, 850, 462), (915, 32, 1030, 180), (1125, 262, 1228, 410),
    ],
}


def landmarks(box, i):
    """Plausible 5 points for a face box: the ArcFace template stretched over the box, turned by
    a few degrees and shifted a little (deterministic per face), so the fit is a real similarity."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    t = face_align.arcface_dst.astype(np.float64) / 112.0
    pts = np.stack([x1 + t[:, 0] * w, y1 + t[:, 1] * h], axis=1)
    ang = np.deg2rad([-7.0, 4.0, 11.0, -3.0, 6.0, -12.0][i % 6])
    c = pts.mean(axis=0)
    r = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    pts = (pts - c) @ r.T + c
    jitter = np.array([[0.8, -0.6], [-1.1, 0.4], [0.3, 1.3], [-0.7, -0.9], [1.2, 0.5]]) * (1 + i % 3)
    return pts + jitter


def cmd_align(args):
    os.makedirs(args.out, exist_ok=True)
    cases = []
    for rel, boxes in FACE_BOXES.items():
        path = os.path.join(args.data, "photos", rel)
        img = cv2.imread(path)
        if img is None:
            sys.exit(f"cannot read {path}")
        stem = os.path.splitext(os.path.basename(rel))[0]
        dec = f"{stem}.png"
        cv2.imwrite(os.path.join(args.out, dec), img)
        for i, box in enumerate(boxes):
            kps64 = landmarks(box, i)
            kps32 = kps64.astype(np.float32)
            m32 = face_align.estimate_norm(kps32, 112)
            m64 = face_align.estimate_norm(kps64, 112)
            crop = face_align.norm_crop(img, kps32, 112)
            name = f"{stem}_{i}_crop.png"
            cv2.imwrite(os.path.join(args.out, name), crop)
            cases.append({
                "image": dec, "width": int(img.shape[1]), "height": int(img.shape[0]),
                "kps": [[float(v) for v in p] for p in kps32],
                "kps_f64": [[float(v) for v in p] for p in kps64],
                "m_f32": [[float(v) for v in r] for r in m32],
                "m_f64": [[float(v) for v in r] for r in m64],
                "crop": name,
            })
    meta = {"insightface": insightface.__version__, "cv2": cv2.__version__, "cases": cases}
    with open(os.path.join(args.out, "align.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"align: {len(cases)} crops -> {args.out}")


class _Arg:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class FakeSession:
    """Stands in for onnxruntime.InferenceSession: fixed outputs, records the input blob."""

    def __init__(self, input_shape, outputs):
        self.input_shape, self.outputs, self.blob = input_shape, outputs, None

    def get_inputs(self):
        return [_Arg("input.1", self.input_shape)]

    def get_outputs(self):
        return [_Arg(f"out{i}", list(o.shape)) for i, o in enumerate(self.outputs)]

    def run(self, names, feed):
        self.blob = feed["input.1"]
        return [self.outputs[int(n[3:])] for n in names]


def make_distinct(arrays, thresh):
    """Nudge float32 scores >= thresh (and just below) upward until all are distinct."""
    flat = np.concatenate([a.ravel() for a in arrays])
    order = np.argsort(flat, kind="stable")
    prev = None
    for j in order:
        v = flat[j]
        if prev is not None and v <= prev:
            v = np.nextafter(prev, np.float32(2), dtype=np.float32)
        flat[j] = v
        prev = v
    out, k = [], 0
    for a in arrays:
        out.append(flat[k:k + a.size].reshape(a.shape).astype(np.float32))
        k += a.size
    return out


def cmd_scrfd(args):
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    n_out = args.outputs
    fmc = 3 if n_out in (6, 9) else 5
    strides = [8, 16, 32] if fmc == 3 else [8, 16, 32, 64, 128]
    na = 2 if fmc == 3 else 1
    use_kps = n_out in (9, 15)
    W, H = args.input_w, args.input_h
    img = cv2.imread(os.path.join(args.data, "photos", "insightface", "t1.jpg"))
    # Faces planted in det-image pixels (x1, y1, x2, y2) with their 5 points.
    faces = [(40, 60, 120, 160), (200, 90, 290, 200), (210, 100, 300, 215), (400, 50, 470, 140),
             (300, 250, 420, 390)]
    scores, bboxes, kpss = [], [], []
    for lvl, s in enumerate(strides):
        h, w = H // s, W // s
        n = h * w * na
        cy, cx = np.divmod(np.arange(h * w), w)
        cx = np.repeat(cx * s, na).astype(np.float32)
        cy = np.repeat(cy * s, na).astype(np.float32)
        sc = rng.uniform(0.0, 0.48, n)
        bb = rng.uniform(0.3, 6.0, (n, 4))
        kp = rng.uniform(-3.0, 3.0, (n, 10))
        # random isolated candidates
        cand = rng.choice(n, size=max(1, n // 60), replace=False)
        sc[cand] = rng.uniform(0.5, 0.95, cand.size)
        # planted faces: anchors whose centre lies inside the face at a level fitting its size
        for fi, (x1, y1, x2, y2) in enumerate(faces):
            size = max(x2 - x1, y2 - y1)
            if not (2.5 * s <= size <= 16 * s):
                continue
            inside = np.where((cx > x1 + 0.3 * (x2 - x1)) & (cx < x2 - 0.3 * (x2 - x1))
                              & (cy > y1 + 0.3 * (y2 - y1)) & (cy < y2 - 0.3 * (y2 - y1)))[0]
            for a in inside:
                sc[a] = rng.uniform(0.55, 0.99)
                noise = rng.normal(0, 1.5, 4)
                bb[a] = (np.array([cx[a] - x1, cy[a] - y1, x2 - cx[a], y2 - cy[a]]) + noise) / s
                t = face_align.arcface_dst.astype(np.float64) / 112.0
                px = x1 + t[:, 0] * (x2 - x1) + rng.normal(0, 1.0, 5)
                py = y1 + t[:, 1] * (y2 - y1) + rng.normal(0, 1.0, 5)
                kp[a] = np.stack([(px - cx[a]) / s, (py - cy[a]) / s], axis=1).ravel()
        scores.append(sc.reshape(n, 1).astype(np.float32))
        bboxes.append(bb.astype(np.float32))
        kpss.append(kp.astype(np.float32))
    scores = make_distinct(scores, 0.5)
    outputs = scores + bboxes + (kpss if use_kps else [])
    if args.batched:
        outputs = [o[None] for o in outputs]
    assert len(outputs) == n_out
    sess = FakeSession([1, 3, H, W], outputs)
    det = SCRFD.__new__(SCRFD)
    det.model_file, det.session, det.taskname, det.batched = None, sess, "detection", False
    det.center_cache, det.nms_thresh, det.det_thresh = {}, 0.4, 0.5
    det._init_vars()
    assert det.fmc == fmc and det.use_kps == use_kps and det.batched == args.batched
    runs = []
    for max_num, metric in [(0, "default"), (3, "default"), (3, "max"), (1, "default")]:
        d, k = det.detect(img, max_num=max_num, metric=metric)
        runs.append({"max_num": max_num, "metric": metric,
                     "det": [[float(v) for v in r] for r in d],
                     "kps": None if k is None else [[[float(v) for v in p] for p in f] for f in k]})
    for i, o in enumerate(outputs):
        o.astype("<f4").tofile(os.path.join(args.out, f"out_{i}.f32"))
    sess.blob.astype("<f4").tofile(os.path.join(args.out, "blob.f32"))
    im_ratio = float(img.shape[0]) / img.shape[1]
    new_h = H if im_ratio > H / W else int(W * im_ratio)
    meta = {"outputs": n_out, "shapes": [list(o.shape) for o in outputs], "batched": args.batched,
            "input_w": W, "input_h": H, "image": "t1.jpg", "width": int(img.shape[1]),
            "height": int(img.shape[0]), "det_scale": float(new_h) / img.shape[0],
            "blob_shape": list(sess.blob.shape), "runs": runs,
            "insightface": insightface.__version__, "cv2": cv2.__version__}
    with open(os.path.join(args.out, "scrfd.json"), "w") as f:
        json.dump(meta, f)
    cv2.imwrite(os.path.join(args.out, "t1.png"), img)
    print(f"scrfd {n_out} outputs batched={args.batched}: {len(runs[0]['det'])} faces after NMS -> {args.out}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("align")
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True)
    s = sub.add_parser("scrfd")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--outputs", type=int, choices=[6, 9, 10, 15], default=9)
    s.add_argument("--batched", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--input-w", type=int, default=640)
    s.add_argument("--input-h", type=int, default=640)
    args = ap.parse_args()
    {"align": cmd_align, "scrfd": cmd_scrfd}[args.cmd](args)


if __name__ == "__main__":
    main()
