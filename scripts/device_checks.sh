#!/usr/bin/env bash
# The GPU checks of issue 18 (kernels/), in two halves:
#
#   scripts/device_checks.sh stage   # here, no GPU needed: build the GPU test binary and the
#                                    # bench, copy them to target/device/ (a few MB: carry it)
#   scripts/device_checks.sh run     # on the lent GPU machine (H100): run them, results in $OUT
#
# `run` needs no cargo: it uses target/device/ (or builds it with cargo when cargo is there).
# NVRTC (libnvrtc.so.13 + the CUDA headers) comes from the torch venv, LIKENESS_NVRTC /
# LIKENESS_CUDA_INCLUDE, or a CUDA 13 toolkit in /usr/local/cuda*; the torch baseline of the bench
# needs a python with torch (the venv's, else python3), and is skipped with a note otherwise.
# Budget: the tests take seconds, the two benches well under a minute; every step has a timeout.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
STAGE="$REPO/target/device"
OUT="${OUT:-$REPO/target/device-out}"

stage() {
    log "building the GPU tests and the bench of likeness-kernels"
    local msgs
    msgs="$(cargo test --release -p likeness-kernels --test gpu --no-run --message-format=json)"
    cargo build --release -p likeness-kernels --example bench_kernels
    mkdir -p "$STAGE"
    # The test executable's path is in cargo's JSON ("executable":"…/gpu-<hash>").
    local exe
    exe="$(grep -o '"executable":"[^"]*/gpu-[^"]*"' <<<"$msgs" | tail -1 | cut -d'"' -f4)"
    [[ -x "$exe" ]] || { echo "device_checks: no gpu test executable in cargo's output" >&2; exit 1; }
    cp "$exe" "$STAGE/gpu"
    cp "$CARGO_TARGET_DIR/release/examples/bench_kernels" "$STAGE/bench_kernels"
    cp kernels/bench/bench_torch.py "$STAGE/"
    # PTX for sm_80/sm_90, so that a GPU machine without libnvrtc (105 MB, over what is carried)
    # still runs the kernels; with NVRTC there, the bench compiles afresh and times it.
    "$STAGE/bench_kernels" --stage-ptx "$STAGE/ptx-cache"
    du -sh "$STAGE" >&2
    log "staged in $STAGE: carry target/device to the GPU machine and run '$0 run'"
}

# Points NVRTC at a libnvrtc and headers when the venv has none (a toolkit on the machine).
find_nvrtc() {
    local d
    for d in "$VENV"/lib/python3*/site-packages/nvidia/cu13 /usr/local/cuda-13* /usr/local/cuda; do
        if [[ -z "${LIKENESS_NVRTC:-}" ]]; then
            for f in "$d"/lib/libnvrtc.so.13 "$d"/lib64/libnvrtc.so.13; do
                [[ -f "$f" ]] && export LIKENESS_NVRTC="$f"
            done
        fi
        if [[ -z "${LIKENESS_CUDA_INCLUDE:-}" && -f "$d/include/cuda_bf16.h" ]]; then
            export LIKENESS_CUDA_INCLUDE="$d/include"
        fi
    done
    echo "LIKENESS_NVRTC=${LIKENESS_NVRTC:-<not found: the tests will say so>}" >&2
    echo "LIKENESS_CUDA_INCLUDE=${LIKENESS_CUDA_INCLUDE:-<not found>}" >&2
}

run() {
    mkdir -p "$OUT"
    [[ -x "$STAGE/gpu" ]] || { command -v cargo >/dev/null && stage; }
    find_nvrtc
    export LIKENESS_PTX_CACHE="$STAGE/ptx-cache"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia-smi.csv" 2>&1 || true
    local rc=0
    log "GPU tests (LIKENESS_REQUIRE_GPU=1: a missing GPU fails)"
    LIKENESS_REQUIRE_GPU=1 timeout 240 "$STAGE/gpu" --test-threads=1 --nocapture >"$OUT/gpu_tests.log" 2>&1 || rc=$?
    tail -5 "$OUT/gpu_tests.log" >&2
    log "bench: our kernels"
    timeout 120 "$STAGE/bench_kernels" 50 >"$OUT/bench_kernels.json" 2>"$OUT/bench_kernels.err" || rc=$?
    cat "$OUT/bench_kernels.json" >&2
    local py="$LIKENESS_PYTHON"
    [[ -x "$py" ]] || py="$(command -v python3 || true)"
    if [[ -n "$py" ]] && "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        log "bench: torch baselines ($py)"
        timeout 180 "$py" "$STAGE/bench_torch.py" 50 >"$OUT/bench_torch.json" 2>"$OUT/bench_torch.err" || rc=$?
        ratios "$py" | tee "$OUT/ratios.txt" >&2 || rc=$?
    else
        echo "no python with CUDA torch here: torch baselines skipped" | tee "$OUT/ratios.txt" >&2
    fi
    log "results in $OUT (exit $rc)"
    return "$rc"
}

# torch time / our time for each comparison (> 1: the kernels are faster).
ratios() {
    "$1" - "$OUT/bench_kernels.json" "$OUT/bench_torch.json" <<'PY'
import json, sys
ours, torch = (json.load(open(p)) for p in sys.argv[1:3])
base = torch["torch_base_fwd_ms"] + torch["torch_base_bwd_ms"]
mine = ours["lora_fwd_ms"] + ours["lora_bwd_ms"]
sep = torch["torch_lora_fwd_ms"] + torch["torch_lora_bwd_ms"]
rows = [
    ("LoRA rank-16 branch fwd (torch ops / fused)", torch["torch_lora_fwd_ms"] / ours["lora_fwd_ms"]),
    ("LoRA rank-16 branch bwd (torch ops / fused)", torch["torch_lora_bwd_ms"] / ours["lora_bwd_ms"]),
    ("LoRA branch fwd+bwd, torch autograd / fused", torch["torch_lora_autograd_fwd_bwd_ms"] / mine),
    ("whole layer fwd+bwd incl. base GEMMs (torch / fused)", (base + sep) / (base + mine)),
    ("embedding similarity (torch / ours)", torch["torch_embed_ms"] / ours["embed_ms"]),
    ("AdamW 228 tensors (torch foreach / ours)", torch["torch_adamw_foreach_ms"] / ours["adamw_228x49152_ms"]),
    ("AdamW 228 tensors (torch fused / ours)", torch["torch_adamw_fused_ms"] / ours["adamw_228x49152_ms"]),
]
what = "NVRTC compile + load" if ours["nvrtc_compiled"] else "load of staged PTX"
print(f"device {torch['device']}, torch {torch['torch']}, {what} {ours['nvrtc_compile_and_load_s']} s")
for name, r in rows:
    print(f"{name:55s} {r:6.2f}x")
PY
}

case "${1:-}" in
    stage) stage ;;
    run) run ;;
    *) echo "usage: $0 stage|run" >&2; exit 2 ;;
esac
