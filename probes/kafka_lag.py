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

The windows outlive a reload and a restart (state key: the bootstrap servers; a group or topic no longer configured
drops its windows), with each partition's last progress stored as wall-clock time.

A group's status is its worst partition's, exported as `kafka_consumer_group_status{group}` with the numeric codes
above. STALL and STOP fail the probe (reason `threshold`); WARN is exported but passes. A group's total lag above
`max_lag` also fails (`threshold`; the runbooks alert at 100).

Offsets say how many messages wait, not how long customers have waited. So each run also reads, per lagging
partition, the first unconsumed record (one fetch at the committed offset) and exports the age of the oldest of them,
now − its timestamp, as `kafka_consumer_group_lag_seconds{group}` (0 without lag): measured, where
kafka-lag-exporter interpolates it from offset rates. A partition never committed, or whose committed offset
retention already deleted, is read from its earliest retained record (then the true wait is longer; the message says
so). The fetches go through a consumer of no group, so reading never moves the group's offsets, and give up at a
deadline inside the probe's timeout: a partition not read by then fails the run with `timeout`, and its group exports
no age rather than a wrong one. Above `max_lag_age` (off by default) the run fails with `threshold`. Ages compare
a record's timestamp (CreateTime, the producer's clock, or LogAppendTime, the broker's) with this host's clock,
so they are as right as the clocks are in sync; a timestamp in the future counts as 0.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import pairwise
from contextlib import AsyncExitStack
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

from canary.contract import Duration, Gauge, PhaseTimer, Probe, Result, spelled
from probes.kafka_common import (DEFAULT_TIMEOUT, KAFKA_LIBRARIES, KafkaSettings, TopicName, kafka_error_result,
                                 start_consumer)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, TopicPartition

FETCH_SHARE = 0.75  # of the probe's timeout: the first-record fetches give up then, so the run still reports
FETCH_WAIT = 0.5  # seconds one poll for first records waits before positions are looked at again
FETCH_POLLS = 200  # at most this many polls per group, whatever the deadline
FETCH_PARTITION_BYTES = 64 * 1024  # one batch is enough: the broker still sends a first batch larger than this


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
    max_lag_age: Duration | None = None
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


@dataclass(frozen=True, slots=True)
class Unconsumed:
    """Where a lagging partition's first unconsumed record is read: its offset, the end offset the lag was counted
    to, and the committed offset when retention had already deleted it (the read then starts at the earliest retained
    record)."""

    offset: int
    end: int
    deleted: int | None = None


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


class _SavedObservation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    committed: int | None
    lag: int = Field(ge=0)


class _SavedPartition(BaseModel):
    """One partition's window as exported, oldest first, and when it last made progress (Unix seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    group: str
    topic: str
    partition: int = Field(ge=0)
    last_moved: FiniteFloat
    window: list[_SavedObservation] = Field(min_length=1, max_length=100)


class _SavedWindows(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    partitions: list[_SavedPartition]


class KafkaLagProbe(Probe[KafkaLagSettings]):
    settings_model = KafkaLagSettings
    reasons = ("connect", "timeout", "auth", "tls", "status", "assertion", "threshold")
    figure_labels = frozenset({"group", "topic", "partition"})
    libraries = KAFKA_LIBRARIES

    def __init__(self, settings: KafkaLagSettings) -> None:
        super().__init__(settings)
        self._history: dict[tuple[str, str, int], PartitionHistory] = {}

    def state_key(self) -> str:
        return ",".join(sorted(self.settings.servers()))

    def export_state(self) -> dict[str, Any]:
        if not self._history:
            return {}
        wall_offset = time.time() - time.monotonic()
        partitions = [
            {"group": group, "topic": topic, "partition": number, "last_moved": history.last_moved + wall_offset,
             "window": [{"committed": o.committed, "lag": o.lag} for o in history.window]}
            for (group, topic, number), history in self._history.items()
        ]
        return {"partitions": partitions}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        saved = _SavedWindows.model_validate(state)
        wanted = {(group.name, topic) for group in self.settings.groups for topic in group.topics}
        now, wall_now = time.monotonic(), time.time()
        history: dict[tuple[str, str, int], PartitionHistory] = {}
        for entry in saved.partitions:
            if (entry.group, entry.topic) not in wanted:
                continue
            restored = PartitionHistory.start(self.settings.window, now - max(wall_now - entry.last_moved, 0.0))
            restored.window.extend(Observation(o.committed, o.lag) for o in entry.window)
            history[(entry.group, entry.topic, entry.partition)] = restored
        self._history = history

    async def run(self, timer: PhaseTimer) -> Result:
        from probes.kafka_common import KAFKA_ERRORS

        settings = self.settings
        deadline = time.monotonic() + FETCH_SHARE * (settings.timeout or DEFAULT_TIMEOUT)
        gauges: list[Gauge] = []
        problems: list[str] = []
        unread: list[str] = []
        notes: list[str] = []
        fetcher: AIOKafkaConsumer | None = None
        try:
            async with AsyncExitStack() as run_stack:
                for group in settings.groups:
                    async with AsyncExitStack() as stack:
                        with timer.phase("connect"):
                            consumer = await start_consumer(stack, settings, group_id=group.name)
                        with timer.phase("offsets"):
                            lags = await _read_lags(consumer, group)
                            if isinstance(lags, Result):
                                return lags
                            unconsumed = await _first_unconsumed(consumer, lags)
                    ages: dict[TopicPartition, float] = {}
                    if unconsumed:
                        with timer.phase("timestamps"):
                            if fetcher is None:
                                fetcher = await start_consumer(
                                    run_stack, settings, group_id=None, auto_offset_reset="earliest",
                                    max_partition_fetch_bytes=FETCH_PARTITION_BYTES,
                                )
                            ages = await _read_ages(fetcher, unconsumed, deadline)
                    gauges += self._judge(group.name, lags, problems)
                    gauges += self._judge_age(group.name, unconsumed, ages, problems, unread, notes)
        except KAFKA_ERRORS as exc:
            return kafka_error_result(exc, timer.current or "the run")
        if problems:
            return Result.fail("threshold", "; ".join(problems + unread + notes), gauges=tuple(gauges))
        if unread:
            return Result.fail("timeout", "; ".join(unread + notes), gauges=tuple(gauges))
        message = "; ".join([f"{len(settings.groups)} consumer groups within limits", *notes])
        return Result.ok(message, gauges=tuple(gauges))

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

    def _judge_age(
        self, group: str, unconsumed: dict[TopicPartition, Unconsumed], ages: dict[TopicPartition, float],
        problems: list[str], unread: list[str], notes: list[str],
    ) -> list[Gauge]:
        """The group's time lag: the oldest first-unconsumed record over its lagging partitions (0 without lag)."""
        for partition, where in unconsumed.items():
            if where.deleted is not None:
                notes.append(f"group {group}: committed offset {where.deleted} of {partition.topic} partition "
                             f"{partition.partition} was deleted by retention; its wait is measured from the earliest "
                             f"retained record (offset {where.offset}), so it is longer than shown")
        missing = [partition for partition in unconsumed if partition not in ages]
        if missing:
            budget = FETCH_SHARE * (self.settings.timeout or DEFAULT_TIMEOUT)
            unread += [f"group {group}: no timestamped record read from {partition.topic} partition "
                       f"{partition.partition} at offset {unconsumed[partition].offset} within the {budget:g}s "
                       "fetch budget"
                       for partition in missing]
            return []
        age = max(ages.values(), default=0.0)
        limit = self.settings.max_lag_age
        if limit is not None and age > limit:
            problems.append(f"group {group}: the oldest unconsumed message has waited {age:.0f}s, above max_lag_age "
                            f"{limit:g}s")
        return [Gauge("kafka_consumer_group_lag_seconds", age,
                      "Age of the group's oldest unconsumed message: now minus the timestamp of the first record after "
                      "the committed offset, the oldest over the lagging partitions; 0 without lag.",
                      (("group", group),))]

    def _observe(self, group: str, partition: TopicPartition, observation: Observation, now: float) -> Status:
        key = (group, partition.topic, partition.partition)
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = PartitionHistory.start(self.settings.window, now)
        history.observe(observation, now)
        return partition_status(history, self.settings.window, now, self.settings.stop_after)


async def _read_lags(consumer: AIOKafkaConsumer, group: ConsumerGroup) -> dict[TopicPartition, Observation] | Result:
    """Committed and end offsets of every partition of the group's topics, read without joining the group."""
    from aiokafka import TopicPartition

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


async def _first_unconsumed(
    consumer: AIOKafkaConsumer, lags: dict[TopicPartition, Observation]
) -> dict[TopicPartition, Unconsumed]:
    """Where each lagging partition's first unconsumed record is: at the committed offset, or at the earliest retained
    record when the group never committed or retention deleted what it committed to."""
    lagging = [partition for partition, observation in lags.items() if observation.lag > 0]
    if not lagging:
        return {}
    starts = await consumer.beginning_offsets(lagging)
    unconsumed: dict[TopicPartition, Unconsumed] = {}
    for partition in lagging:
        committed, start, lag = lags[partition].committed, starts[partition], lags[partition].lag
        if committed is None:
            unconsumed[partition] = Unconsumed(start, start + lag)
        elif committed < start:
            unconsumed[partition] = Unconsumed(start, committed + lag, deleted=committed)
        else:
            unconsumed[partition] = Unconsumed(committed, committed + lag)
    return unconsumed


async def _read_ages(
    consumer: AIOKafkaConsumer, unconsumed: dict[TopicPartition, Unconsumed], deadline: float
) -> dict[TopicPartition, float]:
    """Seconds since the timestamp of the record at each partition's offset: one fetch per partition (paused once it
    answered), not a consume loop. 0 where only transaction markers were left before the end offset; absent where no
    record with a timestamp came before `deadline` (monotonic)."""
    consumer.assign(list(unconsumed))
    for partition, where in unconsumed.items():
        consumer.seek(partition, where.offset)
    ages: dict[TopicPartition, float] = {}
    pending = set(unconsumed)
    for _ in range(FETCH_POLLS):
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        batches = await consumer.getmany(*pending, timeout_ms=max(1, round(min(left, FETCH_WAIT) * 1000)))
        now = time.time()
        for partition, records in batches.items():
            if partition in pending and records:
                pending.discard(partition)
                consumer.pause(partition)
                if records[0].timestamp >= 0:  # -1: a message format without timestamps
                    ages[partition] = max(0.0, now - records[0].timestamp / 1000)
        for partition in sorted(pending):
            if await consumer.position(partition) >= unconsumed[partition].end:
                pending.discard(partition)  # skipped control batches up to the end: nothing is waiting
                ages[partition] = 0.0
    return ages


def _explain(status: Status, settings: KafkaLagSettings) -> str:
    if status is Status.STOP:
        return f"no commits for over {settings.stop_after:g}s while lag is non-zero"
    return f"committed offsets did not move over the last {settings.window} observations while lag is non-zero"
