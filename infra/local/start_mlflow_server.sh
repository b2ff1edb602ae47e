#!/usr/bin/env bash
# Start an MLflow tracking server for local development on 127.0.0.1.
#
#   infra/local/start_mlflow_server.sh [--workdir DIR] [--port 5000] [--workers 1] [--auth] [--artifacts-destination URI]
#
# Backend: sqlite:///DIR/mlflow.db (the same store `spar` writes to by default, so the server shows those runs);
# artifacts: DIR/mlartifacts, or --artifacts-destination (e.g. s3://bucket/mlartifacts: the server's environment
# then needs AWS_* / MLFLOW_S3_ENDPOINT_URL), served through the server (mlflow-artifacts:/): clients need no
# storage credentials for MLflow.
# --auth: MLflow's basic-auth app. Users live in DIR/auth/basic_auth.db. The admin password comes from
#   MLFLOW_AUTH_ADMIN_PASSWORD, else from DIR/auth/admin_password (created with a random password, mode 600, on
#   first start). Clients then set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
# The server runs in the foreground (exec): stop it with Ctrl-C / SIGTERM.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -x "$ROOT/.venv/bin/mlflow" ]]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi

WORKDIR="${SPAR_WORKDIR:-$PWD/spar-work}"
PORT="${SPAR_MLFLOW_PORT:-5000}"
WORKERS=1
AUTH=0
ARTIFACTS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) WORKDIR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --auth) AUTH=1; shift ;;
    --artifacts-destination) ARTIFACTS="$2"; shift 2 ;;
    --host)
      echo "start_mlflow_server.sh: the host is fixed to 127.0.0.1 (deploy infra/mlflow to serve others)" >&2
      exit 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "start_mlflow_server.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$WORKDIR/mlartifacts"
WORKDIR="$(cd "$WORKDIR" && pwd)"
ARTIFACTS="${ARTIFACTS:-$WORKDIR/mlartifacts}"
ARGS=(
  --host 127.0.0.1
  --port "$PORT"
  --workers "$WORKERS"
  --backend-store-uri "sqlite:///$WORKDIR/mlflow.db"
  --artifacts-destination "$ARTIFACTS"
  --serve-artifacts
)

if [[ "$AUTH" == 1 ]]; then
  AUTH_DIR="$WORKDIR/auth"
  mkdir -p "$AUTH_DIR"
  chmod 700 "$AUTH_DIR"
  if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    if [[ ! -s "$AUTH_DIR/admin_password" ]]; then
      (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(24), end="")' > "$AUTH_DIR/admin_password")
      echo "start_mlflow_server.sh: admin password generated in $AUTH_DIR/admin_password" >&2
    fi
    MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$AUTH_DIR/admin_password")"
  fi
  export MLFLOW_AUTH_ADMIN_PASSWORD
  export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    if [[ ! -s "$AUTH_DIR/flask_secret_key" ]]; then
      (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$AUTH_DIR/flask_secret_key")
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$AUTH_DIR/flask_secret_key")"
  fi
  export MLFLOW_FLASK_SERVER_SECRET_KEY
  sed -e "s|@AUTH_DB@|sqlite:///$AUTH_DIR/basic_auth.db|" \
      -e "s|@DEFAULT_PERMISSION@|${SPAR_MLFLOW_DEFAULT_PERMISSION:-READ}|" \
      "$ROOT/infra/mlflow/basic_auth.ini" > "$AUTH_DIR/basic_auth.ini"
  export MLFLOW_AUTH_CONFIG_PATH="$AUTH_DIR/basic_auth.ini"
  ARGS+=(--app-name basic-auth)
fi

# MLflow's server-side job runner (GenAI scorers and trace rollups: a huey runner and seven consumer processes, each
# importing MLflow) is off unless asked for: spar sends the server no jobs, and on a 2-core machine those processes
# made the server take 11-16 s to answer and ~8 s to stop.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "start_mlflow_server.sh: http://127.0.0.1:$PORT (store $WORKDIR/mlflow.db, artifacts $ARTIFACTS$([[ $AUTH == 1 ]] && echo ', basic auth on'))" >&2
exec mlflow server "${ARGS[@]}"
