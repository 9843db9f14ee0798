"""Oracle for core/diffusion-torch's Qwen2.5-VL encoder (Qwen-Image-Edit-2509's text encoder):
transformers 5.24's Qwen2_5_VLForConditionalGeneration on the tiny config of
/work/notes/qwen-image.md §5.2 (every parameter perturbed, so an ignored RMSNorm weight shows), an
offline byte-level Qwen2 tokenizer with a few merges and one non-special added token, and
diffusers 0.42.1's QwenImageEditPlusPipeline.encode_prompt built from those parts.

Writes into --out DIR:
  text_encoder/          save_pretrained (transformers 5 names, nested text_config/vision_config)
  legacy/                the same weights under the legacy names (model.layers.*, visual.*, plus
                         lm_head.weight) with a transformers-4.x flat config.json
  processor/             processor.save_pretrained (tokenizer.json + processor_config.json)
  tokenizer_bpe/         the same tokenizer as vocab.json + merges.txt + tokenizer_config.json
  *.f32 + oracle.json    inputs and outputs (shapes, token ids, grids, sizes)

usage: qwen_vl_oracle.py --out DIR
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Merges over the byte alphabet (the merged tokens get ids 256..), so the BPE step is exercised.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("r", "e")]
TEXT_STRINGS = [
    "make it red",
    "Picture 1: <|vision_start|><|image_pad|><|vision_end|>the  cat's in\n\nthere, 12345 héllo wörld <tool_call>!",
    "<|im_start|>system\nDescribe   the\ttabs\r\nand CAPS?<|im_end|>\n<|im_start|>assistant\n",
]
TINY = dict(
    text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
                 "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}},
    vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
                   "fullatt_block_indexes": [1]},
    vocab_size=152064,
)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write(out, meta, name, t):
    t = torch.as_tensor(t).detach().to(torch.float32).contiguous()
    t.numpy().tofile(os.path.join(out, f"{name}.f32"))
    meta[name] = list(t.shape)


def tokenizer_parts(out):
    b2u = bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    for i, (a, b) in enumerate(MERGES):
        vocab[a + b] = 256 + i
    # The added tokens sit in the vocab at their real ids (as in Qwen's tokenizer.json); <tool_call>
    # is a non-special added token (151657).
    full = dict(vocab, **{s: 151643 + i for i, s in enumerate(SPECIALS)}, **{"<tool_call>": 151657})
    tok = Qwen2Tokenizer(vocab=full, merges=MERGES)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True) for s in SPECIALS[1:]]})
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor())
    proc.save_pretrained(os.path.join(out, "processor"))
    # The original Qwen folder layout: no tokenizer.json; the added tokens in tokenizer_config.json.
    bpe = os.path.join(out, "tokenizer_bpe")
    os.makedirs(bpe, exist_ok=True)
    with open(os.path.join(bpe, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(bpe, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    added = {str(tid): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": t.special}
             for tid, t in tok.added_tokens_decoder.items()}
    with open(os.path.join(bpe, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": added, "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer", "errors": "replace",
                   "split_special_tokens": False}, f, indent=1)
    return tok, proc


def tiny_model(out):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out, "text_encoder"))
    legacy = os.path.join(out, "legacy")
    os.makedirs(legacy, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        sd[k] = v.contiguous()
    save_file(sd, os.path.join(legacy, "model.safetensors"))
    # transformers 4.x layout: text keys at the top level, rope_theta + rope_scaling.
    t = dict(TINY["text_config"])
    rope = t.pop("rope_parameters")
    flat = dict(t, vocab_size=152064, rope_theta=rope["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
                vision_config=TINY["vision_config"], model_type="qwen2_5_vl",
                architectures=["Qwen2_5_VLForConditionalGeneration"])
    with open(os.path.join(legacy, "config.json"), "w") as f:
        json.dump(flat, f, indent=1)
    return model


def images(rs):
    def img(h, w):
        return Image.fromarray((rs.rand(h, w, 3) * 255).astype(np.uint8))
    # A: 170×230 → smart_resize 168×224 (grid 12×16: windows of 4×4 merged units, partial ones);
    # B: 100×60 → 112×56. The condition images are at QwenImageEditPlusPipeline's ~384² sizes.
    return img(170, 230), img(100, 60), [img(384, 384), img(320, 448)], [img(448, 320)]


def as_chw(im):
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def edit_plus(out, meta, tok, proc, model, conds):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                     attention_head_dim=16, num_attention_heads=1, joint_attention_dim=16,
                                     axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=model,
                                     tokenizer=tok, processor=proc, transformer=tr)
    prompts = ["make the cat red", "a much longer instruction: swap the two backgrounds, keep faces"]
    meta["prompts"] = prompts + ["text only, no picture"]
    lens = []
    with torch.no_grad():
        for i, (p, ims) in enumerate(zip(prompts + ["text only, no picture"], conds + [None])):
            emb, mask = pipe.encode_prompt(prompt=p, image=ims, device="cpu")
            assert mask is None, "a single prompt's mask is all ones (encode_prompt turns it into None)"
            write(out, meta, f"edit_{i}", emb[0])
            lens.append(emb.shape[1])
        # The batch as _get_qwen_prompt_embeds computes it (the processor pads on the right), with
        # each prompt's own pictures: diffusers shares one image list across a batch, so its own
        # call cannot express this; the steps below are its code with per-prompt prefixes.
        txt = [pipe.prompt_template_encode.format(
            "".join(f"Picture {j + 1}: <|vision_start|><|image_pad|><|vision_end|>" for j in range(len(ims))) + p)
            for p, ims in zip(prompts, conds)]
        inp = proc(text=txt, images=[im for ims in conds for im in ims], padding=True, return_tensors="pt")
        hidden = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                       pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                       output_hidden_states=True).hidden_states[-1]
        write(out, meta, "batch_hidden", hidden)
        write(out, meta, "batch_mask", inp["attention_mask"])
        meta["batch_ids"] = inp["input_ids"].tolist()
        meta["batch_grid"] = inp["image_grid_thw"].tolist()
        split = [e[pipe.prompt_template_encode_start_idx:] for e in pipe._extract_masked_hidden(hidden, inp["attention_mask"])]
        m = max(e.shape[0] for e in split)
        write(out, meta, "batch_embeds", torch.stack([torch.cat([e, e.new_zeros(m - e.shape[0], e.shape[1])]) for e in split]))
        # M-RoPE: the same batch with mm_token_type_ids (what a diffusers carrying the #14189 fix passes).
        mrope = model.model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                            pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                            mm_token_type_ids=inp["mm_token_type_ids"]).last_hidden_state
        write(out, meta, "mrope_hidden", mrope)
    meta["edit_lens"] = lens
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    sizes = [(1024, 768), (768, 1024), (500, 500), (1920, 1080), (333, 1000), (64, 48)]
    meta["condition_sizes"] = [[w, h, *calculate_dimensions(384 * 384, w / h)] for w, h in sizes]
    meta["vae_sizes"] = [[w, h, *calculate_dimensions(1024 * 1024, w / h)] for w, h in sizes]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    meta = {}
    tok, proc = tokenizer_parts(out)
    meta["token_strings"] = TEXT_STRINGS
    meta["token_ids"] = [proc.tokenizer(s)["input_ids"] for s in TEXT_STRINGS]
    # (transformers 5's own vocab.json build renumbers added tokens that are not contiguous with the
    # vocab, as in this tiny one, so the reference for tokenizer_bpe/ is tokenizer.json's ids.)
    model = tiny_model(out)
    rs = np.random.RandomState(0)
    a, b, cond1, cond2 = images(rs)
    write(out, meta, "image_a", as_chw(a))
    write(out, meta, "image_b", as_chw(b))
    for i, im in enumerate(cond1 + cond2):
        write(out, meta, f"cond_{i}", as_chw(im))
    px = proc.image_processor(images=[a, b], return_tensors="pt")
    write(out, meta, "pixel_values", px["pixel_values"])
    meta["grid_thw"] = px["image_grid_thw"].tolist()
    with torch.no_grad():
        feats = model.model.get_image_features(px["pixel_values"], px["image_grid_thw"]).pooler_output
        write(out, meta, "vision_out", torch.cat(feats, 0))
        # Text model alone: two rows, the second padded on the right (the processor's side).
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, 300, (2, 9), generator=g)
        ids[0, 2] = 151644
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        h = model.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
        meta["text_ids"] = ids.tolist()
        write(out, meta, "text_mask", mask)
        write(out, meta, "text_hidden", h)
    edit_plus(out, meta, tok, proc, model, [cond1, cond2])
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
