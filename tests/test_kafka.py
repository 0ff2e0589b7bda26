"""The `kafka` probe against a real Kafka-protocol broker (tansu) on 127.0.0.1: round trip with its phases and
figures, a missing topic, an unreachable broker, SASL settings validated at load, and a broker killed mid-life and
restarted on the same port — the same probe instance recovers without being rebuilt."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from canary.config import load_config
from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.kafka import KafkaProbe, KafkaRoundTripSettings
from tests.conftest import free_port, write_config
from tests.kafka_broker import Broker, create_topics

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


async def test_missing_canary_topic_fails_and_is_not_created(kafka_broker: Broker) -> None:
    canary = topic_name()
    probe = make_probe(kafka_broker.bootstrap, canary_topic=canary)
    for _ in range(2):
        result = await run(probe)
        assert result.reason == "assertion"
        assert f"topics missing from the cluster: {canary}" in result.message


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
