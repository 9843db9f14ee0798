#!/usr/bin/env bash
# Builds the workspace (release) and stages every plugin next to the host:
#   target/release/plugins/<id>/{plugin.toml, lib….so}       real plugins (found by `host`)
#   target/release/test-plugins/<id>/{plugin.toml, lib….so}  fixtures for the test suite only
# Incremental: a warm build takes seconds.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO"
t0=$(date +%s)
log "cargo build --release --workspace (first build compiles libtorch's C++ wrapper: several minutes)"
cargo build --release --workspace --quiet
out="${CARGO_TARGET_DIR:-$REPO/target}/release"
# The frozen ABI-1.0 fixture is a workspace of its own (plugins/testing/abi-1.0/README.md),
# built into a target dir of its own so its likeness-abi 1.0 never meets the main one.
abi10_target="${CARGO_TARGET_DIR:-$REPO/target}/abi-1.0"
log "cargo build --release (frozen ABI-1.0 fixture, plugins/testing/abi-1.0)"
CARGO_TARGET_DIR="$abi10_target" cargo build --release --quiet --manifest-path plugins/testing/abi-1.0/Cargo.toml

stage() { # stage MANIFEST_DIR DEST_ROOT [LIBRARY_DIR (default: the main build's $out)]
    local dir=$1 dest_root=$2 libdir=${3:-$out} id lib
    id=$(sed -n 's/^id *= *"\(.*\)".*/\1/p' "$dir/plugin.toml" | head -1)
    lib=$(sed -n 's/^library *= *"\(.*\)".*/\1/p' "$dir/plugin.toml" | head -1)
    [[ -n "$id" && -n "$lib" ]] || { log "error: $dir/plugin.toml lacks plugin.id or plugin.library"; exit 1; }
    [[ -f "$libdir/$lib" ]] || { log "error: $libdir/$lib was not built (named by $dir/plugin.toml)"; exit 1; }
    mkdir -p "$dest_root/$id"
    cp -f "$dir/plugin.toml" "$dest_root/$id/plugin.toml"
    # Copy through a temp name: a running host may have the old library mapped.
    cp -f "$libdir/$lib" "$dest_root/$id/.$lib.tmp" && mv -f "$dest_root/$id/.$lib.tmp" "$dest_root/$id/$lib"
}
rm -rf "$out/plugins" "$out/test-plugins"
for m in plugins/*/plugin.toml; do stage "$(dirname "$m")" "$out/plugins"; done
for m in plugins/testing/*/plugin.toml; do stage "$(dirname "$m")" "$out/test-plugins"; done
stage plugins/testing/abi-1.0/model "$out/test-plugins" "$abi10_target/release"
log "built and staged $(ls "$out/plugins" | wc -l) plugin(s) in $out/plugins in $(( $(date +%s) - t0 )) s"
