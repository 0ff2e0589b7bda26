"""Probe types, one module each. To add a type: write its module, add one line to PROBE_TYPES, add its tests.

A type's module is imported the first time the type is looked up (by a config that uses it), so a daemon runs and a
config loads without importing the modules of the types nobody configured.
"""

from __future__ import annotations

import importlib
from typing import Iterator, Mapping

from canary.contract import Probe, ProbeSettings

# Type name → "module:class".
_TYPES: dict[str, str] = {
    "gmail": "probes.gmail:GmailProbe",
    "http": "probes.http:HttpProbe",
    "kafka": "probes.kafka:KafkaProbe",
    "kafka_dlq": "probes.kafka_dlq:KafkaDlqProbe",
    "kafka_lag": "probes.kafka_lag:KafkaLagProbe",
    "llm": "probes.llm:LlmProbe",
    "postgres": "probes.postgres:PostgresProbe",
    "redis": "probes.redis_probe:RedisProbe",
    "statuspage": "probes.statuspage:StatuspageProbe",
    "tcp": "probes.tcp:TcpProbe",
    "tls": "probes.tls:TlsProbe",
    "transaction": "probes.transaction:TransactionProbe",
    "twilio": "probes.twilio_account:TwilioAccountProbe",
    "whatsapp": "probes.whatsapp:WhatsAppProbe",
}


class _Registry(Mapping[str, "type[Probe]"]):
    """PROBE_TYPES: a read-only mapping of type name to probe class, importing a type's module on first lookup."""

    def __getitem__(self, name: str) -> type[Probe]:
        module, _, attribute = _TYPES[name].partition(":")
        probe_type: type[Probe] = getattr(importlib.import_module(module), attribute)
        return probe_type

    def __contains__(self, name: object) -> bool:
        return name in _TYPES

    def __iter__(self) -> Iterator[str]:
        return iter(_TYPES)

    def __len__(self) -> int:
        return len(_TYPES)


PROBE_TYPES: Mapping[str, type[Probe]] = _Registry()


def build_probe(settings: ProbeSettings) -> Probe:
    return PROBE_TYPES[settings.type](settings)
