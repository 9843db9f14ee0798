#!/usr/bin/env python3
"""Generates stand-in InsightFace model packs (deterministic, seeded) for tests and benches.

    make_face_models.py --out DIR [--pack buffalo_l] [--depth r50|r-tiny] [--seed 0]

Real InsightFace packs (buffalo_l, ...) cannot be downloaded here, so this script writes ONNX
files with the same *interfaces* into DIR/<pack>/ (the layout of ~/.insightface/models):

  det_10g.onnx    a small detector in the SCRFD 9-output layout: input `input.1`
                  [1, 3, H, W] with dynamic H and W (as det_10g), 3 strides (8, 16, 32), 2
                  anchors per location; outputs score_8, score_16, score_32 ([N, 1], sigmoid),
                  bbox_8.. ([N, 4], distances in stride units), kps_8.. ([N, 10], offsets in
                  stride units) in that order (all scores, then all boxes, then all key points),
                  N = (H/s)(W/s)·2 in (row, column, anchor) order. Each level is avg-pool(s) →
                  3x3 conv → tanh → 1x1 convs, seeded random weights; the score bias is set so a
                  few anchors per photo exceed 0.5. insightface 0.7.3's model_zoo routes it
                  (>= 5 outputs) to its RetinaFace class, the SCRFD decoder.
  w600k_r50.onnx  an IResNet with the arcface_torch layout (backbones/iresnet.py: conv3x3-BN-
                  PReLU stem, IBasicBlock [BN, conv3x3, BN, PReLU, conv3x3(stride), BN] + 1x1
                  downsample, layers [3, 4, 14, 3] for r50 or [1, 1, 1, 1] for r-tiny, BN2d,
                  flatten, fc 512·7·7 → 512, BatchNorm1d `features`), random weights and
                  randomised BN statistics, input `input.1` [None, 3, 112, 112] (dynamic batch),
                  output `fc1` [None, 512], exported by the TorchScript exporter (opset 17,
                  constant folding: BN folded into the preceding conv where possible, as
                  arcface_torch's torch2onnx.py does). model_zoo routes it (112x112 input) to
                  ArcFaceONNX, whose normalisation is then mean 127.5 / std 127.5.

Needs torch, onnx (scripts/requirements.txt). Same seed → byte-identical files.
"""
import argparse
import os

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# IResNet (arcface_torch/backbones/iresnet.py)


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

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

    def __init__(self, block, layers, dropout=0, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=2)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512 * block.expansion, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * block.expansion * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion, eps=1e-05),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
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


DEPTHS = {"r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3], "r-tiny": [1, 1, 1, 1]}


def randomise(model, gen):
    """Random but well-scaled weights: kaiming convs (torch's default init, seeded), random BN
    affine and running statistics, small residual-branch gains so 24 blocks stay finite."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            n = m.num_features
            small = name.endswith("bn3")
            lo, hi = (0.1, 0.3) if small else (0.8, 1.2)
            m.weight.data = lo + (hi - lo) * torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean.data = 0.1 * torch.randn(n, generator=gen)
            m.running_var.data = 0.5 + torch.rand(n, generator=gen)
        elif isinstance(m, nn.PReLU):
            m.weight.data = 0.1 + 0.2 * torch.rand(m.weight.shape, generator=gen)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
            if m.bias is not None:
                m.bias.data = 0.01 * torch.randn(m.bias.shape, generator=gen)


# ---------------------------------------------------------------------------------------------
# Stand-in SCRFD detector (9 outputs)

# The ArcFace 5-point template (eyes, nose, mouth corners) relative to the 112x112 crop centre,
# in units of half the box: the key-point head's base pattern (plus a learned-looking wobble).
_ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


class Level(nn.Module):
    def __init__(self, stride, gen, score_bias):
        super().__init__()
        self.stride = stride
        self.pool = nn.AvgPool2d(kernel_size=stride, stride=stride)
        self.feat = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.score = nn.Conv2d(16, 2, kernel_size=1)
        self.bbox = nn.Conv2d(16, 8, kernel_size=1)
        self.kps = nn.Conv2d(16, 20, kernel_size=1)
        with torch.no_grad():
            self.feat.weight.copy_(torch.randn(self.feat.weight.shape, generator=gen) * 0.4)
            self.feat.bias.copy_(0.1 * torch.randn(16, generator=gen))
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=gen) * 0.8)
            self.score.bias.fill_(score_bias)
            self.bbox.weight.copy_(torch.randn(self.bbox.weight.shape, generator=gen) * 0.5)
            self.bbox.bias.zero_()
            self.kps.weight.copy_(torch.randn(self.kps.weight.shape, generator=gen) * 0.3)
            self.kps.bias.zero_()
        # Key-point base offsets for a box of half-size 2.5 strides: template centred, scaled.
        base = (_ARCFACE_DST - 56.0) / 56.0 * 2.5
        self.register_buffer("kps_base", torch.from_numpy(np.tile(base.reshape(1, 10), (1, 2))).reshape(1, 20, 1, 1))

    def forward(self, x):
        f = torch.tanh(self.feat(self.pool(x)))
        # [1, C, h, w] → [h, w, C] → rows of (cell, anchor).
        score = torch.sigmoid(self.score(f)).permute(0, 2, 3, 1).reshape(-1, 1)
        bbox = (2.0 + 1.5 * torch.sigmoid(self.bbox(f))).permute(0, 2, 3, 1).reshape(-1, 4)
        kps = (self.kps_base + 0.3 * torch.tanh(self.kps(f))).permute(0, 2, 3, 1).reshape(-1, 10)
        return score, bbox, kps


class TinySCRFD(nn.Module):
    def __init__(self, gen, score_bias=-5.5):
        super().__init__()
        self.levels = nn.ModuleList([Level(s, gen, score_bias) for s in (8, 16, 32)])

    def forward(self, x):
        outs = [lvl(x) for lvl in self.levels]
        return tuple(o[0] for o in outs) + tuple(o[1] for o in outs) + tuple(o[2] for o in outs)


# ---------------------------------------------------------------------------------------------


def export(model, dummy, path, input_names, output_names, dynamic_axes):
    model.eval()
    kwargs = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                  opset_version=17, do_constant_folding=True)
    with torch.no_grad():
        try:
            torch.onnx.export(model, dummy, path, dynamo=False, **kwargs)
        except TypeError:  # a torch without the `dynamo` switch: the TorchScript exporter is the default
            torch.onnx.export(model, dummy, path, **kwargs)


def make_detector(path, seed, score_bias):
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    model = TinySCRFD(gen, score_bias)
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    dyn = {"input.1": {2: "?h", 3: "?w"}}
    for n in names:
        dyn[n] = {0: f"{n}_n"}
    export(model, torch.zeros(1, 3, 640, 640), path, ["input.1"], names, dyn)


def make_recognizer(path, seed, depth):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed * 1000 + 2)
    model = IResNet(IBasicBlock, DEPTHS[depth])
    randomise(model, gen)
    export(model, torch.zeros(1, 3, 112, 112), path, ["input.1"], ["fc1"],
           {"input.1": {0: "None"}, "fc1": {0: "None"}})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model root: files go to OUT/<pack>/")
    ap.add_argument("--pack", default="buffalo_l")
    ap.add_argument("--depth", default="r50", choices=sorted(DEPTHS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score-bias", type=float, default=-5.5, help="detector score logit bias")
    args = ap.parse_args()
    files = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
             "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
             "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}[args.pack]
    d = os.path.join(args.out, args.pack)
    os.makedirs(d, exist_ok=True)
    make_detector(os.path.join(d, files[0]), args.seed, args.score_bias)
    make_recognizer(os.path.join(d, files[1]), args.seed, args.depth)
    print(d)


if __name__ == "__main__":
    main()
