#!/usr/bin/env bash
# Entrypoint of the MLflow tracking-server image (infra/mlflow/Dockerfile): basic auth always on.
#
# Secrets come from files (Docker/Kubernetes secrets) or the environment, never from the image:
#   POSTGRES_PASSWORD_FILE / POSTGRES_PASSWORD      database password (user POSTGRES_USER, host POSTGRES_HOST)
#   MLFLOW_AUTH_ADMIN_PASSWORD_FILE / MLFLOW_AUTH_ADMIN_PASSWORD   initial admin password (required)
#   MLFLOW_FLASK_SERVER_SECRET_KEY_FILE / MLFLOW_FLASK_SERVER_SECRET_KEY   session signing key (required)
#   AWS_ACCESS_KEY_ID(_FILE), AWS_SECRET_ACCESS_KEY(_FILE), MLFLOW_S3_ENDPOINT_URL   artifact store (S3/MinIO)
# Settings: MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix), MLFLOW_HOST (default 0.0.0.0 inside the
# container: publish it on 127.0.0.1 / a ClusterIP service only), MLFLOW_PORT, MLFLOW_WORKERS,
# MLFLOW_ALLOWED_HOSTS (Host-header allow-list), MLFLOW_SERVER_ENABLE_JOB_EXECUTION (MLflow's GenAI job runner:
# default false, spar sends the server no jobs; true starts its huey runner and consumer processes).
set -euo pipefail

from_file() {  # from_file VAR: VAR <- contents of the file named by VAR_FILE, when that is set
  local var="$1" file_var="${1}_FILE"
  if [[ -n "${!file_var:-}" ]]; then
    export "$var"="$(cat "${!file_var}")"
  fi
}
for v in POSTGRES_PASSWORD MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
  from_file "$v"
done

: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD(_FILE): the server does not start without auth}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY(_FILE)}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD(_FILE)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow-artifacts}"

PG_USER="${POSTGRES_USER:-mlflow}"
PG_HOST="${POSTGRES_HOST:-postgres}"
PG_PORT="${POSTGRES_PORT:-5432}"
PG_PASS_ENC="$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')"
PG_URI="postgresql://${PG_USER}:${PG_PASS_ENC}@${PG_HOST}:${PG_PORT}"

AUTH_INI="$(mktemp -d)/basic_auth.ini"
sed -e "s|@AUTH_DB@|${PG_URI}/${POSTGRES_AUTH_DB:-mlflow_auth}|" \
    -e "s|@DEFAULT_PERMISSION@|${MLFLOW_DEFAULT_PERMISSION:-READ}|" \
    /etc/mlflow/basic_auth.ini.template > "$AUTH_INI"
chmod 600 "$AUTH_INI"
export MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
ARGS=(
  --host "${MLFLOW_HOST:-0.0.0.0}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-2}"
  --backend-store-uri "${PG_URI}/${POSTGRES_DB:-mlflow}"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --app-name basic-auth
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  ARGS+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec mlflow server "${ARGS[@]}"
