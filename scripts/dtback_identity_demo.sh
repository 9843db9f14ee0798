#!/usr/bin/env bash
# Issue 16's DTBack check on a CPU: seed 000's YAML with `use_simple_model: false` trained twice
# on the demo bundles and the tiny random Flux (tests/python/make_tiny_flux.py), once with
# face_weight = FACE_WEIGHT (default 5) and once with face_weight = 0 (body_weight = 0 and content_weight = 0 in both,
# the flow-matching loss at the same weight in both, so the face term is the only difference), printing the validation identity similarity
# (ArcFace stand-in, x̂0 decodes vs the references) per epoch for each.
#
# What it can show: the face term's gradient reaches the identity injection through x̂0 decoded
# with gradient and the metric, and moves the similarity the metric measures. What it cannot:
# likeness of real faces — the Flux, its VAE and the ArcFace pack are random stand-ins
# (scripts/make_face_models.py), so "identity" here is the random metric's embedding.
#
# usage: scripts/dtback_identity_demo.sh [OUT_DIR] [EPOCHS] [FACE_WEIGHT] [MODEL_WEIGHT]
# (MODEL_WEIGHT: the flow-matching loss's weight, model.loss_weight, the same in both runs)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/common.sh"
out="${1:-/tmp/dtback-demo}"
epochs="${2:-6}"
face="${3:-5.0}"
model_weight="${4:-0.1}"
mkdir -p "$out"
"$LIKENESS_PYTHON" "$here/tests/python/make_tiny_flux.py" --out "$out/flux-tiny" > /dev/null
"$LIKENESS_PYTHON" "$here/scripts/make_face_models.py" --out "$out/faces" --depth r-tiny > /dev/null
host="$here/target/release/host"
for w in "$face" 0.0; do
  run="$out/face_weight_$w"
  rm -rf "$run"
  mkdir -p "$run"
  cat > "$run/config.yaml" <<YAML
data_dir: "$LIKENESS_DATA/demo-bundles"
max_chars_per_bundle: 20
min_images_per_char: 2
use_simple_model: false
input_size: 64
num_face_latents: 16
num_body_latents: 0
batch_size: 4
num_epochs: $epochs
learning_rate: 0.001
weight_decay: 0.00001
face_weight: $w
body_weight: 0.0
content_weight: 0.0
output_dir: "run"
pretrained_model: "$out/flux-tiny"
YAML
  "$host" --plugin-dir "$here/target/release/plugins" train --config "$run/config.yaml" --no-progress \
    --set "metric.config.model_root=\"$out/faces\"" --set metric.config.det_thresh=0.01 --set metric.config.det_size=64 \
    --set model.config.max_sequence_length=16 --set train.sample_count=0 --set "model.loss_weight=$model_weight" \
    > "$run/log.txt" 2>&1 || { tail -30 "$run/log.txt"; exit 1; }
  echo "face_weight = $w: validation identity similarity per validation (step, similarity)"
  "$LIKENESS_PYTHON" - "$run/run/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("type") == "val":
        print(f"  step {r['step']:4d}  {r.get('identity_similarity')}")
PY
done
