#!/usr/bin/env bash
# The Airflow UI on the example's Airflow home, with the example DAGs (dags/) and the ML Packages pages.
#
# The same set-up as scripts/example.sh (install, its own home ./airflow-home or
# AICENTER_EXAMPLE_HOME, database, datasets, the churn package), then `airflow standalone`: the
# api-server, scheduler, dag-processor and triggerer in one process tree, on the local executor.
# The home's dags_folder is this repository's dags/ and Airflow's own example DAGs are off.
# aicenter_training and aicenter_distributed are unpaused, so a run triggered from the UI starts
# at once; the scheduled ones stay paused until you unpause them. Prints the URL and the login
# once the UI answers. Ctrl-C (or SIGTERM) stops every process it started: Airflow's components
# get SIGINT as in `airflow standalone`, and whatever still runs 10 s later is terminated, then
# killed 10 s after that (Airflow 3.3's scheduler, dag-processor and triggerer may stay up after
# SIGINT and SIGTERM alike).
#
# AICENTER_UI_PORT (default 8080) picks the port; the UI listens on 127.0.0.1 only.
set -euo pipefail
# shellcheck source=scripts/example.sh
source "$(dirname "${BASH_SOURCE[0]}")/example.sh" --setup  # cd's to the repository root; exports AIRFLOW_HOME and BIN
export PATH="$BIN:$PATH"  # airflow standalone starts its components as `airflow ...` from PATH
PORT=${AICENTER_UI_PORT:-8080}
URL="http://127.0.0.1:$PORT"
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$PORT
# Task processes report to the api-server's execution API: the same port.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=$URL/execution/
# The connection list's Test button (Airflow leaves it off by default).
export AIRFLOW__CORE__TEST_CONNECTION=Enabled
# Tasks at a time: the local executor keeps one worker process per slot (Airflow's default is 32).
export AIRFLOW__CORE__PARALLELISM=4
"$BIN/airflow" dags reserialize >/dev/null  # the example DAGs are listed at once, before the dag-processor's first pass
for dag_id in aicenter_training aicenter_distributed; do
  "$BIN/airflow" dags unpause "$dag_id" >/dev/null
done
# Airflow in a process group of its own (job control on), so that stop() can signal all of it, and
# only it, however it was started; Ctrl-C reaches this script, whose trap runs stop().
set -m
"$BIN/airflow" standalone </dev/null &
STANDALONE=$!
stop() {
  trap - INT TERM
  kill "$WATCHER" 2>/dev/null || true
  echo "ui.sh: stopping Airflow (api-server, scheduler, dag-processor, triggerer) ..." >&2
  kill -INT -- "-$STANDALONE" 2>/dev/null || return 0
  for signal in TERM KILL; do
    for _ in $(seq 10); do
      kill -0 -- "-$STANDALONE" 2>/dev/null || return 0
      sleep 1
    done
    echo "ui.sh: Airflow processes still running; sending SIG$signal" >&2
    kill -"$signal" -- "-$STANDALONE" 2>/dev/null || return 0
  done
}
WATCHER=
trap 'stop; exit 130' INT TERM
# Once the api-server answers: the URL and the login (the password Airflow generated for admin in this home).
"$BIN/python" - "$STANDALONE" "$URL" "$AIRFLOW_HOME" <<'PY' &
import json, os, sys, time, urllib.request
from pathlib import Path

pid, url, home = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while True:
    try:
        os.kill(pid, 0)  # standalone is gone (Ctrl-C during start-up): nothing to announce
    except ProcessLookupError:
        sys.exit(0)
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=5) as response:
            if response.status == 200:
                break
    except OSError:
        pass
    time.sleep(1)
passwords = home / "simple_auth_manager_passwords.json.generated"
password = json.loads(passwords.read_text()).get("admin", "?") if passwords.exists() else f"(see {passwords})"
print(f"""
========================================================================
 Airflow UI:   {url}   (ML Packages: {url}/aicenter/)
 Login:        admin / {password}
 Airflow home: {home}   (its store: {home}/aicenter)
 Stop:         Ctrl-C
========================================================================
""", flush=True)
PY
WATCHER=$!
wait "$STANDALONE" || true
stop
