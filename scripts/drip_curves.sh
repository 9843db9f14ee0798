#!/usr/bin/env bash
# Issue 8's "short CPU run": DRIP on a tiny random SD1.5 (tests/python/make_tiny_sd15.py --preset
# tiny) with the real photographs of the set-up ($LIKENESS_DATA/photos/face_recognition in DRIP's
# person_*/{orig.jpg, ref_face.jpg, prompt.txt} layout), trained twice with the same seed:
#   on:  L = λ_face·L_face + λ_recon·L_recon   (λ_face = 1, λ_recon = 0.1, DRIP's)
#   off: L = λ_recon·L_recon                   (the metric only measures)
# and writes both runs' curves — diffusion loss, identity term, identity similarity of the
# validation x̂0 to ref_face — from their metrics.jsonl into one PNG and a markdown table.
#   scripts/drip_curves.sh [OUT_DIR]     (default runs/drip-curves; LIKENESS_DRIP_STEPS=N, default 24)
# Writes OUT_DIR/{on,off}/ (the runs), OUT_DIR/drip_curves.png and OUT_DIR/drip_curves.md; copy the
# table into docs/drip-sd15.md. The metric is `dlib` with detector = "none" (the whole 64×64
# image is the face): the random VAE decodes noise-like images in which MTCNN finds no face, so
# `mtcnn-reid` would report no_face for every sample. Needs the set-up (scripts/setup.sh) and the
# built plugins (scripts/build.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -x "$LIKENESS_PYTHON" ]] || { log "error: $LIKENESS_PYTHON is missing: run bash scripts/setup.sh"; exit 1; }
cd "$REPO"
out=$(realpath -m "${1:-runs/drip-curves}")
steps=${LIKENESS_DRIP_STEPS:-24}
host="${CARGO_TARGET_DIR:-$REPO/target}/release/host"
plugins="${CARGO_TARGET_DIR:-$REPO/target}/release/plugins"
[[ -x "$host" && -d "$plugins/sd15-lora" && -d "$plugins/dlib" ]] || {
    log "error: $host or the staged sd15-lora/dlib plugins are missing: run bash scripts/build.sh"; exit 1; }
mkdir -p "$out"
tiny="$out/tiny-sd15"
"$LIKENESS_PYTHON" tests/python/make_tiny_sd15.py --out "$tiny" --preset tiny >"$out/make_tiny.log" 2>&1 ||
    { log "error: make_tiny_sd15.py failed (see $out/make_tiny.log)"; exit 1; }

# Six people: four train, two held out for the identity-similarity curve.
photos="$LIKENESS_DATA/photos/face_recognition"
data="$out/dataset"
rm -rf "$data"
person() { # person N ORIG REF PROMPT
    mkdir -p "$data/person_$1"
    cp "$photos/$2" "$data/person_$1/orig.jpg" && cp "$photos/$3" "$data/person_$1/ref_face.jpg" ||
        { log "error: $photos/$2 or $3 missing: run bash scripts/setup.sh"; exit 1; }
    echo "$4" >"$data/person_$1/prompt.txt"
}
person 001 obama.jpg obama2.jpg "a photo of barack obama smiling"
person 002 obama3.jpg obama.jpg "a portrait of barack obama"
person 003 obama2.jpg obama3.jpg "barack obama in a suit"
person 004 biden.jpg biden.jpg "a photo of joe biden"
person 005 obama_partial_face.jpg obama.jpg "a close-up of barack obama"
person 006 obama_partial_face2.jpg obama2.jpg "barack obama, partial face"

run() { # run NAME L_FACE
    rm -rf "$out/$1"
    log "run $1: --l_face $2, $steps steps"
    "$host" --plugin-dir "$plugins" train --plugin sd15-lora --data_root "$data" --pretrained_model "$tiny" \
        --resolution 64 --batch_size 2 --lr 5e-3 --steps "$steps" --l_face "$2" --l_recon 0.1 \
        --metric dlib --output "$out/$1" --no-progress \
        --set metric.config.detector='"none"' --set metric.identity_weighting='"timestep"' \
        --set model.config.min_snr_gamma=5.0 --set model.config.lora_rank=4 --set model.config.sample_steps=2 \
        --set train.schedule='"constant"' --set train.sample_count=1 --set sample.every_steps=100000 \
        --set train.save_every=0 --set data.val_fraction=0.34 --set data.test_fraction=0 \
        >"$out/$1.log" 2>&1 || { log "error: run $1 failed (see $out/$1.log)"; tail -5 "$out/$1.log"; exit 1; }
}
t0=$(date +%s)
run on 1.0
run off 0.0
log "both runs in $(( $(date +%s) - t0 )) s"

"$LIKENESS_PYTHON" - "$out" <<'EOF'
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

out = sys.argv[1]
runs = {}
for name in ("on", "off"):
    recs = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl")) if l.strip()]
    train = [r for r in recs if r.get("type") == "train"]
    val = [r for r in recs if r.get("type") == "val"]
    runs[name] = dict(
        steps=[r["step"] for r in train],
        diffusion=[r["terms"].get("model") for r in train],
        identity=[r["terms"].get("identity.dlib") for r in train],
        vsteps=[r["step"] for r in val],
        vdiffusion=[r["terms"].get("model") for r in val],
        similarity=[r.get("identity_similarity") for r in val],
    )
fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
for name, style in (("on", "-"), ("off", "--")):
    r = runs[name]
    ax[0].plot(r["steps"], r["diffusion"], style, label=f"identity {name}: train")
    ax[0].plot(r["vsteps"], r["vdiffusion"], style, marker="o", label=f"identity {name}: validation")
    if any(v is not None for v in r["identity"]):
        ax[1].plot(r["steps"], r["identity"], style, label=f"identity {name}")
    ax[2].plot(r["vsteps"], r["similarity"], style, marker="o", label=f"identity {name}")
ax[0].set_title("diffusion loss (L_recon, unweighted)")
ax[1].set_title("identity term (timestep-weighted 1 − cos), train")
ax[2].set_title("identity similarity x̂0 vs ref_face (dlib cos), validation")
for a in ax:
    a.set_xlabel("optimizer step")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
fig.suptitle("DRIP short CPU run: tiny random SD1.5, real photos, 64×64 (random VAE: tests the gradient path, not likeness)")
fig.tight_layout()
fig.savefig(os.path.join(out, "drip_curves.png"), dpi=110)

def mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else float("nan")

def f(x):
    return "n/a" if x is None or x != x else f"{x:.4f}"

rows = ["| run | steps | diffusion loss, first 4 steps | diffusion loss, last 4 steps | identity term, first 4 | identity term, last 4 | val diffusion loss, first → last | val identity similarity, first → last |",
        "|---|---|---|---|---|---|---|---|"]
for name in ("on", "off"):
    r = runs[name]
    rows.append("| identity " + name + f" | {len(r['steps'])} | {f(mean(r['diffusion'][:4]))} | {f(mean(r['diffusion'][-4:]))} | "
                f"{f(mean(r['identity'][:4]))} | {f(mean(r['identity'][-4:]))} | "
                f"{f(r['vdiffusion'][0])} → {f(r['vdiffusion'][-1])} | {f(r['similarity'][0])} → {f(r['similarity'][-1])} |")
sims = "\n".join(f"- identity {n}: " + ", ".join(f"{s}:{f(v)}" for s, v in zip(runs[n]['vsteps'], runs[n]['similarity'])) for n in ("on", "off"))
md = "\n".join(rows) + "\n\nValidation identity similarity by step:\n" + sims + "\n"
open(os.path.join(out, "drip_curves.md"), "w").write(md)
print(md)
EOF
log "wrote $out/drip_curves.png and $out/drip_curves.md"
