#!/usr/bin/env python3
"""Download the reference packages that are used as files, not installed, and unpack them.

    $LIKENESS_DATA/reference/facenet_pytorch-2.6.0/   facenet_pytorch/ (sources + data/{pnet,rnet,onet}.pt)
    $LIKENESS_DATA/reference/torchreid-0.2.5/         torchreid/ (sources; osnet.py is the OSNet oracle)
    $LIKENESS_DATA/reference/open_clip-3.3.0/         open_clip/ (bpe_simple_vocab_16e6.txt.gz, tokenizer.py)

facenet-pytorch 2.6.0 pins torch<2.3 and torchreid's install pulls a training stack, so neither is
pip-installed: the oracles put these folders on sys.path instead. Idempotent: a package whose
folder has its `.complete` stamp is skipped.
"""
import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [
    # (pip spec, unpacked folder name, archive member prefix to keep)
    ("facenet-pytorch==2.6.0", "facenet_pytorch-2.6.0", "facenet_pytorch/"),
    ("torchreid==0.2.5", "torchreid-0.2.5", "torchreid/"),
    ("open_clip_torch==3.3.0", "open_clip-3.3.0", "open_clip/"),
]


def unpack(archive: Path, dest: Path, prefix: str) -> int:
    n = 0
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    out = dest / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
                    n += 1
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if m.isfile() and rel.startswith(prefix):
                    out = dest / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(t.extractfile(m).read())
                    n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, type=Path)
    args = ap.parse_args()
    root = args.data_dir / "reference"
    root.mkdir(parents=True, exist_ok=True)
    for spec, folder, prefix in PACKAGES:
        dest = root / folder
        if (dest / ".complete").exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "--no-binary", ":none:", spec, "-d", tmp],
                check=True,
            )
            archives = list(Path(tmp).iterdir())
            if len(archives) != 1:
                sys.exit(f"fetch_reference: expected one archive for {spec}, got {archives}")
            n = unpack(archives[0], dest, prefix)
            if n == 0:
                sys.exit(f"fetch_reference: {archives[0].name} has no files under {prefix}")
        (dest / ".complete").write_text(spec + "\n")
        print(f"fetch_reference: {spec} -> {dest} ({n} files)")


if __name__ == "__main__":
    main()
