"""Benchmarks of twilio-wireless-exporter against the built-in simulator, on loopback.

One command runs everything and prints a table (and writes JSON)::

    python benchmarks/run.py --sims 1000,10000 --out benchmarks/results/latest.json

For every fleet size N it starts the simulator in its own process (a few data sessions per SIM:
a 6-hour retention window, so one listing page of 100 holds every SIM's sessions) and measures,
side by side in the same run:

1. Poll cycle: wall and CPU time of one full cycle over all SIMs with the project's client and
   poller (``Poller.poll_all()``), with a bare aiohttp loop that fetches and ``json``-parses the
   same pages with the same concurrency (the floor), and with the official ``twilio`` SDK in a
   thread pool of the same size (one ``Client`` per thread).
2. Scrape: ``GET /metrics`` latency (p50/p99) with 1 and 10 concurrent scrapers, plain and gzip,
   while the poller keeps changing the state; event-loop lag and the poller's progress during
   the scrapes; the same for the stock ``prometheus_client`` path (before) at a lower count;
   and the render cost in-process for a cold cache, an unchanged state and 1 % / 25 % of SIMs
   changed.
3. Memory: RSS per SIM above a 1-SIM baseline, each measured in a fresh process.
4. API cost: data-session requests per SIM per steady-state cycle, and a cycle against a
   simulator that answers 429 above a concurrency cap lower than the exporter's concurrency.

Scrapers and memory probes run as child processes of this same script (``--child ...``).
Nothing here leaves the loopback interface.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.cli import drop_created_samples, freeze_startup_heap
from twilio_wireless_exporter.config import SIM_STATUSES, config_from_mapping
from twilio_wireless_exporter.exposition.reference import ReferenceExposition
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.accounting import ListingOutcome
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_simulator import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN

GOALS = {
    "poll_wall_vs_bare_max": 1.2,
    "sdk_wall_vs_project_min": 8.0,
    "scrape_p99_plain_ms_max": 50.0,
    "scrape_p99_gzip_ms_max": 100.0,
    "rss_per_sim_kib_max": 4.0,
    "requests_per_sim_per_cycle": 1.0,
}

_URL_LINE = re.compile(r"listening on (http://\S+)")
_SCRIPT = str(Path(__file__).resolve())
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    sims: tuple[int, ...] = (1000, 10000)
    concurrency: int = 32
    page_size: int = 100
    retention: str = "6h"
    speed: float = 60.0
    repeat: int = 9
    sdk_repeat: int = 1
    poll_interval: float = 15.0
    scrapes_single: int = 100
    scrapes_each_concurrent: int = 20
    scrapes_stock: int = 5
    scrapes_paced: int = 6
    scrape_every: float = 5.0
    cap: int = 8
    cap_sims: int = 1000
    cap_latency: float = 0.02
    seed: int = 1
    quick: bool = False


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--sims", default="1000,10000", help="fleet sizes, comma-separated")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    p.add_argument("--concurrency", type=int, default=32, help="in-flight requests (all clients)")
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument("--retention", default="6h", help="simulator listing window (a few sessions)")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per second")
    p.add_argument("--repeat", type=int, default=9, help="measured cycles per client")
    p.add_argument("--sdk-repeat", type=int, default=1, help="measured cycles of the SDK")
    p.add_argument(
        "--poll-interval", type=float, default=15.0, help="per-SIM interval while scraping"
    )
    p.add_argument("--scrapes", type=int, default=100, help="scrapes with one scraper")
    p.add_argument("--cap", type=int, default=8, help="simulator concurrency cap (429 above)")
    p.add_argument("--cap-sims", type=int, default=1000, help="fleet size of the 429 scenario")
    p.add_argument(
        "--cap-latency", type=float, default=0.02, help="simulator latency (s) with the cap"
    )
    p.add_argument("--quick", action="store_true", help="tiny counts (the test suite's smoke run)")
    args = p.parse_args(argv)
    sims = tuple(int(s) for s in args.sims.split(",") if s.strip())
    if not sims or min(sims) < 2:
        p.error("--sims: every size must be >= 2")
    settings = Settings(
        sims=sims,
        concurrency=args.concurrency,
        page_size=args.page_size,
        retention=args.retention,
        speed=args.speed,
        repeat=args.repeat,
        sdk_repeat=args.sdk_repeat,
        poll_interval=args.poll_interval,
        scrapes_single=args.scrapes,
        scrapes_each_concurrent=max(1, args.scrapes // 5),
        cap=args.cap,
        cap_sims=args.cap_sims,
        cap_latency=args.cap_latency,
        quick=args.quick,
    )
    if args.quick:
        settings = dataclasses.replace(
            settings,
            repeat=1,
            scrapes_single=4,
            scrapes_each_concurrent=1,
            scrapes_stock=1,
            scrapes_paced=2,
            scrape_every=0.3,
            poll_interval=1.0,
            cap_sims=min(args.cap_sims, max(sims)),
            cap_latency=0.0,  # no 429 storm: their 1 s Retry-After would dominate the run
        )
    return settings, args.out


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("aiohttp", "prometheus-client", "msgspec", "twilio"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "exporter": __version__,
        "packages": versions,
    }


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of another process (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        import resource  # fallback only: the peak, not the current size

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def basic_auth() -> str:
    token = base64.b64encode(f"{DEMO_ACCOUNT_SID}:{DEMO_AUTH_TOKEN}".encode()).decode()
    return f"Basic {token}"


@dataclasses.dataclass
class Cycle:
    wall: float
    cpu: float
    sessions: int
    requests: int


def median_cycle(cycles: Sequence[Cycle]) -> dict[str, float]:
    return {
        "wall_s": statistics.median(c.wall for c in cycles),
        "cpu_s": statistics.median(c.cpu for c in cycles),
        "sessions": cycles[-1].sessions,
        "requests": cycles[-1].requests,
        "runs": len(cycles),
    }


async def timed(action: Callable[[], Awaitable[tuple[int, int]]]) -> Cycle:
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    sessions, requests = await action()
    return Cycle(time.perf_counter() - wall, time.process_time() - cpu, sessions, requests)


# --------------------------------------------------------------------------------------------
# The simulator, in its own process
# --------------------------------------------------------------------------------------------


class SimulatorProcess:
    """``python -m twilio_wireless_simulator`` on a free loopback port."""

    def __init__(
        self, settings: Settings, sims: int, *, cap: int | None = None, latency: float = 0.0
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            "twilio_wireless_simulator",
            "--listen",
            "127.0.0.1:0",
            "--sims",
            str(sims),
            "--seed",
            str(settings.seed),
            "--retention",
            settings.retention,
            "--speed",
            str(settings.speed),
            "--log-level",
            "info",
        ]
        if cap is not None:
            self.command += ["--max-concurrent", str(cap)]
        if latency > 0:
            self.command += ["--latency", f"{latency}:{latency}"]
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> SimulatorProcess:
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        found = threading.Event()
        lines: list[str] = []

        def drain(stream: IO[str]) -> None:
            for line in stream:
                match = _URL_LINE.search(line)
                if match and not found.is_set():
                    self.url = match.group(1).rstrip("/")
                    found.set()
                elif len(lines) < 50:
                    lines.append(line)

        threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True).start()
        if not found.wait(60):
            self.__exit__(None, None, None)
            raise RuntimeError("simulator did not start:\n" + "".join(lines))
        return self

    def cpu(self) -> float | None:
        return cpu_seconds_of(self.proc.pid) if self.proc is not None else None

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --------------------------------------------------------------------------------------------
# The three clients
# --------------------------------------------------------------------------------------------


def exporter_config(url: str, settings: Settings, *, interval: float | None = None) -> Any:
    return config_from_mapping(
        {
            "twilio": {
                "base_url": url,
                "account_sid": DEMO_ACCOUNT_SID,
                "auth_token": DEMO_AUTH_TOKEN,
                "timeout": "30s",
            },
            "poll": {
                "interval": interval or settings.poll_interval,
                "page_size": settings.page_size,
                "concurrency": settings.concurrency,
                "requests_per_second": 1_000_000,
                # discovery lists /v1/Sims with the same page size: 10,000 SIMs are 100 pages
                "max_pages": 1000,
            },
            "discovery": {"enabled": True, "status": list(SIM_STATUSES)},
        },
        environ={},
        source="benchmark",
    )


def api_counts(exporter: Exporter, endpoint: str = "data_sessions") -> dict[str, float]:
    """Requests by status code and retries, from the exporter's own counters."""
    out: dict[str, float] = {}
    metrics = exporter.api_metrics
    for counter, key in ((metrics.requests, "code"), (metrics.retries, "reason")):
        for metric in counter.collect():
            for s in metric.samples:
                if s.name.endswith("_total") and s.labels.get("endpoint") == endpoint:
                    name = f"{key}:{s.labels[key]}"
                    out[name] = out.get(name, 0.0) + s.value
    return out


@contextlib.asynccontextmanager
async def opened_exporter(url: str, settings: Settings) -> AsyncIterator[Exporter]:
    exporter = Exporter(exporter_config(url, settings))
    await exporter.open()
    try:
        if not await exporter.poller.refresh_sims():
            raise RuntimeError("SIM discovery against the simulator failed")
        yield exporter
    finally:
        await exporter.stop()


async def project_cycle(exporter: Exporter) -> tuple[int, int]:
    before = api_counts(exporter)
    await exporter.poller.poll_all()
    after = api_counts(exporter)
    requests = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("code:"))
    sessions = sum(len(r.account.sessions) for r in exporter.state.sims.values())
    return sessions, int(requests)


async def bare_cycle(
    http: aiohttp.ClientSession, url: str, sids: Sequence[str], concurrency: int, page_size: int
) -> tuple[int, int]:
    """The floor: fetch and json-parse every page, nothing else."""
    headers = {"Authorization": basic_auth(), "Accept": "application/json"}
    pending = iter(sids)
    counts = [0, 0]

    async def worker() -> None:
        for sid in pending:
            next_url: str | None = f"{url}/v1/Sims/{sid}/DataSessions?PageSize={page_size}"
            while next_url:
                async with http.get(next_url, headers=headers) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"bare loop: HTTP {resp.status}")
                page = json.loads(body)
                counts[0] += len(page["data_sessions"])
                counts[1] += 1
                next_url = page["meta"]["next_page_url"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts[0], counts[1]


class SdkPool:
    """The official SDK: a thread pool, one ``twilio.rest.Client`` per thread."""

    def __init__(self, url: str, concurrency: int, page_size: int) -> None:
        self._url = url
        self._page_size = page_size
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="sdk")

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            from twilio.rest import Client  # a heavy import: only when used

            client = Client(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN)
            client.wireless.base_url = self._url
            self._local.client = client
        return client

    def _list(self, sid: str) -> int:
        sessions = (
            self._client().wireless.v1.sims(sid).data_sessions.list(page_size=self._page_size)
        )
        return len(sessions)

    def cycle(self, sids: Sequence[str]) -> tuple[int, int]:
        return sum(self._pool.map(self._list, sids)), len(sids)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


async def poll_cycles(url: str, settings: Settings, exporter: Exporter) -> dict[str, Any]:
    sids = list(exporter.state.sims)
    conc, size = settings.concurrency, settings.page_size
    connector = aiohttp.TCPConnector(limit=conc)
    sdk = SdkPool(url, conc, size)
    bare: list[Cycle] = []
    project: list[Cycle] = []
    sdk_runs: list[Cycle] = []
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            # Warm-up: the simulator generates each SIM's timeline on first use; the project's
            # first cycle is also the accounting baseline. Neither is measured.
            await bare_cycle(http, url, sids, conc, size)
            first = await timed(lambda: project_cycle(exporter))
            await asyncio.to_thread(sdk.cycle, sids[: conc * 2])
            for i in range(settings.repeat):
                bare.append(await timed(lambda: bare_cycle(http, url, sids, conc, size)))
                project.append(await timed(lambda: project_cycle(exporter)))
                if i < settings.sdk_repeat:
                    sdk_runs.append(await timed(lambda: asyncio.to_thread(sdk.cycle, sids)))
    finally:
        await asyncio.to_thread(sdk.close)
    result: dict[str, Any] = {
        "sims": len(sids),
        "concurrency": conc,
        "page_size": size,
        "bare_aiohttp": median_cycle(bare),
        "project": median_cycle(project),
        "project_first_cycle": dataclasses.asdict(first),
        "twilio_sdk": median_cycle(sdk_runs),
    }
    p, b, s = result["project"], result["bare_aiohttp"], result["twilio_sdk"]
    result["ratios"] = {
        "project_vs_bare_wall": ratio(p["wall_s"], b["wall_s"]),
        "project_vs_bare_cpu": ratio(p["cpu_s"], b["cpu_s"]),
        "sdk_vs_project_wall": ratio(s["wall_s"], p["wall_s"]),
        "sdk_vs_project_cpu": ratio(s["cpu_s"], p["cpu_s"]),
    }
    result["requests_per_sim_per_cycle"] = ratio(p["requests"], len(sids))
    return result


# --------------------------------------------------------------------------------------------
# Scrapes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopWatch:
    """What the exporter's event loop went through: lag (how late a 5 ms sleep wakes up),
    state updates, CPU used, time spent in ``/metrics`` handlers (before the body is sent) and
    garbage collector pauses, all stamped with ``time.monotonic()`` (which other processes on
    this machine share)."""

    samples: list[tuple[float, float, int, float]] = dataclasses.field(default_factory=list)
    handlers: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    gc_pauses: list[tuple[float, int, float]] = dataclasses.field(default_factory=list)
    _gc_started: float = 0.0

    async def run(self, exporter: Exporter) -> None:
        loop = asyncio.get_running_loop()
        gc.callbacks.append(self._gc)
        try:
            while True:
                before = loop.time()
                await asyncio.sleep(0.005)
                lag = loop.time() - before - 0.005
                self.samples.append(
                    (time.monotonic(), max(0.0, lag), exporter.state.version, time.process_time())
                )
        finally:
            gc.callbacks.remove(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_started
            self.gc_pauses.append((time.monotonic(), info["generation"], pause))

    @web.middleware
    async def timing(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        self.handlers.append((time.monotonic(), time.perf_counter() - started))
        return response

    def window(self, start: float, end: float) -> dict[str, float]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        handlers = [h[1] for h in self.handlers if start <= h[0] <= end]
        pauses = [g for g in self.gc_pauses if start <= g[0] <= end]
        out = {
            "lag_max_ms": 0.0,
            "lag_p99_ms": 0.0,
            "state_updates_per_s": 0.0,
            "handler_p50_ms": percentile(handlers, 50) * 1000 if handlers else 0.0,
            "handler_max_ms": max(handlers, default=0.0) * 1000,
            "gc_pause_max_ms": max((g[2] for g in pauses), default=0.0) * 1000,
            "gc_full_collections": sum(1 for g in pauses if g[1] == 2),
            "cpu_share": 0.0,
        }
        if len(inside) >= 2:
            lags = [s[1] for s in inside]
            span = inside[-1][0] - inside[0][0]
            out["lag_max_ms"] = max(lags) * 1000
            out["lag_p99_ms"] = percentile(lags, 99) * 1000
            out["state_updates_per_s"] = ratio(inside[-1][2] - inside[0][2], span)
            # CPU seconds of this process per wall second (1.0: one core busy all the time)
            out["cpu_share"] = ratio(inside[-1][3] - inside[0][3], span)
        return out


def scrape_scenarios(settings: Settings) -> list[dict[str, Any]]:
    back_to_back = [
        {"path": path, "label": label, "scrapers": scrapers, "count": count, "gzip": gz}
        for path, label, counts in (
            ("fast", "incremental", (settings.scrapes_single, settings.scrapes_each_concurrent)),
            ("stock", "stock prometheus_client", (settings.scrapes_stock, 0)),
        )
        for scrapers, count in ((1, counts[0]), (10, counts[1]))
        if count > 0
        for gz in (False, True)
    ]
    # Like Prometheus: one gzip scrape now and then, so every SIM polled in between has changed;
    # with and without the exporter's background refresh of the cache.
    every = settings.scrape_every
    paced = [
        {
            "path": path,
            "label": f"{label}, a scrape every {every:g} s",
            "scrapers": 1,
            "count": settings.scrapes_paced,
            "gzip": True,
            "every": every,
        }
        for path, label in (
            ("fast", "incremental"),
            ("cold", "incremental without background refresh"),
        )
    ]
    return back_to_back + paced


async def _scrape(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    count: int,
    latencies: list[float],
    sizes: list[int],
    every: float = 0.0,
) -> None:
    for _ in range(count):
        started = time.perf_counter()
        async with http.get(url, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"scrape: HTTP {resp.status}")
        latencies.append(time.perf_counter() - started)
        sizes.append(len(body))
        await asyncio.sleep(max(0.0, started + every - time.perf_counter()))


async def scrape_child(
    urls: dict[str, str], scenarios: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Runs in a separate process: scrapes ``/metrics`` and reports latencies."""
    results = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=timeout
    ) as http:
        for scenario in scenarios:
            url = urls[scenario["path"]]
            headers = {"Accept-Encoding": "gzip" if scenario["gzip"] else "identity"}
            latencies: list[float] = []
            sizes: list[int] = []
            scrapers = range(scenario["scrapers"])
            # one scrape each first: connections are set up outside the measurement
            await asyncio.gather(*(_scrape(http, url, headers, 1, [], []) for _ in scrapers))
            start = time.monotonic()
            every = scenario.get("every", 0.0)
            await asyncio.sleep(every)
            await asyncio.gather(
                *(
                    _scrape(http, url, headers, scenario["count"], latencies, sizes, every)
                    for _ in scrapers
                )
            )
            end = time.monotonic()
            results.append(
                {
                    **scenario,
                    "start": start,
                    "end": end,
                    "p50_ms": percentile(latencies, 50) * 1000,
                    "p99_ms": percentile(latencies, 99) * 1000,
                    "max_ms": max(latencies) * 1000,
                    "scrapes": len(latencies),
                    "body_bytes": int(statistics.median(sizes)),
                }
            )
    return results


async def run_child(args: list[str], limit: float) -> Any:
    """Run ``benchmarks/run.py --child ...`` and return the JSON it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        _SCRIPT,
        "--child",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{err.decode()[-2000:]}")
    return json.loads(out)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


async def wait_for_steady_polling(exporter: Exporter, interval: float, limit: float) -> None:
    """After start every SIM is polled at once, then each takes its slot in the interval that
    follows (spread by a hash of its SID): wait until that steady rhythm has begun."""
    started = time.monotonic()
    await asyncio.sleep(0.1)
    for _ in range(round(limit * 10)):
        if exporter.poller.in_flight == 0 or time.monotonic() > started + limit:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(max(0.0, started + interval * 1.1 - time.monotonic()))


async def scrapes(
    exporter: Exporter, settings: Settings, log: Callable[[str], None]
) -> dict[str, Any]:
    watch = LoopWatch()
    # polling starts and stops with the first app; the second one is the stock path (before)
    fast_app = exporter.web_app(middlewares=[watch.timing])
    stock = ReferenceExposition(exporter.sims, exporter.registry)
    stock_app = make_app(
        dataclasses.replace(exporter.web_context(), exposition=stock), middlewares=[watch.timing]
    )
    # the same incremental cache, with no background refresh: a scrape renders every change
    cold = Exposition(exporter.sims, exporter.registry)
    cold_app = make_app(
        dataclasses.replace(exporter.web_context(), exposition=cold), middlewares=[watch.timing]
    )
    async with (
        serving(fast_app) as fast_url,
        serving(stock_app) as stock_url,
        serving(cold_app) as cold_url,
    ):
        freeze_startup_heap()  # as the command does once it serves
        log(f"  polling every {settings.poll_interval:g}s; waiting for the steady rhythm")
        await wait_for_steady_polling(exporter, settings.poll_interval, 300)
        log("  scraping")
        watcher = asyncio.create_task(watch.run(exporter))
        try:
            await asyncio.sleep(1.0 if not settings.quick else 0.1)
            quiet_start = time.monotonic()
            await asyncio.sleep(2.0 if not settings.quick else 0.2)
            quiet = watch.window(quiet_start, time.monotonic())
            scenarios = scrape_scenarios(settings)
            results = await run_child(
                [
                    "scrape",
                    json.dumps({"fast": fast_url, "stock": stock_url, "cold": cold_url}),
                    json.dumps(scenarios),
                ],
                limit=1800,
            )
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            gc.unfreeze()  # the next fleet size starts from the same footing
    for result in results:
        result.update(watch.window(result.pop("start"), result.pop("end")))
    return {
        "poll_interval_s": settings.poll_interval,
        "without_scrapes": quiet,
        "scenarios": results,
    }


def render_costs(exporter: Exporter, settings: Settings) -> dict[str, Any]:
    """In-process render times (state frozen): stock generator vs the incremental one."""
    state, sims, registry = exporter.state, exporter.sims, exporter.registry
    stock = ReferenceExposition(sims, registry)
    repeat = 1 if settings.quick else 3

    def best(action: Callable[[], object]) -> float:
        times = []
        for _ in range(repeat):
            gc.collect()
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return min(times) * 1000

    stock_text = best(stock.text)
    stock_gzip = best(stock.gzip)
    cold_text = best(lambda: Exposition(sims, registry).text())
    cold_gzip = best(lambda: Exposition(sims, registry).gzip())
    exposition = Exposition(sims, registry)
    exposition.gzip()
    unchanged_text = best(exposition.text)
    unchanged_gzip = best(exposition.gzip)
    sids = list(state.sims)

    def changed(fraction: float, compress: bool) -> float:
        step = max(1, round(1 / fraction))
        times = []
        for r in range(repeat):
            for sid in sids[r % step :: step]:
                state.record_success(sid, ListingOutcome(), time.time())
            gc.collect()
            started = time.perf_counter()
            exposition.gzip() if compress else exposition.text()
            times.append(time.perf_counter() - started)
        return min(times) * 1000

    size = len(exposition.text())
    return {
        "sims": len(sids),
        "body_bytes": size,
        "gzip_bytes": len(exposition.gzip()),
        "stock_text_ms": stock_text,
        "stock_gzip_ms": stock_gzip,
        "cold_text_ms": cold_text,
        "cold_gzip_ms": cold_gzip,
        "unchanged_text_ms": unchanged_text,
        "unchanged_gzip_ms": unchanged_gzip,
        "changed_1pct_text_ms": changed(0.01, False),
        "changed_1pct_gzip_ms": changed(0.01, True),
        "changed_25pct_text_ms": changed(0.25, False),
        "changed_25pct_gzip_ms": changed(0.25, True),
    }


# --------------------------------------------------------------------------------------------
# Memory (fresh processes) and the 429 scenario
# --------------------------------------------------------------------------------------------


async def memory_child(url: str, sims: int, page_size: int) -> dict[str, Any]:
    """Runs in a fresh process: poll ``sims`` SIMs twice, render once, report RSS.

    Polls go out in batches of a few times the concurrency, like the scheduler's spread-out
    slots in steady state. The startup burst (every SIM's first poll at once, each waiting
    task holding its coroutine frames) is measured last, separately.
    """
    settings = Settings(page_size=page_size, concurrency=32)
    exporter = Exporter(exporter_config(url, settings))
    await exporter.open()
    try:
        listed = await exporter.client.list_sims([], 1000)
        keep = [sim.sid for sim in listed[:sims]]
        del listed
        for sid in keep:
            exporter.state.ensure(sid)
        gc.collect()
        empty = rss_bytes()
        batch = 4 * settings.concurrency
        for _ in range(2):  # the baseline poll, then a steady one
            for lo in range(0, len(keep), batch):
                await asyncio.gather(*(exporter.poller.poll_sim(s) for s in keep[lo : lo + batch]))
        gc.collect()
        polled = rss_bytes()
        exporter.exposition.gzip()
        exporter.exposition.text()
        gc.collect()
        rendered = rss_bytes()
        await exporter.poller.poll_all()
        gc.collect()
        burst = rss_bytes()
    finally:
        await exporter.stop()
    return {
        "sims": len(keep),
        "rss_empty": empty,
        "rss_polled": polled,
        "rss_rendered": rendered,
        "rss_after_burst": burst,
    }


async def memory(url: str, sims: int, settings: Settings) -> dict[str, Any]:
    one, many = await asyncio.gather(
        run_child(["memory", url, "1", str(settings.page_size)], limit=600),
        run_child(["memory", url, str(sims), str(settings.page_size)], limit=600),
    )
    n = many["sims"] - one["sims"]
    return {
        "sims": many["sims"],
        "baseline_rss_mib": one["rss_rendered"] / 2**20,
        "rss_mib": many["rss_rendered"] / 2**20,
        "state_kib_per_sim": (many["rss_polled"] - one["rss_polled"]) / n / 1024,
        "state_and_exposition_kib_per_sim": (many["rss_rendered"] - one["rss_rendered"]) / n / 1024,
        "after_startup_burst_kib_per_sim": (many["rss_after_burst"] - one["rss_after_burst"])
        / n
        / 1024,
    }


async def capped(settings: Settings) -> dict[str, Any]:
    """A simulator with some latency that answers 429 above ``cap`` requests in flight
    (``Retry-After: 1``), polled with a higher concurrency than the cap."""
    with SimulatorProcess(
        settings, settings.cap_sims, cap=settings.cap, latency=settings.cap_latency
    ) as sim:
        async with opened_exporter(sim.url, settings) as exporter:
            sids = list(exporter.state.sims)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=settings.cap)
            ) as http:
                await bare_cycle(http, sim.url, sids, settings.cap, settings.page_size)  # warm
                floor = await timed(
                    lambda: bare_cycle(http, sim.url, sids, settings.cap, settings.page_size)
                )
            cycles = []
            for _ in range(2):  # the baseline cycle, then a steady one
                before = api_counts(exporter)
                cycle = await timed(lambda: project_cycle(exporter))
                after = api_counts(exporter)
                delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
                lost = sum(1 for r in exporter.state.sims.values() if r.up is not True)
                cycles.append(
                    {
                        "wall_s": cycle.wall,
                        "cpu_s": cycle.cpu,
                        "requests_200": delta.get("code:200", 0.0),
                        "responses_429": delta.get("code:429", 0.0),
                        "retries": sum(v for k, v in delta.items() if k.startswith("reason:")),
                        "polls_lost": lost,
                    }
                )
    return {
        "sims": len(sids),
        "cap": settings.cap,
        "latency_s": settings.cap_latency,
        "exporter_concurrency": settings.concurrency,
        "bare_at_cap_wall_s": floor.wall,
        "cycles": cycles,
        "steady_vs_bare_at_cap": ratio(cycles[-1]["wall_s"], floor.wall),
    }


# --------------------------------------------------------------------------------------------
# Orchestration and report
# --------------------------------------------------------------------------------------------


async def one_size(settings: Settings, sims: int, log: Callable[[str], None]) -> dict[str, Any]:
    with SimulatorProcess(settings, sims) as sim:
        log(f"[{sims} SIMs] simulator up; discovering SIMs")
        async with opened_exporter(sim.url, settings) as exporter:
            cpu0 = sim.cpu()
            log(f"[{sims} SIMs] poll cycles (bare aiohttp, project, twilio SDK)")
            cycles = await poll_cycles(sim.url, settings, exporter)
            cpu1 = sim.cpu()
            if cpu0 is not None and cpu1 is not None:
                cycles["simulator_cpu_s_total"] = cpu1 - cpu0
            log(f"[{sims} SIMs] scrapes while polling")
            scrape = await scrapes(exporter, settings, log)
            log(f"[{sims} SIMs] render costs in-process")
            render = render_costs(exporter, settings)
        log(f"[{sims} SIMs] memory (fresh processes)")
        mem = await memory(sim.url, sims, settings)
    return {"sims": sims, "poll_cycle": cycles, "scrape": scrape, "render": render, "memory": mem}


async def run(settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    sizes = [await one_size(settings, n, log) for n in settings.sims]
    log(f"[{settings.cap_sims} SIMs] 429 above a concurrency cap of {settings.cap}")
    cap = await capped(settings)
    log("done")
    results = {
        "benchmark": "twilio-wireless-exporter issue 6",
        "machine": machine(),
        "settings": dataclasses.asdict(settings),
        "goals": GOALS,
        "sizes": sizes,
        "concurrency_cap": cap,
        "duration_s": time.monotonic() - started,
    }
    results["goals_met"] = goals_met(results)
    return results


def goals_met(results: dict[str, Any]) -> dict[str, bool]:
    """Each goal, judged at the largest fleet size of the run."""
    size = max(results["sizes"], key=lambda s: s["sims"])
    cycle = size["poll_cycle"]
    single = {
        x["gzip"]: x
        for x in size["scrape"]["scenarios"]
        if x["path"] == "fast" and x["scrapers"] == 1 and not x.get("every")
    }
    cap = results["concurrency_cap"]["cycles"][-1]
    return {
        "poll_wall_vs_bare": cycle["ratios"]["project_vs_bare_wall"]
        <= GOALS["poll_wall_vs_bare_max"],
        "sdk_vs_project": cycle["ratios"]["sdk_vs_project_wall"]
        >= GOALS["sdk_wall_vs_project_min"],
        "scrape_p99_plain": single[False]["p99_ms"] <= GOALS["scrape_p99_plain_ms_max"],
        "scrape_p99_gzip": single[True]["p99_ms"] <= GOALS["scrape_p99_gzip_ms_max"],
        "memory_per_sim": size["memory"]["state_and_exposition_kib_per_sim"]
        <= GOALS["rss_per_sim_kib_max"],
        "requests_per_sim": cycle["requests_per_sim_per_cycle"]
        == GOALS["requests_per_sim_per_cycle"],
        "no_poll_lost_under_cap": cap["polls_lost"] == 0,
    }


def _rows(results: dict[str, Any]) -> Iterator[str]:
    m = results["machine"]
    yield f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['system']}"
    s = results["settings"]
    yield (
        f"Simulator in its own process on loopback, retention {s['retention']} (a few sessions per"
        f" SIM), speed {s['speed']:g}x; concurrency {s['concurrency']}, page size {s['page_size']}"
    )
    yield ""
    yield "Poll cycle (median wall / CPU of this process)"
    yield (
        "| SIMs | bare aiohttp | project | twilio SDK | project/bare wall | SDK/project wall"
        " | requests/SIM |"
    )
    yield "|---:|---:|---:|---:|---:|---:|---:|"
    for size in results["sizes"]:
        c = size["poll_cycle"]
        b, p, k, r = c["bare_aiohttp"], c["project"], c["twilio_sdk"], c["ratios"]
        yield (
            f"| {c['sims']} | {b['wall_s']:.2f} s / {b['cpu_s']:.2f} s"
            f" | {p['wall_s']:.2f} s / {p['cpu_s']:.2f} s"
            f" | {k['wall_s']:.2f} s / {k['cpu_s']:.2f} s"
            f" | {r['project_vs_bare_wall']:.2f}x | {r['sdk_vs_project_wall']:.1f}x"
            f" | {c['requests_per_sim_per_cycle']:.2f} |"
        )
    yield ""
    yield (
        "Scrape latency while polling (client-side p50 / p99; on the exporter: time in the"
        " handler, event-loop lag, longest GC pause, state updates/s)"
    )
    yield (
        "| SIMs | path | scrapers | encoding | p50 | p99 | body | handler p50 / max"
        " | loop lag max | GC max | updates/s |"
    )
    yield "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    for size in results["sizes"]:
        q = size["scrape"]["without_scrapes"]
        yield (
            f"| {size['sims']} | (no scrapes) | 0 | | | | | | {q['lag_max_ms']:.1f} ms"
            f" | {q['gc_pause_max_ms']:.1f} ms | {q['state_updates_per_s']:.0f} |"
        )
        for x in size["scrape"]["scenarios"]:
            encoding = "gzip" if x["gzip"] else "plain"
            yield (
                f"| {size['sims']} | {x['label']} | {x['scrapers']} | {encoding}"
                f" | {x['p50_ms']:.1f} ms | {x['p99_ms']:.1f} ms"
                f" | {x['body_bytes'] / 2**20:.2f} MiB"
                f" | {x['handler_p50_ms']:.1f} / {x['handler_max_ms']:.1f} ms"
                f" | {x['lag_max_ms']:.1f} ms | {x['gc_pause_max_ms']:.1f} ms"
                f" | {x['state_updates_per_s']:.0f} |"
            )
    yield ""
    yield "Render cost in-process (ms): stock generator vs incremental exposition"
    yield (
        "| SIMs | stock text | stock gzip | cold text | cold gzip | unchanged text"
        " | unchanged gzip | 1% changed text / gzip | 25% changed text / gzip |"
    )
    yield "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for size in results["sizes"]:
        r = size["render"]
        yield (
            f"| {r['sims']} | {r['stock_text_ms']:.0f} | {r['stock_gzip_ms']:.0f}"
            f" | {r['cold_text_ms']:.0f} | {r['cold_gzip_ms']:.0f}"
            f" | {r['unchanged_text_ms']:.1f} | {r['unchanged_gzip_ms']:.1f}"
            f" | {r['changed_1pct_text_ms']:.1f} / {r['changed_1pct_gzip_ms']:.1f}"
            f" | {r['changed_25pct_text_ms']:.1f} / {r['changed_25pct_gzip_ms']:.1f} |"
        )
    yield ""
    yield "Memory (RSS above a 1-SIM process, fresh processes)"
    yield "| SIMs | state | state + exposition cache | after a startup burst | total RSS |"
    yield "|---:|---:|---:|---:|---:|"
    for size in results["sizes"]:
        mm = size["memory"]
        yield (
            f"| {mm['sims']} | {mm['state_kib_per_sim']:.2f} KiB/SIM"
            f" | {mm['state_and_exposition_kib_per_sim']:.2f} KiB/SIM"
            f" | {mm['after_startup_burst_kib_per_sim']:.2f} KiB/SIM | {mm['rss_mib']:.0f} MiB |"
        )
    cap = results["concurrency_cap"]
    yield ""
    yield (
        f"429 above a cap of {cap['cap']} in flight (exporter concurrency"
        f" {cap['exporter_concurrency']}, {cap['sims']} SIMs, {cap['latency_s'] * 1000:.0f} ms"
        " latency, Retry-After 1 s)"
    )
    yield "| cycle | wall | 200s | 429s | retries | polls lost |"
    yield "|---|---:|---:|---:|---:|---:|"
    yield (
        f"| bare loop at concurrency {cap['cap']} (no 429)"
        f" | {cap['bare_at_cap_wall_s']:.2f} s | | | | |"
    )
    for name, c in zip(("first (baseline)", "steady"), cap["cycles"], strict=False):
        yield (
            f"| exporter, {name} | {c['wall_s']:.2f} s | {c['requests_200']:.0f}"
            f" | {c['responses_429']:.0f} | {c['retries']:.0f} | {c['polls_lost']} |"
        )


def report(results: dict[str, Any]) -> str:
    met = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in results["goals_met"].items())
    return "\n".join(_rows(results)) + f"\nGoals met: {met}\n"


def child_main(argv: list[str]) -> int:
    kind, *rest = argv
    if kind == "scrape":
        out: Any = asyncio.run(scrape_child(json.loads(rest[0]), json.loads(rest[1])))
    elif kind == "memory":
        out = asyncio.run(memory_child(rest[0], int(rest[1]), int(rest[2])))
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(json.dumps(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        return child_main(args[1:])
    settings, out = parse_args(args)
    drop_created_samples()  # as the command does

    began = time.monotonic()

    def log(message: str) -> None:
        print(f"{time.monotonic() - began:6.1f}s {message}", file=sys.stderr, flush=True)

    results = asyncio.run(run(settings, log))
    print(report(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
