#!/usr/bin/env python3
"""The Python side of the MTCNN bench (scripts/bench_mtcnn.sh): facenet-pytorch 2.6.0's MTCNN,
its `extract_face`, then torchreid 0.2.5's OSNet on the mtcnn-reid metric's crop, on CPU.

    bench_mtcnn.py --out DIR --images P... [--repeats 5] [--threads 2] [--arch osnet_x1_0]
                   [--seed 7] [--margin 0.2] [--crop 160 20]

facenet-pytorch and torchreid are not installed: their unpacked wheels under
$LIKENESS_DATA/reference are imported by path, as tests/python/{mtcnn,osnet}_oracle.py do.

Per image (a HWC uint8 torch tensor: decoding is not timed, on either side), three stages:
  detect    MTCNN(keep_all=True).detect(img) (select_largest: the largest face first)
  crop      extract_face(img, box, SIZE, MARGIN) of the largest face: facenet's own
            MTCNN -> crop step (its InceptionResnetV1 has no Rust counterpart here)
  embed     the mtcnn-reid metric's embedding of that face: the box grown by `margin` and
            widened to 2:1, bilinear grid_sample (align_corners=False, zero padding) of the [0,1]
            image onto 256x128 pixel centres, ImageNet normalisation, OSNet eval forward, L2
            normalisation (plugins/mtcnn-reid/src/plugin.rs: crop_box, crop, embed_boxes)
One warm-up pass over every image, then --repeats timed passes; each stage's seconds are summed
per pass.

Writes DIR/<stem>.rgb (PIL-decoded RGB, the pixels both sides use), DIR/<arch>.safetensors (the
seeded random OSNet, so both sides run the same weights) and DIR/python.json:
  images: [{name, width, height, faces, box (largest face or null), embedding (or null)}]
  passes: [{detect, crop, embed, cpu}] seconds per timed pass (cpu: the process's CPU seconds
          over the pass, all threads); threads, torch
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
INPUT_HW = (256, 128)


def reference(sub):
    data = os.environ.get("LIKENESS_DATA")
    if not data:
        sys.exit("bench_mtcnn.py: LIKENESS_DATA is not set (source scripts/common.sh)")
    return os.path.join(data, "reference", sub)


def load_osnet():
    path = os.path.join(reference("torchreid-0.2.5"), "torchreid/reid/models/osnet.py")
    spec = importlib.util.spec_from_file_location("torchreid_osnet", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def crop_box(box, margin):
    """plugins/mtcnn-reid's `crop_box`, in f64 as there."""
    b = [float(v) for v in box]
    cx, cy = (b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0
    w = max(b[2] - b[0], 1.0) * (1.0 + 2.0 * margin)
    h = max(b[3] - b[1], 1.0) * (1.0 + 2.0 * margin)
    aspect = INPUT_HW[0] / INPUT_HW[1]
    w, h = (h / aspect, h) if h >= aspect * w else (w, aspect * w)
    return [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]


def reid_crop(img01, bx):
    """plugins/mtcnn-reid's `crop`: the grid in f64, then f32, bilinear, zeros, align_corners=False."""
    h, w = img01.shape[1], img01.shape[2]
    oh, ow = INPUT_HW
    xs = 2.0 * (bx[0] + (np.arange(ow) + 0.5) / ow * (bx[2] - bx[0])) / w - 1.0
    ys = 2.0 * (bx[1] + (np.arange(oh) + 0.5) / oh * (bx[3] - bx[1])) / h - 1.0
    gx = np.broadcast_to(xs[None, :], (oh, ow))
    gy = np.broadcast_to(ys[:, None], (oh, ow))
    grid = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32))
    return F.grid_sample(img01[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="osnet_x1_0", choices=["osnet_x1_0", "osnet_x0_25"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--crop", nargs=2, type=int, default=[160, 20])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, reference("facenet_pytorch-2.6.0"))
    from facenet_pytorch.models.mtcnn import MTCNN  # noqa: E402
    from facenet_pytorch.models.utils.detect_face import extract_face  # noqa: E402

    mtcnn = MTCNN(keep_all=True)
    torch.manual_seed(a.seed)
    model = getattr(load_osnet(), a.arch)(num_classes=10, pretrained=False).eval()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(a.out, f"{a.arch}.safetensors"))
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)

    images = []
    for path in a.images:
        stem = os.path.splitext(os.path.basename(path))[0]
        arr = np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8))
        arr.tofile(os.path.join(a.out, stem + ".rgb"))
        images.append((stem, torch.from_numpy(arr.copy())))

    def one(img, t):
        c0 = time.perf_counter()
        boxes, _probs = mtcnn.detect(img)
        c1 = time.perf_counter()
        t["detect"] += c1 - c0
        if boxes is None:
            return 0, None, None
        extract_face(img, boxes[0], a.crop[0], a.crop[1])
        c2 = time.perf_counter()
        t["crop"] += c2 - c1
        with torch.no_grad():
            img01 = img.permute(2, 0, 1).float() / 255.0
            x = (reid_crop(img01, crop_box(boxes[0], a.margin))[None] - mean) / std
            f = model(x)
            e = f / f.square().sum(1, keepdim=True).sqrt()
        t["embed"] += time.perf_counter() - c2
        return len(boxes), boxes[0], e[0]

    warm = {"detect": 0.0, "crop": 0.0, "embed": 0.0}
    results = [one(img, warm) for _, img in images]
    passes = []
    for _ in range(a.repeats):
        t = {"detect": 0.0, "crop": 0.0, "embed": 0.0}
        c = time.process_time()  # CPU seconds of every thread of the process, as the Rust side
        for _, img in images:
            one(img, t)
        t["cpu"] = time.process_time() - c
        passes.append(t)
    out = {
        "images": [{
            "name": stem,
            "width": int(img.shape[1]),
            "height": int(img.shape[0]),
            "faces": n,
            "box": None if box is None else [float(v) for v in box],
            "embedding": None if e is None else [float(v) for v in e],
        } for (stem, img), (n, box, e) in zip(images, results)],
        "passes": passes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "arch": a.arch,
        "margin": a.margin,
        "crop": a.crop,
    }
    with open(os.path.join(a.out, "python.json"), "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
