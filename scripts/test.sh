#!/usr/bin/env bash
# The whole test suite: set-up (venv with the reference stack, data), build and stage the
# plugins, then every test (unit, parity against PyTorch, end-to-end through the real host).
#   scripts/test.sh [cargo test args…]      e.g. scripts/test.sh -- resume
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
t0=$(date +%s)
bash "$REPO/scripts/setup.sh"
bash "$REPO/scripts/build.sh"
cd "$REPO"
export LIKENESS_DATA LIKENESS_PYTHON
log "cargo test --release --workspace $*"
cargo test --release --workspace "$@"
log "tests finished in $(( $(date +%s) - t0 )) s (set-up and build included)"
