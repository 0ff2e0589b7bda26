"""`kafka_lag` and `kafka_dlq` against a real broker (tansu): real consumer groups commit, then stop committing while
producing goes on, driving the Burrow-style status OK → WARN → STALL (and STOP after `stop_after`); lag thresholds;
dead-letter growth. Every record is produced in its own request, so offsets are exact on tansu too."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes.kafka_dlq import KafkaDlqProbe, KafkaDlqSettings
from probes.kafka_lag import KafkaLagProbe, KafkaLagSettings, Observation, PartitionHistory, Status, partition_status
from tests.conftest import free_port
from tests.kafka_broker import Broker, create_topics, produce

RUN_TIMEOUT = 5.0


def lag_probe(bootstrap: str, groups: list[dict[str, Any]], **extra: Any) -> KafkaLagProbe:
    settings = KafkaLagSettings.model_validate(
        {"name": "lag", "type": "kafka_lag", "channel": "kafka", "timeout": "4s", "bootstrap_servers": bootstrap,
         "groups": groups, **extra}
    )
    return KafkaLagProbe(settings)


def dlq_probe(bootstrap: str, topics: list[str], **extra: Any) -> KafkaDlqProbe:
    settings = KafkaDlqSettings.model_validate(
        {"name": "dlq", "type": "kafka_dlq", "channel": "kafka", "timeout": "4s", "bootstrap_servers": bootstrap,
         "topics": topics, **extra}
    )
    return KafkaDlqProbe(settings)


async def run(probe: KafkaLagProbe | KafkaDlqProbe) -> Result:
    return await run_once(probe, RUN_TIMEOUT, Scrubber(probe.settings.secret_values()))


def figures(result: Result) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(gauge.name, gauge.labels): gauge.value for gauge in result.gauges}


def status_of(result: Result, group: str) -> int:
    return int(figures(result)[("kafka_consumer_group_status", (("group", group),))])


def name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class Committer:
    """A real member of a consumer group committing offsets by hand (manual assignment, no rebalances)."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer

    async def commit(self, topic: str, offset: int, partition: int = 0) -> None:
        await self.consumer.commit({TopicPartition(topic, partition): offset})


@pytest.fixture
async def committer_factory(kafka_broker: Broker) -> AsyncIterator[Any]:
    consumers: list[AIOKafkaConsumer] = []

    async def make(group: str, topic: str, partitions: int = 1) -> Committer:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=group,
                                    enable_auto_commit=False, request_timeout_ms=5000)
        consumers.append(consumer)
        await consumer.start()
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        return Committer(consumer)

    try:
        yield make
    finally:
        for consumer in consumers:
            await consumer.stop()


# --- the status rule, alone (no broker) ------------------------------------------------------------------------

WINDOW, STOP_AFTER, EVERY = 5, 600.0, 30.0  # the defaults, with a run every 30 s


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        # 1. lag 0 now → OK, however long the committed offset has stood still (nothing to consume)
        pytest.param([(10, 0)] * 30, Status.OK, id="ok-lag-zero-now"),
        # 2. lag > 0 and no progress (a commit, or being caught up) for longer than stop_after → STOP
        pytest.param([(10, 3)] * 22, Status.STOP, id="stop-no-commit-for-630s"),
        pytest.param([(10, 0)] * 5 + [(10, 1)] * 22, Status.STOP, id="stop-630s-after-last-caught-up"),
        # 3. the window not yet full, or a zero lag in it → OK
        pytest.param([(10, 3), (10, 4)], Status.OK, id="ok-window-not-full"),
        pytest.param([(10, 0), (10, 1), (10, 2), (10, 3), (10, 4)], Status.OK, id="ok-zero-lag-in-window"),
        # 4. committed offset unchanged across the full window, lag > 0 → STALL
        pytest.param([(10, 1), (10, 2), (10, 3), (10, 4), (10, 5)], Status.STALL, id="stall"),
        # 5. commits move, but lag never falls and ends higher → WARN
        pytest.param([(10, 1), (11, 2), (12, 2), (13, 3), (14, 4)], Status.WARN, id="warn-falling-behind"),
        # 6. otherwise → OK
        pytest.param([(10, 4), (12, 5), (15, 3), (16, 4), (17, 5)], Status.OK, id="ok-lag-fell-once"),
        pytest.param([(10, 3), (11, 3), (12, 3), (13, 3), (14, 3)], Status.OK, id="ok-lag-steady"),
        # Regression (Burrow PR #338): caught up for an hour (no commits: nothing came), then one new message.
        pytest.param([(10, 0)] * 120 + [(10, 1)], Status.OK, id="ok-one-message-after-120-runs-caught-up"),
    ],
)
def test_partition_status_follows_burrows_rules_in_order(observations: list[tuple[int, int]], expected: Status) -> None:
    history = PartitionHistory.start(WINDOW, 0.0)
    for index, (committed, lag) in enumerate(observations):
        history.observe(Observation(committed, lag), index * EVERY)
    now = (len(observations) - 1) * EVERY
    assert partition_status(history, WINDOW, now, STOP_AFTER) is expected


# --- consumer lag -----------------------------------------------------------------------------------------------


async def test_status_goes_ok_warn_stall_as_the_consumer_falls_behind_then_stops(
    kafka_broker: Broker, committer_factory: Any
) -> None:
    topic, group = name("work"), name("fte-workers")
    await create_topics(kafka_broker.bootstrap, topic)
    committer = await committer_factory(group, topic)
    probe = lag_probe(kafka_broker.bootstrap, [{"name": group, "topics": [topic]}], window=3, stop_after="1h",
                      max_lag=None)

    await produce(kafka_broker.bootstrap, topic, 2)
    await committer.commit(topic, 2)
    results = [await run(probe)]                       # lag 0
    committed = 2
    for _ in range(3):                                 # the consumer commits, but slower than messages arrive
        await produce(kafka_broker.bootstrap, topic, 3)
        committed += 1
        await committer.commit(topic, committed)
        results.append(await run(probe))               # lag 2, 4, 6
    for _ in range(2):                                 # the consumer stops committing; producing goes on
        await produce(kafka_broker.bootstrap, topic, 3)
        results.append(await run(probe))               # lag 9, 12

    lags = [figures(r)[("kafka_consumer_group_lag", (("group", group),))] for r in results]
    assert lags == [0, 2, 4, 6, 9, 12]
    assert [status_of(r, group) for r in results] == [Status.OK] * 3 + [Status.WARN] * 2 + [Status.STALL]
    assert [r.reason for r in results] == ["ok"] * 5 + ["threshold"]  # WARN is exported, STALL fails
    assert results[-1].message == (
        f"group {group} is STALL: committed offsets did not move over the last 3 observations while lag is "
        f"non-zero (lag 12)"
    )
    per_partition = ("kafka_consumer_lag", (("group", group), ("topic", topic), ("partition", "0")))
    assert figures(results[-1])[per_partition] == 12
    assert set(results[-1].phases) == {"connect", "offsets"}

    await committer.commit(topic, 17)                  # the consumer catches up: OK again at once
    recovered = await run(probe)
    assert (recovered.reason, status_of(recovered, group)) == ("ok", Status.OK)


async def test_no_commits_for_longer_than_stop_after_is_stop(kafka_broker: Broker, committer_factory: Any) -> None:
    topic, group = name("work"), name("fte-message-processor")
    await create_topics(kafka_broker.bootstrap, topic)
    committer = await committer_factory(group, topic)
    await produce(kafka_broker.bootstrap, topic, 3)
    await committer.commit(topic, 1)
    probe = lag_probe(kafka_broker.bootstrap, [{"name": group, "topics": [topic]}], stop_after="1s")
    first = await run(probe)
    assert (first.reason, status_of(first, group)) == ("ok", Status.OK)
    await asyncio.sleep(1.2)
    stopped = await run(probe)
    assert (stopped.reason, status_of(stopped, group)) == ("threshold", Status.STOP)
    assert stopped.message == f"group {group} is STOP: no commits for over 1s while lag is non-zero (lag 2)"


async def test_total_lag_above_max_lag_fails_and_reading_does_not_move_offsets(
    kafka_broker: Broker, committer_factory: Any
) -> None:
    topic, idle_topic, group, other = name("work"), name("idle"), name("workers"), name("healthy")
    await create_topics(kafka_broker.bootstrap, topic, partitions=2)
    await create_topics(kafka_broker.bootstrap, idle_topic)
    committer = await committer_factory(group, topic, partitions=2)
    await produce(kafka_broker.bootstrap, topic, 2, partition=0)
    await produce(kafka_broker.bootstrap, topic, 3, partition=1)
    await committer.commit(topic, 1, partition=0)      # partition 1 never committed: all 3 retained count
    probe = lag_probe(kafka_broker.bootstrap, [{"name": group, "topics": [topic]},
                                               {"name": other, "topics": [idle_topic]}], max_lag=3)
    result = await run(probe)
    assert result.reason == "threshold"
    assert result.message == f"group {group} lag 4 is above max_lag 3"
    values = figures(result)
    assert values[("kafka_consumer_lag", (("group", group), ("topic", topic), ("partition", "0")))] == 1
    assert values[("kafka_consumer_lag", (("group", group), ("topic", topic), ("partition", "1")))] == 3
    assert values[("kafka_consumer_group_lag", (("group", group),))] == 4
    assert values[("kafka_consumer_group_lag", (("group", other),))] == 0
    # The probe only read: the group's committed offsets are exactly what its real member committed.
    assert await committer.consumer.committed(TopicPartition(topic, 0)) == 1
    assert await committer.consumer.committed(TopicPartition(topic, 1)) is None
    assert (await run(lag_probe(kafka_broker.bootstrap, [{"name": group, "topics": [topic]}], max_lag=4))).reason == "ok"


async def test_missing_group_topic_fails(kafka_broker: Broker) -> None:
    missing = name("nope")
    result = await run(lag_probe(kafka_broker.bootstrap, [{"name": "g", "topics": [missing]}]))
    assert (result.reason, result.message) == ("assertion", f"group g: topics missing from the cluster: {missing}")


async def test_lag_unreachable_broker_fails_with_connect() -> None:
    result = await run(lag_probe(f"127.0.0.1:{free_port()}", [{"name": "g", "topics": ["t"]}]))
    assert result.reason == "connect"
    assert result.message.startswith("broker unreachable during connect")


# --- dead-letter depth ------------------------------------------------------------------------------------------


async def test_dlq_growth_fails_once_and_no_growth_passes(kafka_broker: Broker) -> None:
    dlq = name("tickets-dlq")
    await create_topics(kafka_broker.bootstrap, dlq, partitions=2)
    probe = dlq_probe(kafka_broker.bootstrap, [dlq])
    depth_key, growth_key = ("kafka_dlq_depth", (("topic", dlq),)), ("kafka_dlq_growth", (("topic", dlq),))

    baseline = await run(probe)
    assert baseline.reason == "ok", baseline.message
    assert figures(baseline) == {depth_key: 0}         # no growth figure before there is a baseline

    await produce(kafka_broker.bootstrap, dlq, 1, partition=0)
    await produce(kafka_broker.bootstrap, dlq, 1, partition=1)
    grown = await run(probe)
    assert grown.reason == "threshold"
    assert grown.message == (f"2 new messages in dead-letter topic {dlq} since the last run "
                             f"(at most 0 allowed; depth now 2)")
    assert figures(grown) == {depth_key: 2, growth_key: 2}

    steady = await run(probe)
    assert steady.reason == "ok", steady.message
    assert figures(steady) == {depth_key: 2, growth_key: 0}


async def test_dlq_max_depth_and_missing_topic(kafka_broker: Broker) -> None:
    dlq, missing = name("dlq"), name("nope")
    await create_topics(kafka_broker.bootstrap, dlq)
    await produce(kafka_broker.bootstrap, dlq, 2)
    deep = await run(dlq_probe(kafka_broker.bootstrap, [dlq], max_depth=1))
    assert (deep.reason, deep.message) == ("threshold", f"dead-letter topic {dlq} holds 2 messages, above max_depth 1")
    absent = await run(dlq_probe(kafka_broker.bootstrap, [missing]))
    assert (absent.reason, absent.message) == ("assertion", f"dead-letter topics missing from the cluster: {missing}")
