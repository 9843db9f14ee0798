#!/usr/bin/env bash
# The diffusion benches (issues 8 and 15): our `host train --plugin sd15-lora|flux-lora` /
# `host generate` (the real binary and plugin, whole processes) against diffusers 0.42.1 + peft
# (tests/python/bench_<backbone>.py) on the same model folder, in one run, as ratios:
#   training  median step time, fp32 vs fp32 and bf16 vs bf16 (ours: base weights bf16, LoRA
#             fp32; diffusers: torch.autocast bf16 over fp32 weights), and fp32 with gradient
#             checkpointing on both sides (diffusers: enable_gradient_checkpointing())
#   sampling  seconds per image (same steps, size and guidance)
#   memory    peak RSS of each process (/usr/bin/time -v for ours, ru_maxrss for Python)
#   scripts/bench_diffusion.sh sd15|flux|qwen [OUT_DIR]   (default runs/bench-<backbone>)
#   (scripts/bench_sd15.sh OUT and scripts/bench_flux.sh OUT call this)
# Env: LIKENESS_BENCH_STEPS (timed training steps, default 5, after 2 untimed),
#      LIKENESS_BENCH_THREADS (default 2), LIKENESS_BENCH_SAMPLE_STEPS (default 10).
# sd15: make_tiny_sd15.py --preset half (SD1.5's UNet widths halved 160/320/640/640,
#   cross-attention 768, 2 layers per block; a small VAE of factor 8), 256×256 images → 32×32
#   latents, batch 2, LoRA rank 16 on to_q/to_k/to_v/to_out.0, AdamW; DDIM sampling, CFG 7.5.
# flux: make_tiny_flux.py --preset bench (width 384, 2 double + 4 single blocks, a factor-8
#   16-channel VAE), 256×256 images → 32×32 latents → 256 packed tokens + 128 T5 tokens, batch 2,
#   LoRA rank 16 on both streams' attention (`attn`), flow matching with uniform σ, guidance
#   embedding 1.0; FluxPipeline sampling with embedded guidance 3.5.
# qwen: make_tiny_qwen_edit.py --preset bench (width 384 = 6 heads × 64, 4 blocks, Qwen2.5-VL text
#   hidden 128, a factor-8 VAE of base_dim 32), a musubi dataset.toml (two 256² targets, one control
#   each at 256²) → 256 target + 256 control tokens + the VL prompt's tokens, batch 1, LoRA rank 16
#   on musubi-tuner's 14 Linears per block (`musubi`), musubi-tuner's edit-plus step
#   (tests/python/bench_qwen.py); QwenImageEditPlusPipeline sampling, true CFG 4 with the
#   negative prompt "". Both sides cache every encoding, as musubi-tuner does: ours the target
#   latents, the caption + control's Qwen2.5-VL embedding and the control's latents (the untimed
#   1-step run fills the cache), the Python loop encodes them once before its clock
#   (bench_qwen.py --cached-encoders); its per-step encoder cost is then 0.
# Ours trains on cached latents and text embeddings (cache on and built by an untimed 1-step run
# first, decode_pixels = false: the diffusion loss only), which is the Python loop's "fixed
# latents and text embeddings". Ours' step time is read from metrics.jsonl's it_s (the optimizer
# step, host-measured), Python's from perf_counter around the step. The machine's other load
# moves every absolute number; compare ratios from one run.
# Needs the set-up (scripts/setup.sh) and the built plugins (scripts/build.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -x "$LIKENESS_PYTHON" ]] || { log "error: $LIKENESS_PYTHON is missing: run bash scripts/setup.sh"; exit 1; }
cd "$REPO"
backbone=${1:-}
case "$backbone" in
    sd15) plugin=sd15-lora; maker=(tests/python/make_tiny_sd15.py --preset half); cfg=7.5
          extra=(); label="DDIM steps, cfg $cfg" ;;
    flux) plugin=flux-lora; maker=(tests/python/make_tiny_flux.py --preset bench); cfg=3.5
          extra=(--set model.config.max_sequence_length=128 --set 'model.config.lora_targets=["attn"]')
          label="Euler steps, embedded guidance $cfg" ;;
    qwen) plugin=qwen-edit-lora; maker=(tests/python/make_tiny_qwen_edit.py --preset bench); cfg=4
          # sample_steps ≥ 2: the scheduler's shift_terminal needs a last σ below 1 (the train runs'
          # sample_steps=1 is only a default nothing samples with).
          extra=(--set 'model.config.lora_targets=["musubi"]' --set model.config.sample_steps=2)
          label="Euler steps, true CFG $cfg, one 256² control" ;;
    *) log "usage: scripts/bench_diffusion.sh sd15|flux|qwen [OUT_DIR]"; exit 2 ;;
esac
out=$(realpath -m "${2:-runs/bench-$backbone}")
steps=${LIKENESS_BENCH_STEPS:-5}
warmup=2
threads=${LIKENESS_BENCH_THREADS:-2}
sample_steps=${LIKENESS_BENCH_SAMPLE_STEPS:-10}
host="${CARGO_TARGET_DIR:-$REPO/target}/release/host"
plugins="${CARGO_TARGET_DIR:-$REPO/target}/release/plugins"
[[ -x "$host" && -d "$plugins/$plugin" ]] || {
    log "error: $host or the staged $plugin plugin is missing: run bash scripts/build.sh"; exit 1; }
mkdir -p "$out"
model="$out/model"
"$LIKENESS_PYTHON" "${maker[@]}" --out "$model" >"$out/make_model.log" 2>&1 ||
    { log "error: ${maker[0]} failed (see $out/make_model.log)"; exit 1; }
# libtorch (ours and torch's) sizes its pool from OMP_NUM_THREADS; Python also calls set_num_threads.
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

# Two 256×256 examples (real photographs) in DRIP's layout: one batch of 2 per step; for qwen a
# musubi dataset.toml of the same two photographs as targets, each with one control (batch 1).
data="$out/dataset"
rm -rf "$data"
photos="$LIKENESS_DATA/photos/face_recognition"
if [[ $backbone == qwen ]]; then
    mkdir -p "$data/img" "$data/ctl"
    for i in 1 2; do
        cp "$photos/obama.jpg" "$data/img/p$i.jpg"
        cp "$photos/obama2.jpg" "$data/ctl/p$i.jpg"
        echo "a photo of a person $i" >"$data/img/p$i.txt"
    done
    printf '[general]\nresolution = [256, 256]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = false\n\n[[datasets]]\nimage_directory = "%s"\ncontrol_directory = "%s"\ncache_directory = "%s"\n' \
        "$data/img" "$data/ctl" "$out/cache" >"$data/dataset.toml"
    # The control as the dataset's 256² bucket makes it, for `host generate --control` and Python.
    "$LIKENESS_PYTHON" -c "import sys; sys.path.insert(0, 'tests/python'); import bench_qwen; bench_qwen.image(sys.argv[1], 256).save(sys.argv[2])" \
        "$photos/obama2.jpg" "$data/control.png"
    train_data=(--dataset_config "$data/dataset.toml" --dit "$model" --batch_size 1)
    py_extra=(--target "$photos/obama.jpg" --control "$data/control.png" --cached-encoders)
    sample_extra=(--control "$data/control.png")
else
    for i in 1 2; do
        mkdir -p "$data/person_00$i"
        cp "$photos/obama.jpg" "$data/person_00$i/orig.jpg"
        cp "$photos/obama2.jpg" "$data/person_00$i/ref_face.jpg"
        echo "a photo of a person $i" >"$data/person_00$i/prompt.txt"
    done
    train_data=(--data_root "$data" --pretrained_model "$model" --resolution 256 --batch_size 2)
    py_extra=()
    sample_extra=()
fi

ours_train() { # ours_train NAME PRECISION STEPS [--set KEY=VALUE ...]
    local run="$out/ours-train-$1" precision=$2 n=$3
    shift 3
    rm -rf "$run"
    /usr/bin/time -v -o "$run.time" "$host" --plugin-dir "$plugins" train --plugin "$plugin" "${train_data[@]}" \
        --lr 1e-4 --steps "$n" \
        --output "$run" --no-progress --set cache.dir="\"$out/cache\"" \
        --set model.config.precision="\"$precision\"" --set model.config.lora_rank=16 --set model.config.lora_alpha=16 \
        --set model.config.decode_pixels=false --set model.config.sample_steps=1 --set train.schedule='"constant"' \
        --set data.val_fraction=0 --set data.test_fraction=0 --set train.save_every=0 --set train.sample_count=1 \
        --set sample.every_steps=100000 "${extra[@]}" "$@" >"$run.log" 2>&1 || { log "error: ours train $run failed"; tail -5 "$run.log"; exit 1; }
}
py_train() { # py_train NAME PRECISION [--checkpointing]
    local name=$1 precision=$2
    shift 2
    "$LIKENESS_PYTHON" "tests/python/bench_$backbone.py" train --model "$model" --steps "$steps" --warmup "$warmup" \
        --precision "$precision" --threads "$threads" --json "$out/py-train-$name.json" "${py_extra[@]}" "$@" >"$out/py-train-$name.log" 2>&1 ||
        { log "error: python train $name failed"; tail -5 "$out/py-train-$name.log"; exit 1; }
}
ours_sample() {
    rm -rf "$out/ours-sample"
    RUST_LOG=info /usr/bin/time -v -o "$out/ours-sample.time" "$host" --plugin-dir "$plugins" generate \
        --plugin "$plugin" --pretrained_model "$model" --prompt "a photo of a person" --prompt "a photo of a person" \
        --prompt "a photo of a person" --steps "$sample_steps" --cfg "$cfg" --width 256 --height 256 --seed 0 "${extra[@]}" "${sample_extra[@]}" \
        --output "$out/ours-sample" >"$out/ours-sample.log" 2>&1 || { log "error: ours sample failed"; tail -5 "$out/ours-sample.log"; exit 1; }
}
py_sample() {
    "$LIKENESS_PYTHON" "tests/python/bench_$backbone.py" sample --model "$model" --images 2 --steps "$sample_steps" \
        --size 256 --cfg "$cfg" --threads "$threads" --json "$out/py-sample.json" "${py_extra[@]}" >"$out/py-sample.log" 2>&1 ||
        { log "error: python sample failed"; tail -5 "$out/py-sample.log"; exit 1; }
}
t0=$(date +%s)
for p in fp32 bf16; do
    # The latents and text embeddings are cached first, by a 1-step run into the shared cache
    # (untimed): the Python loop's fixed latents and embeddings are made before its clock
    # starts too. The timed run then finds every encoding cached and never loads the VAE or
    # the text encoder (sd15-lora loads them on first use).
    log "train $p: ours (building the encoding cache)"; ours_train "cache-$p" $p 1
    log "train $p: ours"; ours_train $p $p $((warmup + steps))
    log "train $p: diffusers + peft"; py_train $p $p
done
log "train fp32 + gradient checkpointing: ours"
ours_train fp32-ckpt fp32 $((warmup + steps)) --set model.config.gradient_checkpointing=true
log "train fp32 + gradient checkpointing: diffusers + peft"; py_train fp32-ckpt fp32 --checkpointing
log "sample: ours"; ours_sample
log "sample: diffusers"; py_sample
if [[ $backbone == flux || $backbone == qwen ]]; then
    log "FLOP count of a training step and this machine's sgemm throughput"
    "$LIKENESS_PYTHON" "tests/python/bench_$backbone.py" flops --model "$model" --threads "$threads" --json "$out/flops.json" "${py_extra[@]}" \
        >"$out/flops.log" 2>&1 || { log "error: flops failed"; tail -5 "$out/flops.log"; exit 1; }
fi
log "bench finished in $(( $(date +%s) - t0 )) s"

"$LIKENESS_PYTHON" - "$out" "$warmup" "$backbone" "$plugin" "$label" <<'EOF'
import datetime, json, os, re, statistics, sys
out, warmup, backbone, plugin, sample_label = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def rss(path):  # /usr/bin/time -v: "Maximum resident set size (kbytes): N"
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read())
    return int(m.group(1)) * 1024

def ours_steps(run):
    recs = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    return [1.0 / r["it_s"] for r in recs if r.get("type") == "train"][warmup:]

rows = []
gb = lambda b: f"{b / 1e9:.2f} GB"
for p in ("fp32", "bf16", "fp32-ckpt"):
    o = ours_steps(os.path.join(out, f"ours-train-{p}"))
    py = json.load(open(os.path.join(out, f"py-train-{p}.json")))
    om, pm = statistics.median(o), py["median_step_s"]
    ro, rp = rss(os.path.join(out, f"ours-train-{p}.time")), py["peak_rss_bytes"]
    label = "fp32 + gradient checkpointing" if p == "fp32-ckpt" else p
    rows.append(f"| train {label} | {om:.3f} s/step ({len(o)} steps, {min(o):.3f}–{max(o):.3f}) | {pm:.3f} s/step "
                f"({min(py['step_seconds']):.3f}–{max(py['step_seconds']):.3f}) | **{pm / om:.2f}×** | {gb(ro)} | {gb(rp)} | **{rp / ro:.2f}×** |")
# ours: seconds between consecutive "generated" log lines (the first image includes no load, but
# is warm-up as Python's first call is).
stamps = []
for l in open(os.path.join(out, "ours-sample.log")):
    if "generated" in l:
        t = re.match(r"(\S+)Z", l).group(1)
        stamps.append(datetime.datetime.fromisoformat(t))
o = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
py = json.load(open(os.path.join(out, "py-sample.json")))
om, pm = statistics.median(o), py["median_image_s"]
ro, rp = rss(os.path.join(out, "ours-sample.time")), py["peak_rss_bytes"]
rows.append(f"| sample fp32 ({py['steps']} {sample_label}, {py['size']}²) | {om:.3f} s/image ({1 / om:.3f} img/s) "
            f"| {pm:.3f} s/image ({1 / pm:.3f} img/s) | **{pm / om:.2f}×** | {gb(ro)} | {gb(rp)} | **{rp / ro:.2f}×** |")
md = (f"| figure | ours (host + {plugin}) | diffusers (+ peft) | speed-up (theirs / ours) | peak RSS ours | peak RSS theirs | memory ratio (theirs / ours) |\n"
      "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
if backbone == "qwen":
    enc = {p: json.load(open(os.path.join(out, f"py-train-{p}.json"))) for p in ("fp32", "bf16", "fp32-ckpt")}
    tok = enc["fp32"]["tokens"]
    md += ("\nEncodings cached on both sides (the caption + control's Qwen2.5-VL embedding, the control's and the "
           f"target's latents); {tok['image']} image + {tok['text']} text tokens. "
           "The Python loop's encoder share of its median step (0 when cached): "
           + ", ".join(f"{p} {e['median_encoder_s']:.3f} s of {e['median_step_s']:.3f} s" for p, e in enc.items()) + ".\n")
fl = os.path.join(out, "flops.json")
if os.path.exists(fl):
    f = json.load(open(fl))
    om = statistics.median(ours_steps(os.path.join(out, "ours-train-fp32")))
    pm = json.load(open(os.path.join(out, "py-train-fp32.json")))["median_step_s"]
    g = f["train_step_flops"]  # qwen: the encoders are cached on both sides, not in the step
    md += (f"\nfp32 training step: {g / 1e9:.1f} GFLOP (torch.utils.flop_counter"
           + (f"; the cached encoders' {f['encoder_flops'] / 1e9:.1f} not counted" if "encoder_flops" in f else "") + f"); ours {g / om / 1e9:.1f} GFLOP/s "
           f"= {g / om / f['sgemm_flops_per_s']:.0%} of this machine's {f['sgemm_flops_per_s'] / 1e9:.0f} GFLOP/s sgemm "
           f"({f['threads']} threads), diffusers {g / pm / 1e9:.1f} GFLOP/s = {g / pm / f['sgemm_flops_per_s']:.0%}.\n")
    steps = py["steps"]
    fw = steps * (2 if backbone == "qwen" else 1)  # true CFG: two forwards a step
    fs = f["sample_forward_flops"] * fw
    os_, ps_ = statistics.median(o), json.load(open(os.path.join(out, "py-sample.json")))["median_image_s"]
    md += (f"sampling: {fs / 1e9:.1f} GFLOP per image in the transformer ({fw} forwards; VAE decode and text "
           f"encoders not counted); ours ≥ {fs / os_ / 1e9:.1f} GFLOP/s, diffusers ≥ {fs / ps_ / 1e9:.1f} GFLOP/s: "
           f"the same libtorch kernels run the same ops, so parity is the ceiling there.\n")
open(os.path.join(out, f"bench_{backbone}.md"), "w").write(md)
print(md)
EOF
