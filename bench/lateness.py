"""Part 2: scheduler lateness with many probes — the real Scheduler, ResultStore and ProbeExposition.

Lateness is what the Scheduler hands its observer: how long after its slot each run started. The observer
here records every value (and forwards it to the daemon's own DaemonMetrics, as `probe run` does).
The product is measured as shipped: HttpProbes share TLS contexts (probes.transport.client_tls_context) and
Scheduler.apply freezes the heap itself (gc.freeze() after starting the probes and after the first jitter window).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import Children, heading, hwm_mb, line, note, percentile, proc_cpu_seconds, rss_mb, run_uvloop, start_target, verdict

TARGET_P99 = 0.010


class RecordingObserver:
    """The SchedulerObserver the benchmark hands the Scheduler: keeps (when, lateness) pairs and skipped slots."""

    def __init__(self, metrics) -> None:  # type: ignore[no-untyped-def]
        self._metrics = metrics
        self._clock = asyncio.get_running_loop().time
        self.samples: list[tuple[float, float]] = []
        self.skipped: Counter[str] = Counter()
        self.skip_events: list[float] = []

    def observe_lateness(self, seconds: float) -> None:
        self.samples.append((self._clock(), seconds))
        self._metrics.observe_lateness(seconds)

    def count_skipped(self, name: str, slots: int, reason: str) -> None:
        self.skipped[name] += slots
        self.skip_events.append(self._clock())
        self._metrics.count_skipped(name, slots, reason)

    def count_starved(self, name: str) -> None:
        self._metrics.count_starved(name)


class GcWatch:
    """Pause time of every garbage collection while active (gc.callbacks)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.full: list[tuple[float, float]] = []  # (perf_counter at start, pause) of generation-2 collections
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:  # type: ignore[type-arg]
        if phase == "start":
            self._started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._started
            self.pauses[info["generation"]].append(pause)
            if info["generation"] == 2:
                self.full.append((self._started, pause))

    def __enter__(self) -> "GcWatch":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def _noop_probe_type():  # type: ignore[no-untyped-def]
    from canary.contract import Probe, ProbeSettings, Result

    class NoopProbe(Probe[ProbeSettings]):
        settings_model = ProbeSettings

        async def run(self, timer):  # type: ignore[no-untyped-def]
            return Result.ok()

    return NoopProbe


async def _measure(
    kind: str, count: int, interval: float, duration: float, base_url: str | None, target_pid: int | None
) -> None:
    from canary.config import DEFAULT_BUCKETS
    from canary.contract import ProbeSettings
    from canary.scheduler import Scheduler
    from canary.scrub import Scrubber
    from canary.state import ResultStore
    from exporter.exposition import ProbeExposition
    from exporter.self_metrics import DaemonMetrics
    from probes.http import HttpProbe, HttpSettings

    loop = asyncio.get_running_loop()
    rss_start = rss_mb()
    cpu0 = time.process_time()
    if kind == "noop":
        noop = _noop_probe_type()
        settings = tuple(
            ProbeSettings(name=f"noop-{i:05d}", type="noop", channel="api", interval=f"{interval:g}s", timeout="5s")
            for i in range(count)
        )
        build = noop
    else:
        settings = tuple(
            HttpSettings(
                name=f"http-{i:05d}", channel="api", url=f"{base_url}/health", interval=f"{interval:g}s", timeout="5s",
                expect_status=[200], expect_json={"status": "healthy", "database": "active"}, channel_map="channels",
            )
            for i in range(count)
        )
        build = HttpProbe
    line("settings built", f"{(time.process_time() - cpu0) / count * 1e6:.1f} µs CPU each")

    store = ResultStore(DEFAULT_BUCKETS, 30)
    store.sync(settings, DEFAULT_BUCKETS, 30)
    exposition = ProbeExposition({"environment": "bench"}, DEFAULT_BUCKETS)
    store.add_listener(exposition.render)
    metrics = DaemonMetrics()
    observer = RecordingObserver(metrics)

    scheduler = Scheduler(store, build, observer)
    rss_before_apply = rss_mb()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await scheduler.apply(settings, interval, Scrubber())  # jitter = interval: slots spread over the whole interval
    apply_cpu, apply_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rss_after_apply = rss_mb()
    line("Scheduler.apply (builds every probe, starts its task)",
         f"{apply_wall:.2f} s wall, {apply_cpu / count * 1000:.3f} ms CPU per probe; "
         f"RSS {rss_before_apply:.0f} -> {rss_after_apply:.0f} MB (+{(rss_after_apply - rss_before_apply) * 1024 / count:.1f} KB/probe)")

    frozen = gc.get_freeze_count()
    unfrozen = len(gc.get_objects())
    tracked = unfrozen + frozen
    line("GC-tracked objects after apply",
         f"{tracked} ({tracked / count:.0f} per probe); {frozen} frozen by Scheduler.apply, {unfrozen} not frozen")

    started = loop.time()
    perf_started = time.perf_counter()
    target_cpu0 = proc_cpu_seconds(target_pid) if target_pid else 0.0
    cpu0 = time.process_time()
    with GcWatch() as gc_watch:
        await asyncio.sleep(duration)
    cpu_window = time.process_time() - cpu0
    target_cpu = (proc_cpu_seconds(target_pid) - target_cpu0) if target_pid else 0.0
    ended = loop.time()
    wall_stop = time.perf_counter()
    frozen_end = gc.get_freeze_count()  # before stop: the Scheduler's second freeze ran at t+jitter+1 s
    unfrozen = len(gc.get_objects())
    await scheduler.stop(2.0)
    stop_wall = time.perf_counter() - wall_stop

    window = [(t, s) for t, s in observer.samples if started <= t <= ended]
    every = [s for _, s in window]
    steady = [s for t, s in window if t >= started + interval]
    first = [s for t, s in window if t < started + interval]
    expected = count * (ended - started) / interval
    line("runs started in the window", f"{len(every)} of ~{expected:.0f} slots "
                                       f"({len(every) / (ended - started):.0f}/s; wanted {count / interval:.0f}/s)")
    skipped_in_window = sum(1 for t in observer.skip_events if started <= t <= ended)
    line("skipped slots", f"{sum(observer.skipped.values())} slots, by {len(observer.skipped)} probes "
                          f"({skipped_in_window} skip events in the window)")
    for label, values in (("lateness, whole window", every), (f"lateness, first {interval:g} s (first round)", first),
                          (f"lateness, after the first {interval:g} s (steady)", steady)):
        if values:
            line(label, f"p50 {percentile(values, 50) * 1000:.3f} ms, p99 {percentile(values, 99) * 1000:.3f} ms, "
                        f"max {max(values) * 1000:.3f} ms  (n={len(values)})")
    if window:
        worst_t, worst = max(window, key=lambda pair: pair[1])
        line("worst lateness happened at", f"t+{worst_t - started:.1f} s")
    if steady:
        p99 = percentile(steady, 99)
        line("target: steady p99 < 10 ms", f"{p99 * 1000:.3f} ms  [{verdict(p99 < TARGET_P99)}]")
    line("probing process CPU in the window", f"{cpu_window:.1f} s of {ended - started:.1f} s "
                                              f"({cpu_window / (ended - started) * 100:.0f}% of one core; "
                                              f"{cpu_window / max(len(every), 1) * 1000:.3f} ms per run)")
    if target_pid:
        line("target process CPU in the window", f"{target_cpu:.1f} s ({target_cpu / (ended - started) * 100:.0f}% of one core)")
    for generation, pauses in gc_watch.pauses.items():
        if pauses:
            line(f"GC generation {generation} in the window",
                 f"{len(pauses)} collections, max pause {max(pauses) * 1000:.1f} ms, total {sum(pauses) * 1000:.0f} ms")
    if gc_watch.full:
        worst_gc = sorted(gc_watch.full, key=lambda pair: -pair[1])[:3]
        line("longest generation-2 collections", ", ".join(f"{pause * 1000:.0f} ms at t+{at - perf_started:.1f} s" for at, pause in worst_gc))
    line("GC-tracked objects at the end of the window",
         f"{unfrozen + frozen_end} ({frozen_end} frozen, incl. the Scheduler's re-freeze after the first jitter window; "
         f"{unfrozen} not frozen, which full collections traverse)")
    gc.unfreeze()  # the stopped probes are garbage now; the next kind starts from a collectable heap
    outcomes: Counter[str] = Counter()
    for record in store.records():
        outcomes["ok"] += record.runs["success"]
        outcomes.update(record.failures)
    line("results recorded (incl. runs finishing in the stop grace)", ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    line("RSS now / peak (VmHWM)", f"{rss_mb():.0f} MB / {hwm_mb():.0f} MB (at start of this kind: {rss_start:.0f} MB)")
    line("Scheduler.stop(grace=2s)", f"{stop_wall:.2f} s")


def run(kinds: tuple[str, ...], count: int, interval: float, duration: float) -> None:
    heading(f"2. Scheduler lateness: {count} probes every {interval:g} s, jitter {interval:g} s, {duration:g} s per kind")
    log_dir = Path(tempfile.mkdtemp(prefix="canary-bench-lateness-"))
    log_file = log_dir / "scheduler.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    with Children() as children:
        for kind in kinds:
            if kind == "noop":
                print("  (a) no-op probes (Probe subclass whose run returns Result.ok()):", flush=True)
                run_uvloop(_measure(kind, count, interval, duration, None, None))
            else:
                target_proc, base_url = start_target(children)
                print(f"  (b) HttpProbes (api-health settings, fresh connection) against {base_url}/health "
                      f"(target pid {target_proc.pid}), as shipped:", flush=True)
                try:
                    run_uvloop(_measure(kind, count, interval, duration, base_url, target_proc.pid))
                finally:
                    children.stop(target_proc)
            gc.collect()
    handler.close()
    warnings = sum(1 for row in log_file.read_text(errors="replace").splitlines() if " WARNING " in row)
    note(f"scheduler/runner log: {log_file} ({log_file.stat().st_size} bytes, {warnings} WARNING lines)")
