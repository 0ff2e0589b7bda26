"""Helpers shared by the benchmark parts: ports, child processes, /proc figures, percentiles, printing."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Coroutine, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"  # every target, exporter and scrape in the benchmarks is on loopback
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- printing

def heading(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def line(label: str, value: str) -> None:
    print(f"  {label:<58} {value}", flush=True)


def note(text: str) -> None:
    print(f"  note: {text}", flush=True)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# ---------------------------------------------------------------------------------------------- statistics

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


# ---------------------------------------------------------------------------------------------- /proc

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_status_kb(key: str, pid: int | str = "self") -> int:
    """A `kB` figure from /proc/<pid>/status, e.g. VmRSS or VmHWM."""
    with open(f"/proc/{pid}/status") as handle:
        for row in handle:
            if row.startswith(key + ":"):
                return int(row.split()[1])
    return -1


def rss_mb(pid: int | str = "self") -> float:
    return proc_status_kb("VmRSS", pid) / 1024


def hwm_mb(pid: int | str = "self") -> float:
    return proc_status_kb("VmHWM", pid) / 1024


# ---------------------------------------------------------------------------------------------- ports, processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {HOST}:{port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout:g}s")


class Children:
    """Every subprocess a part starts, ended by its own pid in `close()` (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []

    def start(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(args), **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_target(children: Children, port: int | None = None) -> tuple[subprocess.Popen[Any], str]:
    """The local stand-in for the platform's /health, in its own process; returns it and its base URL."""
    port = port or free_port()
    proc = children.start(
        [sys.executable, str(BENCH_DIR / "target.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    return proc, f"http://{HOST}:{port}"


def probe_executable() -> Path | None:
    """The `probe` console script installed beside this interpreter (the project's virtualenv)."""
    candidate = Path(sys.executable).parent / "probe"
    if candidate.exists():
        return candidate
    found = shutil.which("probe")
    return Path(found) if found else None


def blackbox_executable() -> Path | None:
    for name in ("prometheus-blackbox-exporter", "blackbox_exporter"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


# ---------------------------------------------------------------------------------------------- event loop

def run_uvloop(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop like `probe run` does (canary.cli._run_async), falling back to asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        print("  note: uvloop is not installed; running on asyncio's default loop", flush=True)
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
