#!/usr/bin/env python3
"""Oracle for the differentiable ArcFace recognizer (plugins/arcface/src/{onnx_proto,iresnet}.rs).

Sub-commands (all write into --out):

* ``tiny``: small ONNX files written with the ``onnx`` package's helpers, exercising the wire
  encodings the Rust reader must handle (packed and unpacked dims, ``float_data``, ``raw_data``,
  ``int64_data``, node attributes of every scalar/list kind, graph inputs with symbolic and fixed
  dims) and one tensor stored as external data.  ``tiny.json`` lists what the reader must see.
* ``iresnet``: an IResNet with the arcface_torch layout (``backbones/iresnet.py``: IBasicBlock =
  BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN (+ downsample conv1x1+BN); stem conv3x3 + BN +
  PReLU; BN → flatten → fc → BatchNorm1d "features"), random weights and non-trivial BN running
  statistics, exported to ONNX (opset 17, TorchScript exporter ``dynamo=False``, eval mode, so
  conv→BN pairs are folded into the convs and the leading BN of each block stays a
  ``BatchNormalization`` node), then run with onnxruntime on a fixed input.  Writes
  ``model.onnx``, ``input.f32`` (raw little-endian f32, [B,3,112,112]), ``ort.f32`` (onnxruntime
  output [B,512]), ``torch.f32`` (eager PyTorch output) and ``meta.json``.
"""
import argparse
import json
import os
import sys

import numpy as np


def cmd_tiny(out):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w_float = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)  # float_data (unpacked path below)
    w_raw = rng.standard_normal((4, 3)).astype(np.float32)          # raw_data
    shape_i64 = np.array([1, -1], dtype=np.int64)                   # int64_data
    t_float = helper.make_tensor("w_float", TensorProto.FLOAT, w_float.shape, w_float.flatten().tolist(), raw=False)
    t_raw = numpy_helper.from_array(w_raw, "w_raw")
    t_i64 = helper.make_tensor("shape", TensorProto.INT64, shape_i64.shape, shape_i64.tolist(), raw=False)
    t_scalar = numpy_helper.from_array(np.array(0.25, dtype=np.float32), "scalar")
    nodes = [
        helper.make_node("Conv", ["x", "w_float"], ["c"], name="conv0", kernel_shape=[1, 1], pads=[0, 0, 0, 0],
                         strides=[1, 1], group=1),
        helper.make_node("Mul", ["c", "scalar"], ["m"], name="mul0"),
        helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape0"),
        helper.make_node("Gemm", ["r2", "w_raw"], ["y"], name="gemm0", alpha=1.0, beta=0.0, transB=1),
        helper.make_node("LeakyRelu", ["r"], ["r2"], name="act0", alpha=0.125),
    ]
    # Inputs: one symbolic batch dim and fixed dims; the graph is only read, never run.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(nodes, "tiny", [x], [y], initializer=[t_float, t_raw, t_i64, t_scalar])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, os.path.join(out, "tiny.onnx"))

    # The same model with w_raw moved to external data.
    ext = onnx.load(os.path.join(out, "tiny.onnx"))
    from onnx.external_data_helper import convert_model_to_external_data
    convert_model_to_external_data(ext, all_tensors_to_one_file=True, location="tiny_ext.bin", size_threshold=16)
    onnx.save(ext, os.path.join(out, "tiny_external.onnx"))

    meta = {
        "initializers": {
            "w_float": {"dims": list(w_float.shape), "values": w_float.flatten().tolist()},
            "w_raw": {"dims": list(w_raw.shape), "values": w_raw.flatten().tolist()},
            "shape": {"dims": list(shape_i64.shape), "int64": shape_i64.tolist()},
            "scalar": {"dims": [], "values": [0.25]},
        },
        "nodes": [{"name": n.name, "op_type": n.op_type, "inputs": list(n.input), "outputs": list(n.output)} for n in nodes],
        "inputs": [{"name": "x", "dims": [None, 3, 2, 2]}],
        "outputs": ["y"],
    }
    with open(os.path.join(out, "tiny.json"), "w") as f:
        json.dump(meta, f)


def build_iresnet(layers, norm_in_graph):
    import torch
    from torch import nn

    def conv3x3(i, o, stride=1):
        return nn.Conv2d(i, o, kernel_size=3, stride=stride, padding=1, bias=False)

    def conv1x1(i, o, stride=1):
        return nn.Conv2d(i, o, kernel_size=1, stride=stride, bias=False)

    class IBasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
            self.conv1 = conv3x3(inplanes, planes)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
            self.prelu = nn.PReLU(planes)
            self.conv2 = conv3x3(planes, planes, stride)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.bn1(x)
            out = self.conv1(out)
            out = self.bn2(out)
            out = self.prelu(out)
            out = self.conv2(out)
            out = self.bn3(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
            return out

    class IResNet(nn.Module):
        fc_scale = 7 * 7

        def __init__(self, layers, num_features=512):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
            self.prelu = nn.PReLU(64)
            self.layer1 = self._make_layer(64, layers[0], 2)
            self.layer2 = self._make_layer(128, layers[1], 2)
            self.layer3 = self._make_layer(256, layers[2], 2)
            self.layer4 = self._make_layer(512, layers[3], 2)
            self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
            self.dropout = nn.Dropout(p=0, inplace=True)
            self.fc = nn.Linear(512 * self.fc_scale, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-05)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False

        def _make_layer(self, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes, eps=1e-05))
            mods = [IBasicBlock(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes
            for _ in range(1, blocks):
                mods.append(IBasicBlock(self.inplanes, planes))
            return nn.Sequential(*mods)

        def forward(self, x):
            if norm_in_graph:
                # As some insightface recognizers carry it: (x − 127.5) · (1/127.5) in the graph.
                x = (x - 127.5) * (1.0 / 127.5)
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.prelu(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
            x = self.fc(x)
            x = self.features(x)
            return x

    return IResNet(layers)


def cmd_iresnet(out, layers, batch, seed, norm_in_graph):
    import torch
    from torch import nn
    import onnxruntime as ort

    torch.manual_seed(seed)
    model = build_iresnet(layers, norm_in_graph)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if m.weight.requires_grad:
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.05)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.3)
    model.eval()
    if norm_in_graph:
        x = torch.rand(batch, 3, 112, 112, generator=g) * 255.0
    else:
        x = torch.rand(batch, 3, 112, 112, generator=g) * 2.0 - 1.0
    with torch.no_grad():
        y_torch = model(x)
    path = os.path.join(out, "model.onnx")
    torch.onnx.export(model, (x,), path, input_names=["input.1"], output_names=["embedding"], opset_version=17,
                      dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}}, do_constant_folding=True,
                      dynamo=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y_ort = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    x.numpy().astype("<f4").tofile(os.path.join(out, "input.f32"))
    y_ort.astype("<f4").tofile(os.path.join(out, "ort.f32"))
    y_torch.numpy().astype("<f4").tofile(os.path.join(out, "torch.f32"))
    import onnx
    ops = sorted({n.op_type for n in onnx.load(path).graph.node})
    meta = {"layers": layers, "batch": batch, "norm_in_graph": norm_in_graph, "ops": ops,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "exporter": "torchscript (dynamo=False)",
            "input_shape": [batch, 3, 112, 112], "output_shape": list(y_ort.shape),
            "ort_vs_torch_max_abs": float(np.abs(y_ort - y_torch.numpy()).max())}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(json.dumps(meta))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["tiny", "iresnet"])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default="1,1,1,1", help="IBasicBlocks per stage, e.g. 3,4,14,3 for IResNet-50")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm-in-graph", action="store_true", help="put (x-127.5)/127.5 Sub/Mul nodes in the graph")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.command == "tiny":
        cmd_tiny(a.out)
    else:
        cmd_iresnet(a.out, [int(v) for v in a.layers.split(",")], a.batch, a.seed, a.norm_in_graph)


if __name__ == "__main__":
    sys.exit(main())
