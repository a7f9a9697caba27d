"""Command line of the simulator.

``python -m twilio_wireless_simulator`` (or ``twilio-wireless-exporter simulate``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from .app import RunningSimulator
from .config import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    SimulatorConfig,
    describe_errors,
)
from .faults import FaultConfig
from .model import format_time

__all__ = ["build_parser", "config_from_args", "main", "parse_duration"]

log = logging.getLogger("twilio_wireless_simulator")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds from ``"30d"``, ``"1h30m"``, ``"90s"``, ``"250ms"`` or a plain number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 30d, 2h, 90m, 45s)")
    return total


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen expects HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fault rate is between 0 and 1, got {text}")
    return value


def _latency(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    try:
        low = float(lo)
        high = float(hi) if sep else low
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--latency expects MIN:MAX seconds, got {text!r}"
        ) from None
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"--latency expects 0 <= MIN <= MAX, got {text!r}")
    return low, high


def _api_key(text: str) -> tuple[str, str]:
    sid, sep, secret = text.partition(":")
    if not sep or not re.fullmatch(r"SK[0-9a-fA-F]{32}", sid):
        raise argparse.ArgumentTypeError("--api-key expects SK<32 hex>:SECRET")
    return sid, secret


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m twilio_wireless_simulator",
        description="Serve a simulated Twilio Programmable Wireless API (demo credentials only).",
    )
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 8080), metavar="HOST:PORT")
    p.add_argument("--public-url", help="base of absolute URLs in responses (default: from Host)")
    p.add_argument("--sims", type=int, default=100, help="generated SIMs (default 100)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated seconds per wall second (default 1; 60: one simulated minute per second)",
    )
    p.add_argument("--start-time", type=float, help="simulated start, unix seconds (default: now)")
    p.add_argument(
        "--wall-timestamps",
        action="store_true",
        help="report times (session start/end/last_updated, SIM dates) mapped to real time:"
        " start + simulated seconds since start / speed, so with --speed above 1 nothing lies in"
        " the future of the real clock (a fast-forward demo; durations shrink by the speed)",
    )
    p.add_argument(
        "--retention", type=parse_duration, default=30 * 86400.0, help="e.g. 30d (default)"
    )
    p.add_argument(
        "--backfill", type=parse_duration, help="simulated past at start (default: retention)"
    )
    p.add_argument("--update-granularity", type=parse_duration, default=60.0, help="default 60s")
    p.add_argument(
        "--history", action="store_true", help="keep every session in memory (ground truth)"
    )
    usage = p.add_argument_group("usage records and SIM lifecycle")
    usage.add_argument(
        "--usage-lag",
        type=parse_duration,
        default=86400.0,
        help="simulated time after an hour ends before its usage is first reported (default 24h)",
    )
    usage.add_argument(
        "--usage-final-after",
        type=parse_duration,
        default=2 * 86400.0,
        help="simulated time after an hour ends from which its usage is complete (default 48h)",
    )
    usage.add_argument(
        "--usage-retention",
        type=parse_duration,
        default=62 * 86400.0,
        help="how far back usage records go (default 62d)",
    )
    usage.add_argument(
        "--usage-unit",
        choices=("bytes", "kilobytes", "megabytes"),
        default="bytes",
        help="units of every SIM's usage records (default bytes)",
    )
    usage.add_argument(
        "--no-status-changes",
        dest="status_changes",
        action="store_false",
        help="no seeded suspensions, connectivity resets or plan changes",
    )
    auth = p.add_argument_group("auth")
    auth.add_argument("--auth-mode", choices=("basic", "bearer"), default="basic")
    auth.add_argument("--account-sid", default=DEMO_ACCOUNT_SID)
    auth.add_argument("--auth-token", default=DEMO_AUTH_TOKEN)
    auth.add_argument(
        "--api-key", type=_api_key, action="append", default=[], metavar="SK...:SECRET"
    )
    auth.add_argument("--client-id", default=DEMO_CLIENT_ID)
    auth.add_argument("--client-secret", default=DEMO_CLIENT_SECRET)
    auth.add_argument("--token-lifetime", type=parse_duration, default=3600.0, help="default 1h")
    faults = p.add_argument_group("faults (rates are probabilities per request)")
    faults.add_argument(
        "--max-concurrent", type=int, help="429 beyond this many requests in flight"
    )
    faults.add_argument("--fault-seed", type=int, default=0)
    faults.add_argument("--fault-429", type=_rate, default=0.0)
    faults.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of 429s (s)")
    faults.add_argument("--fault-500", type=_rate, default=0.0)
    faults.add_argument("--fault-503", type=_rate, default=0.0)
    faults.add_argument("--fault-timeout", type=_rate, default=0.0)
    faults.add_argument("--timeout-delay", type=parse_duration, default=30.0, help="default 30s")
    faults.add_argument("--fault-truncated", type=_rate, default=0.0)
    faults.add_argument("--fault-malformed", type=_rate, default=0.0)
    faults.add_argument("--fault-overlap", type=_rate, default=0.0)
    faults.add_argument(
        "--latency", type=_latency, metavar="MIN:MAX", help="extra seconds per request"
    )
    faults.add_argument(
        "--faults-on-token", action="store_true", help="also fault the token endpoint"
    )
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    faults = FaultConfig(
        seed=args.fault_seed,
        rate_429=args.fault_429,
        retry_after=args.retry_after,
        rate_500=args.fault_500,
        rate_503=args.fault_503,
        rate_timeout=args.fault_timeout,
        timeout_delay=args.timeout_delay,
        rate_truncated=args.fault_truncated,
        rate_malformed=args.fault_malformed,
        rate_overlap=args.fault_overlap,
        latency=args.latency,
        apply_to_token=args.faults_on_token,
    )
    return SimulatorConfig(
        sims=args.sims,
        seed=args.seed,
        account_sid=args.account_sid,
        auth_token=args.auth_token,
        api_keys=dict(args.api_key),
        auth_mode=args.auth_mode,
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_lifetime=args.token_lifetime,
        retention=args.retention,
        backfill=args.backfill,
        speed=args.speed,
        start_time=args.start_time,
        update_granularity=args.update_granularity,
        max_concurrent=args.max_concurrent,
        faults=faults,
        public_url=args.public_url,
        keep_history=args.history,
        wall_timestamps=args.wall_timestamps,
        usage_lag=args.usage_lag,
        usage_final_after=args.usage_final_after,
        usage_retention=args.usage_retention,
        usage_unit=args.usage_unit,
        status_changes=args.status_changes,
    )


def _describe(sim: RunningSimulator) -> None:
    cfg = sim.config
    # sim.url holds the port actually bound: with --listen HOST:0 this line tells the caller.
    log.info("Twilio Wireless API simulator listening on %s", sim.url)
    log.info(
        "%d SIMs, seed %d, %s, simulated time %s%s",
        len(sim.fleet),
        cfg.seed,
        "manual clock" if cfg.speed is None else f"speed {cfg.speed:g}x",
        format_time(int(sim.clock.now())),
        ", reported as wall-clock time" if cfg.wall_timestamps else "",
    )
    if cfg.auth_mode == "basic":
        log.info(
            "basic auth (demo values): account SID %s, auth token %s",
            cfg.account_sid,
            cfg.auth_token,
        )
        for key, secret in cfg.api_keys.items():
            log.info("API key %s, secret %s", key, secret)
        log.info("try: curl -u %s:%s %s/v1/Sims", cfg.account_sid, cfg.auth_token, sim.url)
    else:
        log.info(
            "bearer auth (demo values): token URL %s, client_id %s, client_secret %s, lifetime %gs",
            sim.token_url,
            cfg.client_id,
            cfg.client_secret,
            cfg.token_lifetime,
        )


async def _serve(config: SimulatorConfig, host: str, port: int, access_log: bool) -> None:
    sim = RunningSimulator(config, host, port, access_log=access_log)
    await sim.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        _describe(sim)
        await stop.wait()
        log.info("shutting down")
    finally:
        await sim.close()


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the exit status (2 for bad arguments)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        print(f"{parser.prog}: error: {describe_errors(exc)}", file=sys.stderr)
        return 2
    host, port = args.listen
    try:
        asyncio.run(_serve(config, host, port, args.access_log))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)  # noqa: TRY400
        return 1
    except KeyboardInterrupt:
        pass
    return 0
