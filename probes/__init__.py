"""Probe types, one module each. To add a type: write its module, add one line to PROBE_TYPES, add its tests."""

from __future__ import annotations

from probes.base import Probe, ProbeSettings
from probes.http import HttpProbe
from probes.postgres import PostgresProbe

PROBE_TYPES: dict[str, type[Probe]] = {
    "http": HttpProbe,
    "postgres": PostgresProbe,
}


def build_probe(settings: ProbeSettings) -> Probe:
    return PROBE_TYPES[settings.type](settings)
