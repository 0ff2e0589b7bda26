"""Loading config.toml: environment expansion, `*_file` secrets, validation, and errors that name the key.

Loading is all-or-nothing: either a whole valid Config comes back, or a ConfigError listing every problem
found, each as `FILE: KEY.PATH: what is wrong`. Nothing in an error ever shows a secret's value.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from canary.scrub import Scrubber
from canary.sharding import check_spec
from canary.contract import MAX_RETRIES, Duration, HostPort, Probe, ProbeSettings, StaticLabels, parse_host_port

DEFAULT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0)
T = TypeVar("T")
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


class DaemonSettings(BaseModel):
    """The `[daemon]` table: where to listen, and the defaults every probe inherits."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    listen: HostPort = "127.0.0.1:9465"
    interval: Duration = 30.0
    timeout: Duration = 10.0
    retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    jitter: Duration = 10.0
    shutdown_grace: Duration = 10.0
    history: int = Field(default=30, ge=1, le=1000)
    labels: StaticLabels = Field(default_factory=dict)
    latency_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    log_level: typing.Literal["debug", "info", "warning", "error"] = "info"
    # Where the daemon keeps what should outlive a restart (the object ledger, the uptime buckets); None: a default
    # directory of this config and shard's own (canary/statedir.py resolves it, with --state.dir).
    state_dir: str | None = None

    @field_validator("state_dir")
    @classmethod
    def _state_dir_path(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise ValueError("must be a directory's path; leave the key out for the default directory")
        return path

    shard: str = "0/1"  # "I/N" or "auto"; resolved at start (canary.sharding), so `check-config` needs no pod

    @field_validator("shard")
    @classmethod
    def _shard_form(cls, shard: str) -> str:
        return check_spec(shard)

    @field_validator("latency_buckets")
    @classmethod
    def _sorted_buckets(cls, buckets: tuple[float, ...]) -> tuple[float, ...]:
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
            raise ValueError("must be a non-empty list of increasing positive numbers")
        return buckets

    def listen_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonSettings
    probes: tuple[ProbeSettings, ...]
    secrets: frozenset[str]

    def scrubber(self) -> Scrubber:
        return Scrubber(self.secrets)


class ConfigError(Exception):
    """Every problem found in one config file, each naming the key path."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {problem}" for problem in problems))


def load_config(
    path: Path | str,
    probe_types: Mapping[str, type[Probe]],
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read, expand and validate one config file."""
    return run_steps(load_config_steps(path, probe_types, environ))


def load_config_steps(
    path: Path | str,
    probe_types: Mapping[str, type[Probe]],
    environ: Mapping[str, str] | None = None,
) -> Generator[None, None, Config]:
    """`load_config` a little at a time: it yields after each probe's part of each stage, so `probe run` can reload
    10,000 probes (1-2 s of work) between the runs that are due instead of holding its event loop for all of it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"]) from None
    return (yield from parse_config_steps(text, path, probe_types, os.environ if environ is None else environ))


def run_steps(steps: Generator[None, None, T]) -> T:
    """Runs a `*_steps` generator to its end, in one go."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def parse_config(
    text: str, path: Path, probe_types: Mapping[str, type[Probe]], environ: Mapping[str, str]
) -> Config:
    return run_steps(parse_config_steps(text, path, probe_types, environ))


def parse_config_steps(
    text: str, path: Path, probe_types: Mapping[str, type[Probe]], environ: Mapping[str, str]
) -> Generator[None, None, Config]:
    try:
        raw = yield from _toml_steps(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None

    problems: list[str] = []
    raw = yield from _expand_steps(raw, environ, problems)
    for key in raw:
        if key not in ("daemon", "probes"):
            problems.append(f"{key}: unknown key (the top level takes [daemon] and [[probes]])")

    raw_secrets: list[str] = []
    for entry in raw.get("probes", []) if isinstance(raw.get("probes"), list) else []:
        raw_secrets.extend(_raw_secret_values(entry, probe_types))
        yield
    daemon = _validate(DaemonSettings, _table(raw.get("daemon", {}), "daemon", problems), "daemon", problems)

    raw_probes = raw.get("probes", [])
    if not isinstance(raw_probes, list):
        problems.append("probes: must be an array of tables, written [[probes]]")
        raw_probes = []
    probes: list[ProbeSettings] = []
    first_index_by_name: dict[str, int] = {}
    collisions: set[str] = set()
    for index, entry in enumerate(raw_probes):
        yield
        where = f"probes[{index}]"
        settings = _validate_probe(_paths_beside(entry, path.absolute().parent), where, probe_types, problems)
        type_name = entry.get("type") if isinstance(entry, dict) else None
        if daemon is not None and isinstance(type_name, str) and type_name in probe_types:
            for problem in _label_collisions(daemon.labels, probe_types[type_name], "daemon.labels", type_name):
                if problem not in collisions:  # once per label and type, however many probes of that type there are
                    collisions.add(problem)
                    problems.append(problem)
        if settings is None:
            continue
        if settings.name in first_index_by_name:
            problems.append(
                f"{where}.name: duplicate probe name {settings.name!r} (first used by probes[{first_index_by_name[settings.name]}])"
            )
            continue
        first_index_by_name[settings.name] = index
        if daemon is not None:
            settings = _inherit_defaults(settings, daemon, where, problems)
        probes.append(settings)

    if problems:
        scrub = Scrubber(raw_secrets)
        raise ConfigError(path, [scrub(problem) for problem in problems])
    assert daemon is not None
    secrets = set(raw_secrets)
    for probe in probes:
        secrets.update(probe.secret_values())
        yield
    return Config(path=path, daemon=daemon, probes=tuple(probes), secrets=frozenset(secrets))


# A top-level `[[probes]]` header alone on its line: where a config can be cut into parts TOML reads on their own.
_PROBES_HEADER = re.compile(r"^\[\[\s*probes\s*\]\][ \t]*(?:#[^\n]*)?$", re.MULTILINE)


class _CannotCut(Exception):
    pass


def _toml_steps(text: str) -> Generator[None, None, dict[str, Any]]:
    """`tomllib.loads(text)`, one `[[probes]]` table at a time (10,000 probes are 2 MB of TOML: 0.2-0.3 s in one
    call). What cannot be cut safely (a header inside a multi-line string, a table or key that two parts both
    declare, an inline `probes` array) is read in one call instead, which also raises tomllib's own error."""
    starts = [match.start() for match in _PROBES_HEADER.finditer(text)]
    if len(starts) < 2:
        return tomllib.loads(text)
    bounds = [0, *starts, len(text)]
    merged: dict[str, Any] = {}
    probes: list[Any] = []
    try:
        for position, (start, end) in enumerate(zip(bounds, bounds[1:])):
            part = tomllib.loads(text[start:end])
            if position:  # a part that starts with a [[probes]] header: exactly one table of the array
                entries = part.pop("probes", None)
                if not isinstance(entries, list) or len(entries) != 1:
                    raise _CannotCut
                probes.append(entries[0])
            for key, value in part.items():
                if key in merged or key == "probes":
                    raise _CannotCut
                merged[key] = value
            yield
    except (tomllib.TOMLDecodeError, _CannotCut):
        return tomllib.loads(text)
    merged["probes"] = probes
    return merged


def _expand_steps(raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> Generator[None, None, dict[str, Any]]:
    """`_expand(raw, ...)`, yielding after each probe (the same order, so the same problems in the same order)."""
    expanded: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "probes" and isinstance(value, list):
            entries = []
            for index, entry in enumerate(value):
                entries.append(_expand(entry, f"{key}[{index}]", environ, problems))
                yield
            expanded[key] = entries
        else:
            expanded[key] = _expand(value, key, environ, problems)
    return expanded


def _validate_probe(
    entry: Any, where: str, probe_types: Mapping[str, type[Probe]], problems: list[str]
) -> ProbeSettings | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a table")
        return None
    type_name = entry.get("type")
    if type_name is None:
        problems.append(f"{where}.type: required key is missing (one of: {', '.join(sorted(probe_types))})")
        return None
    if not isinstance(type_name, str) or type_name not in probe_types:
        problems.append(f"{where}.type: unknown probe type {type_name!r} (known: {', '.join(sorted(probe_types))})")
        return None
    model = probe_types[type_name].settings_model
    entry, unresolved = _resolve_secret_files(entry, model, where, problems)
    before = len(problems)
    settings = _validate(model, entry, where, problems)
    # A secret whose `*_file` could not be used is reported once, not again as a missing key.
    missing = {f"{where}.{key}: required key is missing" for key in unresolved}
    problems[before:] = [problem for problem in problems[before:] if problem not in missing]
    if settings is not None:
        problems += _label_collisions(settings.labels, probe_types[type_name], f"{where}.labels", type_name)
    return settings


def _label_collisions(labels: Mapping[str, str], probe_type: type[Probe], where: str, type_name: str) -> list[str]:
    """A static label named like one of the probe's figure labels would give a series two labels of one name,
    and Prometheus would reject the whole scrape."""
    return [
        f"{where}.{label}: {label!r} is a label of the {type_name} probe's own figures; choose another name"
        for label in sorted(set(labels) & probe_type.figure_labels)
    ]


def _inherit_defaults(
    settings: ProbeSettings, daemon: DaemonSettings, where: str, problems: list[str]
) -> ProbeSettings:
    interval = settings.interval or daemon.interval
    timeout, inherited_from = _effective_timeout(settings, daemon, interval)
    if timeout > interval:
        problems.append(f"{where}.timeout: {timeout:g}s is longer than the interval {interval:g}s (a probe never overlaps itself)")
    problem = settings.check_timing(timeout, inherited_from)
    if problem:
        problems.append(f"{where}.{problem}")
    retries = daemon.retries if settings.retries is None else settings.retries
    return settings.model_copy(update={"interval": interval, "timeout": timeout, "retries": retries})


def _effective_timeout(settings: ProbeSettings, daemon: DaemonSettings, interval: float) -> tuple[float, str | None]:
    """The probe's timeout, and where it came from when the probe did not set it (for messages about it)."""
    if settings.timeout:
        return settings.timeout, None
    if daemon.timeout <= interval:
        return daemon.timeout, "[daemon].timeout"
    return interval, "the probe's interval, shorter than [daemon].timeout"


def _table(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    problems.append(f"{where}: must be a table")
    return {}


def _validate(model: type[BaseModel], data: dict[str, Any], where: str, problems: list[str]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        secret_fields = _secret_fields(model)
        for error in exc.errors(include_url=False):
            problems.append(_describe_error(where, error, secret_fields, model))
        return None


def _describe_error(where: str, error: Any, secret_fields: set[str], model: type[BaseModel] | None = None) -> str:
    path = where
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("function-after", "function-before") and not str(part).startswith(("function-", "lax-", "json-")):
            path += f".{part}" if path else str(part)
    kind = error["type"]
    if kind == "extra_forbidden":
        nearest = _nearest_key(model, error["loc"]) if model is not None else None
        return f"{path}: unknown key" + (f"; did you mean {nearest!r}?" if nearest else "")
    if kind == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    is_secret = any(part in secret_fields for part in error["loc"] if isinstance(part, str))
    if kind != "value_error" and not is_secret and isinstance(value, (str, int, float, bool)) and len(str(value)) <= 80:
        message += f" (got {value!r})"
    return f"{path}: {message}"


def _nearest_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The key of the model (or of the sub-model `loc` leads to) that an unknown key is most likely a typo of."""
    for part in loc[:-1]:  # walk down to the model that holds the unknown key
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None  # a list or a mapping on the way: no single model to compare against
        model = annotation
    names = [alias for name, field in model.model_fields.items() for alias in (name, field.alias) if alias]
    match = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return match[0] if match else None


def _expand(value: Any, where: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    """Expand ${VAR}, ${VAR:-default} and ${VAR-default} in every string; `$$` is a literal `$`."""
    if isinstance(value, str):
        return _expand_string(value, where, environ, problems)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else k, environ, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", environ, problems) for i, v in enumerate(value)]
    return value


def _expand_string(text: str, where: str, environ: Mapping[str, str], problems: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.group(1), match.group(2), match.group(3)
        current = environ.get(name)
        if operator == ":-" and not current:
            return default
        if operator == "-" and current is None:
            return default
        if current is None:
            problems.append(
                f"{where}: environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
            )
            return ""
        return current

    return _VARIABLE.sub(replace, text)


def _secret_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, field in model.model_fields.items() if _holds_secret(field.annotation)}


def _holds_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, dict, list, tuple, typing.Annotated):
        return any(_holds_secret(arg) for arg in typing.get_args(annotation))
    return False


def _paths_beside(entry: Any, directory: Path) -> Any:
    """Every `*_file` key names a file, and a relative one is the config file's neighbour (as in Prometheus), so a
    config and the files it names work together from any working directory."""
    if not isinstance(entry, dict):
        return entry
    return {
        key: str(directory / value)
        if key.endswith("_file") and isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute()
        else value
        for key, value in entry.items()
    }


def _resolve_secret_files(
    entry: dict[str, Any], model: type[BaseModel], where: str, problems: list[str]
) -> tuple[dict[str, Any], set[str]]:
    """`password_file = "/run/secrets/pg"` stands for `password = <that file's contents>` for any secret key.

    Also returns the secret keys whose file was given but could not be used (already reported)."""
    secret_fields = _secret_fields(model)
    resolved = dict(entry)
    unresolved: set[str] = set()
    for key, value in entry.items():
        base = key.removesuffix("_file")
        if base == key or base not in secret_fields:
            continue
        del resolved[key]
        if base in entry:
            problems.append(f"{where}.{key}: set either {base} or {key}, not both")
            continue
        if not isinstance(value, str):
            problems.append(f"{where}.{key}: must be a file path string")
            unresolved.add(base)
            continue
        try:
            resolved[base] = Path(value).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            # "(reason)", not ": reason": the scrubber reads `secret': No` as a key/value pair and masks the reason.
            problems.append(f"{where}.{key}: cannot read the file {value!r} ({getattr(exc, 'strerror', None) or exc})")
            unresolved.add(base)
    return resolved, unresolved


def _raw_secret_values(entry: Any, probe_types: Mapping[str, type[Probe]]) -> list[str]:
    """A probe's secrets as written (after expansion), so even a config that fails validation cannot leak them."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or entry["type"] not in probe_types:
        return []
    found: list[str] = []
    for field in _secret_fields(probe_types[entry["type"]].settings_model):
        found.extend(_strings(entry.get(field)))
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
