"""Oracle for core/diffusion's LoRA key maps (likeness_diffusion::lora_keys), run through $LIKENESS_PYTHON
by core/diffusion/tests/lora_oracle.rs.

gen --out DIR
    A tiny SD1.5-shaped UNet2DConditionModel (tests/python/unet_oracle.py's config) and a tiny CLIPTextModel,
    each with a peft LoRA with random non-zero lora_B (UNet: to_q/k/v/out.0 at r 4 / alpha 8 and one LoCon
    conv at r 2 / alpha 3, exercising rank_pattern/alpha_pattern; text encoder: q/k/v/out_proj at r 4 /
    alpha 2). Written the ways other tools write them:
      ref_diffusers/pytorch_lora_weights.safetensors   diffusers save_lora_weights (+ lora_adapter_metadata)
      ref_peft_unet/, ref_peft_te/                      peft save_pretrained
      ref_kohya.safetensors                             sd-scripts key scheme (lora_unet_<path>, 0-d alpha)
      ref_kohya_ldm.safetensors                         same, original-LDM module names (lora_unet_input_blocks_…)
      ref_kohya_fp16.safetensors                        same as ref_kohya in float16 (sd-scripts' usual save)
    plus deltas.safetensors (per module scale·B@A in float64, from the exact stored tensors), the base
    weights, the reference outputs for fixed inputs, and sd15_ldm.json: the LDM name of every Linear/Conv
    weight of the real SD1.5 UNet (built on the meta device), checked by diffusers' own
    convert_ldm_unet_checkpoint. Prints a JSON summary.

check --dir DIR
    Loads our files DIR/ours_{kohya,comfyui}.safetensors, DIR/ours_diffusers/, DIR/ours_peft/ with the real
    loaders and prints, per file, the warnings about unexpected/missing keys, the number of LoRA parameters
    that ended up in the model, and the max |output − reference output| of UNet and text encoder. Also the
    measured trap: diffusers load_lora_weights(peft's own folder) — how much it changes the output; and
    diffusers' own file loaded with and without its lora_adapter_metadata (why we fold alpha into lora_B).
"""

import argparse
import contextlib
import copy
import json
import logging
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_oracle import UNET, perturb, unet_to_ldm  # noqa: E402  (the shared tiny config and LDM map)

TE = CLIPTextConfig(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
    max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
UNET_LORA = LoraConfig(
    r=4, lora_alpha=8, init_lora_weights=True,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "down_blocks.0.resnets.0.conv1"],
    rank_pattern={"down_blocks.0.resnets.0.conv1": 2}, alpha_pattern={"down_blocks.0.resnets.0.conv1": 3},
)
TE_LORA = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
# ComfyUI's LORA_CLIP_MAP (comfy/lora.py): the text-encoder modules it maps from lora_te_ names.
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


class Pipe(StableDiffusionLoraLoaderMixin):
    """The two models StableDiffusionPipeline.load_lora_weights touches, without VAE/tokenizer/scheduler."""

    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet = unet
        self.text_encoder = text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def inputs():
    g = torch.Generator().manual_seed(11)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 731.0])
    ctx = torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 1000, (2, 9), generator=g)
    return sample, t, ctx, ids


def outputs(unet, te):
    sample, t, ctx, ids = inputs()
    with torch.no_grad():
        return unet(sample, t, ctx).sample, te(ids).last_hidden_state


def base_models(d):
    unet = UNet2DConditionModel(**UNET).eval()
    unet.load_state_dict(load_file(os.path.join(d, "base_unet.safetensors")))
    te = CLIPTextModel(TE).eval()
    te.load_state_dict(load_file(os.path.join(d, "base_te.safetensors")))
    return unet, te


def lora_layers(model):
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            yield name.removeprefix("base_model.model."), m


def randomize_lora(model, seed):
    # peft initialises lora_B to zero (no effect); random A and B make every module count.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def kohya_state(modules, ldm_names=None, dtype=torch.float32):
    """sd-scripts' networks/lora.py names: lora_unet_/lora_te_ + module path with '_', lora_down/lora_up,
    and alpha as a 0-d tensor converted to the save dtype with the weights."""
    sd = {}
    for comp, path, a, b, alpha in modules:
        p = ldm_names[path] if (ldm_names and comp == "unet") else path
        stem = ("lora_unet_" if comp == "unet" else "lora_te_") + p.replace(".", "_")
        sd[stem + ".lora_down.weight"] = a.to(dtype).contiguous()
        sd[stem + ".lora_up.weight"] = b.to(dtype).contiguous()
        sd[stem + ".alpha"] = torch.tensor(float(alpha)).to(dtype)
    return sd


def gen(out):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    perturb(unet, 21)
    te = CLIPTextModel(TE).eval()
    perturb(te, 22)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, os.path.join(out, "base_unet.safetensors"))
    save_file({k: v.contiguous() for k, v in te.state_dict().items()}, os.path.join(out, "base_te.safetensors"))
    base_u, base_t = outputs(unet, te)

    lunet = copy.deepcopy(unet)
    lunet.add_adapter(copy.deepcopy(UNET_LORA))
    randomize_lora(lunet, 23)
    # transformers 5.24's add_adapter wants peft >= 0.22; peft's own injection is what it calls.
    lte = inject_adapter_in_model(copy.deepcopy(TE_LORA), copy.deepcopy(te))
    randomize_lora(lte, 24)
    ref_u, ref_t = outputs(lunet, lte)
    save_file({"unet": ref_u.contiguous(), "text_encoder": ref_t.contiguous(), "base_unet": base_u.contiguous(),
               "base_text_encoder": base_t.contiguous()}, os.path.join(out, "outputs.safetensors"))

    modules, deltas, deltas16 = [], {}, {}
    for comp, model in (("unet", lunet), ("text_encoder", lte)):
        for path, m in lora_layers(model):
            # Canonical text-encoder paths keep SD1.5's `text_model.` level (sd-scripts' and
            # ComfyUI's lora_te_text_model_… names); transformers 5's CLIPTextModel dropped it.
            if comp == "text_encoder":
                path = "text_model." + path
            a, b = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
            s = m.scaling["default"]
            alpha = s * a.shape[0]
            modules.append((comp, path, a, b, alpha))
            deltas[f"{comp}:{path}"] = s * (b.double().flatten(1) @ a.double().flatten(1))
            deltas16[f"{comp}:{path}"] = s * (b.half().double().flatten(1) @ a.half().double().flatten(1))
    save_file(deltas, os.path.join(out, "deltas.safetensors"))
    save_file(deltas16, os.path.join(out, "deltas_fp16.safetensors"))

    # diffusers' own file, with the LoraConfig in lora_adapter_metadata (alpha != r needs it).
    Pipe.save_lora_weights(
        os.path.join(out, "ref_diffusers"),
        unet_lora_layers=get_peft_model_state_dict(lunet),
        text_encoder_lora_layers=get_peft_model_state_dict(lte),
        unet_lora_adapter_metadata=lunet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=TE_LORA.to_dict(),
    )
    # peft's own folders: one per model (a PEFT adapter wraps one model).
    for name, base, cfg, src in (("ref_peft_unet", unet, UNET_LORA, lunet), ("ref_peft_te", te, TE_LORA, lte)):
        pm = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
        sd = {"base_model.model." + k: v for k, v in get_peft_model_state_dict(src).items()}
        res = set_peft_model_state_dict(pm, sd)
        assert not res.unexpected_keys, res.unexpected_keys
        pm.save_pretrained(os.path.join(out, name))

    ldm = {}
    for comp, path, *_ in modules:
        if comp == "unet":
            k = unet_to_ldm({path + ".weight": None}, dict(unet.config))
            ldm[path] = next(iter(k)).removeprefix("model.diffusion_model.").removesuffix(".weight")
    save_file(kohya_state(modules), os.path.join(out, "ref_kohya.safetensors"))
    save_file(kohya_state(modules, ldm), os.path.join(out, "ref_kohya_ldm.safetensors"))
    save_file(kohya_state(modules, dtype=torch.float16), os.path.join(out, "ref_kohya_fp16.safetensors"))

    # The real SD1.5 UNet on the meta device (no memory): LDM names of every Linear/Conv weight,
    # and diffusers' converter must map them back to exactly the diffusers names.
    cfg_path = os.path.join(os.path.dirname(__file__), "../../core/diffusion-torch/tests/data/sd15_unet_config.json")
    cfg = {k: v for k, v in json.load(open(cfg_path)).items() if not k.startswith("_")}
    with torch.device("meta"):
        real = UNet2DConditionModel(**cfg)
    sd = real.state_dict()
    ldm_sd = unet_to_ldm(sd, dict(real.config))
    back = convert_ldm_unet_checkpoint(ldm_sd, dict(real.config))
    assert set(back) == set(sd), set(back) ^ set(sd)
    inv = {}
    for (k, v) in ldm_sd.items():
        inv[id(v)] = k
    sd15_ldm = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() >= 2:
            sd15_ldm[k.removesuffix(".weight")] = inv[id(v)].removeprefix("model.diffusion_model.").removesuffix(".weight")
    json.dump(sd15_ldm, open(os.path.join(out, "sd15_ldm.json"), "w"), indent=0, sort_keys=True)

    print(json.dumps({
        "modules": [{"component": c, "path": p, "rank": int(a.shape[0]), "alpha": float(al)} for c, p, a, _, al in modules],
        "ldm": ldm,
    }))


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


@contextlib.contextmanager
def captured():
    h = Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(h)
    try:
        yield h.msgs
    finally:
        for lg in loggers:
            lg.removeHandler(h)


def key_trouble(msgs):
    return [m for m in msgs if "unexpected" in m.lower() or "missing" in m.lower() or "not loaded" in m.lower()]


def n_lora(model, adapter):
    return len(get_peft_model_state_dict(model, adapter_name=adapter))


def check(d):
    ref = load_file(os.path.join(d, "outputs.safetensors"))
    report = {}

    def compare(unet, te):
        u, t = outputs(unet, te)
        return {"unet_max_abs": (u - ref["unet"]).abs().max().item(),
                "te_max_abs": (t - ref["text_encoder"]).abs().max().item(),
                "unet_ref_max": ref["unet"].abs().max().item(), "te_ref_max": ref["text_encoder"].abs().max().item()}

    for name in ("ours_kohya.safetensors", "ours_comfyui.safetensors", "ours_diffusers"):
        unet, te = base_models(d)
        with captured() as msgs:
            Pipe(unet, te).load_lora_weights(os.path.join(d, name), adapter_name="ours")
        r = compare(unet, te)
        r.update(warnings=key_trouble(msgs), unet_lora_params=n_lora(unet, "ours"), te_lora_params=n_lora(te, "ours"))
        report[name] = r

    unet, te = base_models(d)
    pu = PeftModel.from_pretrained(unet, os.path.join(d, "ours_peft"))
    pt = PeftModel.from_pretrained(te, os.path.join(d, "ours_peft"), subfolder="text_encoder")
    r = compare(pu, pt)
    # Loading once more under a second name returns peft's load result: every key must be consumed.
    lu = pu.load_adapter(os.path.join(d, "ours_peft"), adapter_name="again")
    lt = pt.load_adapter(os.path.join(d, "ours_peft"), adapter_name="again", subfolder="text_encoder")
    r.update(
        unexpected=list(lu.unexpected_keys) + list(lt.unexpected_keys),
        missing=[k for k in list(lu.missing_keys) + list(lt.missing_keys) if "lora_" in k and "again" in k],
        unet_lora_params=n_lora(pu, "default"), te_lora_params=n_lora(pt, "default"),
    )
    report["ours_peft"] = r

    # ComfyUI's key rules (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip) for SD1.5, from
    # the model's own weight names: lora_unet_<diffusers name with _> and lora_te_…_<LORA_CLIP_MAP>.
    unet, te = base_models(d)
    comfy = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in unet.state_dict() if k.endswith(".weight")}
    for b in range(TE.num_hidden_layers):
        for c, lk in LORA_CLIP_MAP.items():
            comfy.add(f"lora_te_text_model_encoder_layers_{b}_{lk}")
    sd = load_file(os.path.join(d, "ours_comfyui.safetensors"))
    stems = {k.split(".")[0] for k in sd}
    suffixes = {k[len(k.split(".")[0]) + 1:] for k in sd}
    report["comfyui_keys"] = {"unmapped": sorted(stems - comfy), "suffixes": sorted(suffixes), "stems": len(stems)}

    # Why we fold alpha/r into lora_B: diffusers applies `lora_adapter_metadata` when present (its own
    # file, alpha 8 at r 4, gives the reference output) and without it takes lora_alpha = r.
    route = {}
    sd = load_file(os.path.join(d, "ref_diffusers", "pytorch_lora_weights.safetensors"))
    os.makedirs(os.path.join(d, "ref_diffusers_nometa"), exist_ok=True)
    save_file(sd, os.path.join(d, "ref_diffusers_nometa", "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    for name in ("ref_diffusers", "ref_diffusers_nometa"):
        unet, te = base_models(d)
        Pipe(unet, te).load_lora_weights(os.path.join(d, name), adapter_name="x")
        route[name] = compare(unet, te)["unet_max_abs"]
    report["metadata_route"] = route

    # The trap: diffusers given peft's own folder.
    unet, te = base_models(d)
    with captured() as msgs:
        err = None
        try:
            Pipe(unet, te).load_lora_weights(os.path.join(d, "ref_peft_unet"))
        except Exception as e:  # noqa: BLE001 (measured, reported)
            err = f"{type(e).__name__}: {e}"
    u, _ = outputs(unet, te)
    report["trap"] = {"error": err, "warnings": msgs, "max_abs_change": (u - ref["base_unet"]).abs().max().item()}
    print(json.dumps(report))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--out", required=True)
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.cmd == "gen":
        gen(a.out)
    else:
        check(a.dir)


if __name__ == "__main__":
    main()
