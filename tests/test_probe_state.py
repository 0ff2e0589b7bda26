"""Probe state across reloads and restarts: the book and the hand-over in process, then `probe run` as a subprocess
against the sandbox as a process.

The LLM probe's 429 back-off and the Gmail probe's watch expiry are what a rebuilt probe used to forget: the sandbox's
own request logs show whether a rebuilt probe called again (it must not while its identity is unchanged, and must
once the identity changes), and the state file is read back to prove no secret went into it. (The Kafka lag windows
are followed through a reload and a restart in tests/test_kafka_lag.py, against tansu.)"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from canary.contract import PhaseTimer, Probe, ProbeSettings, Result
from canary.probe_state import FILE_NAME, FORMAT, FORMAT_VERSION, ProbeStateBook, hand_over, key_digest
from canary.sandbox import gmail as sandbox_gmail
from canary.sandbox.llm import DEFAULT_API_KEY
from probes.llm import DEFAULT_MODEL, LlmProbe, LlmSettings
from tests.conftest import ROOT, http_get, wait_for, wait_until, write_config
from tests.running_daemon import RunningDaemon, figure, get_json, post_json, sandbox_process as another_sandbox

RETRY_AFTER = 300  # the longest the sandbox asks for; far longer than any of these tests
SHIPPED_CREDENTIALS = ROOT / "deploy" / "sandbox" / "gmail-authorized-user.json"


# --- the book and the hand-over, in process ------------------------------------------------------------------------


def llm_probe(base_url: str = "http://127.0.0.1:9/v1", **fields: Any) -> LlmProbe:
    return LlmProbe(LlmSettings.model_validate({
        "name": "groq", "type": "llm", "channel": "ai", "interval": "1m", "timeout": "3s", "slow_after": "1s",
        "base_url": base_url, "api_key": DEFAULT_API_KEY, **fields,
    }))


def backing_off(probe: LlmProbe, seconds: float = 600.0) -> LlmProbe:
    probe.restore_state({"retry_at": time.time() + seconds, "quotas": [{"kind": "requests", "limit": 10.0, "remaining": 0.0}]})
    return probe


class Odd(Probe[ProbeSettings]):
    """A probe type whose state hooks misbehave the way a bug would: a state that is not JSON, or an export that raises."""

    settings_model = ProbeSettings

    def __init__(self, settings: ProbeSettings, state: Any, key: str = "odd") -> None:
        super().__init__(settings)
        self.state, self.key = state, key

    async def run(self, timer: PhaseTimer) -> Result:
        return Result.ok()

    def state_key(self) -> str:
        return self.key

    def export_state(self) -> dict[str, Any]:
        if isinstance(self.state, Exception):
            raise self.state
        return self.state


def odd(name: str, state: Any, kind: str = "odd", key: str = "odd") -> tuple[ProbeSettings, Probe]:
    settings = ProbeSettings(name=name, type=kind, channel="odd", interval="1m", timeout="5s")
    return settings, Odd(settings, state, key)


def test_saved_state_goes_back_to_the_probe_of_the_same_name_type_and_key_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    saving = ProbeStateBook.in_directory(tmp_path)
    probe = backing_off(llm_probe())
    assert saving.save([(probe.settings, probe)])
    text = (tmp_path / FILE_NAME).read_text()
    assert DEFAULT_API_KEY not in text and "127.0.0.1" not in text  # the key is stored as a digest

    loading = ProbeStateBook.in_directory(tmp_path)
    with caplog.at_level(logging.INFO, logger="canary.probe_state"):
        loading.load()
        same = loading.restored(llm_probe().settings, llm_probe(interval="2m"))
        assert same.export_state() == probe.export_state()
        loading.load()
        elsewhere = loading.restored(llm_probe().settings, llm_probe("http://127.0.0.1:8/v1"))
        assert elsewhere.export_state() == {}  # another provider: not its state, and not a problem either
        loading.started()
        later = loading.restored(llm_probe().settings, llm_probe())
        assert later.export_state() == {}  # only the first config load takes saved state
    assert "loaded the saved state of 1 probes" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_state_that_is_not_json_or_a_broken_export_is_left_out_once_and_the_others_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book = ProbeStateBook.in_directory(tmp_path)
    llm = backing_off(llm_probe())
    probes = [odd("a-set", {"seen": {1, 2}}), odd("nan", {"value": float("nan")}), odd("raises", RuntimeError("bug")),
              (llm.settings, llm)]
    with caplog.at_level(logging.WARNING, logger="canary.probe_state"):
        assert book.save(probes) and book.save(probes)
    assert set(json.loads((tmp_path / FILE_NAME).read_text())["probes"]) == {"groq"}
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3, warnings  # one per broken probe, not one per save
    assert all(name in " ".join(warnings) for name in ("a-set", "nan", "raises"))


def test_a_reload_hands_state_over_only_within_one_identity_and_a_refused_state_is_one_warning(
    caplog: pytest.LogCaptureFixture
) -> None:
    carried = llm_probe(interval="5m", timeout="4s")
    hand_over(llm_probe().settings, backing_off(llm_probe()), carried.settings, carried)
    assert carried.export_state()["retry_at"] > time.time() + 500

    with caplog.at_level(logging.WARNING, logger="canary.probe_state"):
        for old_settings, old in (odd("groq", {"retry_at": 1.0}),                # the same name, another type
                                  (llm_probe().settings, backing_off(llm_probe("http://127.0.0.1:8/v1")))):  # another key
            fresh = llm_probe()
            hand_over(old_settings, old, fresh.settings, fresh)
            assert fresh.export_state() == {}
        assert caplog.text == ""  # a change of identity is not a problem

        refused = llm_probe()
        old_settings, old = odd("groq", {"retry_at": "soon"}, kind="llm", key=refused.state_key())
        hand_over(old_settings, old, refused.settings, refused)
    assert refused.export_state() == {}
    assert [record.getMessage() for record in caplog.records] == [
        "probe groq: its state could not be carried over the reload (retry_at: Input should be a valid number); "
        "it starts afresh"]


async def test_the_periodic_save_writes_in_the_background_only_when_a_state_changed(tmp_path: Path) -> None:
    book = ProbeStateBook.in_directory(tmp_path / "new")  # a missing directory is created
    probe = backing_off(llm_probe(), 600)
    path = tmp_path / "new" / FILE_NAME

    def saved() -> dict[str, Any] | None:
        return json.loads(path.read_text()) if path.exists() else None

    saver = asyncio.create_task(book.save_every(lambda: [(probe.settings, probe)], seconds=0.05))
    try:
        await wait_until(lambda: saved() is not None, timeout=10)
        first = saved()
        assert first is not None and first["probes"]["groq"]["state"]["retry_at"] > time.time() + 500
        await asyncio.sleep(0.5)  # ten periods with nothing changed: not written again
        assert saved() == first
        backing_off(probe, 1200)
        await wait_until(lambda: (saved() or first)["probes"]["groq"]["state"]["retry_at"] > time.time() + 1100, timeout=10)
    finally:
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)


def test_without_a_state_directory_nothing_is_read_or_written(tmp_path: Path) -> None:
    book = ProbeStateBook.in_directory(None)
    probe = backing_off(llm_probe())
    book.load()
    assert not book.save([(probe.settings, probe)])
    assert book.restored(probe.settings, llm_probe()).export_state() == {}


# --- the LLM back-off ---------------------------------------------------------------------------------------------


def llm_calls(sandbox: str) -> int:
    return len(get_json(f"{sandbox}/_sandbox/llm/requests")["requests"])


def watch_calls(sandbox: str) -> int:
    return len(get_json(f"{sandbox}/_sandbox/gmail")["watch_calls"])


def llm_config(sandbox: str, interval: str = "1s") -> str:
    return f"""
        [daemon]
        jitter = "200ms"
        shutdown_grace = "2s"

        [[probes]]
        name = "groq"
        type = "llm"
        channel = "ai"
        interval = "{interval}"
        timeout = "1s"
        slow_after = "800ms"
        base_url = "{sandbox}/llm/openai/v1"
        api_key = "{DEFAULT_API_KEY}"
    """


def test_a_back_off_survives_an_interval_reload_and_a_restart_but_not_another_provider(
    tmp_path: Path, sandbox_process: str
) -> None:
    sandbox, state_file = sandbox_process, tmp_path / "state" / FILE_NAME
    post_json(f"{sandbox}/_sandbox/faults", {"llm": "rate_limited", "llm_retry_after_seconds": RETRY_AFTER})
    with RunningDaemon(write_config(tmp_path, llm_config(sandbox)), tmp_path / "state") as daemon:
        wait_for(lambda: (figure(daemon.base, "canary_probe_llm_backoff_seconds", "groq") or 0) > RETRY_AFTER - 60,
                 what="the probe to back off")
        # The provider would answer now: only the back-off keeps the probe from calling it.
        post_json(f"{sandbox}/_sandbox/faults", {"llm": "ok"})
        assert llm_calls(sandbox) == 1  # the 429 on GET /models, and nothing since

        # An interval-only reload rebuilds the probe, which keeps the back-off.
        daemon.wait_for_run_after("groq", daemon.reload(llm_config(sandbox, interval="1500ms")))
        assert llm_calls(sandbox) == 1
        assert figure(daemon.base, "canary_probe_success", "groq") == 0
        assert (figure(daemon.base, "canary_probe_llm_backoff_seconds", "groq") or 0) > RETRY_AFTER - 120

        # A restart with the same state directory keeps it too, saved at stop as wall-clock time.
        assert daemon.stop() == 0
        saved = json.loads(state_file.read_text())
        assert (saved["format"], saved["version"]) == (FORMAT, FORMAT_VERSION)
        entry = saved["probes"]["groq"]
        assert (entry["type"], entry["key"]) == ("llm", key_digest(f"{sandbox}/llm/openai/v1 {DEFAULT_MODEL}"))
        assert time.time() + 60 < entry["state"]["retry_at"] <= time.time() + RETRY_AFTER
        assert DEFAULT_API_KEY not in state_file.read_text()
        restarted = time.time()
        daemon.start()
        daemon.wait_for_run_after("groq", restarted)
        assert llm_calls(sandbox) == 1
        assert (figure(daemon.base, "canary_probe_llm_backoff_seconds", "groq") or 0) > RETRY_AFTER - 120
        _, status = http_get(f"{daemon.base}/status.json")
        assert "no request sent" in json.loads(status)["probes"][0]["message"]

        # Another provider is another identity: the back-off is not carried to it.
        with another_sandbox() as other:
            daemon.wait_for_run_after("groq", daemon.reload(llm_config(other, interval="1500ms")))
            wait_for(lambda: figure(daemon.base, "canary_probe_success", "groq") == 1, what="a pass at the new provider")
            assert llm_calls(other) >= 2
            assert figure(daemon.base, "canary_probe_llm_backoff_seconds", "groq") == 0
        assert llm_calls(sandbox) == 1
        assert "WARNING" not in daemon.output()


def saved_file(probes: dict[str, Any]) -> str:
    return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "saved_at": time.time(), "probes": probes})


def llm_entry(sandbox: str, state: Any) -> dict[str, Any]:
    key = key_digest(f"{sandbox}/llm/openai/v1 {DEFAULT_MODEL}")
    return {"groq": {"type": "llm", "key": key, "state": state}}


@pytest.mark.parametrize(("contents", "problem"), [
    pytest.param(lambda _: "{not json", "not valid JSON", id="not-json"),
    pytest.param(lambda _: '{"format": "someone-else"}', "not a channel-canary probe state file", id="foreign"),
    pytest.param(lambda _: "[" * 100_000 + "]" * 100_000, "not valid JSON", id="deeply-nested"),
    pytest.param(lambda s: saved_file(llm_entry(s, {"retry_at": time.time() + 10 * 365 * 86400, "quotas": []})),
                 "longer than the probe ever keeps", id="a-ten-year-back-off"),
    pytest.param(lambda s: saved_file(llm_entry(s, {"retry_at": "soon"})), "retry_at", id="a-back-off-of-the-wrong-type"),
    pytest.param(lambda s: saved_file(llm_entry(s, {"retry_at": time.time() + 100, "quotas": [
        {"kind": "requests", "limit": 1.0}, {"kind": "requests", "limit": 2.0}]})), "a kind appears twice", id="twice"),
    pytest.param(lambda s: saved_file({"groq": "x"}), 'not an object with "type", "key" and "state"', id="bad-entry"),
])
def test_a_corrupt_or_hostile_state_file_is_one_warning_naming_it_and_the_probe_runs(
    tmp_path: Path, sandbox_process: str, contents: Any, problem: str
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / FILE_NAME).write_text(contents(sandbox_process))
    with RunningDaemon(write_config(tmp_path, llm_config(sandbox_process)), state_dir) as daemon:
        wait_for(lambda: figure(daemon.base, "canary_probe_success", "groq") == 1, what="a passing run")
        assert llm_calls(sandbox_process) >= 2
        warnings = [line for line in daemon.output().splitlines() if "WARNING" in line]
        assert len(warnings) == 1, daemon.output()
        assert str(state_dir / FILE_NAME) in warnings[0] and problem in warnings[0]
        # The save at stop replaces the file with one of ours.
        assert daemon.stop() == 0
    assert json.loads((state_dir / FILE_NAME).read_text())["format"] == FORMAT


# --- the Gmail watch expiry ---------------------------------------------------------------------------------------


def gmail_config(sandbox: str, interval: str = "1s") -> str:
    return f"""
        [daemon]
        jitter = "200ms"
        shutdown_grace = "2s"

        [[probes]]
        name = "gmail"
        type = "gmail"
        channel = "email"
        interval = "{interval}"
        timeout = "1s"
        credentials_file = "{SHIPPED_CREDENTIALS}"
        oauth_token_url = "{sandbox}/google/token"
        gmail_api_url = "{sandbox}/google"
        renew_url = "{sandbox}/gmail/setup-watch"
    """


def test_a_watch_expiry_survives_an_interval_reload_and_a_restart_without_renewing_again(
    tmp_path: Path, sandbox_process: str
) -> None:
    sandbox, state_file, expiry_figure = sandbox_process, tmp_path / "state" / FILE_NAME, "canary_probe_gmail_watch_expiry_timestamp_seconds"
    with RunningDaemon(write_config(tmp_path, gmail_config(sandbox)), tmp_path / "state") as daemon:
        wait_for(lambda: figure(daemon.base, expiry_figure, "gmail") is not None, what="the first renewal")
        expiry = figure(daemon.base, expiry_figure, "gmail")
        assert watch_calls(sandbox) == 1

        daemon.wait_for_run_after("gmail", daemon.reload(gmail_config(sandbox, interval="1500ms")))
        assert figure(daemon.base, "canary_probe_success", "gmail") == 1
        assert figure(daemon.base, expiry_figure, "gmail") == expiry
        assert watch_calls(sandbox) == 1

        assert daemon.stop() == 0
        text = state_file.read_text()
        assert json.loads(text)["probes"]["gmail"]["state"] == {"watch_expiry": expiry}
        for secret in (sandbox_gmail.CLIENT_SECRET, sandbox_gmail.REFRESH_TOKEN, "ya29."):  # ya29.: an access token
            assert secret not in text
        restarted = time.time()
        daemon.start()
        daemon.wait_for_run_after("gmail", restarted)
        assert figure(daemon.base, "canary_probe_success", "gmail") == 1
        assert figure(daemon.base, expiry_figure, "gmail") == expiry
        assert watch_calls(sandbox) == 1
        assert get_json(f"{sandbox}/_sandbox/gmail")["token_requests"] >= 3  # the probe did run, token and all

        # Another platform's renewal endpoint is another watch: renewed at once.
        with another_sandbox() as other:
            renewing_elsewhere = gmail_config(sandbox, interval="1500ms").replace(
                f"{sandbox}/gmail/setup-watch", f"{other}/gmail/setup-watch")
            daemon.wait_for_run_after("gmail", daemon.reload(renewing_elsewhere))
            assert watch_calls(other) == 1
        assert watch_calls(sandbox) == 1
        assert "WARNING" not in daemon.output()
