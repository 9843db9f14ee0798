#!/usr/bin/env bash
# The sd15 bench: see scripts/bench_diffusion.sh (usage: scripts/bench_sd15.sh [OUT_DIR]).
exec bash "$(dirname "${BASH_SOURCE[0]}")/bench_diffusion.sh" sd15 "$@"
