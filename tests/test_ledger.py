"""The object ledger, the janitor and the sweep: no synthetic ticket outlives a `kill -9`.

The ledger is tested on a real SQLite file (an entry is there after the process that wrote it was killed), the
janitor and the sweep against the sandbox's real ticket endpoints, and the whole against the daemon as a subprocess:
killed with SIGKILL while its transaction waits for a slow agent, or between a submit and its answer, then restarted,
with the sandbox's own listing as the judge. The state directory's default is tested with the environment it reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from canary.config import load_config
from canary.janitor import Janitor
from canary.ledger import FILE_NAME, Ledger, building_with
from canary.runner import run_once
from canary.sandbox.faults import FAULTS
from canary.sandbox.platform import DESK
from canary.scrub import Scrubber
from canary.sharding import Shard
from canary.statedir import base_directory, instance_name, state_directory
from probes import PROBE_TYPES, build_probe
from probes.transaction import TransactionProbe
from tests.conftest import ROOT, Process, free_port, http_get, probe_command, wait_for, wait_for_port, write_config
from tests.test_transaction import web_form

MARKER = "[canary] synthetic check"


# --- the state directory ------------------------------------------------------------------------------------------

def test_each_config_and_shard_gets_a_directory_of_its_own(tmp_path: Path) -> None:
    env = {"CANARY_STATE_HOME": str(tmp_path)}
    one = state_directory(None, None, Path("/etc/a/config.toml"), environ=env)
    other_config = state_directory(None, None, Path("/etc/b/config.toml"), environ=env)
    shard0 = state_directory(None, None, Path("/etc/a/config.toml"), Shard(0, 2), environ=env)
    shard1 = state_directory(None, None, Path("/etc/a/config.toml"), Shard(1, 2), environ=env)
    assert len({one, other_config, shard0, shard1}) == 4
    assert all(path.parent == tmp_path for path in (one, other_config, shard0, shard1))
    assert one.name.startswith("config-") and shard1.name.endswith("-shard1of2")
    # Stable: the same config from another working directory is the same directory.
    assert instance_name(Path("/etc/a/config.toml")) == instance_name(Path("/etc/a/../a/config.toml"))


def test_the_flag_wins_then_the_config(tmp_path: Path) -> None:
    env = {"CANARY_STATE_HOME": str(tmp_path)}
    assert state_directory("/flag", "/configured", Path("c.toml"), environ=env) == Path("/flag")
    assert state_directory(None, "/configured", Path("c.toml"), environ=env) == Path("/configured")


def test_the_base_follows_xdg_and_falls_back_to_the_home() -> None:
    assert base_directory({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}) == Path("/x/state/channel-canary")
    # A relative XDG_STATE_HOME is invalid by the spec and ignored.
    assert base_directory({"XDG_STATE_HOME": "rel", "HOME": "/home/u"}) == Path("/home/u/.local/state/channel-canary")
    assert base_directory({"CANARY_STATE_HOME": "/c", "XDG_STATE_HOME": "/x"}) == Path("/c")


def test_the_suite_never_writes_into_the_real_home(state_home: Path) -> None:
    shipped = state_directory(None, None, ROOT / "config.toml")
    assert shipped.parent == state_home
    assert str(Path.home()) not in str(shipped) or str(state_home).startswith(str(Path.home()))


# --- the ledger on a real SQLite file -----------------------------------------------------------------------------

WRITER = """
import asyncio, sys
from pathlib import Path
from canary.ledger import Ledger

async def main():
    ledger = Ledger.in_directory(Path(sys.argv[1]))
    await ledger.record("web-form", "run1", {"ticket_id": "TKT-7"})
    print("recorded", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_an_entry_written_is_there_after_the_process_is_killed(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "recorded"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=5)
    # Read as any SQLite reader would (the WAL is replayed), then through a new Ledger.
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        rows = db.execute("SELECT probe, run_id, variables FROM objects").fetchall()
    assert rows == [("web-form", "run1", '{"ticket_id": "TKT-7"}')]
    ledger = Ledger.in_directory(tmp_path)
    [entry] = ledger.entries()
    assert (entry.probe, entry.run_id, entry.variables) == ("web-form", "run1", {"ticket_id": "TKT-7"})
    assert entry.owner != ledger.owner
    assert ledger.counts() == {"web-form": 1}  # another process's: counted, not in flight here


async def test_settling_removes_or_keeps_and_only_settled_entries_count(tmp_path: Path) -> None:
    ledger = Ledger.in_directory(tmp_path)
    await ledger.record("web-form", "a", {"ticket_id": "1"})
    await ledger.record("web-form", "b", {"ticket_id": "2"})
    await ledger.record("web-form", "b", {"message_id": "9"})  # a later step extracts more: merged
    assert ledger.counts(["web-form", "other"]) == {"web-form": 0, "other": 0}  # both runs still in flight
    await ledger.settle("web-form", "a", removed=True)
    await ledger.settle("web-form", "b", removed=False)
    assert ledger.counts() == {"web-form": 1}
    await ledger.close()
    reopened = Ledger.in_directory(tmp_path)
    assert [(e.run_id, e.variables) for e in reopened.entries()] == [("b", {"ticket_id": "2", "message_id": "9"})]
    await reopened.close()


async def test_a_directory_that_cannot_be_used_falls_back_to_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    with caplog.at_level(logging.ERROR, logger="canary.ledger"):
        ledger = Ledger.in_directory(blocker / "state")
    assert ledger.path is None
    assert "cannot open the ledger" in caplog.text and "tracked in memory only" in caplog.text
    await ledger.record("web-form", "a", {"ticket_id": "1"})
    await ledger.settle("web-form", "a", removed=False)
    assert ledger.counts() == {"web-form": 1}
    await ledger.close()


async def test_a_file_that_is_not_a_ledger_is_reported_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"this is not an SQLite database, not even close" * 100)
    with caplog.at_level(logging.ERROR, logger="canary.ledger"):
        ledger = Ledger.in_directory(tmp_path)
    assert ledger.path is None and "cannot open the ledger" in caplog.text
    await ledger.close()


# --- the transaction records and settles --------------------------------------------------------------------------

async def test_a_run_records_the_ticket_before_the_next_step_and_settles_it(sandbox: Any, tmp_path: Path) -> None:
    app, url = sandbox
    ledger = Ledger.in_directory(tmp_path)
    seen_during_poll: list[dict[str, str]] = []  # the ledger file, read while the run polls for the agent
    app[FAULTS].update({"agent_delay_seconds": 0.6})

    async def watch() -> None:
        deadline = time.monotonic() + 10
        while not seen_during_poll and time.monotonic() < deadline:
            with sqlite3.connect(tmp_path / FILE_NAME) as db:
                rows = db.execute("SELECT variables FROM objects").fetchall()
            seen_during_poll.extend(json.loads(row[0]) for row in rows)
            await asyncio.sleep(0.02)

    settings = web_form(url)
    probe = building_with(ledger, build_probe)(settings)
    assert isinstance(probe, TransactionProbe)
    watcher = asyncio.create_task(watch())
    result = await run_once(probe, 20.0, Scrubber())
    await watcher
    await probe.close()
    assert result.success, result.message
    assert [set(v) for v in seen_during_poll[:1]] == [{"ticket_id"}]  # on disk while the agent was awaited
    assert seen_during_poll[0]["ticket_id"].startswith("TKT-")
    assert ledger.entries() == []  # removed by the run's own cleanup: the entry went with it
    await ledger.close()


async def test_the_ledger_keeps_no_secret(sandbox: Any, tmp_path: Path) -> None:
    """A cleanup step that sends an extracted token in a secret-named header: the token is not kept, nor is any
    configured credential; what the ledger cannot rebuild is reported, not guessed."""
    app, url = sandbox
    app[FAULTS].update({"delete": "error"})
    base = web_form(url, headers={"Authorization": "Bearer config-secret-value"})
    submit = base.steps[0].model_copy(update={"extract": {"ticket_id": "ticket_id", "delete_token": "message"}})
    delete = base.cleanup[0].model_copy(update={"headers": {"X-Delete-Token": "{delete_token}"}})
    settings = base.model_copy(update={"steps": [submit, *base.steps[1:]], "cleanup": [delete]})
    ledger = Ledger.in_directory(tmp_path)
    probe = building_with(ledger, build_probe)(settings)
    result = await run_once(probe, 20.0, Scrubber(settings.secret_values()))
    await probe.close()
    assert result.reason == "cleanup"
    [entry] = ledger.entries()
    assert set(entry.variables) == {"ticket_id"}
    await ledger.close()
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert b"received" not in stored  # the extracted token (the submit answer's "message")
    assert b"config-secret-value" not in stored and b"Authorization" not in stored
    app[FAULTS].reset()
    leftover = TransactionProbe(settings)
    problem = await leftover.remove_leftover(entry.variables)
    await leftover.close()
    assert problem == "delete_ticket: the ledger entry does not hold delete_token"


# --- the janitor ---------------------------------------------------------------------------------------------------

def open_ticket(app: Any, subject: str = f"{MARKER} abc", age: float = 0.0, synthetic: bool = True) -> str:
    ticket = app[DESK].open({"subject": subject, "message": "m"}, synthetic=synthetic)
    ticket.created -= age
    return ticket.ticket_id


async def test_leftovers_are_removed_once_no_run_can_own_them(sandbox: Any, tmp_path: Path) -> None:
    app, url = sandbox
    settings = web_form(url, timeout="2s", cleanup_timeout="1s")
    ledger = Ledger.in_directory(tmp_path)
    old, young, gone = open_ticket(app), open_ticket(app), "TKT-404"
    # Another process's entries (a killed daemon's): one older than the run's bound, one just made, one whose
    # ticket was deleted meanwhile (the platform answers 404: gone, dropped all the same).
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        now = time.time()
        db.executemany("INSERT INTO objects VALUES (?, ?, ?, ?, ?)", [
            ("web-form", "old", json.dumps({"ticket_id": old}), now - 60, "dead-process"),
            ("web-form", "young", json.dumps({"ticket_id": young}), now, "dead-process"),
            ("web-form", "gone", json.dumps({"ticket_id": gone}), now - 60, "dead-process"),
        ])
    ledger = Ledger.in_directory(tmp_path)
    janitor = Janitor(ledger, build_probe)
    wait = await janitor.clean([settings])
    assert {e.run_id for e in ledger.entries()} == {"young"}
    assert old not in app[DESK].tickets and young in app[DESK].tickets
    # The young one falls due when a run that made it would have ended: timeout 2 s + cleanup 1 s + 5 s.
    assert 6.0 < wait <= 8.0
    await asyncio.sleep(wait)
    await janitor.clean([settings])
    assert ledger.entries() == [] and young not in app[DESK].tickets
    await ledger.close()


async def test_a_refused_delete_stays_counted_and_is_retried(sandbox: Any, tmp_path: Path) -> None:
    app, url = sandbox
    settings = web_form(url)
    ledger = Ledger.in_directory(tmp_path)
    app[FAULTS].update({"delete": "error"})
    probe = building_with(ledger, build_probe)(settings)
    result = await run_once(probe, 20.0, Scrubber())
    await probe.close()
    assert result.reason == "cleanup"
    assert ledger.counts(["web-form"]) == {"web-form": 1}
    janitor = Janitor(ledger, build_probe, retry_every=0.2)
    await janitor.clean([settings])  # still refused
    assert ledger.counts() == {"web-form": 1}
    app[FAULTS].reset()
    await asyncio.sleep(0.3)
    await janitor.clean([settings])
    assert ledger.counts(["web-form"]) == {"web-form": 0}
    assert [t for t in app[DESK].tickets.values() if t.synthetic] == []
    await ledger.close()


async def test_an_unconfigured_probes_entries_stay_counted_and_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger.in_directory(tmp_path)
    await ledger.record("renamed-probe", "r1", {"ticket_id": "TKT-1"}, in_flight=False)
    await ledger.record("renamed-probe", "r2", {"ticket_id": "TKT-2"}, in_flight=False)
    janitor = Janitor(ledger, build_probe)
    with caplog.at_level(logging.WARNING, logger="canary.janitor"):
        await janitor.clean([])
        await janitor.clean([])
    lines = [r.getMessage() for r in caplog.records if "renamed-probe" in r.getMessage()]
    assert len(lines) == 1 and "holds 2 objects probe renamed-probe created" in lines[0]
    assert ledger.counts() == {"renamed-probe": 2}
    await ledger.close()


# --- the sweep ------------------------------------------------------------------------------------------------------

def sweep(**overrides: Any) -> dict[str, Any]:
    return {"url": "/support/tickets", "items": "tickets", "match": ['subject matches "^\\\\[canary\\\\] synthetic"'],
            "created": "created_at", "extract": {"ticket_id": "ticket_id"}, "every": "1s", "min_age": "30s", **overrides}


async def test_the_sweep_removes_old_synthetic_tickets_and_nothing_else(sandbox: Any, tmp_path: Path) -> None:
    app, url = sandbox
    settings = web_form(url, timeout="10s", cleanup_timeout="1s", sweep=sweep())
    orphan = open_ticket(app, age=120)  # a kill between the submit and its answer: no ledger knows it
    in_flight = open_ticket(app, age=5)  # may be a run's of another replica: too young
    customer = open_ticket(app, subject="My order never came", age=3600, synthetic=False)
    ledger = Ledger.in_directory(tmp_path)
    janitor = Janitor(ledger, build_probe)
    await janitor.clean([settings], sweeping=[settings])
    assert set(app[DESK].tickets) == {in_flight, customer}
    assert orphan not in app[DESK].tickets and ledger.entries() == []
    # The swept-in entry is durable like any other while its delete fails.
    old_again = open_ticket(app, age=120)
    app[FAULTS].update({"delete": "error"})
    await asyncio.sleep(1.1)  # the sweep's `every`
    await janitor.clean([settings], sweeping=[settings])
    assert old_again in app[DESK].tickets and ledger.counts() == {"web-form": 1}
    await asyncio.sleep(1.1)
    await janitor.clean([settings], sweeping=[settings])  # found again: not counted twice
    assert ledger.counts() == {"web-form": 1}
    await ledger.close()


async def test_a_failed_listing_is_a_reason_not_a_crash(sandbox: Any) -> None:
    _, url = sandbox
    probe = TransactionProbe(web_form(url, sweep=sweep(url="/support/no-such-listing")))
    found, problem = await probe.find_leftovers(time.time())
    await probe.close()
    assert found == [] and problem == "listing: HTTP 404, expected 2xx"


SWEEP_PROBE = """
[[probes]]
name = "web-form"
type = "transaction"
channel = "web_form"
base_url = "http://127.0.0.1:1"
timeout = "20s"
cleanup_timeout = "5s"
{cleanup}
[[probes.steps]]
name = "submit"
method = "POST"
url = "/support/submit"
extract = {{ ticket_id = "ticket_id" }}

[probes.sweep]
url = "/support/tickets"
items = "tickets"
match = ['subject matches "^\\\\[canary\\\\]"']
created = "created_at"
extract = {{ {extract} }}
min_age = "{min_age}"
"""
CLEANUP = '[[probes.cleanup]]\nname = "delete_ticket"\nmethod = "DELETE"\nurl = "/support/ticket/{ticket_id}"\n'


@pytest.mark.parametrize(("cleanup", "extract", "min_age", "problem"), [
    ("", 'ticket_id = "ticket_id"', "10m", "probes[0]: sweep needs cleanup steps: they remove what it finds"),
    (CLEANUP, 'id = "ticket_id"', "10m",
     "probes[0]: sweep.extract must give every value the cleanup steps use (missing: ticket_id)"),
    (CLEANUP, 'ticket_id = "ticket_id"', "20s",
     "probes[0].sweep.min_age: 20s is shorter than a run may last (timeout 20s + cleanup_timeout 5s): it could "
     "delete the ticket of a run in flight"),
], ids=["no-cleanup", "missing-variable", "too-young"])
def test_a_sweep_that_could_do_harm_is_refused_at_load(
    tmp_path: Path, cleanup: str, extract: str, min_age: str, problem: str
) -> None:
    from canary.config import ConfigError

    path = write_config(tmp_path, SWEEP_PROBE.format(cleanup=cleanup, extract=extract, min_age=min_age))
    with pytest.raises(ConfigError) as error:
        load_config(path, PROBE_TYPES)
    assert error.value.problems == [problem]


# --- the daemon, killed -----------------------------------------------------------------------------------------

DAEMON_CONFIG = """
[daemon]
jitter = "100ms"

[[probes]]
name = "web-form"
type = "transaction"
channel = "web_form"
base_url = "{platform}"
interval = "30s"
timeout = "5s"
cleanup_timeout = "1s"

[[probes.steps]]
name = "submit"
method = "POST"
url = "/support/submit"
expect_status = [201]
extract = {{ ticket_id = "ticket_id" }}
json = {{ name = "Canary", email = "canary@example.com", subject = "{marker} {{run_id}}", message = "synthetic" }}

[[probes.steps]]
name = "agent_reply"
url = "/support/ticket/{{ticket_id}}"
expect = ['status != "open"']
poll = {{ every = "100ms", within = "4s" }}

[[probes.cleanup]]
name = "delete_ticket"
method = "DELETE"
url = "/support/ticket/{{ticket_id}}"
expect_status = ["2xx", 404]

[probes.sweep]
url = "/support/tickets"
items = "tickets"
match = ['subject matches "^\\\\[canary\\\\] synthetic check"']
created = "created_at"
extract = {{ ticket_id = "ticket_id" }}
every = "2s"
min_age = "6s"
"""


def set_faults(platform: str, faults: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{platform}/_sandbox/faults", data=json.dumps(faults).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def listed(platform: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{platform}/support/tickets")
    assert status == 200
    return json.loads(body)["tickets"]


def synthetic(platform: str) -> list[str]:
    return [t["ticket_id"] for t in listed(platform) if t["subject"].startswith(MARKER)]


def start_daemon(config: Path, state_dir: Path, port: int) -> Process:
    daemon = Process(probe_command("run", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                   "--state.dir", str(state_dir)), cwd=ROOT)
    wait_for_port(port, daemon)
    return daemon


def kill(daemon: Process) -> None:
    daemon.popen.send_signal(signal.SIGKILL)
    daemon.popen.wait(timeout=10)
    daemon.stop()


def orphaned(port: int) -> float | None:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    for line in body.splitlines():
        if line.startswith('canary_orphaned_objects{probe="web-form"'):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("killed_while", ["waiting for the agent", "waiting for the submit's answer"])
def test_a_killed_daemon_leaves_no_synthetic_ticket_after_its_restart(
    sandbox_process: str, tmp_path: Path, killed_while: str
) -> None:
    """Waiting for the agent, the ticket id is in the ledger: the restarted daemon's janitor removes it. Waiting for
    the submit's answer, no one ever learned the id: the sweep finds the ticket by its subject and age."""
    platform = sandbox_process
    config = write_config(tmp_path, DAEMON_CONFIG.format(platform=platform, marker=MARKER))
    state_dir = tmp_path / "state"
    port = free_port()
    if killed_while == "waiting for the agent":
        set_faults(platform, {"agent_delay_seconds": 60})
    else:
        set_faults(platform, {"submit": "slow", "slow_seconds": 60})
    daemon = start_daemon(config, state_dir, port)
    try:
        wait_for(lambda: len(synthetic(platform)) == 1, timeout=20, what="the canary's ticket on the platform")
        if killed_while == "waiting for the agent":
            wait_for(lambda: (state_dir / FILE_NAME).exists() and ledger_rows(state_dir) == 1, timeout=10,
                     what="the ticket id in the ledger")
        assert daemon.popen.poll() is None
        kill(daemon)
        [left] = synthetic(platform)  # the kill left it: nothing cleaned up after it
        set_faults(platform, {"agent_delay_seconds": 0.2, "submit": "ok"})
        daemon = start_daemon(config, state_dir, port)
        # Within one pass that may touch it: the run's bound (5 s + 1 s + 5 s) or min_age (6 s) plus a sweep (2 s).
        wait_for(lambda: left not in {t["ticket_id"] for t in listed(platform)}, timeout=45,
                 what=f"the ticket {left} the killed daemon left, removed")
        wait_for(lambda: orphaned(port) == 0, timeout=15, what="canary_orphaned_objects back at 0")
        # Removed by the ledger's entry, or by the sweep: the log says which.
        said = ("removed what run" if killed_while == "waiting for the agent"
                else "the sweep found 1 synthetic objects no ledger knew of")
        wait_for(lambda: said in daemon.output(), timeout=10, what=f"the log saying {said!r}")
    finally:
        daemon.stop()
    assert synthetic(platform) == []  # the restarted daemon's own runs cleaned up after themselves too


def ledger_rows(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / FILE_NAME) as db:
        return db.execute("SELECT count(*) FROM objects").fetchone()[0]


def test_with_deletes_failing_the_gauge_rises(sandbox_process: str, tmp_path: Path) -> None:
    platform = sandbox_process
    config = write_config(tmp_path, DAEMON_CONFIG.replace("interval = \"30s\"", "interval = \"2s\"").replace(
        'timeout = "5s"', 'timeout = "1500ms"').replace('within = "4s"', 'within = "1s"').replace(
        'min_age = "6s"', 'min_age = "10m"').format(platform=platform, marker=MARKER))
    set_faults(platform, {"delete": "error"})
    port = free_port()
    daemon = start_daemon(config, tmp_path / "state", port)
    try:
        wait_for(lambda: orphaned(port) == 0, timeout=15, what="the gauge at 0 for the running transaction probe")
        wait_for(lambda: (orphaned(port) or 0) >= 2, timeout=30, what="canary_orphaned_objects rising")
        first = orphaned(port) or 0
        wait_for(lambda: (orphaned(port) or 0) > first, timeout=30, what="canary_orphaned_objects rising further")
        assert len(synthetic(platform)) >= first  # every counted ticket is really still there
        _, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert "# TYPE canary_orphaned_objects gauge" in body
    finally:
        daemon.stop()


# --- probe --once ------------------------------------------------------------------------------------------------

def test_once_removes_due_leftovers_and_records_its_own(sandbox_process: str, tmp_path: Path) -> None:
    platform = sandbox_process
    config = write_config(tmp_path, DAEMON_CONFIG.format(platform=platform, marker=MARKER))
    state_dir = state_directory(None, None, config)  # --once uses the config's default directory
    # A ticket a killed run left a minute ago, in the ledger of that state directory.
    request = urllib.request.Request(
        f"{platform}/support/submit", method="POST", headers={"Content-Type": "application/json", "X-Synthetic-Canary": "1"},
        data=json.dumps({"name": "c", "email": "c@example.com", "subject": f"{MARKER} old", "message": "m"}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        old = json.loads(response.read())["ticket_id"]
    asyncio.run(Ledger.in_directory(state_dir).close())  # creates the file and its schema
    with sqlite3.connect(state_dir / FILE_NAME) as db:
        db.execute("INSERT INTO objects VALUES ('web-form', 'killed', ?, ?, 'dead')",
                   (json.dumps({"ticket_id": old}), time.time() - 60))
    set_faults(platform, {"delete": "error", "agent_delay_seconds": 0.2})
    done = subprocess.run(probe_command("--once", "--config", str(config), "--format", "json"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    report = json.loads(done.stdout)
    assert report["results"][0]["reason"] == "cleanup"  # its own delete was refused…
    with sqlite3.connect(state_dir / FILE_NAME) as db:
        rows = db.execute("SELECT run_id FROM objects").fetchall()
    assert len(rows) == 2 and ("killed",) in rows  # …so its ticket is recorded beside the old one (refused too)
    set_faults(platform, {"delete": "ok"})
    again = subprocess.run(probe_command("--once", "--config", str(config), "--format", "json"), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert json.loads(again.stdout)["results"][0]["success"]
    with sqlite3.connect(state_dir / FILE_NAME) as db:
        remaining = db.execute("SELECT run_id FROM objects").fetchall()
    # The old one is removed at the start; the first --once's own is another process's, younger than its bound.
    assert ("killed",) not in remaining and len(remaining) <= 1
    assert old not in {t["ticket_id"] for t in listed(platform)}
