#!/usr/bin/env bash
# Install everything the test suite needs (a virtualenv with the test extras, promtool, Chromium) and run all tests.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

# promtool (Debian package 'prometheus') checks our exposition, and a headless Chromium (Debian package
# 'chromium') renders the status page; the tests that need either skip, saying why, without it.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || echo "warning: could not install ${missing[*]}; the tests that need them will be skipped" >&2
    else
        echo "warning: not found: ${missing[*]} (install these Debian packages); the tests that need them will be skipped" >&2
    fi
fi

exec .venv/bin/python -m pytest "$@"
