"""An overloaded canary pages nobody: `probe run` pinned to one core beside busy loops sheds slots, marks its starved
runs as such, says it is saturated, and counts no probe failure; alone on that core it is not saturated at all.

The daemon and the busy loops are real processes pinned with sched_setaffinity; the target is `probe sandbox`,
left to the other core. Every process is started here and ended by its pid; the busy loops also end by themselves.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.mixin.config import THRESHOLDS
from tests.conftest import Process, ROOT, free_port, http_get, probe_command, wait_for, wait_for_port, write_config

PROBES = 600  # every 2 s: 300 runs a second, a fifth of a core or so; with 8 busy loops beside it the daemon gets a ninth
BUSY_LOOPS = 8
# The overloaded daemon also runs at a lower priority, so that however little CPU its probes cost on this machine it
# gets less: at nice 10 (weight 110 against 1024 per busy loop) about 1.3 % of its core, where its 300 runs a second
# need 10-20 %. At nice 0 with 8 loops it got a ninth, which a fast machine's daemon nearly kept up with (ratio 0.04).
OVERLOADED_NICE = 10
WATCH = 15.0  # seconds watched once the first round is over
SATURATED = THRESHOLDS["saturation_ratio"]  # where CanarySaturated fires
BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture
def cores() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one for the daemon and the busy loops, one for the target")
    return cpus[0], cpus[1]


@pytest.fixture
def pinned_sandbox(cores: tuple[int, int]) -> Iterator[str]:
    port = free_port()
    process = Process(probe_command("sandbox", "--listen", f"127.0.0.1:{port}"), cwd=ROOT, cpus={cores[1]})
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def _config(tmp_path: Path, platform: str) -> Path:
    head = """
        [daemon]
        interval = "2s"
        timeout = "1s"
        jitter = "2s"
        shutdown_grace = "1s"
        labels = { environment = "saturation" }
        log_level = "warning"
    """
    probe = (f'\n[[probes]]\nname = "api-{{i:03d}}"\ntype = "http"\nchannel = "api"\nurl = "{platform}/health"\n'
             'expect_status = [200]\nchannel_map = "channels"\n')
    return write_config(tmp_path, head + "".join(probe.format(i=i) for i in range(PROBES)))


def _scrape(base: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    status, text = http_get(f"{base}/metrics")
    assert status == 200
    values: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return values


def _total(values: dict[str, dict[frozenset[tuple[str, str]], float]], name: str, **labels: str) -> float:
    return sum(v for have, v in values.get(name, {}).items() if set(labels.items()) <= have)


def _watch(tmp_path: Path, platform: str, core: int, busy_loops: int, nice: int = 0) -> tuple[list[float], dict]:  # type: ignore[type-arg]
    """Runs the daemon on `core` at `nice` (with `busy_loops` beside it once its first round is over) for WATCH
    seconds; returns the saturation ratio of each scrape and the last scrape."""
    port = free_port()
    daemon = Process(probe_command("run", "--config", str(_config(tmp_path, platform)), "--listen", f"127.0.0.1:{port}"),
                     cwd=ROOT, cpus={core}, nice=nice)
    busy: list[Process] = []
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, daemon, timeout=60)
        # The first round is over once every probe has a verdict.
        wait_for(lambda: _total(_scrape(base), "canary_probe_runs_total") >= PROBES, timeout=60, what="a first run of each probe")
        busy = [Process([sys.executable, "-c", BUSY.format(seconds=WATCH + 60)], cpus={core}) for _ in range(busy_loops)]
        ratios = []
        end = time.monotonic() + WATCH
        while time.monotonic() < end:  # each scrape may take seconds when the daemon is starved: bounded by WATCH
            ratios.append(_total(_scrape(base), "canary_saturation_ratio"))
            time.sleep(2.0)
        for process in busy:  # the daemon answers the last scrape on a free core, quickly
            process.stop()
        last = _scrape(base)
        return ratios, last
    finally:
        for process in busy:
            process.stop()
        daemon.stop()


def test_an_overloaded_daemon_sheds_slots_and_counts_no_failure(tmp_path: Path, pinned_sandbox: str, cores: tuple[int, int]) -> None:
    ratios, values = _watch(tmp_path, pinned_sandbox, cores[0], BUSY_LOOPS, nice=OVERLOADED_NICE)
    # It says it is saturated, above CanarySaturated's threshold (shedding holds its lag near its 0.1 s bound)...
    assert max(ratios) > SATURATED, ratios
    assert _total(values, "canary_scheduler_skipped_runs_total", reason="saturated") > 0  # ...sheds slots...
    # ...and none of its own slowness became a probe failure or a channel down.
    assert _total(values, "canary_probe_runs_total", result="failure") == 0, {
        labels: v for labels, v in values["canary_probe_failures_total"].items() if v}
    assert _total(values, "canary_probe_runs_total", result="success") >= PROBES
    assert all(v == 1 for v in values["canary_channel_up"].values()), values["canary_channel_up"]


def test_the_same_daemon_alone_on_its_core_is_not_saturated(tmp_path: Path, pinned_sandbox: str, cores: tuple[int, int]) -> None:
    ratios, values = _watch(tmp_path, pinned_sandbox, cores[0], busy_loops=0)
    assert max(ratios) < SATURATED / 2, ratios  # ~0 (0.003 with the machine's load average at 5)
    assert _total(values, "canary_scheduler_skipped_runs_total", reason="saturated") == 0
    assert _total(values, "canary_scheduler_starved_runs_total") == 0
    assert _total(values, "canary_probe_runs_total", result="failure") == 0
