"""The `probe` command as a user runs it: `--once` and its formats and exit codes, check-config, list."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, probe_command, write_config

SECRET_PASSWORD = "pw-cli-Secret-77"


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        probe_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})}
    )


def set_fault(platform: str, faults: dict) -> None:  # type: ignore[type-arg]
    request = urllib.request.Request(f"{platform}/_sandbox/faults", data=json.dumps(faults).encode(), method="POST")
    urllib.request.urlopen(request, timeout=5).close()


@pytest.fixture
def config(tmp_path: Path, sandbox_process: str) -> Path:
    return write_config(tmp_path, f"""
        [daemon]
        timeout = "2s"

        [[probes]]
        name = "api-health"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/health"
        expect_json = {{ status = "healthy" }}

        [[probes]]
        name = "api-health-fast"
        type = "http"
        channel = "web_form"
        url = "{sandbox_process}/health"
    """)


def test_once_passes_with_exit_0_and_a_readable_table(config: Path) -> None:
    completed = probe("--once", "--config", str(config))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].split() == ["PROBE", "TYPE", "CHANNEL", "RESULT", "REASON", "TIME", "ATTEMPTS", "MESSAGE"]
    assert any(line.startswith("api-health ") and " PASS " in line for line in lines)
    assert "2 probes passed, 0 probes failed" in completed.stdout


def test_once_fails_with_exit_1_naming_the_broken_probe(config: Path, sandbox_process: str) -> None:
    set_fault(sandbox_process, {"health": "degraded"})
    completed = probe("--once", "--config", str(config))
    assert completed.returncode == 1
    failing = [line for line in completed.stdout.splitlines() if " FAIL " in line]
    assert len(failing) == 1 and failing[0].startswith("api-health ") and "assertion" in failing[0]
    assert 'got "degraded"' in failing[0]


def test_once_json_shape(config: Path, sandbox_process: str) -> None:
    set_fault(sandbox_process, {"health": "error"})
    completed = probe("--once", "--config", str(config), "--format", "json")
    assert completed.returncode == 1
    report = json.loads(completed.stdout)
    assert report["passed"] == 0 and report["failed"] == 2
    first = report["results"][0]
    assert {"name", "type", "channel", "success", "reason", "duration_seconds", "message"} <= set(first)
    assert first["name"] == "api-health" and first["success"] is False and first["reason"] == "status"
    assert isinstance(first["duration_seconds"], float) and first["duration_seconds"] > 0


def test_once_junit_shape(config: Path, sandbox_process: str, tmp_path: Path) -> None:
    set_fault(sandbox_process, {"health": "degraded"})
    report_path = tmp_path / "report.xml"
    completed = probe("--once", "--config", str(config), "--format", "junit", "--output", str(report_path))
    assert completed.returncode == 1
    assert completed.stdout == ""  # written instead of printed
    suite = ET.parse(report_path).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {"api-health", "api-health-fast"}
    failure = cases["api-health"].find("failure")
    assert failure is not None and failure.get("type") == "assertion"
    assert cases["api-health-fast"].find("failure") is None
    assert cases["api-health"].get("classname") == "api.http"


def test_once_only_selects_by_name_or_channel(config: Path) -> None:
    by_channel = json.loads(probe("--once", "--config", str(config), "--format", "json", "--only", "web_form").stdout)
    assert [r["name"] for r in by_channel["results"]] == ["api-health-fast"]
    by_name = json.loads(probe("--once", "--config", str(config), "--format", "json", "--only", "api-health").stdout)
    assert [r["name"] for r in by_name["results"]] == ["api-health"]
    both = json.loads(probe("--once", "--config", str(config), "--format", "json", "--only", "api-health,web_form").stdout)
    assert len(both["results"]) == 2
    nothing = probe("--once", "--config", str(config), "--only", "no-such-probe")
    assert nothing.returncode == 2 and "no probes matching no-such-probe" in nothing.stderr


def test_once_hanging_platform_fails_within_the_timeout(config: Path, sandbox_process: str) -> None:
    set_fault(sandbox_process, {"health": "hang"})
    completed = probe("--once", "--config", str(config), "--format", "json")
    assert completed.returncode == 1
    report = json.loads(completed.stdout)
    assert {r["reason"] for r in report["results"]} == {"timeout"}
    assert all(1.9 < r["duration_seconds"] < 3 for r in report["results"])


def test_config_errors_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [[probes]]
        name = "db"
        type = "postgres"
        channel = "database"
        dsn = "postgresql://postgres:${DB_PASSWORD}@127.0.0.1:5432/postgres"
        intervall = "5s"
    """)
    completed = probe("--once", "--config", str(path), env={"DB_PASSWORD": SECRET_PASSWORD})
    assert completed.returncode == 2
    assert f"{path}: probes[0].intervall: unknown key; did you mean 'interval'?" in completed.stderr
    assert SECRET_PASSWORD not in completed.stderr + completed.stdout
    missing = probe("--once", "--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "absent.toml: cannot read the file" in missing.stderr
    assert "--config" in missing.stderr and "$CANARY_CONFIG" in missing.stderr


def test_secrets_stay_out_of_once_output(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"""
        [[probes]]
        name = "db"
        type = "postgres"
        channel = "database"
        timeout = "2s"
        dsn = "postgresql://postgres:{SECRET_PASSWORD}@127.0.0.1:{free_port()}/postgres"
    """)
    for output_format in ("table", "json", "junit"):
        completed = probe("--once", "--config", str(path), "--format", output_format)
        assert completed.returncode == 1
        assert SECRET_PASSWORD not in completed.stdout + completed.stderr


def test_check_config_and_list(config: Path, tmp_path: Path) -> None:
    checked = probe("check-config", str(config))
    assert checked.returncode == 0 and "ok, 2 probes" in checked.stdout
    bad = write_config(tmp_path, "[daemon]\ninterval = 5\n", name="bad.toml")
    failed = probe("check-config", str(bad))
    assert failed.returncode == 2 and "daemon.interval" in failed.stderr
    listed = probe("list", "--config", str(config))
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].split() == ["NAME", "TYPE", "CHANNEL", "INTERVAL", "TIMEOUT", "TARGET"]
    assert "GET http://127.0.0.1:" in listed.stdout


def test_usage_errors_exit_2() -> None:
    assert probe().returncode == 2
    assert probe("--format", "yaml", "--once").returncode == 2
    assert probe("no-such-command").returncode == 2


def test_a_failing_warning_probe_is_shown_but_does_not_fail_the_run(tmp_path: Path, sandbox_process: str) -> None:
    path = write_config(tmp_path, f"""
        [daemon]
        timeout = "2s"

        [[probes]]
        name = "api-health"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/health"

        [[probes]]
        name = "optional-queue"
        type = "http"
        channel = "kafka"
        severity = "warning"
        url = "http://127.0.0.1:{free_port()}/"
    """)
    table = probe("--once", "--config", str(path))
    assert table.returncode == 0, table.stdout
    assert any(line.startswith("optional-queue ") and " WARN " in line for line in table.stdout.splitlines())
    assert "1 probe passed, 0 probes failed, 1 warning" in table.stdout
    report = json.loads(probe("--once", "--config", str(path), "--format", "json").stdout)
    assert (report["passed"], report["failed"], report["warnings"]) == (1, 0, 1)
    assert {r["name"]: r["severity"] for r in report["results"]} == {"api-health": "critical", "optional-queue": "warning"}
    junit = probe("--once", "--config", str(path), "--format", "junit")
    suite = ET.fromstring(junit.stdout.split("\n", 1)[1]).find("testsuite")
    assert suite is not None and (suite.get("failures"), suite.get("skipped")) == ("0", "1")


def test_junit_stays_valid_xml_when_a_target_sends_control_characters() -> None:
    from canary.contract import Check, Result
    from canary.once import Outcome, as_junit
    from probes.http import HttpSettings

    settings = HttpSettings(name="api", channel="api", url="http://127.0.0.1:1/", interval="10s", timeout="1s")
    hostile = "HTTP 500 \x1b[31mred\x1b[0m \x00nul \x07bell"
    outcome = Outcome(settings, Result.fail("status", hostile, checks=(Check(False, f"[BODY] {hostile}"),)))
    report = as_junit([outcome])
    failure = ET.fromstring(report.split("\n", 1)[1]).find("testsuite/testcase/failure")
    assert failure is not None
    assert failure.get("message") == "HTTP 500 \\x1b[31mred\\x1b[0m \\x00nul \\x07bell"
    assert "\\x1b[31mred" in (failure.text or "")


def test_once_names_the_channels_the_platform_reports_down(tmp_path: Path, sandbox_process: str) -> None:
    path = write_config(tmp_path, f"""
        [daemon]
        timeout = "2s"

        [[probes]]
        name = "api-health"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/health"
        expect_json = {{ status = "healthy" }}
        channel_map = "channels"
    """)
    set_fault(sandbox_process, {"health": "degraded", "channels": {"whatsapp": "inactive"}})

    table = probe("--once", "--config", str(path))
    assert table.returncode == 1, table.stdout + table.stderr
    lines = table.stdout.splitlines()
    row = next(index for index, line in enumerate(lines) if line.startswith("api-health "))
    assert " FAIL " in lines[row] and "channel whatsapp reported inactive" in lines[row]
    assert lines[row + 1] == "  channels: whatsapp down; email, web_form up"

    report = json.loads(probe("--once", "--config", str(path), "--format", "json").stdout)
    (result,) = report["results"]
    assert result["channels"] == {"email": True, "web_form": True, "whatsapp": False}
    assert result["message"].startswith('HTTP 200 OK; channel whatsapp reported inactive; failed: [JSON] status == "healthy"')

    junit = probe("--once", "--config", str(path), "--format", "junit")
    case = ET.fromstring(junit.stdout.split("\n", 1)[1]).find("testsuite/testcase")
    assert case is not None
    properties = {p.get("name"): p.get("value") for p in case.findall("properties/property")}
    assert properties == {"attempts": "1", "channel.email": "up", "channel.web_form": "up", "channel.whatsapp": "down"}
    failure = case.find("failure")
    assert failure is not None and "channel whatsapp reported inactive" in (failure.get("message") or "")
    assert (failure.text or "").endswith("channels: whatsapp down; email, web_form up")

    # The platform back to healthy: no channel named down anywhere.
    set_fault(sandbox_process, {"health": "ok", "channels": {"whatsapp": "active"}})
    healthy = probe("--once", "--config", str(path))
    assert healthy.returncode == 0 and "reported" not in healthy.stdout
    assert "  channels: email, web_form, whatsapp up" in healthy.stdout.splitlines()


def test_once_shows_how_many_attempts_each_probe_made(tmp_path: Path, sandbox_process: str) -> None:
    path = write_config(tmp_path, f"""
        [daemon]
        timeout = "5s"
        retries = 2

        [[probes]]
        name = "api-health"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/health"
    """)

    def once(output_format: str) -> subprocess.CompletedProcess[str]:
        set_fault(sandbox_process, {"health_unavailable": 1})  # one 503, then healthy answers
        return probe("--once", "--config", str(path), "--format", output_format)

    table = once("table")
    assert table.returncode == 0, table.stdout + table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("api-health "))
    assert row.split()[3:7:3] == ["PASS", "2"]  # RESULT, ATTEMPTS
    assert row.endswith("(attempt 2 of 3; earlier: status)")

    (result,) = json.loads(once("json").stdout)["results"]
    assert (result["success"], result["attempts"]) == (True, 2)

    case = ET.fromstring(once("junit").stdout.split("\n", 1)[1]).find("testsuite/testcase")
    assert case is not None and case.find("failure") is None
    assert {p.get("name"): p.get("value") for p in case.findall("properties/property")} == {"attempts": "2"}

    # Every answer a 503: the run fails after its three attempts.
    set_fault(sandbox_process, {"health_unavailable": 100})
    failed = probe("--once", "--config", str(path), "--format", "json")
    assert failed.returncode == 1
    (result,) = json.loads(failed.stdout)["results"]
    assert (result["reason"], result["attempts"]) == ("status", 3)
