"""Oracle for the PairEdit objective (issue 16): one training step of PairEdit's train_image.py
(xudonmao/PairEdit @ db8868d, L247-400) on the tiny Flux of make_tiny_flux.py, in float32.

usage: pairedit_oracle.py --model DIR --out DIR [--rank 4] [--alpha 1] [--seed 0]
           [--num-inference-steps 28] [--t-index 5] [--noise-scale 1.5] [--cfg-eta 4.0]
           [--guidance 3.5] [--pairedit-src DIR]

What it reproduces (the semantics are in /work/notes/pairedit.md §2-§5; the code is ours):
  * Two LoRA networks built as PairEdit's utils/lora.py builds them: every Linear below every
    module whose class is `Attention` (diffusers 0.31's Flux attention; diffusers >= 0.35 renamed it
    `FluxAttention`, with the same Linear children, so both names are targets here) gets a LoRA.
    The content network is built first, the semantic one second, both on the same Linears:
        y = W x + b + up_c(down_c(x))·m_c·scale + up_s(down_s(x))·m_s·scale,  scale = alpha/rank,
    with m = 1 inside `with net:` and 0 outside (their __enter__/__exit__).
    Init (ours, seeded, so that every LoRA parameter gets a nonzero gradient): down =
    kaiming_uniform(a=1), up = N(0, 0.2) (PairEdit's 'full' zeroes up), content then semantic,
    module by module in named_modules() order, from torch.Generator().manual_seed(seed + 1).
  * Empty prompt "" through diffusers' FluxPipeline.encode_prompt (T5 length 16), guidance [3.5].
  * z_src, z_tgt, eps ~ N(0,1) [1,16,8,6] from torch.Generator().manual_seed(seed), in that order.
  * Schedule: FlowMatchEulerDiscreteScheduler from <model>/scheduler, sigmas = linspace(1, 1/N, N),
    mu = calculate_shift(packed tokens = 12, ...config), set_timesteps(sigmas, mu) (via diffusers'
    retrieve_timesteps, as train_image.py does); sigma = sigmas[t_index]; the transformer gets
    timestep = tensor([timesteps[t_index]]) / 1000.
  * add_noise_scale: noise = ns·eps, x_t = z_src + sigma·noise (the SOURCE, packed, is the input).
  * loss1: content on, semantic off: MSE(unpack(pred1), noise); loss1.backward().
  * loss2: content params requires_grad=False, both on, same input:
    MSE(unpack(pred2), eta·(z_src − z_tgt) + noise); loss2.backward().
    Content grads therefore come from loss1 only; semantic grads are loss1's (exactly zero: m_s = 0)
    plus loss2's.

Output in --out (little-endian f32 `<name>.f32` files, shapes in oracle.json "shapes"):
  z_src, z_tgt, eps                      [1,16,8,6] unpacked
  x_t, pred1, pred2                      [1,12,64] packed
  prompt_embeds [1,16,32], pooled [1,24], text_ids [16,3], img_ids [12,3]
  grad_content_<lora_name>.lora_down.weight / .lora_up.weight, grad_semantic_<...> (the same)
  content.safetensors, semantic.safetensors   the init weights, PairEdit's key layout (f32):
      <lora_name>.lora_down.weight [r,in], <lora_name>.lora_up.weight [out,r], <lora_name>.alpha 0-d
  semantic.pt    the semantic weights as PairEdit's own torch.save file (bf16)
  modules.json   [[lora_name, diffusers module path], ...]
  oracle.json    shapes, loss1, loss2, sigma, timestep (0..1000), timestep_input (/1000, what the
                 transformer gets), mu, image_seq_len, t_index, num_inference_steps, noise_scale,
                 cfg_eta, guidance, rank, alpha, scale, seed, max_sequence_length, height, width,
                 lora_names, stamp
  stamp.json     script hash + arguments + the model's stamp (a rerun with the same ones is instant)

--pairedit-src DIR (one-time validation, not used by the Rust tests): DIR holds PairEdit's
utils/lora.py and utils/flux_pipeline.py (git show HEAD:<path> from the mirror). The script then
(1) builds both networks with THEIR LoRANetwork (train_method 'full', our rank/alpha) on a fresh
copy of the transformer, loads content.safetensors / semantic.safetensors into them with a strict
load_state_dict, runs the same step through their modules (their set_lora_slider / `with net:` /
requires_grad toggling) and asserts losses, predictions and every gradient equal ours; (2) runs their
add_noise_scale function (extracted from flux_pipeline.py with ast, on a stub pipeline whose VAE
returns our latents) and asserts its x_t equals ours. The only shim: their module-level
DEFAULT_TARGET_REPLACE list (["Attention"]) gets "FluxAttention" appended, the same kind of in-place
mutation train_image.py itself does (`modules += UNET_TARGET_REPLACE_MODULE_CONV`); without it their
LoRANetwork finds 0 modules on diffusers 0.42.

Why f32: PairEdit runs in bf16, where one step's rounding noise would swamp the comparison; f32
makes the oracle a reference for the algorithm, not for bf16 rounding.

Tolerance for a Rust test comparing against this: given equal inputs in f32 on the same CPU the
transformer is bitwise equal to diffusers' (plugins/flux-lora's other tests), and the LoRA only adds
rank-r matmuls and elementwise scalings (alpha/rank = 0.25 and multipliers 0/1 are exact), so the
remaining differences are f32 re-association (matmul blocking, the loss's mean order, packed vs
unpacked reduction): expect ~1e-6 relative on preds, losses and gradients. A test should allow
about 1e-5 relative to max |reference| (a real bug — a missing LoRA, a wrong target, content
grads leaking into loss2 — is O(1) relative).
"""

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import sys
import textwrap

import numpy as np
import torch
import torch.nn.functional as F

MAX_SEQ = 16  # plugins/flux-lora/tests/common/mod.rs MAX_SEQ
HEIGHT, WIDTH = 16, 12  # px; the tiny VAE halves -> 8x6 latents -> 4x3 packed tokens
# diffusers 0.31's Flux attention class (what PairEdit targets) and its >= 0.35 name.
TARGET_CLASSES = ("Attention", "FluxAttention")
LINEAR_CLASSES = ("Linear", "LoRACompatibleLinear")  # their filt_layers (no Conv in attention)
UP_STD = 0.2


# ---------------------------------------------------------------------------------------- LoRA


def lora_targets(transformer):
    """[(lora_name, module path, Linear)] in PairEdit's create_modules order and naming."""
    out, seen = [], set()
    for name, module in transformer.named_modules():
        if type(module).__name__ not in TARGET_CLASSES:
            continue
        # named_modules(), not named_children(): "to_out.0" is a grandchild.
        for child_name, child in module.named_modules():
            if type(child).__name__ in LINEAR_CLASSES:
                lora_name = f"lora_unet.{name}.{child_name}".replace(".", "_")
                if lora_name not in seen:
                    seen.add(lora_name)
                    out.append((lora_name, f"{name}.{child_name}", child))
    return out


def init_weights(targets, rank, gen):
    """{lora_name: (down [r,in], up [out,r])}: kaiming_uniform(a=1) as theirs, up ~ N(0, 0.2)."""
    w = {}
    for lora_name, _, lin in targets:
        down = torch.empty(rank, lin.in_features)
        torch.nn.init.kaiming_uniform_(down, a=1, generator=gen)
        up = torch.empty(lin.out_features, rank)
        torch.nn.init.normal_(up, std=UP_STD, generator=gen)
        w[lora_name] = (down, up)
    return w


class LoraNet:
    """One LoRA network as forward hooks on the shared Linears: out + up(down(x))·m·scale, the
    same ops in the same order as their LoRAModule.forward (hooks run in registration order, so
    the network built first adds first, as their chained org_forward does)."""

    def __init__(self, targets, weights, rank, alpha):
        self.scale = alpha / rank
        self.multiplier = 0.0
        self.params = {}
        self.handles = []
        for lora_name, _, lin in targets:
            down, up = (t.clone().requires_grad_(True) for t in weights[lora_name])
            self.params[f"{lora_name}.lora_down.weight"] = down
            self.params[f"{lora_name}.lora_up.weight"] = up
            self.handles.append(lin.register_forward_hook(self._hook(down, up)))

    def _hook(self, down, up):
        def hook(_module, inputs, output):
            return output + F.linear(F.linear(inputs[0], down), up) * self.multiplier * self.scale

        return hook

    def parameters(self):
        return list(self.params.values())

    def named_grads(self):
        return {k: v.grad for k, v in self.params.items()}

    def __enter__(self):
        self.multiplier = 1.0

    def __exit__(self, *exc):
        self.multiplier = 0.0


def save_network(path, weights, alpha):
    from safetensors.torch import save_file

    sd = {}
    for lora_name, (down, up) in weights.items():
        sd[f"{lora_name}.lora_down.weight"] = down.contiguous()
        sd[f"{lora_name}.lora_up.weight"] = up.contiguous()
        sd[f"{lora_name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    save_file(sd, path)


def save_network_pt(path, weights, alpha):
    """PairEdit's own file: `torch.save(state_dict)` in bf16, as its `save_weights` writes a `.pt`
    (the alpha buffer too: its int64 buffer is cast to bf16 on save)."""
    sd = {}
    for lora_name, (down, up) in weights.items():
        sd[f"{lora_name}.lora_down.weight"] = down.detach().clone().to(torch.bfloat16)
        sd[f"{lora_name}.lora_up.weight"] = up.detach().clone().to(torch.bfloat16)
        sd[f"{lora_name}.alpha"] = torch.tensor(alpha).to(torch.bfloat16)
    torch.save(sd, path)


# ------------------------------------------------------------------------------ the train step


def pack(z):
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def unpack(x, latent_hw):
    # diffusers 0.42's _unpack_latents(x, px_h, px_w, vae_scale_factor) = 2*(px // (2*vsf)); with
    # vsf = 1 the "pixel" size is the latent size.
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(x, latent_hw[0], latent_hw[1], 1)


def train_step(transformer, content, semantic, content_params, semantic_grads, inp):
    """train_image.py L322-392 on prepared inputs. `content`/`semantic` are context managers that
    switch a network on (theirs after set_lora_slider(1)); returns preds, losses and checks."""
    hw = inp["z_src"].shape[2:]
    kw = dict(hidden_states=inp["x_t"], timestep=inp["timestep"], guidance=inp["guidance"],
              pooled_projections=inp["pooled"], encoder_hidden_states=inp["prompt_embeds"],
              txt_ids=inp["text_ids"], img_ids=inp["img_ids"], return_dict=False)
    with content:
        pred1 = transformer(**kw)[0]
    loss1 = F.mse_loss(unpack(pred1, hw), inp["noise"])
    loss1.backward()
    for name, g in semantic_grads().items():
        # m_s = 0 keeps the semantic LoRA in the graph: its grads exist and are exactly zero.
        assert g is not None and not g.any(), f"semantic grad {name} after loss1 is not exactly 0"
    content_after1 = [p.grad.clone() for p in content_params]
    for p in content_params:
        p.requires_grad = False
    with semantic, content:
        pred2 = transformer(**kw)[0]
    loss2 = F.mse_loss(unpack(pred2, hw), inp["eta"] * (inp["z_src"] - inp["z_tgt"]) + inp["noise"])
    loss2.backward()
    for p, g in zip(content_params, content_after1):
        assert torch.equal(p.grad, g), "loss2 changed a content grad"
        p.requires_grad = True
    return pred1.detach(), pred2.detach(), loss1.item(), loss2.item()


def schedule(model, n_steps, image_seq_len, t_index):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    c = sched.config
    mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sigmas = np.linspace(1.0, 1 / n_steps, n_steps)
    retrieve_timesteps(sched, n_steps, "cpu", None, sigmas, mu=mu)
    if not 0 <= t_index < n_steps:
        sys.exit(f"--t-index {t_index} is outside 0..{n_steps - 1} (--num-inference-steps {n_steps})")
    return sched, mu


def load_transformer(model):
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=torch.float32,
                                               local_files_only=True)
    return t.eval().requires_grad_(False)


def add_noise_scale(z, eps, sigma, scale):
    """PairEdit's add_noise_scale (flux_pipeline.py L600-608): noise = scale·randn,
    x_t = x0 + sigmas[step]·noise, in this op order. Returns (x_t, noise)."""
    noise = scale * eps
    return z + sigma * noise, noise


def prepare_inputs(args, sched):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=[""], prompt_2=None,
                                                             max_sequence_length=MAX_SEQ)
    c = pipe.transformer.config.in_channels // 4
    lh, lw = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(args.seed)
    z_src, z_tgt, eps = (torch.randn(1, c, lh, lw, generator=g) for _ in range(3))
    x_t, noise = add_noise_scale(z_src, eps, sched.sigmas[args.t_index], args.noise_scale)
    # The pipeline's own ids for an lh×lw latent: _prepare_latent_image_ids(b, lh // 2, lw // 2).
    img_ids = FluxPipeline._prepare_latent_image_ids(1, lh // 2, lw // 2, "cpu", torch.float32)
    timestep = torch.tensor([sched.timesteps[args.t_index]]) / 1000
    return dict(z_src=z_src, z_tgt=z_tgt, eps=eps, noise=noise, x_t=pack(x_t), prompt_embeds=prompt_embeds,
                pooled=pooled, text_ids=text_ids, img_ids=img_ids, timestep=timestep,
                guidance=torch.tensor([args.guidance]).expand(1), eta=args.cfg_eta)


# ------------------------------------------------------------------------- validation vs theirs


def load_their_lora(src):
    path = os.path.join(src, "utils", "lora.py")
    spec = importlib.util.spec_from_file_location("pairedit_utils_lora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_theirs(args, inp, out, names):
    """Their LoRANetwork on a fresh transformer, our init loaded into it; returns their results."""
    pe = load_their_lora(args.pairedit_src)
    probe = pe.LoRANetwork(load_transformer(args.model), rank=args.rank, multiplier=0.0, alpha=args.alpha,
                           train_method="full")
    print(f"their LoRANetwork without the shim: {len(probe.unet_loras)} modules "
          f"(target classes {pe.DEFAULT_TARGET_REPLACE})")
    pe.DEFAULT_TARGET_REPLACE.append("FluxAttention")
    transformer = load_transformer(args.model)
    nets = []
    for which in ("content", "semantic"):
        net = pe.LoRANetwork(transformer, rank=args.rank, multiplier=0.0, alpha=args.alpha,
                             train_method="full").to("cpu", dtype=torch.float32)
        from safetensors.torch import load_file

        net.load_state_dict(load_file(os.path.join(out, f"{which}.safetensors")), strict=True)
        assert [m.lora_name for m in net.unet_loras] == names, "their module list differs from ours"
        nets.append(net)
    content, semantic = nets
    content.set_lora_slider(1)
    semantic.set_lora_slider(1)
    content_params = [p for lora in content.unet_loras for p in lora.parameters()]

    def sem_grads():
        return {k: p.grad for k, p in semantic.named_parameters()}

    p1, p2, l1, l2 = train_step(transformer, content, semantic, content_params, sem_grads, inp)
    grads = {f"content_{k}": p.grad for k, p in content.named_parameters()}
    grads.update({f"semantic_{k}": p.grad for k, p in semantic.named_parameters()})
    return p1, p2, l1, l2, grads


def check_add_noise_scale(args, sched, inp):
    """Runs their add_noise_scale (ast-extracted from utils/flux_pipeline.py) on a stub pipeline
    whose VAE returns z_src and compares its x_t with ours on the same packed noise."""
    path = os.path.join(args.pairedit_src, "utils", "flux_pipeline.py")
    with open(path) as f:
        src = f.read()
    fn = None
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef) and node.name == "add_noise_scale":
            # whole lines (get_source_segment would drop only the first line's indent)
            fn = "\n".join(src.splitlines()[node.lineno - 1:node.end_lineno])
    assert fn, f"{path}: no add_noise_scale"
    ns = {"torch": torch}
    exec(compile(textwrap.dedent(fn), path, "exec"), ns)  # a method body, dedented to a function
    z = inp["z_src"]
    c, lh, lw = z.shape[1:]

    class Stub:  # only the attributes add_noise_scale reads
        vae_scale_factor = 2 * 512 // lh  # their hard-coded 512 px -> 2*(512//vsf) = lh (square only)
        scheduler = sched
        transformer = type("T", (), {"config": type("C", (), {"in_channels": 4 * c})})()
        image_processor = type("P", (), {"preprocess": staticmethod(lambda im: im)})()
        vae = type("V", (), {"device": torch.device("cpu"), "dtype": torch.float32,
                             "config": type("C", (), {"scaling_factor": 1.0, "shift_factor": 0.0})(),
                             "encode": staticmethod(lambda im: type("E", (), {"latent_dist": type(
                                 "D", (), {"sample": staticmethod(lambda g: im)})()})())})()

        @staticmethod
        def _pack_latents(lat, *_):  # their h = w = lh is wrong for a non-square latent
            return pack(lat)

    scale = args.noise_scale
    init, x_t, noise = ns["add_noise_scale"](Stub(), z, args.t_index, torch.Generator().manual_seed(3), scale)
    raw = torch.randn(pack(z).shape, generator=torch.Generator().manual_seed(3))
    ours, ours_noise = add_noise_scale(pack(z), raw, sched.sigmas[args.t_index], scale)
    d = max((x_t - ours).abs().max().item(), (noise - ours_noise).abs().max().item(),
            (init - pack(z)).abs().max().item())
    print(f"their add_noise_scale vs ours: max |diff| = {d:.3e}")
    assert d == 0.0, "add_noise_scale differs"


def compare(ours, theirs):
    (p1, p2, l1, l2, g), (q1, q2, m1, m2, h) = ours, theirs
    assert set(g) == set(h), f"grad names differ: {sorted(set(g) ^ set(h))[:6]}"
    diffs = {"pred1": (p1 - q1).abs().max().item(), "pred2": (p2 - q2).abs().max().item(),
             "loss1": abs(l1 - m1), "loss2": abs(l2 - m2),
             "grads": max((g[k] - h[k]).abs().max().item() for k in g)}
    rel = max((g[k] - h[k]).abs().max().item() / max(h[k].abs().max().item(), 1e-30) for k in g)
    print("ours vs PairEdit's LoRANetwork: max |diff| " + ", ".join(f"{k} {v:.3e}" for k, v in diffs.items())
          + f"; grads max relative {rel:.3e}")
    # The same ops in the same order on the same CPU: expected (and observed) bitwise equal; the
    # bound only leaves room for a BLAS that re-associates differently between two calls.
    for k, v in diffs.items():
        tol = 1e-6 * (abs(l1) + abs(l2)) if k.startswith("loss") else 1e-5
        assert v <= tol, f"{k} differs from PairEdit's: {v:.3e} > {tol:.1e}"


# ------------------------------------------------------------------------------------- main


def stamp_of(args):
    h = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    model_stamp = None
    p = os.path.join(args.model, "stamp.json")
    if os.path.exists(p):
        with open(p) as f:
            model_stamp = json.load(f)
    a = {k: v for k, v in vars(args).items() if k not in ("out", "pairedit_src")}
    return {"script_sha256": h.hexdigest(), "args": a, "model_stamp": model_stamp}


def dump(out, shapes, name, t):
    t = t.detach().to(torch.float32).contiguous()
    t.numpy().tofile(os.path.join(out, f"{name}.f32"))
    shapes[name] = list(t.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-inference-steps", type=int, default=28)
    ap.add_argument("--t-index", type=int, default=5)
    ap.add_argument("--noise-scale", type=float, default=1.5)
    ap.add_argument("--cfg-eta", type=float, default=4.0)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--pairedit-src", help="a dir with PairEdit's utils/lora.py and utils/flux_pipeline.py")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    stamp = stamp_of(args)
    stamp_path = os.path.join(out, "stamp.json")
    if args.pairedit_src is None and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                print(f"{out}: up to date")
                return
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed)  # nothing should draw from it; fixed anyway

    transformer = load_transformer(args.model)
    targets = lora_targets(transformer)
    names = [n for n, _, _ in targets]
    assert targets, "no LoRA targets: no Attention/FluxAttention module with Linear children"
    g = torch.Generator().manual_seed(args.seed + 1)
    w_content = init_weights(targets, args.rank, g)
    w_semantic = init_weights(targets, args.rank, g)
    save_network(os.path.join(out, "content.safetensors"), w_content, args.alpha)
    save_network(os.path.join(out, "semantic.safetensors"), w_semantic, args.alpha)
    save_network_pt(os.path.join(out, "semantic.pt"), w_semantic, args.alpha)
    with open(os.path.join(out, "modules.json"), "w") as f:
        json.dump([[n, p] for n, p, _ in targets], f, indent=0)

    tokens = (HEIGHT // 4) * (WIDTH // 4)  # the tiny VAE's factor 2, then 2x2 packing
    sched, mu = schedule(args.model, args.num_inference_steps, tokens, args.t_index)
    inp = prepare_inputs(args, sched)
    assert inp["x_t"].shape[1] == tokens, inp["x_t"].shape

    with torch.no_grad():
        base = transformer(hidden_states=inp["x_t"], timestep=inp["timestep"], guidance=inp["guidance"],
                           pooled_projections=inp["pooled"], encoder_hidden_states=inp["prompt_embeds"],
                           txt_ids=inp["text_ids"], img_ids=inp["img_ids"], return_dict=False)[0]
    content = LoraNet(targets, w_content, args.rank, args.alpha)
    semantic = LoraNet(targets, w_semantic, args.rank, args.alpha)
    p1, p2, l1, l2 = train_step(transformer, content, semantic, content.parameters(), semantic.named_grads, inp)
    assert (p1 - base).abs().max() > 1e-3 and (p2 - p1).abs().max() > 1e-3, "a LoRA has no effect"
    grads = {f"content_{k}": v for k, v in content.named_grads().items()}
    grads.update({f"semantic_{k}": v for k, v in semantic.named_grads().items()})
    for k, v in grads.items():
        assert v is not None and v.abs().max() > 0, f"grad {k} is zero"

    shapes = {}
    for name in ("z_src", "z_tgt", "eps"):
        dump(out, shapes, name, inp[name])
    dump(out, shapes, "x_t", inp["x_t"])
    dump(out, shapes, "pred1", p1)
    dump(out, shapes, "pred2", p2)
    for name in ("prompt_embeds", "pooled", "text_ids", "img_ids"):
        dump(out, shapes, name, inp[name])
    for k, v in grads.items():
        dump(out, shapes, f"grad_{k}", v)
    meta = {"shapes": shapes, "loss1": l1, "loss2": l2, "sigma": sched.sigmas[args.t_index].item(),
            "timestep": sched.timesteps[args.t_index].item(), "timestep_input": inp["timestep"].item(),
            "mu": mu, "image_seq_len": tokens, "t_index": args.t_index,
            "num_inference_steps": args.num_inference_steps, "noise_scale": args.noise_scale,
            "cfg_eta": args.cfg_eta, "guidance": args.guidance, "rank": args.rank, "alpha": args.alpha,
            "scale": args.alpha / args.rank, "seed": args.seed, "max_sequence_length": MAX_SEQ,
            "height": HEIGHT, "width": WIDTH, "lora_names": names, "stamp": stamp}
    print(f"loss1 {l1!r} loss2 {l2!r} sigma {meta['sigma']!r} timestep {meta['timestep']!r} mu {mu!r}; "
          f"{len(names)} LoRA modules")

    if args.pairedit_src:
        check_add_noise_scale(args, sched, inp)
        compare((p1, p2, l1, l2, grads), run_theirs(args, inp, out, names))
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)


if __name__ == "__main__":
    main()
