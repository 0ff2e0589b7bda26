"""What one `probe run` costs: RSS and CPU from /proc while it runs a config against `probe sandbox`.

    .venv/bin/python bench/resources.py                      # the shipped config.toml, 60 s
    .venv/bin/python bench/resources.py --seconds 120 --config deploy/kubernetes/config.toml

The figures size the Kubernetes requests and limits (deploy/kubernetes/statefulset.yaml) and are quoted in the
README. The sandbox, the daemon and every URL the config probes are on 127.0.0.1 (PostgreSQL and Redis where the
shipped config's defaults point); a config whose secrets come from `*_file` keys (deploy/kubernetes/config.toml)
finds the sandbox's credentials in a temporary CANARY_SECRETS_DIR, one file per key of
deploy/kubernetes/secret.example.yaml. Both children are ended by their pid when the run ends or fails; the sampling
loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from common import HOST, ROOT, Children, free_port, heading, hwm_mb, line, note, probe_executable, proc_cpu_seconds, rss_mb, wait_for_port

SCRAPE_EVERY = 15  # seconds between scrapes of /metrics, as a Prometheus with a 15 s interval would
SECRET_EXAMPLE = ROOT / "deploy" / "kubernetes" / "secret.example.yaml"
# The sandbox's credentials (the shipped config's defaults), under the example Secret's keys.
SANDBOX_SECRETS = {
    "database-url": "postgresql://postgres@127.0.0.1:5432/postgres",
    "twilio-auth-token": "sandbox-twilio-auth-token",
    "gmail-authorized-user.json": (ROOT / "deploy" / "sandbox" / "gmail-authorized-user.json").read_text(),
    "llm-api-key": "sandbox-llm-api-key",
    "redis-url": "redis://127.0.0.1:6379/0",
}


def sandbox_env(base: str, secrets_dir: Path | None = None) -> dict[str, str]:
    """Every URL of the shipped config pointed at a sandbox at `base` (not only PLATFORM_URL: Twilio, Google, the
    LLM and the status page default to 127.0.0.1:8000, which may be another session's sandbox)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CANARY_CONFIG", "CANARY_LISTEN")}
    env.update({
        "PLATFORM_URL": base,
        "TWILIO_API_URL": f"{base}/twilio",
        "GMAIL_API_URL": f"{base}/google",
        "GMAIL_OAUTH_TOKEN_URL": f"{base}/google/token",
        "LLM_BASE_URL": f"{base}/llm/openai/v1",
        "STATUSPAGE_URL": f"{base}/statuspage",
        "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
        "KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:9092",
    })
    if secrets_dir is not None:
        env["CANARY_SECRETS_DIR"] = str(secrets_dir)
    return env


def write_sandbox_secrets(directory: Path) -> None:
    """The sandbox's credentials as Kubernetes would mount the Secret: one file per key of the example Secret."""
    keys = set(yaml.safe_load(SECRET_EXAMPLE.read_text())["stringData"])
    if keys != set(SANDBOX_SECRETS):
        raise SystemExit(f"{SECRET_EXAMPLE} has the keys {sorted(keys)}; SANDBOX_SECRETS has {sorted(SANDBOX_SECRETS)}")
    for key, value in SANDBOX_SECRETS.items():
        (directory / key).write_text(value)


def _scrape(port: int) -> None:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
        answer.read()


def _states(port: int) -> str:
    """What the probes found, from /status.json: proof that they ran while we measured."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/status.json", timeout=5) as answer:
        probes = json.load(answer)["probes"]
    failing = [f"{p['name']} ({p['reason']})" for p in probes if p["state"] != "up"]
    return f"{len(probes) - len(failing)} of {len(probes)} up" + (f"; not up: {', '.join(failing)}" if failing else "")


def run(config: Path, seconds: float) -> None:
    heading(f"`probe run` on {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config} against "
            f"`probe sandbox`, {seconds:g} s, sampled every second from /proc")
    probe = probe_executable()
    if probe is None:
        print("  SKIPPED: no `probe` executable beside the interpreter or on PATH (pip install -e . first)", flush=True)
        return
    with Children() as children, tempfile.TemporaryDirectory(prefix="canary-secrets-") as secrets:
        write_sandbox_secrets(Path(secrets))
        sandbox_port, daemon_port = free_port(), free_port()
        env = sandbox_env(f"http://{HOST}:{sandbox_port}", Path(secrets))
        sandbox = children.start([str(probe), "sandbox", "--listen", f"{HOST}:{sandbox_port}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_for_port(sandbox_port, sandbox)
        started = time.monotonic()
        daemon = children.start([str(probe), "run", "--config", str(config), "--listen", f"{HOST}:{daemon_port}",
                                 "--state.dir", str(Path(secrets) / "state")],  # not the home's default state directory
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        wait_for_port(daemon_port, daemon, timeout=30)
        ready_after = time.monotonic() - started
        startup_cpu = proc_cpu_seconds(daemon.pid)
        startup_rss = rss_mb(daemon.pid)
        samples: list[tuple[float, float, float]] = []  # (monotonic, cpu seconds, rss MB)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and daemon.poll() is None:
            samples.append((time.monotonic(), proc_cpu_seconds(daemon.pid), rss_mb(daemon.pid)))
            if len(samples) % SCRAPE_EVERY == 1:
                _scrape(daemon_port)
            time.sleep(1.0)
        if daemon.poll() is not None:
            print(f"  FAILED: the daemon exited with {daemon.returncode} after {time.monotonic() - started:.0f} s", flush=True)
            return
        peak = hwm_mb(daemon.pid)
        states = _states(daemon_port)
        children.stop(daemon, timeout=30)

    elapsed = samples[-1][0] - samples[0][0]
    steady_cpu = samples[-1][1] - samples[0][1]
    window = 10
    busiest = max(
        ((samples[i + window][1] - samples[i][1]) / (samples[i + window][0] - samples[i][0])
         for i in range(len(samples) - window)),
        default=float("nan"),
    )
    line("listening after", f"{ready_after:.2f} s; CPU used by then {startup_cpu:.2f} s, RSS {startup_rss:.0f} MB")
    line("CPU over the run (after start-up), average", f"{steady_cpu / elapsed * 1000:.1f} millicores ({steady_cpu:.2f} s in {elapsed:.0f} s)")
    line(f"CPU, busiest {window} s window", f"{busiest * 1000:.1f} millicores")
    line("RSS at the end / peak (VmHWM)", f"{samples[-1][2]:.0f} MB / {peak:.0f} MB")
    line("probes at the end", states)
    line("RSS range over the run", f"{min(s[2] for s in samples):.0f}–{max(s[2] for s in samples):.0f} MB")
    note(f"a scrape of /metrics every {SCRAPE_EVERY} s is included; the Kafka probes fail fast where no broker listens on 127.0.0.1:9092")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/resources.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "config.toml", help="config to run (default: the shipped config.toml)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to sample after the daemon listens (default 60)")
    args = parser.parse_args()
    run(args.config.resolve(), args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
