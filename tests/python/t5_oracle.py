"""Oracle for core/diffusion-torch's T5 encoder (src/t5.rs): tiny random transformers 5.24
T5EncoderModel configs saved with save_pretrained (safetensors), their last_hidden_state for
fixed input ids (with and without an attention mask), transformers' relative position buckets at
Flux's length (512 tokens, the default 32 buckets / 128 distance), and the name -> shape table of
google/t5-v1_1-xxl's encoder built on the meta device (no weights).

usage: t5_oracle.py --out DIR   (writes DIR/<name>/{config.json,model.safetensors}, DIR/*.f32, DIR/oracle.json)
"""

import argparse
import json
import os

import torch
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

# Gated-gelu (t5-v1_1 / Flux style), with few buckets and a short max distance so that the
# 24-token inputs reach the logarithmic buckets and the clamp at max_distance.
GATED = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
             relative_attention_num_buckets=8, relative_attention_max_distance=20,
             feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1)
# The original T5's relu feed-forward (one `wi`), default buckets, and heads · d_kv = 24 ≠ d_model.
RELU = dict(GATED, feed_forward_proj="relu", d_kv=6, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, num_layers=3, layer_norm_epsilon=1e-5)
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
           relative_attention_num_buckets=32, relative_attention_max_distance=128,
           feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)


def dump(out, meta, name, t):
    t = t.detach().to(torch.float32).contiguous()
    with open(os.path.join(out, name + ".f32"), "wb") as f:
        f.write(t.numpy().tobytes())
    meta[name] = list(t.shape)


def perturb(model, seed):
    # The layer norms start at 1: move every weight so that a swapped or ignored tensor shows.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    meta = {"transformers": __import__("transformers").__version__}
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 24), generator=g)
    # Second prompt: 15 tokens then padding (id 0), as a tokenizer pads.
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    ids[1, 15:] = 0
    dump(out, meta, "ids", ids)
    dump(out, meta, "mask", mask)
    for i, (name, cfg) in enumerate([("gated", GATED), ("relu", RELU)]):
        model = T5EncoderModel(T5Config(**cfg)).eval()
        perturb(model, 10 + i)
        model.save_pretrained(os.path.join(out, name), safe_serialization=True)
        meta[name + "_attn"] = model.config._attn_implementation
        with torch.no_grad():
            dump(out, meta, name + "_out", model(input_ids=ids).last_hidden_state)
            dump(out, meta, name + "_masked", model(input_ids=ids, attention_mask=mask).last_hidden_state)
            # The eager path too: sdpa and eager must agree for the comparison to be about T5.
            model.config._attn_implementation = "eager"
            dump(out, meta, name + "_eager", model(input_ids=ids, attention_mask=mask).last_hidden_state)
    rel = torch.arange(512)[None, :] - torch.arange(512)[:, None]
    buckets = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    dump(out, meta, "buckets_512", buckets)
    xxl_cfg = T5Config(**XXL)
    os.makedirs(os.path.join(out, "xxl"), exist_ok=True)
    xxl_cfg.to_json_file(os.path.join(out, "xxl", "config.json"))
    with torch.device("meta"):
        xxl = T5EncoderModel(xxl_cfg)
    meta["xxl_shapes"] = {n: list(t.shape) for n, t in xxl.state_dict().items()}
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
