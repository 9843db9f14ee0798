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

stage() { # stage MANIFEST_DIR DEST_ROOT
    local dir=$1 dest_root=$2 id lib
    id=$(sed -n 's/^id *= *"\(.*\)".*/\1/p' "$dir/plugin.toml" | head -1)
    lib=$(sed -n 's/^library *= *"\(.*\)".*/\1/p' "$dir/plugin.toml" | head -1)
    [[ -n "$id" && -n "$lib" ]] || { log "error: $dir/plugin.toml lacks plugin.id or plugin.library"; exit 1; }
    [[ -f "$out/$lib" ]] || { log "error: $out/$lib was not built (named by $dir/plugin.toml)"; exit 1; }
    mkdir -p "$dest_root/$id"
    cp -f "$dir/plugin.toml" "$dest_root/$id/plugin.toml"
    # Copy through a temp name: a running host may have the old library mapped.
    cp -f "$out/$lib" "$dest_root/$id/.$lib.tmp" && mv -f "$dest_root/$id/.$lib.tmp" "$dest_root/$id/$lib"
}
rm -rf "$out/plugins" "$out/test-plugins"
for m in plugins/*/plugin.toml; do stage "$(dirname "$m")" "$out/plugins"; done
for m in plugins/testing/*/plugin.toml; do stage "$(dirname "$m")" "$out/test-plugins"; done
log "built and staged $(ls "$out/plugins" | wc -l) plugin(s) in $out/plugins in $(( $(date +%s) - t0 )) s"
