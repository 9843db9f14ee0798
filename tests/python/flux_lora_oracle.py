"""Oracle for core/diffusion's Flux LoRA key maps (likeness_diffusion::lora_keys), run through $LIKENESS_PYTHON
by core/diffusion/tests/lora_flux_oracle.rs.

gen --out DIR
    A tiny random FluxTransformer2DModel (guidance embedding on) with a peft LoRA on every nn.Linear
    (r 4 / alpha 8; rank_pattern context_embedder: 2, alpha_pattern norm_out.linear: 3), random non-zero
    lora_A / lora_B. Written the ways diffusers and peft write them:
      ref_diffusers/pytorch_lora_weights.safetensors   FluxPipeline.save_lora_weights (+ lora_adapter_metadata)
      ref_peft/                                        peft save_pretrained (base_model.model. keys)
    plus ref_deltas.safetensors ("transformer:<path>" → scale·B@A in float64 from the stored tensors),
    base/ (the base transformer, save_pretrained), inputs.safetensors and ref_out.safetensors (the LoRA
    model's output on fixed inputs). Prints a JSON summary.

check-tiny --dir DIR
    Loads our DIR/ours_diffusers/ into the base transformer the way FluxPipeline.load_lora_weights does
    (FluxPipeline.lora_state_dict + load_lora_into_transformer) and our DIR/ours_peft/ with
    PeftModel.from_pretrained; prints per file the LoRA layers injected, the warnings logged (unexpected /
    missing keys) and max |output − reference output|.

check-kohya --kohya FILE --ours FILE
    Converts OUR kohya (BFL-named, fused qkv / linear1) file with diffusers' own loader
    (FluxPipeline.lora_state_dict → _convert_kohya_flux_lora_to_diffusers) and compares, module by module,
    ΔW = B@A (alpha already folded by both sides) with OUR conversion of the same file (--ours, a diffusers
    file we wrote from our read of it). Bound per element: each side rounds its folded scale once in fp32
    (diffusers: lora_A·scale_down, ours: lora_B·alpha/r), so |ΔW_ours − ΔW_diffusers| ≤ 2·2⁻²⁴·Σₖ|Bₒₖ·Aₖᵢ|
    (+ float64 accumulation, ≤ 1e-12 relative here). Prints per-module max |diff| / bound and the warnings.
"""

import argparse
import copy
import json
import logging
import os
import sys

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

# The same shape rules as the real model, at tiny size (hidden 32, mlp 128).
TINY = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    axes_dims_rope=[4, 6, 6],
    guidance_embeds=True,
)


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


def inputs(g):
    n_img, n_txt = 12, 5
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(n_img) // 4
    img_ids[:, 2] = torch.arange(n_img) % 4
    return dict(
        hidden_states=torch.randn(1, n_img, TINY["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, TINY["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, TINY["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=img_ids,
        txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.tensor([3.5]),
    )


def forward(model, x):
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def lora_layers(model):
    """The LoRA layers holding an adapter (peft names it `default`, diffusers' loader `default_0`)."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and len(m.lora_A) > 0:
            yield name.removeprefix("base_model.model."), m


def gen(out):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = FluxTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    base.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    linears = sorted(n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear))
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=linears,
        rank_pattern={"context_embedder": 2},
        alpha_pattern={"norm_out.linear": 3},
    )
    model = copy.deepcopy(base)
    model.add_adapter(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    x = inputs(g)
    save_file({k: v.contiguous() for k, v in x.items()}, os.path.join(out, "inputs.safetensors"))
    save_file({"out": forward(model.eval(), x).contiguous(), "base": forward(base, x).contiguous()},
              os.path.join(out, "ref_out.safetensors"))
    deltas = {}
    for path, m in lora_layers(model):
        a, b = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
        deltas[f"transformer:{path}"] = m.scaling["default"] * (b.double() @ a.double())
    save_file(deltas, os.path.join(out, "ref_deltas.safetensors"))
    sd = get_peft_model_state_dict(model)
    FluxPipeline.save_lora_weights(
        os.path.join(out, "ref_diffusers"),
        transformer_lora_layers=sd,
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    pm = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in sd.items()})
    assert not res.unexpected_keys, res.unexpected_keys
    pm.save_pretrained(os.path.join(out, "ref_peft"))
    return {"linears": len(linears), "lora_modules": len(deltas), "diffusers_keys": len(sd)}


def max_diff(a, b):
    return (a - b).abs().max().item()


def check_tiny(d):
    x = load_file(os.path.join(d, "inputs.safetensors"))
    ref = load_file(os.path.join(d, "ref_out.safetensors"))
    res = {}
    # diffusers: what FluxPipeline.load_lora_weights(dir) does to the transformer.
    model = FluxTransformer2DModel.from_pretrained(os.path.join(d, "base")).eval()
    h = capture()
    sd, alphas, meta = FluxPipeline.lora_state_dict(
        os.path.join(d, "ours_diffusers"), return_alphas=True, return_lora_metadata=True
    )
    n_keys = len(sd)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=model, metadata=meta)
    release(h)
    res["diffusers"] = {
        "keys": n_keys,
        "layers": sum(1 for _ in lora_layers(model)),
        "warnings": h.msgs,
        "max_abs_diff": max_diff(forward(model, x), ref["out"]),
        "lora_effect": max_diff(ref["out"], ref["base"]),
    }
    # peft: our PEFT folder on the base transformer.
    base = FluxTransformer2DModel.from_pretrained(os.path.join(d, "base")).eval()
    h = capture()
    pm = PeftModel.from_pretrained(base, os.path.join(d, "ours_peft")).eval()
    release(h)
    res["peft"] = {
        "layers": sum(1 for _ in lora_layers(pm)),
        "warnings": h.msgs,
        "max_abs_diff": max_diff(forward(pm, x), ref["out"]),
    }
    return res


def modules_of(sd):
    """{module path: (A, B)} from a diffusers-layout state dict (prefix `transformer.` dropped)."""
    out = {}
    for k, v in sd.items():
        for role in ("lora_A", "lora_B"):
            suffix = f".{role}.weight"
            if k.endswith(suffix):
                path = k[: -len(suffix)].removeprefix("transformer.")
                out.setdefault(path, {})[role] = v
    return {p: (t["lora_A"], t["lora_B"]) for p, t in out.items()}


def check_kohya(kohya, ours):
    h = capture()
    theirs = FluxPipeline.lora_state_dict(kohya)
    release(h)
    raw_keys = len(load_file(kohya))
    t = modules_of(theirs)
    o = modules_of(load_file(ours))
    report = {"kohya_keys": raw_keys, "diffusers_modules": len(t), "ours_modules": len(o), "warnings": h.msgs,
              "only_diffusers": sorted(set(t) - set(o)), "only_ours": sorted(set(o) - set(t)), "modules": {}}
    eps = 2.0 * 2.0 ** -24
    for p in sorted(set(t) & set(o)):
        (ta, tb), (oa, ob) = t[p], o[p]
        worst_diff = worst_ratio = biggest = 0.0
        # Row blocks: a 12288 × 3072 ΔW in float64 is 300 MB.
        for r0 in range(0, tb.shape[0], 2048):
            dt = tb[r0:r0 + 2048].double() @ ta.double()
            diff = (ob[r0:r0 + 2048].double() @ oa.double()).sub_(dt).abs_()
            biggest = max(biggest, dt.abs_().max().item())
            m = diff.max().item()
            if m > 0.0:  # the bound only where the two differ at all (saves 300 MB passes)
                absum = ob[r0:r0 + 2048].double().abs() @ oa.double().abs()
                bound = absum.mul_(eps + 1e-12).add_(1e-300)
                worst_ratio = max(worst_ratio, diff.div_(bound).max().item())
            worst_diff = max(worst_diff, m)
        report["modules"][p] = {
            "rank_diffusers": ta.shape[0],
            "rank_ours": oa.shape[0],
            "max_abs_diff": worst_diff,
            "max_ratio": worst_ratio,
            "max_abs_delta": biggest,
        }
    # Modules only diffusers made (a fused part we leave out because its rows are all zero).
    report["only_diffusers_max_abs_delta"] = max(
        [(t[p][1].double() @ t[p][0].double()).abs().max().item() for p in report["only_diffusers"]] or [0.0]
    )
    return report


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--out", required=True)
    c = sub.add_parser("check-tiny")
    c.add_argument("--dir", required=True)
    k = sub.add_parser("check-kohya")
    k.add_argument("--kohya", required=True)
    k.add_argument("--ours", required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.cmd == "gen":
        res = gen(a.out)
    elif a.cmd == "check-tiny":
        res = check_tiny(a.dir)
    else:
        res = check_kohya(a.kohya, a.ours)
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
