"""Shards: which shard runs which probe (rendezvous hashing), how `--shard` and `[daemon] shard` are read, and
the exact error each bad value gives, naming the flag or the key."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from canary.config import ConfigError, load_config
from canary.contract import ProbeSettings
from canary.sharding import EVERYTHING, Shard, ShardError, resolve, select, shard_of
from exporter.self_metrics import DaemonMetrics
from probes import PROBE_TYPES
from tests.conftest import ROOT, free_port, probe_command, write_config

# Pinned: a change of hash, of the scored text or of the tie rule would move probes between running shards on
# an upgrade, and two versions side by side would run some probes twice and others never.
EXPECTED_OF_3 = {
    "api-health": 0, "database": 0, "web-form": 0, "whatsapp-inbound": 1, "twilio-account": 2, "gmail": 0,
    "llm": 0, "redis": 0,
}
EXPECTED_OF_4 = {
    "api-health": 0, "database": 3, "web-form": 0, "whatsapp-inbound": 3, "twilio-account": 2, "gmail": 3,
    "llm": 0, "redis": 0,
}


def settings(name: str) -> ProbeSettings:
    return ProbeSettings(name=name, type="noop", channel="api")


# --- the assignment -------------------------------------------------------------------------------------------


def test_shard_of_gives_the_pinned_assignment() -> None:
    assert {name: shard_of(name, 3) for name in EXPECTED_OF_3} == EXPECTED_OF_3
    assert {name: shard_of(name, 4) for name in EXPECTED_OF_4} == EXPECTED_OF_4
    assert {shard_of(name, 1) for name in EXPECTED_OF_3} == {0}


@pytest.mark.parametrize("hash_seed", ["0", "1", "4242"])
def test_shard_of_is_the_same_in_other_processes_whatever_their_hash_seed(hash_seed: str) -> None:
    """Python's own hash() differs per process (PYTHONHASHSEED); the shards of one config must never disagree."""
    code = f"import json; from canary.sharding import shard_of; print(json.dumps({{n: shard_of(n, 3) for n in {list(EXPECTED_OF_3)!r}}}))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == EXPECTED_OF_3


def test_shares_are_even_over_10000_names() -> None:
    counts = Counter(shard_of(f"probe-{i:05d}", 3) for i in range(10_000))
    assert set(counts) == {0, 1, 2}
    for shard, count in counts.items():
        assert 0.30 <= count / 10_000 <= 0.37, (shard, counts)


def test_growing_from_3_to_4_shards_moves_about_a_quarter_and_only_to_the_new_shard() -> None:
    names = [f"probe-{i:03d}" for i in range(300)]
    moved = [name for name in names if shard_of(name, 3) != shard_of(name, 4)]
    assert 0.15 <= len(moved) / len(names) <= 0.35, len(moved)
    # Rendezvous hashing: a probe moves only when the new shard outbids its old one, never between old shards.
    assert {shard_of(name, 4) for name in moved} == {3}
    # What it saves: hashmod (Prometheus's relabel action: md5, low 8 bytes, modulo N) moves about 3 in 4.
    def hashmod(name: str, shards: int) -> int:
        return int.from_bytes(hashlib.md5(name.encode()).digest()[8:], "big") % shards
    assert sum(hashmod(name, 3) != hashmod(name, 4) for name in names) / len(names) > 0.6


def test_select_splits_a_config_into_disjoint_shares_that_keep_config_order() -> None:
    probes = [settings(f"probe-{i:03d}") for i in range(300)]
    shares = [select(probes, shard, 3) for shard in range(3)]
    assert sorted(p.name for share in shares for p in share) == [p.name for p in probes]
    for share in shares:
        assert list(share) == [p for p in probes if p in share]
        assert share  # 300 probes leave no shard empty
    assert select(probes, 0, 1) == tuple(probes)


# --- reading a shard -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hostname", "environ", "expected"),
    [
        ("0/1", "anything", {}, EVERYTHING),
        ("2/3", "anything", {}, Shard(2, 3)),
        ("auto", "channel-canary-2", {"CANARY_SHARDS": "3"}, Shard(2, 3)),
        ("auto", "channel-canary-0", {"CANARY_SHARDS": "1"}, EVERYTHING),
        ("auto", "canary-10.canary.monitoring.svc.cluster.local", {"CANARY_SHARDS": "12"}, Shard(10, 12)),
    ],
)
def test_resolve(text: str, hostname: str, environ: dict[str, str], expected: Shard) -> None:
    assert resolve(text, hostname, environ) == expected


@pytest.mark.parametrize(
    ("text", "hostname", "environ", "message"),
    [
        ("3/3", "h-0", {}, "shard 3 does not exist among 3 shards (I goes from 0 to 2), got '3/3'"),
        ("0/0", "h-0", {}, "the number of shards must be from 1 to 1000, got '0/0'"),
        ("x/2", "h-0", {}, "must be I/N (shard I of N, counted from 0, e.g. 0/3) or auto, got 'x/2'"),
        ("-1/2", "h-0", {}, "must be I/N (shard I of N, counted from 0, e.g. 0/3) or auto, got '-1/2'"),
        ("AUTO", "h-0", {}, "must be I/N (shard I of N, counted from 0, e.g. 0/3) or auto, got 'AUTO'"),
        ("auto", "channel-canary", {"CANARY_SHARDS": "3"},
         "auto needs a host name ending in a StatefulSet ordinal such as '-2', got 'channel-canary' "
         "(outside a StatefulSet give I/N)"),
        ("auto", "channel-canary-2", {},
         "auto needs the environment variable CANARY_SHARDS (the number of shards: set it in the manifest to the "
         "StatefulSet's replicas), and it is not set"),
        ("auto", "channel-canary-2", {"CANARY_SHARDS": "three"},
         "auto needs CANARY_SHARDS to be a whole number of shards from 1 to 1000, got 'three'"),
        ("auto", "channel-canary-2", {"CANARY_SHARDS": "0"},
         "auto needs CANARY_SHARDS to be a whole number of shards from 1 to 1000, got '0'"),
        ("auto", "channel-canary-3", {"CANARY_SHARDS": "3"},
         "auto took the ordinal 3 from the host name 'channel-canary-3', which is not below CANARY_SHARDS=3 "
         "(were the replicas changed without CANARY_SHARDS?)"),
    ],
)
def test_resolve_errors(text: str, hostname: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ShardError) as caught:
        resolve(text, hostname, environ)
    assert str(caught.value) == message


PROBE = """
[[probes]]
name = "one"
type = "tcp"
channel = "api"
host = "127.0.0.1"
port = 9
"""


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"3/3"', "daemon.shard: shard 3 does not exist among 3 shards (I goes from 0 to 2), got '3/3'"),
        ('"0/0"', "daemon.shard: the number of shards must be from 1 to 1000, got '0/0'"),
        ('"x/2"', "daemon.shard: must be I/N (shard I of N, counted from 0, e.g. 0/3) or auto, got 'x/2'"),
        ("2", "daemon.shard: Input should be a valid string (got 2)"),
    ],
)
def test_bad_daemon_shard_is_a_config_error_naming_the_key(tmp_path: Path, value: str, problem: str) -> None:
    path = write_config(tmp_path, f"[daemon]\nshard = {value}\n{PROBE}")
    with pytest.raises(ConfigError) as caught:
        load_config(path, PROBE_TYPES, environ={})
    assert caught.value.problems == [problem]


def test_daemon_shard_defaults_to_everything_and_auto_is_checked_only_when_resolved(tmp_path: Path) -> None:
    """`check-config` runs outside the pod, where `auto` cannot be resolved: it checks the form only."""
    assert load_config(write_config(tmp_path, PROBE), PROBE_TYPES, environ={}).daemon.shard == "0/1"
    assert load_config(write_config(tmp_path, f'[daemon]\nshard = "auto"\n{PROBE}'), PROBE_TYPES, environ={}).daemon.shard == "auto"


# --- the command line ------------------------------------------------------------------------------------------


def run_probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if key != "CANARY_SHARDS"}
    return subprocess.run(probe_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT, env={**environ, **(env or {})})


def many_probes(count: int, port: int = 9) -> str:
    return "".join(
        f'[[probes]]\nname = "probe-{i:03d}"\ntype = "tcp"\nchannel = "api"\nhost = "127.0.0.1"\nport = {port}\n\n'
        for i in range(count)
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("3/3", "probe {command}: error: argument --shard: shard 3 does not exist among 3 shards (I goes from 0 to 2), got '3/3'"),
        ("0/0", "probe {command}: error: argument --shard: the number of shards must be from 1 to 1000, got '0/0'"),
        ("x/2", "probe {command}: error: argument --shard: must be I/N (shard I of N, counted from 0, e.g. 0/3) or auto, got 'x/2'"),
    ],
)
@pytest.mark.parametrize("command", ["run", "list"])
def test_a_bad_shard_flag_is_a_usage_error_naming_the_flag(tmp_path: Path, command: str, flag: str, message: str) -> None:
    path = write_config(tmp_path, PROBE)
    done = run_probe(command, "--config", str(path), "--shard", flag)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == message.format(command=command)


@pytest.mark.parametrize("command", ["run", "list"])
def test_shard_auto_without_canary_shards_exits_2_naming_the_flag_or_the_key(tmp_path: Path, command: str) -> None:
    """This machine's host name may or may not end in an ordinal; either way auto cannot work here."""
    flagged = run_probe(command, "--config", str(write_config(tmp_path, PROBE)), "--shard", "auto")
    assert flagged.returncode == 2
    assert flagged.stderr.startswith("usage error:\n--shard: auto needs "), flagged.stderr
    if command == "run":
        path = write_config(tmp_path, f'[daemon]\nshard = "auto"\n{PROBE}', name="auto.toml")
        keyed = run_probe(command, "--config", str(path), "--listen", f"127.0.0.1:{free_port()}")
        assert keyed.returncode == 2
        assert keyed.stderr.startswith(f"config error:\n{path}: daemon.shard: auto needs "), keyed.stderr


def test_list_shows_one_shards_share_and_every_probe_without_the_flag(tmp_path: Path) -> None:
    path = write_config(tmp_path, many_probes(30))
    listed = []
    for shard in range(3):
        done = run_probe("list", "--config", str(path), "--shard", f"{shard}/3")
        assert done.returncode == 0, done.stderr
        names = [row.split()[0] for row in done.stdout.splitlines()[1:]]
        assert names == [f"probe-{i:03d}" for i in range(30) if shard_of(f"probe-{i:03d}", 3) == shard]
        listed += names
    assert sorted(listed) == [f"probe-{i:03d}" for i in range(30)]
    everything = run_probe("list", "--config", str(path))
    assert len(everything.stdout.splitlines()) == 31


def test_once_runs_every_probe_whatever_the_configured_shard(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'[daemon]\nshard = "1/3"\ntimeout = "1s"\n{many_probes(12, free_port())}')
    done = run_probe("--once", "--config", str(path), "--format", "json")
    assert done.returncode == 1, done.stderr  # nothing listens on that free port: every probe fails, and says so
    assert sorted(result["name"] for result in json.loads(done.stdout)["results"]) == [f"probe-{i:03d}" for i in range(12)]


# --- the self-metric -------------------------------------------------------------------------------------------


def test_shard_info_says_which_shard_and_defaults_to_0_of_1() -> None:
    assert DaemonMetrics().registry.get_sample_value("canary_shard_info", {"shard": "0", "shards": "1"}) == 1
    metrics = DaemonMetrics(2, 3)
    assert metrics.registry.get_sample_value("canary_shard_info", {"shard": "2", "shards": "3"}) == 1
    assert metrics.registry.get_sample_value("canary_shard_info", {"shard": "0", "shards": "1"}) is None
