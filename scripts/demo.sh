#!/usr/bin/env bash
# Install channel-canary, start the bundled sandbox platform, and run the daemon on the shipped config.
# Then: curl localhost:9465/metrics, or open http://localhost:9465/ for the status page.
# Ctrl-C (or a SIGTERM to this script) stops both, and the script returns once both have exited.
# SANDBOX_LISTEN moves the sandbox; extra arguments go to `probe run` (e.g. --listen 127.0.0.1:9466).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .

pids=()
stop() {
    trap - INT TERM EXIT
    if [ "${#pids[@]}" -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true  # the daemon's own stop is bounded by [daemon] shutdown_grace
    fi
    echo "demo: sandbox and daemon stopped" >&2
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

SANDBOX_LISTEN="${SANDBOX_LISTEN:-127.0.0.1:8000}"
.venv/bin/probe sandbox --listen "$SANDBOX_LISTEN" &
pids+=("$!")

export PLATFORM_URL="${PLATFORM_URL:-http://$SANDBOX_LISTEN}"
# In the background and waited for, so a SIGTERM reaches the trap at once instead of after the daemon exits.
.venv/bin/probe run --config config.toml "$@" &
daemon_pid=$!
pids+=("$daemon_pid")
wait "$daemon_pid"
