"""The `probe` command: `run`, `--once`, `check-config`, `list`, `sandbox`.

Exit codes: 0 all good, 1 a probe failed (or the daemon could not start), 2 a config or usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Iterator, Sequence

from canary import __version__
from canary.config import Config, ConfigError, load_config
from canary.contract import parse_host_port
from canary.ledger import Ledger
from canary.logs import FORMATS, LEVELS
from canary.sharding import EVERYTHING, Shard, ShardError, check_spec, resolve, select
from canary.statedir import state_directory
from probes import PROBE_TYPES, build_probe

if TYPE_CHECKING:
    from canary.daemon import Daemon

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = os.environ.get("CANARY_CONFIG", "config.toml")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=f"config file (default: {DEFAULT_CONFIG}, or $CANARY_CONFIG)")
    common.add_argument("--config.file", dest="config", default=argparse.SUPPRESS, help="alias of --config (the Prometheus exporters' name)")

    parser = argparse.ArgumentParser(prog="probe", parents=[common], description="Synthetic canary traffic for a support platform, exported to Prometheus.")
    parser.add_argument("--version", action="version", version=f"channel-canary {__version__}")
    parser.add_argument("--once", action="store_true", help="run every probe once, print the results, exit 0 if all passed, 1 if any failed")
    parser.add_argument("--format", choices=("table", "json", "junit"), default="table", help="output of --once")
    parser.add_argument("--only", action="append", default=[], metavar="NAME_OR_CHANNEL", help="with --once: only these probes or channels (repeatable, or comma-separated)")
    parser.add_argument("--output", "-o", metavar="FILE", help="with --once: write the report to FILE instead of standard output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run the daemon: schedule probes and serve /metrics")
    run.add_argument("--listen", type=_listen_address, help="address to serve on, HOST:PORT (overrides [daemon].listen)")
    run.add_argument("--web.listen-address", dest="listen", type=_listen_address, help="alias of --listen (the Prometheus exporters' name)")
    run.add_argument("--web.config.file", dest="web_config_file", metavar="FILE", help="exporter-toolkit web config: TLS, basic auth, headers")
    run.add_argument("--state.dir", dest="state_dir", metavar="DIR", help="keep state in DIR across restarts: the object ledger, the probes' state, the uptime history (overrides [daemon].state_dir; default: one directory per config and shard under $XDG_STATE_HOME/channel-canary)")
    run.add_argument("--shard", type=_shard_spec, metavar="I/N|auto", help="run only shard I of N of the probes (overrides [daemon].shard); "
                     "auto: I from the host name's StatefulSet ordinal, N from $CANARY_SHARDS")
    run.add_argument("--log.level", dest="log_level", choices=LEVELS, help="log level (overrides [daemon].log_level, also on reload)")
    run.add_argument("--log.format", dest="log_format", choices=FORMATS, default="text",
                     help="text (default): a sentence per line; logfmt or json: one record per line with each probe event's fields")

    check = commands.add_parser("check-config", parents=[common], help="validate a config file and exit")
    check.add_argument("path", nargs="?", help="config file to check")

    listing = commands.add_parser("list", parents=[common], help="list the configured probes")
    listing.add_argument("--shard", type=_shard_spec, metavar="I/N|auto", help="only the probes shard I of N runs")

    sandbox = commands.add_parser("sandbox", help="serve the bundled stand-in platform for demos and tests")
    sandbox.add_argument("--listen", type=_listen_address, default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    return parser


def _listen_address(text: str) -> str:
    """argparse's check of a --listen value: a bad one is a usage error (exit 2) that names the flag."""
    try:
        parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _shard_spec(text: str) -> str:
    """argparse's check of a --shard value's form; `auto` is resolved once the config is loaded."""
    try:
        return check_spec(text)
    except ShardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard(flag: str | None, config: Config) -> Shard | None:
    """The flag's shard, else `[daemon] shard`; None (reported, naming the flag or key) when it cannot be used."""
    spec, where = (flag, "--shard") if flag is not None else (config.daemon.shard, f"{config.path}: daemon.shard")
    try:
        return resolve(spec, socket.gethostname(), os.environ)
    except ShardError as exc:
        print(f"{'usage' if flag is not None else 'config'} error:\n{where}: {exc}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = Path(getattr(args, "config", DEFAULT_CONFIG))
    if args.command == "sandbox":
        return _sandbox(args.listen)
    if args.command == "check-config":
        return _check_config(Path(args.path) if args.path else config_path)
    if args.command is None and not args.once:
        _parser().print_help(sys.stderr)
        return EXIT_USAGE

    with _collector_paused():
        config = _load(config_path)
    if config is None:
        return EXIT_USAGE
    if args.command == "list":
        shard = EVERYTHING if args.shard is None else _shard(args.shard, config)
        return EXIT_USAGE if shard is None else _list(config, shard)
    if args.command == "run":
        with _collector_paused():
            daemon = _daemon(config, args)
        if daemon is None:
            return EXIT_USAGE
        code = _run_async(daemon.serve())
        if code == EXIT_OK:  # only now: the server, every probe and the event loop itself are closed
            logging.getLogger("canary.daemon").info("stopped")
        return code
    return _once(config, args)


# The daemon's garbage collector thresholds. Every probe's latest result and its waiting timer live for an interval, so
# they reach the oldest generation and Python's default (a full collection every 10th middle one) walked all of them
# about once a second at 10,000 probes: 0.27 s each, 28 % of a core, and nothing ever collected (206 of 206 found no
# garbage; see the README's benchmarks). A full collection now comes a hundred times less often, and the youngest
# generation waits for 2,000 new objects rather than 700 (fewer short-lived run objects are promoted).
COLLECTOR_THRESHOLDS = (2000, 10, 1000)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Start-up allocates much and leaves no cyclic garbage (a collection after it frees nothing), so the garbage
    collector's passes over the growing heap (~30 ms of each start) are skipped until the command runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _daemon(config: Config, args: argparse.Namespace) -> Daemon | None:
    """The daemon `probe run` starts; None (reported) when its shard or web config cannot be used."""
    from canary.daemon import Daemon
    from exporter.web_security import WebSecurity

    shard = _shard(args.shard, config)
    if shard is None:
        return None
    try:
        web_security = WebSecurity.from_file(args.web_config_file)
    except ConfigError as exc:
        print(f"web config error:\n{exc}", file=sys.stderr)
        return None
    daemon = Daemon(config, PROBE_TYPES, build_probe, listen=args.listen, web_security=web_security,
                    state_dir=args.state_dir, shard=shard, log_level=args.log_level, log_format=args.log_format)
    # What start-up imported and loaded lives as long as the process: frozen out of the collector's sight, so the
    # scheduler's collection before it starts the probes walks only what it built.
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    return daemon


def _load(path: Path) -> Config | None:
    try:
        return load_config(path, PROBE_TYPES)
    except ConfigError as exc:
        hint = "" if path.exists() else f"\n(choose the config file with --config FILE or $CANARY_CONFIG; the default is {DEFAULT_CONFIG})"
        print(f"config error:\n{exc}{hint}", file=sys.stderr)
        return None


def _check_config(path: Path) -> int:
    config = _load(path)
    if config is None:
        return EXIT_USAGE
    print(f"{path}: ok, {len(config.probes)} probes")
    return EXIT_OK


def _list(config: Config, shard: Shard) -> int:
    rows = [("NAME", "TYPE", "CHANNEL", "INTERVAL", "TIMEOUT", "TARGET")] + [
        (p.name, p.type, p.channel, f"{p.interval:g}s", f"{p.timeout:g}s", config.scrubber()(p.safe_target()))
        for p in select(config.probes, shard.index, shard.count)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return EXIT_OK


def _once(config: Config, args: argparse.Namespace) -> int:
    from canary.once import all_passed, as_json, as_junit, as_table, run_all, select
    from canary.scheduler import ProbeBuildError

    from canary.daemon import configure_logging

    configure_logging("warning", config.scrubber())
    only = [item.strip() for value in args.only for item in value.split(",") if item.strip()]
    selected = select(config.probes, only)
    if not selected:
        wanted = f" matching {', '.join(only)}" if only else ""
        print(f"no probes{wanted} in {config.path}", file=sys.stderr)
        return EXIT_USAGE
    try:
        outcomes = _run_async(_with_ledger(config, lambda ledger: run_all(config, selected, build_probe, ledger)))
    except ProbeBuildError as exc:
        print(f"config error:\n{config.path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = {"json": as_json, "junit": as_junit, "table": as_table}[args.format](outcomes)
    if args.output:  # written instead of printed: the exit code says whether it passed
        Path(args.output).write_text(report + ("" if report.endswith("\n") else "\n"), encoding="utf-8")
    else:
        print(report)
    return EXIT_OK if all_passed(outcomes) else EXIT_FAILED


async def _with_ledger(config: Config, work: Callable[[Ledger], Awaitable[Any]]) -> Any:
    """`work` with the object ledger of the config's default state directory (the daemon's, unsharded), closed after."""
    ledger = Ledger.in_directory(state_directory(None, config.daemon.state_dir, config.path))
    try:
        return await work(ledger)
    finally:
        await ledger.close()


def _sandbox(listen: str) -> int:
    from aiohttp import web

    from canary.sandbox import build_sandbox_app

    host, port = parse_host_port(listen)
    web.run_app(build_sandbox_app(), host=host, port=port, print=lambda msg: print(f"sandbox platform on http://{listen}", flush=True), access_log=None)
    return EXIT_OK


def _run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where it is installed: it roughly halves the CPU each probe costs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


if __name__ == "__main__":
    sys.exit(main())
