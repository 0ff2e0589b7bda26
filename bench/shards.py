"""Part 5: how many probe runs per second one machine carries with 1 and with 2 shards, at steady p99 lateness < 10 ms.

For each shard count N, N `probe run --shard i/N` processes share one generated config of cheap HTTP probes (the
api-health settings, fresh connection) against bench/target.py; the probe count steps up until the steady p99
lateness of any shard reaches 10 ms or the machine's CPU is spent. Lateness is what each daemon exports itself,
its `canary_scheduler_lateness_seconds` histogram, read at the edges of a few windows after the first round
(p99 interpolated within buckets, as histogram_quantile does); CPU comes from /proc. The reads are ordinary
scrapes, so their cost is in the figures as a Prometheus scrape's would be. The target runs on the same machine
and takes its share of the CPU.

The machine is shared: a window in which other work (from /proc/stat, less the daemons and the target) used more
than QUIET of a core is left out; a step with fewer than QUIET_WINDOWS quiet windows is measured again, and so is
a step that missed, since a miss ends the stepping (at most ATTEMPTS measurements of a step, all within a budget).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import (
    CLK_TCK, HOST, Children, free_port, heading, line, note, probe_executable, proc_cpu_seconds, start_target, wait_for_port,
)

TARGET_P99 = 0.010
INTERVAL = 2.0  # short, so the first round (one interval) is short and a few thousand probes make a high rate
SATURATED = 0.90  # of the machine's cores (daemons + target), or of one core for a single daemon
QUIET = 0.15  # cores other work may use in a window that counts (this is a shared machine)
QUIET_WINDOWS = 2  # a step counts when at least this many of its windows were quiet
ATTEMPTS = 5  # measurements of one step before giving up on finding quiet windows
BUDGET_QUICK, BUDGET = 300.0, 1500.0  # seconds for the whole part; a step under way finishes
_HEAD_BYTES = 65_536  # the daemon's own metrics come first in /metrics; the rest (every probe's series) is not read


@dataclass
class Sample:
    """Everything read at one moment: each daemon's self-metrics and CPU, the target's CPU, the machine's."""

    at: float
    metrics: list[dict[str, float]]
    daemon_cpu: list[float]
    target_cpu: float
    machine_cpu: float


@dataclass
class Window:
    """What happened between two samples."""

    elapsed: float
    buckets: list[list[tuple[float, float]]]  # per daemon: (upper bound, runs at or below it)
    skipped: float
    daemon_cpu: list[float]  # each daemon's share of one core
    target_cpu: float
    others: float  # cores spent by everything else on the machine (other work, this script)

    @property
    def quiet(self) -> bool:
        return self.others < QUIET


@dataclass
class Step:
    shards: int
    rate: int
    windows: list[Window]

    @property
    def used(self) -> list[Window]:
        return [window for window in self.windows if window.quiet]

    @property
    def counts(self) -> bool:
        return len(self.used) >= QUIET_WINDOWS

    def _total(self, values: list[float]) -> float:
        return sum(values) / max(sum(window.elapsed for window in self.used), 1e-9)

    @property
    def buckets(self) -> list[list[tuple[float, float]]]:
        """Per daemon, over the quiet windows."""
        merged = []
        for daemon in range(self.shards):
            rows = [window.buckets[daemon] for window in self.used]
            merged.append([(rows[0][i][0], sum(row[i][1] for row in rows)) for i in range(len(rows[0]))] if rows else [])
        return merged

    @property
    def p99(self) -> float:
        """The worst shard's."""
        return max((_quantile(0.99, buckets) for buckets in self.buckets), default=float("nan"))

    @property
    def within(self) -> float:
        runs = sum(buckets[-1][1] for buckets in self.buckets if buckets)
        return sum(dict(buckets).get(TARGET_P99, 0.0) for buckets in self.buckets) / max(runs, 1)

    @property
    def runs_per_second(self) -> float:
        return self._total([sum(b[-1][1] for b in window.buckets if b) for window in self.used])

    @property
    def skipped(self) -> float:
        return self._total([window.skipped for window in self.used])

    @property
    def daemon_cpu(self) -> list[float]:
        return [self._total([window.daemon_cpu[d] * window.elapsed for window in self.used]) for d in range(self.shards)]

    @property
    def target_cpu(self) -> float:
        return self._total([window.target_cpu * window.elapsed for window in self.used])

    @property
    def others(self) -> float:
        return self._total([window.others * window.elapsed for window in self.used])

    @property
    def machine_cpu(self) -> float:
        return sum(self.daemon_cpu) + self.target_cpu

    @property
    def saturated(self) -> bool:
        return self.machine_cpu >= SATURATED * (os.cpu_count() or 1) or max(self.daemon_cpu) >= SATURATED

    @property
    def met(self) -> bool:
        """p99 under 10 ms, and the runs kept up with their slots (a skipped slot is lateness too)."""
        return self.counts and self.p99 < TARGET_P99 and self.runs_per_second >= 0.97 * self.rate


def _config(count: int, base_url: str, shards: int) -> str:
    head = f"""[daemon]
interval = "{INTERVAL:g}s"
timeout = "1s"
jitter = "{INTERVAL:g}s"
shutdown_grace = "1s"
labels = {{ environment = "bench" }}
log_level = "warning"

"""
    probe = """[[probes]]
name = "http-{i:05d}"
type = "http"
channel = "api"
url = "{url}/health"
expect_status = [200]
expect_json = {{ status = "healthy", database = "active" }}
channel_map = "channels"

"""
    return head + "".join(probe.format(i=i, url=base_url) for i in range(count))


def _self_metrics(port: int) -> dict[str, float]:
    """The lateness buckets, their count and the skipped slots, from the head of one scrape."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as response:
        head = response.read(_HEAD_BYTES).decode(errors="replace")
    values: dict[str, float] = {}
    for row in head.splitlines():
        if row.startswith("canary_scheduler_lateness_seconds_bucket"):
            key, _, value = row.rpartition(" ")
            values["canary_scheduler_lateness_seconds_bucket" + key[key.index('le="') - 1:]] = float(value)
        elif row.startswith("canary_scheduler_skipped_runs_total"):
            values["canary_scheduler_skipped_runs_total"] = float(row.rpartition(" ")[2])
    return values  # keyed without the static labels, which the daemon's own series carry too


def _buckets(before: dict[str, float], after: dict[str, float]) -> list[tuple[float, float]]:
    """(upper bound, runs at or below it) within the window, in increasing order."""
    out = []
    for key, value in after.items():
        if key.startswith("canary_scheduler_lateness_seconds_bucket"):
            le = key.split('le="')[1].split('"')[0]
            out.append((float("inf") if le == "+Inf" else float(le), value - before.get(key, 0.0)))
    return sorted(out)


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile: linear within the bucket the rank falls in; the highest finite bound for +Inf."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-9)
        lower, below = upper, cumulative
    return lower


def _machine_cpu_seconds() -> float:
    """CPU time all cores have spent running processes since boot (/proc/stat: user, nice, system, steal).

    Interrupt time is left out: most of it is the loopback traffic of the probes themselves, which the kernel does
    not charge to any process."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in handle.readline().split()[1:9])
    return (user + nice + system + steal) / CLK_TCK


def _wait_for_quiet(target_pid: int, limit: float = 60.0) -> float:
    """Wait (at most `limit` seconds) until other work uses less than QUIET of a core for 2 s; returns what it used."""
    deadline, others = time.monotonic() + limit, float("inf")
    while time.monotonic() < deadline:
        machine, target, at = _machine_cpu_seconds(), proc_cpu_seconds(target_pid), time.monotonic()
        time.sleep(2.0)
        elapsed = time.monotonic() - at
        others = (_machine_cpu_seconds() - machine - (proc_cpu_seconds(target_pid) - target)) / elapsed
        if others < QUIET:
            break
    return others


def _sample(started: list[tuple[subprocess.Popen[bytes], int]], target_pid: int) -> Sample:
    return Sample(
        at=time.monotonic(),
        metrics=[_self_metrics(port) for _, port in started],
        daemon_cpu=[proc_cpu_seconds(proc.pid) for proc, _ in started],
        target_cpu=proc_cpu_seconds(target_pid),
        machine_cpu=_machine_cpu_seconds(),
    )


def _window(before: Sample, after: Sample) -> Window:
    elapsed = after.at - before.at
    daemon_cpu = [(b - a) / elapsed for a, b in zip(before.daemon_cpu, after.daemon_cpu)]
    target_cpu = (after.target_cpu - before.target_cpu) / elapsed
    skipped = sum(b.get("canary_scheduler_skipped_runs_total", 0.0) - a.get("canary_scheduler_skipped_runs_total", 0.0)
                  for a, b in zip(before.metrics, after.metrics))
    others = (after.machine_cpu - before.machine_cpu) / elapsed - sum(daemon_cpu) - target_cpu
    buckets = [_buckets(a, b) for a, b in zip(before.metrics, after.metrics)]
    return Window(elapsed, buckets, skipped, daemon_cpu, target_cpu, max(others, 0.0))


def _measure(children: Children, probe: Path, work: Path, base_url: str, target_pid: int, shards: int, rate: int,
             windows: int, seconds: float) -> Step:
    count = int(rate * INTERVAL)
    config = work / f"shards-{shards}-{count}.toml"
    config.write_text(_config(count, base_url, shards))
    started = []
    for shard in range(shards):
        port = free_port()
        log = (work / f"daemon-{shards}-{count}-{shard}.log").open("wb")
        proc = children.start([str(probe), "run", "--config", str(config), "--listen", f"{HOST}:{port}", "--shard", f"{shard}/{shards}",
                               "--state.dir", str(work / f"state-{shards}-{count}-{shard}")],
                              stdout=log, stderr=log)
        started.append((proc, port))
    try:
        for proc, port in started:
            wait_for_port(port, proc, timeout=120)
        time.sleep(INTERVAL + 3.0)  # the first round (sessions being built, the collector resting) is not steady
        samples = [_sample(started, target_pid)]
        for _ in range(windows):
            time.sleep(seconds)
            samples.append(_sample(started, target_pid))
    finally:
        for proc, _ in started:
            children.stop(proc, timeout=30)
    return Step(shards, rate, [_window(a, b) for a, b in zip(samples, samples[1:])])


def _print(step: Step) -> None:
    label = f"{step.shards} shard{'s' if step.shards > 1 else ''}, {step.rate}/s ({int(step.rate * INTERVAL)} probes)"
    quiet = f"{len(step.used)} of {len(step.windows)} windows quiet"
    if not step.counts:
        others = ", ".join(f"{window.others:.2f}" for window in step.windows)
        line(label, f"{quiet}, measuring again (cores used by other work in each window: {others})")
        return
    cpus = " + ".join(f"{c * 100:.0f}%" for c in step.daemon_cpu)
    flags = ("" if step.met else "  MISSED") + ("  CPU saturated" if step.saturated else "")
    line(label, f"p99 {step.p99 * 1000:.2f} ms ({step.within * 100:.2f}% < 10 ms), {step.runs_per_second:.0f} runs/s, "
                f"{step.skipped:.1f} skipped/s; CPU daemons {cpus}, target {step.target_cpu * 100:.0f}%, "
                f"other work {step.others * 100:.0f}% ({quiet}){flags}")


def _quiet_step(children: Children, probe: Path, work: Path, base_url: str, target_pid: int, shards: int, rate: int,
                windows: int, seconds: float, deadline: float) -> Step | None:
    """One step, measured again while other work left too few windows quiet, and once more when it missed (a miss
    ends the stepping, so it must not be a busy spell elsewhere on the machine). None when time or attempts run out."""
    counted: list[Step] = []
    for _attempt in range(ATTEMPTS):
        if time.monotonic() >= deadline:
            break
        _wait_for_quiet(target_pid, limit=max(0.0, min(60.0, deadline - time.monotonic())))
        step = _measure(children, probe, work, base_url, target_pid, shards, rate, windows, seconds)
        _print(step)
        if step.counts:
            counted.append(step)
        if any(step.met for step in counted) or len(counted) == 2:
            break
    met = [step for step in counted if step.met]
    return met[0] if met else (counted[-1] if counted else None)


def run(quick: bool, max_shards: int = 2) -> None:
    rates = (250, 500, 1000, 1500, 2000, 2500, 3000, 4000) if quick else (250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2500, 3000, 3500, 4000, 5000)
    windows, seconds = (3, 5.0) if quick else (4, 10.0)
    heading(f"5. Shards: probe runs per second at steady p99 lateness < 10 ms, 1..{max_shards} shards, "
            f"HTTP probes every {INTERVAL:g} s, {windows} windows of {seconds:g} s per step, {os.cpu_count()} CPUs")
    note(f"a window counts only when other work on the machine used less than {QUIET:g} of a core in it")
    probe = probe_executable()
    if probe is None:
        note("no `probe` executable beside this interpreter; install the package (pip install -e .) and rerun")
        return
    work = Path(tempfile.mkdtemp(prefix="canary-bench-shards-"))
    best: dict[int, Step] = {}
    deadline = time.monotonic() + (BUDGET_QUICK if quick else BUDGET)
    going = list(range(1, max_shards + 1))
    ended: dict[int, str] = {}  # why each shard count stopped stepping up
    with Children() as children:
        target, base_url = start_target(children)
        # Shard counts take turns at each rate, so a busy spell of other work on the machine falls on all alike.
        for rate in rates:
            for shards in list(going):
                step = _quiet_step(children, probe, work, base_url, target.pid, shards, rate, windows, seconds, deadline)
                if step is not None and step.met:
                    best[shards] = step
                if step is None:
                    ended[shards] = f"{rate}/s not measured: out of time or of quiet windows"
                elif not step.met or step.saturated:
                    ended[shards] = f"{rate}/s {'missed' if not step.met else 'met'}{', CPU saturated' if step.saturated else ''}"
                if shards in ended:
                    going.remove(shards)
            if not going:
                break
    for shards in range(1, max_shards + 1):
        step = best.get(shards)
        line(f"highest rate met with {shards} shard{'s' if shards > 1 else ''}",
             (f"{step.rate}/s (p99 {step.p99 * 1000:.2f} ms, daemons + target CPU {step.machine_cpu * 100:.0f}%)" if step else "none")
             + f"; next step: {ended.get(shards, 'none left')}")
    if 1 in best and max_shards in best:
        line(f"{max_shards} shards / 1 shard", f"{best[max_shards].rate / best[1].rate:.2f}x (as fine as the steps)")
    note(f"daemon logs and configs: {work}")
