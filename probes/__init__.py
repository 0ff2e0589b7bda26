"""Probe types, one module each. To add a type: write its module, add one line to PROBE_TYPES, add its tests."""

from __future__ import annotations

from probes.base import Probe, ProbeSettings
from probes.gmail import GmailProbe
from probes.http import HttpProbe
from probes.llm import LlmProbe
from probes.postgres import PostgresProbe
from probes.statuspage import StatuspageProbe
from probes.transaction import TransactionProbe
from probes.twilio_account import TwilioAccountProbe
from probes.whatsapp import WhatsAppProbe

PROBE_TYPES: dict[str, type[Probe]] = {
    "gmail": GmailProbe,
    "http": HttpProbe,
    "llm": LlmProbe,
    "postgres": PostgresProbe,
    "statuspage": StatuspageProbe,
    "transaction": TransactionProbe,
    "twilio": TwilioAccountProbe,
    "whatsapp": WhatsAppProbe,
}


def build_probe(settings: ProbeSettings) -> Probe:
    return PROBE_TYPES[settings.type](settings)
