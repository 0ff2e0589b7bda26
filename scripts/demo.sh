#!/usr/bin/env bash
# Install channel-canary, start the bundled sandbox platform, and run the daemon on the shipped config.
# Then: curl localhost:9465/metrics, or open http://localhost:9465/ for the status page. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .

SANDBOX_LISTEN="${SANDBOX_LISTEN:-127.0.0.1:8000}"
.venv/bin/probe sandbox --listen "$SANDBOX_LISTEN" &
sandbox_pid=$!
trap 'kill "$sandbox_pid" 2>/dev/null || true' EXIT

export PLATFORM_URL="${PLATFORM_URL:-http://$SANDBOX_LISTEN}"
.venv/bin/probe run --config config.toml "$@"
