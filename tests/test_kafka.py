"""The `kafka` probe against a real Kafka-protocol broker (tansu) on 127.0.0.1: round trip with its phases and
figures, a missing topic, the canary topic created when missing (sized from the cluster; refused by ACLs or raced by
another canary through tests/kafka_proxy.py, as tansu has no ACLs), an unreachable broker, SASL settings validated at
load, and a broker killed mid-life and restarted on the same port — the same probe instance recovers without being
rebuilt."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from canary.config import load_config
from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.kafka import KafkaProbe, KafkaRoundTripSettings, canary_topic_for
from tests.conftest import free_port, write_config
from tests.kafka_broker import Broker, create_topics
from tests.kafka_proxy import CREATE_TOPICS, KafkaProxy

RUN_TIMEOUT = 5.0


def make_probe(bootstrap: str, **extra: Any) -> KafkaProbe:
    settings = KafkaRoundTripSettings.model_validate(
        {"name": "kafka", "type": "kafka", "channel": "kafka", "interval": "10s", "timeout": "4s",
         "bootstrap_servers": bootstrap, **extra}
    )
    return KafkaProbe(settings)


async def run(probe: KafkaProbe) -> Result:
    return await run_once(probe, RUN_TIMEOUT, Scrubber(probe.settings.secret_values()))


def gauges(result: Result) -> dict[str, float]:
    return {gauge.name: gauge.value for gauge in result.gauges}


def topic_name() -> str:
    return f"canary-test-{secrets.token_hex(4)}"


async def test_round_trip_passes_with_phases_and_latency_gauges(kafka_broker: Broker) -> None:
    canary, work = topic_name(), topic_name()
    await create_topics(kafka_broker.bootstrap, canary, partitions=3)
    await create_topics(kafka_broker.bootstrap, work)
    result = await run(make_probe(kafka_broker.bootstrap, topics=[work], canary_topic=canary))
    assert (result.success, result.reason) == (True, "ok"), result.message
    assert result.message.startswith(f"canary round trip through {canary} partition ")
    assert set(result.phases) == {"connect", "metadata", "prepare", "produce", "consume", "end_to_end"}
    figures = gauges(result)
    assert figures["kafka_brokers"] == 1
    assert figures["kafka_partitions_without_leader"] == 0
    for name in ("kafka_produce_latency_seconds", "kafka_consume_latency_seconds", "kafka_end_to_end_latency_seconds"):
        assert 0 <= figures[name] < RUN_TIMEOUT, name
    assert result.phases["end_to_end"] >= result.phases["produce"]


async def test_canary_message_is_marked_synthetic_and_timestamped(kafka_broker: Broker) -> None:
    canary = topic_name()
    await create_topics(kafka_broker.bootstrap, canary)
    reader = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, request_timeout_ms=5000)
    await reader.start()
    try:
        partition = TopicPartition(canary, 0)
        reader.assign([partition])
        await reader.seek_to_beginning(partition)
        for _ in range(2):
            assert (await run(make_probe(kafka_broker.bootstrap, canary_topic=canary))).reason == "ok"
        records = []
        for _ in range(20):  # bounded: at most 20 fetches of up to 0.2 s
            batches = await reader.getmany(partition, timeout_ms=200)
            records += batches.get(partition, [])
            if len(records) >= 2:
                break
    finally:
        await reader.stop()
    assert len(records) == 2  # one per run: every run reads back its own message, not an older one
    for record in records:
        assert dict(record.headers) == {"X-Synthetic-Canary": b"1"}
        body = json.loads(record.value)
        assert body["canary"] == "kafka" and isinstance(body["sent"], float) and len(body["id"]) == 16
    assert json.loads(records[0].value)["id"] != json.loads(records[1].value)["id"]


async def test_metadata_only_when_no_canary_topic(kafka_broker: Broker) -> None:
    work = topic_name()
    await create_topics(kafka_broker.bootstrap, work)
    result = await run(make_probe(kafka_broker.bootstrap, topics=[work]))
    assert result.reason == "ok", result.message
    assert set(result.phases) == {"connect", "metadata"}
    assert result.message == "1 brokers, topics present"


async def test_missing_configured_topic_fails(kafka_broker: Broker) -> None:
    canary, missing = topic_name(), topic_name()
    await create_topics(kafka_broker.bootstrap, canary)
    result = await run(make_probe(kafka_broker.bootstrap, topics=[missing], canary_topic=canary))
    assert result.reason == "assertion"
    assert result.message.startswith(f"topics missing from the cluster: {missing} (")
    assert "produce" not in result.phases  # nothing is produced when the cluster is not as configured
    assert gauges(result)["kafka_brokers"] == 1


async def topic_layout(bootstrap: str, *topics: str) -> dict[str, list[list[int]]]:
    """Each of `topics` that exists, with its replicas per partition. Asks for every topic: a metadata request naming
    a missing topic makes tansu auto-create it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        described = await admin.describe_topics()
    finally:
        await admin.close()
    return {t["topic"]: [p["replicas"] for p in sorted(t["partitions"], key=lambda p: p["partition"])]
            for t in described if t["topic"] in topics and not t["error_code"]}


async def test_missing_canary_topic_is_created_and_the_round_trip_passes_in_the_same_run(kafka_broker: Broker) -> None:
    canary = topic_name()
    probe = make_probe(kafka_broker.bootstrap, canary_topic=canary)
    created = await run(probe)
    assert created.reason == "ok", created.message
    assert created.message.startswith(f"canary round trip through {canary} partition 0 in ")
    assert created.message.endswith("s (created the canary topic: 1 partitions, replication 1)")
    assert {"create_topic", "produce", "consume"} <= set(created.phases)
    # One broker: one partition (each broker leads one), replication min(3, brokers) = 1.
    layout = (await topic_layout(kafka_broker.bootstrap, canary))[canary]
    assert [len(replicas) for replicas in layout] == [1]
    again = await run(probe)
    assert again.reason == "ok" and "created" not in again.message
    assert "create_topic" not in again.phases


@pytest.mark.parametrize(("brokers", "partitions", "replication", "min_insync"),
                         [(1, 1, 1, "1"), (2, 2, 2, "1"), (3, 3, 3, "2"), (5, 5, 3, "2")])
def test_the_canary_topic_is_sized_from_the_cluster(brokers: int, partitions: int, replication: int,
                                                    min_insync: str) -> None:
    """tansu is one broker: the sizing for larger clusters is checked on its own."""
    new_topic = canary_topic_for("fte.canary", brokers)
    assert (new_topic.num_partitions, new_topic.replication_factor) == (partitions, replication)
    assert new_topic.topic_configs == {"cleanup.policy": "delete", "retention.ms": str(24 * 3600 * 1000),
                                       "min.insync.replicas": min_insync}


async def test_missing_canary_topic_with_manage_topic_false_fails_and_is_not_created(kafka_broker: Broker) -> None:
    canary = topic_name()
    probe = make_probe(kafka_broker.bootstrap, canary_topic=canary, manage_topic=False)
    for _ in range(2):
        result = await run(probe)
        assert result.reason == "assertion"
        assert f"topics missing from the cluster: {canary}" in result.message
    assert await topic_layout(kafka_broker.bootstrap, canary) == {}


async def test_only_the_canary_topic_is_ever_created_never_the_platform_topics(kafka_broker: Broker) -> None:
    canary, platform = topic_name(), topic_name()
    result = await run(make_probe(kafka_broker.bootstrap, topics=[platform], canary_topic=canary))
    assert result.reason == "assertion"
    assert result.message.startswith(f"topics missing from the cluster: {platform} (")  # not the canary topic
    assert set(await topic_layout(kafka_broker.bootstrap, canary, platform)) == {canary}


@pytest.mark.parametrize(("code", "name"), [(29, "TOPIC_AUTHORIZATION_FAILED"), (31, "CLUSTER_AUTHORIZATION_FAILED")])
async def test_a_creation_refused_by_acls_fails_with_auth_and_says_what_to_grant(
    proxied_kafka_broker: tuple[Broker, KafkaProxy], code: int, name: str
) -> None:
    broker, proxy = proxied_kafka_broker
    proxy.faults.deny_create = code
    canary = topic_name()
    result = await run(make_probe(broker.bootstrap, canary_topic=canary))
    assert result.reason == "auth"
    assert result.message == (
        f"not allowed to create the canary topic {canary} ({name}: refused by the test proxy's ACL): grant the "
        "canary's principal CREATE on it (or on the cluster), create it yourself, or set manage_topic = false"
    )
    assert proxy.faults.seen[CREATE_TOPICS] == 1 and "produce" not in result.phases
    assert gauges(result)["kafka_brokers"] == 1        # what the metadata showed is still reported


async def test_a_canary_topic_created_by_another_canary_at_the_same_moment_is_success(
    proxied_kafka_broker: tuple[Broker, KafkaProxy]
) -> None:
    broker, proxy = proxied_kafka_broker
    proxy.faults.create_together = 2                   # both shards saw it missing; their creations meet at the broker
    canary = topic_name()
    results = await asyncio.gather(*(run(make_probe(broker.bootstrap, canary_topic=canary, name=f"kafka-{shard}"))
                                     for shard in range(2)))
    assert [r.reason for r in results] == ["ok", "ok"], [r.message for r in results]
    notes = sorted(r.message.rsplit("s (", 1)[1] for r in results)
    assert notes == ["another canary created the canary topic meanwhile)",
                     "created the canary topic: 1 partitions, replication 1)"]
    assert proxy.faults.seen[CREATE_TOPICS] == 2


async def test_too_few_brokers_fails_on_threshold(kafka_broker: Broker) -> None:
    result = await run(make_probe(kafka_broker.bootstrap, min_brokers=3))
    assert result.reason == "threshold"
    assert result.message == "1 brokers in the metadata, expected at least 3"


async def test_unreachable_broker_fails_with_connect() -> None:
    result = await run(make_probe(f"127.0.0.1:{free_port()}", canary_topic="canary"))
    assert result.reason == "connect"
    assert result.message.startswith("broker unreachable during connect: no bootstrap server answered")
    assert result.duration_seconds < RUN_TIMEOUT


async def test_killed_broker_fails_with_connect_and_the_same_probe_recovers(own_kafka_broker: Broker) -> None:
    broker = own_kafka_broker
    canary = topic_name()
    await create_topics(broker.bootstrap, canary)
    probe = make_probe(broker.bootstrap, canary_topic=canary)
    assert (await run(probe)).reason == "ok"

    broker.kill()
    down = await run(probe)
    assert down.reason == "connect", down.message
    assert "broker unreachable" in down.message

    broker.start()  # same port; in-memory storage, so the topic has to be made again
    await create_topics(broker.bootstrap, canary)
    back = await run(probe)
    assert back.reason == "ok", back.message


async def test_sasl_settings_are_validated_and_the_password_is_scrubbed(
    kafka_broker: Broker, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    with pytest.raises(ValidationError, match="needs sasl_plain_username and sasl_plain_password"):
        make_probe(kafka_broker.bootstrap, security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="host:port"):
        make_probe("localhost")
    password = "kafka-pw-" + secrets.token_hex(6)
    probe = make_probe(kafka_broker.bootstrap, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                       sasl_plain_username="canary", sasl_plain_password=password)
    assert probe.settings.secret_values() == [password]
    caplog.set_level(logging.DEBUG)
    # tansu without --authentication refuses SASL; aiokafka reports that at bootstrap as "Unable to bootstrap".
    result = await run(probe)
    assert result.reason == "connect", result.message
    assert password not in result.message + repr(result.checks) + caplog.text


async def test_loads_from_config_with_password_file(tmp_path: Any) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("from-a-file\n")
    path = write_config(tmp_path, f"""
        [[probes]]
        name = "kafka"
        type = "kafka"
        channel = "kafka"
        bootstrap_servers = "127.0.0.1:9092,127.0.0.1:9093"
        canary_topic = "canary"
        security_protocol = "SASL_PLAINTEXT"
        sasl_plain_username = "canary"
        sasl_plain_password_file = "{secret}"
    """)
    config = load_config(path, PROBE_TYPES, environ={})
    settings = config.probes[0]
    assert isinstance(settings, KafkaRoundTripSettings)
    assert settings.servers() == ["127.0.0.1:9092", "127.0.0.1:9093"]
    assert "from-a-file" in settings.secret_values()[0]
