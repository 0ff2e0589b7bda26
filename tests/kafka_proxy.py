"""A Kafka-protocol proxy in front of a real tansu broker, for the broker behaviour tansu's in-memory engine cannot
show by itself: retention that already deleted a partition's oldest records (it has no retention and no
DeleteRecords), ACLs that refuse a CreateTopics (it has no authorizer), and a broker that takes a Fetch and never
answers; and two canaries creating the same topic at the same moment. Everything else passes through untouched, byte
for byte, to the real broker.

The broker must advertise the proxy's address (`Broker(..., advertised_port=proxy.port)`), so that clients reach
every broker connection through it. Only the request versions aiokafka sends are understood (ListOffsets v1-v3,
CreateTopics v0-v3, both with the non-flexible request header); anything else is forwarded as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from aiokafka.protocol import admin, offset
from aiokafka.protocol.struct import Struct

from tests.conftest import free_port

FETCH, LIST_OFFSETS, CREATE_TOPICS = 1, 2, 19
EARLIEST = -2


@dataclass
class Faults:
    """What the proxy changes; a test sets them, and they apply from the next request on."""

    log_start: dict[tuple[str, int], int] = field(default_factory=dict)  # ListOffsets EARLIEST answers this
    deny_create: int | None = None  # CreateTopics answered by the proxy with this error code for every topic
    create_together: int = 0  # CreateTopics held until this many arrived (at most 5 s), then all sent at once
    silent_fetch: bool = False  # a connection that sends a Fetch gets no answer to it, nor to anything after it
    seen: dict[int, int] = field(default_factory=dict)  # requests seen, by API key


def _header(payload: bytes) -> tuple[int, int, int, int]:
    """API key, version and correlation id of a request, and where its body starts (request header v1)."""
    api_key, version, correlation = struct.unpack_from(">hhi", payload)
    (client_id_length,) = struct.unpack_from(">h", payload, 8)
    return api_key, version, correlation, 10 + max(0, client_id_length)


class KafkaProxy:
    """Listens on 127.0.0.1:`port`, forwards to 127.0.0.1:`upstream_port`, applies `faults`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.faults = Faults()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._creates = 0
        self._together = asyncio.Event()

    async def start(self) -> "KafkaProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 2)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_in, upstream_out = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 5)
        except OSError:
            client_out.close()
            self._tasks.discard(task)
            return
        rewrites: dict[int, tuple[int, Struct]] = {}  # correlation id → ListOffsets version and request
        replies = asyncio.create_task(self._replies(upstream_in, client_out, rewrites))
        try:
            await self._requests(client_in, upstream_out, client_out, rewrites)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            replies.cancel()
            with contextlib.suppress(BaseException):
                await replies
            for writer in (upstream_out, client_out):
                writer.close()
            self._tasks.discard(task)

    async def _requests(self, client_in: asyncio.StreamReader, upstream_out: asyncio.StreamWriter,
                        client_out: asyncio.StreamWriter, rewrites: dict[int, tuple[int, Struct]]) -> None:
        silent = False
        while True:
            (size,) = struct.unpack(">i", await client_in.readexactly(4))
            payload = await client_in.readexactly(size)
            api_key, version, correlation, body = _header(payload)
            self.faults.seen[api_key] = self.faults.seen.get(api_key, 0) + 1
            if silent or (api_key == FETCH and self.faults.silent_fetch):
                silent = True  # the broker took the request and went quiet on this connection
                continue
            if api_key == CREATE_TOPICS and self.faults.deny_create is not None and version <= 3:
                request = getattr(admin, f"CreateTopicsRequest_v{version}").decode(payload[body:])
                answer = _create_topics_refused(version, request, self.faults.deny_create)
                client_out.write(struct.pack(">ii", 4 + len(answer), correlation) + answer)
                await client_out.drain()
                continue
            if api_key == CREATE_TOPICS and self.faults.create_together > 1:
                self._creates += 1
                if self._creates >= self.faults.create_together:
                    self._together.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._together.wait(), 5)
            if api_key == LIST_OFFSETS and self.faults.log_start and 1 <= version <= 3:
                rewrites[correlation] = (version, getattr(offset, f"OffsetRequest_v{version}").decode(payload[body:]))
            upstream_out.write(struct.pack(">i", size) + payload)
            await upstream_out.drain()

    async def _replies(self, upstream_in: asyncio.StreamReader, client_out: asyncio.StreamWriter,
                       rewrites: dict[int, tuple[int, Struct]]) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (size,) = struct.unpack(">i", await upstream_in.readexactly(4))
                payload = await upstream_in.readexactly(size)
                (correlation,) = struct.unpack_from(">i", payload)
                if correlation in rewrites:
                    version, request = rewrites.pop(correlation)
                    payload = payload[:4] + self._log_start(version, request, payload[4:])
                client_out.write(struct.pack(">i", len(payload)) + payload)
                await client_out.drain()

    def _log_start(self, version: int, request: Struct, body: bytes) -> bytes:
        """A ListOffsets answer where EARLIEST says `faults.log_start` for the partitions it names."""
        earliest = {(topic, partition) for topic, partitions in request.topics
                    for partition, timestamp in partitions if timestamp == EARLIEST}
        response = getattr(offset, f"OffsetResponse_v{version}").decode(body)
        topics = []
        for topic, partitions in response.topics:
            changed = []
            for partition, error_code, timestamp, found in partitions:
                start = self.faults.log_start.get((topic, partition))
                if (topic, partition) in earliest and start is not None and not error_code:
                    found = start
                changed.append((partition, error_code, timestamp, found))
            topics.append((topic, changed))
        response.topics = topics
        return response.encode()


def _create_topics_refused(version: int, request: Struct, error_code: int) -> bytes:
    topics = [entry[0] for entry in request.create_topic_requests]
    response_type = getattr(admin, f"CreateTopicsResponse_v{version}")
    if version == 0:
        return response_type(topic_errors=[(topic, error_code) for topic in topics]).encode()
    errors = [(topic, error_code, "refused by the test proxy's ACL") for topic in topics]
    if version == 1:
        return response_type(topic_errors=errors).encode()
    return response_type(throttle_time_ms=0, topic_errors=errors).encode()
