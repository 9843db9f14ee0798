#!/usr/bin/env python3
"""Prepare likeness's demo and test data from real face photographs.

The photographs come from two source distributions on PyPI that ship them as
sample/test images:

  * insightface 0.7.3      insightface/data/images/*   (sample images)
  * face_recognition 1.3.0 tests/test_images/*         (test images)

Both sdists are fetched through PyPI's simple index (``pip download
insightface==0.7.3`` does not work: building its metadata needs Cython), their
sha256 is checked against the values pinned below, and the images are read with
``tarfile``; no code from either package is ever executed.

Outputs under ``$LIKENESS_DATA`` (default ``~/.cache/likeness/data``):

  sdists/                          the two cached tarballs
  photos/<package>/...             the original images, unchanged, + SOURCES.md
  faces/                           face_recognition's raw test images, unchanged
  demo-bundles/0/char_XXXXX/img_XXXXX.jpg
                                   128x128 face-centred JPEGs in seed 000's
                                   bundle layout, + README.md describing them

Running it twice yields byte-identical files.  Pillow is the only third-party
dependency.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import io
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

# --------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------

SIMPLE_INDEX = "https://pypi.org/simple/"

SDISTS = {
    "insightface": {
        "project": "insightface",
        "version": "0.7.3",
        "filename": "insightface-0.7.3.tar.gz",
        "sha256": "f191f719612ebb37018f41936814500544cd0f86e6fcd676c023f354c668ddf7",
        "prefix": "insightface-0.7.3/insightface/data/images/",
        "members": [
            "t1.jpg",
            "Tom_Hanks_54745.png",
            "mask_black.jpg",
            "mask_blue.jpg",
            "mask_green.jpg",
            "mask_white.jpg",
        ],
        "licence_files": ["insightface-0.7.3/README.md"],
    },
    "face_recognition": {
        "project": "face-recognition",
        "version": "1.3.0",
        "filename": "face_recognition-1.3.0.tar.gz",
        # Computed from the downloaded file; agrees with the #sha256= fragment
        # of PyPI's simple index.
        "sha256": "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
        "prefix": "face_recognition-1.3.0/tests/test_images/",
        "members": [
            "obama.jpg",
            "obama2.jpg",
            "obama3.jpg",
            "obama_partial_face.jpg",
            "obama_partial_face2.jpg",
            "biden.jpg",
            "32bit.png",
        ],
        "licence_files": ["face_recognition-1.3.0/LICENSE"],
    },
}

SOURCES_MD = """\
# Source photographs

These images were extracted, unchanged, from source distributions published on
PyPI. No code from the packages was run; the tarballs' sha256 were verified
against the values pinned in `scripts/prepare_data.py`.

| file | package | version | path inside the sdist | sdist sha256 |
|------|---------|---------|-----------------------|--------------|
{rows}

## Licences

* **face_recognition 1.3.0** (Adam Geitgey) is released under the MIT License
  (`face_recognition-1.3.0/LICENSE`: "MIT License, Copyright (c) 2017, Adam
  Geitgey"). The test images are part of that distribution; the licence file
  does not mention them separately, and the package does not state where the
  photographs come from. They show public figures (Barack Obama, Joe Biden) and
  look like White House press photographs (which would be US-government works),
  but that is not verified: the only licence on record is the package's MIT
  licence.
* **insightface 0.7.3**: its README says "The code of InsightFace Python
  Library is released under the MIT License" and that the *pretrained models*
  are for non-commercial research purposes only. The sdist contains no LICENSE
  file and says **nothing** about the licence of the sample images in
  `insightface/data/images/`. `t1.jpg` is a still of a group of six people that
  looks like a publicity photo of a TV show, `Tom_Hanks_54745.png` is a 112x112
  aligned face crop named after the actor, and `mask_*.jpg` are photographs of
  surgical face masks alone (no person). Their copyright status is unknown: treat them as third-party images
  usable for local testing and research demos only; do not redistribute them
  or derived images as if MIT-licensed.
"""


# --------------------------------------------------------------------------
# Face boxes (x0, y0, x1, y1) in source-image pixels, determined by viewing
# each image with a coordinate grid overlaid. A box spans roughly hairline to
# chin and ear to ear; the demo crop is a square 1.6x the box's longer side,
# centred on the box (shifted inwards where it would leave the image).
# --------------------------------------------------------------------------

FACE_BOXES = {
    # face_recognition/tests/test_images (910x1137, 626x1200, 1434x2333, 970x2204)
    "obama.jpg": (345, 95, 640, 410),      # frontal, smiling, Oval Office
    "obama2.jpg": (200, 215, 520, 640),    # speaking at a microphone
    "obama3.jpg": (600, 250, 905, 630),    # standing, arms crossed
    "biden.jpg": (400, 115, 755, 510),     # standing, arms crossed
    # insightface/data/images/t1.jpg (1280x886): group photo of six people,
    # numbered left to right by the position of their face.
    "t1#1": (45, 262, 140, 382),      # long fair hair, far left, holding cards
    "t1#2": (290, 140, 378, 264),     # dark hair, standing behind, looking down
    "t1#3": (460, 248, 565, 400),     # dark hair, centre left, smiling
    "t1#4": (744, 312, 850, 462),     # dark hair, centre right, laughing
    "t1#5": (915, 32, 1030, 180),     # dark hair, standing top right, looking down
    "t1#6": (1125, 262, 1228, 410),   # fair hair, far right
}

# Tom_Hanks_54745.png is already an aligned 112x112 face crop: the whole image
# is used as the base view (no room for a 1.6x context crop).

CROP_SCALE = 1.6
OUT_SIZE = 128
JPEG_QUALITY = 95

# Deterministic views derived from a single photo: (tag, description, params).
#   scale: crop side relative to the face box's longer side (base = 1.6)
#   dx, dy: shift of the crop centre, as a fraction of the face box side
#   flip: mirror horizontally; bright: brightness factor
SINGLE_PHOTO_VIEWS = [
    ("base", "face-centred crop 1.6x", dict(scale=1.6, dx=0.0, dy=0.0, flip=False, bright=1.0)),
    ("flip", "horizontal flip of the base crop", dict(scale=1.6, dx=0.0, dy=0.0, flip=True, bright=1.0)),
    ("zoom", "tighter crop 1.3x, centre shifted 5% right/down, brightness x1.10",
     dict(scale=1.3, dx=0.05, dy=0.05, flip=False, bright=1.10)),
    ("wide", "wider crop 2.0x, centre shifted 5% left, mirrored, brightness x0.90",
     dict(scale=2.0, dx=-0.05, dy=0.0, flip=True, bright=0.90)),
]

# Views of an already-aligned face crop (fractions of the image side).
ALIGNED_VIEWS = [
    ("base", "whole aligned crop", dict(frac=1.0, dx=0.0, dy=0.0, flip=False, bright=1.0)),
    ("flip", "horizontal flip", dict(frac=1.0, dx=0.0, dy=0.0, flip=True, bright=1.0)),
    ("zoom", "central 85% crop shifted 4% right, brightness x1.10",
     dict(frac=0.85, dx=0.04, dy=0.0, flip=False, bright=1.10)),
    ("zoom2", "central 80% crop shifted 4% up, mirrored, brightness x0.90",
     dict(frac=0.80, dx=0.0, dy=-0.04, flip=True, bright=0.90)),
]

# Characters of the demo dataset, in order: char_00001, char_00002, ...
#   kind "multi": one base crop per photo (several real photos of one person)
#   kind "single": SINGLE_PHOTO_VIEWS of one photo
#   kind "aligned": ALIGNED_VIEWS of one aligned face crop
CHARACTERS = [
    dict(person="Barack Obama", package="face_recognition", kind="multi",
         photos=["obama.jpg", "obama2.jpg", "obama3.jpg"]),
    dict(person="Joe Biden", package="face_recognition", kind="single",
         photos=["biden.jpg"]),
    dict(person="Tom Hanks (per the file name)", package="insightface", kind="aligned",
         photos=["Tom_Hanks_54745.png"]),
] + [
    dict(person=f"t1.jpg person {i} (unnamed)", package="insightface", kind="single",
         photos=[f"t1#{i}"])
    for i in range(1, 7)
]
# The four mask_*.jpg images are pictures of face masks alone (black, blue,
# green, white), not of a person; they are kept under photos/ for a later
# masked-face augmentation but make no character.


# --------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------

def ssl_context() -> ssl.SSLContext:
    """Honour pip's certificate setting (PIP_CERT) and the usual bundle vars."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        path = os.environ.get(var)
        if path and os.path.isfile(path):
            return ssl.create_default_context(cafile=path)
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(bundle):
        return ssl.create_default_context(cafile=bundle)
    return ssl.create_default_context()


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            for k, v in attrs:
                if k == "href" and v:
                    self.hrefs.append(v)


def _get(url: str, ctx: ssl.SSLContext, accept: str | None = None) -> bytes:
    headers = {"User-Agent": "likeness-prepare-data/1"}
    if accept:
        headers["Accept"] = accept
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, context=ctx, timeout=120) as resp:
        return resp.read()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(spec: dict, cache: Path, log) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / spec["filename"]
    if dest.exists():
        if sha256_file(dest) == spec["sha256"]:
            log(f"cached   {dest}")
            return dest
        log(f"checksum mismatch, re-downloading {dest}")
        dest.unlink()
    ctx = ssl_context()
    index_url = urllib.parse.urljoin(SIMPLE_INDEX, spec["project"] + "/")
    page = _get(index_url, ctx, accept="text/html").decode("utf-8", "replace")
    parser = _Links()
    parser.feed(page)
    url = None
    for href in parser.hrefs:
        full = urllib.parse.urljoin(index_url, href)
        parts = urllib.parse.urlsplit(full)
        if parts.path.rsplit("/", 1)[-1] == spec["filename"]:
            frag = urllib.parse.parse_qs(parts.fragment)
            index_sha = (frag.get("sha256") or [None])[0]
            if index_sha is not None and index_sha != spec["sha256"]:
                raise SystemExit(
                    f"error: PyPI index lists sha256 {index_sha} for {spec['filename']}, "
                    f"the script pins {spec['sha256']}")
            url = urllib.parse.urlunsplit(parts._replace(fragment=""))
            break
    if url is None:
        raise SystemExit(f"error: {spec['filename']} not found on {index_url}")
    log(f"download {url}")
    data = _get(url, ctx)
    got = hashlib.sha256(data).hexdigest()
    if got != spec["sha256"]:
        raise SystemExit(
            f"error: sha256 of downloaded {spec['filename']} is {got}, expected {spec['sha256']}")
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write `data`; leave the file (and its mtime) alone if equal."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def extract_images(tar_path: Path, spec: dict) -> dict[str, bytes]:
    """Read the pinned members (images + licence files) without extracting."""
    out: dict[str, bytes] = {}
    wanted = [spec["prefix"] + m for m in spec["members"]] + list(spec["licence_files"])
    with tarfile.open(tar_path, "r:gz") as tar:
        for name in wanted:
            member = tar.getmember(name)
            if not member.isfile():
                raise SystemExit(f"error: {name} in {tar_path.name} is not a regular file")
            out[name] = tar.extractfile(member).read()
    return out


# --------------------------------------------------------------------------
# Image processing
# --------------------------------------------------------------------------

def square_crop(img: Image.Image, cx: float, cy: float, side: float) -> Image.Image:
    """Square crop centred on (cx, cy), moved inwards to stay inside the image
    and shrunk if the image is smaller than `side`."""
    w, h = img.size
    side = min(side, w, h)
    x0 = min(max(cx - side / 2, 0), w - side)
    y0 = min(max(cy - side / 2, 0), h - side)
    box = tuple(int(round(v)) for v in (x0, y0, x0 + side, y0 + side))
    return img.crop(box)


def finish(crop: Image.Image, flip: bool, bright: float) -> Image.Image:
    out = crop.resize((OUT_SIZE, OUT_SIZE), Image.Resampling.LANCZOS)
    if flip:
        out = ImageOps.mirror(out)
    if bright != 1.0:
        out = ImageEnhance.Brightness(out).enhance(bright)
    return out


def face_view(img: Image.Image, box, scale, dx, dy, flip, bright) -> Image.Image:
    x0, y0, x1, y1 = box
    s = max(x1 - x0, y1 - y0)
    cx = (x0 + x1) / 2 + dx * s
    cy = (y0 + y1) / 2 + dy * s
    return finish(square_crop(img, cx, cy, scale * s), flip, bright)


def aligned_view(img: Image.Image, frac, dx, dy, flip, bright) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    return finish(square_crop(img, w / 2 + dx * s, h / 2 + dy * s, frac * s), flip, bright)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False,
                            progressive=False, subsampling="4:2:0")
    return buf.getvalue()


def photo_file(name: str) -> str:
    """'t1#3' -> 't1.jpg' (a face inside a group photo); other names unchanged."""
    base, sep, _ = name.partition("#")
    return base + ".jpg" if sep else name


def open_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def default_data_dir() -> Path:
    env = os.environ.get("LIKENESS_DATA")
    if env:
        return Path(env)
    # scripts/common.sh's and likeness_sdk::venv's defaults: LIKENESS_HOME, else
    # $XDG_CACHE_HOME/likeness, else ~/.cache/likeness.
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    home = os.environ.get("LIKENESS_HOME") or os.path.join(cache, "likeness")
    return Path(home) / "data"


def replace_tree(staging: Path, target: Path) -> None:
    """Swap a freshly built directory in place of `target` (no stale files)."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="output root (default: $LIKENESS_DATA or ~/.cache/likeness/data)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    data_dir: Path = args.data_dir.expanduser().resolve()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"prepare_data: {msg}", file=sys.stderr)

    # 1. sdists -> original photos
    photos: dict[str, dict[str, bytes]] = {}   # package -> image name -> bytes
    rows = []
    changed = 0
    for package, spec in SDISTS.items():
        tar_path = fetch_sdist(spec, data_dir / "sdists", log)
        members = extract_images(tar_path, spec)
        photos[package] = {}
        for m in spec["members"]:
            inner = spec["prefix"] + m
            blob = members[inner]
            photos[package][m] = blob
            changed += write_if_changed(data_dir / "photos" / package / m, blob)
            rows.append(f"| `{package}/{m}` | {spec['project']} | {spec['version']} | "
                        f"`{inner}` | `{spec['sha256'][:16]}…` |")
        if package == "face_recognition":
            for m in spec["members"]:
                changed += write_if_changed(data_dir / "faces" / m, members[spec["prefix"] + m])
        for lf in spec["licence_files"]:
            changed += write_if_changed(
                data_dir / "photos" / package / (f"{Path(lf).parts[0]}-{Path(lf).name}"), members[lf])
    changed += write_if_changed(data_dir / "photos" / "SOURCES.md",
                                SOURCES_MD.format(rows="\n".join(rows)).encode())

    # 2. demo bundles
    decoded: dict[str, Image.Image] = {}

    def source(package: str, name: str) -> Image.Image:
        f = photo_file(name)
        if f not in decoded:
            decoded[f] = open_rgb(photos[package][f])
        return decoded[f]

    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=".demo-bundles."))
    readme = [
        "# Demo bundles",
        "",
        "Seed 000's layout: `0/char_XXXXX/img_XXXXX.jpg`; the first image of each",
        "character (alphabetical order) is its reference. Every image is a",
        f"{OUT_SIZE}x{OUT_SIZE} JPEG (quality {JPEG_QUALITY}) cut from a real photograph",
        "around a hand-placed face box (see `FACE_BOXES` in `scripts/prepare_data.py`).",
        "Sources and licences: `../photos/SOURCES.md`. Generated by",
        "`scripts/prepare_data.py`; do not edit by hand.",
        "",
        "| character | person | image | source | view |",
        "|-----------|--------|-------|--------|------|",
    ]
    n_images = 0
    for ci, ch in enumerate(CHARACTERS, start=1):
        cdir = staging / "0" / f"char_{ci:05d}"
        cdir.mkdir(parents=True)
        pkg = ch["package"]
        spec = SDISTS[pkg]
        views = []  # (image, source description, view description)
        if ch["kind"] == "multi":
            for p in ch["photos"]:
                views.append((face_view(source(pkg, p), FACE_BOXES[p], CROP_SCALE, 0, 0, False, 1.0),
                              p, "face-centred crop 1.6x"))
        elif ch["kind"] == "single":
            (p,) = ch["photos"]
            for _tag, desc, kw in SINGLE_PHOTO_VIEWS:
                views.append((face_view(source(pkg, p), FACE_BOXES[p], **kw), p, desc))
        elif ch["kind"] == "aligned":
            (p,) = ch["photos"]
            for _tag, desc, kw in ALIGNED_VIEWS:
                views.append((aligned_view(source(pkg, p), **kw), p, desc))
        for ii, (img, p, desc) in enumerate(views, start=1):
            name = f"img_{ii:05d}.jpg"
            (cdir / name).write_bytes(jpeg_bytes(img))
            n_images += 1
            src = f"{spec['project']} {spec['version']} `{spec['prefix']}{photo_file(p)}`"
            if p in FACE_BOXES:
                src += f", face box {FACE_BOXES[p]}"
            readme.append(f"| char_{ci:05d} | {ch['person']} | {name} | {src} | {desc} |")
    readme += [
        "",
        "Obama's three images are three different photographs; every other character",
        "has one photograph and deterministic views derived from it (flip, crops at",
        "other zooms and offsets, brightness x0.9/x1.1), so identity metrics on them",
        "are optimistic. The `t1.jpg` people are left unnamed on purpose.",
        "",
    ]
    (staging / "README.md").write_text("\n".join(readme))
    for p in sorted(staging.rglob("*")):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(staging, 0o755)
    replace_tree(staging, data_dir / "demo-bundles")

    print(f"prepared {data_dir}: {len(CHARACTERS)} characters, {n_images} images in "
          f"demo-bundles/0; {sum(len(v) for v in photos.values())} source photos; "
          f"{len(SDISTS['face_recognition']['members'])} raw faces; "
          f"{changed} source files (re)written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
