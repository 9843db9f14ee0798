#!/usr/bin/env bash
# The MTCNN bench (issue 7, Benchmark): detection + crop + embedding images/s of ours (likeness-mtcnn
# + the mtcnn-reid metric's crop and OSNet, libtorch via tch) against facenet-pytorch 2.6.0's
# Python MTCNN + extract_face + torchreid 0.2.5's OSNet, on the same photos, the same MTCNN
# weights, the same random OSNet weights, fp32, the same thread count, in one run.
#   scripts/bench_mtcnn.sh [--profile]
#   LIKENESS_BENCH_RUNS=N   timed passes per side over all photos (default 3; one warm-up first)
#   LIKENESS_BENCH_THREADS  intra-op threads on both sides (default 2)
#   LIKENESS_BENCH_ARCH     osnet_x1_0 (default) or osnet_x0_25
# The Python side runs first and writes the decoded photos, the OSNet weights and its timings;
# the Rust example then times the same work, checks that both computed the same faces and
# embeddings, and prints images/s per stage and the ratios. The machine's other load moves
# every absolute number; compare the ratios of one run.
# Needs the set-up (scripts/setup.sh: venv + data).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -x "$LIKENESS_PYTHON" ]] || { log "error: $LIKENESS_PYTHON is missing: run bash scripts/setup.sh"; exit 1; }
photos="$LIKENESS_DATA/photos"
[[ -d "$photos/face_recognition" && -d "$photos/insightface" ]] ||
    { log "error: $photos/{face_recognition,insightface} missing: run bash scripts/setup.sh"; exit 1; }
runs="${LIKENESS_BENCH_RUNS:-3}"
threads="${LIKENESS_BENCH_THREADS:-2}"
arch="${LIKENESS_BENCH_ARCH:-osnet_x1_0}"
cd "$REPO"
log "cargo build --release -p likeness-plugin-mtcnn-reid --example bench_mtcnn"
cargo build --release -p likeness-plugin-mtcnn-reid --example bench_mtcnn
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
# The photos of core/mtcnn's oracle test: face_recognition's JPEGs, insightface's JPEGs and PNGs.
shopt -s nullglob
images=("$photos"/face_recognition/*.jpg "$photos"/insightface/*.jpg "$photos"/insightface/*.png)
export LIKENESS_DATA
log "python: facenet-pytorch MTCNN + extract_face + torchreid $arch (${#images[@]} photos, $runs passes, $threads threads)"
"$LIKENESS_PYTHON" tests/python/bench_mtcnn.py --out "$dir" --repeats "$runs" --threads "$threads" \
    --arch "$arch" --images "${images[@]}"
log "rust: likeness-mtcnn + mtcnn-reid's crop + OSNet"
"$REPO/target/release/examples/bench_mtcnn" --dir "$dir" --repeats "$runs" --threads "$threads" "$@"
