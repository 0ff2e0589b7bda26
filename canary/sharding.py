"""Which probes one `probe run` process runs when several share a config: rendezvous hashing of probe names.

Every process scores every (probe, shard) pair with a stable hash and keeps the probes its shard scores highest
(highest-random-weight hashing). Growing from N to N+1 shards moves only the probes the new shard now wins,
about 1/(N+1) of them; `hashmod`, as Prometheus's relabelling does it, moves most. The hash is blake2b, never
Python's `hash()`, which is salted per process: every process, and every restart, must agree.

The shard is what Kubernetes gives a StatefulSet pod: `auto` reads the ordinal at the end of the host name
(`channel-canary-2` is shard 2) and the number of shards from the environment variable CANARY_SHARDS, set
in the manifest beside `replicas`. There is no protocol between the processes: each one decides alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, TypeVar

from canary.contract import ProbeSettings

SHARDS_VARIABLE = "CANARY_SHARDS"
AUTO = "auto"
_SPEC = re.compile(r"([0-9]+)/([0-9]+)")
_ORDINAL = re.compile(r"-([0-9]+)$")
_MAX_SHARDS = 1000  # far beyond what one Prometheus scrapes; keeps a typo like 0/30000 from being taken

Settings = TypeVar("Settings", bound=ProbeSettings)


class ShardError(ValueError):
    """A shard that cannot be used; the message says why, and the caller names the flag or key."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`, counted from 0. Shard 0 of 1 runs everything."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


EVERYTHING = Shard(0, 1)


def shard_of(name: str, shards: int) -> int:
    """The shard that runs the probe `name` among `shards` shards: the one whose score for it is highest."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return max(range(shards), key=lambda shard: (_score(name, shard), -shard))


def _score(name: str, shard: int) -> int:
    digest = hashlib.blake2b(f"{name}:{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def select(probes: Iterable[Settings], shard: int, shards: int) -> tuple[Settings, ...]:
    """The probes shard `shard` of `shards` runs, in config order."""
    if shards == 1:
        return tuple(probes)
    return tuple(probe for probe in probes if shard_of(probe.name, shards) == shard)


def check_spec(text: str) -> str:
    """Check the form of a `--shard` or `[daemon] shard` value, `I/N` or `auto`; returns it unchanged."""
    if text != AUTO:
        _parse_pair(text)
    return text


def resolve(text: str, hostname: str, environ: Mapping[str, str]) -> Shard:
    """The shard a value stands for; `auto` reads the host name's StatefulSet ordinal and CANARY_SHARDS."""
    if text != AUTO:
        return _parse_pair(text)
    ordinal = _ORDINAL.search(hostname.split(".")[0])  # a pod's host name is its name; tolerate a domain after it
    if ordinal is None:
        raise ShardError(
            f"auto needs a host name ending in a StatefulSet ordinal such as '-2', got {hostname!r} "
            "(outside a StatefulSet give I/N)"
        )
    raw_count = environ.get(SHARDS_VARIABLE, "").strip()
    if not raw_count:
        raise ShardError(
            f"auto needs the environment variable {SHARDS_VARIABLE} (the number of shards: set it in the manifest "
            "to the StatefulSet's replicas), and it is not set"
        )
    if not re.fullmatch("[0-9]+", raw_count) or not 1 <= int(raw_count) <= _MAX_SHARDS:
        raise ShardError(f"auto needs {SHARDS_VARIABLE} to be a whole number of shards from 1 to {_MAX_SHARDS}, got {raw_count!r}")
    index, count = int(ordinal.group(1)), int(raw_count)
    if index >= count:
        raise ShardError(
            f"auto took the ordinal {index} from the host name {hostname!r}, which is not below {SHARDS_VARIABLE}={count} "
            f"(were the replicas changed without {SHARDS_VARIABLE}?)"
        )
    return Shard(index, count)


def _parse_pair(text: str) -> Shard:
    match = _SPEC.fullmatch(text.strip())
    if match is None:
        raise ShardError(f"must be I/N (shard I of N, counted from 0, e.g. 0/3) or auto, got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or count > _MAX_SHARDS:
        raise ShardError(f"the number of shards must be from 1 to {_MAX_SHARDS}, got {text!r}")
    if index >= count:
        raise ShardError(f"shard {index} does not exist among {count} shards (I goes from 0 to {count - 1}), got {text!r}")
    return Shard(index, count)
