#!/usr/bin/env bash
# The eval-faces bench: `host eval-faces --metric arcface` against insightface 0.7.3's Python
# FaceAnalysis on the same generated buffalo_l ONNX files and the same images, in one run.
#   scripts/bench.sh            (LIKENESS_BENCH_RUNS=N timed runs per side, default 3)
# Reports, in one run: steady-state and end-to-end ratios for fp32 and (on CPUs with
# AVX512_BF16) the arcface plugin's `precision = "bf16"`, detection+embedding images/s per
# pipeline variant, bf16-vs-fp32 decision flips at seed 004's bands, the cached-graph load time,
# and the recognizer's GFLOP/s against the measured FMA peak. The machine's other load moves
# every absolute number; compare ratios from the same run.
# Needs the set-up (scripts/setup.sh: venv + data); builds and stages the plugins first.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -x "$LIKENESS_PYTHON" ]] || { log "error: $LIKENESS_PYTHON is missing: run bash scripts/setup.sh"; exit 1; }
bash "$REPO/scripts/build.sh"
cd "$REPO"
export LIKENESS_DATA LIKENESS_PYTHON
log "cargo bench -p likeness-plugin-arcface --bench eval_faces"
cargo bench -p likeness-plugin-arcface --bench eval_faces "$@"
