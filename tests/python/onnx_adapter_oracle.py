#!/usr/bin/env python3
"""onnxruntime-python oracle for the `likeness-sdk-onnx` adapters.

    onnx_adapter_oracle.py --out DIR [--seed N] [--batch B]

Builds a tiny ONNX model with the `onnx` package (opset 17, IR version 8):

    Y = Relu(MatMul(X, W) + B)     X: float32[batch, 5] (dynamic batch), W: [5, 3], B: [3]

with W and B fixed by a seeded numpy generator, and writes to DIR:

  model.onnx     the model (W and B as initializers);
  oracle.json    {"x_shape", "x", "y_shape", "y", "onnxruntime", "onnx", "opset"}: the seeded f32
                 input X and onnxruntime-python's output Y (CPUExecutionProvider), flat row-major
                 lists of the f32 values written as exact doubles.

Needs numpy, onnx and onnxruntime (scripts/requirements.txt).
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IN_FEATURES = 5
OUT_FEATURES = 3


def build_model(rng):
    w = rng.standard_normal((IN_FEATURES, OUT_FEATURES)).astype(np.float32)
    b = rng.standard_normal((OUT_FEATURES,)).astype(np.float32)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", IN_FEATURES])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", OUT_FEATURES])
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["XWB"]),
        helper.make_node("Relu", ["XWB"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "likeness_onnx_adapter_oracle",
        [x],
        [y],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="likeness-oracle"
    )
    # IR 8 is read by every onnxruntime >= 1.14; the default IR of new onnx releases may be
    # newer than the runtime accepts.
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    model = build_model(rng)
    model_path = os.path.join(args.out, "model.onnx")
    onnx.save(model, model_path)

    x = rng.standard_normal((args.batch, IN_FEATURES)).astype(np.float32)
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(["Y"], {"X": x})
    y = np.asarray(y, dtype=np.float32)

    result = {
        "x_shape": list(x.shape),
        "x": [float(v) for v in x.ravel()],
        "y_shape": list(y.shape),
        "y": [float(v) for v in y.ravel()],
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
    }
    with open(os.path.join(args.out, "oracle.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
