#!/usr/bin/env bash
# Runs a command with a private PostgreSQL cluster and an MLflow tracking server (on PostgreSQL, proxied artifacts),
# both bound to 127.0.0.1, and stops both afterwards:
#
#     bash .ci/services.sh <command...>
#
# The command sees HAILO_SWEEP_TEST_POSTGRES (a postgresql+psycopg:// URL without a database name; the user may
# create databases) and HAILO_SWEEP_TEST_MLFLOW (the tracking server's URL). Where PostgreSQL is not installed the
# command runs without them and the distributed tests are skipped (.ci/run installs it).
set -euo pipefail
VENV_PY="${VENV_PY:-.venv/bin/python}"

PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [[ -z "$PGBIN" || ! -x "$PGBIN/initdb" ]]; then
    echo "services: PostgreSQL is not installed; the distributed tests will be skipped" >&2
    exec "$@"
fi

WORK="$(mktemp -d /tmp/hailo-sweep-services.XXXXXX)"
free_port() { "$VENV_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PGPORT="$(free_port)"
MLPORT="$(free_port)"
PGDATA="$WORK/pgdata"
AS_PG=()
if [[ "$(id -u)" == "0" ]]; then
    chown -R postgres: "$WORK" 2>/dev/null || true
    chmod 755 "$WORK"
    AS_PG=(runuser -u postgres --)
fi
MLFLOW_PID=""
cleanup() {
    set +e
    if [[ -n "$MLFLOW_PID" ]]; then kill -TERM -- "-$MLFLOW_PID" 2>/dev/null; wait "$MLFLOW_PID" 2>/dev/null; fi
    "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

"${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust --no-sync >/dev/null
"${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -w -l "$PGDATA/server.log" \
    -o "-h 127.0.0.1 -p $PGPORT -k $WORK -c fsync=off -c synchronous_commit=off -c max_connections=200" start >/dev/null
"$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -q -v ON_ERROR_STOP=1 \
    -c "CREATE USER hsweep PASSWORD 'hsweep' CREATEDB" -c "CREATE DATABASE mlflow OWNER hsweep" >/dev/null

mkdir -p "$WORK/artifacts"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true setsid "$VENV_PY" -m mlflow server \
    --backend-store-uri "postgresql+psycopg://hsweep:hsweep@127.0.0.1:$PGPORT/mlflow" \
    --artifacts-destination "$WORK/artifacts" --host 127.0.0.1 --port "$MLPORT" --workers 2 \
    >"$WORK/mlflow.log" 2>&1 &
MLFLOW_PID=$!
for _ in $(seq 1 240); do
    if "$VENV_PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$MLPORT/health', timeout=1)" 2>/dev/null; then break; fi
    if ! kill -0 "$MLFLOW_PID" 2>/dev/null; then cat "$WORK/mlflow.log" >&2; echo "services: the MLflow server died" >&2; exit 1; fi
    sleep 0.25
done
"$VENV_PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MLPORT/health', timeout=2)" \
    || { cat "$WORK/mlflow.log" >&2; echo "services: the MLflow server did not start" >&2; exit 1; }
echo "services: PostgreSQL on 127.0.0.1:$PGPORT, MLflow tracking server on http://127.0.0.1:$MLPORT" >&2

export HAILO_SWEEP_TEST_POSTGRES="postgresql+psycopg://hsweep:hsweep@127.0.0.1:$PGPORT"
export HAILO_SWEEP_TEST_MLFLOW="http://127.0.0.1:$MLPORT"
set +e
"$@"
status=$?
exit $status
