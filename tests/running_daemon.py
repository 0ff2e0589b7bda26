"""`probe run` as a subprocess with a state directory, reloaded with SIGHUP and restarted, read over /metrics.

For tests that follow one daemon through reloads and restarts (tests/test_probe_state.py, tests/test_kafka_lag.py).
"""

from __future__ import annotations

import json
import signal
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Process, ROOT, free_port, http_get, probe_command, wait_for, wait_for_port


def metrics(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    _, text = http_get(f"{base}/metrics")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def figure(base: str, name: str, probe: str, **labels: str) -> float | None:
    """One sample of `probe` (with these labels too), or None when it is not exported."""
    wanted = {("probe", probe), *labels.items()}
    for (sample, sample_labels), value in metrics(base).items():
        if sample == name and wanted <= sample_labels:
            return value
    return None


def runs(base: str, probe: str) -> float:
    """Runs of `probe` since its settings last changed (a reload that changes them starts them at 0)."""
    return sum(figure(base, "canary_probe_runs_total", probe, result=result) or 0 for result in ("success", "failure"))


def post_json(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()


def get_json(url: str) -> Any:
    status, body = http_get(url)
    assert status == 200, body
    return json.loads(body)


@contextmanager
def sandbox_process() -> Iterator[str]:
    """A sandbox process of this test's own (`probe sandbox`), e.g. another provider or platform."""
    port = free_port()
    process = Process(probe_command("sandbox", "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


class RunningDaemon:
    """`probe run` on a free port with `--state.dir`; `stop` and `start` again to restart it. As a context manager it
    starts, and stops whatever still runs at the end."""

    def __init__(self, config: Path, state_dir: Path) -> None:
        self.config, self.state_dir = config, state_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None
        self._ended: list[str] = []  # the output of the processes that ended

    def start(self) -> "RunningDaemon":
        self.process = Process(probe_command("run", "--config", str(self.config), "--listen", f"127.0.0.1:{self.port}",
                                             "--state.dir", str(self.state_dir)), cwd=ROOT)
        wait_for_port(self.port, self.process)
        return self

    def __enter__(self) -> "RunningDaemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.stop()

    def output(self) -> str:
        """Everything every process of this daemon logged."""
        return "".join(self._ended) + (self.process.output() if self.process else "")

    def stop(self) -> int:
        """SIGTERM; the exit code."""
        assert self.process is not None
        code = self.process.stop()
        self._ended.append(self.process.log_path.read_text(errors="replace"))
        self.process = None
        return code

    def reload(self, text: str) -> float:
        """Write the config, SIGHUP, and wait until the reload applied; returns when it did (Unix time)."""
        assert self.process is not None
        before = self.reloaded_at()
        self.config.write_text(text)
        self.process.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: self.reloaded_at() > before or not self._last_reload_successful(), what="the reload to finish")
        assert self._last_reload_successful(), f"the reload failed:\n{self.output()}"
        return self.reloaded_at()

    def _last_reload_successful(self) -> bool:
        return next(value for (name, _), value in metrics(self.base).items()
                    if name == "canary_config_last_reload_successful") == 1

    def reloaded_at(self) -> float:
        return next(value for (name, _), value in metrics(self.base).items()
                    if name == "canary_config_last_reload_success_timestamp_seconds")

    def wait_for_run_after(self, probe: str, wall_time: float, timeout: float = 20.0) -> None:
        """Until `probe` has recorded a run after `wall_time`: one under the settings applied by then."""
        wait_for(lambda: (figure(self.base, "canary_probe_last_run_timestamp_seconds", probe) or 0) > wall_time,
                 timeout=timeout, what=f"a run of {probe} after {wall_time}")
