#!/usr/bin/env bash
# The whole test suite: set-up (venv with the reference stack, data), build and stage the
# plugins, the lints (rustfmt, clippy), then every test (unit, parity against PyTorch,
# end-to-end through the real host).
#   scripts/test.sh [cargo test args…]      e.g. scripts/test.sh -- resume
#   LIKENESS_SKIP_LINT=1 scripts/test.sh …  skips rustfmt and clippy: for local iteration only
#                                           (CI, through .ci/run, always lints)
#
# Tests that need the set-up (LIKENESS_PYTHON, LIKENESS_DATA, ONNX Runtime, the staged plugins)
# skip with a `skipped: <test> needs …` line under a plain `cargo test`; with CI set they fail
# instead (likeness_sdk::testing). .ci/run sets CI=1.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
t0=$(date +%s)
bash "$REPO/scripts/setup.sh"
bash "$REPO/scripts/build.sh"
cd "$REPO"
export LIKENESS_DATA LIKENESS_PYTHON
if [[ "${LIKENESS_SKIP_LINT:-}" == 1 ]]; then
    log "LIKENESS_SKIP_LINT=1: rustfmt and clippy skipped (local iteration only; CI lints)"
else
    log "cargo fmt --all --check"
    cargo fmt --all --check
    # --release on purpose: clippy runs the dependencies' build scripts like a build does, and
    # their outputs are kept per profile. In the dev profile that means compiling torch-sys's
    # C++ wrapper of libtorch a second time (several minutes on 2 cores, plus zstd-sys & co.);
    # in the release profile clippy reuses the build-script outputs scripts/build.sh has just
    # produced, and only type-checks the dependencies and lints the workspace crates.
    log "cargo clippy --release --workspace --all-targets -- -D warnings"
    cargo clippy --release --workspace --all-targets -- -D warnings
fi
log "cargo test --release --workspace $*"
cargo test --release --workspace "$@"
log "tests finished in $(( $(date +%s) - t0 )) s (set-up and build included)"
