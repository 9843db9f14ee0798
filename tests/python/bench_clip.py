#!/usr/bin/env python3
"""The Python side of the CLIP bench (scripts/bench_clip.sh): transformers' CLIPModel
get_image_features / get_text_features on CPU, fp32, inference mode.

    bench_clip.py --out DIR [--repeats 5] [--threads 2] [--batch 8] [--seed 7]

The model is transformers' default CLIPConfig, which is OpenAI's ViT-B/32 shape (image: 224x224,
patch 32, width 768, 12 layers, 12 heads; text: width 512, 8 heads, 12 layers, 77 tokens;
projection 512), with seeded random weights saved by transformers (DIR/model, safetensors) so that
the Rust side loads the very same file. The inputs are already preprocessed (a seeded N(0, 1)
[B, 3, 224, 224] batch and B tokenised prompts): preprocessing is not timed, on either side.

One warm-up call per tower, then --repeats timed calls. Writes DIR/pixels.f32 (raw little-endian
f32), DIR/ids.json ({ids: [[77]], eot: [B]}) and DIR/python.json: image/text seconds per call,
the first row of each output (the Rust side checks it computes the same), threads and versions.
"""
import argparse
import json
import os
import time

import numpy as np
import open_clip
import torch
import transformers
from transformers import CLIPConfig, CLIPModel

PROMPTS = [
    "a photo of sks person",
    "a portrait of a man wearing sunglasses in paris, golden hour",
    "close-up photo of a woman smiling, studio lighting, 85mm",
    "an oil painting of an old fisherman",
    "a child in a red raincoat on a rainy street",
    "a person hiking in the mountains, wide shot",
    "black and white photo of a jazz musician playing saxophone on stage at night",
    "selfie",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    model = CLIPModel(CLIPConfig()).eval()
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    g = torch.Generator().manual_seed(a.seed)
    pixels = torch.randn(a.batch, 3, 224, 224, generator=g)
    pixels.numpy().astype("<f4").tofile(os.path.join(a.out, "pixels.f32"))
    prompts = (PROMPTS * (a.batch // len(PROMPTS) + 1))[: a.batch]
    ids = open_clip.tokenize(prompts)
    eot = ids.argmax(dim=-1)
    with open(os.path.join(a.out, "ids.json"), "w") as f:
        json.dump({"ids": ids.tolist(), "eot": eot.tolist()}, f)

    def timed(fn):
        with torch.inference_mode():
            out = fn()  # warm-up
            secs = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                out = fn()
                secs.append(time.perf_counter() - t0)
        return out, secs

    img, img_s = timed(lambda: model.get_image_features(pixel_values=pixels).pooler_output)
    txt, txt_s = timed(lambda: model.get_text_features(input_ids=ids).pooler_output)
    res = {
        "batch": a.batch, "threads": a.threads, "image_seconds": img_s, "text_seconds": txt_s,
        "image_embeds_row0": img[0].tolist(), "text_embeds_row0": txt[0].tolist(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
    }
    with open(os.path.join(a.out, "python.json"), "w") as f:
        json.dump(res, f)
    med = lambda s: float(np.median(s))
    print(f"transformers: image tower {a.batch / med(img_s):.2f} images/s (median of {a.repeats}), "
          f"text tower {a.batch / med(txt_s):.2f} texts/s")


if __name__ == "__main__":
    main()
