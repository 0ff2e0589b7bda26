"""Part 4: `probe --once` wall time on the shipped config.toml against `probe sandbox`, and start-up alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from common import HOST, ROOT, Children, free_port, heading, line, median, note, probe_executable, wait_for_port

RUNS = 5


def _timed(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return time.perf_counter() - started, done


def _series(label: str, args: list[str], env: dict[str, str], runs: int) -> subprocess.CompletedProcess[str]:
    _timed(args, env)  # warm the page cache and .pyc files; not counted
    times, done = [], None
    for _ in range(runs):
        seconds, done = _timed(args, env)
        times.append(seconds)
    assert done is not None
    line(label, f"median {median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}; "
                f"n={runs}; exit {done.returncode})")
    return done


def _import_profile(env: dict[str, str]) -> list[tuple[int, int, str]]:
    """The heaviest imports behind `probe` (python -X importtime -c "import canary.cli"): (cumulative µs, depth, name)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import canary.cli"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    rows = []
    for row in done.stderr.splitlines():
        parts = row.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            depth = (len(parts[2]) - len(parts[2].lstrip())) // 2
            rows.append((int(parts[1]), depth, parts[2].strip()))
    return sorted(rows, reverse=True)[:10]


def run(quick: bool) -> None:
    runs = 3 if quick else RUNS
    heading(f"4. `probe --once` on the shipped config against `probe sandbox` (median of {runs})")
    probe = probe_executable()
    if probe is None:
        print("  SKIPPED: no `probe` executable beside the interpreter or on PATH (pip install -e . first)", flush=True)
        return
    config = ROOT / "config.toml"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CANARY_CONFIG")}
    with Children() as children:
        port = free_port()
        sandbox = children.start([str(probe), "sandbox", "--listen", f"{HOST}:{port}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_for_port(port, sandbox)
        env["PLATFORM_URL"] = f"http://{HOST}:{port}"
        line("probe", f"{probe}")
        line("sandbox", f"{env['PLATFORM_URL']} (pid {sandbox.pid})")
        try:
            with socket.create_connection((HOST, 5432), timeout=1):
                line("PostgreSQL", f"{HOST}:5432 reachable (the shipped config's default DSN)")
        except OSError:
            note(f"PostgreSQL at {HOST}:5432 is not reachable: the `database` probe will fail, as it would for a user")

        _series("python -c pass (interpreter floor)", [sys.executable, "-c", "pass"], env, runs)
        _series("probe --version (start-up alone)", [str(probe), "--version"], env, runs)
        _series("probe check-config config.toml (start-up + config load)", [str(probe), "check-config", str(config)], env, runs)
        done = _series("probe --once --config config.toml", [str(probe), "--once", "--config", str(config)], env, runs)
        for row in done.stdout.strip().splitlines():
            print(f"    | {row}", flush=True)
        if done.returncode != 0 and done.stderr.strip():
            print("    stderr: " + done.stderr.strip().splitlines()[-1], flush=True)
        print("  heaviest imports behind `probe` (python -X importtime; cumulative, indented by nesting):", flush=True)
        for micros, depth, module in _import_profile(env):
            line(f"{'  ' * depth}{module}", f"{micros / 1000:.0f} ms")
