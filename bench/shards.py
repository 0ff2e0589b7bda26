"""Part 5: how many probe runs per second one machine carries with 1 and with 2 shards, at steady p99 lateness < 10 ms.

For each shard count N, N `probe run --shard i/N` processes share one generated config of cheap HTTP probes (the
api-health settings, fresh connection) against bench/target.py; the probe count steps up until the steady p99
lateness of any shard reaches 10 ms or the machine's CPU is spent. Lateness is what each daemon exports itself,
its `canary_scheduler_lateness_seconds` histogram, read at the start and end of a window after the first round
(p99 interpolated within buckets, as histogram_quantile does); CPU comes from /proc. The two reads are ordinary
scrapes, so their cost is in the figures as a Prometheus scrape's would be. The target runs on the same machine
and takes its share of the CPU.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import HOST, Children, free_port, heading, line, note, probe_executable, proc_cpu_seconds, start_target, wait_for_port

TARGET_P99 = 0.010
INTERVAL = 2.0  # short, so the first round (one interval) is short and a few thousand probes make a high rate
SATURATED = 0.90  # of the machine's cores (daemons + target), or of one core for a single daemon
_HEAD_BYTES = 65_536  # the daemon's own metrics come first in /metrics; the rest (every probe's series) is not read


@dataclass
class Step:
    shards: int
    rate: int
    p99: float  # seconds; the worst shard's
    within: float  # share of runs started less than 10 ms late, over all shards
    runs_per_second: float
    skipped: float
    daemon_cpu: list[float]  # each daemon's share of one core
    target_cpu: float

    @property
    def machine_cpu(self) -> float:
        return sum(self.daemon_cpu) + self.target_cpu

    @property
    def saturated(self) -> bool:
        return self.machine_cpu >= SATURATED * (os.cpu_count() or 1) or max(self.daemon_cpu) >= SATURATED

    @property
    def met(self) -> bool:
        """p99 under 10 ms, and the runs kept up with their slots (a skipped slot is lateness too)."""
        return self.p99 < TARGET_P99 and self.runs_per_second >= 0.97 * self.rate


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
        if row.startswith(("canary_scheduler_lateness_seconds_bucket", "canary_scheduler_lateness_seconds_count",
                           "canary_scheduler_skipped_runs_total")):
            key, _, value = row.rpartition(" ")
            values[key] = float(value)
    return values


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


def _measure(children: Children, probe: Path, work: Path, base_url: str, target_pid: int, shards: int, rate: int,
             window: float) -> Step:
    count = int(rate * INTERVAL)
    config = work / f"shards-{shards}-{count}.toml"
    config.write_text(_config(count, base_url, shards))
    started = []
    for shard in range(shards):
        port = free_port()
        log = (work / f"daemon-{shards}-{count}-{shard}.log").open("wb")
        proc = children.start([str(probe), "run", "--config", str(config), "--listen", f"{HOST}:{port}", "--shard", f"{shard}/{shards}"],
                              stdout=log, stderr=log)
        started.append((proc, port))
    try:
        for proc, port in started:
            wait_for_port(port, proc, timeout=120)
        time.sleep(INTERVAL + 3.0)  # the first round (sessions being built, the collector resting) is not steady
        before = [_self_metrics(port) for _, port in started]
        cpu_before = [proc_cpu_seconds(proc.pid) for proc, _ in started]
        target_before, wall = proc_cpu_seconds(target_pid), time.monotonic()
        time.sleep(window)
        after = [_self_metrics(port) for _, port in started]
        elapsed = time.monotonic() - wall
        cpu = [(proc_cpu_seconds(proc.pid) - was) / elapsed for (proc, _), was in zip(started, cpu_before)]
        target_cpu = (proc_cpu_seconds(target_pid) - target_before) / elapsed
    finally:
        for proc, _ in started:
            children.stop(proc, timeout=30)
    windows = [_buckets(b, a) for b, a in zip(before, after)]
    runs = sum(w[-1][1] for w in windows if w)
    within = sum(dict(w).get(TARGET_P99, 0.0) for w in windows) / max(runs, 1)
    skipped = sum(a.get("canary_scheduler_skipped_runs_total", 0) - b.get("canary_scheduler_skipped_runs_total", 0)
                  for b, a in zip(before, after))
    return Step(shards, rate, max(_quantile(0.99, w) for w in windows), within, runs / elapsed, skipped / elapsed, cpu, target_cpu)


def _print(step: Step) -> None:
    cpus = " + ".join(f"{c * 100:.0f}%" for c in step.daemon_cpu)
    flags = ("" if step.met else "  MISSED") + ("  CPU saturated" if step.saturated else "")
    line(f"{step.shards} shard{'s' if step.shards > 1 else ''}, {step.rate}/s ({int(step.rate * INTERVAL)} probes)",
         f"p99 {step.p99 * 1000:.2f} ms ({step.within * 100:.2f}% < 10 ms), {step.runs_per_second:.0f} runs/s, "
         f"{step.skipped:.1f} skipped/s; CPU daemons {cpus}, target {step.target_cpu * 100:.0f}%{flags}")


def run(quick: bool, max_shards: int = 2) -> None:
    rates = (500, 1000, 1500, 2000, 3000, 4000, 5000) if quick else (250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2500, 3000, 3500, 4000, 5000, 6000)
    window = 10.0 if quick else 30.0
    heading(f"5. Shards: probe runs per second at steady p99 lateness < 10 ms, 1..{max_shards} shards, "
            f"HTTP probes every {INTERVAL:g} s, {window:g} s windows, {os.cpu_count()} CPUs")
    probe = probe_executable()
    if probe is None:
        note("no `probe` executable beside this interpreter; install the package (pip install -e .) and rerun")
        return
    work = Path(tempfile.mkdtemp(prefix="canary-bench-shards-"))
    best: dict[int, Step] = {}
    with Children() as children:
        target, base_url = start_target(children)
        for shards in range(1, max_shards + 1):
            for rate in rates:
                step = _measure(children, probe, work, base_url, target.pid, shards, rate, window)
                _print(step)
                if step.met:
                    best[shards] = step
                if not step.met or step.saturated:
                    break
    for shards, step in best.items():
        line(f"highest rate met with {shards} shard{'s' if shards > 1 else ''}",
             f"{step.rate}/s (p99 {step.p99 * 1000:.2f} ms, machine CPU {step.machine_cpu * 100:.0f}%)")
    if 1 in best and max_shards in best:
        line(f"{max_shards} shards / 1 shard", f"{best[max_shards].rate / best[1].rate:.2f}x (as fine as the steps: "
                                                f"the next step up missed or saturated the CPU)")
    note(f"daemon logs and configs: {work}")
