#!/usr/bin/env bash
# Install everything the test suite needs (a virtualenv with the test extras, promtool, systemd-analyze) and run all
# tests.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

# promtool (Debian package 'prometheus') checks our exposition; the tests that need it skip without it.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null \
            || echo "warning: could not install promtool; its tests will be skipped" >&2
    else
        echo "warning: promtool not found (install the 'prometheus' package); its tests will be skipped" >&2
    fi
fi

# systemd-analyze (Debian package 'systemd') verifies deploy/systemd/channel-canary.service; those tests skip without it.
# kubectl renders deploy/kubernetes where present; without it the suite renders the kustomization itself.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null \
            || echo "warning: could not install systemd-analyze; the systemd unit's tests will be skipped" >&2
    else
        echo "warning: systemd-analyze not found (install the 'systemd' package); the systemd unit's tests will be skipped" >&2
    fi
fi

exec .venv/bin/python -m pytest "$@"
