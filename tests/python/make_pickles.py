#!/usr/bin/env python3
"""Fixtures and reference outputs for likeness_sdk::torch_pickle (core/sdk/tests/torch_pickle.rs).

Every checkpoint is written by real torch.save, in the zip format (default) and in the legacy
stream (_use_new_zipfile_serialization=False); next to each, OUT/<name>.expected.safetensors holds
what torch.load(f, weights_only=True) returns, flattened to dotted names (dict keys, list/tuple
indices) and made contiguous, so the Rust test compares names, dtypes, shapes and bytes exactly.
`<name>.state_dict.safetensors` is the expected load_state_dict() of the torchreid-style file.

The malicious files (evil_*) would run `touch OUT/pwned*` when unpickled by plain pickle; the
script proves that by unpickling one copy itself with a marker in OUT/proof/ (it must appear),
so a Rust test that sees no OUT/pwned* marker shows the reader refused a payload that is real.

Usage: make_pickles.py --out DIR [--mtcnn DIR_WITH_pnet.pt]   (prints one JSON object)
"""
import argparse
import collections
import json
import os
import pickle
import zipfile

import torch
from safetensors.torch import save_file


def flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().contiguous().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}" if prefix else str(i), out)
    return out


def save_both(obj, out, name, ext=".pt", protocol=2):
    """torch.save in both formats; the expected tensors come from torch.load(weights_only=True)
    (weights_only=False for protocols 4 and 5, whose FRAME opcode torch's weights-only unpickler
    refuses; these files are our own, so the full unpickler is safe here)."""
    files = {}
    for fmt, new in (("zip", True), ("legacy", False)):
        path = os.path.join(out, f"{name}_{fmt}{ext}")
        torch.save(obj, path, _use_new_zipfile_serialization=new, pickle_protocol=protocol)
        loaded = torch.load(path, weights_only=protocol <= 3)
        save_file(flatten(loaded, "", {}), os.path.join(out, f"{name}_{fmt}.expected.safetensors"))
        files[fmt] = path
    return files


class Evil:
    """Unpickling calls func(*args): a shell command that leaves a marker file."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mtcnn")
    a = ap.parse_args()
    out = a.out
    torch.manual_seed(0)
    res = {}

    # Every dtype, views sharing one storage, a parameter, 0-d and empty tensors.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(2, 3).half(),
        "bf16": torch.randn(4).bfloat16(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(0, 250, 10, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "base": base,
        "transposed": base.t(),
        "slice": base[1:3, 2:5],
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    res["dtypes"] = save_both(tensors, out, "dtypes")

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    res["module"] = save_both(module.state_dict(), out, "module")

    # torchreid's checkpoint: a DataParallel state_dict plus training state, as `.pth.tar`.
    net = torch.nn.Sequential(collections.OrderedDict(conv1=torch.nn.Conv2d(1, 2, 3), flat=torch.nn.Flatten(), fc=torch.nn.Linear(2, 3)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(1, 1, 3, 3)).sum().backward()
    opt.step()
    sd = collections.OrderedDict(("module." + k, v) for k, v in net.state_dict().items())
    ckpt = {"state_dict": sd, "epoch": 3, "rank1": 0.9, "optimizer": opt.state_dict()}
    res["torchreid"] = save_both(ckpt, out, "torchreid", ext=".pth.tar")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(out, "torchreid.state_dict.safetensors"))

    # Other pickle protocols (torch.save's pickle_protocol; 2 is its default; 0 and 1 write text
    # opcodes that torch.load(weights_only=True) itself refuses; 4 and 5 add FRAME, MEMOIZE and
    # STACK_GLOBAL), with plain values around the tensors.
    mixed = {
        "t": torch.randn(3, 2),
        "meta": {"lr": 0.1, "names": ["a", "b"], "flags": (True, None, False), "big": 2**70, "neg": -3},
        "nested": [torch.arange(4), (torch.ones(2, dtype=torch.bool), {"deep": torch.zeros(1)})],
        7: torch.tensor([7.0]),
    }
    for protocol in (3, 4, 5):
        res[f"proto{protocol}"] = save_both(mixed, out, f"proto{protocol}", protocol=protocol)

    # Small files for the fuzz test.
    res["tiny"] = save_both({"w": torch.randn(2, 3), "b": torch.arange(3)}, out, "tiny")

    # A storage shorter than its persistent id declares (tensor `w`, storage key 0).
    with zipfile.ZipFile(res["tiny"]["zip"]) as src, zipfile.ZipFile(os.path.join(out, "short_storage_zip.pt"), "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                assert len(data) == 24, len(data)
                data = data[:-4]
            dst.writestr(info, data)

    # A memo bomb: 2^40 paths to one tensor in a few hundred bytes (torch.load shares it; a
    # reader that names every path must stop).
    bomb = [torch.ones(2)]
    for _ in range(40):
        bomb = [bomb, bomb]
    for fmt, new in (("zip", True), ("legacy", False)):
        torch.save(bomb, os.path.join(out, f"bomb_{fmt}.pt"), _use_new_zipfile_serialization=new)

    # Malicious pickles. os.system pickles as `posix.system` on Linux.
    os.makedirs(os.path.join(out, "proof"), exist_ok=True)
    evil = {}
    sys_evil = Evil(os.system, (f"touch {os.path.join(out, 'pwned_system')}",))
    eval_evil = Evil(eval, (f"open({os.path.join(out, 'pwned_eval')!r}, 'w')",))
    evil["raw_system"] = os.path.join(out, "evil_system.pkl")
    with open(evil["raw_system"], "wb") as f:
        pickle.dump({"weight": sys_evil}, f, protocol=2)
    evil["raw_eval"] = os.path.join(out, "evil_eval.pkl")
    with open(evil["raw_eval"], "wb") as f:
        pickle.dump(eval_evil, f, protocol=4)
    evil["legacy_system"] = os.path.join(out, "evil_system_legacy.pt")
    torch.save({"weight": sys_evil}, evil["legacy_system"], _use_new_zipfile_serialization=False)
    # A real torch zip archive whose data.pkl is replaced by the payload.
    evil["zip_system"] = os.path.join(out, "evil_system_zip.pt")
    with zipfile.ZipFile(res["tiny"]["zip"]) as src, zipfile.ZipFile(evil["zip_system"], "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"w": sys_evil}, protocol=2)
            dst.writestr(info, data)
    res["evil"] = evil
    # Proof that the payloads are live: plain pickle runs them (markers under OUT/proof/).
    proof = Evil(os.system, (f"touch {os.path.join(out, 'proof', 'pwned_system')}",))
    pickle.loads(pickle.dumps(proof, protocol=2))
    pickle.loads(pickle.dumps(Evil(eval, (f"open({os.path.join(out, 'proof', 'pwned_eval')!r}, 'w')",)), protocol=4))

    if a.mtcnn:
        res["mtcnn"] = {}
        for n in ("pnet", "rnet", "onet"):
            src = os.path.join(a.mtcnn, f"{n}.pt")
            sd = torch.load(src, weights_only=True)
            save_file(flatten(sd, "", {}), os.path.join(out, f"{n}.expected.safetensors"))
            res["mtcnn"][n] = src
    print(json.dumps(res))


if __name__ == "__main__":
    main()
