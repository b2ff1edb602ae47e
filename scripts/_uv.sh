# Sourced by the scripts: make `uv` available (bootstrapping it with pip when missing) and sync the locked env.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v uv >/dev/null 2>&1; then
    export PATH="$HOME/.local/bin:$PATH"
    if ! command -v uv >/dev/null 2>&1; then
        echo "[spar] bootstrapping uv with pip" >&2
        python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
        export PATH="$HOME/.local/bin:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
    fi
fi
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
uv sync --frozen --quiet
