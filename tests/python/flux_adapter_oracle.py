"""Oracle for plugins/flux-lora's adapter files: loads OUR kohya file (BFL names, fused qkv /
linear1), OUR diffusers file and OUR PEFT folder the way users load them — FluxPipeline
.load_lora_weights for the first two (diffusers converts the kohya file itself), peft's
PeftModel.from_pretrained for the folder — into the tiny FluxPipeline's transformer (diffusers'
kohya converter recompiled with the tiny widths, see convert_kohya_at_tiny_size), refuses any
warning about unexpected / missing / ignored keys, and runs the transformer on OUR inputs.

usage: flux_adapter_oracle.py --model DIR --adapters DIR --out DIR
  DIR(adapters)/{kohya/<name>.safetensors, diffusers/, peft/, inputs/*.f32 + inputs.json}
  writes DIR(out)/{base,kohya,diffusers,peft}.f32 (unpacked [B, C, h, w] velocities) + oracle.json
"""

import argparse
import glob
import json
import logging
import os

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.utils import logging as dlogging


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        m = record.getMessage()
        # diffusers' note that a transformer-only LoRA has no text-encoder keys: that is the file.
        if not m.startswith("No LoRA keys associated to CLIPTextModel"):
            self.messages.append(m)


def load_inputs(d):
    with open(os.path.join(d, "inputs.json")) as f:
        shapes = json.load(f)
    return {k: torch.from_numpy(np.fromfile(os.path.join(d, f"{k}.f32"), dtype=np.float32).reshape(s))
            for k, s in shapes.items()}


def run(transformer, x):
    b, c, h, w = x["x_t"].shape
    packed = FluxPipeline._pack_latents(x["x_t"], b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(x["t5"].shape[1], 3)
    with torch.no_grad():
        v = transformer(hidden_states=packed, encoder_hidden_states=x["t5"], pooled_projections=x["pooled"],
                        timestep=x["t"] / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=x["guidance"],
                        return_dict=False)[0]
    return FluxPipeline._unpack_latents(v, h * 2, w * 2, 2)  # the tiny VAE's factor 2


def convert_kohya_at_tiny_size(inner_dim):
    """diffusers' kohya→diffusers Flux converter (`_convert_kohya_flux_lora_to_diffusers`) hard-codes
    FLUX.1's widths for splitting `linear1` (`dims=[3072, 3072, 3072, 12288]`); its block loops skip
    absent blocks. To run diffusers' own converter on the tiny model, its source is recompiled with
    the tiny model's widths in that one literal; everything else — the key rules, the alpha
    folding, the sparse-split detection and the final "state_dict should be empty" check (every
    key consumed) — stays diffusers' code."""
    import inspect

    from diffusers.loaders import lora_conversion_utils as lcu
    from diffusers.loaders import lora_pipeline

    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    real = "dims=[3072, 3072, 3072, 12288]"
    assert src.count(real) == 1, "diffusers' converter changed: update convert_kohya_at_tiny_size"
    d = inner_dim
    src = src.replace(real, f"dims=[{d}, {d}, {d}, {4 * d}]")
    exec(compile(src, lcu.__file__, "exec"), lcu.__dict__)
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = lcu._convert_kohya_flux_lora_to_diffusers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cap = Captured()
    for name in ("diffusers", "peft", "transformers"):
        logging.getLogger(name).addHandler(cap)
    dlogging.set_verbosity_warning()
    x = load_inputs(os.path.join(a.adapters, "inputs"))
    report = {}

    def fresh():
        return FluxPipeline.from_pretrained(a.model, dtype=torch.float32, local_files_only=True)

    def save(name, v):
        v.contiguous().numpy().astype(np.float32).tofile(os.path.join(a.out, f"{name}.f32"))
        report[name] = {"shape": list(v.shape), "warnings": list(cap.messages)}
        cap.messages.clear()

    pipe = fresh()
    save("base", run(pipe.transformer, x))
    tc = pipe.transformer.config
    # ComfyUI's key rule for Flux (comfy/lora.py model_lora_keys_unet, see
    # ../shared/reference/lora-formats.md): `lora_unet_<BFL weight path with _>` for every
    # `diffusion_model.<path>.weight` of the BFL model. The BFL names are flux_oracle.py's
    # diffusers_to_bfl, checked here by diffusers' own single-file converter.
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from flux_oracle import check_bfl, diffusers_to_bfl
    from safetensors import safe_open

    sd = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    bfl = diffusers_to_bfl(sd, tc.num_layers, tc.num_single_layers)
    check_bfl(bfl, sd, tc.num_attention_heads * tc.attention_head_dim)
    comfy = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in bfl if k.endswith(".weight")}
    kohya_file = glob.glob(os.path.join(a.adapters, "kohya", "*.safetensors"))[0]
    with safe_open(kohya_file, "pt") as f:
        stems = {k.split(".", 1)[0] for k in f.keys()}
    report["comfyui"] = {"stems": len(stems), "unmapped": sorted(stems - comfy)}
    convert_kohya_at_tiny_size(tc.num_attention_heads * tc.attention_head_dim)
    kohya = glob.glob(os.path.join(a.adapters, "kohya", "*.safetensors"))
    assert len(kohya) == 1, kohya
    for name, path in [("kohya", kohya[0]), ("diffusers", os.path.join(a.adapters, "diffusers"))]:
        pipe = fresh()
        cap.messages.clear()
        pipe.load_lora_weights(path, adapter_name="ours")
        n = sum(1 for _, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A)
        save(name, run(pipe.transformer, x))
        report[name]["lora_layers"] = n
    from peft import PeftModel

    pipe = fresh()
    cap.messages.clear()
    model = PeftModel.from_pretrained(pipe.transformer, os.path.join(a.adapters, "peft"))
    n = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    save("peft", run(model, x))
    report["peft"]["lora_layers"] = n
    with open(os.path.join(a.out, "oracle.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
