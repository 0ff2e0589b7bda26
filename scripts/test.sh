#!/usr/bin/env bash
# Install everything the test suite needs (a virtualenv with the test extras, promtool, amtool) and run all tests.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

# promtool and prometheus (Debian package 'prometheus') check our exposition and the alert rules; amtool and
# Alertmanager (Debian package 'prometheus-alertmanager') check the Alertmanager example. The tests that need one
# skip, naming it, without it.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || echo "warning: could not install ${missing[*]}; the tests that need them will be skipped" >&2
    else
        echo "warning: ${missing[*]} not installed (Debian packages); the tests that need them will be skipped" >&2
    fi
fi

exec .venv/bin/python -m pytest "$@"
