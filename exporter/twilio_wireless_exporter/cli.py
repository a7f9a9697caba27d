"""Command line: argument parsing, logging set-up and wiring. Thin on purpose."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import disable_created_metrics

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.config import (
    Config,
    ConfigError,
    ShardSettings,
    WebConfig,
    budget,
    config_from_mapping,
    load_config,
    load_web_config,
)
from twilio_wireless_exporter.config.types import format_duration, parse_duration
from twilio_wireless_exporter.exposition.collector import HttpMetrics
from twilio_wireless_exporter.fleet.persist import StateUnavailableError
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.sharding import Shard, parse_shard
from twilio_wireless_exporter.web.address import netloc, parse_listen_address
from twilio_wireless_exporter.web.connections import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    ConnectionLimiter,
    ConnectionSettings,
    GuardedSite,
    accept_backlog,
    connection_limit,
    open_files_limit,
)
from twilio_wireless_exporter.web.security import middlewares as security_middlewares
from twilio_wireless_exporter.web.serverlog import quiet_bad_requests, throttle_accept_errors

DEFAULT_PORT = 10311
DEFAULT_LISTEN = f":{DEFAULT_PORT}"
EXIT_CONFIG = 2
#: The configured ``state.path`` cannot be used: locked by another exporter, or unreadable.
EXIT_STATE_IN_USE = 3
#: Signals that stop the exporter cleanly (final state save, exit status 0). SIGHUP is one of
#: them rather than a reload: see docs/operations.md#signals.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_DEMO_SIMS = 100_000
MIN_DEMO_SPEED, MAX_DEMO_SPEED = 0.001, 1e6
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("twilio_wireless_exporter")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log at info would log every scrape; keep it for debug.
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )
    # Malformed requests: one debug line each, not an ERROR with a traceback (counted once the
    # server's metrics exist, see serve()); failed accepts: one line per minute.
    quiet_bad_requests()
    throttle_accept_errors()


def _duration_argument(value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0s, got {value!r}")
    return seconds


def _connections_argument(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 <= count <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be between 0 (automatic) and 1000000, got {value}")
    return count


def _shard_argument(value: str) -> Shard:
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def with_shard(config: Config, shard: Shard | None) -> Config:
    """``config`` with its ``shard`` section replaced by the ``--shard`` flag (when given)."""
    if shard is None:
        return config
    return config.model_copy(update={"shard": ShardSettings(index=shard.index, count=shard.count)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twilio-wireless-exporter",
        description="Prometheus exporter for Twilio / KORE Programmable Wireless data sessions.",
        epilog="Run 'twilio-wireless-exporter simulate --help' for the built-in API simulator.",
    )
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument(
        "--web.listen-address",
        dest="listen",
        type=parse_listen_address,
        default=parse_listen_address(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"address to serve /metrics on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config",
        type=Path,
        metavar="FILE",
        help="TLS and basic auth for the endpoints (Prometheus exporter-toolkit web config format)",
    )
    parser.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=_connections_argument,
        default=0,
        metavar="N",
        help="most client connections open at once; 0 (default): 512, or half the open-files"
        " limit when that is lower",
    )
    parser.add_argument(
        "--web.read-header-timeout",
        dest="header_timeout",
        type=_duration_argument,
        default=DEFAULT_HEADER_TIMEOUT,
        metavar="DURATION",
        help="time a new connection has for its TLS handshake, and then for its first request"
        f" head (default {format_duration(DEFAULT_HEADER_TIMEOUT)})",
    )
    parser.add_argument(
        "--web.idle-timeout",
        dest="idle_timeout",
        type=_duration_argument,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="DURATION",
        help="time a kept-alive connection may wait for its next request"
        f" (default {format_duration(DEFAULT_IDLE_TIMEOUT)})",
    )
    parser.add_argument(
        "--shard",
        type=_shard_argument,
        metavar="INDEX/COUNT",
        help="poll only shard INDEX (0-based) of COUNT replicas that split the SIMs by SID"
        " (overrides the config's shard section)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration and exit (0 valid, 2 invalid)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run against the built-in Twilio Wireless simulator (no account needed)",
    )
    parser.add_argument(
        "--demo.sims",
        dest="demo_sims",
        type=_demo_sims,
        default=50,
        metavar="N",
        help=f"simulated SIMs in the demo fleet, 1 to {MAX_DEMO_SIMS} (default: %(default)s)",
    )
    parser.add_argument(
        "--demo.speed",
        dest="demo_speed",
        type=_demo_speed,
        default=60.0,
        metavar="X",
        help="simulated seconds per real second in demo mode (default 60)",
    )
    parser.add_argument("--demo.seed", dest="demo_seed", type=int, default=1, metavar="SEED")
    parser.add_argument(
        "--demo.auth",
        dest="demo_auth",
        choices=["basic", "oauth2"],
        default="basic",
        help="demo authentication: Twilio HTTP Basic, or KORE-style OAuth2 client credentials"
        " with short-lived bearer tokens (default basic)",
    )
    parser.add_argument(
        "--demo.token-lifetime",
        dest="demo_token_lifetime",
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="lifetime of the demo's OAuth2 access tokens in wall-clock seconds (default 60)",
    )
    parser.add_argument(
        "--demo.fault-rate",
        dest="demo_fault_rate",
        type=_fraction,
        default=0.03,
        metavar="F",
        help="fraction of demo API responses that are 429 or 503 (retried; default 0.03)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        choices=["debug", "info", "warning", "error"],
        default="info",
    )
    parser.add_argument("--log.format", dest="log_format", choices=["text", "json"], default="text")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _demo_sims(value: str) -> int:
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= MAX_DEMO_SIMS:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_DEMO_SIMS}, got {value!r}"
        )
    return int(value)


def _demo_speed(value: str) -> float:
    try:
        speed = float(value)
    except ValueError:
        speed = math.nan
    if not MIN_DEMO_SPEED <= speed <= MAX_DEMO_SPEED:  # also false for NaN
        raise argparse.ArgumentTypeError(
            f"must be a number from {MIN_DEMO_SPEED:g} to {MAX_DEMO_SPEED:.0f}, got {value!r}"
        )
    return speed


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= fraction <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} must be between 0 and 1")
    return fraction


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: must be more than 0 seconds")
    return seconds


def demo_oauth2_twilio(base_url: str, token_url: str, token_lifetime: float) -> dict[str, Any]:
    """The ``twilio`` section of ``--demo --demo.auth oauth2`` (the simulator's bearer mode)."""
    from twilio_wireless_simulator import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET

    return {
        "base_url": base_url,
        "timeout": "5s",
        "auth": {
            "type": "oauth2_client_credentials",
            "token_url": token_url,
            "client_id": DEMO_CLIENT_ID,
            "client_secret": DEMO_CLIENT_SECRET,
            # renew a fifth of the lifetime early (at most 60s): one token request per token
            "refresh_margin": min(60.0, token_lifetime / 5.0),
        },
    }


def demo_mapping(base_url: str, account_sid: str, auth_token: str) -> dict[str, Any]:
    """The built-in configuration used by ``--demo``: discovers every simulated SIM whatever its
    status, and reads usage often enough to show it within a minute."""
    return {
        "twilio": {
            "base_url": base_url,
            "account_sid": account_sid,
            "auth_token": auth_token,
            "timeout": "5s",
        },
        "poll": {
            "interval": "15s",
            "page_size": 1000,
            "concurrency": 8,
            "requests_per_second": 50,
        },
        "discovery": {"enabled": True, "status": "all", "refresh_interval": "1m"},
        # roaming split: the roaming panels and alert have their series
        "usage": {
            "interval": "20s",
            "period_start_day": demo_period_start_day(time.time()),
            "roaming_split": True,
        },
    }


def demo_period_start_day(now: float) -> int:
    """A metering period for the demo that began ten days ago (at most on the 28th): usage is
    reported a day late, so a period that began today or yesterday would show none yet."""
    return min(28, datetime.fromtimestamp(now - 10 * 86400, UTC).day)


@contextlib.asynccontextmanager
async def _demo_config(args: argparse.Namespace, host: str) -> AsyncIterator[Config]:
    from twilio_wireless_simulator import (
        DEMO_ACCOUNT_SID,
        DEMO_AUTH_TOKEN,
        DEMO_USAGE_FINAL_AFTER,
        DEMO_USAGE_LAG,
        FaultConfig,
        SimulatorConfig,
        start_simulator,
    )

    oauth2 = args.demo_auth == "oauth2"
    sim_config = SimulatorConfig(
        sims=args.demo_sims,
        seed=args.demo_seed,
        speed=args.demo_speed,
        # Report times on the real clock so "time since" panels and alerts make sense.
        wall_timestamps=True,
        account_sid=DEMO_ACCOUNT_SID,
        auth_token=DEMO_AUTH_TOKEN,
        auth_mode="bearer" if oauth2 else "basic",
        token_lifetime=args.demo_token_lifetime,
        keep_history=False,  # ground truth is for tests; a long demo must not grow
        usage_lag=DEMO_USAGE_LAG,  # usage and its revisions show within a minute
        usage_final_after=DEMO_USAGE_FINAL_AFTER,
        # A little upstream trouble, so the retry and 429 panels have something to show.
        faults=FaultConfig(
            seed=args.demo_seed,
            rate_429=args.demo_fault_rate * 2 / 3,
            rate_503=args.demo_fault_rate / 3,
            retry_after=1.0,
        ),
    )
    async with start_simulator(sim_config, host=host, port=0) as sim:
        log.info(
            "demo mode: simulated fleet of %d SIMs at %s (%gx time)",
            args.demo_sims,
            sim.url,
            args.demo_speed,
        )
        mapping = demo_mapping(sim.url, DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN)
        if oauth2:
            mapping["twilio"] = demo_oauth2_twilio(sim.url, sim.token_url, args.demo_token_lifetime)
            log.info(
                "demo mode: OAuth2 client credentials, access tokens valid for %gs",
                args.demo_token_lifetime,
            )
        yield config_from_mapping(mapping, environ={}, source="--demo")


async def serve(
    args: argparse.Namespace, config: Config | None, web_config: WebConfig | None = None
) -> int:
    host, port = args.listen
    drop_created_samples()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop_on(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("received %s", sig.name)
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_on, sig)
    async with contextlib.AsyncExitStack() as stack:
        if config is None:
            demo = await stack.enter_async_context(_demo_config(args, "127.0.0.1"))
            config = with_shard(demo, args.shard)
        exporter = Exporter(config, on_failure=stop.set)  # a crashed loop ends the process
        http_metrics = HttpMetrics(exporter.registry)
        quiet_bad_requests(http_metrics)
        limiter = ConnectionLimiter(connection_settings(args), http_metrics)
        http_metrics.watch_connections(limiter.status)
        middlewares = (
            security_middlewares(web_config, http_metrics) if web_config is not None else []
        )
        app = exporter.web_app(middlewares=middlewares, rejections=http_metrics)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=limiter.settings.idle_timeout,
        )
        try:
            await runner.setup()
        except StateUnavailableError as exc:
            log.error("cannot start: %s", exc)  # noqa: TRY400 - an operator's mistake
            return EXIT_STATE_IN_USE
        stack.push_async_callback(runner.cleanup)
        ssl_context = web_config.ssl_context if web_config is not None else None
        site = GuardedSite(runner, host, port, limiter, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        settings = limiter.settings
        log.info(
            "serving at most %d connections (open-files limit %s), request heads within %s,"
            " idle connections closed after %s",
            settings.max_connections,
            open_files_limit() or "unlimited",
            format_duration(settings.header_timeout),
            format_duration(settings.idle_timeout),
        )
        log.debug("froze %d start-up objects out of the garbage collector", freeze_startup_heap())
        resume_collector()
        scheme = "https" if ssl_context is not None else "http"
        # The addresses actually bound, so that with port 0 (`127.0.0.1:0`) whoever started the
        # command learns its port from this line (the tests do; the wording is kept stable).
        for address in runner.addresses:
            log.info("listening on %s", _format_address(address, scheme))
        await stop.wait()
        log.info("shutting down")
    return 1 if exporter.failed else 0


def connection_settings(args: argparse.Namespace) -> ConnectionSettings:
    """The web server's connection bounds from the flags and this process's open-files limit."""
    files = open_files_limit()
    limit = connection_limit(args.max_connections, files)
    if args.max_connections and limit < args.max_connections:
        log.warning(
            "--web.max-connections %d lowered to %d to stay below the open-files limit of %d",
            args.max_connections,
            limit,
            files,
        )
    return ConnectionSettings(
        max_connections=limit,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        backlog=accept_backlog(limit, files),
    )


def drop_created_samples() -> None:
    """Switch off ``prometheus_client``'s ``*_created`` samples, for the whole process.

    They would double the series of every counter and histogram, and no dashboard or alert of
    ours reads them. A process-wide switch, so the command flips it, not the library.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]


def freeze_startup_heap() -> int:
    """Take what start-up allocated (modules, config, the web app) out of the cyclic garbage
    collector's generations; returns how many objects are frozen.

    Those objects live as long as the process, yet a full collection would walk all of them
    every time, and such a pause lands in the middle of a scrape. Together with per-SIM records
    the collector does not track (``accounting.py``), this keeps full collections short however
    large the fleet. A process-wide choice, so it belongs to the command, not to the library.

    What is frozen is collected first, unless start-up ran with the collector paused
    (:func:`pause_collector`): then the heap was collected before the configuration was read,
    and nearly everything made since is alive (a few dozen objects are not), so a collection
    would walk every SIM's objects for nothing, in the way of the first request.
    """
    if not _collector_paused:
        gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


_collector_paused = False


def pause_collector() -> None:
    """Collect once (the heap is the imported modules), then switch the cyclic garbage
    collector off until :func:`resume_collector`.

    From there until :func:`serve` has frozen the start-up heap, almost every object made lives
    on (the configuration, one record per SIM, the web app), so each pass of the collector
    would walk a heap that only grows: with 100,000 SIMs those passes took longer than
    everything else before the first request. Reference counting still frees what is dropped.
    """
    global _collector_paused  # the collector is one per process
    if gc.isenabled():
        gc.collect()
        gc.disable()
        _collector_paused = True


def resume_collector() -> None:
    """Switch the collector back on if :func:`pause_collector` switched it off."""
    global _collector_paused
    if _collector_paused:
        _collector_paused = False
        gc.enable()


def _format_address(address: Any, scheme: str = "http") -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{scheme}://{netloc(str(address[0]), address[1])}/"
    return str(address)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        from twilio_wireless_simulator.__main__ import main as simulate

        status: int = simulate(argv[1:])
        return status
    pause_collector()  # until serve() has frozen what start-up built
    try:
        return _run(argv)
    finally:
        resume_collector()


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)

    if args.demo and args.config is not None:
        parser.error(
            "--demo and --config cannot be combined: --demo runs a configuration of its own"
        )
    if args.demo and args.check_config:
        parser.error("--check-config checks --config; --demo has nothing to check")
    config: Config | None = None
    if not args.demo:
        if args.config is None:
            parser.error("--config is required (or use --demo)")
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"invalid configuration {args.config}:\n{exc}", file=sys.stderr)
            return EXIT_CONFIG
        for warning in config.warnings:
            log.warning("%s", warning)
        config = with_shard(config, args.shard)
    web_config: WebConfig | None = None
    if args.web_config is not None:
        try:
            web_config = load_web_config(args.web_config)
        except ConfigError as exc:
            print(f"invalid web configuration {args.web_config}:\n{exc}", file=sys.stderr)
            return EXIT_CONFIG
        for warning in web_config.warnings:
            log.warning("%s: %s", args.web_config, warning)
    if args.check_config and config is not None:
        shard = config.shard
        print(
            f"configuration {args.config} is valid:"
            f" {len(config.sims)} SIMs, discovery {'on' if config.discovery.enabled else 'off'}"
            + (f", shard {shard.index}/{shard.count}" if shard.count > 1 else "")
        )
        for line in budget.describe(config):
            print(line)
        if web_config is not None:
            print(f"web configuration {args.web_config} is valid: {web_config.summary()}")
        return 0
    try:
        return asyncio.run(serve(args, config, web_config))
    except OSError as exc:
        log.error("cannot start: %s", exc)  # noqa: TRY400 - no traceback for a busy port
        return 1


if __name__ == "__main__":
    sys.exit(main())
