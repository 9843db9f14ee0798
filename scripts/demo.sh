#!/usr/bin/env bash
# The demo: set-up (venv, data), build, then train seed 000's SimpleIdentityAutoencoder on the
# bundled demo faces for real on CPU through the plugin ABI.
#   scripts/demo.sh [extra host train flags…]      e.g. scripts/demo.sh --steps 50
# Output: runs/demo (replaced on each demo run).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
t0=$(date +%s)
bash "$REPO/scripts/setup.sh"
bash "$REPO/scripts/build.sh"
cd "$REPO"
host="${CARGO_TARGET_DIR:-$REPO/target}/release/host"
rm -rf runs/demo
log "training: $host train --config configs/quickstart-cpu.toml --data $LIKENESS_DATA/demo-bundles --output runs/demo $*"
"$host" train --config configs/quickstart-cpu.toml --data "$LIKENESS_DATA/demo-bundles" --output runs/demo "$@"
log "demo finished in $(( $(date +%s) - t0 )) s (set-up and build included). Look at runs/demo/samples/*.png and runs/demo/plots/loss.png"
