"""Part 7: the whole `probe run` process measured from outside, as a user runs it and Prometheus scrapes it.

`probe run` runs a generated config of N HTTP probes (the api-health probe's checks, a fresh connection per run)
against bench/target.py, each in its own process. This process only watches, as an operator's tools would:
- a scraper pulls `/metrics` every 15 s as Prometheus does (its Accept and Accept-Encoding headers, whole body);
- CPU and RSS come from /proc/<pid> every second;
- lateness comes from the daemon's own `canary_scheduler_lateness_seconds` histogram, read at the edges of each
  phase by an extra scrape: the first round (from the start to one interval after /readyz), the steady state, and
  the round after a SIGHUP reload that changes every probe (from the signal to one interval after the reload is
  logged). Quantiles are interpolated within buckets as `histogram_quantile` does, so a max is only a bucket bound.

The in-process parts (`lateness`, `http-cpu`, `scrape`) break these figures down; this one is what they add up
to, with the scheduler, logging, the garbage collector and scrapes all in the same process. The machine is
shared: the load average and the CPU other work used in each phase are printed beside the figures, and `--repeat`
runs it again and prints the medians.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import CLK_TCK, Children, heading, line, median, note, percentile, proc_cpu_seconds, start_target, verdict
from outside import Histogram, RunningDaemon, SelfMetrics, config_text, probe_totals

TARGET_P99 = 0.010
SCRAPE_EVERY = 15.0


def machine_cpu_seconds() -> float:
    """CPU time every core has spent running anything since boot (/proc/stat: user, nice, system, steal)."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in handle.readline().split()[1:9])
    return (user + nice + system + steal) / CLK_TCK


@dataclass
class Mark:
    """One phase edge: a scrape of the daemon's own metrics, and the CPU of the daemon, target and machine then."""

    name: str
    metrics: SelfMetrics
    daemon_cpu: float
    target_cpu: float
    machine_cpu: float
    loadavg: float
    totals: dict[str, float] = field(default_factory=dict)  # every probe's runs by result, failures by reason

    @property
    def at(self) -> float:
        return self.metrics.at


@dataclass
class Phase:
    name: str
    start: Mark
    end: Mark

    @property
    def seconds(self) -> float:
        return self.end.at - self.start.at

    @property
    def lateness(self) -> Histogram:
        return Histogram.between(self.start.metrics, self.end.metrics)

    @property
    def skipped(self) -> float:
        return (self.end.metrics.total("canary_scheduler_skipped_runs_total")
                - self.start.metrics.total("canary_scheduler_skipped_runs_total"))

    @property
    def cpu_per_run(self) -> float:
        runs = self.lateness.count
        return (self.end.daemon_cpu - self.start.daemon_cpu) / runs if runs else float("nan")

    @property
    def daemon_share(self) -> float:
        return (self.end.daemon_cpu - self.start.daemon_cpu) / self.seconds

    @property
    def others(self) -> float:
        """Cores used by everything but the daemon and the target (other work on the machine, this script)."""
        machine = (self.end.machine_cpu - self.start.machine_cpu) / self.seconds
        target = (self.end.target_cpu - self.start.target_cpu) / self.seconds
        return max(machine - self.daemon_share - target, 0.0)


@dataclass
class Outcome:
    ready_after: float
    ready_cpu: float
    ready_rss: float
    phases: list[Phase]
    reload_seconds: float
    rss: list[tuple[float, float]]  # (seconds since ready, MB)
    hwm: float
    scrapes: list[SelfMetrics]

    def phase(self, name: str) -> Phase | None:
        return next((phase for phase in self.phases if phase.name == name), None)


class _Watcher(threading.Thread):
    """Samples the daemon's RSS every second and scrapes /metrics every SCRAPE_EVERY seconds, until told to stop."""

    def __init__(self, daemon: RunningDaemon, scrape_every: float = SCRAPE_EVERY) -> None:
        super().__init__(name="watcher", daemon=True)
        self._daemon = daemon
        self._scrape_every = scrape_every
        self._halt = threading.Event()
        self.rss: list[tuple[float, float]] = []
        self.scrapes: list[SelfMetrics] = []
        self.errors: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        next_scrape = started + self._scrape_every if self._scrape_every > 0 else float("inf")
        while not self._halt.is_set():
            try:
                self.rss.append((time.monotonic() - started, self._daemon.rss_mb()))
                if time.monotonic() >= next_scrape:
                    next_scrape += self._scrape_every
                    self.scrapes.append(self._daemon.scrape())
            except (OSError, RuntimeError) as exc:  # the daemon went away, or a scrape failed: say so at the end
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if len(self.errors) > 20:
                    return
            self._halt.wait(1.0)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)


def _mark(name: str, daemon: RunningDaemon, target_pid: int) -> Mark:
    metrics = daemon.scrape(keep_body=True)
    mark = Mark(name, metrics, daemon.cpu_seconds(), proc_cpu_seconds(target_pid), machine_cpu_seconds(), os.getloadavg()[0])
    mark.totals, metrics.body = probe_totals(metrics.body), b""  # parsed after the CPU figures were read
    return mark


def _sleep_until(moment: float, daemon: RunningDaemon) -> None:
    while (left := moment - time.monotonic()) > 0:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"probe run exited with {daemon.proc.returncode}; see {daemon.log}")
        time.sleep(min(left, 0.5))


def measure(work: Path, children: Children, base_url: str, target_pid: int, count: int, interval: float, steady: float,
            after: float, reload: bool, cpus: set[int] | None = None, scrape_every: float = SCRAPE_EVERY) -> Outcome:
    config = work / "daemon.toml"
    config.write_text(config_text(count, base_url, interval))
    daemon = RunningDaemon(children, config, work / "daemon.log", cpus=cpus, extra_args=("--log.level", "info"))
    ready_after = daemon.wait_ready()
    ready_cpu, ready_rss = daemon.cpu_seconds(), daemon.rss_mb()
    ready = time.monotonic()
    # The first round's lateness counts from the start (runs start before /readyz does), its CPU from readiness.
    zero = Mark("ready", SelfMetrics(ready, 0.0, 0, 0), ready_cpu, proc_cpu_seconds(target_pid), machine_cpu_seconds(),
                os.getloadavg()[0])
    watcher = _Watcher(daemon, scrape_every)
    watcher.start()
    phases: list[Phase] = []
    reload_seconds = float("nan")
    try:
        _sleep_until(ready + interval, daemon)
        first = _mark("first round", daemon, target_pid)
        phases.append(Phase("first round", zero, first))
        _sleep_until(first.at + steady, daemon)
        steady_end = _mark("steady", daemon, target_pid)
        phases.append(Phase("steady", first, steady_end))
        last = steady_end
        if reload:
            config.write_text(config_text(count, base_url, interval, query="round=2"))  # every probe's URL changes
            reload_seconds = daemon.reload()
            _sleep_until(time.monotonic() + interval, daemon)
            reloaded = _mark("reload round", daemon, target_pid)
            phases.append(Phase("reload round", steady_end, reloaded))
            last = reloaded
        if after > 0:
            _sleep_until(last.at + after, daemon)
            end = _mark("after", daemon, target_pid)
            phases.append(Phase("after the reload" if reload else "after", last, end))
            last = end
        hwm = daemon.hwm_mb()
    finally:
        watcher.stop()
        daemon.stop()
    if watcher.errors:
        note(f"watcher errors: {'; '.join(watcher.errors[:3])}")
    marks = [phase.end.metrics for phase in phases]
    return Outcome(ready_after, ready_cpu, ready_rss, phases, reload_seconds, watcher.rss, hwm,
                   sorted([*watcher.scrapes, *marks], key=lambda m: m.at))


def _report(outcome: Outcome, interval: float) -> None:
    line("ready (/readyz 200) after", f"{outcome.ready_after:.2f} s; CPU by then {outcome.ready_cpu:.2f} s, RSS {outcome.ready_rss:.0f} MB")
    if outcome.reload_seconds == outcome.reload_seconds:
        line("reload (SIGHUP → 'config reloaded' logged), every probe changed", f"{outcome.reload_seconds:.2f} s")
    for phase in outcome.phases:
        late = phase.lateness
        line(f"lateness, {phase.name} ({phase.seconds:.0f} s)", late.summary())
        line("  skipped slots / CPU per run / daemon CPU / other work",
             f"{phase.skipped:.0f} / {phase.cpu_per_run * 1000:.3f} ms / {phase.daemon_share * 100:.0f}% of a core / "
             f"{phase.others:.2f} cores (load average {phase.end.loadavg:.2f})")
    for phase in outcome.phases:
        if phase.lateness.count:
            p99 = phase.lateness.quantile(0.99)
            line(f"target: p99 < 10 ms, {phase.name}", f"{p99 * 1000:.2f} ms  [{verdict(p99 < TARGET_P99)}]")
    if outcome.rss:
        minute = [f"{mb:.0f}" for seconds, mb in outcome.rss if int(seconds) % 60 == 0 and seconds >= 1]
        line("RSS after the first round / every minute / at the end / peak (VmHWM)",
             f"{_rss_at(outcome.rss, interval):.0f} / [{', '.join(minute[:20])}] / {outcome.rss[-1][1]:.0f} / {outcome.hwm:.0f} MB")
    times = [scrape.seconds for scrape in outcome.scrapes]
    if times:
        last = outcome.scrapes[-1]
        line("/metrics while probing (as Prometheus, and at phase edges): p50 / max",
             f"{median(times) * 1000:.0f} ms / {max(times) * 1000:.0f} ms (n={len(times)}; "
             f"{last.size / 1e6:.1f} MB on the wire, {last.body_size / 1e6:.1f} MB of text)")
    for phase in outcome.phases:
        line(f"results by the end of {phase.name} (a reload restarts a changed probe's counts)",
             ", ".join(f"{key} {value:.0f}" for key, value in sorted(phase.end.totals.items()) if value) or "none")


def _rss_at(samples: list[tuple[float, float]], seconds: float) -> float:
    return min(samples, key=lambda sample: abs(sample[0] - seconds))[1]


def run(count: int, interval: float, steady: float, after: float, reload: bool, repeat: int, cpus: set[int] | None = None,
        scrape_every: float = SCRAPE_EVERY) -> list[Outcome]:
    scraped = f"scraped every {scrape_every:g} s" if scrape_every > 0 else "scraped only at the edges of the phases"
    heading(f"7. `probe run` from outside: {count} HTTP probes every {interval:g} s (jitter {interval:g} s), "
            f"{scraped}; steady {steady:g} s" + (", then a reload that changes every probe" if reload else ""))
    note("lateness from the daemon's own histogram (quantiles within buckets); CPU and RSS from /proc; "
         "'other work' is CPU used by neither the daemon nor the target (the machine is shared)")
    work = Path(tempfile.mkdtemp(prefix="canary-bench-daemon-"))
    outcomes = []
    with Children() as children:
        target, base_url = start_target(children)
        for attempt in range(repeat):
            if repeat > 1:
                print(f"  run {attempt + 1} of {repeat} (load average {os.getloadavg()[0]:.2f}):", flush=True)
            run_dir = work / f"run-{attempt + 1}"
            run_dir.mkdir()
            outcome = measure(run_dir, children, base_url, target.pid, count, interval, steady, after, reload, cpus, scrape_every)
            _report(outcome, interval)
            outcomes.append(outcome)
    if repeat > 1:
        print(f"  medians of {repeat} runs:", flush=True)
        for name in [phase.name for phase in outcomes[0].phases]:
            phases = [p for p in (o.phase(name) for o in outcomes) if p is not None and p.lateness.count]
            if phases:
                line(f"lateness p99, {name}", f"{median([p.lateness.quantile(0.99) for p in phases]) * 1000:.2f} ms "
                     f"(runs: {', '.join(f'{p.lateness.quantile(0.99) * 1000:.1f}' for p in phases)}); "
                     f"within 10 ms {median([p.lateness.within(0.01) for p in phases]) * 100:.2f}%")
        steady_phases = [p for p in (o.phase("steady") for o in outcomes) if p is not None]
        if steady_phases:
            line("CPU per run, steady", f"{median([p.cpu_per_run for p in steady_phases]) * 1000:.3f} ms")
        line("RSS at the end", f"{median([o.rss[-1][1] for o in outcomes if o.rss]):.0f} MB")
        line("/metrics p50", f"{median([percentile([s.seconds for s in o.scrapes], 50) for o in outcomes]) * 1000:.0f} ms")
    note(f"configs and daemon logs: {work}")
    return outcomes
