"""The Grafana dashboards: the committed JSON is what deploy/grafana/generate.py makes from deploy/mixin/config.py,
every query reads only series the daemon exports or the recording rules record, and every query runs on a real
Prometheus scraping a real daemon (the shipped config.toml against the sandbox) with the rule files of
deploy/prometheus/rules/ loaded.

What may stay empty there, and why: the Kafka panels (no broker in this test; the Kafka probes fail `connect` and
export no lag, status or DLQ figures), the TLS certificate panel (the shipped config's tls probe is commented out)
and the error-budget panels while no rule file records their series (test_rule_files_record_every_rule_series…
skips, saying so). Every other panel must show data within DATA_WAIT seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import ROOT, Process, free_port, http_get, probe_command, wait_for, wait_for_port
from tests.test_shipped_config import platform_env, set_faults

pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (the test extras) is not installed")

from deploy.grafana import generate  # noqa: E402  (needs the SDK)
from deploy.mixin import config  # noqa: E402

GRAFANA_DIR = ROOT / "deploy" / "grafana"
# The rule files Prometheus loads; CANARY_TEST_RULES_DIR points elsewhere (rules under development).
RULES_DIR = Path(os.environ.get("CANARY_TEST_RULES_DIR", ROOT / "deploy" / "prometheus" / "rules"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DATA_WAIT = 60.0  # seconds for every panel of the sandbox's channels to show data
SANDBOX_CHANNELS = {"api", "web_form", "whatsapp", "email", "ai_agent", "ai_provider", "database"}
SANDBOX_PROBES = {"api-health", "web-form", "whatsapp-inbound", "twilio-account", "gmail", "llm", "llm-provider-status",
                  "database"}

# Grafana's macros and our variables, as a query would see them: "All" is ".*"; the intervals suit a 1 s scrape.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "5s",
    "$__range": "1h",
    **{f"${label}": generate.ALL_VALUE for label in generate.PROBE_VARIABLE_LABELS},
}
RULE_NAMES = {
    *(config.ERROR_RATIO.format(window=w) for w in config.ERROR_RATIO_WINDOWS),
    *(config.BURN_RATE.format(window=w) for w in config.ERROR_RATIO_WINDOWS),
    config.BUDGET_REMAINING,
    config.SLO_OBJECTIVE_SERIES,
}
# Series a panel may find empty in this test, by the metric-name prefix that makes it so.
MAY_BE_EMPTY = {
    "canary_probe_kafka_": "no Kafka broker in this test",
    "canary_probe_tls_": "the shipped config has no tls probe",
}
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
METRIC_NAME = re.compile(r"\b(canary_[a-z0-9_]+|[a-z_]+:[a-z0-9_:]+)\b")
LABEL_VALUES = re.compile(r"^label_values\((.+), (\w+)\)$")


def committed(name: str) -> dict[str, Any]:
    return json.loads((GRAFANA_DIR / name).read_text())


def targets(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel, rows' nested panels included."""
    found = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t["refId"], t["expr"]) for t in inner.get("targets", [])]
    return found


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v["name"], v["query"]) for v in board["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str) -> str:
    for macro in sorted(SUBSTITUTIONS, key=len, reverse=True):  # $__rate_interval before $__range
        expr = expr.replace(macro, SUBSTITUTIONS[macro])
    assert "$" not in expr, f"a variable or macro the test does not substitute: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def recorded_names() -> set[str]:
    names = set()
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            names |= {rule["record"] for rule in group.get("rules", []) if "record" in rule}
    return names


ALL_TARGETS = [  # a missing file fails test_the_committed_dashboard_is_what_the_generator_makes, not collection
    (name, *target)
    for name in generate.DASHBOARDS if (GRAFANA_DIR / name).exists()
    for target in targets(committed(name))
]


# ---- generated, and from config.py ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(generate.DASHBOARDS))
def test_the_committed_dashboard_is_what_the_generator_makes(name: str) -> None:
    first, second = generate.render(name), generate.render(name)
    assert first == second, "the generator's output is not deterministic"
    assert (GRAFANA_DIR / name).read_text() == first, f"{name} is stale: run python -m deploy.grafana.generate"


@pytest.mark.parametrize("name", sorted(generate.DASHBOARDS))
def test_the_committed_dashboard_decodes_with_grafanas_schema_unchanged(name: str) -> None:
    """The SDK's models (Grafana's dashboard and panel schemas) read the JSON back and write the same bytes: no
    field of a wrong type or place, none they would fill in."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()  # the panel and query types' own models
    text = (GRAFANA_DIR / name).read_text()
    decoded = Dashboard.from_json(json.loads(text))
    assert JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(decoded) + "\n" == text


def test_no_dashboard_json_is_left_over_from_an_older_generator() -> None:
    assert {p.name for p in GRAFANA_DIR.glob("*.json")} == set(generate.DASHBOARDS)


def test_a_threshold_changed_in_config_changes_the_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    shipped_selector = config.SELECTOR
    monkeypatch.setitem(config.THRESHOLDS, "agent_reply_sla_seconds", 20.0)
    monkeypatch.setattr(config, "SELECTOR", 'job="canary-prod"')
    board = json.loads(generate.render("channel-health.json"))
    agent = next(p for p in board["panels"] if p["title"].startswith("Web form: agent reply"))
    assert agent["title"] == "Web form: agent reply time vs the 20 s SLA"
    assert [s["value"] for s in agent["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 20.0]
    raw = [expr for _, _, expr in targets(board) if metric_names(expr) - RULE_NAMES]
    assert raw and all('job="canary-prod"' in expr and shipped_selector not in expr for expr in raw)


def test_every_panel_and_variable_is_filtered_by_the_selector_and_the_variables() -> None:
    """Raw series carry config.SELECTOR; every series, raw or recorded, is narrowed by each of its dashboard's label
    variables (the GROUPING labels first), and each variable by the ones before it."""
    for name in generate.DASHBOARDS:
        board = committed(name)
        variables: list[str] = []
        for variable, query in variable_queries(board):
            match = LABEL_VALUES.match(query)
            assert match and match.group(2) == variable, query
            for label in variables:
                assert f'{label}=~"${label}"' in match.group(1), f"{name}: ${variable} ignores ${label}"
            variables.append(variable)
        assert variables[: len(config.GROUPING)] == list(config.GROUPING), name
        for title, _, expr in targets(board):
            selectors = SELECTOR.findall(expr)
            assert selectors, f"{name} / {title}: no series selector in {expr}"
            for metric, matchers in selectors:
                if metric in RULE_NAMES:  # the rules keep only the GROUPING labels
                    wanted = list(config.GROUPING)
                else:
                    assert config.SELECTOR in matchers, f"{name} / {title}: {metric} lacks {config.SELECTOR}"
                    wanted = variables
                for label in wanted:
                    assert f'{label}=~"${label}"' in matchers, f"{name} / {title}: {metric} ignores ${label}"
            bare = metric_names(SELECTOR.sub("", expr))
            assert not bare, f"{name} / {title}: series read without a selector: {bare}"
        for panel in board["panels"]:
            assert panel["type"] == "row" or panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def readme_before_dashboards() -> str:
    """The README's probe and metric documentation: its Dashboards section names every series the dashboards read,
    so it cannot vouch for them."""
    return (ROOT / "README.md").read_text().split("\n## Dashboards\n")[0]


def documented(metric: str, readme: str) -> bool:
    """The README names a series in full, or after its family's first (`canary_probe_llm_ratelimit_limit`,
    `…_headroom_ratio`); a histogram by its family name."""
    parts = re.sub(r"_(bucket|count|sum)$", "", metric).split("_")
    spellings = ["_".join(parts)] + ["…_" + "_".join(parts[k:]) for k in range(2, len(parts) - 1)]
    return any(re.search(f"`{re.escape(name)}(?![a-z0-9_])", readme) for name in spellings)


def test_the_readme_check_knows_documented_from_made_up_series() -> None:
    readme = readme_before_dashboards()
    assert documented("canary_probe_llm_ratelimit_headroom_ratio", readme)
    assert documented("canary_probe_latency_seconds_bucket", readme)
    assert not documented("canary_probe_llm_ratelimit_headroom", readme)
    assert not documented("canary_probe_llm_ratelimit", readme)
    assert not documented("canary_probe_made_up_ratio", readme)


def test_queries_read_only_series_the_daemon_documents_or_the_rules_record() -> None:
    readme = readme_before_dashboards()
    for name, title, _, expr in ALL_TARGETS:
        for metric in metric_names(expr):
            if ":" in metric:
                assert metric in RULE_NAMES, f"{name} / {title}: {metric} is no recording rule named in config.py"
            else:
                assert documented(metric, readme), f"{name} / {title}: {metric} is not a series the README documents"


def test_rule_files_record_every_rule_series_the_dashboards_read() -> None:
    used = {m for _, _, _, expr in ALL_TARGETS for m in metric_names(expr) if ":" in m}
    assert used, "the dashboards read no recording rule"
    if not list(RULES_DIR.glob("*.yml")):
        pytest.skip(f"no rule files in {RULES_DIR} yet: cannot check that {sorted(used)} are recorded")
    missing = used - recorded_names()
    assert not missing, f"the dashboards read series no rule records: {sorted(missing)}"


# ---- a real Prometheus scraping a real daemon ----------------------------------------------------------------------

class Stack:
    def __init__(self, prometheus: str, platform: str) -> None:
        self.prometheus = prometheus
        self.platform = platform

    def api(self, path: str, **params: str | list[str]) -> dict[str, Any]:
        status, body = http_get(f"{self.prometheus}{path}?{urllib.parse.urlencode(params, doseq=True)}")
        answer = json.loads(body)
        assert status in (200, 400, 422), f"{path}: HTTP {status}: {body[:500]}"
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", query=expr)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"no Prometheus server at {PROMETHEUS} (Debian package 'prometheus'): queries cannot be run")
    started: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="canary-dashboards-") as tmp:
        try:
            sandbox_port, daemon_port, prometheus_port = free_port(), free_port(), free_port()
            sandbox = Process(probe_command("sandbox", "--listen", f"127.0.0.1:{sandbox_port}"), cwd=ROOT)
            started.append(sandbox)
            wait_for_port(sandbox_port, sandbox)
            platform = f"http://127.0.0.1:{sandbox_port}"
            rule_files = [str(p) for p in sorted(RULES_DIR.glob("*.yml"))]
            prometheus_config = Path(tmp) / "prometheus.yml"
            prometheus_config.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": rule_files,
                "scrape_configs": [{
                    "job_name": "channel-canary",  # matches config.SELECTOR
                    "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"], "labels": {"location": "ci"}}],
                }],
            }))
            # Prometheus first, so its first scrape sees every counter at its start value.
            prometheus = Process([
                PROMETHEUS, f"--config.file={prometheus_config}", f"--storage.tsdb.path={Path(tmp) / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn",
            ], cwd=Path(tmp))
            started.append(prometheus)
            wait_for_port(prometheus_port, prometheus, timeout=30)
            daemon = Process(
                probe_command("run", "--config", "config.toml", "--listen", f"127.0.0.1:{daemon_port}"),
                env=platform_env(platform), cwd=ROOT,
            )
            started.append(daemon)
            wait_for_port(daemon_port, daemon)
            result = Stack(f"http://127.0.0.1:{prometheus_port}", platform)
            wait_for(lambda: bool(result.query('up{job="channel-canary"} == 1')["data"]["result"]), timeout=30,
                     what="Prometheus scraping the daemon")
            yield result
        finally:
            for process in reversed(started):
                process.stop(timeout=15)


def test_every_query_parses_on_prometheus(stack: Stack) -> None:
    errors = []
    for name, title, ref, expr in ALL_TARGETS:
        answer = stack.query(substitute(expr))
        if answer["status"] != "success":
            errors.append(f"{name} / {title} ({ref}): {answer.get('error')}\n    {expr}")
    assert not errors, "queries Prometheus refuses:\n" + "\n".join(errors)


def test_the_variables_find_the_daemons_labels(stack: Stack) -> None:
    expected = {
        "environment": {"dev"},  # the shipped config's default
        "location": {"ci"},  # the scrape's target label in this test
        "channel": SANDBOX_CHANNELS,  # each appears with its channel's first result, within the daemon's jitter
        "probe": SANDBOX_PROBES,
    }
    queries = [(name, variable, *LABEL_VALUES.match(query).groups())  # type: ignore[union-attr]
               for name in generate.DASHBOARDS for variable, query in variable_queries(committed(name))]
    assert {variable for _, variable, _, _ in queries} == set(expected)
    found: dict[tuple[str, str], set[str]] = {}
    deadline = time.monotonic() + 20
    for _ in range(40):  # bounded: at most 40 rounds, 20 s
        for name, variable, selector, label in queries:
            answer = stack.api(f"/api/v1/label/{label}/values", **{"match[]": [substitute(selector)]})
            assert answer["status"] == "success", f"{name}: ${variable}: {answer.get('error')}"
            found[name, variable] = set(answer["data"])
        if all(expected[v] <= values for (_, v), values in found.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for (name, variable), values in found.items():
        missing = expected[variable] - values
        assert not missing, f"{name}: ${variable} offers {sorted(values)}, without {sorted(missing)}"


def test_every_panel_of_the_sandbox_channels_shows_data(stack: Stack) -> None:
    """Within DATA_WAIT, every query returns series, except those MAY_BE_EMPTY names and, while no rule file
    records them, the recording rules'."""
    recorded = recorded_names()
    required = []
    for name, title, ref, expr in ALL_TARGETS:
        names = metric_names(expr)
        if any(m.startswith(prefix) for m in names for prefix in MAY_BE_EMPTY):
            continue
        if names & RULE_NAMES - recorded:
            continue
        required.append((f"{name} / {title} ({ref})", substitute(expr)))
    assert len(required) >= 15, "most panels must be checked for data"
    empty = dict(required)
    deadline = time.monotonic() + DATA_WAIT
    for _ in range(int(DATA_WAIT) + 1):  # at most one round a second, and no longer than DATA_WAIT
        for label, expr in list(empty.items()):
            answer = stack.query(expr)
            assert answer["status"] == "success", f"{label}: {answer.get('error')}"
            if answer["data"]["result"]:
                del empty[label]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, f"no data within {DATA_WAIT:g} s:\n" + "\n".join(f"{k}\n    {v}" for k, v in empty.items())
    if recorded:
        bad = [(r["name"], r.get("lastError")) for g in stack.api("/api/v1/rules")["data"]["groups"]
               for r in g["rules"] if r.get("health") == "err"]
        assert not bad, f"rules Prometheus cannot evaluate: {bad}"


def last_failures(stack: Stack) -> dict[str, str]:
    """probe → reason, as the channel-health dashboard's failure table shows them."""
    board = committed("channel-health.json")
    [expr] = [expr for title, _, expr in targets(board) if title == "Last failure per probe"]
    answer = stack.query(substitute(expr))
    assert answer["status"] == "success", answer
    rows = answer["data"]["result"]
    assert len({r["metric"]["probe"] for r in rows}) == len(rows), f"one row per probe: {rows}"
    return {r["metric"]["probe"]: r["metric"]["reason"] for r in rows}


def test_the_failure_table_shows_each_probes_latest_reason(stack: Stack) -> None:
    # api-health runs every 15 s: first a 500 (reason status), then a degraded answer (assertion).
    try:
        for fault, reason in (("error", "status"), ("degraded", "assertion")):
            set_faults(stack.platform, {"health": fault})
            deadline = time.monotonic() + 40
            while last_failures(stack).get("api-health") != reason:  # bounded: one query every 0.5 s, 40 s
                assert time.monotonic() < deadline, f"the failure table did not name api-health's {reason}"
                time.sleep(0.5)
    finally:
        http_get(f"{stack.platform}/_sandbox/reset", method="POST")
    failures = last_failures(stack)
    # No broker: the Kafka probes fail `connect` (a warning probe's failures show too). One whose only failure came
    # before Prometheus's first scrape of the daemon has no row yet: its counter never rose in Prometheus's sight.
    assert {failures[p] for p in ("kafka", "kafka-lag", "kafka-dlq") if p in failures} <= {"connect"}
    assert "web-form" not in failures  # a probe that never failed has no row
