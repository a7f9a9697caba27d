"""The simulator as its own process for the scale-out test, on a clock the test moves.

``python -m tests.scaleout_support --sims N --api-key SK...:SECRET ...`` serves the real
simulator app (``twilio_wireless_simulator.build_app`` through ``RunningSimulator``) on
``127.0.0.1:0`` with a *manual* simulated clock, and logs ``... listening on http://HOST:PORT``
like the simulator's own command, so the test reads the bound address from the log. Two things
are added for the test, under ``/_scaleout/`` (no authentication; this server only ever runs
inside a test):

* ``POST /_scaleout/advance?seconds=S``: move simulated time forward; answers the new time.
  Between two advances the fleet does not change, so every exporter that polls after an advance
  sees exactly the same API answers, whenever it polls.
* ``GET /_scaleout/requests``: what each client asked for, told apart by the user name of its
  HTTP Basic credentials (each exporter gets an API key of its own): per client, the session
  listings per SIM (first pages of ``/v1/Sims/{sid}/DataSessions`` answered 200), all
  data-session pages, and ``/v1/Sims`` requests; plus the simulator's own request counters
  (:class:`twilio_wireless_simulator.SimulatorStats`).

The parent side (:class:`ScaleoutSimulator`) starts the process and calls these endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import signal
import subprocess
import sys
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.process_support import LISTENING, stop_process, wait_for_log_line
from twilio_wireless_simulator import RunningSimulator, SimulatorConfig, SimulatorStats

log = logging.getLogger("scaleout_simulator")

_SESSIONS_PATH = re.compile(r"^/v1/Sims/(?P<sid>[^/]+)/DataSessions/?$")
_SIMS_PATH = re.compile(r"^/v1/Sims/?$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ClientRequests:
    """What one client (one set of credentials) asked the simulator for."""

    listings: Counter[str] = field(default_factory=Counter)  # SIM SID -> first pages answered 200
    session_pages: int = 0  # every DataSessions request, any page, any status
    sims_requests: int = 0  # GET /v1/Sims (discovery)


def client_of(request: web.Request) -> str:
    """The user name of the request's Basic credentials (account SID or API key SID)."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "anonymous"
    try:
        user, _, _ = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "anonymous"
    return user or "anonymous"


def add_test_routes(sim: RunningSimulator) -> dict[str, ClientRequests]:
    """Count requests per client and add the ``/_scaleout/`` routes; call before ``start()``."""
    clients: dict[str, ClientRequests] = defaultdict(ClientRequests)

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        sessions = _SESSIONS_PATH.match(request.path)
        if sessions is not None:
            entry = clients[client_of(request)]
            entry.session_pages += 1
            first_page = "PageToken" not in request.query and "Page" not in request.query
            if first_page and response.status == 200:
                entry.listings[sessions["sid"]] += 1
        elif _SIMS_PATH.match(request.path):
            clients[client_of(request)].sims_requests += 1
        return response

    async def advance(request: web.Request) -> web.Response:
        seconds = float(request.query["seconds"])
        if not seconds > 0:
            raise web.HTTPBadRequest(text="seconds must be positive")
        sim.clock.advance(seconds)
        return web.json_response({"now": sim.clock.now()})

    async def requests(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "clients": {
                    name: {
                        "listings": dict(entry.listings),
                        "session_pages": entry.session_pages,
                        "sims_requests": entry.sims_requests,
                    }
                    for name, entry in clients.items()
                },
                "stats": stats_summary(sim.stats),
            }
        )

    sim.app.middlewares.append(count)
    sim.app.router.add_post("/_scaleout/advance", advance)
    sim.app.router.add_get("/_scaleout/requests", requests)
    return clients


def stats_summary(stats: SimulatorStats) -> dict[str, int]:
    """The simulator's own counters of the API requests it answered."""
    return {
        "total": stats.total,
        "data_sessions": stats.count("data_sessions"),
        "data_sessions_200": stats.count("data_sessions", 200),
        "sims": stats.count("sims"),
    }


def _api_key(text: str) -> tuple[str, str]:
    key, sep, secret = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("--api-key expects SK...:SECRET")
    return key, secret


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.scaleout_support")
    p.add_argument("--sims", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backfill", type=float, default=2 * 86400.0, help="simulated seconds")
    p.add_argument("--api-key", type=_api_key, action="append", default=[])
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    config = SimulatorConfig(
        sims=args.sims,
        seed=args.seed,
        speed=None,  # manual: only /_scaleout/advance moves it
        backfill=args.backfill,
        api_keys=dict(args.api_key),
        keep_history=False,
    )
    sim = RunningSimulator(config, "127.0.0.1", 0)
    add_test_routes(sim)
    await sim.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("scale-out simulator listening on %s", sim.url)
    try:
        await stop.wait()
    finally:
        await sim.close()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    asyncio.run(serve(parse_args(argv)))
    return 0


# -------------------------------------------------------------------------------- parent side


def _call(url: str, *, method: str = "GET", timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class ScaleoutSimulator:
    """The simulator process, seen from the test."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def advance(self, seconds: float) -> float:
        now: float = _call(f"{self.url}/_scaleout/advance?seconds={seconds}", method="POST")["now"]
        return now

    def requests(self) -> dict[str, Any]:
        answer: dict[str, Any] = _call(f"{self.url}/_scaleout/requests")
        return answer


@contextlib.contextmanager
def scaleout_simulator(
    workdir: Path, *, sims: int, seed: int, api_keys: dict[str, str], repo: Path
) -> Iterator[ScaleoutSimulator]:
    """Start the simulator process (port 0); yields a :class:`ScaleoutSimulator`."""
    log_path = workdir / "simulator.log"
    command = [sys.executable, "-m", "tests.scaleout_support", f"--sims={sims}", f"--seed={seed}"]
    command += [f"--api-key={key}:{secret}" for key, secret in api_keys.items()]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=repo)
    try:
        url = wait_for_log_line(log_path, LISTENING, proc, within=30)["url"]
        yield ScaleoutSimulator(proc, url, log_path)
    finally:
        stop_process(proc)


if __name__ == "__main__":
    sys.exit(main())
