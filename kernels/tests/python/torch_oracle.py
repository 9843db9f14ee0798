"""The PyTorch oracle of kernels/tests/torch_oracle.rs (run with the project venv's python).

    torch_oracle.py embed DIR   # DIR/{spec.json,a.f32,b.f32} -> DIR/{an,bn,s,topv,topi,cos,grad,loss}
    torch_oracle.py adamw DIR   # DIR/{spec.json,p.f32,g.f32} -> DIR/{p,m,v}.f32 after the steps

Files are raw little-endian float32 (int64 for topi). embed runs in float64 (the oracle of the
f32 references); adamw runs torch.optim.AdamW itself in float32, foreach=False (the
single-tensor path, what the references mirror).
"""
import json
import sys
from pathlib import Path

import torch


def load(d: Path, name: str, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray((d / f"{name}.f32").read_bytes()), dtype=torch.float32).reshape(shape).clone()


def save(d: Path, name: str, t: torch.Tensor) -> None:
    (d / name).write_bytes(t.detach().contiguous().numpy().tobytes())


def embed(d: Path, spec: dict) -> None:
    n, m, dim, k = spec["n"], spec["m"], spec["d"], spec["k"]
    a = load(d, "a", (n, dim)).double().requires_grad_(True)
    b = load(d, "b", (m, dim)).double()
    an = torch.nn.functional.normalize(a, dim=1, eps=1e-12)
    bn = torch.nn.functional.normalize(b, dim=1, eps=1e-12)
    s = an @ bn.T
    topv, topi = torch.topk(s, k, dim=1, largest=True, sorted=True)
    cos = (an * bn[:n]).sum(dim=1)
    loss = (1.0 - cos).mean()
    loss.backward()
    save(d, "an.f64", an)
    save(d, "bn.f64", bn)
    save(d, "s.f64", s)
    save(d, "topv.f64", topv)
    save(d, "topi.i64", topi)
    save(d, "cos.f64", cos)
    save(d, "grad.f64", a.grad)
    save(d, "loss.f64", loss.reshape(1))


def adamw(d: Path, spec: dict) -> None:
    size, steps = spec["size"], spec["steps"]
    p = torch.nn.Parameter(load(d, "p", (size,)))
    grads = load(d, "g", (steps, size))
    opt = torch.optim.AdamW(
        [p], lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"],
        weight_decay=spec["weight_decay"], foreach=False, fused=False,
    )
    for t in range(steps):
        p.grad = grads[t].clone()
        opt.step()
    st = opt.state[p]
    save(d, "p.out.f32", p)
    save(d, "m.out.f32", st["exp_avg"])
    save(d, "v.out.f32", st["exp_avg_sq"])


if __name__ == "__main__":
    what, folder = sys.argv[1], Path(sys.argv[2])
    spec = json.loads((folder / "spec.json").read_text())
    torch.use_deterministic_algorithms(True)
    {"embed": embed, "adamw": adamw}[what](folder, spec)
