"""Oracle for core/diffusion's Qwen-Image LoRA key maps (likeness_diffusion::lora_keys), run through
$LIKENESS_PYTHON by core/diffusion/tests/lora_qwen_oracle.rs.

gen --out DIR
    A tiny random QwenImageTransformer2DModel (diffusers 0.42.1; every parameter perturbed so an ignored
    or swapped LoRA shows), saved to DIR/base/, fixed inputs DIR/inputs.safetensors, and
    DIR/linears.json {module path: [out, in]} of every nn.Linear of the model (the Rust side puts a LoRA
    on each: musubi's 14 per block + the 6 top-level ones). Prints a JSON summary.

check --dir DIR
    Needs what the Rust test wrote through lora_keys::write: ours_kohya.safetensors, ours_comfyui.safetensors,
    ours_diffusers/, ours_peft/, and ref_deltas.safetensors ({path: float64 ΔW = alpha/r · up @ down}).
    (a) diffusers: each of the kohya, comfyui and diffusers files through QwenImagePipeline.lora_state_dict
        (its converter `_convert_non_diffusers_qwen_lora_to_diffusers` for the kohya / comfy names) and
        QwenImagePipeline.load_lora_into_transformer into the base model: LoRA layers made, warnings logged
        (unexpected / missing keys), max |output − reference|;
    (b) the reference: the base weights with ΔW merged by hand, forward in float64 (exact to ~1e-15 here).
        Tolerance: an f32 forward of the LoRA model and an f32 forward of the merged model round the same
        graph; the LoRA adds per Linear two products of inner size r and in (≤ the base product's size),
        so its f32 error is at most a few times the merged model's. We measure the merged model's f32
        error e = max|merged_f32 − merged_f64| on the same inputs and allow 8·e, floored at
        2⁻²⁰·max|out| (in case e happens to be tiny). The LoRA's own effect must exceed 100× that;
    (c) peft: PeftModel.from_pretrained(base, ours_peft): same checks;
    (d) ComfyUI (not installed here, so its rules are re-implemented below from comfyanonymous/ComfyUI
        master): every key of the comfyui (and kohya) file must be consumed by the key map of
        comfy/lora.py `model_lora_keys_unet` (the generic `diffusion_model.` loop at its top and the
        `isinstance(model, comfy.model_base.QwenImage)` branch at its end; cited by function and branch,
        not line, because ComfyUI moves them often: read from the code search's copy, 2026-12)
        with the suffixes of comfy/weight_adapter/lora.py `LoRAAdapter.load` and the `.alpha` of
        comfy/lora.py `load_lora`; ComfyUI's Qwen model (comfy/ldm/qwen_image/model.py) names its
        parameters as diffusers does. ΔW = alpha / up.shape[1] · up @ down (comfy's `calculate_weight`)
        per target weight, compared with the reference in float64 (bound 1e-12 · max|ΔW|: both sides
        sum the same f32 products in float64).
"""

import argparse
import copy
import json
import logging
import os
import sys

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

TINY = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=16,
    axes_dims_rope=(8, 4, 4),
)
IMG_SHAPES = [(1, 2, 3)]  # (frames, h, w) in packed tokens
S_TXT = 5


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


def capture():
    h = Captured()
    for name in ("diffusers", "peft", ""):
        logging.getLogger(name).addHandler(h)
    return h


def release(h):
    for name in ("diffusers", "peft", ""):
        logging.getLogger(name).removeHandler(h)


def forward(model, x):
    p = next(model.parameters())
    with torch.no_grad():
        return model(
            hidden_states=x["hidden"].to(p.dtype),
            encoder_hidden_states=x["ctx"].to(p.dtype),
            encoder_hidden_states_mask=x["mask"],
            timestep=x["timestep"].to(p.dtype),
            img_shapes=[IMG_SHAPES],
            return_dict=False,
        )[0]


def gen(out):
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    s_img = sum(f * h * w for f, h, w in IMG_SHAPES)
    x = {
        "hidden": torch.randn(1, s_img, TINY["in_channels"], generator=g),
        "ctx": torch.randn(1, S_TXT, TINY["joint_attention_dim"], generator=g),
        "mask": torch.ones(1, S_TXT, dtype=torch.long),
        "timestep": torch.tensor([0.7]),
    }
    save_file(x, os.path.join(out, "inputs.safetensors"))
    linears = {n: list(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with open(os.path.join(out, "linears.json"), "w") as f:
        json.dump(linears, f)
    return {"linears": len(linears)}


def lora_layers(model):
    return sum(1 for _, m in model.named_modules() if isinstance(m, LoraLayer) and len(m.lora_A) > 0)


def merged(base, deltas, dtype):
    """The base model with ΔW added to each weight in float64, then cast to `dtype`."""
    m = copy.deepcopy(base).to(torch.float64)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for path, d in deltas.items():
            mods[path].weight.add_(d)
    return m.to(dtype).eval()


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def comfy_key_map(model_keys):
    """comfy/lora.py model_lora_keys_unet for a QwenImage model: LoRA stem → model weight key."""
    key_map = {}
    for k in model_keys:  # the generic loop at the top of model_lora_keys_unet
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map["lora_unet_{}".format(key_lora)] = k
                key_map["{}".format(k[:-len(".weight")])] = k
            else:
                key_map["{}".format(k)] = k
    # comfy.utils.unet_to_diffusers returns {} for a config without num_res_blocks (any DiT).
    for k in model_keys:  # the `isinstance(model, comfy.model_base.QwenImage)` branch
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model."):-len(".weight")]
            key_map["{}".format(key_lora)] = k
            key_map["transformer.{}".format(key_lora)] = k
            key_map["lycoris_{}".format(key_lora.replace(".", "_"))] = k
    return key_map


# comfy/weight_adapter/lora.py LoRAAdapter.load: (up name, down name), first match wins.
COMFY_PAIRS = [
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
]


def comfy_check(file, model, deltas):
    lora = load_file(file)
    sd = model.state_dict()
    key_map = comfy_key_map(["diffusion_model." + k for k in sd])
    loaded, patches = set(), {}
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:  # comfy/lora.py load_lora
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in COMFY_PAIRS:
            if f"{x}{up}" in lora:
                u, d = lora[f"{x}{up}"], lora[f"{x}{down}"]
                loaded.update([f"{x}{up}", f"{x}{down}"])
                # calculate_weight, "lora": alpha / mat2.shape[0] (down's rank), 1.0 without alpha.
                s = alpha / d.shape[0] if alpha is not None else 1.0
                patches[target[len("diffusion_model."):-len(".weight")]] = s * (u.double() @ d.double())
                break
    report = {"keys": len(lora), "not_loaded": sorted(set(lora) - loaded), "shape_mismatch": [],
              "unpatched": sorted(set(deltas) - set(patches)), "extra": sorted(set(patches) - set(deltas)),
              "max_ratio": 0.0}
    for p, dw in patches.items():
        if tuple(dw.shape) != tuple(sd[p + ".weight"].shape):
            report["shape_mismatch"].append(p)
        elif p in deltas:
            bound = 1e-12 * deltas[p].abs().max().item() + 1e-300
            report["max_ratio"] = max(report["max_ratio"], max_diff(dw, deltas[p]) / bound)
    return report


def check(d):
    x = load_file(os.path.join(d, "inputs.safetensors"))
    deltas = load_file(os.path.join(d, "ref_deltas.safetensors"))
    base = QwenImageTransformer2DModel.from_pretrained(os.path.join(d, "base")).eval()
    ref64 = forward(merged(base, deltas, torch.float64), x)
    out32 = forward(merged(base, deltas, torch.float32), x)
    e_merged = max_diff(out32, ref64)
    tol = max(8.0 * e_merged, 2.0 ** -20 * ref64.abs().max().item())
    res = {"tol": tol, "e_merged_f32": e_merged, "lora_effect": max_diff(forward(base.double(), x), ref64),
           "modules": len(deltas)}
    base = QwenImageTransformer2DModel.from_pretrained(os.path.join(d, "base")).eval()
    for name in ("kohya", "comfyui", "diffusers"):
        path = os.path.join(d, f"ours_{name}" + ("" if name == "diffusers" else ".safetensors"))
        model = copy.deepcopy(base)
        h = capture()
        sd, meta = QwenImagePipeline.lora_state_dict(path, return_lora_metadata=True)
        n_keys = len(sd)
        QwenImagePipeline.load_lora_into_transformer(sd, transformer=model, metadata=meta)
        release(h)
        res[f"diffusers_{name}"] = {"keys": n_keys, "layers": lora_layers(model), "warnings": h.msgs,
                                    "max_abs_diff": max_diff(forward(model, x), ref64)}
    h = capture()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(d, "ours_peft")).eval()
    release(h)
    res["peft"] = {"layers": lora_layers(pm), "warnings": h.msgs, "max_abs_diff": max_diff(forward(pm, x), ref64)}
    for name in ("comfyui", "kohya"):
        res[f"comfy_{name}"] = comfy_check(os.path.join(d, f"ours_{name}.safetensors"), base, deltas)
    return res


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("gen").add_argument("--out", required=True)
    sub.add_parser("check").add_argument("--dir", required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    res = gen(a.out) if a.cmd == "gen" else check(a.dir)
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
