#!/usr/bin/env bash
# The flux bench: see scripts/bench_diffusion.sh (usage: scripts/bench_flux.sh [OUT_DIR]).
exec bash "$(dirname "${BASH_SOURCE[0]}")/bench_diffusion.sh" flux "$@"
