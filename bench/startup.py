"""Part 6: start-up — from `probe run` on the shipped config.toml to its first `/readyz` 200, timed from outside.

Each repeat starts a fresh `probe run` (an empty state directory, a free port) and polls /readyz every 2 ms until
it answers 200; the figure is the wall time from starting the process, and the CPU time the process had used by
then (less sensitive to other work on the machine). Then, once more with `python -X importtime`: what the daemon
imported before it was ready (each probe type's heavy libraries should not be among them) and what it imported
after, in the worker thread that loads the configured types' libraries once it listens (canary/libraries.py).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import time

from common import (
    HOST, ROOT, Children, free_port, heading, line, median, note, probe_executable, proc_cpu_seconds, verdict,
)

TARGET_SECONDS = 0.250
RUNS = 9
POLL = 0.002
# What the shipped config's probe types import to run; none of it may be on the path to /readyz.
LIBRARY_FLOOR = "import aiohttp.web, prometheus_client, regex, uvloop, yarl; from pydantic import BaseModel"
HEAVY = ("aiokafka", "asyncpg", "google.auth", "google.oauth2", "requests", "redis", "twilio.rest", "cryptography", "yaml")


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _start(probe: str, env: dict[str, str], state: str, stderr: int | None = subprocess.DEVNULL) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = [probe, "run", "--config", str(ROOT / "config.toml"), "--listen", f"{HOST}:{port}", "--state.dir", state]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr), port


def _time_to_ready(children: Children, probe: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the daemon) from starting `probe run` to its first /readyz 200."""
    with tempfile.TemporaryDirectory(prefix="canary-startup-") as state:
        started = time.perf_counter()
        proc, port = _start(probe, env, state)
        children._procs.append(proc)  # ended by pid like every child, whatever happens below
        deadline = started + 30.0
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"`probe run` exited with {proc.returncode} before /readyz answered 200")
            if time.perf_counter() > deadline:
                raise RuntimeError("/readyz did not answer 200 within 30 s")
            time.sleep(POLL)
        wall = time.perf_counter() - started
        cpu = proc_cpu_seconds(proc.pid)
        children.stop(proc)
    return wall, cpu


def _imports(children: Children, probe: str, env: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """Import time (self µs) by top-level package, before the daemon logged that it serves, and after."""
    with tempfile.TemporaryDirectory(prefix="canary-startup-") as state, tempfile.TemporaryFile() as err:
        proc, port = _start(probe, {**env, "PYTHONPROFILEIMPORTTIME": "1"}, state, stderr=err.fileno())
        children._procs.append(proc)
        deadline = time.monotonic() + 30.0
        while not _ready(port) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(2.0)  # the worker thread's imports, logged after the daemon's "serving" line
        children.stop(proc)
        err.seek(0)
        text = err.read().decode(errors="replace")
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    packages = before
    for row in text.splitlines():
        if "channel-canary serving on" in row:
            packages = after
            continue
        parts = row.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            name = parts[2].strip()
            package = name if name.startswith(HEAVY) else name.split(".")[0]
            package = next((heavy for heavy in HEAVY if package.startswith(heavy)), package)
            packages[package] = packages.get(package, 0) + int(parts[0])
    return before, after


def run(quick: bool) -> None:
    runs = 3 if quick else RUNS
    heading(f"6. start-up: `probe run` on the shipped config to the first /readyz 200 (median of {runs})")
    probe = probe_executable()
    if probe is None:
        print("  SKIPPED: no `probe` executable beside the interpreter or on PATH (pip install -e . first)", flush=True)
        return
    # Bytecode is written and read as a user's install does (the image compiles it at build time): a
    # PYTHONDONTWRITEBYTECODE in this shell would have every start compile the project's modules from source.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CANARY_", "PYTHONPROFILEIMPORTTIME", "PYTHONDONTWRITEBYTECODE"))}
    with Children() as children:
        floor = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
            floor.append(time.perf_counter() - started)
        line("python -c pass (interpreter floor)", f"median {median(floor) * 1000:.0f} ms")
        libraries = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", LIBRARY_FLOOR], check=True, env=env)
            libraries.append(time.perf_counter() - started)
        line("python importing aiohttp.web, pydantic, prometheus_client, uvloop", f"median {median(libraries) * 1000:.0f} ms "
             "(what the daemon's own libraries cost any process)")
        _time_to_ready(children, str(probe), env)  # warms the page cache and .pyc files; not counted
        walls, cpus = [], []
        for _ in range(runs):
            wall, cpu = _time_to_ready(children, str(probe), env)
            walls.append(wall)
            cpus.append(cpu)
        line(f"probe run -> /readyz 200, wall (n={runs})",
             f"median {median(walls) * 1000:.0f} ms (min {min(walls) * 1000:.0f}, max {max(walls) * 1000:.0f})")
        line("  CPU time of the daemon by then", f"median {median(cpus) * 1000:.0f} ms (clock ticks of 10 ms)")
        line("target: < 250 ms (median wall)", f"{median(walls) * 1000:.0f} ms  [{verdict(median(walls) < TARGET_SECONDS)}]")

        before, after = _imports(children, str(probe), env)
    line("imports before ready (python -X importtime, one run)", f"{sum(before.values()) / 1000:.0f} ms in all; by package:")
    for package, micros in sorted(before.items(), key=lambda item: -item[1])[:10]:
        line(f"  {package}", f"{micros / 1000:.0f} ms")
    heavy = sorted(package for package in before if package in HEAVY)
    line("probe types' heavy libraries imported before ready", ", ".join(heavy) if heavy else "none")
    heavy = sorted(package for package in after if package in HEAVY)
    line("imported after, by the worker thread (off the loop)",
         f"{', '.join(heavy) or 'nothing heavy'} ({sum(after.values()) / 1000:.0f} ms in all)")
    note("importtime figures are inflated by the profiling itself; the wall figure above is the one to read")
