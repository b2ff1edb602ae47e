# Sourced by the scripts: make `uv` available (bootstrapping it when missing) and sync the locked env.
#
# uv is looked for on PATH, then in the usual install places and in our private bootstrap environment. When it is
# nowhere, it is installed without touching the system Python (PEP 668 "externally managed" distributions such as
# Debian 12 / Ubuntu 24.04 refuse `pip install --user`), trying in order:
#   1. a private virtual environment, `python3 -m venv $SPAR_UV_HOME/venv`, and `pip install uv` into it;
#   2. `python3 -m pip install --target $SPAR_UV_HOME/pkgs uv` (no venv module needed; PEP 668 allows --target);
#   3. uv's standalone installer (https://astral.sh/uv/install.sh) into $SPAR_UV_HOME/bin, when reachable.
# SPAR_UV_HOME defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/spar/uv. SPAR_UV_BOOTSTRAP_ONLY=1 stops after uv is found.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

_spar_uv_home() { echo "${SPAR_UV_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/spar/uv}"; }

# Put the first existing uv install place on PATH; succeed when `uv` then runs.
_spar_find_uv() {
    command -v uv >/dev/null 2>&1 && return 0
    local home d
    home="$(_spar_uv_home)"
    for d in "$home/venv/bin" "$home/pkgs/bin" "$home/bin" "$HOME/.local/bin" "$HOME/.cargo/bin"; do
        if [ -x "$d/uv" ] && "$d/uv" --version >/dev/null 2>&1; then
            export PATH="$d:$PATH"
            return 0
        fi
    done
    return 1
}

_spar_bootstrap_uv() {
    local home py log
    home="$(_spar_uv_home)"
    py="${SPAR_PYTHON:-python3}"
    mkdir -p "$home"
    log="$home/bootstrap.log"
    : >"$log"
    echo "[spar] uv not found: installing it into $home (log: $log)" >&2
    if command -v "$py" >/dev/null 2>&1; then
        rm -rf "$home/venv"
        if "$py" -m venv "$home/venv" >>"$log" 2>&1 &&
            "$home/venv/bin/python" -m pip install --quiet --disable-pip-version-check uv >>"$log" 2>&1; then
            _spar_find_uv && return 0
        fi
        echo "[spar]   private venv failed (no venv/ensurepip module?); trying pip --target" >&2
        rm -rf "$home/venv" "$home/pkgs"
        if "$py" -m pip install --quiet --disable-pip-version-check --target "$home/pkgs" uv >>"$log" 2>&1; then
            _spar_find_uv && return 0
        fi
    fi
    echo "[spar]   pip could not install uv; trying uv's standalone installer" >&2
    local url="https://astral.sh/uv/install.sh"
    if command -v curl >/dev/null 2>&1; then
        curl -LsSf "$url" 2>>"$log" | env UV_INSTALL_DIR="$home/bin" UV_NO_MODIFY_PATH=1 sh >>"$log" 2>&1 || true
    elif command -v wget >/dev/null 2>&1; then
        wget -qO- "$url" 2>>"$log" | env UV_INSTALL_DIR="$home/bin" UV_NO_MODIFY_PATH=1 sh >>"$log" 2>&1 || true
    fi
    _spar_find_uv && return 0
    echo "[spar] error: could not install uv (see $log); install it by hand: https://docs.astral.sh/uv/" >&2
    return 1
}

_spar_find_uv || _spar_bootstrap_uv
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
if [ "${SPAR_UV_BOOTSTRAP_ONLY:-0}" != 1 ]; then
    # Bytecode compiled once here, for the installed packages and for ours: every Python process the stages start
    # (each Ray worker, Ray's own agents) would otherwise compile torch's, Ray's and MLflow's sources again where
    # Python may not write its caches (PYTHONDONTWRITEBYTECODE=1, read-only installs). A no-op once done.
    uv sync --frozen --quiet --compile-bytecode
    .venv/bin/python -m compileall -q -j 0 pipeline spar_core jobs tests >/dev/null || true
fi
