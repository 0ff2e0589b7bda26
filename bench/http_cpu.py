"""Part 1: CPU per HTTP probe — channel-canary's HttpProbe against blackbox_exporter's http prober.

Both probe the same local target (its own process). channel-canary's cost is this process's CPU time
(time.process_time: user + system, all threads) over N runs; blackbox_exporter's is its process's
utime + stime from /proc/<pid>/stat over N `GET /probe` requests. Neither counts the target.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from common import (
    HOST, Children, blackbox_executable, free_port, heading, line, median, note, proc_cpu_seconds,
    run_uvloop, start_target, verdict, wait_for_port,
)

TARGET_RATIO = 0.6
CONCURRENCY = 20
BLACKBOX_CONFIG = """\
modules:
  # The closest blackbox equivalent of the shipped api-health probe: status and two body checks.
  http_health:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
      valid_status_codes: [200]
      fail_if_body_not_matches_regexp:
        - '"status": *"healthy"'
        - '"database": *"active"'
  # Status only.
  http_2xx:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
"""


@dataclass
class Measure:
    cpu_per_probe: float  # seconds
    wall_per_probe: float  # seconds of wall time divided by N (throughput, not latency, when concurrent)
    failures: int
    n: int


def _summarise(label: str, reps: list[Measure]) -> float:
    cpu = median([m.cpu_per_probe for m in reps])
    spread = f" (min {min(m.cpu_per_probe for m in reps) * 1000:.3f}, max {max(m.cpu_per_probe for m in reps) * 1000:.3f})" if len(reps) > 1 else ""
    wall = median([m.wall_per_probe for m in reps])
    failures = sum(m.failures for m in reps)
    line(label, f"{cpu * 1000:.3f} ms CPU/probe{spread}; wall {wall * 1000:.3f} ms/probe; "
                f"n={reps[0].n}x{len(reps)}; failures {failures}")
    return cpu


# ---------------------------------------------------------------------------------------------- channel-canary

Worker = Callable[[int], Awaitable[int]]  # runs `count` probes, returns how many failed


async def _measure_in_process(workers: list[Worker], per_worker: int, warmup: int) -> Measure:
    await asyncio.gather(*(worker(warmup) for worker in workers))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    failures = sum(await asyncio.gather(*(worker(per_worker) for worker in workers)))
    cpu1, wall1 = time.process_time(), time.perf_counter()
    n = per_worker * len(workers)
    return Measure((cpu1 - cpu0) / n, (wall1 - wall0) / n, failures, n)


def _health_settings(name: str, base_url: str):  # type: ignore[no-untyped-def]
    from probes.http import HttpSettings

    # Mirrors the shipped config's api-health probe; fresh_connection stays at its default (True).
    return HttpSettings(
        name=name, channel="api", url=f"{base_url}/health", interval="15s", timeout="5s",
        expect_status=[200], expect_json={"status": "healthy", "database": "active"}, channel_map="channels",
    )


async def _canary(base_url: str, n: int, concurrency: int, variant: str) -> Measure:
    """variant: full (run_once + store.record + exposition render + lateness observe), run_once, probe_run."""
    from canary.config import DEFAULT_BUCKETS
    from canary.contract import PhaseTimer
    from canary.runner import run_once
    from canary.scrub import Scrubber
    from canary.state import ResultStore
    from exporter.exposition import ProbeExposition
    from exporter.self_metrics import DaemonMetrics
    from probes.http import HttpProbe

    settings = [_health_settings(f"api-health-{i}", base_url) for i in range(concurrency)]
    probes = [HttpProbe(s) for s in settings]
    store = ResultStore(DEFAULT_BUCKETS, 30)
    store.sync(settings, DEFAULT_BUCKETS, 30)
    exposition = ProbeExposition({"environment": "bench"}, DEFAULT_BUCKETS)
    store.add_listener(exposition.render)
    metrics = DaemonMetrics()
    scrub = Scrubber()

    def worker_for(probe: HttpProbe) -> Worker:
        name = probe.settings.name

        async def full(count: int) -> int:
            failed = 0
            for _ in range(count):
                result = await run_once(probe, 5.0, scrub)
                metrics.observe_lateness(0.0)
                store.record(name, result, time.time(), 0.0)
                failed += not result.success
            return failed

        async def runner_only(count: int) -> int:
            failed = 0
            for _ in range(count):
                failed += not (await run_once(probe, 5.0, scrub)).success
            return failed

        async def probe_only(count: int) -> int:
            failed = 0
            for _ in range(count):
                failed += not (await probe.run(PhaseTimer())).success
            return failed

        return {"full": full, "run_once": runner_only, "probe_run": probe_only}[variant]

    try:
        measure = await _measure_in_process([worker_for(p) for p in probes], n // concurrency, max(3, 60 // concurrency))
        record = store.get(settings[0].name)
        if variant == "full" and record is not None and record.latest is not None and not record.latest.success:
            note(f"last result failed: {record.latest.reason}: {record.latest.message}")
        return measure
    finally:
        for probe in probes:
            await probe.close()


async def _bare(base_url: str, n: int, concurrency: int) -> Measure:
    """A plain aiohttp GET on a fresh connection, no tracing, body read but not parsed: the floor."""
    url = f"{base_url}/health"
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) for _ in range(concurrency)]

    def worker_for(session: aiohttp.ClientSession) -> Worker:
        async def worker(count: int) -> int:
            failed = 0
            for _ in range(count):
                async with session.get(url) as response:
                    await response.read()
                    failed += response.status != 200
            return failed

        return worker

    try:
        return await _measure_in_process([worker_for(s) for s in sessions], n // concurrency, max(3, 60 // concurrency))
    finally:
        for session in sessions:
            await session.close()


# ---------------------------------------------------------------------------------------------- blackbox_exporter

async def _blackbox(bb_pid: int, bb_url: str, module: str, target: str, n: int, concurrency: int) -> Measure:
    url = f"{bb_url}/probe"
    params = {"module": module, "target": target}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(count: int) -> int:
            failed = 0
            for _ in range(count):
                async with session.get(url, params=params) as response:
                    text = await response.text()
                    failed += "\nprobe_success 1\n" not in f"\n{text}"
            return failed

        per_worker = n // concurrency
        await asyncio.gather(*(worker(max(3, 60 // concurrency)) for _ in range(concurrency)))
        cpu0, wall0 = proc_cpu_seconds(bb_pid), time.perf_counter()
        failures = sum(await asyncio.gather(*(worker(per_worker) for _ in range(concurrency))))
        cpu1, wall1 = proc_cpu_seconds(bb_pid), time.perf_counter()
    total = per_worker * concurrency
    return Measure((cpu1 - cpu0) / total, (wall1 - wall0) / total, failures, total)


def _start_blackbox(children: Children, binary: Path, workdir: Path) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    config = workdir / "blackbox.yml"
    config.write_text(BLACKBOX_CONFIG)
    port = free_port()
    proc = children.start(
        [str(binary), f"--config.file={config}", f"--web.listen-address={HOST}:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "blackbox.log").open("w"),
    )
    wait_for_port(port, proc)
    return proc, f"http://{HOST}:{port}"


# ---------------------------------------------------------------------------------------------- the part

def run(quick: bool) -> None:
    n = 600 if quick else 3000
    reps = 1 if quick else 3
    heading(f"1. CPU per HTTP probe (N={n} per measurement, {reps} repetition(s), median shown)")
    with Children() as children, tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        target_proc, base_url = start_target(children)
        line("target", f"{base_url}/health (pid {target_proc.pid}, own process, not counted)")

        def canary(variant: str, concurrency: int) -> list[Measure]:
            return [run_uvloop(_canary(base_url, n, concurrency, variant)) for _ in range(reps)]

        def bare(concurrency: int) -> list[Measure]:
            return [run_uvloop(_bare(base_url, n, concurrency)) for _ in range(reps)]

        print("  channel-canary (this process, uvloop, time.process_time):", flush=True)
        bare_seq = _summarise("bare aiohttp GET, fresh connection, no tracing, sequential", bare(1))
        bare_conc = _summarise(f"bare aiohttp GET, fresh connection, no tracing, {CONCURRENCY}-way", bare(CONCURRENCY))
        _summarise("HttpProbe.run only (tracing, JSON checks), sequential", canary("probe_run", 1))
        _summarise("run_once(HttpProbe), sequential", canary("run_once", 1))
        canary_seq = _summarise("run_once + store.record + exposition render, sequential", canary("full", 1))
        canary_conc = _summarise(f"run_once + store.record + exposition render, {CONCURRENCY}-way", canary("full", CONCURRENCY))

        binary = blackbox_executable()
        if binary is None:
            print("  blackbox_exporter: SKIPPED — neither prometheus-blackbox-exporter nor blackbox_exporter is on PATH "
                  "(apt-get install prometheus-blackbox-exporter); no ratio computed.", flush=True)
            return
        bb_proc, bb_url = _start_blackbox(children, binary, Path(tmp))
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
        first = (version.stdout or version.stderr).splitlines()[0] if (version.stdout or version.stderr) else "?"
        print(f"  blackbox_exporter ({first.strip()}; pid {bb_proc.pid}; /proc utime+stime, tick {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms):", flush=True)
        target = f"{base_url}/health"
        idle0 = proc_cpu_seconds(bb_proc.pid)
        time.sleep(1.0)
        idle = proc_cpu_seconds(bb_proc.pid) - idle0

        def blackbox(module: str, concurrency: int) -> list[Measure]:
            return [run_uvloop(_blackbox(bb_proc.pid, bb_url, module, target, n, concurrency)) for _ in range(reps)]

        bb_seq = _summarise("module http_health (status + 2 body regexes), sequential", blackbox("http_health", 1))
        bb_conc = _summarise(f"module http_health, {CONCURRENCY}-way", blackbox("http_health", CONCURRENCY))
        _summarise("module http_2xx (status only), sequential", blackbox("http_2xx", 1))
        line("blackbox idle CPU over 1 s (not subtracted)", f"{idle * 1000:.0f} ms")

        print("  ratios (channel-canary full / blackbox http_health; target <= 0.6):", flush=True)
        for label, ours, theirs in (("sequential", canary_seq, bb_seq), (f"{CONCURRENCY}-way", canary_conc, bb_conc)):
            ratio = ours / theirs
            line(f"ratio, {label}", f"{ratio:.2f}x  [{verdict(ratio <= TARGET_RATIO)}]")
        line("reference: bare aiohttp / blackbox, sequential", f"{bare_seq / bb_seq:.2f}x")
        line(f"reference: bare aiohttp / blackbox, {CONCURRENCY}-way", f"{bare_conc / bb_conc:.2f}x")
