#!/usr/bin/env bash
# Start a Ray head node for local development: everything bound to 127.0.0.1, token authentication ON.
#
#   infra/local/start_ray_head.sh [--port 6379] [--dashboard-port 8265] [--num-cpus N] [--num-gpus N] [RAY START ARGS...]
#
# Extra arguments go to `ray start` unchanged (e.g. --block to stay in the foreground: Ctrl-C / SIGTERM then
# stops this head's processes only). Without --block, stop it with `ray stop` (which stops every Ray process of
# this user on the machine).
# Token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; a missing file is created
# (mode 600). Clients (`spar submit`, `ray job submit`) find the token the same way.
# Jobs run `python -m jobs.<stage>` with the PATH of this script: the project's .venv/bin comes first so that
# `python` is the project's interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -x "$ROOT/.venv/bin/ray" ]]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi

PORT="${SPAR_RAY_PORT:-6379}"
DASHBOARD_PORT="${SPAR_RAY_DASHBOARD_PORT:-8265}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
    --node-ip-address|--dashboard-host)
      echo "start_ray_head.sh: $1 is fixed to 127.0.0.1 here (use infra/ray or infra/k8s for clusters)" >&2
      exit 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [[ ! -s "$TOKEN_FILE" ]]; then
    mkdir -p "$(dirname "$TOKEN_FILE")"
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE")
    echo "start_ray_head.sh: generated a Ray auth token in $TOKEN_FILE" >&2
  fi
fi

exec ray start --head \
  --node-ip-address 127.0.0.1 \
  --dashboard-host 127.0.0.1 \
  --port "$PORT" \
  --dashboard-port "$DASHBOARD_PORT" \
  --include-dashboard true \
  --disable-usage-stats \
  "${EXTRA[@]}"
