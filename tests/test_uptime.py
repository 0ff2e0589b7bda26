"""The uptime book: hourly buckets, the 1 h / 24 h / 7 d figures from fabricated timestamps, the saved file (round
trip, atomic replace, bad files ignored), and the daemon keeping it across a restart."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from array import array
from pathlib import Path
from typing import Literal

import pytest

from canary.contract import ProbeSettings, Result
from canary.state import ResultStore
from canary.uptime import BUCKETS, FILE_NAME, FORMAT, HOUR, Availability, UptimeBook
from tests.conftest import Process, ROOT, free_port, http_get, probe_command, wait_for, wait_for_port, write_config

# An hour boundary (2027-01-15 08:00 UTC), so the fabricated runs land in known buckets.
T0 = 1_800_000_000 - 1_800_000_000 % 3600


def figures(book: UptimeBook, name: str, now: float) -> dict[str, tuple[float, float]]:
    return {window: (round(a.runs, 6), round(a.failures, 6)) for window, a in book.probe(name, now).items()}


# --- buckets and windows ------------------------------------------------------------------------------------------


def test_windows_from_fabricated_runs() -> None:
    book = UptimeBook()
    # One run a minute for 8 days up to T0; every run in the hour that started 3 h before T0 and in the one that
    # started 2 days before T0 failed.
    for minute in range(8 * 24 * 60):
        wall = T0 - 1 - minute * 60  # the last run ends a second before T0, inside the hour before it
        hours_back = minute // 60 + 1  # 1: the hour just before T0
        book.add("form", wall, success=hours_back not in (3, 48), duration_seconds=0.5)

    at_boundary = figures(book, "form", T0)
    assert at_boundary["1h"] == (60, 0)  # exactly the last full hour
    assert at_boundary["24h"] == (24 * 60, 60)  # one failing hour of 24
    # The ring holds 168 hours: at a boundary the last 168 full hours are the whole 7 days, two failing ones.
    assert at_boundary["7d"] == (168 * 60, 120)
    uptime = book.probe("form", T0)
    assert uptime["24h"].ratio == pytest.approx(1 - 1 / 24)
    assert uptime["7d"].ratio == pytest.approx(1 - 2 / 168)
    assert uptime["24h"].mean_latency == pytest.approx(0.5)


def test_the_oldest_bucket_counts_in_proportion_to_its_overlap() -> None:
    book = UptimeBook()
    for minute in range(60):  # the hour before T0: 60 runs, 20 of them failed
        book.add("hook", T0 - HOUR + minute * 60, success=minute >= 20, duration_seconds=0.1)
    for minute in range(15):  # the first quarter of the hour from T0: 15 passing runs
        book.add("hook", T0 + minute * 60, success=True, duration_seconds=0.1)

    now = T0 + 15 * 60
    # "1 h" at 08:15 is the runs since 08:00 plus three quarters of the 07:00 bucket.
    assert figures(book, "hook", now)["1h"] == (15 + 45, 15)
    assert figures(book, "hook", now)["24h"] == (75, 20)
    assert book.probe("hook", now)["1h"].ratio == pytest.approx(1 - 15 / 60)


def test_an_hour_rolls_over_into_its_own_bucket_and_a_week_later_reuses_the_slot() -> None:
    book = UptimeBook()
    book.add("db", T0 + 3599, False, 1.0)  # the last second of the hour
    book.add("db", T0 + 3600, True, 1.0)  # the next hour: another bucket
    assert figures(book, "db", T0 + 3600)["1h"] == (2, 1)  # the hour before counts in full at the boundary
    assert figures(book, "db", T0 + 7200)["1h"] == (1, 0)  # ...and not at all an hour later

    # 168 hours after T0 the ring comes round to T0's slot: the old bucket is replaced, not added to.
    week_later = T0 + BUCKETS * HOUR
    book.add("db", week_later + 10, True, 1.0)
    assert figures(book, "db", week_later + 20)["7d"] == (2, 0)  # T0 + 1 h, and the new one; T0's failure is gone
    # A run older than the bucket now in its slot is dropped rather than mixed into it.
    book.add("db", T0 + 5, False, 1.0)
    assert figures(book, "db", week_later + 20)["7d"] == (2, 0)


def test_a_probe_without_runs_has_no_ratio_and_combined_probes_add_up() -> None:
    book = UptimeBook()
    assert all(a.ratio is None and a.runs == 0 for a in book.probe("never", T0).values())
    for second in range(10):
        book.add("a", T0 + second, True, 0.1)
        book.add("b", T0 + second, second >= 5, 0.3)
    both = UptimeBook.combine([book.probe("a", T0 + 60), book.probe("b", T0 + 60)])
    assert (both["1h"].runs, both["1h"].failures) == (20, 5)
    assert both["1h"].ratio == pytest.approx(0.75)
    assert both["1h"].mean_latency == pytest.approx(0.2)
    assert Availability(3, 1, 0.3).as_json() == {"ratio": 0.666667, "runs": 3, "failures": 1, "mean_latency_seconds": 0.1}


class PlainSettings(ProbeSettings):
    type: Literal["plain"] = "plain"


def test_fed_by_the_result_store_listener_and_keep_drops_removed_probes() -> None:
    probes = [PlainSettings(name=name, channel="api", interval="30s", timeout="5s") for name in ("stays", "goes")]
    store = ResultStore((1.0,), 5)
    store.sync(probes, (1.0,), 5)
    book = UptimeBook()
    store.add_listener(book.observe)
    store.record("stays", Result.ok(duration_seconds=0.2), T0 + 1)
    store.record("goes", Result.fail("status", "HTTP 500", duration_seconds=0.4), T0 + 2)
    store.record("unknown", Result.ok(), T0 + 3)  # removed by a reload while it ran: the store drops it
    assert figures(book, "stays", T0 + 10)["1h"] == (1, 0)
    assert figures(book, "goes", T0 + 10)["1h"] == (1, 1)
    assert sorted(book.names()) == ["goes", "stays"]

    book.keep(["stays"])
    assert book.names() == ["stays"]
    assert figures(book, "goes", T0 + 10)["1h"] == (0, 0)


# --- the file ------------------------------------------------------------------------------------------------------


def filled_book(path: Path | None) -> UptimeBook:
    book = UptimeBook(path)
    for minute in range(3 * 24 * 60):
        book.add("form", T0 - minute * 60 - 1, minute % 100 != 0, 0.25)
        if minute % 7 == 0:
            book.add("db", T0 - minute * 60 - 1, True, 0.01)
    return book


def test_saved_and_loaded_buckets_give_the_same_figures(tmp_path: Path) -> None:
    path = tmp_path / "state" / FILE_NAME  # the directory does not exist yet: the save makes it
    book = filled_book(path)
    assert book.save()

    document = json.loads(path.read_text())
    assert (document["format"], document["version"], document["bucket_seconds"]) == (FORMAT, 2, 3600)
    assert sorted(document["probes"]) == ["db", "form"]
    assert [p.name for p in path.parent.iterdir()] == [FILE_NAME]  # no temporary file left behind

    loaded = UptimeBook(path)
    assert loaded.load()
    for name in ("form", "db"):
        for now in (T0, T0 + 1234, T0 - 86400 + 17):
            assert loaded.probe(name, now) == book.probe(name, now)


def test_a_version_1_file_with_every_slot_is_still_read(tmp_path: Path) -> None:
    """Version 1 kept all 168 slots of the ring (slot = hour % 168, empty ones zero); a daemon upgraded in place
    reads it and gives the same figures."""
    book = filled_book(None)
    probes = {}
    for name, buckets in book.snapshot().items():
        slots = {field: array(code, bytes(array(code).itemsize * BUCKETS)) for field, code in
                 (("hours", "i"), ("runs", "I"), ("failures", "I"), ("latency_sum", "d"))}
        for index, hour in enumerate(buckets.hours):
            for field in slots:
                slots[field][hour % BUCKETS] = getattr(buckets, field)[index]
        probes[name] = {field: base64.b64encode(values.tobytes()).decode() for field, values in slots.items()}
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "bucket_seconds": 3600, "probes": probes}))
    loaded = UptimeBook(path)
    assert loaded.load()
    for name in ("form", "db"):
        for now in (T0, T0 + 1234, T0 - 86400 + 17):
            read, kept = loaded.probe(name, now), book.probe(name, now)
            for window in kept:  # the same buckets, added up in another order
                assert (read[window].runs, read[window].failures, read[window].latency_sum) == pytest.approx(
                    (kept[window].runs, kept[window].failures, kept[window].latency_sum))


def test_a_probe_holds_one_bucket_per_hour_seen_and_never_more_than_a_week() -> None:
    """20 bytes a probe in its first hour (10,000 probes: 0.2 MB, where a full ring each was 34 MB)."""
    book = UptimeBook(None)
    for minute in range(30):
        book.add("new", T0 + minute * 60, True, 0.1)
    assert len(book.snapshot()["new"].hours) == 1
    for hour in range(1, 400):
        book.add("new", T0 + hour * HOUR, hour % 2 == 0, 0.1)
    kept = book.snapshot()["new"]
    assert len(kept.hours) == BUCKETS
    assert sorted(kept.hours) == list(range(int(T0 // HOUR) + 400 - BUCKETS, int(T0 // HOUR) + 400))
    book.add("new", T0 + 100 * HOUR, True, 0.1)  # a run from before the week kept: ignored
    assert sorted(book.snapshot()["new"].hours) == sorted(kept.hours)


def test_a_save_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    book = filled_book(path)
    assert book.save()
    first_inode = path.stat().st_ino
    book.keep(["db"])
    assert book.save()
    assert path.stat().st_ino != first_inode  # a new file renamed over the old one, never rewritten in place
    assert sorted(json.loads(path.read_text())["probes"]) == ["db"]


def _valid_document() -> dict:  # type: ignore[type-arg]
    path_less = filled_book(None)
    return {"format": FORMAT, "version": 2, "bucket_seconds": 3600,
            "probes": {name: path_less.snapshot()[name].encode() for name in path_less.names()}}


DB_HOURS = len(filled_book(None).snapshot()["db"].hours)  # the buckets the "db" probe of filled_book holds


def _corrupt(document: dict, name: str, field: str, values: array) -> dict:  # type: ignore[type-arg]
    document["probes"][name][field] = base64.b64encode(values.tobytes()).decode()
    return document


BAD_FILES = [
    pytest.param(b"\x00\x01garbage", "not valid JSON", id="binary-garbage"),
    pytest.param(json.dumps(_valid_document()).encode()[:-40], "not valid JSON", id="truncated"),
    pytest.param(b'{"groups": []}', "not a channel-canary uptime file", id="foreign-json"),
    pytest.param(b"[1, 2, 3]", "not a channel-canary uptime file", id="json-array"),
    pytest.param(json.dumps({**_valid_document(), "version": 3}).encode(), "written in another layout", id="newer-version"),
    pytest.param(json.dumps({**_valid_document(), "bucket_seconds": 60}).encode(), "written in another layout", id="other-bucket-size"),
    pytest.param(json.dumps({**_valid_document(), "probes": []}).encode(), '"probes" is not an object', id="probes-not-an-object"),
    pytest.param(json.dumps(_corrupt(_valid_document(), "db", "runs", array("I", [1] * 10))).encode(),
                 "probe 'db': its arrays differ in length", id="short-array"),
    pytest.param(json.dumps(_corrupt(_valid_document(), "db", "runs", array("I", [1] * (BUCKETS + 1)))).encode(),
                 "probe 'db': runs does not hold at most 168 whole values", id="too-long-array"),
    pytest.param(json.dumps({**_corrupt(_valid_document(), "db", "runs", array("I", [1] * 10)), "version": 1}).encode(),
                 "probe 'form': hours does not hold 168 values", id="version-1-short-array"),
    pytest.param(json.dumps(_corrupt(_valid_document(), "db", "failures", array("I", [99] * DB_HOURS))).encode(),
                 "probe 'db': a bucket has a negative hour, or more failures than runs", id="more-failures-than-runs"),
    pytest.param(json.dumps(_corrupt(_valid_document(), "db", "latency_sum", array("d", [float("nan")] * DB_HOURS))).encode(),
                 "probe 'db': a bucket has a negative or non-finite latency sum", id="nan-latency"),
    pytest.param(json.dumps({**_valid_document(), "probes": {"db": {"hours": "!!", "runs": "", "failures": "", "latency_sum": ""}}}).encode(),
                 "probe 'db': hours is not base64", id="not-base64"),
    pytest.param("\udcff".encode("utf-8", "surrogatepass"), "cannot read the uptime history", id="not-utf8"),
]


@pytest.mark.parametrize(("content", "logged"), BAD_FILES)
def test_a_corrupt_or_foreign_file_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, logged: str
) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(content)
    book = UptimeBook(path)
    with caplog.at_level(logging.WARNING, logger="canary.uptime"):
        assert book.load() is False
    assert book.names() == []
    assert logged in caplog.text
    # Starting empty, the next save replaces the bad file with a good one.
    book.add("form", T0, True, 0.1)
    assert book.save()
    assert UptimeBook(path).load()


def test_no_file_yet_and_no_state_dir_are_not_problems(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="canary.uptime"):
        assert UptimeBook(tmp_path / FILE_NAME).load() is False
        in_memory = UptimeBook.in_directory(None)
        assert in_memory.load() is False and in_memory.save() is False
    assert caplog.text == ""


def test_a_save_that_cannot_write_is_logged_once_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    book = filled_book(blocker / FILE_NAME)
    with caplog.at_level(logging.INFO, logger="canary.uptime"):
        assert book.save() is False
        assert book.save() is False
    assert caplog.text.count("cannot save the uptime history") == 1
    blocker.unlink()
    with caplog.at_level(logging.INFO, logger="canary.uptime"):
        assert book.save() is True
    assert "saved to" in caplog.text and (blocker / FILE_NAME).exists()


async def test_save_every_writes_in_the_background_only_when_something_changed(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    book = UptimeBook(path)
    saver = asyncio.create_task(book.save_every(0.05))
    try:
        await asyncio.sleep(0.2)
        assert not path.exists()  # nothing recorded, nothing written
        book.add("form", T0, True, 0.1)
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.05)
        assert path.exists()
        written = path.stat().st_mtime_ns
        await asyncio.sleep(0.3)
        assert path.stat().st_mtime_ns == written  # unchanged since: not rewritten
    finally:
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)


# --- the daemon keeps it across a restart ------------------------------------------------------------------------


def _daemon_config(tmp_path: Path, platform: str, probes: tuple[str, ...] = ("api-health", "api-ping")) -> Path:
    body = """
        [daemon]
        interval = "1s"
        timeout = "900ms"
        jitter = "100ms"
        shutdown_grace = "1s"
    """
    for name in probes:
        body += f"""
        [[probes]]
        name = "{name}"
        type = "http"
        channel = "api"
        url = "{platform}/health"
        """
    return write_config(tmp_path, body)


def _uptime_runs(base: str) -> dict[str, int]:
    status, body = http_get(f"{base}/status.json")
    assert status == 200
    return {probe["name"]: probe["uptime"]["7d"]["runs"] for probe in json.loads(body)["probes"]}


def _start(config: Path, state_dir: Path) -> tuple[Process, str]:
    port = free_port()
    process = Process(probe_command("run", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                    "--state.dir", str(state_dir)), cwd=ROOT)
    wait_for_port(port, process)
    return process, f"http://127.0.0.1:{port}"


def test_the_daemon_keeps_uptime_across_a_restart_and_drops_removed_probes(tmp_path: Path, sandbox_process: str) -> None:
    state_dir = tmp_path / "state"
    config = _daemon_config(tmp_path, sandbox_process)
    process, base = _start(config, state_dir)
    try:
        wait_for(lambda: min(_uptime_runs(base).values()) >= 2, timeout=15, what="two runs of each probe")
    finally:
        assert process.stop() == 0
    saved = json.loads((state_dir / FILE_NAME).read_text())  # written on shutdown, well before the first minute
    assert sorted(saved["probes"]) == ["api-health", "api-ping"]

    # Restarted without api-ping: api-health's runs carry on from the file, api-ping's are dropped.
    config = _daemon_config(tmp_path, sandbox_process, probes=("api-health",))
    saved_runs = _saved_runs(state_dir / FILE_NAME, "api-health")
    process, base = _start(config, state_dir)
    try:
        # The loaded runs show at once (at least two, where a count from 0 would be at most one run yet), and a run
        # after the restart adds to them.
        assert saved_runs >= 2 and _uptime_runs(base).get("api-health", 0) >= saved_runs
        wait_for(lambda: _uptime_runs(base).get("api-health", 0) > saved_runs, timeout=15, what="a run after the restart")
        assert "loaded the uptime history of 2 probes" in process.output()
    finally:
        assert process.stop() == 0
    assert sorted(json.loads((state_dir / FILE_NAME).read_text())["probes"]) == ["api-health"]


def _saved_runs(path: Path, name: str) -> int:
    raw = base64.b64decode(json.loads(path.read_text())["probes"][name]["runs"])
    return sum(array("I", raw))


def test_the_daemon_starts_on_a_corrupt_file_and_replaces_it(tmp_path: Path, sandbox_process: str) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / FILE_NAME).write_text('{"format": "channel-canary/uptime", "version": 1, "bucket_seconds": 3600, "probes": {"api-health": 7}}')
    process, base = _start(_daemon_config(tmp_path, sandbox_process), state_dir)
    try:
        wait_for(lambda: min(_uptime_runs(base).values()) >= 1, timeout=15, what="a run of each probe")
    finally:
        assert process.stop() == 0
    assert "ignoring the uptime history" in process.log_path.read_text()  # a warning, not a failed start
    assert sorted(json.loads((state_dir / FILE_NAME).read_text())["probes"]) == ["api-health", "api-ping"]
