#!/usr/bin/env python3
"""insightface 0.7.3 end-to-end oracle for `plugins/arcface` (detector + alignment + recognizer).

    arcface_pipeline_oracle.py --models ROOT --data DIR --out OUT [--pack buffalo_l]
                               [--max-embed N]

ROOT/<pack>/ holds the ONNX files of scripts/make_face_models.py (ROOT plays ~/.insightface/
models). Runs insightface's own `FaceAnalysis(name=pack, root=ROOT/..)` — model_zoo.get_model
routing, prepare(ctx_id=-1, det_size=(640, 640)), and `get`: detect, then norm_crop + get_feat
for every face — on real photos ($LIKENESS_DATA/faces/obama.jpg, faces/biden.jpg,
photos/insightface/t1.jpg), and writes to OUT:
    <stem>.png       the image as cv2 decoded it, RGB (so both sides start from the same pixels);
    pipeline.json    {pack, det_size, det_thresh, input_mean, input_std, rec_input_size,
                      images: [{image, width, height,
                                faces: [{bbox, score, kps, embedding (first --max-embed faces,
                                         L2-normalised as likeness reports them)}]}]}.
Faces are in FaceAnalysis.get's order (score order after NMS). Needs insightface==0.7.3,
onnxruntime, opencv (scripts/requirements.txt).
"""
import argparse
import json
import os

import cv2
import numpy as np
from insightface.app import FaceAnalysis

IMAGES = ["faces/obama.jpg", "faces/biden.jpg", "photos/insightface/t1.jpg"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pack", default="buffalo_l")
    ap.add_argument("--max-embed", type=int, default=1000)
    args = ap.parse_args()
    models = os.path.abspath(args.models)
    assert os.path.basename(models) == "models", "--models must be a folder named `models` (FaceAnalysis' layout)"
    app = FaceAnalysis(name=args.pack, root=os.path.dirname(models), providers=["CPUExecutionProvider"])
    assert set(app.models) == {"detection", "recognition"}, app.models.keys()
    app.prepare(ctx_id=-1, det_size=(640, 640))
    rec = app.models["recognition"]
    out = {
        "pack": args.pack,
        "det_size": 640,
        "det_thresh": float(app.det_thresh),
        "det_class": type(app.det_model).__name__,
        "input_mean": float(rec.input_mean),
        "input_std": float(rec.input_std),
        "rec_input_size": list(rec.input_size),
        "images": [],
    }
    os.makedirs(args.out, exist_ok=True)
    for rel in IMAGES:
        img = cv2.imread(os.path.join(args.data, rel))
        assert img is not None, rel
        stem = os.path.splitext(os.path.basename(rel))[0]
        cv2.imwrite(os.path.join(args.out, stem + ".png"), img)  # BGR array → RGB PNG
        # FaceAnalysis.get, with the embedding limited to the first --max-embed faces.
        bboxes, kpss = app.det_model.detect(img, max_num=0, metric="default")
        faces = []
        for i in range(bboxes.shape[0]):
            f = {"bbox": [float(v) for v in bboxes[i, :4]], "score": float(bboxes[i, 4]),
                 "kps": [[float(v) for v in p] for p in kpss[i]]}
            if i < args.max_embed:
                from insightface.app.common import Face
                face = Face(bbox=bboxes[i, :4], kps=kpss[i], det_score=bboxes[i, 4])
                emb = rec.get(img, face).astype(np.float64)
                f["embedding"] = (emb / np.linalg.norm(emb)).tolist()
            faces.append(f)
        out["images"].append({"image": stem + ".png", "width": img.shape[1], "height": img.shape[0], "faces": faces})
        print(rel, len(faces), "faces")
    with open(os.path.join(args.out, "pipeline.json"), "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
