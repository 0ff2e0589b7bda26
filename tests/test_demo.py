"""`scripts/demo.sh`, the newcomer's first command: it must stop both of its processes however it is stopped."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.conftest import ROOT, Process, free_port, port_open, wait_for, wait_for_port


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in task.read_text().split()]
    return found


def test_a_sigterm_to_the_demo_stops_the_sandbox_and_the_daemon() -> None:
    sandbox_port, daemon_port = free_port(), free_port()
    process = Process(["bash", str(ROOT / "scripts" / "demo.sh"), "--listen", f"127.0.0.1:{daemon_port}"],
                      env={"SANDBOX_LISTEN": f"127.0.0.1:{sandbox_port}"}, cwd=ROOT)
    started: list[int] = []
    try:
        wait_for_port(sandbox_port, process, timeout=120)  # the script first runs `pip install -e .`
        wait_for_port(daemon_port, process, timeout=30)
        started = children(process.popen.pid)
        assert len(started) == 2, started
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=30) == 143
        assert not port_open("127.0.0.1", sandbox_port) and not port_open("127.0.0.1", daemon_port)
        assert all(not Path(f"/proc/{pid}").exists() for pid in started), started
        output = process.output()
        assert "canary.daemon: stopped" in output and output.rstrip().endswith("demo: sandbox and daemon stopped")
    finally:
        process.stop()
        for pid in started:  # only if the script failed to: end what it started, by pid, within a bounded wait
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in started), timeout=10, what="demo children gone")
