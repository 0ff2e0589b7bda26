"""Real Prometheus and Alertmanager processes for the alerting tests, and a local webhook receiver.

Shared by tests/test_alert_rules.py and tests/test_alert_delivery.py; every process runs on a free 127.0.0.1 port
and is ended by its own pid (tests.conftest.Process)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.mixin import config
from deploy.mixin.generate import ALERTMANAGER_FILE, RULES_DIR
from tests.conftest import ROOT, Process, free_port, http_get, wait_for, wait_for_port

RULE_FILES = sorted((ROOT / RULES_DIR).glob("*.yml"))
ALERTMANAGER_YML = ROOT / ALERTMANAGER_FILE


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"{names[0]} is not installed (scripts/test.sh installs it: Debian packages prometheus, "
                "prometheus-alertmanager)")


class Webhooks(ThreadingHTTPServer):
    """Two local webhook receivers in one server: /pager and /ticket, each keeping the notifications it got."""

    def __init__(self) -> None:
        self.received: dict[str, list[dict[str, Any]]] = {"/pager": [], "/ticket": []}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _WebhookHandler)

    def alert_names(self, path: str) -> set[tuple[str, str]]:
        with self.lock:
            return {(a["labels"]["alertname"], a["labels"].get("channel", ""))
                    for n in self.received[path] for a in n["alerts"]}

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        """Every alert of every notification, with the receiver's path it was sent to."""
        with self.lock:
            return [(path, alert) for path, notifications in self.received.items()
                    for n in notifications for alert in n["alerts"]]


class _WebhookHandler(BaseHTTPRequestHandler):
    server: Webhooks

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.received.setdefault(self.path, []).append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def start_webhooks() -> Webhooks:
    webhooks = Webhooks()
    threading.Thread(target=webhooks.serve_forever, daemon=True).start()
    return webhooks


def stop_webhooks(webhooks: Webhooks) -> None:
    webhooks.shutdown()
    webhooks.server_close()


def start_alertmanager(directory: Path, webhooks: Webhooks, **route: str) -> tuple[Process, str]:
    """The shipped example, its receivers pointed at the local webhooks and its route's timings replaced by
    `route` (e.g. group_wait="1s"); returns the process and its URL."""
    program = binary("alertmanager", "prometheus-alertmanager")
    example = yaml.safe_load(ALERTMANAGER_YML.read_text())
    hooks = {config.ALERTMANAGER_RECEIVERS["page"]: "/pager", config.ALERTMANAGER_RECEIVERS["ticket"]: "/ticket"}
    for receiver in example["receivers"]:
        receiver["webhook_configs"][0]["url"] = f"http://127.0.0.1:{webhooks.server_port}{hooks[receiver['name']]}"
    example["route"].update(route)
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(example))
    port = free_port()
    process = Process([program, f"--config.file={config_file}", f"--storage.path={directory / 'data'}",
                       f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"])
    try:
        wait_for_port(port, process, timeout=30)
    except BaseException:
        process.stop()
        raise
    return process, f"http://127.0.0.1:{port}"


def start_prometheus(directory: Path, targets: list[int], rule_files: list[Path] | None = None,
                     alertmanager: str | None = None, interval: str = "1s") -> tuple[Process, str]:
    """Prometheus scraping the daemons on `targets` (job channel-canary) and evaluating `rule_files` (the shipped
    rules unless given) every `interval`, sending to `alertmanager` if given; returns the process and its URL."""
    program = binary("prometheus")
    settings: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in (rule_files or RULE_FILES)],
        "scrape_configs": [{"job_name": "channel-canary",
                            "static_configs": [{"targets": [f"127.0.0.1:{t}" for t in targets]}]}],
    }
    if alertmanager:
        settings["alerting"] = {"alertmanagers": [{"static_configs": [
            {"targets": [alertmanager.removeprefix("http://")]}]}]}
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(settings))
    port = free_port()
    process = Process([program, f"--config.file={config_file}", f"--storage.tsdb.path={directory / 'data'}",
                       f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, process, timeout=30)
        wait_for(lambda: http_get(f"{url}/-/ready")[0] == 200, timeout=30, what="Prometheus ready")
    except BaseException:
        process.stop()
        raise
    return process, url


def prometheus_api(base: str, path: str) -> Any:
    with urllib.request.urlopen(f"{base}/api/v1/{path}", timeout=10) as response:
        return json.load(response)["data"]
