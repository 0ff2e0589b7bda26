"""Probe types, one module each. To add a type: write its module, add one line to PROBE_TYPES, add its tests."""

from __future__ import annotations

from canary.contract import Probe, ProbeSettings
from probes.gmail import GmailProbe
from probes.http import HttpProbe
from probes.kafka import KafkaProbe
from probes.kafka_dlq import KafkaDlqProbe
from probes.kafka_lag import KafkaLagProbe
from probes.llm import LlmProbe
from probes.postgres import PostgresProbe
from probes.redis_probe import RedisProbe
from probes.statuspage import StatuspageProbe
from probes.tcp import TcpProbe
from probes.tls import TlsProbe
from probes.transaction import TransactionProbe
from probes.twilio_account import TwilioAccountProbe
from probes.whatsapp import WhatsAppProbe

PROBE_TYPES: dict[str, type[Probe]] = {
    "gmail": GmailProbe,
    "http": HttpProbe,
    "kafka": KafkaProbe,
    "kafka_dlq": KafkaDlqProbe,
    "kafka_lag": KafkaLagProbe,
    "llm": LlmProbe,
    "postgres": PostgresProbe,
    "redis": RedisProbe,
    "statuspage": StatuspageProbe,
    "tcp": TcpProbe,
    "tls": TlsProbe,
    "transaction": TransactionProbe,
    "twilio": TwilioAccountProbe,
    "whatsapp": WhatsAppProbe,
}


def build_probe(settings: ProbeSettings) -> Probe:
    return PROBE_TYPES[settings.type](settings)
