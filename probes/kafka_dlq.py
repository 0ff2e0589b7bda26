"""`kafka_dlq` probe: dead-letter queue depth and growth — the runbooks' "look at the DLQ for a poison pill".

Depth of a topic = sum over its partitions of end offset − beginning offset (what is retained). Growth = how far
the end offsets advanced since the previous run of this probe instance: the number of new dead letters, which
retention deleting old ones cannot hide (depth alone could stay flat while new letters arrive). The first run only
sets the baseline. Growth above `max_growth` (default 0: any new dead letter) fails with reason `threshold`, once,
for the run that saw it; `max_depth` (off by default) fails while the queue stays deeper than that.

A type of its own rather than part of `kafka_lag`: a poison pill and a stuck consumer are different pages with
different runbooks, so each gets its own channel, interval and alert; its baseline state is its own too.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from canary.contract import Gauge, PhaseTimer, Probe, Result
from probes.kafka_common import KAFKA_LIBRARIES, KafkaSettings, TopicName, kafka_error_result, start_consumer

if TYPE_CHECKING:
    from aiokafka import TopicPartition


class KafkaDlqSettings(KafkaSettings):
    type: Literal["kafka_dlq"] = "kafka_dlq"
    topics: list[TopicName] = Field(min_length=1)
    max_growth: int = Field(default=0, ge=0)
    max_depth: int | None = Field(default=None, ge=0)

    def target(self) -> str:
        return f"kafka {self.servers()[0]} dlq {', '.join(self.topics)}"


class KafkaDlqProbe(Probe[KafkaDlqSettings]):
    settings_model = KafkaDlqSettings
    reasons = ("connect", "timeout", "auth", "tls", "status", "assertion", "threshold")
    figure_labels = frozenset({"topic"})
    libraries = KAFKA_LIBRARIES

    def __init__(self, settings: KafkaDlqSettings) -> None:
        super().__init__(settings)
        self._last_ends: dict[str, int] = {}

    async def run(self, timer: PhaseTimer) -> Result:
        from aiokafka import TopicPartition

        from probes.kafka_common import KAFKA_ERRORS

        try:
            async with AsyncExitStack() as stack:
                with timer.phase("connect"):
                    consumer = await start_consumer(stack, self.settings, group_id=None)
                with timer.phase("offsets"):
                    available = await consumer.topics()
                    missing = [topic for topic in self.settings.topics if topic not in available]
                    if missing:
                        return Result.fail("assertion", f"dead-letter topics missing from the cluster: {', '.join(missing)}")
                    partitions = [
                        TopicPartition(topic, number)
                        for topic in self.settings.topics
                        for number in sorted(consumer.partitions_for_topic(topic) or ())
                    ]
                    starts = await consumer.beginning_offsets(partitions)
                    ends = await consumer.end_offsets(partitions)
        except KAFKA_ERRORS as exc:
            return kafka_error_result(exc, timer.current or "the run")
        return self._judge(starts, ends)

    def _judge(self, starts: dict[TopicPartition, int], ends: dict[TopicPartition, int]) -> Result:
        settings = self.settings
        gauges: list[Gauge] = []
        problems: list[str] = []
        for topic in settings.topics:
            end = sum(offset for partition, offset in ends.items() if partition.topic == topic)
            depth = sum(max(0, offset - starts[partition]) for partition, offset in ends.items() if partition.topic == topic)
            labels = (("topic", topic),)
            gauges.append(Gauge("kafka_dlq_depth", depth, "Messages retained in a dead-letter topic.", labels))
            previous = self._last_ends.get(topic)
            self._last_ends[topic] = end
            if previous is not None:
                growth = max(0, end - previous)
                gauges.append(Gauge("kafka_dlq_growth", growth, "New dead letters since the previous run.", labels))
                if growth > settings.max_growth:
                    problems.append(f"{growth} new messages in dead-letter topic {topic} since the last run "
                                    f"(at most {settings.max_growth} allowed; depth now {depth})")
            if settings.max_depth is not None and depth > settings.max_depth:
                problems.append(f"dead-letter topic {topic} holds {depth} messages, above max_depth {settings.max_depth}")
        if problems:
            return Result.fail("threshold", "; ".join(problems), gauges=tuple(gauges))
        return Result.ok(f"no new dead letters in {', '.join(settings.topics)}", gauges=tuple(gauges))
