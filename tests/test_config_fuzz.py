"""No input file makes loading the config raise anything but a ConfigError: hostile files, and a seeded, bounded
mutation of the shipped config.toml."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from canary.cli import main
from canary.config import Config, ConfigError, parse_config
from probes import PROBE_TYPES
from tests.conftest import ROOT

HOSTILE = {
    "binary": b"\x00\xff\xfe\x89PNG\r\n",
    "not-utf8": "[daemon]\nlisten = \"caf\xe9\"\n".encode("latin-1"),
    "huge-int": b"[daemon]\nhistory = 1" + b"0" * 400 + b"\n",
    "nan-bucket": b"[daemon]\nlatency_buckets = [nan, inf]\n",
    "probes-is-a-string": b'probes = "all of them"\n',
    "probes-is-a-table": b"[probes]\nname = 1\n",
    "daemon-is-an-array": b"[[daemon]]\nlisten = 1\n",
    "type-is-a-table": b'[[probes]]\nname = "x"\ntype = { a = 1 }\nchannel = "api"\n',
    "labels-nested": b'[daemon]\nlabels = { a = { b = "c" } }\n',
    "deep-array": b"[daemon]\nlatency_buckets = " + b"[" * 200 + b"]" * 200 + b"\n",
    "duration-number": b'[daemon]\ninterval = 30\ntimeout = -1\n',
    "duration-huge": b'[daemon]\ninterval = "99999999999999999999999h"\n',
    "listen-unicode": "[daemon]\nlisten = \"\u0661\u0662\u0667.0.0.1:\u0669\u0664\u0666\u0665\"\n".encode(),
    "secret-file-is-dir": b'[[probes]]\nname = "x"\ntype = "llm"\nchannel = "ai"\napi_key_file = "/"\n',
    "ca-file-is-dir": b'[[probes]]\nname = "x"\ntype = "http"\nchannel = "api"\nurl = "https://a/"\nca_file = "/"\n',
    "url-garbage": b'[[probes]]\nname = "x"\ntype = "http"\nchannel = "api"\nurl = "http://[::1"\n',
    "regex-garbage": b'[[probes]]\nname = "x"\ntype = "http"\nchannel = "api"\nurl = "http://a/"\nexpect_body_regex = "(("\n',
    "port-out-of-range": b'[[probes]]\nname = "x"\ntype = "tcp"\nchannel = "api"\nhost = "a"\nport = 70000\n',
    "kafka-empty-host": b'[[probes]]\nname = "x"\ntype = "kafka"\nchannel = "k"\nbootstrap_servers = ":9092"\ncanary_topic = "t"\n',
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_check_config_answers_every_hostile_file_with_exit_2_and_no_traceback(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(HOSTILE[name])
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and "Traceback" not in err


def test_a_directory_as_the_config_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path)]) == 2
    assert f"{tmp_path}: cannot read the file" in capsys.readouterr().err


def _mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(lines))
        line = lines[index]
        choice = rng.randrange(6)
        if choice == 0:
            del lines[index]
        elif choice == 1:
            lines.insert(index, line)
        elif choice == 2 and "=" in line:
            key = line.split("=", 1)[0]
            lines[index] = key + "= " + rng.choice(['1', '-1', '1.5', 'true', '""', '[]', '{}', '"x"', '"0s"', '[1, "a"]', '{ a = 1 }'])
        elif choice == 3:
            lines[index] = line[: rng.randrange(len(line) + 1)]
        elif choice == 4 and "=" in line:
            lines.insert(index, line.split("=", 1)[0].strip() + "_file = \"/nonexistent\"")
        else:
            lines[index] = line.replace('"', "", 1)
    return "\n".join(lines) + "\n"


def test_mutations_of_the_shipped_config_only_ever_give_a_config_or_a_config_error() -> None:
    shipped = (ROOT / "config.toml").read_text()
    rng = random.Random(20261123)
    outcomes = {"config": 0, "error": 0}
    for _ in range(300):
        try:
            result = parse_config(_mutate(shipped, rng), Path("config.toml"), PROBE_TYPES, {})
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            outcomes["error"] += 1
        else:
            assert isinstance(result, Config)
            outcomes["config"] += 1
    assert outcomes["error"] > 100  # the mutations really broke things
