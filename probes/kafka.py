"""`kafka` probe: the cluster answers (bootstrap, metadata: broker count, configured topics exist, every partition
has a leader), then a canary message goes round trip — produced to `canary_topic`, consumed back — timing produce,
consume and end to end (what KMinion calls end-to-end monitoring).

The consumer never joins a group: it is assigned every partition of the canary topic by hand and starts at the end
offsets read *before* producing, so it sees the canary's own message and nothing older. Each message carries a
random id in its value and the synthetic marker as a header, so other consumers can skip it and concurrent canaries
do not confuse each other. All clients are fresh per run and stopped in a `finally`: a broker that went away and came
back is simply reconnected to on the next run.
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import AsyncExitStack
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.cluster import ClusterMetadata
from pydantic import Field

from canary.contract import Duration, Gauge, marker_headers, PhaseTimer, Probe, Result, SyntheticHeader
from probes.kafka_common import KAFKA_ERRORS, KafkaSettings, TopicName, kafka_error_result, start_consumer, stop_quietly


class KafkaRoundTripSettings(KafkaSettings):
    type: Literal["kafka"] = "kafka"
    topics: list[TopicName] = Field(default_factory=list)
    canary_topic: TopicName | None = None
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

    async def run(self, timer: PhaseTimer) -> Result:
        async with AsyncExitStack() as stack:
            try:
                with timer.phase("connect"):
                    producer = AIOKafkaProducer(acks="all", linger_ms=0, **self.settings.client_options())
                    stack.push_async_callback(stop_quietly, producer)
                    await producer.start()
                with timer.phase("metadata"):
                    cluster = await producer.client.fetch_all_metadata()
                failed, gauges = self._judge_metadata(cluster)
                if failed is not None or self.settings.canary_topic is None:
                    return failed or Result.ok(f"{len(cluster.brokers())} brokers, topics present", gauges=gauges)
                return await self._round_trip(stack, producer, cluster, timer, gauges)
            except KAFKA_ERRORS as exc:
                return kafka_error_result(exc, timer.current or "the run")
        raise AssertionError("unreachable")  # pragma: no cover - the stack above always returns

    def _judge_metadata(self, cluster: ClusterMetadata) -> tuple[Result | None, tuple[Gauge, ...]]:
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
        gauges: tuple[Gauge, ...],
    ) -> Result:
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
        return Result.ok(
            f"canary round trip through {topic} partition {record.partition} in {consumed - started:.3f}s",
            phases={"end_to_end": consumed - started}, gauges=gauges + figures,
        )


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
