"""Shards end to end: three `probe run --shard I/3` processes on one config of 300 probes, scraped by a real
Prometheus. Every probe runs in exactly one shard, Prometheus sees each probe's series exactly once, and a shard
that stops is visible as `up == 0` on its target, named by a join with `canary_shard_info`.

What an alert on a stopped shard must read (the alert rules are written from this): when a target's scrape fails,
Prometheus writes staleness markers for all its series at once, so the stopped shard's
`canary_probe_last_run_timestamp_seconds` series *vanish*; they do not go stale-and-true. The plain expression
`time() - canary_probe_last_run_timestamp_seconds > 3 * canary_probe_interval_seconds` then returns nothing for
those probes: it catches a probe stuck inside a running daemon, never a daemon that is gone. A shard that is gone
is `up == 0` on its target; `last_over_time(canary_shard_info[…])` still carries its last `shard` label for the
join, and `last_over_time(...)` over the two probe series keeps the "not run for 3 intervals" view of its probes
for as long as the range reaches back (here 10m). The test proves each of these in Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from canary.sharding import select, shard_of
from canary.contract import ProbeSettings
from tests.conftest import Process, ROOT, free_port, http_get, probe_command, wait_for, wait_for_port, write_config

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROBES = 300
SHARDS = 3
INTERVAL = 2.0
NAMES = [f"probe-{i:03d}" for i in range(PROBES)]
# "Not run for 3 intervals": as written, and over the last samples (range selections skip staleness markers), which
# also covers a target whose series were marked stale.
NOT_RUN = "time() - canary_probe_last_run_timestamp_seconds > 3 * canary_probe_interval_seconds"
NOT_RUN_REMEMBERED = (
    "time() - last_over_time(canary_probe_last_run_timestamp_seconds[10m]) "
    "> 3 * last_over_time(canary_probe_interval_seconds[10m])"
)
# The shard of a target that is down: `up` has no shard label, the target's last canary_shard_info has.
SHARD_DOWN = "(up == 0) * on (job, instance) group_left (shard, shards) last_over_time(canary_shard_info[10m])"


def probes_config(port: int, names: list[str] = NAMES) -> str:
    """Cheap tcp probes (connect, close) against one local listener."""
    head = f"""
        [daemon]
        interval = "{INTERVAL:g}s"
        timeout = "1s"
        jitter = "{INTERVAL:g}s"
        shutdown_grace = "1s"
        history = 3
        labels = {{ environment = "test" }}
    """
    body = "".join(
        f'[[probes]]\nname = "{name}"\ntype = "tcp"\nchannel = "api"\nhost = "127.0.0.1"\nport = {port}\n\n' for name in names
    )
    return head + "\n" + body


def status(base: str) -> dict[str, dict]:  # type: ignore[type-arg]
    code, body = http_get(f"{base}/status.json")
    assert code == 200, body
    return {probe["name"]: probe for probe in json.loads(body)["probes"]}


def prometheus_query(base: str, query: str) -> list[dict] | None:  # type: ignore[type-arg]
    """The result vector, or None while Prometheus is not answering yet."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]
    except OSError:
        return None


def firing_instances(base: str, alertname: str) -> set[str] | None:
    """The instances `alertname` fires for, or None while Prometheus is not answering."""
    try:
        with urllib.request.urlopen(f"{base}/api/v1/alerts", timeout=5) as response:
            alerts = json.load(response)["data"]["alerts"]
    except OSError:
        return None
    return {a["labels"].get("instance", "") for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"}


def probes_in(result: list[dict] | None) -> set[str]:  # type: ignore[type-arg]
    return {series["metric"]["probe"] for series in result or []}


def scalar(base: str, query: str) -> float | None:
    result = prometheus_query(base, query)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def target() -> Iterator[int]:
    """A local listener for the tcp probes: the sandbox, in its own process."""
    port = free_port()
    process = Process(probe_command("sandbox", "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.stop()


@pytest.fixture
def shards(tmp_path: Path, target: int) -> Iterator[list[tuple[Process, int]]]:
    """Three daemons, `--shard 0/3`, `1/3`, `2/3`, on one config; each stopped by its own pid."""
    path = write_config(tmp_path, probes_config(target))
    started: list[tuple[Process, int]] = []
    try:
        for shard in range(SHARDS):
            port = free_port()
            command = probe_command("run", "--config", str(path), "--listen", f"127.0.0.1:{port}", "--shard", f"{shard}/{SHARDS}")
            started.append((Process(command, cwd=ROOT), port))
        for process, port in started:
            wait_for_port(port, process, timeout=30)
        yield started
    finally:
        for process, _ in started:
            process.stop()


def test_every_probe_runs_in_exactly_one_shard_and_prometheus_sees_each_once(
    shards: list[tuple[Process, int]], tmp_path: Path
) -> None:
    bases = [f"http://127.0.0.1:{port}" for _, port in shards]
    expected = [{p.name for p in select([_named(n) for n in NAMES], shard, SHARDS)} for shard in range(SHARDS)]

    # Each daemon has run every probe of its share, and only those.
    wait_for(lambda: all(
        all(probe["last_run_timestamp_seconds"] for probe in status(base).values()) for base in bases
    ), timeout=60, what="every shard ran each of its probes")
    shares = [set(status(base)) for base in bases]
    assert shares == expected
    ran = [name for base in bases for name, probe in status(base).items() if probe["last_run_timestamp_seconds"]]
    assert sorted(ran) == NAMES  # the union is the whole config, and no probe ran in two shards
    for shard, base in enumerate(bases):
        metrics = http_get(f"{base}/metrics")[1]
        assert f'canary_shard_info{{environment="test",shard="{shard}",shards="{SHARDS}"}} 1.0' in metrics
        assert f'canary_probes{{environment="test"}} {len(expected[shard])}.0' in metrics

    if not Path(PROMETHEUS).exists():
        pytest.skip(f"no prometheus binary at {PROMETHEUS} (Debian package 'prometheus'); the Prometheus half did not run")
    # The shipped alert rules, with every `for` shortened in this copy (the expressions are the shipped ones).
    rules = (ROOT / "deploy" / "prometheus" / "rules" / "canary-alerts.yml").read_text()
    (tmp_path / "canary-alerts.yml").write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 1s", rules))
    prometheus_config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "canary-alerts.yml")],
        "scrape_configs": [{"job_name": "canary", "static_configs": [{"targets": [f"127.0.0.1:{port}" for _, port in shards]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
    port = free_port()
    prometheus = Process([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, prometheus, timeout=30)
        # One Prometheus, three targets: each probe's series exists exactly once.
        # (None of them late either: checked in the same wait, as a loaded machine may hold a run up for a moment.)
        wait_for(lambda: scalar(base, "count(canary_probe_success)") == PROBES
                 and scalar(base, "count(canary_probe_last_run_timestamp_seconds)") == PROBES
                 and prometheus_query(base, NOT_RUN) == [],
                 timeout=60, what=f"Prometheus sees {PROBES} canary_probe_success series, none late")
        assert probes_in(prometheus_query(base, "count by (probe) (canary_probe_success) == 1")) == set(NAMES)
        assert prometheus_query(base, "count by (probe) (canary_probe_success) > 1") == []
        assert scalar(base, "count(up == 1)") == SHARDS
        assert prometheus_query(base, SHARD_DOWN) == []

        # Stop shard 1 (SIGTERM by its pid).
        stopped_process, stopped_port = shards[1]
        stopped_process.popen.send_signal(signal.SIGTERM)
        assert stopped_process.popen.wait(timeout=30) == 0
        instance = f"127.0.0.1:{stopped_port}"
        wait_for(lambda: scalar(base, f'up{{instance="{instance}"}}') == 0, timeout=30, what="up == 0 for the stopped shard")

        # Its target is down and the join names the shard; the others stay up.
        down = prometheus_query(base, SHARD_DOWN)
        assert [(s["metric"]["instance"], s["metric"]["shard"], s["metric"]["shards"]) for s in down or []] == [(instance, "1", "3")]
        assert scalar(base, "count(up == 1)") == SHARDS - 1
        # ...and the shipped alert for it fires, for that shard's target alone.
        wait_for(lambda: firing_instances(base, "CanaryTargetDown") == {instance},
                 timeout=30, what="CanaryTargetDown firing for the stopped shard only")

        # The stopped shard's probe series were marked stale at once: they are gone, so the plain "not run for
        # 3 intervals" expression says nothing about them (an alert on it alone would stay silent).
        wait_for(lambda: scalar(base, "count(canary_probe_success)") == PROBES - len(expected[1]),
                 timeout=30, what="the stopped shard's series marked stale")
        assert probes_in(prometheus_query(base, "canary_probe_success")) == expected[0] | expected[2]

        # Over the last samples before the markers, the same expression becomes true for exactly its probes, while
        # the running shards' probes are not late.
        wait_for(lambda: probes_in(prometheus_query(base, NOT_RUN_REMEMBERED)) == expected[1]
                 and prometheus_query(base, NOT_RUN) == [],
                 timeout=30, what="'not run for 3 intervals' true for the stopped shard's probes only")
    except AssertionError as failure:
        raise AssertionError(f"{failure}\nprometheus said:\n{prometheus.output()[-3000:]}") from None
    finally:
        prometheus.stop(timeout=15)


def test_a_reload_re_selects_the_shard_from_the_new_probes(tmp_path: Path, target: int) -> None:
    before, after = NAMES[:20], NAMES[10:50]
    path = write_config(tmp_path, probes_config(target, before))
    port = free_port()
    process = Process(probe_command("run", "--config", str(path), "--listen", f"127.0.0.1:{port}", "--shard", "1/2"), cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, process, timeout=30)
        assert set(status(base)) == {name for name in before if shard_of(name, 2) == 1}
        path.write_text(probes_config(target, after))
        process.popen.send_signal(signal.SIGHUP)
        share = {name for name in after if shard_of(name, 2) == 1}
        wait_for(lambda: set(status(base)) == share, timeout=30, what="the reload's share")
        assert f'canary_probes{{environment="test"}} {len(share)}.0' in http_get(f"{base}/metrics")[1]
    finally:
        process.stop()


def test_one_process_without_shard_runs_everything_as_shard_0_of_1(tmp_path: Path, target: int) -> None:
    path = write_config(tmp_path, probes_config(target, NAMES[:10]))
    port = free_port()
    process = Process(probe_command("run", "--config", str(path), "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, process, timeout=30)
        assert set(status(base)) == set(NAMES[:10])
        assert 'canary_shard_info{environment="test",shard="0",shards="1"} 1.0' in http_get(f"{base}/metrics")[1]
    finally:
        process.stop()


def _named(name: str) -> ProbeSettings:
    return ProbeSettings(name=name, type="tcp", channel="api")
