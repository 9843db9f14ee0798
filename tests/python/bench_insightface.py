#!/usr/bin/env python3
"""The Python side of the eval-faces bench: insightface 0.7.3's `FaceAnalysis` + `get` + cosine
similarity, as seed 004's `evaluate_face_consistency.py` runs it, on CPU.

    bench_insightface.py --models ROOT --pairs PAIRS.json [--pack buffalo_l] [--det-size 640]
                         [--out OUT.json]

ROOT is a folder named `models` holding `<pack>/` (scripts/make_face_models.py's output; it
plays ~/.insightface/models). PAIRS.json is a list of `{"control": PATH, "generated": PATH}`.
What is timed mirrors `host eval-faces`: every distinct image, in first-seen order, is decoded
(cv2.imread) and embedded once with `app.get(img, max_num=1)` (one face, chosen as
`detect(max_num=1, metric='default')` chooses it — the arcface plugin's default), then one
cosine similarity per pair. One warm-up `get` on the first image runs before the clock starts.

Prints (and writes to --out) one JSON object:
  images, seconds, images_per_s      the timed part (decode + get + similarities)
  import_seconds, load_seconds       `import insightface` and FaceAnalysis(...) + prepare(...)
  total_seconds                      import + load + warm-up + timed part
  decode_seconds, detect_seconds, recognise_seconds   where the timed part went
  intra_op_threads, inter_op_threads ONNX Runtime session options as insightface created them
                                     (0 = ONNX Runtime's default: one thread per physical core)
  onnxruntime, insightface           versions; providers
  similarities                       per pair, in PAIRS.json's order (null: no face in one image)
Needs insightface==0.7.3, onnxruntime, opencv (scripts/requirements.txt).
"""
import time
import warnings

T0 = time.perf_counter()
warnings.filterwarnings("ignore", category=FutureWarning)  # skimage's `estimate` deprecation, per face

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import insightface  # noqa: E402
from insightface.app import FaceAnalysis  # noqa: E402

T_IMPORT = time.perf_counter() - T0


class Timed:
    """Wraps a bound method and accumulates the seconds spent in it."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--pack", default="buffalo_l")
    ap.add_argument("--det-size", type=int, default=640)
    ap.add_argument("--out")
    args = ap.parse_args()
    models = os.path.abspath(args.models)
    assert os.path.basename(models) == "models", "--models must be a folder named `models` (FaceAnalysis' layout)"
    with open(args.pairs) as fh:
        pairs = json.load(fh)

    t = time.perf_counter()
    app = FaceAnalysis(name=args.pack, root=os.path.dirname(models), providers=["CPUExecutionProvider"])
    assert set(app.models) == {"detection", "recognition"}, app.models.keys()
    app.prepare(ctx_id=-1, det_size=(args.det_size, args.det_size))
    load_seconds = time.perf_counter() - t
    det, rec = app.models["detection"], app.models["recognition"]
    so = det.session.get_session_options()

    paths = []
    for p in pairs:
        for k in ("control", "generated"):
            if p[k] not in paths:
                paths.append(p[k])

    # One warm-up (not timed).
    t = time.perf_counter()
    warm = cv2.imread(paths[0])
    app.get(warm, max_num=1)
    warmup_seconds = time.perf_counter() - t

    # Instrument detect and recognise (app.get calls these bound attributes).
    det.detect = Timed(det.detect)
    rec.get = Timed(rec.get)
    decode = 0.0
    emb = {}
    t_start = time.perf_counter()
    for path in paths:
        t = time.perf_counter()
        img = cv2.imread(path)
        decode += time.perf_counter() - t
        if img is None:
            emb[path] = None
            continue
        faces = app.get(img, max_num=1)
        emb[path] = faces[0].normed_embedding.astype(np.float64) if faces else None
    sims = []
    for p in pairs:
        a, b = emb[p["control"]], emb[p["generated"]]
        sims.append(None if a is None or b is None else float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    seconds = time.perf_counter() - t_start

    valid = [s for s in sims if s is not None]
    out = {
        "side": "insightface (Python)",
        "images": len(paths),
        "pairs": len(pairs),
        "valid_pairs": len(valid),
        "seconds": seconds,
        "images_per_s": len(paths) / seconds,
        "import_seconds": T_IMPORT,
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "total_seconds": time.perf_counter() - T0,
        "decode_seconds": decode,
        "detect_seconds": det.detect.seconds,
        "recognise_seconds": rec.get.seconds,
        "intra_op_threads": so.intra_op_num_threads,
        "inter_op_threads": so.inter_op_num_threads,
        "providers": det.session.get_providers(),
        "onnxruntime": onnxruntime.__version__,
        "insightface": insightface.__version__,
        "det_size": args.det_size,
        "mean_similarity": float(np.mean(valid)) if valid else None,
        "similarities": sims,
    }
    text = json.dumps(out)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
