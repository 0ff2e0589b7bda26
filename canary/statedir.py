"""Where a daemon keeps what outlives it: the one place that decides the state directory.

`--state.dir DIR` wins, then `[daemon] state_dir`; without either, every daemon still gets a directory of its own
(the object ledger must survive a `kill -9`), under a base directory:

    $CANARY_STATE_HOME            when set (the tests point it at a temporary directory)
    $XDG_STATE_HOME/channel-canary
    ~/.local/state/channel-canary

and inside it one subdirectory per config file and shard, `<config stem>-<10 hex digits of the config's absolute
path>` plus `-shard<I>of<N>` when sharded. So the shipped config works from any directory, and two daemons on one
machine (other configs, or other shards of one config) never share state unless told to. Every state file
(uptime.json, ledger.sqlite, …) lives directly in the directory this returns.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

from canary.sharding import EVERYTHING, Shard

APP_NAME = "channel-canary"


def base_directory(environ: Mapping[str, str] | None = None) -> Path:
    """The directory under which each daemon's default state directory is made."""
    environ = os.environ if environ is None else environ
    if environ.get("CANARY_STATE_HOME"):
        return Path(environ["CANARY_STATE_HOME"])
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / APP_NAME
    return Path(environ.get("HOME") or Path.home()) / ".local" / "state" / APP_NAME


def instance_name(config_path: Path, shard: Shard = EVERYTHING) -> str:
    """`config-1a2b3c4d5e`, `config-1a2b3c4d5e-shard0of3`: distinct per config file (by absolute path) and shard."""
    absolute = Path(os.path.abspath(config_path))
    digest = hashlib.sha256(str(absolute).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in absolute.stem)[:40] or "config"
    suffix = "" if shard.count <= 1 else f"-shard{shard.index}of{shard.count}"
    return f"{stem}-{digest}{suffix}"


def state_directory(
    flag: str | None, configured: str | None, config_path: Path, shard: Shard = EVERYTHING,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The state directory: the flag's, else the config's, else this config and shard's default one."""
    if flag:
        return Path(flag)
    if configured:
        return Path(configured)
    return base_directory(environ) / instance_name(config_path, shard)
