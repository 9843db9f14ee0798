#!/usr/bin/env python3
"""Reference token ids of open_clip_torch 3.3.0 for core/clip's tokenizer test.

Texts: every line and every quoted string of /work/shared/seeds/*.txt (or --seeds), plus
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
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            content = f.read()
        texts += [line for line in content.split("\n") if line.strip()]
        texts += re.findall(r'"([^"\n]{1,400})"', content)
        texts += re.findall(r"'([^'\n]{1,400})'", content)
    return texts


def text_model(out_dir, out):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    prompts = ["a photo of a person in paris", "sks man, portrait", "x " * 100]
    ids = open_clip.tokenize(prompts)
    eot = ids.argmax(dim=-1)
    m64 = model.double()
    with torch.no_grad():
        t = m64.text_model(input_ids=ids, output_hidden_states=True)
        pooled = t.last_hidden_state[torch.arange(ids.shape[0]), eot]
        emb = m64.text_projection(pooled)
    res = {
        "ids": ids.tolist(), "eot": eot.tolist(), "layers": 2, "heads": 4,
        "last_hidden_state": t.last_hidden_state.flatten().tolist(),
        "penultimate": t.hidden_states[-2].flatten().tolist(),
        "text_embeds": emb.flatten().tolist(),
    }
    # The same text weights in open_clip's layout, checked through open_clip's own CLIP class.
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    sd = {k: v.float() for k, v in model.state_dict().items()}
    oc = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": sd["text_model.final_layer_norm.weight"],
          "ln_final.bias": sd["text_model.final_layer_norm.bias"],
          "text_projection": sd["text_projection.weight"].t().contiguous()}
    for i in range(2):
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for wb in ("weight", "bias"):
            oc[o + "attn.in_proj_" + wb] = torch.cat([sd[h + f"self_attn.{p}_proj.{wb}"] for p in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                oc[o + a + "." + wb] = sd[h + b + "." + wb]
    ocm = CLIP(16, CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
               CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2, mlp_ratio=2.0), quick_gelu=True)
    missing, unexpected = ocm.load_state_dict(oc, strict=False)
    assert not unexpected and all(k.startswith("visual.") or k == "logit_scale" for k in missing), (missing, unexpected)
    with torch.no_grad():
        oc_emb = ocm.double().eval().encode_text(ids)
    assert (oc_emb - emb).abs().max() < 1e-9, "open_clip layout conversion is wrong"
    save_file(oc, os.path.join(out_dir, "open_clip.safetensors"))
    with open(out, "w") as f:
        json.dump(res, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="/work/shared/seeds/*.txt")
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--hf-dir", help="also write a transformers tokenizer folder built from the same vocab "
                    "(vocab.json + merges.txt in DIR/files, save_pretrained in DIR/saved) and its ids")
    ap.add_argument("--text-model", help="instead: save a tiny random transformers CLIPModel (safetensors) in "
                    "DIR and write its text outputs in float64 for three prompts to --out")
    a = ap.parse_args()
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
