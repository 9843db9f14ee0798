"""Oracle for core/diffusion-torch's fp8 storage (src/load.rs): torch 2.13's own decoding of
every byte of float8_e4m3fn and float8_e5m2, written by safetensors (so the dtype strings in the
header are the reference library's), and a ComfyUI-style "fp8 scaled" file (`<p>.weight` in fp8
with a `<p>.scale_weight` scalar, a `scale_input`, the `scaled_fp8` marker) with the weights as
torch computes them: `w.to(torch.float32) * scale_weight`.

usage: fp8_oracle.py --out DIR   (writes DIR/{codes,scaled}.safetensors, DIR/*.f32, DIR/oracle.json)
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file


def dump(out, meta, name, t):
    t = t.detach().to(torch.float32).contiguous()
    with open(os.path.join(out, name + ".f32"), "wb") as f:
        f.write(t.numpy().tobytes())
    meta[name] = list(t.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    meta = {"torch": torch.__version__}
    codes = torch.arange(256, dtype=torch.uint8)
    e4m3 = codes.view(torch.float8_e4m3fn)
    e5m2 = codes.clone().view(torch.float8_e5m2)
    save_file({"e4m3": e4m3, "e5m2": e5m2}, os.path.join(out, "codes.safetensors"))
    dump(out, meta, "e4m3", e4m3.to(torch.float32))
    dump(out, meta, "e5m2", e5m2.to(torch.float32))

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(12, 8, generator=g) * 100).to(torch.float8_e4m3fn)  # a fused [3·4, 8] qkv
    w2 = (torch.randn(6, 8, generator=g) * 1000).to(torch.float8_e5m2)
    raw = torch.randn(5, 8, generator=g).to(torch.float8_e4m3fn)
    bias = torch.randn(12, generator=g).to(torch.bfloat16)
    s = torch.tensor(0.0123456789, dtype=torch.float32)
    s2 = torch.tensor([3.3e-4], dtype=torch.float32)  # a one-element [1] scale as well as a 0-d one
    tensors = {
        "lin.weight": w, "lin.scale_weight": s, "lin.scale_input": torch.tensor(1.0), "lin.bias": bias,
        "lin2.weight": w2, "lin2.scale_weight": s2, "raw.weight": raw,
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
    }
    save_file(tensors, os.path.join(out, "scaled.safetensors"))
    lin = w.to(torch.float32) * s
    dump(out, meta, "lin.weight", lin)
    dump(out, meta, "lin.weight.bf16", lin.to(torch.bfloat16))
    dump(out, meta, "lin2.weight", w2.to(torch.float32) * s2)
    dump(out, meta, "raw.weight", raw.to(torch.float32))
    dump(out, meta, "lin.bias", bias)
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
