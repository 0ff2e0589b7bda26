"""Shared fixtures: real servers on 127.0.0.1, the local PostgreSQL, and helpers to write configs."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web

from canary.sandbox import build_sandbox_app

pytest_plugins = ["tests.kafka_broker"]  # the Kafka broker fixtures

ROOT = Path(__file__).resolve().parent.parent
PG_HOST, PG_PORT = "127.0.0.1", int(os.environ.get("CANARY_TEST_PG_PORT", "5432"))
PG_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test writes into the real home: every default state directory (canary/statedir.py) of this session, the
    daemons' and `--once`'s started as subprocesses included, is under a temporary directory."""
    home = tmp_path_factory.mktemp("state-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CANARY_STATE_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The local PostgreSQL; tests that need it skip, with the reason, where none is reachable."""
    if not port_open(PG_HOST, PG_PORT):
        pytest.skip(f"no PostgreSQL reachable at {PG_HOST}:{PG_PORT} (start one, or set CANARY_TEST_PG_PORT)")
    return PG_DSN


async def start_app(app: web.Application, ssl_context=None, **options: Any) -> tuple[web.AppRunner, str]:  # type: ignore[no-untyped-def]
    """Serve an aiohttp app on a free loopback port; returns the runner and its base URL.

    `options` go to the AppRunner, e.g. `handler_cancellation=True` for a server that drops a request whose
    client went away."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, **options)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    scheme = "https" if ssl_context else "http"
    return runner, f"{scheme}://127.0.0.1:{port}"


@pytest.fixture
async def sandbox() -> AsyncIterator[tuple[web.Application, str]]:
    """The bundled sandbox platform, served in-process on a real socket."""
    app = build_sandbox_app()
    runner, url = await start_app(app)
    try:
        yield app, url
    finally:
        await runner.cleanup()


def write_config(tmp_path: Path, body: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


class Process:
    """A subprocess this test started; ended by its own pid only, and always within a bounded wait."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, cpus: set[int] | None = None,
        nice: int = 0,
    ) -> None:
        """`cpus`: pin the process (and the threads it starts) to these CPUs; `nice`: lower its priority by this much."""
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"canary-test-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            if nice:
                os.nice(nice)

        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
            preexec_fn=pin if cpus or nice else None,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=5)
        finally:
            self._log.close()


def probe_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "canary", *args]


def wait_for_port(port: int, process: Process | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", port, 0.2):
            return
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(f"process exited early:\n{process.output()}")
        time.sleep(0.05)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture
def sandbox_process() -> Iterator[str]:
    """The sandbox as its own process (`probe sandbox`), for daemon and CLI tests."""
    port = free_port()
    process = Process(probe_command("sandbox", "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Polls `check` (from a test thread, not a loop) until it is true, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s")


def http_get(url: str, method: str = "GET") -> tuple[int, str]:
    """Status and body of one plain request; error statuses are answers too, not exceptions."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
