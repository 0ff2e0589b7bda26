"""channel-canary benchmarks: prints figures against the performance targets. Not a test suite.

    python bench/run.py http-cpu    # 1. CPU per HTTP probe vs blackbox_exporter (target: <= 0.6x)
    python bench/run.py lateness    # 2. scheduler lateness, 10,000 probes every 10 s (target: p99 < 10 ms)
    python bench/run.py scrape      # 3. /metrics with 10,000 probes (targets: < 100 ms, RSS < 250 MB)
    python bench/run.py once        # 4. `probe --once` wall time on the shipped config against the sandbox
    python bench/run.py shards      # 5. probe runs/s at steady p99 lateness < 10 ms with 1 and 2 `probe run --shard` processes
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
import subprocess
import sys
import time

from common import BENCH_DIR, ROOT

PARTS = ("http-cpu", "lateness", "scrape", "once", "shards")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=(*PARTS, "all"))
    parser.add_argument("--quick", action="store_true", help="short versions of every part")
    lateness = parser.add_argument_group("lateness")
    lateness.add_argument("--kind", choices=("noop", "http", "both"), default="both", help="which probes to schedule (default both)")
    lateness.add_argument("--probes", type=int, default=10_000, help="probes to schedule (default 10000)")
    lateness.add_argument("--interval", type=float, default=10.0, help="seconds between runs of each probe (default 10)")
    lateness.add_argument("--duration", type=float, default=None, help="seconds to run each kind (default 120, --quick 20)")
    scrape = parser.add_argument_group("scrape")
    scrape.add_argument("--scrapes", type=int, default=None, help="timed scrapes (default 20, --quick 5)")
    shards = parser.add_argument_group("shards")
    shards.add_argument("--max-shards", type=int, default=2, help="measure 1 up to this many shards (default 2)")
    return parser


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
