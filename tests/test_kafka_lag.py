"""`kafka_lag` and `kafka_dlq` against a real broker (tansu): real consumer groups commit, then stop committing while
producing goes on, driving the Burrow-style status OK → WARN → STALL (and STOP after `stop_after`); lag thresholds;
the age of the oldest unconsumed message, from records produced with hour-old timestamps; dead-letter growth. Every
record is produced in its own request, so offsets are exact on tansu too. What tansu cannot do (retention, a broker
that takes a Fetch and never answers) comes from tests/kafka_proxy.py in front of it."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes.kafka_dlq import KafkaDlqProbe, KafkaDlqSettings
from probes.kafka_lag import KafkaLagProbe, KafkaLagSettings, Observation, PartitionHistory, Status, partition_status
from tests.conftest import free_port, wait_for, write_config
from tests.kafka_broker import Broker, create_topics, produce
from tests.kafka_proxy import FETCH, KafkaProxy
from tests.running_daemon import RunningDaemon, figure, runs

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
async def committer_factory_at() -> AsyncIterator[Any]:
    consumers: list[AIOKafkaConsumer] = []

    async def make(bootstrap: str, group: str, topic: str, partitions: int = 1) -> Committer:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
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


@pytest.fixture
def committer_factory(kafka_broker: Broker, committer_factory_at: Any) -> Any:
    async def make(group: str, topic: str, partitions: int = 1) -> Committer:
        return await committer_factory_at(kafka_broker.bootstrap, group, topic, partitions)

    return make


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


def saved_partition(group: str, last_moved: float, window: list[tuple[int | None, int]], topic: str = "work",
                    partition: int = 0) -> dict[str, Any]:
    return {"group": group, "topic": topic, "partition": partition, "last_moved": last_moved,
            "window": [{"committed": committed, "lag": lag} for committed, lag in window]}


def test_windows_restore_into_the_groups_still_configured_cut_to_the_new_window() -> None:
    probe = lag_probe("127.0.0.1:9092", [{"name": "workers", "topics": ["work"]}], window=3, stop_after="1h")
    stalled = [(10, 1), (10, 2), (10, 3), (10, 4)]
    probe.restore_state({"partitions": [
        saved_partition("workers", time.time() - 120, stalled),
        saved_partition("gone", time.time(), stalled),               # a group no longer configured
        saved_partition("workers", time.time(), stalled, topic="other"),  # a topic the group no longer reads
    ]})
    exported = probe.export_state()["partitions"]
    assert [(p["group"], p["topic"], p["partition"]) for p in exported] == [("workers", "work", 0)]
    assert [o["lag"] for o in exported[0]["window"]] == [2, 3, 4]  # the newest 3, for window = 3
    assert exported[0]["last_moved"] == pytest.approx(time.time() - 120, abs=5)  # wall time, round trip
    history = probe._history[("workers", "work", 0)]
    assert partition_status(history, 3, time.monotonic(), 3600) is Status.STALL
    assert probe.state_key() == "127.0.0.1:9092"


@pytest.mark.parametrize("state", [
    pytest.param({"partitions": [saved_partition("workers", 1.0, [(10, -1)])]}, id="a-negative-lag"),
    pytest.param({"partitions": [saved_partition("workers", 1.0, [(10, 1)], partition=-1)]}, id="a-negative-partition"),
    pytest.param({"partitions": [saved_partition("workers", 1.0, [(10.5, 1)])]}, id="a-fractional-offset"),
    pytest.param({"partitions": [saved_partition("workers", float("nan"), [(10, 1)])]}, id="nan"),
    pytest.param({"partitions": [saved_partition("workers", 1.0, [(10, 1)] * 101)]}, id="a-window-too-long"),
    pytest.param({"partitions": [saved_partition("workers", 1.0, [])]}, id="an-empty-window"),
    pytest.param({"partitions": "all"}, id="not-a-list"),
])
def test_corrupt_or_hostile_windows_are_refused_and_change_nothing(state: dict[str, Any]) -> None:
    probe = lag_probe("127.0.0.1:9092", [{"name": "workers", "topics": ["work"]}])
    with pytest.raises(ValueError):
        probe.restore_state(state)
    assert probe.export_state() == {}


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
    assert set(results[-1].phases) == {"connect", "offsets", "timestamps"}

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


async def _stalled_group(bootstrap: str, topic: str, group: str) -> None:
    """A group that committed offset 1 of 3 records and then stopped: lag 2 that never moves."""
    await create_topics(bootstrap, topic)
    await produce(bootstrap, topic, 3)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                request_timeout_ms=5000)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): 1})
    finally:
        await consumer.stop()


def lag_config(bootstrap: str, group: str, topic: str, window: int, interval: str = "2s") -> str:
    return f"""
        [daemon]
        jitter = "200ms"
        shutdown_grace = "3s"

        [[probes]]
        name = "lag"
        type = "kafka_lag"
        channel = "kafka"
        interval = "{interval}"
        timeout = "2s"
        bootstrap_servers = "{bootstrap}"
        window = {window}
        max_lag = 1000
        groups = [{{ name = "{group}", topics = ["{topic}"] }}]
    """


def test_a_stall_that_needs_a_full_window_is_not_reset_by_an_interval_reload_or_a_restart(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """STALL needs `window` observations. Reloaded (interval only) after half of them, the probe reaches it in the
    other half; a probe that started afresh would need the whole window again. After a restart it is STALL at once."""
    window = 6
    topic, group = name("work"), name("fte-stuck")
    asyncio.run(_stalled_group(kafka_broker.bootstrap, topic, group))

    def status() -> float | None:
        return figure(daemon.base, "canary_probe_kafka_consumer_group_status", "lag", group=group)

    config = write_config(tmp_path, lag_config(kafka_broker.bootstrap, group, topic, window))
    with RunningDaemon(config, tmp_path / "state") as daemon:
        wait_for(lambda: runs(daemon.base, "lag") >= window // 2, timeout=60, what="half a window of runs")
        assert status() == Status.OK  # not a full window yet

        daemon.reload(lag_config(kafka_broker.bootstrap, group, topic, window, interval="3s"))
        wait_for(lambda: status() == Status.STALL, timeout=60, what="STALL")
        assert 0 < runs(daemon.base, "lag") < window  # runs since the reload: fewer than a fresh window needs
        assert figure(daemon.base, "canary_probe_success", "lag") == 0

        assert daemon.stop() == 0
        restarted = time.time()
        daemon.start()
        daemon.wait_for_run_after("lag", restarted, timeout=30)
        assert status() == Status.STALL
        assert runs(daemon.base, "lag") < window
        assert "WARNING" not in daemon.output()


# --- lag in seconds ---------------------------------------------------------------------------------------------

HOUR = 3600.0


async def produce_aged(bootstrap: str, topic: str, ages: list[float], partition: int = 0) -> None:
    """One record per age (seconds before now), each in its own request, timestamped that long ago (CreateTime)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await producer.start()
    try:
        for age in ages:
            await producer.send_and_wait(topic, b"customer message", partition=partition,
                                         timestamp_ms=round((time.time() - age) * 1000))
    finally:
        await producer.stop()


def age_of(result: Result, group: str) -> float:
    return figures(result)[("kafka_consumer_group_lag_seconds", (("group", group),))]


async def test_lag_seconds_is_the_age_of_the_oldest_unconsumed_message(
    kafka_broker: Broker, committer_factory: Any
) -> None:
    topic, late, behind, caught_up = name("tickets"), name("fte-workers"), name("fte-audit"), name("fte-processor")
    await create_topics(kafka_broker.bootstrap, topic, partitions=2)
    workers = await committer_factory(late, topic, partitions=2)
    auditor = await committer_factory(behind, topic, partitions=2)
    processor = await committer_factory(caught_up, topic, partitions=2)
    await workers.commit(topic, 0, partition=0)        # committed before any of the messages below
    await workers.commit(topic, 0, partition=1)
    await produce_aged(kafka_broker.bootstrap, topic, [HOUR, HOUR - 60, HOUR - 120], partition=0)
    await produce_aged(kafka_broker.bootstrap, topic, [HOUR - 600], partition=1)
    await auditor.commit(topic, 2, partition=0)        # the same partitions, further on: its own age
    await processor.commit(topic, 3, partition=0)      # this group has consumed everything
    await processor.commit(topic, 1, partition=1)
    probe = lag_probe(kafka_broker.bootstrap, [{"name": late, "topics": [topic]}, {"name": behind, "topics": [topic]},
                                               {"name": caught_up, "topics": [topic]}], max_lag=None)

    waiting = await run(probe)
    assert waiting.reason == "ok", waiting.message
    assert HOUR <= age_of(waiting, late) < HOUR + 60   # the oldest of both partitions' first unconsumed records
    assert HOUR - 120 <= age_of(waiting, behind) < HOUR - 60
    assert age_of(waiting, caught_up) == 0
    assert "timestamps" in waiting.phases

    await workers.commit(topic, 1, partition=0)        # the hour-old message is consumed: the next one is the oldest
    assert HOUR - 60 <= age_of(await run(probe), late) < HOUR
    await workers.commit(topic, 3, partition=0)        # partition 0 caught up: partition 1's message is left
    assert HOUR - 600 <= age_of(await run(probe), late) < HOUR - 540
    await workers.commit(topic, 1, partition=1)
    await auditor.commit(topic, 3, partition=0)
    await auditor.commit(topic, 1, partition=1)
    none_left = await run(probe)
    assert age_of(none_left, late) == 0 and none_left.reason == "ok"
    assert "timestamps" not in none_left.phases        # no lag, no fetch
    # Reading timestamps never moved the groups' offsets.
    assert await workers.consumer.committed(TopicPartition(topic, 0)) == 3
    assert await processor.consumer.committed(TopicPartition(topic, 0)) == 3


async def test_lag_seconds_above_max_lag_age_fails_and_a_never_committed_group_counts_from_the_beginning(
    kafka_broker: Broker
) -> None:
    topic, group = name("tickets"), name("new-group")
    await create_topics(kafka_broker.bootstrap, topic)
    await produce_aged(kafka_broker.bootstrap, topic, [120, 90])
    probe = lag_probe(kafka_broker.bootstrap, [{"name": group, "topics": [topic]}], max_lag_age="1m")
    result = await run(probe)
    assert result.reason == "threshold"
    assert result.message.startswith(f"group {group}: the oldest unconsumed message has waited 12")
    assert result.message.endswith("s, above max_lag_age 60s")
    assert 120 <= age_of(result, group) < 180
    relaxed = await run(lag_probe(kafka_broker.bootstrap, [{"name": group, "topics": [topic]}], max_lag_age="5m"))
    assert relaxed.reason == "ok", relaxed.message


async def test_a_committed_offset_deleted_by_retention_is_aged_from_the_earliest_retained_record(
    proxied_kafka_broker: tuple[Broker, KafkaProxy], committer_factory_at: Any
) -> None:
    broker, proxy = proxied_kafka_broker
    topic, group = name("tickets"), name("fte-workers")
    await create_topics(broker.bootstrap, topic)
    await produce_aged(broker.bootstrap, topic, [HOUR, HOUR - 60, HOUR - 120, HOUR - 180, HOUR - 240])
    committer = await committer_factory_at(broker.bootstrap, group, topic)
    await committer.commit(topic, 1)
    proxy.faults.log_start[(topic, 0)] = 3             # retention deleted offsets 0-2, the committed one among them
    result = await run(lag_probe(broker.bootstrap, [{"name": group, "topics": [topic]}], max_lag=None))
    assert result.reason == "ok", result.message
    assert HOUR - 180 <= age_of(result, group) < HOUR - 120  # offset 3's age, not offset 1's (HOUR - 60)
    assert result.message == (
        f"1 consumer groups within limits; group {group}: committed offset 1 of {topic} partition 0 was deleted by "
        "retention; its wait is measured from the earliest retained record (offset 3), so it is longer than shown"
    )
    assert figures(result)[("kafka_consumer_group_lag", (("group", group),))] == 4


async def test_the_first_record_fetch_is_one_fetch_bounded_inside_the_probe_timeout(
    proxied_kafka_broker: tuple[Broker, KafkaProxy], committer_factory_at: Any
) -> None:
    broker, proxy = proxied_kafka_broker
    topic, group = name("tickets"), name("fte-workers")
    await create_topics(broker.bootstrap, topic, partitions=2)
    await produce_aged(broker.bootstrap, topic, [60] * 50, partition=0)
    await produce_aged(broker.bootstrap, topic, [30] * 50, partition=1)
    committer = await committer_factory_at(broker.bootstrap, group, topic, partitions=2)
    await committer.commit(topic, 0, partition=0)
    await committer.commit(topic, 0, partition=1)
    probe = lag_probe(broker.bootstrap, [{"name": group, "topics": [topic]}], max_lag=None, timeout="2s")

    answered = await run(probe)
    assert answered.reason == "ok", answered.message
    assert 60 <= age_of(answered, group) < 120
    # 100 messages wait, and the probe read the first of each partition: no more fetches than lagging partitions.
    assert 1 <= proxy.faults.seen.get(FETCH, 0) <= 2

    proxy.faults.silent_fetch = True                   # the broker now takes a Fetch and never answers it
    # Run as the daemon would, under the probe's own 2 s timeout: the probe gives up its fetches first and reports.
    silent = await run_once(probe, 2.0, Scrubber([]))
    assert silent.reason == "timeout"
    assert silent.message.startswith(f"group {group}: no timestamped record read from {topic} partition ")
    assert "within the 1.5s fetch budget" in silent.message  # the probe's own deadline, not the runner's timeout
    values = figures(silent)
    assert values[("kafka_consumer_group_lag", (("group", group),))] == 100  # offsets are still reported
    assert ("kafka_consumer_group_lag_seconds", (("group", group),)) not in values  # no age rather than a wrong one


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
