"""`probe run` as a real subprocess: scraped over HTTP, reloaded with SIGHUP, stopped with SIGTERM."""

from __future__ import annotations

import gc
import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Process, ROOT, free_port, http_get, probe_command, wait_for, wait_for_port, write_config

SECRET_TOKEN = "sekrit-token-0451"
SECRET_PASSWORD = "pw-Hunter2-xyz"
ENV = frozenset({("environment", "test")})  # the static labels of config_text, on every series



def metric_values(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    _, text = http_get(f"{base}/metrics")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def probe_value(values: dict, name: str, probe: str) -> float | None:  # type: ignore[type-arg]
    for (sample, labels), value in values.items():
        if sample == name and ("probe", probe) in labels:
            return value
    return None




def config_text(platform: str, closed_port: int, extra: str = "", include_broken: bool = True) -> str:
    broken = f"""
        [[probes]]
        name = "database"
        type = "postgres"
        channel = "database"
        interval = "1s"
        timeout = "1s"
        dsn = "postgresql://postgres:{SECRET_PASSWORD}@127.0.0.1:{closed_port}/postgres"
    """ if include_broken else ""
    return f"""
        [daemon]
        interval = "1s"
        timeout = "900ms"
        jitter = "200ms"
        shutdown_grace = "2s"
        labels = {{ environment = "test" }}

        [[probes]]
        name = "api-health"
        type = "http"
        channel = "api"
        url = "{platform}/health"
        headers = {{ Authorization = "Bearer {SECRET_TOKEN}" }}
        expect_json = {{ status = "healthy" }}
        channel_map = "channels"
        {broken}
        {extra}
    """


@pytest.fixture
def daemon(tmp_path: Path, sandbox_process: str) -> Iterator[tuple[Process, str, Path]]:
    port = free_port()
    path = write_config(tmp_path, config_text(sandbox_process, free_port()))
    process = Process(probe_command("run", "--config", str(path), "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    try:
        wait_for_port(port, process)
        yield process, f"http://127.0.0.1:{port}", path
    finally:
        process.stop()


def test_serves_results_health_and_status_page(daemon: tuple[Process, str, Path], sandbox_process: str) -> None:
    process, base, _ = daemon
    wait_for(lambda: probe_value(metric_values(base), "canary_probe_success", "database") is not None
             and probe_value(metric_values(base), "canary_probe_success", "api-health") is not None)
    values = metric_values(base)
    assert probe_value(values, "canary_probe_success", "api-health") == 1
    assert probe_value(values, "canary_probe_success", "database") == 0
    assert values[("canary_channel_up", frozenset({("channel", "whatsapp"), ("environment", "test"), ("importance", "critical")}))] == 1
    assert values[("canary_config_last_reload_successful", ENV)] == 1
    assert http_get(f"{base}/healthz")[0] == 200
    assert http_get(f"{base}/readyz")[0] == 200

    # Switch WhatsApp off on the platform: only that channel goes down.
    request = urllib.request.Request(
        f"{sandbox_process}/_sandbox/faults", data=json.dumps({"channels": {"whatsapp": "inactive"}}).encode(), method="POST"
    )
    urllib.request.urlopen(request, timeout=5).close()
    whatsapp = frozenset({("channel", "whatsapp"), ("environment", "test"), ("importance", "critical")})
    email = frozenset({("channel", "email"), ("environment", "test"), ("importance", "critical")})
    wait_for(lambda: metric_values(base).get(("canary_channel_up", whatsapp)) == 0)
    assert metric_values(base)[("canary_channel_up", email)] == 1
    assert metric_values(base)[("canary_platform_channel_up", frozenset({("channel", "whatsapp"), ("environment", "test")}))] == 0

    status, page = http_get(f"{base}/")
    assert status == 200 and "api-health" in page and "database" in page
    _, status_json = http_get(f"{base}/status.json")
    assert {p["name"]: p["state"] for p in json.loads(status_json)["probes"]} == {"api-health": "up", "database": "down"}

    # No secret anywhere a person or a scraper can read.
    _, metrics_text = http_get(f"{base}/metrics")
    for text in (metrics_text, page, status_json, process.output()):
        assert SECRET_TOKEN not in text and SECRET_PASSWORD not in text

    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "metrics"], input=metrics_text, capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0 and not (checked.stdout + checked.stderr), checked.stdout + checked.stderr


def test_sighup_applies_a_good_config_and_keeps_the_last_good_one_on_a_broken_file(
    daemon: tuple[Process, str, Path], sandbox_process: str
) -> None:
    process, base, path = daemon
    wait_for(lambda: probe_value(metric_values(base), "canary_probe_success", "database") is not None)

    # A good reload: the database probe goes, a second HTTP probe comes.
    extra = f"""
        [[probes]]
        name = "api-health-2"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/health"
    """
    path.write_text(config_text(sandbox_process, free_port(), extra=extra, include_broken=False))
    process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: probe_value(metric_values(base), "canary_probe_success", "api-health-2") == 1)
    values = metric_values(base)
    assert probe_value(values, "canary_probe_success", "database") is None
    assert probe_value(values, "canary_probe_runs_total", "database") is None

    # A broken reload: reported, and the previous probes keep running.
    path.write_text(path.read_text().replace('type = "http"', 'type = "htp"', 1))
    process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: metric_values(base)[("canary_config_last_reload_successful", ENV)] == 0)
    before = probe_value(metric_values(base), "canary_probe_last_run_timestamp_seconds", "api-health-2")
    wait_for(lambda: probe_value(metric_values(base), "canary_probe_last_run_timestamp_seconds", "api-health-2") > before)
    assert probe_value(metric_values(base), "canary_probe_success", "api-health") == 1
    assert f"{path}: probes[0].type: unknown probe type 'htp'" in process.output()
    assert http_get(f"{base}/readyz")[0] == 200


def test_sigterm_stops_cleanly_with_exit_code_zero(daemon: tuple[Process, str, Path]) -> None:
    process, base, _ = daemon
    wait_for(lambda: probe_value(metric_values(base), "canary_probe_success", "api-health") is not None)
    started = time.monotonic()
    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    lines = [line for line in process.output().splitlines() if line.strip()]
    assert lines[-1].endswith("canary.daemon: stopped"), lines[-3:]  # logged last: once everything has closed


def test_a_broken_config_at_start_exits_2_naming_the_file_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [[probes]]
        name = "x"
        type = "http"
        channel = "api"
        url = "http://127.0.0.1:1/health"
        expect_staus = [200]
    """)
    completed = subprocess.run(probe_command("run", "--config", str(path)), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert completed.returncode == 2
    assert f"{path}: probes[0].expect_staus: unknown key" in completed.stderr


def test_a_reload_whose_ca_file_is_missing_fails_and_the_changed_probe_keeps_its_old_settings(
    daemon: tuple[Process, str, Path], sandbox_process: str
) -> None:
    """The reload that once stopped a probe and never started it again, while reporting success."""
    process, base, path = daemon
    wait_for(lambda: probe_value(metric_values(base), "canary_probe_success", "api-health") == 1)
    broken = path.read_text().replace('channel_map = "channels"', 'channel_map = "channels"\n        ca_file = "/nonexistent/ca.pem"', 1)
    path.write_text(broken.replace('interval = "1s"', 'interval = "2s"', 1))
    process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: metric_values(base)[("canary_config_last_reload_successful", ENV)] == 0)
    assert "probes[0].ca_file: cannot load the CA file '/nonexistent/ca.pem' (No such file or directory)" in process.output()
    # The last good config still runs: api-health keeps running every 1 s.
    before = probe_value(metric_values(base), "canary_probe_runs_total", "api-health") or 0.0
    wait_for(lambda: (probe_value(metric_values(base), "canary_probe_runs_total", "api-health") or 0.0) >= before + 2)
    assert probe_value(metric_values(base), "canary_probe_interval_seconds", "api-health") == 1
    assert "Task exception was never retrieved" not in process.output()


@pytest.mark.parametrize("command", [("run",), ("--once",), ("check-config",)])
def test_a_missing_ca_file_at_start_is_a_config_error_with_exit_2(tmp_path: Path, command: tuple[str, ...]) -> None:
    path = write_config(tmp_path, """
        [[probes]]
        name = "x"
        type = "http"
        channel = "api"
        url = "https://127.0.0.1:1/health"
        ca_file = "/nonexistent/ca.pem"
    """)
    completed = subprocess.run(probe_command(*command, "--config", str(path)), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert f"{path}: probes[0].ca_file: cannot load the CA file '/nonexistent/ca.pem' (No such file or directory)" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "127.0.0.1:", ":9465"])
def test_a_bad_listen_flag_is_a_usage_error_naming_the_flag(tmp_path: Path, listen: str) -> None:
    path = write_config(tmp_path, '[[probes]]\nname = "x"\ntype = "http"\nchannel = "api"\nurl = "http://127.0.0.1:1/"\n')
    completed = subprocess.run(probe_command("run", "--config", str(path), "--listen", listen), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert completed.returncode == 2
    assert "argument --listen:" in completed.stderr and "Traceback" not in completed.stderr


async def test_a_reload_applies_the_new_log_level(tmp_path: Path) -> None:
    import logging

    from canary.config import load_config
    from canary.daemon import Daemon
    from canary.scheduler import Scheduler
    from probes import PROBE_TYPES, build_probe

    probe = '[[probes]]\nname = "x"\ntype = "http"\nchannel = "api"\ninterval = "1h"\nurl = "http://127.0.0.1:1/"\n'
    path = write_config(tmp_path, '[daemon]\nlog_level = "warning"\n' + probe)
    daemon = Daemon(load_config(path, PROBE_TYPES), PROBE_TYPES, build_probe)
    scheduler = Scheduler(daemon.store, build_probe, daemon.metrics)
    try:
        await scheduler.apply(daemon.config.probes, 0.0, daemon.config.scrubber())
        assert logging.getLogger().level == logging.WARNING
        path.write_text('[daemon]\nlog_level = "debug"\n' + probe)
        assert await daemon.reload(scheduler)
        assert logging.getLogger().level == logging.DEBUG
    finally:
        await scheduler.stop(0)
        logging.getLogger().setLevel(logging.WARNING)


def parse_logfmt(line: str) -> dict[str, str]:
    import re

    return {key: json.loads(value) if value.startswith('"') else value
            for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}


@pytest.mark.parametrize("log_format", ["json", "logfmt"])
def test_structured_logs_carry_each_probe_event_and_the_log_level_flag_survives_a_reload(
    tmp_path: Path, sandbox_process: str, log_format: str
) -> None:
    warning_probe = """
        [[probes]]
        name = "optional"
        type = "tcp"
        channel = "queue"
        severity = "warning"
        interval = "1s"
        timeout = "500ms"
        host = "127.0.0.1"
        port = {port}
    """.format(port=free_port())
    text = config_text(sandbox_process, free_port(), extra=warning_probe).replace('[daemon]', '[daemon]\n        log_level = "error"')
    path = write_config(tmp_path, text)
    port = free_port()
    process = Process(probe_command("run", "--config", str(path), "--listen", f"127.0.0.1:{port}",
                                    "--log.format", log_format, "--log.level", "info"), cwd=ROOT)
    parse = json.loads if log_format == "json" else parse_logfmt
    try:
        wait_for_port(port, process)

        def records() -> list[dict]:  # type: ignore[type-arg]
            return [parse(line) for line in process.output().splitlines() if line.strip()]

        def event(probe: str) -> dict | None:  # type: ignore[type-arg]
            return next((r for r in records() if r.get("probe") == probe), None)

        wait_for(lambda: event("database") is not None and event("optional") is not None)
        database, optional = event("database"), event("optional")
        assert database["level"] == "error" and optional["level"] == "warning"
        assert {k: database[k] for k in ("probe", "channel", "type", "severity")} == {
            "probe": "database", "channel": "database", "type": "postgres", "severity": "critical"}
        assert database["reason"] != "ok" and float(database["duration_seconds"]) >= 0
        assert optional["severity"] == "warning" and optional["type"] == "tcp"
        assert database["msg"].startswith("probe database failed (channel database, reason ")
        # The flag's "info" beats the file's "error", and still does after a reload.
        assert any(r["msg"].startswith("channel-canary serving on") for r in records())
        process.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: any(r["msg"].startswith("config reloaded") for r in records()))
        assert SECRET_PASSWORD not in process.output() and SECRET_TOKEN not in process.output()
    finally:
        process.stop()


@pytest.mark.parametrize("log_format", ["json", "logfmt"])
def test_structured_logs_scrub_the_message_and_the_event_fields(log_format: str, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from canary.contract import Scrubber
    from canary.daemon import configure_logging

    configure_logging("info", Scrubber([SECRET_PASSWORD]), log_format)
    try:
        logging.getLogger("canary.scheduler").error(
            "probe x failed: login with %s refused", SECRET_PASSWORD,
            extra={"probe": "x", "channel": "api", "type": "http", "severity": "critical",
                   "reason": f"auth {SECRET_PASSWORD}", "duration_seconds": 0.25},
        )
    finally:
        logging.getLogger().handlers[:] = []
    line = capsys.readouterr().err.strip()
    assert SECRET_PASSWORD not in line
    record = json.loads(line) if log_format == "json" else parse_logfmt(line)
    assert record["msg"] == "probe x failed: login with *** refused" and record["reason"] == "auth ***"
    assert float(record["duration_seconds"]) == 0.25 and record["level"] == "error" and record["probe"] == "x"


def test_text_logs_keep_their_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from canary.contract import Scrubber
    from canary.daemon import configure_logging

    configure_logging("info", Scrubber(), "text")
    try:
        logging.getLogger("canary.scheduler").info("probe x recovered (channel api)", extra={"probe": "x", "reason": "ok"})
    finally:
        logging.getLogger().handlers[:] = []
    assert capsys.readouterr().err.strip().endswith("INFO canary.scheduler: probe x recovered (channel api)")


def http_request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Status, Content-Type and body; error statuses are answers too."""
    import urllib.error

    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


def test_exporter_conventions_reload_endpoint_process_build_labels_and_openmetrics(tmp_path: Path, sandbox_process: str) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    port = free_port()
    path = write_config(tmp_path, config_text(sandbox_process, free_port()))
    # The Prometheus exporters' flag names are aliases of --config and --listen.
    process = Process(probe_command("run", "--config.file", str(path), "--web.listen-address", f"127.0.0.1:{port}"),
                      env={"CANARY_REVISION": "0123abcd"}, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, process)
        wait_for(lambda: probe_value(metric_values(base), "canary_probe_success", "api-health") is not None)
        values = metric_values(base)
        build = [dict(labels) for (name, labels) in values if name == "canary_build_info"]
        assert len(build) == 1 and build[0]["revision"] == "0123abcd" and build[0]["environment"] == "test"
        assert set(build[0]) == {"version", "revision", "python_version", "environment"}
        assert values[("process_resident_memory_bytes", ENV)] > 0
        assert values[("process_cpu_seconds_total", ENV)] >= 0
        # Its garbage collections, with the collector set as the daemon sets it (full collections rare).
        assert {labels for (name, labels) in values if name == "python_gc_collections_total"} == {
            ENV | {("generation", g)} for g in "012"}
        assert values[("canary_probes", ENV)] == 2

        # OpenMetrics when the scraper asks for it: strictly valid (the parser checks `_total`, `# EOF`, ...).
        status, content_type, text = http_request(
            f"{base}/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
        assert status == 200 and content_type.startswith("application/openmetrics-text; version=1.0.0")
        families = {family.name: family for family in openmetrics_families(text)}
        assert families["canary_probe_runs"].type == "counter" and families["process_cpu_seconds"].type == "counter"
        assert any(s.name == "canary_probe_runs_total" for s in families["canary_probe_runs"].samples)
        assert families["canary_probe_latency_seconds"].type == "histogram"
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1
        assert http_request(f"{base}/metrics")[1].startswith("text/plain; version=0.0.4")

        # POST /-/reload: the SIGHUP reload; the new static labels reach the daemon's own metrics too.
        path.write_text(path.read_text().replace('environment = "test"', 'environment = "staging"'))
        assert http_request(f"{base}/-/reload", method="POST")[::2] == (200, "config reloaded\n")
        staging = frozenset({("environment", "staging")})
        assert metric_values(base)[("canary_config_last_reload_successful", staging)] == 1
        assert ("canary_config_last_reload_successful", ENV) not in metric_values(base)
        assert http_request(f"{base}/-/reload")[0] == 405  # GET changes nothing

        path.write_text(path.read_text().replace('type = "http"', 'type = "htp"', 1))
        status, _, body = http_request(f"{base}/-/reload", method="POST")
        assert status == 500 and f"{path}: probes[0].type: unknown probe type 'htp'" in body
        assert SECRET_PASSWORD not in body
        assert metric_values(base)[("canary_config_last_reload_successful", staging)] == 0
        assert probe_value(metric_values(base), "canary_probe_success", "api-health") == 1
    finally:
        process.stop()


def test_the_reload_endpoint_asks_for_the_same_credentials_as_metrics(tmp_path: Path) -> None:
    import base64

    import bcrypt

    path = write_config(tmp_path, '[[probes]]\nname = "x"\ntype = "http"\nchannel = "api"\ninterval = "1h"\nurl = "http://127.0.0.1:1/"\n')
    web_config = tmp_path / "web.yml"
    web_config.write_text(f"basic_auth_users:\n  alice: '{bcrypt.hashpw(b'open-sesame', bcrypt.gensalt(rounds=4)).decode()}'\n")
    port = free_port()
    process = Process(probe_command("run", "--config", str(path), "--listen", f"127.0.0.1:{port}",
                                    "--web.config.file", str(web_config)), cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, process)
        assert http_request(f"{base}/-/reload", method="POST")[0] == 401
        assert http_request(f"{base}/metrics")[0] == 401
        assert http_request(f"{base}/healthz")[0] == 200
        auth = {"Authorization": "Basic " + base64.b64encode(b"alice:open-sesame").decode()}
        assert http_request(f"{base}/-/reload", method="POST", headers=auth)[0] == 200
    finally:
        process.stop()


def test_probe_version_names_the_release() -> None:
    from canary import __version__

    completed = subprocess.run(probe_command("--version"), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert completed.returncode == 0 and completed.stdout.strip() == f"channel-canary {__version__}"


def test_the_daemon_sets_the_collector_so_full_collections_are_rare(tmp_path: Path) -> None:
    """Every probe's latest result lives an interval, so it reaches the oldest generation; at Python's default a full
    collection walks all of them about once a second at 10,000 probes and frees nothing. `probe run` raises the
    threshold of full collections (and freezes what start-up built)."""
    from canary.cli import COLLECTOR_THRESHOLDS, _daemon, _parser
    from canary.config import load_config
    from probes import PROBE_TYPES

    path = write_config(tmp_path, config_text("http://127.0.0.1:9", free_port()))
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        daemon = _daemon(load_config(path, PROBE_TYPES), _parser().parse_args(
            ["run", "--config", str(path), "--listen", f"127.0.0.1:{free_port()}", "--state.dir", str(tmp_path / "state")]))
        assert daemon is not None
        assert gc.get_threshold() == COLLECTOR_THRESHOLDS
        assert COLLECTOR_THRESHOLDS[2] >= 100 * 10  # a hundred times rarer than the default
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
