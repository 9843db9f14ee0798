"""Oracle for plugins/mtcnn-reid: torchreid 0.2.5's own osnet.py (loaded by path from
$LIKENESS_DATA/reference, not pip-installed) with seeded random weights.

Writes to --out:
  <arch>.safetensors        the state dict (classifier and num_batches_tracked included)
  <arch>.pth.tar            torchreid's save_checkpoint layout: {'state_dict': {'module.'+k: v}, ...}
  <arch>_bad.pth            the state dict without `conv2.0.gate.fc1.bias` (a missing key)
With --photo: <out>/photo.rgb (interleaved u8 RGB, PIL's decode) and 'W H' on stdout.
  <arch>_io.safetensors     `input` [2,3,256,128] (ImageNet-normalised), `feature` [2,512] (eval
                            forward, f32), `r` [2,512] and `grad` = d(sum(feature·r))/d(input) in f64
"""
import argparse
import importlib.util
import os
import sys

import torch
from safetensors.torch import save_file


def load_osnet():
    path = os.path.join(os.environ["LIKENESS_DATA"], "reference/torchreid-0.2.5/torchreid/reid/models/osnet.py")
    spec = importlib.util.spec_from_file_location("torchreid_osnet", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", choices=["osnet_x1_0", "osnet_x0_25"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--photo", help="decode this photo with PIL to <out>/photo.rgb; prints 'W H'")
    a = ap.parse_args()
    if a.photo:
        from PIL import Image
        im = Image.open(a.photo).convert("RGB")
        open(os.path.join(a.out, "photo.rgb"), "wb").write(im.tobytes())
        print(im.width, im.height)
        return
    torch.manual_seed(a.seed)
    osnet = load_osnet()
    model = getattr(osnet, a.arch)(num_classes=10, pretrained=False)
    # Non-trivial eval BatchNorm: random affine parameters and running statistics, so that the
    # parity covers them (torchreid's init leaves them at the identity).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(a.out, f"{a.arch}.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3, "rank1": 0.5},
               os.path.join(a.out, f"{a.arch}.pth.tar"))
    bad = {k: v for k, v in sd.items() if k != "conv2.0.gate.fc1.bias"}
    torch.save(bad, os.path.join(a.out, f"{a.arch}_bad.pth"))

    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        feat = model(x)
    r = torch.randn(2, 512, dtype=torch.float64)
    m64 = model.double()
    x64 = x.double().requires_grad_(True)
    (m64(x64) * r).sum().backward()
    save_file({"input": x, "feature": feat.contiguous(), "r": r, "grad": x64.grad.contiguous()},
              os.path.join(a.out, f"{a.arch}_io.safetensors"))
    print(f"{a.arch}: feature max |v| = {feat.abs().max().item():.4g}, nonzero = {(feat > 0).float().mean().item():.3f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
