# shellcheck shell=bash
# Sourced by the other scripts: paths and environment of the likeness project venv.
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The same defaults as the binaries' (likeness_sdk::venv): LIKENESS_HOME, else
# $XDG_CACHE_HOME/likeness, else ~/.cache/likeness; LIKENESS_DATA, else $LIKENESS_HOME/data.
LIKENESS_HOME="${LIKENESS_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/likeness}"
VENV="$LIKENESS_HOME/venv"
LIKENESS_DATA="${LIKENESS_DATA:-$LIKENESS_HOME/data}"
LIKENESS_PYTHON="$VENV/bin/python"
# tch's build script asks this python where torch's libtorch lives.
LIBTORCH_USE_PYTORCH=1
case ":$PATH:" in
    *":$VENV/bin:"*) ;;
    *) PATH="$VENV/bin:$PATH" ;;
esac
# ONNX Runtime is loaded at run time (ort's load-dynamic) from the venv's onnxruntime wheel.
if [[ -z "${ORT_DYLIB_PATH:-}" ]]; then
    for f in "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*; do
        [[ -f "$f" ]] && ORT_DYLIB_PATH="$f"
    done
fi
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-}"
export REPO LIKENESS_HOME VENV LIKENESS_DATA LIKENESS_PYTHON LIBTORCH_USE_PYTORCH PATH

# log MESSAGE...: a timestamped step on stderr.
log() {
    printf '[%s] %s\n' "$(date '+%H:%M:%S')" "$*" >&2
}
