"""Start-up imports no probe type's heavy libraries: loading and checking a config needs only the settings models;
a type's libraries are imported in a worker thread, by the daemon once it listens or by the runner before the
type's first run, never on the event loop."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator, Literal

import pytest

from canary.config import load_config
from canary.contract import PhaseTimer, Probe, ProbeSettings, Result
from canary.runner import run_once
from canary.scheduler import stable_offset
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from tests.conftest import ROOT, free_port, wait_until, write_config

# What the probe types import to run; none of it may be imported by loading a config or starting the daemon.
HEAVY = ("aiokafka", "asyncpg", "google.auth", "google.oauth2", "redis", "twilio.rest", "twilio.http", "requests",
         "cryptography", "yaml")


def run_python(code: str) -> Any:
    """Runs `code` in a fresh interpreter from the repository root; returns the JSON it prints last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_checking_the_shipped_config_and_starting_the_daemon_import_no_heavy_library() -> None:
    loaded = run_python(f"""
        import json, sys
        from canary.cli import main
        assert main(["check-config", "config.toml"]) == 0  # validates every configured type's settings
        import canary.daemon, exporter.web_security  # what `probe run` imports before it listens
        heavy = {HEAVY!r}
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))
    """)
    assert loaded == []


def test_a_config_loads_and_checks_importing_only_the_modules_of_the_types_it_uses(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[probes]]\nname = "x"\ntype = "http"\nchannel = "api"\nurl = "http://127.0.0.1:1/"\n')
    loaded = run_python(f"""
        import json, sys
        from canary.cli import main
        assert main(["check-config", {str(path)!r}]) == 0
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("probes."))))
    """)
    assert "probes.http" in loaded
    assert not {"probes.gmail", "probes.kafka", "probes.postgres", "probes.redis_probe", "probes.twilio_account"} & set(loaded)


def _local_imports(path: Path) -> list[str]:
    """The import statements inside the functions of a module: the ones that run when a probe runs."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [ast.unparse(inner) for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))]
    return found


def _our_modules(name: str, seen: set[str] | None = None) -> set[str]:
    """`probes.x` and the helper modules of probes/ it imports, transitively (not the modules of other types, whose
    settings it may borrow but whose runs are not its own)."""
    seen = seen if seen is not None else set()
    seen.add(name)
    types = {probe_type.__module__ for probe_type in PROBE_TYPES.values()}
    for node in ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("probes."):
            if node.module not in seen and node.module not in types:
                _our_modules(node.module, seen)
    return seen


@pytest.mark.parametrize("type_name", sorted(PROBE_TYPES))
def test_a_type_declares_every_library_its_runs_import(type_name: str) -> None:
    """Once the runner has imported a type's `libraries`, nothing its run path imports is left to import (which
    would happen on the event loop)."""
    probe_type = PROBE_TYPES[type_name]
    statements = sorted({s for m in _our_modules(probe_type.__module__) for s in _local_imports(ROOT / (m.replace(".", "/") + ".py"))})
    new = run_python(f"""
        import json, sys
        from canary.libraries import import_now
        from probes import PROBE_TYPES
        import_now(PROBE_TYPES[{type_name!r}].libraries)
        before = set(sys.modules)
        for statement in {statements!r}:
            exec(statement, {{}})
        print(json.dumps(sorted(set(sys.modules) - before)))
    """)
    assert new == [], f"{type_name} imports {new} when it runs; add them to its `libraries`"


# --- the runner and the daemon ---------------------------------------------------------------------------------------

class FakeSettings(ProbeSettings):
    type: Literal["fake"] = "fake"


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of its own (a new name per test), which notes the thread that imported it."""
    name = f"canary_test_library_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("import threading\nIMPORTED_IN = threading.current_thread().name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def fake_type(libraries: tuple[str, ...]) -> type[Probe[FakeSettings]]:
    class FakeProbe(Probe[FakeSettings]):
        settings_model = FakeSettings
        runs: list[str] = []

        async def run(self, timer: PhaseTimer) -> Result:
            module = sys.modules.get(libraries[0])  # imported before the run, so no import statement is needed
            FakeProbe.runs.append(getattr(module, "IMPORTED_IN", "not imported"))
            return Result.ok()

    FakeProbe.libraries = libraries
    return FakeProbe


async def test_the_runner_imports_a_types_libraries_in_a_worker_thread_before_its_first_run(library: str) -> None:
    probe_type = fake_type((library,))
    probe = probe_type(FakeSettings(name="fake", channel="api"))
    assert library not in sys.modules
    result = await run_once(probe, 5.0, Scrubber())
    assert result.success and probe_type.runs == [sys.modules[library].IMPORTED_IN]
    assert sys.modules[library].IMPORTED_IN != "MainThread"  # the event loop's thread went on meanwhile


async def test_a_library_that_cannot_be_imported_fails_the_run_as_internal() -> None:
    probe = fake_type(("canary_test_no_such_library",))(FakeSettings(name="fake", channel="api"))
    result = await run_once(probe, 5.0, Scrubber())
    assert not result.success and result.reason == "internal"
    assert "the libraries of probe type fake cannot be imported" in result.message
    assert "canary_test_no_such_library" in result.message


async def test_the_daemon_imports_the_configured_types_libraries_once_it_listens(library: str, tmp_path: Path) -> None:
    from canary.daemon import Daemon

    probe_type = fake_type((library,))
    types = {"fake": probe_type}
    # A probe whose first slot is far off: what imports the library is the daemon, not a run.
    name = next(f"fake-{i}" for i in range(1000) if stable_offset(f"fake-{i}", 3600.0) > 600)
    port = free_port()
    path = write_config(tmp_path, f"""
        [daemon]
        listen = "127.0.0.1:{port}"
        jitter = "1h"
        [[probes]]
        name = "{name}"
        type = "fake"
        channel = "api"
        interval = "1h"
    """)
    daemon = Daemon(load_config(path, types), types, lambda settings: probe_type(settings), state_dir=str(tmp_path))
    serving = asyncio.create_task(daemon.serve())
    try:
        await wait_until(lambda: library in sys.modules and hasattr(sys.modules[library], "IMPORTED_IN"), timeout=20)
        assert daemon._ready and probe_type.runs == []
        assert sys.modules[library].IMPORTED_IN != "MainThread"
    finally:
        daemon._stop.set()
        assert await asyncio.wait_for(serving, 20) == 0
