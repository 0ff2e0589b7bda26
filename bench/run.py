"""channel-canary benchmarks: prints figures against the performance targets. Not a test suite.

    python bench/run.py http-cpu    # 1. CPU per HTTP probe vs blackbox_exporter (target: <= 0.6x)
    python bench/run.py lateness    # 2. scheduler lateness, 10,000 probes every 10 s (target: p99 < 10 ms)
    python bench/run.py scrape      # 3. /metrics with 10,000 probes (targets: < 100 ms, RSS < 250 MB)
    python bench/run.py once        # 4. `probe --once` wall time on the shipped config against the sandbox
    python bench/run.py shards      # 5. probe runs/s at steady p99 lateness < 10 ms with 1 and 2 `probe run --shard` processes
    python bench/run.py startup     # 6. `probe run` on the shipped config to its first /readyz 200 (target: < 250 ms)
    python bench/run.py daemon      # 7. `probe run` with 10,000 HTTP probes measured from outside: lateness (first round,
                                    #    steady, after a reload), CPU per run, RSS, /metrics time, scraped every 15 s
    python bench/run.py all         # every part, each in its own process
    add --quick for short versions (e.g. lateness runs 20 s instead of 2 min)

The lateness part measures the product as shipped (shared TLS contexts from probes.transport.client_tls_context, the
Scheduler's own gc.freeze() after apply and after the first jitter window); `--probes N` shrinks it.

Run it with the project's virtualenv interpreter (e.g. .venv/bin/python bench/run.py all): the `probe`
executable is looked up beside sys.executable. Everything it starts listens on, and targets, 127.0.0.1 only;
every child process is ended by its pid when a part finishes or fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time

from common import BENCH_DIR, ROOT

PARTS = ("http-cpu", "lateness", "scrape", "once", "shards", "startup", "daemon")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=(*PARTS, "all"))
    parser.add_argument("--quick", action="store_true", help="short versions of every part")
    lateness = parser.add_argument_group("lateness")
    lateness.add_argument("--kind", choices=("noop", "http", "both"), default="both", help="which probes to schedule (default both)")
    lateness.add_argument("--probes", type=int, default=10_000, help="probes to schedule (default 10000; also daemon)")
    lateness.add_argument("--interval", type=float, default=10.0, help="seconds between runs of each probe (default 10; also daemon)")
    lateness.add_argument("--duration", type=float, default=None, help="seconds to run each kind (default 120, --quick 20)")
    scrape = parser.add_argument_group("scrape")
    scrape.add_argument("--scrapes", type=int, default=None, help="timed scrapes (default 20, --quick 5)")
    shards = parser.add_argument_group("shards")
    shards.add_argument("--max-shards", type=int, default=2, help="measure 1 up to this many shards (default 2)")
    daemon = parser.add_argument_group("daemon")
    daemon.add_argument("--steady", type=float, default=None, help="seconds measured after the first round (default 60, --quick 20)")
    daemon.add_argument("--after", type=float, default=None, help="seconds measured after the reload round (default 30, --quick 0)")
    daemon.add_argument("--no-reload", dest="reload", action="store_false", help="no SIGHUP reload")
    daemon.add_argument("--repeat", type=int, default=1, help="measure this many times and print the medians (default 1)")
    daemon.add_argument("--cpus", type=_cpus, default=None, help="pin `probe run` to these CPUs, e.g. 0 or 0,1")
    daemon.add_argument("--scrape-every", type=float, default=15.0,
                        help="seconds between scrapes as Prometheus's (default 15; 0: only the scrapes at the phases' edges)")
    return parser


def _cpus(text: str) -> set[int]:
    try:
        return {int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU numbers separated by commas, got {text!r}") from None


def _header() -> None:
    print(f"channel-canary benchmarks — {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    print(f"  python {platform.python_version()} ({sys.executable}), {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {platform.platform()}", flush=True)
    print("  load average before: " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (other work on the machine skews every figure)", flush=True)


def _all(argv: list[str]) -> int:
    """Each part in a fresh interpreter, so one part's memory, GC state or event loop never colours another's."""
    _header()
    worst = 0
    for part in PARTS:
        args = [sys.executable, str(BENCH_DIR / "run.py"), part, *argv, "--no-header"]
        proc = subprocess.Popen(args, cwd=ROOT)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if code != 0:
            print(f"  part {part} exited with {code}", flush=True)
            worst = max(worst, code)
    return worst


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM (or a SIGINT where a background start ignores it) unwinds like an error, so every part ends the
    # children it started, by their pids.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = list(sys.argv[1:] if argv is None else argv)
    no_header = "--no-header" in argv
    argv = [a for a in argv if a != "--no-header"]
    args = _parser().parse_args(argv)
    if args.part == "all":
        return _all([a for a in argv if a != "all"])
    if not no_header:
        _header()
    if args.part == "http-cpu":
        import http_cpu

        http_cpu.run(args.quick)
    elif args.part == "lateness":
        import lateness

        duration = args.duration if args.duration is not None else (20.0 if args.quick else 120.0)
        kinds = ("noop", "http") if args.kind == "both" else (args.kind,)
        lateness.run(kinds, args.probes, args.interval, duration)
    elif args.part == "scrape":
        import scrape

        scrape.run(args.scrapes if args.scrapes is not None else (5 if args.quick else 20))
    elif args.part == "once":
        import once

        once.run(quick=args.quick)
    elif args.part == "shards":
        import shards

        shards.run(args.quick, args.max_shards)
    elif args.part == "startup":
        import startup

        startup.run(args.quick)
    elif args.part == "daemon":
        import daemon

        daemon.run(args.probes, args.interval, args.steady if args.steady is not None else (20.0 if args.quick else 60.0),
                   args.after if args.after is not None else (0.0 if args.quick else 30.0), args.reload, max(args.repeat, 1), args.cpus,
                   args.scrape_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
