"""`kafka` probe: the cluster answers (bootstrap, metadata: broker count, configured topics exist, every partition
has a leader), then a canary message goes round trip — produced to `canary_topic`, consumed back — timing produce,
consume and end to end (what KMinion calls end-to-end monitoring).

The consumer never joins a group: it is assigned every partition of the canary topic by hand and starts at the end
offsets read *before* producing, so it sees the canary's own message and nothing older. Each message carries a
random id in its value and the synthetic marker as a header, so other consumers can skip it and concurrent canaries
do not confuse each other. All clients are fresh per run and stopped in a `finally`: a broker that went away and came
back is simply reconnected to on the next run.

The canary topic is the canary's own, so it manages it as KMinion does (`manage_topic`, on by default): when the
metadata lacks it, an admin client creates it — one partition per broker (the controller spreads the leaders round
robin, so every broker leads one), replication min(3, brokers), min.insync.replicas 2 from replication 3 on (else 1),
retention one day — waits (bounded) for its partitions to have leaders, and the round trip runs in the same run.
Another canary creating it meanwhile (TOPIC_ALREADY_EXISTS, e.g. a second shard) counts as success; a refusal for
lack of permission is a failure of its own (`auth`, naming the ACL to grant). Only the canary topic is ever created,
never the platform's `topics`. With `manage_topic = false` a missing canary topic fails as any missing topic does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from canary.contract import Duration, Gauge, marker_headers, PhaseTimer, Probe, Result, SyntheticHeader
from probes.kafka_common import (DEFAULT_TIMEOUT, KAFKA_LIBRARIES, KafkaSettings, TopicName, kafka_error_result,
                                 start_admin, start_consumer, stop_quietly)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import NewTopic
    from aiokafka.cluster import ClusterMetadata

TOPIC_READY_SHARE = 0.25  # of the probe's timeout: how long a created canary topic may take to get its leaders
TOPIC_READY_POLL = 0.1  # seconds between metadata requests while waiting for them
TOPIC_RETENTION_MS = 24 * 3600 * 1000  # canary messages matter for seconds; a day of them helps debugging (KMinion)


class KafkaRoundTripSettings(KafkaSettings):
    type: Literal["kafka"] = "kafka"
    topics: list[TopicName] = Field(default_factory=list)
    canary_topic: TopicName | None = None
    manage_topic: bool = True
    min_brokers: int = Field(default=1, ge=1)
    max_leaderless_partitions: int = Field(default=0, ge=0)
    consume_timeout: Duration = 5.0
    synthetic_header: SyntheticHeader = "X-Synthetic-Canary: 1"

    def target(self) -> str:
        topic = f" topic {self.canary_topic}" if self.canary_topic else ""
        return f"kafka {self.servers()[0]}{topic}"


class KafkaProbe(Probe[KafkaRoundTripSettings]):
    settings_model = KafkaRoundTripSettings
    reasons = ("connect", "timeout", "auth", "tls", "status", "assertion", "threshold")
    libraries = KAFKA_LIBRARIES

    async def run(self, timer: PhaseTimer) -> Result:
        from aiokafka import AIOKafkaProducer

        from probes.kafka_common import KAFKA_ERRORS

        async with AsyncExitStack() as stack:
            try:
                with timer.phase("connect"):
                    producer = AIOKafkaProducer(acks="all", linger_ms=0, **self.settings.client_options())
                    stack.push_async_callback(stop_quietly, producer)
                    await producer.start()
                with timer.phase("metadata"):
                    cluster = await producer.client.fetch_all_metadata()
                created = ""
                topic = self.settings.canary_topic
                if topic is not None and self.settings.manage_topic and topic not in cluster.topics():
                    with timer.phase("create_topic"):
                        outcome = await self._create_canary_topic(stack, producer, cluster, topic)
                    if isinstance(outcome, Result):
                        return replace(outcome, gauges=self._judge_metadata(cluster)[1])
                    cluster, created = outcome
                failed, gauges = self._judge_metadata(cluster)
                if failed is not None or topic is None:
                    return failed or Result.ok(f"{len(cluster.brokers())} brokers, topics present", gauges=gauges)
                return await self._round_trip(stack, producer, cluster, timer, gauges, created)
            except KAFKA_ERRORS as exc:
                return kafka_error_result(exc, timer.current or "the run")
        raise AssertionError("unreachable")  # pragma: no cover - the stack above always returns

    async def _create_canary_topic(
        self, stack: AsyncExitStack, producer: AIOKafkaProducer, cluster: ClusterMetadata, topic: str
    ) -> tuple[ClusterMetadata, str] | Result:
        """Create the missing canary topic, sized from the cluster, and wait for its leaders; the fresh metadata and a
        note for the run's message, or the failed Result."""
        from aiokafka import errors as kafka_errors

        refused = (kafka_errors.TopicAuthorizationFailedError, kafka_errors.ClusterAuthorizationFailedError)
        new_topic = canary_topic_for(topic, len(cluster.brokers()))
        partitions, replication = new_topic.num_partitions, new_topic.replication_factor
        admin = await start_admin(stack, self.settings)
        wait_ms = self.settings.client_options()["request_timeout_ms"] // 2  # the broker answers before the client gives up
        response = await admin.create_topics([new_topic], timeout_ms=wait_ms)
        note = f"created the canary topic: {partitions} partitions, replication {replication}"
        for name, code, *detail in response.topic_errors:  # v0 has no error message
            if name != topic or code == 0:
                continue
            error = kafka_errors.for_code(code)
            text = f"{error.message}: {detail[0]}" if detail and detail[0] else error.message
            if error is kafka_errors.TopicAlreadyExistsError:
                note = "another canary created the canary topic meanwhile"
            elif error in refused:
                return Result.fail(
                    "auth", f"not allowed to create the canary topic {topic} ({text}): grant the canary's principal "
                            "CREATE on it (or on the cluster), create it yourself, or set manage_topic = false")
            elif error is kafka_errors.RequestTimedOutError:
                return Result.fail("timeout", f"the broker did not confirm creating the canary topic {topic} within "
                                              f"{wait_ms / 1000:g}s ({text}); the next run will see whether it exists")
            else:
                return Result.fail("status", f"the broker refused to create the canary topic {topic} with {partitions} "
                                             f"partitions and replication {replication}: {text}")
        wait = TOPIC_READY_SHARE * (self.settings.timeout or DEFAULT_TIMEOUT)
        ready = await _await_leaders(producer, topic, wait)
        if ready is None:
            return Result.fail("timeout", f"{note}, but its partitions had no leader within {wait:g}s; the next run "
                                          "will use it")
        return ready, note

    def _judge_metadata(self, cluster: ClusterMetadata) -> tuple[Result | None, tuple[Gauge, ...]]:
        from aiokafka import TopicPartition

        settings = self.settings
        watched = list(dict.fromkeys([*settings.topics, *([settings.canary_topic] if settings.canary_topic else [])]))
        present = cluster.topics()
        leaderless = sum(
            1
            for topic in watched if topic in present
            for partition in cluster.partitions_for_topic(topic) or ()
            if (cluster.leader_for_partition(TopicPartition(topic, partition)) or -1) < 0
        )
        brokers = len(cluster.brokers())
        gauges = (
            Gauge("kafka_brokers", brokers, "Brokers in the cluster's metadata."),
            Gauge("kafka_partitions_without_leader", leaderless, "Partitions of the watched topics that have no leader."),
        )
        missing = [topic for topic in watched if topic not in present]
        if missing:
            return Result.fail(
                "assertion", f"topics missing from the cluster: {', '.join(missing)} ({len(present)} topics exist)",
                gauges=gauges,
            ), gauges
        problems = []
        if brokers < settings.min_brokers:
            problems.append(f"{brokers} brokers in the metadata, expected at least {settings.min_brokers}")
        if leaderless > settings.max_leaderless_partitions:
            problems.append(f"{leaderless} partitions without a leader, at most {settings.max_leaderless_partitions} allowed")
        if problems:
            return Result.fail("threshold", "; ".join(problems), gauges=gauges), gauges
        return None, gauges

    async def _round_trip(
        self, stack: AsyncExitStack, producer: AIOKafkaProducer, cluster: ClusterMetadata, timer: PhaseTimer,
        gauges: tuple[Gauge, ...], created: str = "",
    ) -> Result:
        from aiokafka import TopicPartition

        settings = self.settings
        topic = settings.canary_topic
        assert topic is not None
        with timer.phase("prepare"):
            consumer = await start_consumer(stack, settings, group_id=None)
            partitions = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
            ends = await consumer.end_offsets(partitions)
            consumer.assign(partitions)
            for partition, offset in ends.items():
                consumer.seek(partition, offset)
        canary_id = secrets.token_hex(8)
        payload = json.dumps({"canary": settings.name, "id": canary_id, "sent": time.time()}).encode()
        headers = [(name, value.encode()) for name, value in marker_headers(settings.synthetic_header).items()]
        with timer.phase("produce"):
            started = time.perf_counter()
            record = await producer.send_and_wait(topic, payload, key=settings.name.encode(), headers=headers)
            produced = time.perf_counter()
        with timer.phase("consume"):
            received = await _receive(consumer, canary_id, settings.consume_timeout)
            consumed = time.perf_counter()
        if received is None:
            return Result.fail(
                "timeout",
                f"canary produced to {topic} partition {record.partition} offset {record.offset} "
                f"but not consumed back within {settings.consume_timeout:g}s",
                gauges=gauges,
            )
        figures = (
            Gauge("kafka_produce_latency_seconds", produced - started, "Produce until the broker acknowledged (acks=all)."),
            Gauge("kafka_consume_latency_seconds", consumed - produced, "Acknowledged until the consumer received it."),
            Gauge("kafka_end_to_end_latency_seconds", max(0.0, time.time() - received),
                  "From the timestamp in the canary message until it was consumed back."),
        )
        note = f" ({created})" if created else ""
        return Result.ok(
            f"canary round trip through {topic} partition {record.partition} in {consumed - started:.3f}s{note}",
            phases={"end_to_end": consumed - started}, gauges=gauges + figures,
        )


def canary_topic_for(topic: str, brokers: int) -> NewTopic:
    """The canary topic for a cluster of `brokers`, as KMinion sizes its end-to-end topic: a partition per broker (the
    controller places leaders round robin, so each broker leads one), replication min(3, brokers), and
    min.insync.replicas 2 once there are 3 replicas (acks=all then survives one broker down, not two)."""
    from aiokafka.admin import NewTopic

    brokers = max(1, brokers)
    replication = min(3, brokers)
    configs = {"cleanup.policy": "delete", "retention.ms": str(TOPIC_RETENTION_MS),
               "min.insync.replicas": "2" if replication >= 3 else "1"}
    return NewTopic(topic, brokers, replication, topic_configs=configs)


async def _await_leaders(producer: AIOKafkaProducer, topic: str, wait: float) -> ClusterMetadata | None:
    """Metadata in which every partition of `topic` has a leader, polled for at most `wait` seconds; None after."""
    from aiokafka import TopicPartition

    deadline = time.monotonic() + wait
    for _ in range(max(1, round(wait / TOPIC_READY_POLL)) + 1):
        cluster = await producer.client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic) or set()
        if partitions and all((cluster.leader_for_partition(TopicPartition(topic, p)) or -1) >= 0 for p in partitions):
            return cluster
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(TOPIC_READY_POLL)
    return None


async def _receive(consumer: AIOKafkaConsumer, canary_id: str, wait: float) -> float | None:
    """Read until the message with `canary_id` arrives; returns the send timestamp it carries, or None after `wait`."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        batches = await consumer.getmany(timeout_ms=max(1, round(min(left, 0.5) * 1000)))
        for records in batches.values():
            for record in records:
                sent = _canary_sent(record.value, canary_id)
                if sent is not None:
                    return sent
    return None


def _canary_sent(value: bytes | None, canary_id: str) -> float | None:
    try:
        body = json.loads(value or b"")
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("id") == canary_id and isinstance(body.get("sent"), (int, float)):
        return float(body["sent"])
    return None
