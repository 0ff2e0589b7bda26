"""The `redis` probe against real Redis servers: the local one on 6379, and one started here with a password."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator

import pytest
from pydantic import ValidationError

from canary.config import load_config
from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.redis_probe import RedisProbe, RedisSettings
from tests.conftest import Process, free_port, port_open, wait_for_port, write_config

LOCAL_HOST, LOCAL_PORT = "127.0.0.1", int(os.environ.get("CANARY_TEST_REDIS_PORT", "6379"))
PASSWORD = "canary-redis-S3cret"
INFO_GAUGES = {"redis_connected_clients", "redis_used_memory_bytes", "redis_maxmemory_bytes", "redis_rejected_connections"}


@pytest.fixture(scope="session")
def local_redis() -> str:
    if not port_open(LOCAL_HOST, LOCAL_PORT):
        pytest.skip(f"no Redis reachable at {LOCAL_HOST}:{LOCAL_PORT} (start one, or set CANARY_TEST_REDIS_PORT)")
    return f"redis://{LOCAL_HOST}:{LOCAL_PORT}/0"


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A second, throwaway redis-server with a password and a 100 MB maxmemory; stopped by its own pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH, so no password-protected Redis can be started")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = Process([
        binary, "--bind", "127.0.0.1", "--port", str(port), "--requirepass", PASSWORD, "--maxmemory", "100mb",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ])
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.stop()


def _settings(url: str, **extra: object) -> RedisSettings:
    return RedisSettings(name="cache", channel="redis", url=url, **extra)


async def _run(settings: RedisSettings, timeout: float = 5.0) -> Result:
    return await run_once(RedisProbe(settings), timeout, Scrubber(settings.secret_values()))


def _gauges(result: Result) -> dict[str, float]:
    return {gauge.name: gauge.value for gauge in result.gauges}


def _assert_no_secret(result: Result, caplog: pytest.LogCaptureFixture) -> None:
    texts = [result.message, *(check.text for check in result.checks), caplog.text]
    assert not any(PASSWORD in text for text in texts), texts


async def test_ping_passes_on_local_redis(local_redis: str) -> None:
    result = await _run(_settings(local_redis))
    assert result.success, result.message
    assert result.message == "PING answered PONG"
    assert {"connect", "ping"} <= set(result.phases)
    assert result.gauges == ()


async def test_info_exports_gauges(local_redis: str) -> None:
    result = await _run(_settings(local_redis, info=True))
    assert result.success, result.message
    gauges = _gauges(result)
    assert set(gauges) == INFO_GAUGES
    assert gauges["redis_connected_clients"] >= 1  # the probe itself
    assert gauges["redis_used_memory_bytes"] > 0
    assert "info" in result.phases
    # A server-lifetime count is a counter, exported as canary_probe_redis_rejected_connections_total.
    assert {gauge.family: gauge.kind for gauge in result.gauges} == {
        "canary_probe_redis_connected_clients": "gauge", "canary_probe_redis_used_memory_bytes": "gauge",
        "canary_probe_redis_maxmemory_bytes": "gauge", "canary_probe_redis_rejected_connections_total": "counter",
    }


async def test_each_run_closes_its_own_connection(local_redis: str) -> None:
    """redis-py warns (ResourceWarning) about a connection dropped without being closed; the probe closes it."""
    probe = RedisProbe(_settings(local_redis, info=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert (await run_once(probe, 5.0, Scrubber())).success
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []


async def test_refused_fails_with_connect() -> None:
    result = await _run(_settings(f"redis://127.0.0.1:{free_port()}/0"))
    assert (result.success, result.reason) == (False, "connect")
    assert "cannot connect to Redis" in result.message
    assert "ping" not in result.phases


async def test_password_passes_and_reports_memory_ratio(password_redis: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result = await _run(_settings(f"redis://:{PASSWORD}@127.0.0.1:{password_redis}/0", info=True, max_memory_ratio=0.9))
    assert result.success, result.message
    assert _gauges(result)["redis_maxmemory_bytes"] == 100 * 1024 * 1024
    _assert_no_secret(result, caplog)


async def test_memory_ratio_above_limit_fails_with_threshold(password_redis: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result = await _run(_settings(f"redis://:{PASSWORD}@127.0.0.1:{password_redis}/0", info=True, max_memory_ratio=0.0001))
    assert (result.success, result.reason) == (False, "threshold")
    assert "of maxmemory" in result.message and "above max_memory_ratio 0.0001" in result.message
    assert set(_gauges(result)) == INFO_GAUGES  # the figures are exported on failure too
    _assert_no_secret(result, caplog)


async def test_wrong_password_fails_with_auth(password_redis: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password-X9"
    settings = _settings(f"redis://:{wrong}@127.0.0.1:{password_redis}/0")
    result = await run_once(RedisProbe(settings), 5.0, Scrubber(settings.secret_values()))
    assert (result.success, result.reason) == (False, "auth")
    assert "refused the credentials" in result.message
    assert wrong not in result.message and wrong not in caplog.text


async def test_missing_password_fails_with_auth(password_redis: int) -> None:
    result = await _run(_settings(f"redis://127.0.0.1:{password_redis}/0"))
    assert (result.success, result.reason) == (False, "auth")
    assert "refused the credentials" in result.message
    assert "ping" not in result.phases  # redis-py's HELLO on connect is already refused


async def test_silent_server_times_out_within_the_runner_bound() -> None:

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):  # never answers; ends when the probe hangs up
            pass
        writer.close()

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    started = time.monotonic()
    try:
        result = await _run(_settings(f"redis://127.0.0.1:{port}/0"), timeout=0.3)
    finally:
        server.close()
        await server.wait_closed()
    assert result.reason == "timeout" and result.message.endswith("during connect"), result.message
    assert time.monotonic() - started < 3


async def test_socket_timeout_bounds_a_silent_server_on_its_own() -> None:

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            pass
        writer.close()

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    try:
        result = await _run(_settings(f"redis://127.0.0.1:{port}/0", socket_timeout="200ms"), timeout=5.0)
    finally:
        server.close()
        await server.wait_closed()
    # redis-py's connect includes a first round trip (HELLO / CLIENT SETINFO), which the socket timeout bounds
    assert (result.reason, "did not answer during connect" in result.message) == ("timeout", True), result.message
    assert result.duration_seconds < 2


def test_url_password_is_a_secret_and_target_hides_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [[probes]]
        name = "cache"
        type = "redis"
        channel = "redis"
        url = "${REDIS_URL:-redis://127.0.0.1:6379/0}"
        info = true
    """)
    config = load_config(path, PROBE_TYPES, environ={"REDIS_URL": f"redis://:{PASSWORD}@cache.internal:6380/2"})
    settings = config.probes[0]
    assert isinstance(settings, RedisSettings)
    assert PASSWORD in config.secrets
    assert settings.target() == "redis cache.internal:6380/2"
    assert PASSWORD not in repr(settings)
    default = load_config(path, PROBE_TYPES, environ={}).probes[0]
    assert default.target() == "redis 127.0.0.1:6379/0"


def test_url_file_is_accepted(tmp_path: Path) -> None:
    secret_file = tmp_path / "redis-url"
    secret_file.write_text(f"redis://:{PASSWORD}@127.0.0.1:6379/0\n")
    path = write_config(tmp_path, f"""
        [[probes]]
        name = "cache"
        type = "redis"
        channel = "redis"
        url_file = "{secret_file}"
    """)
    config = load_config(path, PROBE_TYPES, environ={})
    assert PASSWORD in config.secrets


@pytest.mark.parametrize("bad", [{"url": "http://127.0.0.1:6379"}, {"url": "redis://"},
                                 {"url": "redis://h", "max_memory_ratio": 1.5}, {"url": "redis://h", "infos": True}])
def test_settings_reject_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as error:
        RedisSettings(name="cache", channel="redis", **bad)
    assert PASSWORD not in str(error.value)
