"""Every secret in a URL is a secret: its password and secret-looking query values never reach a page, a listing
or a scrape, whichever probe type holds the URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canary.cli import main
from canary.config import load_config
from canary.contract import Result
from canary.state import ResultStore
from exporter.exposition import ProbeExposition
from exporter.status_page import render_status_page, status_json
from probes import PROBE_TYPES
from tests.conftest import write_config

PASSWORD = "Pa55-w0rd-in-url"
TOKEN = "t0ken-in-query-string"

CONFIG = f"""
[[probes]]
name = "status"
type = "statuspage"
channel = "ai"
url = "https://canary:{PASSWORD}@status.example.com/?token={TOKEN}"

[[probes]]
name = "form"
type = "transaction"
channel = "web_form"
base_url = "https://canary:{PASSWORD}@platform.example.com"
[[probes.steps]]
name = "submit"
method = "POST"
url = "/support/submit?api_key={TOKEN}"

[[probes]]
name = "health"
type = "http"
channel = "api"
url = "https://canary:{PASSWORD}@platform.example.com/health?access_token={TOKEN}"

[[probes]]
name = "hook"
type = "whatsapp"
channel = "whatsapp"
url = "https://canary:{PASSWORD}@platform.example.com/whatsapp/webhook?sig={TOKEN}"
auth_token = "twilio-token-123"
account_sid = "AC{"0" * 32}"
from_number = "+15005550006"
to_number = "+14155238886"
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, CONFIG)


def test_url_secrets_are_known_secrets(config_path: Path) -> None:
    config = load_config(config_path, PROBE_TYPES, environ={})
    assert {PASSWORD, TOKEN} <= config.secrets
    for probe in config.probes:
        assert PASSWORD not in probe.safe_target() and TOKEN not in probe.safe_target(), probe.name
        assert "example.com" in probe.safe_target()  # still says where it goes


def test_no_page_listing_or_scrape_shows_a_url_secret(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(config_path, PROBE_TYPES, environ={})
    store = ResultStore((1.0,), 5)
    store.sync(config.probes, (1.0,), 5)
    exposition = ProbeExposition({}, (1.0,))
    for probe in config.probes:
        store.record(probe.name, Result.fail("status", "HTTP 503"), 1.7e9)
    pages = [
        render_status_page(store.records(), store.channels()),
        json.dumps(status_json(store.records(), store.channels())),
        exposition.exposition(store.records(), store.channels()).decode(),
    ]
    assert main(["list", "--config", str(config_path)]) == 0
    pages.append(capsys.readouterr().out)
    for page in pages:
        assert "platform.example.com" in page or "canary_probe_success" in page  # the page is about these probes
        assert PASSWORD not in page and TOKEN not in page
