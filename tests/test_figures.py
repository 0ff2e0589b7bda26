"""What each probe type declares about its figures and reasons is true, and every figure of every type, with
static labels, makes a scrape `promtool check metrics` accepts."""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from canary.config import ConfigError, parse_config
from canary.contract import REASONS, RUNNER_REASONS, Gauge, ProbeSettings, Result
from canary.state import ResultStore
from exporter.exposition import ProbeExposition
from exporter.self_metrics import DaemonMetrics
from probes import PROBE_TYPES, transport
from probes import kafka_common

STATIC_LABELS = {"environment": "prod", "cluster": "eu-1", "region": "west"}
BUCKETS = (0.1, 1.0, 10.0)


def _gauge_calls(probe_type: type) -> list[tuple[str, set[str] | None]]:
    """(figure name, literal label names or None when built at run time) of every Gauge(...) in the type's module."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(probe_type)))
    found: list[tuple[str, set[str] | None]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Gauge" and node.args):
            continue
        name = node.args[0]
        if not isinstance(name, ast.Constant):
            continue
        labels_node = node.args[3] if len(node.args) > 3 else next((k.value for k in node.keywords if k.arg == "labels"), None)
        labels: set[str] | None = set()
        if isinstance(labels_node, ast.Tuple):
            for pair in labels_node.elts:
                if isinstance(pair, ast.Tuple) and isinstance(pair.elts[0], ast.Constant):
                    labels.add(pair.elts[0].value)
                else:
                    labels = None
                    break
        elif labels_node is not None:
            labels = None
        found.append((name.value, labels))
    return found


@pytest.mark.parametrize("type_name", sorted(PROBE_TYPES))
def test_literal_figure_labels_are_declared(type_name: str) -> None:
    probe_type = PROBE_TYPES[type_name]
    for name, labels in _gauge_calls(probe_type):
        if labels is not None:
            assert labels <= probe_type.figure_labels, f"{type_name}: {name} uses undeclared labels {labels}"


_FAIL = re.compile(r'Result\.fail\(\s*"(\w+)"|\(\s*"(\w+)",\s*f?"')
_HELPERS = {
    "client_error_result": transport.client_error_result,
    "connect_error_result": transport.connect_error_result,
    "kafka_error_result": kafka_common.kafka_error_result,
}


def _literal_reasons(source: str) -> set[str]:
    return {reason for pair in _FAIL.findall(source) for reason in pair if reason in REASONS}


@pytest.mark.parametrize("type_name", sorted(PROBE_TYPES))
def test_every_reason_a_type_can_return_is_declared(type_name: str) -> None:
    """So `canary_probe_failures_total{reason}` exists at 0 before the first failure of any of them."""
    probe_type = PROBE_TYPES[type_name]
    source = inspect.getsource(inspect.getmodule(probe_type))
    found = _literal_reasons(source)
    for helper_name, helper in _HELPERS.items():
        if helper_name in source:
            found |= _literal_reasons(inspect.getsource(helper))
    found -= {"ok", *RUNNER_REASONS}
    assert found <= set(probe_type.reasons), f"{type_name} returns undeclared reasons {found - set(probe_type.reasons)}"


def _settings(type_name: str, severity: str) -> ProbeSettings:
    return ProbeSettings.model_construct(
        name=f"{type_name}-probe", type=type_name, channel="api", interval=30.0, timeout=10.0,
        labels={"team": "support"}, description="", severity=severity,
    )


def _every_figure(type_name: str) -> tuple[Gauge, ...]:
    probe_type = PROBE_TYPES[type_name]
    names = sorted({name for name, _ in _gauge_calls(probe_type)})
    labels = tuple((label, f"{label}-value") for label in sorted(probe_type.figure_labels))
    return tuple(Gauge(name, 1.0, f"help for {name}", labels) for name in names)


def test_a_scrape_with_every_figure_of_every_type_and_static_labels_is_promtool_clean() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/test.sh installs Debian's prometheus package)")
    reasons_for = lambda type_name: (*RUNNER_REASONS, *PROBE_TYPES[type_name].reasons)  # noqa: E731
    store = ResultStore(BUCKETS, 5, reasons_for=reasons_for)
    settings = [_settings(name, "warning" if i % 2 else "critical") for i, name in enumerate(sorted(PROBE_TYPES))]
    store.sync(settings, BUCKETS, 5)
    exposition = ProbeExposition(STATIC_LABELS, BUCKETS)
    store.add_listener(exposition.render)
    figures = 0
    for probe in settings:
        gauges = _every_figure(probe.type)
        figures += len(gauges)
        store.record(probe.name, Result.fail("status", "HTTP 503", phases={"connect": 0.01}, gauges=gauges), 1.7e9)
        store.record(probe.name, Result.ok("fine", phases={"connect": 0.01}, gauges=gauges, channels={"email": True}), 1.7e9)
    assert figures >= 20  # the scan found the figures, not nothing
    body = exposition.exposition(store.records(), store.channels(), prefix=DaemonMetrics().exposition())
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    text = body.decode()
    # A failure counter for a reason that never happened is there, at 0.
    assert re.search(r'\ncanary_probe_failures_total\{[^}]*probe="http-probe"[^}]*reason="dns"\} 0\n', text)


@pytest.mark.parametrize(
    ("type_name", "label"), sorted((name, label) for name, t in PROBE_TYPES.items() for label in t.figure_labels)
)
def test_a_static_label_named_like_a_figure_label_is_refused_at_load(type_name: str, label: str) -> None:
    probe = {"llm": 'api_key = "k-123456"', "postgres": 'dsn = "postgresql://db/x"'}.get(type_name, "")
    body = f'[daemon]\nlabels = {{ {label} = "x" }}\n[[probes]]\nname = "p"\ntype = "{type_name}"\nchannel = "c"\n{probe}\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(body, Path("config.toml"), PROBE_TYPES, {})
    expected = f"daemon.labels.{label}: {label!r} is a label of the {type_name} probe's own figures; choose another name"
    assert expected in caught.value.problems


async def test_a_figure_label_the_type_does_not_declare_fails_the_run_as_internal() -> None:
    from typing import Literal

    from canary.contract import PhaseTimer, Probe
    from canary.runner import run_once
    from canary.scrub import Scrubber

    class Undeclared(ProbeSettings):
        type: Literal["undeclared"] = "undeclared"

    class UndeclaredProbe(Probe[Undeclared]):
        settings_model = Undeclared

        async def run(self, timer: PhaseTimer) -> Result:
            return Result.ok("fine", gauges=(Gauge("thing", 1.0, "a thing", (("environment", "x"),)),))

    result = await run_once(UndeclaredProbe(Undeclared(name="u", channel="c")), 1.0, Scrubber())
    assert result.reason == "internal"
    assert "figures labelled environment" in result.message
