#!/usr/bin/env bash
# The prepared GPU check (issue 12): `spar bench gpu` writing report.json + report.md (rewritten after every
# section) and log.txt into OUTDIR. Extra arguments go to `spar bench gpu` (e.g. --mode cpu, --budget-s 330,
# --sections correctness,pipeline). Uses `uv run` when uv and the locked env exist; otherwise plain python3 with
# packages from PYTHONPATH (a device machine without uv or network). Never installs anything, never needs git.
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR [spar bench gpu options]" >&2
    exit 2
fi
OUT="$1"
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if command -v uv >/dev/null 2>&1 && [ -f uv.lock ] && [ -x .venv/bin/python ]; then
    RUN=(uv run --frozen --offline python)
else
    RUN=(python3)
fi
echo "[gpu_check] $(date -u +%FT%TZ) ${RUN[*]} -m pipeline.cli bench gpu --out $OUT $*" | tee "$OUT/log.txt"
"${RUN[@]}" -m pipeline.cli bench gpu --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "[gpu_check] exit $rc" | tee -a "$OUT/log.txt"
exit "$rc"
