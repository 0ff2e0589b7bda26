"""`kafka_lag` probe: consumer lag of the platform's consumer groups, judged over a sliding window the way Burrow
does, so a stuck consumer pages before the backlog is large.

Committed offsets are read WITHOUT joining the group: one aiokafka consumer per group with that `group_id`,
auto-commit off, never subscribed, asks `committed()` (an OffsetFetch) — it sends no JoinGroup, so the real
consumers are never rebalanced. Lag of a partition = end offset − committed offset (a partition the group never
committed counts end − beginning, everything retained).

Each run adds one observation (committed offset, lag) per partition to a window of the last `window` runs, kept
in the probe instance. A partition's status, first rule that matches:

1. lag is 0 now → OK (0)
2. lag > 0 and no progress for longer than `stop_after` → STOP (3); progress is a commit that moved the offset,
   or an observation with lag 0 (a caught-up consumer has nothing to commit)
3. the window is not yet full, or lag was 0 at any point in it → OK (0)
4. the committed offset is the same in every observation of the window → STALL (2)
5. the committed offset moved, but lag never fell across the window and ended higher than it began → WARN (1)
6. otherwise → OK (0)

A group's status is its worst partition's, exported as `kafka_consumer_group_status{group}` with the numeric codes
above. STALL and STOP fail the probe (reason `threshold`); WARN is exported but passes. A group's total lag above
`max_lag` also fails (`threshold`; the runbooks alert at 100).
"""

from __future__ import annotations

import time
from collections import deque
from itertools import pairwise
from contextlib import AsyncExitStack
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, model_validator

from canary.contract import Duration, Gauge, PhaseTimer, Probe, Result, spelled
from probes.kafka_common import KAFKA_ERRORS, KafkaSettings, TopicName, kafka_error_result, start_consumer


class Status(IntEnum):
    OK = 0
    WARN = 1
    STALL = 2
    STOP = 3


GroupName = spelled(r"[A-Za-z0-9._-]{1,255}", "a consumer group name: 1 to 255 letters, digits, '.', '_' or '-'")


class ConsumerGroup(BaseModel):
    """One consumer group and the topics it consumes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: GroupName
    topics: list[TopicName] = Field(min_length=1)


class KafkaLagSettings(KafkaSettings):
    type: Literal["kafka_lag"] = "kafka_lag"
    groups: list[ConsumerGroup] = Field(min_length=1)
    max_lag: int | None = Field(default=100, ge=0)
    window: int = Field(default=5, ge=2, le=100)
    stop_after: Duration = 600.0

    @model_validator(mode="after")
    def _unique_groups(self) -> "KafkaLagSettings":
        names = [group.name for group in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        return self

    def target(self) -> str:
        return f"kafka {self.servers()[0]} groups {', '.join(group.name for group in self.groups)}"


@dataclass(frozen=True, slots=True)
class Observation:
    committed: int | None
    lag: int


@dataclass(slots=True)
class PartitionHistory:
    """A partition's last `window` observations, and when its consumer last made progress."""

    window: deque[Observation]
    last_moved: float

    @classmethod
    def start(cls, size: int, now: float) -> "PartitionHistory":
        return cls(deque(maxlen=size), now)

    def observe(self, observation: Observation, now: float) -> None:
        """Add one run's observation. Progress is a commit that moved the offset, or no lag at all: a caught-up
        consumer has nothing to commit, and its clock must not run towards STOP meanwhile (Burrow PR #338)."""
        moved = bool(self.window) and self.window[-1].committed != observation.committed
        if moved or observation.lag <= 0:
            self.last_moved = now
        self.window.append(observation)


def partition_status(history: PartitionHistory, size: int, now: float, stop_after: float) -> Status:
    """The rule in the module docstring, for one partition."""
    observations = list(history.window)
    if observations[-1].lag <= 0:
        return Status.OK
    if now - history.last_moved > stop_after:
        return Status.STOP
    if len(observations) < size or any(o.lag <= 0 for o in observations):
        return Status.OK
    if all(o.committed == observations[0].committed for o in observations):
        return Status.STALL
    lags = [o.lag for o in observations]
    if all(later >= earlier for earlier, later in pairwise(lags)) and lags[-1] > lags[0]:
        return Status.WARN
    return Status.OK


class KafkaLagProbe(Probe[KafkaLagSettings]):
    settings_model = KafkaLagSettings
    reasons = ("connect", "timeout", "auth", "tls", "status", "assertion", "threshold")
    figure_labels = frozenset({"group", "topic", "partition"})

    def __init__(self, settings: KafkaLagSettings) -> None:
        super().__init__(settings)
        self._history: dict[tuple[str, str, int], PartitionHistory] = {}

    async def run(self, timer: PhaseTimer) -> Result:
        settings = self.settings
        gauges: list[Gauge] = []
        problems: list[str] = []
        try:
            for group in settings.groups:
                async with AsyncExitStack() as stack:
                    with timer.phase("connect"):
                        consumer = await start_consumer(stack, settings, group_id=group.name)
                    with timer.phase("offsets"):
                        lags = await _read_lags(consumer, group)
                if isinstance(lags, Result):
                    return lags
                gauges += self._judge(group.name, lags, problems)
        except KAFKA_ERRORS as exc:
            return kafka_error_result(exc, timer.current or "the run")
        if problems:
            return Result.fail("threshold", "; ".join(problems), gauges=tuple(gauges))
        return Result.ok(f"{len(settings.groups)} consumer groups within limits", gauges=tuple(gauges))

    def _judge(self, group: str, lags: dict[TopicPartition, Observation], problems: list[str]) -> list[Gauge]:
        now = time.monotonic()
        statuses = [self._observe(group, partition, observation, now) for partition, observation in lags.items()]
        status = max(statuses, default=Status.OK)
        total = sum(observation.lag for observation in lags.values())
        gauges = [
            Gauge("kafka_consumer_lag", observation.lag, "Messages behind the end offset, per group and partition.",
                  (("group", group), ("topic", partition.topic), ("partition", str(partition.partition))))
            for partition, observation in lags.items()
        ]
        gauges += [
            Gauge("kafka_consumer_group_lag", total, "Total lag of a consumer group over its topics.", (("group", group),)),
            Gauge("kafka_consumer_group_status", int(status),
                  "Burrow-style group status: 0 OK, 1 WARN, 2 STALL, 3 STOP.", (("group", group),)),
        ]
        if self.settings.max_lag is not None and total > self.settings.max_lag:
            problems.append(f"group {group} lag {total} is above max_lag {self.settings.max_lag}")
        if status >= Status.STALL:
            problems.append(f"group {group} is {status.name}: {_explain(status, self.settings)} (lag {total})")
        return gauges

    def _observe(self, group: str, partition: TopicPartition, observation: Observation, now: float) -> Status:
        key = (group, partition.topic, partition.partition)
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = PartitionHistory.start(self.settings.window, now)
        history.observe(observation, now)
        return partition_status(history, self.settings.window, now, self.settings.stop_after)


async def _read_lags(consumer: AIOKafkaConsumer, group: ConsumerGroup) -> dict[TopicPartition, Observation] | Result:
    """Committed and end offsets of every partition of the group's topics, read without joining the group."""
    available = await consumer.topics()
    missing = [topic for topic in group.topics if topic not in available]
    if missing:
        return Result.fail("assertion", f"group {group.name}: topics missing from the cluster: {', '.join(missing)}")
    partitions = [
        TopicPartition(topic, number)
        for topic in group.topics
        for number in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    ends = await consumer.end_offsets(partitions)
    committed = {partition: await consumer.committed(partition) for partition in partitions}
    never = [partition for partition, offset in committed.items() if offset is None]
    starts = await consumer.beginning_offsets(never) if never else {}
    observations: dict[TopicPartition, Observation] = {}
    for partition in partitions:
        offset = committed[partition]
        consumed_to = offset if offset is not None else starts[partition]
        observations[partition] = Observation(offset, max(0, ends[partition] - consumed_to))
    return observations


def _explain(status: Status, settings: KafkaLagSettings) -> str:
    if status is Status.STOP:
        return f"no commits for over {settings.stop_after:g}s while lag is non-zero"
    return f"committed offsets did not move over the last {settings.window} observations while lag is non-zero"
