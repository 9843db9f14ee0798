#!/usr/bin/env bash
# The CLIP bench (issue 7, Benchmark): image-tower (and text-tower) throughput of likeness-clip
# (libtorch via tch) against transformers' CLIPModel get_image_features / get_text_features, on
# the same ViT-B/32-shaped random weights saved by transformers, the same preprocessed batch of
# 8 224x224 images (and 8 prompts of 77 tokens), fp32, the same thread count, in one run.
#   scripts/bench_clip.sh
#   LIKENESS_BENCH_RUNS=N      timed calls per side and tower (default 5; one warm-up first)
#   LIKENESS_BENCH_THREADS     intra-op threads on both sides (default 2)
#   LIKENESS_BENCH_BATCH       images (and texts) per call (default 8)
# The Python side runs first and writes the model, the inputs and its timings; the Rust example
# then times the same calls, checks it computed the same embeddings, and prints images/s (min and
# median over the calls) and the ratios. The machine's other load moves every absolute number;
# compare the ratios of one run. Not part of the test suite.
# Needs the set-up (scripts/setup.sh: the venv).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -x "$LIKENESS_PYTHON" ]] || { log "error: $LIKENESS_PYTHON is missing: run bash scripts/setup.sh"; exit 1; }
runs="${LIKENESS_BENCH_RUNS:-5}"
threads="${LIKENESS_BENCH_THREADS:-2}"
batch="${LIKENESS_BENCH_BATCH:-8}"
cd "$REPO"
log "cargo build --release -p likeness-clip --example bench_clip"
cargo build --release -p likeness-clip --example bench_clip
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
log "python: transformers CLIPModel, ViT-B/32 shape, batch $batch, $runs calls, $threads threads"
"$LIKENESS_PYTHON" tests/python/bench_clip.py --out "$dir" --repeats "$runs" --threads "$threads" --batch "$batch"
log "rust: likeness-clip towers"
"$REPO/target/release/examples/bench_clip" --dir "$dir" --repeats "$runs" --threads "$threads"
