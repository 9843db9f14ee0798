#!/usr/bin/env python3
"""Reference token ids of open_clip_torch 3.3.0 for core/clip's tokenizer test.

Texts: every line and every quoted string of ../shared/seeds/*.txt beside the repo (or --seeds), plus
--n generated strings (fixed seed) mixing ASCII words, punctuation, numbers, emoji, CJK,
Arabic, Cyrillic, Devanagari, precomposed and combining accents, curly quotes, ligatures,
fullwidth forms, HTML entities, whitespace runs and over-long prompts (> 77 tokens).
Writes {"open_clip": version, "cases": [{"text", "ids"}]} (ids: open_clip.tokenize, [77]).
Mojibake-looking text is avoided on purpose: ftfy's repair heuristics are not replicated.
"""
import argparse
import glob
import json
import os
import random
import re

import open_clip

POOLS = [
    "a photo of a person in paris wearing sunglasses".split(),
    list("!?.,;:-_()[]{}<>/\\|@#$%^*+=~`'\""),
    ["0", "7", "42", "1999", "3.14", "1,000", "2nd", "x86_64", "4K", "v1.5"],
    ["😀", "👍🏽", "🇫🇷", "❤️", "🐱", "👩‍👩‍👧", "✨"],
    ["東京", "猫", "写真", "人物", "한국어", "ひらがな", "カタカナ"],
    ["مرحبا", "صورة", "شخص"],
    ["Привет", "ФОТО", "человек", "ёж"],
    ["नमस्ते", "चित्र", "व्यक्ति"],
    ["café", "naïve", "Ñandú", "Straße", "über", "façade", "Ελλάδα", "e\u0301t\u0301e\u0301"],
    ["\u2018quoted\u2019", "\u201cdouble\u201d", "it\u2019s", "\ufb01ne", "\ufb02ow", "\uff28\uff45\uff4c\uff4c\uff4f", "\u3000"],
    ["&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&#x263A;", "&nbsp;", "AT&T", "&ampere"],
    [" ", "  ", "\t", "\n", "\r\n", "   \t "],
    ["<start_of_text>", "<end_of_text>", "DON'T", "we'll", "you're", "I'm", "they've", "she'd"],
]


def generate(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([1, 3, 8, 20]) if i % 10 else 120  # every 10th string is over-long
        parts = []
        for _ in range(k):
            pool = rng.choice(POOLS)
            parts.append(rng.choice(pool))
            parts.append(rng.choice(["", " ", " ", " "]))
        out.append("".join(parts))
    return out


def seed_texts(pattern):
    texts = []
    paths = sorted(glob.glob(pattern))
    if not paths:
        # The seeds' prompts are part of the oracle (issue 7): a missing ../shared is an error, not
        # a smaller test.
        raise SystemExit(f"clip_oracle.py: no seed documents match {pattern}; pass --seeds or put shared/ beside the repo")
    for path in paths:
        with open(path, encoding="utf-8") as f:
            content = f.read()
        texts += [line for line in content.split("\n") if line.strip()]
        texts += re.findall(r'"([^"\n]{1,400})"', content)
        texts += re.findall(r"'([^'\n]{1,400})'", content)
    return texts


TINY_OC = {
    # open_clip's model-config form of the tiny transformers config below (head_width 8 -> 4 heads).
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}


def tiny_clip(act="quick_gelu"):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act=act),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=16,
    )
    return CLIPModel(cfg).eval()


def to_open_clip(model, layers=2):
    """transformers CLIPModel state dict -> open_clip/OpenAI names (checked by the caller)."""
    import torch

    sd = {k: v.float() for k, v in model.state_dict().items()}
    oc = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": sd["text_model.final_layer_norm.weight"],
          "ln_final.bias": sd["text_model.final_layer_norm.bias"],
          "text_projection": sd["text_projection.weight"].t().contiguous(),
          "logit_scale": sd["logit_scale"],
          "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
          "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
          "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
          "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
          "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
          "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
          "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
          "visual.proj": sd["visual_projection.weight"].t().contiguous()}
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        for i in range(layers):
            h, o = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for wb in ("weight", "bias"):
                oc[o + "attn.in_proj_" + wb] = torch.cat([sd[h + f"self_attn.{p}_proj.{wb}"] for p in "qkv"])
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    oc[o + a + "." + wb] = sd[h + b + "." + wb]
    return {k: v.contiguous() for k, v in oc.items()}


def flat(t):
    return t.detach().flatten().tolist()


def text_model(out_dir, out):
    """A tiny random CLIPModel saved by transformers (DIR, safetensors), the same weights in open_clip
    layout (DIR/open_clip.safetensors + DIR/open_clip_config.json, both checked through open_clip's own
    CLIP class), a gelu variant (DIR/gelu), and the reference outputs of both towers in f64 and f32."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = tiny_clip()
    model.save_pretrained(out_dir, safe_serialization=True)
    prompts = ["a photo of a person in paris", "sks man, portrait", "x " * 100]
    ids = open_clip.tokenize(prompts)
    eot = ids.argmax(dim=-1)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    res = {"ids": ids.tolist(), "eot": eot.tolist(), "layers": 2, "heads": 4, "pixels": flat(pixels)}
    with torch.no_grad():
        o32 = model(input_ids=ids, pixel_values=pixels)
        res["image_embeds_f32"] = flat(model.get_image_features(pixel_values=pixels).pooler_output)
        res["text_embeds_f32"] = flat(model.get_text_features(input_ids=ids).pooler_output)
        res["logits_per_image_f32"] = flat(o32.logits_per_image)
        m64 = model.double()
        t = m64.text_model(input_ids=ids, output_hidden_states=True)
        pooled = t.last_hidden_state[torch.arange(ids.shape[0]), eot]
        emb = m64.text_projection(pooled)
        v = m64.vision_model(pixel_values=pixels.double())
        img = m64.visual_projection(v.pooler_output)
        res["logits_per_image"] = flat(m64(input_ids=ids, pixel_values=pixels.double()).logits_per_image)
    res.update({
        "last_hidden_state": flat(t.last_hidden_state),
        "penultimate": flat(t.hidden_states[-2]),
        "text_embeds": flat(emb),
        "vision_last_hidden_state": flat(v.last_hidden_state),
        "vision_pooler_output": flat(v.pooler_output),
        "image_embeds": flat(img),
    })
    # The same weights in open_clip's layout, checked through open_clip's own CLIP class built from
    # the open_clip model config written next to it (strict load: every key used, none missing).
    from open_clip.model import CLIP

    oc = to_open_clip(model.float())
    ocm = CLIP(TINY_OC["embed_dim"], TINY_OC["vision_cfg"], TINY_OC["text_cfg"], quick_gelu=True)
    ocm.load_state_dict(oc, strict=True)
    with torch.no_grad():
        ocm = ocm.double().eval()
        oc_txt = ocm.encode_text(ids)
        oc_img = ocm.encode_image(pixels.double())
    assert (oc_txt - emb).abs().max() < 1e-9, "open_clip layout conversion (text) is wrong"
    assert (oc_img - img).abs().max() < 1e-9, "open_clip layout conversion (image) is wrong"
    save_file(oc, os.path.join(out_dir, "open_clip.safetensors"))
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump(TINY_OC, f)
    # gelu (exact erf) in both towers; transformers layout only, f64 image embeddings.
    torch.manual_seed(2)
    gm = tiny_clip("gelu")
    gm.save_pretrained(os.path.join(out_dir, "gelu"), safe_serialization=True)
    with torch.no_grad():
        res["gelu_image_embeds"] = flat(gm.double().get_image_features(pixel_values=pixels.double()).pooler_output)
        res["gelu_text_embeds"] = flat(gm.get_text_features(input_ids=ids).pooler_output)
    with open(out, "w") as f:
        json.dump(res, f)


def photos(model_dir, paths, out_dir, prompts):
    """For the plugin test and the preprocessing measurement: per photo, PIL's decoded RGB (raw u8),
    open_clip's eval preprocess at 224 (PIL path) as f32 and the PIL-resized-and-cropped u8 it starts
    from, torchvision v2's tensor path at 224 on the same decoded pixels; with --model, the model's
    L2-normalised get_image_features after the tensor path at its own image size, and its
    get_text_features of the prompts."""
    import numpy as np
    import torch
    import torchvision.transforms.v2.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from transformers import CLIPModel

    from open_clip.transform import image_transform

    model = CLIPModel.from_pretrained(model_dir).eval() if model_dir else None
    pre = image_transform(224, is_train=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)

    def tensor_path(x, s):
        r = TF.resize(x, [s], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return (TF.center_crop(r, [s, s]) - mean) / std

    meta = []
    for k, p in enumerate(paths):
        im = Image.open(p).convert("RGB")
        w, h = im.size
        rgb = np.asarray(im, dtype=np.uint8)
        rgb.tofile(os.path.join(out_dir, f"{k}.rgb"))
        # The u8 image open_clip's Resize + CenterCrop produce (before ToTensor).
        crop = pre.transforms[1](pre.transforms[0](im))
        np.asarray(crop, dtype=np.uint8).tofile(os.path.join(out_dir, f"{k}.crop224.rgb"))
        pre(im).numpy().astype(np.float32).tofile(os.path.join(out_dir, f"{k}.pil224.f32"))
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
        tensor_path(x, 224).numpy().astype(np.float32).tofile(os.path.join(out_dir, f"{k}.tv224.f32"))
        meta.append({"path": p, "w": w, "h": h})
        if model is not None:
            with torch.no_grad():
                x_model = tensor_path(x, model.config.vision_config.image_size)
                e = model.get_image_features(pixel_values=x_model).pooler_output
            meta[-1]["image_embeds"] = flat(e[0] / e[0].norm())
    res = {"photos": meta, "prompts": prompts}
    if model is not None:
        with torch.no_grad():
            t = model.get_text_features(input_ids=open_clip.tokenize(prompts)).pooler_output
        res["text_embeds"] = flat(t / t.norm(dim=-1, keepdim=True))
    with open(os.path.join(out_dir, "photos.json"), "w") as f:
        json.dump(res, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    # ../shared/seeds beside the repository (CI's layout and this machine's /work/shared).
    ap.add_argument("--seeds", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                                    "shared", "seeds", "*.txt"))
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--hf-dir", help="also write a transformers tokenizer folder built from the same vocab "
                    "(vocab.json + merges.txt in DIR/files, save_pretrained in DIR/saved) and its ids")
    ap.add_argument("--text-model", help="instead: save a tiny random transformers CLIPModel (safetensors) in "
                    "DIR (and its open_clip-layout copy) and write both towers' outputs to --out")
    ap.add_argument("--photos", nargs="*", help="with --model DIR and --out OUTDIR: per-photo preprocessing "
                    "references and the model's image/text features (see photos())")
    ap.add_argument("--model", help="a transformers CLIPModel folder (for --photos)")
    ap.add_argument("--prompts", nargs="*", default=["a photo of a man", "a portrait, studio light"])
    a = ap.parse_args()
    if a.photos:
        # With --text-model too: make the tiny model first (its reference outputs go to
        # OUT/towers.json) and use it (one interpreter start for both).
        if a.text_model:
            text_model(a.text_model, os.path.join(a.out, "towers.json"))
        return photos(a.model or a.text_model, a.photos, a.out, a.prompts)
    if a.text_model:
        return text_model(a.text_model, a.out)
    texts = seed_texts(a.seeds) + generate(a.n, 7)
    ids = open_clip.tokenize(texts).tolist()
    cases = [{"text": t, "ids": row} for t, row in zip(texts, ids)]
    if a.hf_dir:
        from transformers import CLIPTokenizer

        st = open_clip.tokenizer._tokenizer
        files = os.path.join(a.hf_dir, "files")
        os.makedirs(files, exist_ok=True)
        # open_clip's vocab with transformers' special names (same ids 49406 / 49407).
        rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
        vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
        with open(os.path.join(files, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
        with open(os.path.join(files, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a_} {b_}\n" for (a_, b_), _ in merges))
        # transformers 5 ignores vocab_file=/merges_file= keywords; from_pretrained reads the files.
        hf = CLIPTokenizer.from_pretrained(files)
        hf.save_pretrained(os.path.join(a.hf_dir, "saved"))
        hf_ids = hf(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
        for c, row in zip(cases, hf_ids):
            c["hf_ids"] = row
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"open_clip": open_clip.__version__, "cases": cases}, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
