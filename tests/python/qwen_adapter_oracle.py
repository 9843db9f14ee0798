"""Oracle for plugins/qwen-edit-lora's adapter files (its tests/adapters.rs): loads OUR kohya
file (musubi-tuner's `lora_unet_…` names with an `.alpha` per module), OUR diffusers file and OUR
PEFT folder the way users load them into the tiny QwenImageEditPlusPipeline's transformer — the
pipeline's own `load_lora_weights` for the first two (its `lora_state_dict` converts the kohya
file with `_convert_non_diffusers_qwen_lora_to_diffusers`, then `load_lora_into_transformer`),
peft's `PeftModel.from_pretrained` for the folder — records every warning logged meanwhile
(an unexpected / missing / ignored key is one) and runs the transformer on OUR edit-plus inputs
(the noisy target's tokens then one control's, RoPE frame 1 for the control, the prompt mask
dropped when it is all ones as the pipeline does; the prediction is the target's tokens).

ComfyUI (not installed) is checked with tests/python/qwen_lora_oracle.py's re-implementation of
its key rules (`comfy_check`): every key of the kohya file consumed, ΔW = alpha / r · up @ down
per module equal to OUR ΔW (written by the Rust side from the in-memory LoRA weights, float64),
and the output of the base model with that ΔW merged into its weights (what ComfyUI runs).

usage: qwen_adapter_oracle.py --model DIR --adapters DIR --out DIR
  DIR(adapters)/{kohya/<name>.safetensors, diffusers/, peft/, deltas.safetensors ({module path: f64 ΔW}),
                 inputs/*.f32 + inputs.json (x_t, control, embeds, mask, sigma)}
  writes DIR(out)/{base,kohya,diffusers,peft,comfyui}.f32 (unpacked [B, 16, h, w] velocities) + oracle.json
"""

import argparse
import copy
import glob
import json
import os
import sys
import warnings

import numpy as np
import torch
from diffusers import QwenImageEditPlusPipeline
from peft import PeftModel
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen_lora_oracle import capture, comfy_check, lora_layers, merged, release  # noqa: E402


def load_inputs(d):
    with open(os.path.join(d, "inputs.json")) as f:
        shapes = json.load(f)
    return {k: torch.from_numpy(np.fromfile(os.path.join(d, f"{k}.f32"), dtype=np.float32).reshape(s))
            for k, s in shapes.items()}


def run(transformer, x, factor):
    """QwenImageEditPlusPipeline's transformer call (the denoising loop's) on latents `[B, 16, h, w]`."""
    pack = QwenImageEditPlusPipeline._pack_latents
    z, c = x["x_t"], x["control"]
    (b, ch, h, w), (_, _, hc, wc) = z.shape, c.shape
    hidden = torch.cat([pack(z, b, ch, h, w), pack(c, b, ch, hc, wc)], 1)
    mask = x["mask"].long()
    mask = None if mask.all() else mask  # the pipeline's encode_prompt drops an all-ones mask
    shapes = [[(1, h // 2, w // 2), (1, hc // 2, wc // 2)]] * b
    with torch.no_grad():
        v = transformer(hidden_states=hidden, timestep=x["sigma"], encoder_hidden_states=x["embeds"],
                        encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0]
    v = v[:, : (h // 2) * (w // 2)]
    return QwenImageEditPlusPipeline._unpack_latents(v, h * factor, w * factor, factor)[:, :, 0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    x = load_inputs(os.path.join(a.adapters, "inputs"))
    deltas = load_file(os.path.join(a.adapters, "deltas.safetensors"))
    pipe = QwenImageEditPlusPipeline.from_pretrained(a.model, torch_dtype=torch.float32, local_files_only=True)
    base = pipe.transformer.eval()
    factor = pipe.vae_scale_factor
    report = {}

    def save(name, v, **extra):
        v.contiguous().numpy().astype(np.float32).tofile(os.path.join(a.out, f"{name}.f32"))
        report[name] = {"shape": list(v.shape), **extra}

    def loading(load):
        """Runs `load()` with every logged warning (diffusers, peft, root) and Python warning kept."""
        h = capture()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model = load()
        release(h)
        return model, h.msgs + [str(m.message) for m in w]

    save("base", run(base, x, factor))
    kohya = glob.glob(os.path.join(a.adapters, "kohya", "*.safetensors"))
    assert len(kohya) == 1, kohya
    for name, path in [("kohya", kohya[0]), ("diffusers", os.path.join(a.adapters, "diffusers"))]:
        pipe.transformer = copy.deepcopy(base)

        def load():
            pipe.load_lora_weights(path, adapter_name="ours")
            return pipe.transformer

        model, msgs = loading(load)
        save(name, run(model, x, factor), warnings=msgs, lora_layers=lora_layers(model))
    model, msgs = loading(lambda: PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(a.adapters, "peft")))
    save("peft", run(model, x, factor), warnings=msgs, lora_layers=lora_layers(model))
    report["comfyui_keys"] = comfy_check(kohya[0], base, deltas)
    save("comfyui", run(merged(base, deltas, torch.float32), x, factor))
    with open(os.path.join(a.out, "oracle.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
