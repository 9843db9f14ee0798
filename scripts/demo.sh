#!/usr/bin/env bash
# The demo: set-up (venv, data), build, then train seed 000's SimpleIdentityAutoencoder on the
# bundled demo faces for real on CPU through the plugin ABI, twice, from the same seed:
#   runs/demo-no-identity   pixel loss only; the `dlib` metric only measures (metric.weight = 0)
#   runs/demo               pixel loss + the identity loss through dlib's face recognizer (real weights)
# and prints the identity similarity (dlib, generated vs reference, validation pairs) at the first
# and the last validation of both. Config: configs/demo-identity-cpu.toml.
#   scripts/demo.sh [extra host train flags…]      e.g. scripts/demo.sh --steps 50
# Output: runs/demo and runs/demo-no-identity (replaced on each demo run).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
t0=$(date +%s)
bash "$REPO/scripts/setup.sh"
bash "$REPO/scripts/build.sh"
cd "$REPO"
host="${CARGO_TARGET_DIR:-$REPO/target}/release/host"
config=configs/demo-identity-cpu.toml
# libtorch's OpenMP threads sleep instead of spinning when they wait: on a busy machine spinning
# made the identity run several times slower (measured 65 s vs 10 s for 20 steps).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# train NAME [flags…]: one run into runs/NAME; its printed summary is kept in runs/NAME.log.
train() {
    local name=$1
    shift
    rm -rf "runs/$name" "runs/$name.log"
    mkdir -p runs
    log "training: $host train --config $config --data $LIKENESS_DATA/demo-bundles --output runs/$name $*"
    "$host" train --config "$config" --data "$LIKENESS_DATA/demo-bundles" --output "runs/$name" "$@" | tee "runs/$name.log"
}
# similarity NAME: "first last" from the run's summary line.
similarity() {
    sed -n 's/.*identity similarity: first \([^ ]*\) *last \([^ ]*\).*/\1 \2/p' "runs/$1.log"
}

t1=$(date +%s)
train demo-no-identity --set metric.weight=0 "$@"
t2=$(date +%s)
train demo "$@"
t3=$(date +%s)

read -r a0 a1 _ <<<"$(similarity demo-no-identity) n/a n/a"
read -r b0 b1 _ <<<"$(similarity demo) n/a n/a"
# The weight the run used (its resolved config), whatever flags were passed.
weight=$(sed -n '/^\[metric\]/,/^\[/s/^weight *= *\([^ ]*\).*/\1/p' runs/demo/config.toml 2>/dev/null | head -1)
echo
echo "identity similarity (dlib embeddings, cosine, generated vs reference, validation pairs):"
printf '  %-36s %7s %7s   %s\n' "" "first" "last" ""
printf '  %-36s %7s %7s   %s\n' "without the identity loss" "$a0" "$a1" "runs/demo-no-identity ($((t2 - t1)) s)"
printf '  %-36s %7s %7s   %s\n' "with the identity loss (weight $weight)" "$b0" "$b1" "runs/demo ($((t3 - t2)) s)"
echo
# The demo exists to show these numbers: a summary without them is a failure, not a result
# (issue 14: a fresh demo once printed n/a after the dlib metric's default detector changed).
if [[ "$a0 $a1 $b0 $b1" == *n/a* ]]; then
    log "error: an identity summary is n/a: the metric found no face in any validation pair of a run (see runs/demo*.log and the warnings there; the dlib metric needs detector = \"full-image\" for the demo's face-centred crops)"
    exit 1
fi
log "demo finished in $(( $(date +%s) - t0 )) s (set-up and build included). Look at runs/demo/samples/*.png, runs/demo/plots/identity.png and runs/demo/plots/loss.png"
