"""The alerting rules, SLO rules and Alertmanager example generated from deploy/mixin/config.py.

Checked with the real tools: `promtool check rules` and `promtool test rules` (deploy/prometheus/tests/), `amtool
check-config` and `amtool config routes test`, a real Alertmanager that is sent alerts and must inhibit and route them,
and a real Prometheus that scrapes the daemon running against the sandbox and evaluates every rule. Tests that need a
binary skip, saying which, where it is missing (scripts/test.sh installs them from Debian's `prometheus` and
`prometheus-alertmanager` packages).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from deploy.mixin import config
from deploy.mixin.generate import RULES_DIR, generate
from tests.conftest import ROOT, Process, free_port, port_open, probe_command, wait_for, wait_for_port
from tests.observability import (ALERTMANAGER_YML, RULE_FILES, Webhooks, binary, prometheus_api, start_alertmanager,
                                 start_prometheus, start_webhooks, stop_webhooks)

UNIT_TESTS = sorted((ROOT / "deploy/prometheus/tests").glob("*.yml"))
RUNBOOKS = ROOT / "deploy/runbooks/README.md"


def alert_rules(path: Path | None = None) -> list[dict[str, Any]]:
    files = [path] if path else RULE_FILES
    return [rule for f in files for group in yaml.safe_load(f.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def rule_id(rule: dict[str, Any]) -> str:
    return f"{rule['alert']}:{rule['labels']['severity']}"


ALERTS = alert_rules()


# --- one source --------------------------------------------------------------------------------------------------

def test_the_committed_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    for path, text in generate().items():
        assert (ROOT / path).read_text() == text, f"{path} is out of date: run python deploy/mixin/generate.py"
    # The script itself, as a team runs it: --check passes, and --out writes the same files elsewhere.
    checked = subprocess.run([sys.executable, "deploy/mixin/generate.py", "--check"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    written = subprocess.run([sys.executable, "deploy/mixin/generate.py", "--out", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    for path in generate():
        assert (tmp_path / path).read_text() == (ROOT / path).read_text()


def test_check_names_the_files_a_hand_edit_put_out_of_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "deploy/mixin/generate.py", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   timeout=60)
    edited = tmp_path / RULES_DIR / "canary-slo.yml"
    edited.write_text(edited.read_text().replace("0.995", "0.99"))
    checked = subprocess.run([sys.executable, "deploy/mixin/generate.py", "--check", "--out", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1
    assert "deploy/prometheus/rules/canary-slo.yml" in checked.stderr
    assert "canary-alerts.yml" not in checked.stderr


def test_the_slo_objective_changes_in_one_place() -> None:
    default, stricter = generate(), generate({"SLO_OBJECTIVE": 0.999})
    slo = RULES_DIR / "canary-slo.yml"
    rules = {r.get("record", r.get("alert")) + str(r.get("labels", "")): r
             for g in yaml.safe_load(stricter[slo])["groups"] for r in g["rules"]}
    assert rules[config.SLO_OBJECTIVE_SERIES]["expr"] == "vector(0.999)"
    for window in config.ERROR_RATIO_WINDOWS:
        burn = rules[config.BURN_RATE.format(window=window)]["expr"]
        assert burn == f"{config.ERROR_RATIO.format(window=window)} / 0.001"
    assert rules[config.BUDGET_REMAINING]["expr"].endswith("/ 0.001")
    assert "99.9% objective" in stricter[slo] and "99.5%" not in stricter[slo]
    assert stricter[slo] != default[slo]
    # Nothing else depends on the objective.
    assert {p: t for p, t in stricter.items() if p != slo} == {p: t for p, t in default.items() if p != slo}


def test_the_runbook_base_url_changes_in_one_place() -> None:
    base = "https://wiki.example.org/ops/canary-runbooks"
    files = generate({"RUNBOOK_BASE_URL": base})
    assert not any(config.RUNBOOK_BASE_URL in text for text in files.values())
    urls = [rule["annotations"]["runbook_url"]
            for path, text in files.items() if path.parent == RULES_DIR
            for group in yaml.safe_load(text)["groups"] for rule in group["rules"] if "alert" in rule]
    assert len(urls) == len(ALERTS)
    assert all(url.startswith(base + "#") for url in urls)


def test_the_generator_refuses_a_setting_config_py_does_not_have(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "deploy/mixin/generate.py", "--out", str(tmp_path), "--set", "SLO=0.9"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "SLO is not a setting of deploy/mixin/config.py" in result.stderr
    assert not any(tmp_path.iterdir())


def test_the_cli_applies_overrides(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "deploy/mixin/generate.py", "--out", str(tmp_path), "--set",
                    "MIN_FAILING_LOCATIONS=3"], cwd=ROOT, check=True, timeout=60)
    text = (tmp_path / RULES_DIR / "canary-alerts.yml").read_text()
    quorums = re.findall(r"\) / 2\) \+ 1,\n\s+(\d+)\n", text)  # clamp_max(majority, MIN_FAILING_LOCATIONS)
    assert quorums and set(quorums) == {"3"}


# --- the rules load and behave -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_accepts_the_rules(path: Path) -> None:
    checked = subprocess.run([binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_promtool_unit_tests_pass() -> None:
    tested = subprocess.run([binary("promtool"), "test", "rules", *map(str, UNIT_TESTS)], capture_output=True,
                            text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout[-20000:] + tested.stderr[-5000:]
    assert tested.stdout.count("SUCCESS") == len(UNIT_TESTS)


def unit_test_cases() -> tuple[dict[str, int], dict[str, int]]:
    """How many times each rule (alert:severity) fires in a unit test, and how many times it is checked silent."""
    fires: dict[str, int] = {rule_id(r): 0 for r in ALERTS}
    silent = dict(fires)
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                expected = {str(a["exp_labels"]["severity"]) for a in case.get("exp_alerts") or []}
                for key in fires:
                    name, severity = key.split(":")
                    if name != case["alertname"]:
                        continue
                    if severity in expected:
                        fires[key] += 1
                    else:
                        silent[key] += 1
    return fires, silent


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    fires, silent = unit_test_cases()
    assert [key for key, count in fires.items() if not count] == []
    assert [key for key, count in silent.items() if not count] == []


def test_every_alert_waiting_for_a_duration_is_checked_on_both_sides_of_it() -> None:
    """A rule with `for` is checked silent at least once (just before it may fire) and firing at least once."""
    fires, silent = unit_test_cases()
    for rule in ALERTS:
        if "for" in rule:
            assert fires[rule_id(rule)] and silent[rule_id(rule)], rule_id(rule)


# --- what every alert carries ----------------------------------------------------------------------------------------

def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook README's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", RUNBOOKS.read_text(), flags=re.M):
        anchors.add(re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


# Alerts about a channel, an instance or the deployment: there is no one probe to name.
NOT_ABOUT_ONE_PROBE = {"CanaryApiLatencyHigh", "CanaryErrorBudgetBurn", "CanaryTargetDown", "CanaryTargetMissing",
                       "CanaryConfigReloadFailed", "CanaryRunsSkipped", "CanarySaturated"}


@pytest.mark.parametrize("rule", ALERTS, ids=rule_id)
def test_every_alert_has_severity_channel_summary_description_and_runbook(rule: dict[str, Any]) -> None:
    labels, annotations = rule["labels"], rule["annotations"]
    assert labels["severity"] in config.SEVERITIES
    assert labels.get("channel"), "every alert names its channel (Alertmanager groups by it)"
    assert annotations.get("summary")
    description = annotations.get("description", "")
    assert "{{ $value" in description
    if rule["alert"] not in NOT_ABOUT_ONE_PROBE:
        assert "$labels.probe" in description or ".Labels.probe" in description
    url = annotations["runbook_url"]
    assert url.startswith(config.RUNBOOK_BASE_URL + "#")
    anchor = url.split("#", 1)[1]
    assert anchor in runbook_anchors(), f"{RUNBOOKS.relative_to(ROOT)} has no section #{anchor}"


def test_every_runbook_section_belongs_to_an_alert() -> None:
    names = {rule["alert"] for rule in ALERTS}
    sections = re.findall(r"^### (\S+)$", RUNBOOKS.read_text(), flags=re.M)
    assert sorted(set(sections)) == sorted(names)


def test_every_alert_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Alerting", 1)[1]
    rows = re.findall(r"^\| `(Canary\w+)` \| [^|]+ \| (page|ticket) \|", table, flags=re.M)
    assert sorted(set(rows)) == sorted({(r["alert"], r["labels"]["severity"]) for r in ALERTS})


SELECTOR = re.compile(r"\b(canary_\w+)\{([^}]*)\}")


@pytest.mark.parametrize("rule", [r for r in ALERTS if r["labels"]["severity"] == "page"], ids=rule_id)
def test_warning_only_probes_never_page(rule: dict[str, Any]) -> None:
    """Every series a paging rule reads leaves out importance="warning" probes: directly, or through recording
    rules that do."""
    selectors = SELECTOR.findall(rule["expr"])
    for name, matchers in selectors:
        if name == "canary_channel_up":
            assert 'importance="critical"' in matchers, (name, matchers)
        elif name.startswith("canary_probe_"):
            assert 'importance!="warning"' in matchers, (name, matchers)
        else:
            assert name == "canary_platform_channel_up", name  # the platform's own report: not a probe
    recorded = set(re.findall(r"\b(channel:[\w:]+)", rule["expr"]))
    if recorded:
        records = {r["record"]: r["expr"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
                   for r in g["rules"] if "record" in r}
        for name in recorded:
            sources = records[name]
            for ratio in re.findall(r"\b(channel:[\w:]+)", sources):
                sources += records[ratio]
            assert all('importance!="warning"' in m for n, m in SELECTOR.findall(sources)), name
    assert selectors or recorded or rule["alert"] in NOT_ABOUT_ONE_PROBE


# --- Alertmanager ------------------------------------------------------------------------------------------------------

def test_amtool_accepts_the_alertmanager_example() -> None:
    checked = subprocess.run([binary("amtool"), "check-config", str(ALERTMANAGER_YML)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


@pytest.mark.parametrize(("labels", "receiver"), [
    (["severity=page", "channel=whatsapp", "alertname=CanaryChannelDown"], "pager"),
    (["severity=ticket", "channel=kafka", "alertname=CanaryProbeFailing"], "ticket"),
    (["channel=api", "alertname=SomethingWithoutASeverity"], "ticket"),
])
def test_alerts_are_routed_by_severity(labels: list[str], receiver: str) -> None:
    routed = subprocess.run([binary("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}",
                             f"--verify.receivers={receiver}", *labels], capture_output=True, text=True, timeout=60)
    assert routed.returncode == 0, routed.stdout + routed.stderr
    assert routed.stdout.strip() == receiver


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, Webhooks]]:
    """The shipped example, its receivers pointed at local webhooks and its group_wait shortened to a second."""
    webhooks = start_webhooks()
    try:
        process, url = start_alertmanager(tmp_path, webhooks, group_wait="1s", group_interval="1s")
        try:
            yield url, webhooks
        finally:
            process.stop()
    finally:
        stop_webhooks(webhooks)


def post_alerts(base: str, alerts: list[dict[str, str]]) -> None:
    body = json.dumps([{"labels": labels, "annotations": {"summary": "test"}} for labels in alerts]).encode()
    request = urllib.request.Request(f"{base}/api/v2/alerts", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def alert_states(base: str) -> dict[tuple[str, ...], list[str]]:
    with urllib.request.urlopen(f"{base}/api/v2/alerts", timeout=10) as response:
        alerts = json.load(response)
    return {
        (a["labels"]["alertname"], a["labels"].get("environment", ""), a["labels"].get("channel", ""),
         a["labels"].get("probe", ""), a["labels"]["severity"]): a["status"]["inhibitedBy"]
        for a in alerts
    }


def test_alertmanager_inhibits_the_consequences_and_routes_the_rest(alertmanager: tuple[str, Webhooks]) -> None:
    base, webhooks = alertmanager
    prod = {"environment": "prod"}
    post_alerts(base, [
        # The platform is down in prod: its channels' alerts are its consequences, one page instead of six.
        {**prod, "alertname": "CanaryPlatformDown", "severity": "page", "channel": "api", "probe": "api-health"},
        {**prod, "alertname": "CanaryChannelDown", "severity": "page", "channel": "whatsapp"},
        {**prod, "alertname": "CanaryChannelDown", "severity": "page", "channel": "web_form"},
        {**prod, "alertname": "CanaryProbeFailing", "severity": "page", "channel": "email", "probe": "gmail"},
        {**prod, "alertname": "CanaryApiLatencyHigh", "severity": "page", "channel": "api"},
        # Not explained by the platform: Twilio's own account, the database, and another environment.
        {**prod, "alertname": "CanaryTwilioAccountSuspended", "severity": "page", "channel": "whatsapp",
         "probe": "twilio-account"},
        {**prod, "alertname": "CanaryDatabaseDown", "severity": "page", "channel": "database", "probe": "database"},
        {"environment": "staging", "alertname": "CanaryChannelDown", "severity": "page", "channel": "whatsapp"},
        # A precise page makes the generic one redundant, and a page its own ticket.
        {**prod, "alertname": "CanaryProbeFailing", "severity": "page", "channel": "database", "probe": "database"},
        {**prod, "alertname": "CanaryTicketBacklogHigh", "severity": "page", "channel": "database",
         "probe": "database"},
        {**prod, "alertname": "CanaryTicketBacklogHigh", "severity": "ticket", "channel": "database",
         "probe": "database", "location": "eu"},
        # The canary cannot be scraped: its other alerts about itself are held back, another canary's are not.
        {"alertname": "CanaryTargetDown", "severity": "page", "channel": "canary", "component": "canary",
         "job": "channel-canary", "instance": "canary-0:9465"},
        {"alertname": "CanaryConfigReloadFailed", "severity": "ticket", "channel": "canary", "component": "canary",
         "job": "channel-canary", "instance": "canary-0:9465"},
        {"alertname": "CanaryConfigReloadFailed", "severity": "ticket", "channel": "canary", "component": "canary",
         "job": "channel-canary", "instance": "canary-1:9465"},
        {**prod, "alertname": "CanaryProbeStale", "severity": "ticket", "channel": "email", "component": "canary",
         "probe": "gmail", "job": "channel-canary", "instance": "canary-0:9465"},
    ])
    inhibited = {
        ("CanaryChannelDown", "prod", "whatsapp", "", "page"),
        ("CanaryChannelDown", "prod", "web_form", "", "page"),
        ("CanaryProbeFailing", "prod", "email", "gmail", "page"),
        ("CanaryApiLatencyHigh", "prod", "api", "", "page"),
        ("CanaryProbeFailing", "prod", "database", "database", "page"),
        ("CanaryTicketBacklogHigh", "prod", "database", "database", "ticket"),
        ("CanaryConfigReloadFailed", "", "canary", "", "ticket"),  # canary-0's; canary-1's has the same key
        ("CanaryProbeStale", "prod", "email", "gmail", "ticket"),
    }

    def settled() -> bool:
        states = alert_states(base)
        return len(states) == 14 and all(bool(states[key]) == (key in inhibited) for key in states
                                         if key[0] != "CanaryConfigReloadFailed")

    wait_for(settled, timeout=20, what="Alertmanager's inhibitions")
    with urllib.request.urlopen(f"{base}/api/v2/alerts?inhibited=false", timeout=10) as response:
        shown = json.load(response)
    reloads = sorted(a["labels"]["instance"] for a in shown if a["labels"]["alertname"] == "CanaryConfigReloadFailed")
    assert reloads == ["canary-1:9465"]

    # What reaches the receivers: every page not inhibited to the pager, the remaining ticket to the ticket queue.
    pages = {("CanaryPlatformDown", "api"), ("CanaryTwilioAccountSuspended", "whatsapp"),
             ("CanaryDatabaseDown", "database"), ("CanaryChannelDown", "whatsapp"),
             ("CanaryTicketBacklogHigh", "database"), ("CanaryTargetDown", "canary")}
    wait_for(lambda: webhooks.alert_names("/pager") == pages and webhooks.alert_names("/ticket")
             == {("CanaryConfigReloadFailed", "canary")}, timeout=30, what="notifications at the receivers")
    time.sleep(2)  # another group interval: nothing inhibited arrives late
    assert webhooks.alert_names("/pager") == pages
    assert webhooks.alert_names("/ticket") == {("CanaryConfigReloadFailed", "canary")}


def test_a_saturated_canary_is_one_ticket_not_a_page_per_channel(alertmanager: tuple[str, Webhooks]) -> None:
    # Its starved runs count as no failure, so no channel pages for its overload; what its lag does stretch (the
    # durations it measures in its location, its staleness, its skipped slots) is held back while it is saturated.
    base, webhooks = alertmanager
    eu = {"environment": "prod", "location": "eu"}
    canary = {"channel": "canary", "component": "canary", "job": "channel-canary", "instance": "canary-eu-0:9465"}
    post_alerts(base, [
        {**eu, **canary, "alertname": "CanarySaturated", "severity": "ticket"},
        {**eu, "alertname": "CanaryApiLatencyHigh", "severity": "ticket", "channel": "api"},
        {**eu, "alertname": "CanaryWebFormAgentReplySlow", "severity": "ticket", "channel": "web_form", "probe": "web-form"},
        {**eu, **canary, "alertname": "CanaryProbeStale", "severity": "ticket", "channel": "email", "probe": "gmail"},
        # Another location's latency, and a real failure in the saturated one, are not its lag's doing.
        {"environment": "prod", "location": "us", "alertname": "CanaryApiLatencyHigh", "severity": "ticket", "channel": "api"},
        {**eu, "alertname": "CanaryProbeFailing", "severity": "ticket", "channel": "database", "probe": "database"},
    ])

    def states() -> dict[tuple[str, str], bool]:
        with urllib.request.urlopen(f"{base}/api/v2/alerts", timeout=10) as response:
            return {(a["labels"]["alertname"], a["labels"].get("location", "")): bool(a["status"]["inhibitedBy"])
                    for a in json.load(response)}

    expected = {
        ("CanarySaturated", "eu"): False, ("CanaryApiLatencyHigh", "eu"): True, ("CanaryWebFormAgentReplySlow", "eu"): True,
        ("CanaryProbeStale", "eu"): True, ("CanaryApiLatencyHigh", "us"): False, ("CanaryProbeFailing", "eu"): False,
    }
    wait_for(lambda: states() == expected, timeout=20, what="Alertmanager's inhibitions")
    tickets = {("CanarySaturated", "canary"), ("CanaryApiLatencyHigh", "api"), ("CanaryProbeFailing", "database")}
    wait_for(lambda: webhooks.alert_names("/ticket") == tickets, timeout=30, what="notifications at the receivers")
    time.sleep(2)  # another group interval: nothing inhibited arrives late
    assert webhooks.alert_names("/ticket") == tickets and webhooks.alert_names("/pager") == set()


# --- a real Prometheus on the daemon's real series ------------------------------------------------------------------

@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Starts Prometheus (rules loaded, evaluated every second) scraping the given daemon ports; returns its URL."""
    started: list[Process] = []

    def start(*targets: int) -> str:
        process, url = start_prometheus(tmp_path, list(targets))
        started.append(process)
        return url

    try:
        yield start
    finally:
        for process in started:
            process.stop()


def rule_health(base: str) -> tuple[int, list[tuple[str, str]]]:
    groups = prometheus_api(base, "rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return len(rules), [(rule["name"], rule.get("lastError", "")) for rule in rules if rule["health"] != "ok"]


def active_alerts(base: str) -> set[tuple[str, str, str]]:
    return {(a["labels"]["alertname"], a["labels"].get("probe", a["labels"].get("channel", "")), a["labels"]["severity"])
            for a in prometheus_api(base, "alerts")["alerts"]}


def query(base: str, promql: str) -> list[dict[str, Any]]:
    return prometheus_api(base, "query?query=" + urllib.request.quote(promql))["result"]


def test_prometheus_evaluates_every_rule_on_the_shipped_config_against_the_sandbox(
    sandbox_process: str, postgres_dsn: str, prometheus: Any
) -> None:
    if not port_open("127.0.0.1", 6379):
        pytest.skip("no Redis reachable at 127.0.0.1:6379 (the shipped config probes it)")
    from tests.test_shipped_config import platform_env

    port = free_port()
    daemon = Process(probe_command("run", "--config", "config.toml", "--listen", f"127.0.0.1:{port}"), cwd=ROOT,
                     env={**platform_env(sandbox_process), "CANARY_ENVIRONMENT": "ci"})
    try:
        wait_for_port(port, daemon)
        base = prometheus(port)
        probes = 12  # config.toml's
        wait_for(lambda: len(query(base, "canary_probe_success")) == probes, timeout=60,
                 what="a first result of every shipped probe in Prometheus")
        time.sleep(3)  # three evaluations of every rule group on those series
        count, unhealthy = rule_health(base)
        assert count == sum(len(g["rules"]) for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"])
        assert unhealthy == []
        # Against a healthy sandbox the only thing wrong is Kafka (no broker): warning-only probes, so tickets
        # waiting out their 15 minutes; no page, nothing else.
        active = active_alerts(base)
        assert {(name, probe, severity) for name, probe, severity in active if severity == "page"} == set()
        assert {("CanaryProbeFailing", probe, "ticket") for probe in ("kafka", "kafka-lag", "kafka-dlq")} <= active
        # The SLO series exist for the critical channels, from real runs.
        ratios = {r["metric"]["channel"] for r in query(base, config.ERROR_RATIO.format(window="5m"))}
        assert ratios == {"api", "database", "web_form", "whatsapp", "email", "ai_agent", "ai_provider", "cache"}
    finally:
        daemon.stop()


def test_a_forged_webhook_accepted_by_the_platform_pages_through_real_prometheus(
    sandbox_process: str, prometheus: Any, tmp_path: Path
) -> None:
    """The sandbox's webhook stops checking signatures: the daemon's next run fails `insecure`, and the security
    alert (no `for`) fires in Prometheus; the platform's failing health check starts its page's 2 minutes."""
    config_file = tmp_path / "fast.toml"
    config_file.write_text(f"""
[daemon]
interval = "2s"
timeout = "1s"
jitter = "100ms"
labels = {{ environment = "ci", location = "here" }}

[[probes]]
name = "api-health"
type = "http"
channel = "api"
url = "{sandbox_process}/health"
expect_json = {{ "status" = "healthy" }}
channel_map = "channels"

[[probes]]
name = "whatsapp-inbound"
type = "whatsapp"
channel = "whatsapp"
url = "{sandbox_process}/whatsapp/webhook"
auth_token = "sandbox-twilio-auth-token"
account_sid = "AC00000000000000000000000000000000"
from_number = "+15005550006"
to_number = "+14155238886"
""")
    port = free_port()
    daemon = Process(probe_command("run", "--config", str(config_file), "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    try:
        wait_for_port(port, daemon)
        base = prometheus(port)
        wait_for(lambda: len(query(base, "canary_probe_success == 1")) == 2, timeout=30, what="both probes passing")
        request = urllib.request.Request(f"{sandbox_process}/_sandbox/faults", method="POST",
                                         data=json.dumps({"whatsapp_webhook": "skip_validation",
                                                          "health": "error"}).encode())
        urllib.request.urlopen(request, timeout=5).close()
        wait_for(lambda: ("CanaryWhatsAppSignatureNotVerified", "whatsapp-inbound", "page") in {
            (a["labels"]["alertname"], a["labels"]["probe"], a["labels"]["severity"])
            for a in prometheus_api(base, "alerts")["alerts"] if a["state"] == "firing"
        }, timeout=30, what="the security page firing")
        # The health check runs on its own 2 s slot: its failure may reach the rules a run after the webhook's.
        wait_for(lambda: ("CanaryPlatformDown", "api-health") in {
            (a["labels"]["alertname"], a["labels"].get("probe", "")) for a in prometheus_api(base, "alerts")["alerts"]
            if a["state"] == "pending"
        }, timeout=30, what="the platform page pending")
        firing = [a for a in prometheus_api(base, "alerts")["alerts"] if a["state"] == "firing"]
        security = [a for a in firing if a["labels"]["alertname"] == "CanaryWhatsAppSignatureNotVerified"][0]
        assert security["labels"] == {"alertname": "CanaryWhatsAppSignatureNotVerified", "severity": "page",
                                      "environment": "ci", "location": "here", "channel": "whatsapp",
                                      "probe": "whatsapp-inbound"}
        assert security["annotations"]["description"].startswith("whatsapp-inbound from here (reason insecure,")
        assert rule_health(base)[1] == []
    finally:
        daemon.stop()


# --- the configs the rules read ---------------------------------------------------------------------------------------

def production_env(tmp_path: Path) -> dict[str, str]:
    secrets = {"DATABASE_URL_FILE": "postgresql://canary@db.internal:5432/fte", "TWILIO_AUTH_TOKEN_FILE": "token",
               "LLM_API_KEY_FILE": "key", "REDIS_URL_FILE": "redis://:pw@redis.internal:6379/0",
               "KAFKA_PASSWORD_FILE": "pw"}
    env = {}
    for variable, value in secrets.items():
        (tmp_path / variable).write_text(value + "\n")
        env[variable] = str(tmp_path / variable)
    return {**env, "PLATFORM_URL": "https://api.example.com", "PLATFORM_PUBLIC_URL": "https://api.example.com",
            "CANARY_LOCATION": "eu-west", "TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_WHATSAPP_FROM": "+15005550006",
            "TWILIO_WHATSAPP_TO": "+14155238886", "PUBLIC_HOST": "support.example.com",
            "KAFKA_BOOTSTRAP_SERVERS": "kafka.internal:9093",
            "GMAIL_CREDENTIALS_PATH": str(ROOT / "deploy/sandbox/gmail-authorized-user.json")}


def test_the_production_example_loads_and_runs_the_queries_the_rules_read(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLATFORM_", "CANARY_", "KAFKA_", "TWILIO_"))}
    checked = subprocess.run(probe_command("check-config", "deploy/config.production.toml"), cwd=ROOT, timeout=60,
                             capture_output=True, text=True, env={**env, **production_env(tmp_path)})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Without its variables it refuses to start rather than probe a default.
    unset = subprocess.run(probe_command("check-config", "deploy/config.production.toml"), cwd=ROOT, timeout=60,
                           capture_output=True, text=True, env=env)
    assert unset.returncode == 2 and "PLATFORM_URL is not set" in unset.stderr
    import tomllib

    probes = tomllib.loads((ROOT / "deploy/config.production.toml").read_text())["probes"]
    queries = {q["name"]: q for p in probes if p["type"] == "postgres" for q in p.get("queries", [])}
    assert set(queries) == {config.TICKET_BACKLOG_QUERY, config.ESCALATION_RATIO_QUERY}
    assert all("max" not in q and "min" not in q for q in queries.values()), "the rules judge them, not the probe"
    assert {p["name"] for p in probes if p.get("severity") == "warning"} == {"kafka", "kafka-lag", "kafka-dlq"}


@pytest.mark.parametrize("path", ["config.toml", "deploy/config.production.toml"])
def test_probe_settings_agree_with_the_rules_thresholds(path: str) -> None:
    """The thresholds that are also a probe's setting: the rules and the probes must say the same."""
    import tomllib

    def default(value: str) -> str:
        return re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", value)

    t = config.THRESHOLDS
    probes = {p["type"]: p for p in tomllib.loads((ROOT / path).read_text())["probes"]}
    assert probes["postgres"]["long_query_threshold"] == f"{t['db_long_query_seconds']:g}s"
    assert probes["postgres"]["max_connections_ratio"] == t["db_connections_ratio"]
    reply = [s for s in probes["transaction"]["steps"] if s["name"] == config.AGENT_REPLY_PHASE][0]
    assert default(reply["poll"]["within"]) == f"{t['agent_reply_sla_seconds']:g}s"
    assert default(probes["llm"]["slow_after"]) == f"{t['llm_slow_seconds']:g}s"
    assert probes["llm"]["min_headroom"] == t["llm_min_headroom_ratio"]
    assert probes["kafka_lag"]["max_lag"] == t["kafka_consumer_lag"]
    assert probes["kafka_lag"]["max_lag_age"] == f"{t['kafka_lag_critical_seconds']:g}s"
    assert probes["gmail"]["min_watch_remaining"] == f"{t['gmail_watch_min_remaining_seconds'] // 3600}h"
    assert probes["redis"]["max_memory_ratio"] == t["redis_memory_ratio"]
