"""The exporter measured as a user runs it: the real command against the simulator's process.

One command, every fleet size side by side (a results JSON and a Markdown table)::

    python benchmarks/process.py --sims 10000,100000 --out results.json --markdown table.md

``benchmarks/run.py`` measures the parts in-process (``Poller.poll_all()``, the renderer); this
script measures what a user sees. For each fleet size N it starts ``python -m
twilio_wireless_simulator`` with its access log on (millisecond time stamps), writes a config
file listing N static SIMs, and runs ``twilio-wireless-exporter --config FILE`` as a subprocess:

1. Start: from just before the process is started to the simulator's first answer to it.
2. First full cycle: from the exporter's first request to the first listing of the last of the
   N SIMs, against a bare aiohttp loop (its own process) that fetches and ``json``-parses the
   same listings at the same concurrency, timed from the same access log. Steady cycle: the
   next N listings, with ``poll.interval`` short enough that the exporter polls flat out,
   against the bare loop's second cycle.
3. Requests per SIM per cycle by endpoint (listings, SIM reads, ``/v1/Sims`` pages, usage
   records, account usage, rate plans), and the identity requests of the start-up refresh.
4. For each ``metrics.per_sim`` mode the config accepts (``default`` writes no such option), a
   fresh process polled at ``--scrape-interval``: once every SIM is polled (``/-/ready``),
   ``/metrics`` p50/p99 plain and gzip with one scraper and with ten (a child process), body
   size and series count, and the process's RSS per SIM after the scrapes (``VmRSS`` above a
   process monitoring one SIM).

``--repeat N`` runs everything N times; the JSON keeps every run and the table shows the median
and the range. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gzip
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import bare_cycle, basic_auth, machine, percentile, ratio

from twilio_wireless_simulator import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN

_SCRIPT = str(Path(__file__).resolve())
_LISTENING = re.compile(r"listening on (http://[^\s/]+)")
#: One line of the simulator's access log: the logging time stamp, the request line, the
#: status and the user agent (aiohttp's default access log format).
_ACCESS = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO twilio_wireless_simulator[.\w]*: \S+ \[[^\]]*\]"
    r' "GET (\S+) [^"]*" (\d{3}) \S+ "[^"]*" "([^"]*)"'
)
_PATHS = (
    (re.compile(r"^/v1/Sims/(DE[0-9a-fA-F]{32})/DataSessions(?:\?|$)"), "data_sessions"),
    (re.compile(r"^/v1/Sims/(DE[0-9a-fA-F]{32})/UsageRecords(?:\?|$)"), "usage_records"),
    (re.compile(r"^/v1/UsageRecords(?:\?|$)()"), "account_usage"),
    (re.compile(r"^/v1/RatePlans(?:\?|$)()"), "rate_plans"),
    (re.compile(r"^/v1/Sims/(DE[0-9a-fA-F]{32})(?:\?|$)"), "sim"),
    (re.compile(r"^/v1/Sims(?:\?|$)()"), "sims"),
)
EXPORTER_AGENT = "twilio-wireless-exporter/"
MODES = ("default", "full", "essential", "none")

#: The issue's goals; gzip p99 and series are judged per ``per_sim`` mode (``default``: full).
GOALS: dict[str, Any] = {
    "first_cycle_vs_bare_max": 1.2,
    "identity_requests_max": "ceil(S / 1000) + 1",
    "start_to_first_request_s_max": {"10000": 0.5, "100000": 2.0},
    "rss_per_sim_kb_max": 3.0,
    "gzip_p99_one_scraper_ms_max": {
        "10000": {"full": 50.0, "essential": 30.0, "none": 5.0},
        "100000": {"full": 400.0, "essential": 200.0, "none": 10.0},
    },
    "series_vs_full_max": {"essential": 0.5},
    "series_none_max": "1000 + groups",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    sims: tuple[int, ...] = (10_000, 100_000)
    modes: tuple[str, ...] = MODES
    repeat: int = 1
    concurrency: int = 32
    page_size: int = 100
    retention: str = "6h"
    speed: float = 60.0
    cycle_interval: str = "1s"
    scrape_interval: str = "15s"
    scrapes: int = 60
    scrapes_each_of_ten: int = 10
    seed: int = 1
    quick: bool = False


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None, Path | None]:
    p = argparse.ArgumentParser(
        prog="python benchmarks/process.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--sims", default="10000,100000", help="fleet sizes, comma-separated")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="metrics.per_sim modes to scrape; 'default' sets none; a mode the config"
        " refuses is skipped (default: %(default)s)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of everything, to see the spread")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    p.add_argument("--concurrency", type=int, default=32, help="poll.concurrency and the bare loop")
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument("--retention", default="6h", help="simulator listing window (a few sessions)")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per second")
    p.add_argument("--cycle-interval", default="1s", help="poll.interval of the cycle run")
    p.add_argument("--scrape-interval", default="15s", help="poll.interval while scraping")
    p.add_argument("--scrapes", type=int, default=60, help="scrapes by one scraper at 10,000 SIMs")
    p.add_argument("--quick", action="store_true", help="tiny counts (the test suite's smoke run)")
    args = p.parse_args(argv)
    sims = tuple(int(s) for s in args.sims.split(",") if s.strip())
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not sims or min(sims) < 1:
        p.error("--sims: every size must be at least 1")
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    if args.repeat < 1:
        p.error("--repeat: at least 1")
    settings = Settings(
        sims=sims,
        modes=modes,
        repeat=args.repeat,
        concurrency=args.concurrency,
        page_size=args.page_size,
        retention=args.retention,
        speed=args.speed,
        cycle_interval=args.cycle_interval,
        scrape_interval=args.scrape_interval,
        scrapes=args.scrapes,
        quick=args.quick,
    )
    if args.quick:
        settings = dataclasses.replace(settings, scrapes=3, scrapes_each_of_ten=1)
    return settings, args.out, args.markdown


# --------------------------------------------------------------------------------------------
# Processes and the access log
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One answered request in the simulator's access log."""

    at: float  # when the simulator logged the answer (wall clock, ms resolution)
    endpoint: str  # data_sessions, sim, sims, usage_records, account_usage, rate_plans or other
    sid: str
    status: int
    exporter: bool  # sent by the exporter (its User-Agent), not by the bare loop


def _stamp(text: str) -> float:
    # logging writes local time; the naive datetime is read back as local time
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_access(line: str) -> Request | None:
    match = _ACCESS.match(line)
    if match is None:
        return None
    stamp, path, status, agent = match.groups()
    endpoint, sid = "other", ""
    for pattern, name in _PATHS:
        found = pattern.match(path)
        if found is not None:
            endpoint, sid = name, found.group(1)
            break
    return Request(_stamp(stamp), endpoint, sid, int(status), agent.startswith(EXPORTER_AGENT))


class LogFile:
    """A process's log, written to a file (cheaper than a pipe for 100,000s of lines) and read
    from where the previous read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""

    def lines(self) -> list[str]:
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        text = self._partial + chunk.decode("utf-8", "replace")
        *complete, self._partial = text.split("\n")
        return complete

    def requests(self) -> list[Request]:
        return [r for r in map(parse_access, self.lines()) if r is not None]

    def wait_for(self, pattern: re.Pattern[str], limit: float) -> re.Match[str]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for line in self.lines():
                match = pattern.search(line)
                if match is not None:
                    return match
            time.sleep(0.02)
        raise RuntimeError(f"{pattern.pattern!r} not in {self.path.name} within {limit:g} s")


#: The environment of every child: compiled modules cached (in the run's own directory), as an
#: installed package has them, even where the caller's environment turns that off.
CHILD_ENV: dict[str, str] = {}


def child_env(work: Path) -> None:
    CHILD_ENV.clear()
    CHILD_ENV.update({k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")


class Process:
    """A child process whose stderr goes to a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.command = command
        self.log = LogFile(log)
        self._stream = log.open("wb")
        self.started = time.time()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._stream,
            stderr=subprocess.STDOUT,
            env=CHILD_ENV or None,
        )

    def url(self, limit: float) -> str:
        try:
            return self.log.wait_for(_LISTENING, limit).group(1)
        except RuntimeError:
            self.stop()
            tail = self.log.path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.command[0]} did not start:\n{tail}") from None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stream.close()


def exporter_command() -> list[str]:
    """The installed command when there is one, else the same entry point through Python."""
    found = shutil.which("twilio-wireless-exporter")
    return [found] if found else [sys.executable, "-m", "twilio_wireless_exporter"]


def simulator(settings: Settings, sims: int, work: Path) -> Process:
    command = [
        *(sys.executable, "-m", "twilio_wireless_simulator", "--listen", "127.0.0.1:0"),
        *("--sims", str(sims), "--seed", str(settings.seed), "--retention", settings.retention),
        *("--speed", str(settings.speed), "--access-log", "--log-level", "info"),
    ]
    return Process(command, work / f"simulator-{sims}.log")


def write_config(
    path: Path, url: str, sids: Sequence[str], settings: Settings, interval: str, mode: str
) -> None:
    lines = [
        "twilio:",
        f"  base_url: {url}",
        f"  account_sid: {DEMO_ACCOUNT_SID}",
        f"  auth_token: {DEMO_AUTH_TOKEN}",
        "  timeout: 30s",
        "poll:",
        f"  interval: {interval}",
        f"  page_size: {settings.page_size}",
        f"  concurrency: {settings.concurrency}",
        "  requests_per_second: 1000000.0",
    ]
    if mode != "default":
        lines += ["metrics:", f"  per_sim: {mode}"]
    lines.append("sims:")
    lines += [f"  - sid: {sid}\n    name: sim-{i:06d}" for i, sid in enumerate(sids)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_seconds(text: str) -> float:
    """``15s``, ``2m`` or a number of seconds (the forms the two interval flags take)."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * units[match.group(2) or "s"]


def refused(config: Path) -> str | None:
    """Why ``--check-config`` refuses ``config``, or None if it is valid."""
    proc = subprocess.run(
        [*exporter_command(), "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
        check=False,
        env=CHILD_ENV or None,
    )
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.splitlines()[1:] if line.strip()]
    return "; ".join(lines) or f"exit status {proc.returncode}"


async def list_sids(url: str, count: int) -> list[str]:
    """The first ``count`` SIDs of the simulated account, from its ``/v1/Sims`` pages."""
    headers = {"Authorization": basic_auth()}
    sids: list[str] = []
    next_url: str | None = f"{url}/v1/Sims?PageSize=1000"
    async with aiohttp.ClientSession() as http:
        while next_url and len(sids) < count:
            async with http.get(next_url, headers=headers) as resp:
                page = await resp.json()
            sids += [sim["sid"] for sim in page["sims"]]
            next_url = page["meta"]["next_page_url"]
    return sids[:count]


def http_get(url: str, *, gzip_ok: bool = False, limit: float = 300) -> tuple[int, bytes]:
    async def get() -> tuple[int, bytes]:
        headers = {"Accept-Encoding": "gzip" if gzip_ok else "identity"}
        timeout = aiohttp.ClientTimeout(total=limit)
        async with (
            aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as http,
            http.get(url, headers=headers) as resp,
        ):
            return resp.status, await resp.read()

    return asyncio.run(get())


def wait_ready(url: str, limit: float) -> float:
    """Seconds until ``/-/ready`` answers 200 (every SIM polled once)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            if http_get(f"{url}/-/ready", limit=10)[0] == 200:
                return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"the exporter was not ready within {limit:g} s")


# --------------------------------------------------------------------------------------------
# Cycles from the access log
# --------------------------------------------------------------------------------------------


def round_ends(requests: Sequence[Request], sims: int, count: int) -> list[float]:
    """When each of the first ``count`` rounds of listings was complete: round k ends with the
    answer that gives the last SIM its k-th listing."""
    listed: Counter[str] = Counter()
    complete: Counter[int] = Counter()  # listings done -> SIMs that have at least that many
    ends: list[float] = []
    for request in requests:
        if request.endpoint != "data_sessions" or request.status != 200:
            continue
        listed[request.sid] += 1
        n = listed[request.sid]
        complete[n] += 1
        while len(ends) < count and complete[len(ends) + 1] == sims:
            ends.append(request.at)
        if len(ends) == count:
            break
    return ends


def by_endpoint(
    requests: Sequence[Request], start: float, end: float, sims: int
) -> dict[str, float]:
    counts = Counter(r.endpoint for r in requests if start <= r.at <= end)
    return {endpoint: n / sims for endpoint, n in sorted(counts.items())}


def bare_child(url: str, sids_file: str, concurrency: int, page_size: int, cycles: int) -> Any:
    """Runs in its own process: the bare loop's cycles, one after the other."""
    sids = Path(sids_file).read_text().split()

    async def run() -> list[float]:
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=300)
        walls = []
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            for _ in range(cycles):
                started = time.perf_counter()
                await bare_cycle(http, url, sids, concurrency, page_size)
                walls.append(time.perf_counter() - started)
        return walls

    return {"cycles_in_process_s": asyncio.run(run())}


def run_child(args: list[str], limit: float) -> Any:
    proc = subprocess.run(
        [sys.executable, _SCRIPT, "--child", *args],
        capture_output=True,
        text=True,
        timeout=limit,
        check=False,
        env=CHILD_ENV or None,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def bare_loop(sim: Process, url: str, sids_file: Path, settings: Settings, sims: int) -> Any:
    """Two cycles of the bare loop in its own process, timed from the access log."""
    sim.log.requests()  # skip what came before
    child = run_child(
        ["bare", url, str(sids_file), str(settings.concurrency), str(settings.page_size), "2"],
        limit=1800,
    )
    time.sleep(0.3)  # the last lines of the log
    requests = [r for r in sim.log.requests() if not r.exporter]
    ends = round_ends(requests, sims, 2)
    if len(ends) < 2 or not requests:
        raise RuntimeError("the bare loop's cycles are not in the access log")
    return {
        "first_cycle_s": ends[0] - requests[0].at,
        "steady_cycle_s": ends[1] - ends[0],
        **child,
    }


# --------------------------------------------------------------------------------------------
# The exporter runs
# --------------------------------------------------------------------------------------------


def cycle_run(sim: Process, url: str, sids: Sequence[str], settings: Settings, work: Path) -> Any:
    """Start, first cycle and a steady cycle of the real command, polling flat out."""
    config = work / "cycle.yaml"
    write_config(config, url, sids, settings, settings.cycle_interval, "default")
    sim.log.requests()
    exporter = Process(
        [*exporter_command(), "--config", str(config), "--web.listen-address", "127.0.0.1:0"],
        work / f"exporter-cycle-{len(sids)}.log",
    )
    requests: list[Request] = []
    ends: list[float] = []
    try:
        limit = 120 + len(sids) / 100
        deadline = time.monotonic() + limit
        while len(ends) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            requests += [r for r in sim.log.requests() if r.exporter]
            ends = round_ends(requests, len(sids), 2)
        rss = exporter.rss_bytes()
    finally:
        exporter.stop()
    if len(ends) < 2:
        raise RuntimeError(f"the exporter did not list every SIM twice within {limit:g} s")
    first = requests[0].at
    identity = sum(1 for r in requests if r.endpoint in ("sim", "sims") and r.at <= ends[1])
    return {
        "start_to_first_request_s": first - exporter.started,
        "first_cycle_s": ends[0] - first,
        "steady_cycle_s": ends[1] - ends[0],
        "requests_per_sim_first_cycle": by_endpoint(requests, first, ends[0], len(sids)),
        "requests_per_sim_steady_cycle": by_endpoint(requests, ends[0], ends[1], len(sids)),
        "identity_requests": identity,
        "errors": sum(1 for r in requests if r.status != 200 and r.at <= ends[1]),
        "rss_bytes_polling": rss,
    }


def scrape_counts(settings: Settings, sims: int) -> tuple[int, int]:
    """Scrapes by one scraper, and by each of ten: fewer for bodies of a hundred megabytes."""
    scale = min(1.0, 10_000 / sims)
    one = max(3 if not settings.quick else 1, round(settings.scrapes * scale))
    each = max(1, round(settings.scrapes_each_of_ten * scale))
    return one, each


def mode_run(
    sim: Process, url: str, sids: Sequence[str], settings: Settings, work: Path, mode: str
) -> Any:
    """One ``per_sim`` mode: a fresh exporter, polled every ``--scrape-interval``; once ready,
    the scrapes, the body and the RSS after them."""
    config = work / f"mode-{mode}.yaml"
    write_config(config, url, sids, settings, settings.scrape_interval, mode)
    reason = refused(config)
    if reason is not None:
        return {"mode": mode, "skipped": reason}
    sim.log.requests()
    exporter = Process(
        [*exporter_command(), "--config", str(config), "--web.listen-address", "127.0.0.1:0"],
        work / f"exporter-{mode}-{len(sids)}.log",
    )
    try:
        base = exporter.url(120)
        ready_s = wait_ready(base, 120 + len(sids) / 100)
        sent = [r for r in sim.log.requests() if r.exporter]
        first = sent[0] if sent else None
        # every SIM has been polled once; its next polls spread over the interval that follows
        time.sleep(0 if settings.quick else parse_seconds(settings.scrape_interval))
        one, each = scrape_counts(settings, len(sids))
        scenarios = [
            {"scrapers": scrapers, "count": count, "gzip": gz}
            for scrapers, count in ((1, one), (10, each))
            for gz in (False, True)
        ]
        scrapes = run_child(["scrape", f"{base}/metrics", json.dumps(scenarios)], limit=3600)
        status, body = http_get(f"{base}/metrics")
        gz_status, gz_body = http_get(f"{base}/metrics", gzip_ok=True)
        rss = exporter.rss_bytes()
        time.sleep(0.3)  # the last lines of the log
        sent += [r for r in sim.log.requests() if r.exporter]
    finally:
        exporter.stop()
    if status != 200 or gz_status != 200:
        raise RuntimeError(f"/metrics answered {status} / {gz_status}")
    text = body.decode()
    return {
        "mode": mode,
        "start_to_first_request_s": first.at - exporter.started if first else math.nan,
        "ready_s": ready_s,
        "scrapes": scrapes,
        "body_bytes": len(body),
        "gzip_body_bytes": len(gz_body),
        "gzip_decodes_to_plain_size": len(gzip.decompress(gz_body)) if gz_body else 0,
        "series": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
        "rss_bytes": rss,
        # every request of this run by endpoint (usage reads included), and over how long
        "requests_per_sim": by_endpoint(sent, -math.inf, math.inf, len(sids)),
        "requests_s": sent[-1].at - sent[0].at if sent else 0.0,
    }


async def _scrape(url: str, count: int, gzip_ok: bool, out: list[float]) -> None:
    headers = {"Accept-Encoding": "gzip" if gzip_ok else "identity"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as http:
        async with http.get(url, headers=headers) as resp:  # the connection, not measured
            await resp.read()
        for _ in range(count):
            started = time.perf_counter()
            async with http.get(url, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"scrape: HTTP {resp.status}")
            out.append(time.perf_counter() - started)


def scrape_child(url: str, scenarios: list[dict[str, Any]]) -> Any:
    """Runs in its own process: each scenario's scrapers at once, latencies per scrape."""
    results = []
    for scenario in scenarios:
        latencies: list[float] = []

        async def scrapers(s: dict[str, Any] = scenario, out: list[float] = latencies) -> None:
            await asyncio.gather(
                *(_scrape(url, s["count"], s["gzip"], out) for _ in range(s["scrapers"]))
            )

        asyncio.run(scrapers())
        results.append(
            {
                **scenario,
                "p50_ms": percentile(latencies, 50) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000,
                "max_ms": max(latencies) * 1000,
                "n": len(latencies),
            }
        )
    return results


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def one_size(settings: Settings, sims: int, work: Path, log: Any) -> Any:
    sim = simulator(settings, sims, work)
    try:
        url = sim.url(600)
        sids = asyncio.run(list_sids(url, sims))
        if len(sids) < sims:
            raise RuntimeError(f"the simulator lists {len(sids)} SIMs, not {sims}")
        sids_file = work / f"sids-{sims}.txt"
        sids_file.write_text("\n".join(sids) + "\n")
        log(f"[{sims} SIMs] warming the simulator up (one bare cycle, not measured)")
        run_child(
            ["bare", url, str(sids_file), str(settings.concurrency), str(settings.page_size), "1"],
            1800,
        )
        runs = []
        for index in range(settings.repeat):
            label = f"[{sims} SIMs, run {index + 1}/{settings.repeat}]"
            load = os.getloadavg()  # other work on the machine moves every figure
            log(f"{label} bare aiohttp loop (load average {load[0]:.2f})")
            bare = bare_loop(sim, url, sids_file, settings, sims)
            log(f"{label} exporter: start, first and steady cycle")
            cycle = cycle_run(sim, url, sids, settings, work)
            modes = []
            for mode in settings.modes:
                log(f"{label} exporter, per_sim {mode}: scrapes and RSS")
                modes.append(mode_run(sim, url, sids, settings, work, mode))
            runs.append({"bare": bare, "cycle": cycle, "modes": modes, "load_average_before": load})
        return {"sims": sims, "runs": runs}
    finally:
        sim.stop()


def baseline_rss(settings: Settings, work: Path) -> int:
    """RSS of the command monitoring one SIM, after a few scrapes (the per-SIM figures are
    above it)."""
    sim = simulator(settings, 1, work)
    try:
        url = sim.url(120)
        sids = asyncio.run(list_sids(url, 1))
        result = mode_run(sim, url, sids, dataclasses.replace(settings, scrapes=3), work, "default")
        return int(result["rss_bytes"])
    finally:
        sim.stop()


def summarize(size: dict[str, Any], base_rss: int) -> dict[str, Any]:
    """Per figure: the median over the runs, and the lowest and highest."""
    sims = size["sims"]
    values: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        values.setdefault(name, []).append(value)

    for run in size["runs"]:
        bare, cycle = run["bare"], run["cycle"]
        add("start_to_first_request_s", cycle["start_to_first_request_s"])
        add("first_cycle_s", cycle["first_cycle_s"])
        add("bare_first_cycle_s", bare["first_cycle_s"])
        add("first_cycle_vs_bare", ratio(cycle["first_cycle_s"], bare["first_cycle_s"]))
        add("steady_cycle_s", cycle["steady_cycle_s"])
        add("bare_steady_cycle_s", bare["steady_cycle_s"])
        add("steady_cycle_vs_bare", ratio(cycle["steady_cycle_s"], bare["steady_cycle_s"]))
        add("identity_requests", cycle["identity_requests"])
        for phase in ("first_cycle", "steady_cycle"):
            for endpoint, n in cycle[f"requests_per_sim_{phase}"].items():
                add(f"requests_per_sim_{phase}.{endpoint}", n)
        for mode in run["modes"]:
            if "skipped" in mode:
                continue
            name = mode["mode"]
            # every start of the command is one more sample of its start-up time
            add("start_to_first_request_s", mode["start_to_first_request_s"])
            add(f"{name}.rss_per_sim_kb", (mode["rss_bytes"] - base_rss) / sims / 1000)
            add(f"{name}.body_mb", mode["body_bytes"] / 1e6)
            add(f"{name}.gzip_body_mb", mode["gzip_body_bytes"] / 1e6)
            add(f"{name}.series", mode["series"])
            for endpoint, n in mode.get("requests_per_sim", {}).items():
                add(f"{name}.requests_per_sim.{endpoint}", n)
            if "requests_s" in mode:
                add(f"{name}.requests_s", mode["requests_s"])
            for s in mode["scrapes"]:
                key = f"{name}.scrape_{s['scrapers']}x_{'gzip' if s['gzip'] else 'plain'}"
                add(f"{key}.p50_ms", s["p50_ms"])
                add(f"{key}.p99_ms", s["p99_ms"])
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
        for name, v in values.items()
    }


def goals_met(size: dict[str, Any]) -> dict[str, bool]:
    sims, summary = size["sims"], size["summary"]

    def median(name: str) -> float | None:
        found = summary.get(name)
        return None if found is None else float(found["median"])

    met: dict[str, bool] = {}
    vs_bare = median("first_cycle_vs_bare")
    if vs_bare is not None:
        met["first_cycle_vs_bare"] = vs_bare <= GOALS["first_cycle_vs_bare_max"]
    identity = median("identity_requests")
    if identity is not None:
        met["identity_requests"] = identity <= math.ceil(sims / 1000) + 1
    start_goal = GOALS["start_to_first_request_s_max"].get(str(sims))
    start = median("start_to_first_request_s")
    if start_goal is not None and start is not None:
        met["start_to_first_request"] = start <= start_goal
    full = "full" if median("full.series") is not None else "default"
    rss = median(f"{full}.rss_per_sim_kb")
    if rss is not None:
        met["rss_per_sim"] = rss <= GOALS["rss_per_sim_kb_max"]
    p99_goals = GOALS["gzip_p99_one_scraper_ms_max"].get(str(sims), {})
    for mode, limit in p99_goals.items():
        p99 = median(f"{full if mode == 'full' else mode}.scrape_1x_gzip.p99_ms")
        if p99 is not None:
            met[f"gzip_p99_{mode}"] = p99 <= limit
    full_series = median(f"{full}.series")
    essential, none = median("essential.series"), median("none.series")
    if full_series and essential is not None:
        met["series_essential"] = (
            essential <= full_series * GOALS["series_vs_full_max"]["essential"]
        )
    if none is not None:
        met["series_none"] = none <= 1000  # plus the fleet groups, when aggregates exist
    return met


def run(settings: Settings, log: Any) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="twe-process-bench-") as tmp:
        work = Path(tmp)
        child_env(work)
        log("baseline: the command monitoring one SIM (also compiles the modules once)")
        base = baseline_rss(settings, work)
        sizes = [one_size(settings, n, work, log) for n in settings.sims]
    for size in sizes:
        size["summary"] = summarize(size, base)
        size["goals_met"] = goals_met(size)
    return {
        "benchmark": "twilio-wireless-exporter process-level (issue 12)",
        "machine": machine(),
        "settings": dataclasses.asdict(settings),
        "goals": GOALS,
        "baseline_rss_bytes": base,
        "sizes": sizes,
        "duration_s": time.monotonic() - started,
    }


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _cell(summary: dict[str, Any], name: str, fmt: str) -> str:
    found = summary.get(name)
    if found is None:
        return "-"
    text = format(found["median"], fmt)
    if found["runs"] > 1:
        text += f" ({format(found['min'], fmt)} to {format(found['max'], fmt)})"
    return text


def table_rows(results: dict[str, Any]) -> Iterator[tuple[str, str, list[str]]]:
    """``(measure, goal, cell per size)``."""
    sizes = results["sizes"]

    def row(measure: str, goal: str, name: str, fmt: str) -> tuple[str, str, list[str]]:
        return measure, goal, [_cell(s["summary"], name, fmt) for s in sizes]

    yield row("process start to first request (s)", "≤ 0.5 / 2", "start_to_first_request_s", ".2f")
    yield row("first full cycle, exporter (s)", "", "first_cycle_s", ".2f")
    yield row("first full cycle, bare aiohttp loop (s)", "", "bare_first_cycle_s", ".2f")
    yield row("first full cycle, exporter / bare loop", "≤ 1.2", "first_cycle_vs_bare", ".2f")
    yield row("steady cycle, exporter (s)", "", "steady_cycle_s", ".2f")
    yield row("steady cycle, bare aiohttp loop (s)", "", "bare_steady_cycle_s", ".2f")
    yield row("steady cycle, exporter / bare loop", "", "steady_cycle_vs_bare", ".2f")
    yield row("identity requests, start-up refresh", "≤ ⌈S/1000⌉ + 1", "identity_requests", ".0f")
    for phase in ("first_cycle", "steady_cycle"):
        prefix = f"requests_per_sim_{phase}."
        endpoints = sorted(
            {n[len(prefix) :] for s in sizes for n in s["summary"] if n.startswith(prefix)}
        )
        for endpoint in endpoints:
            what = f"requests per SIM, {phase.replace('_', ' ')}: {endpoint}"
            yield row(what, "", prefix + endpoint, ".3f")
    measured = results["settings"]["modes"]
    for mode in [m for m in measured if any(f"{m}.series" in s["summary"] for s in sizes)]:
        label = "per_sim default (full)" if mode == "default" else f"per_sim {mode}"
        yield row(
            f"{label}: RSS per SIM after scrapes (kB)", "≤ 3", f"{mode}.rss_per_sim_kb", ".2f"
        )
        yield row(f"{label}: series", "", f"{mode}.series", ".0f")
        prefix = f"{mode}.requests_per_sim."
        endpoints = sorted(
            {n[len(prefix) :] for s in sizes for n in s["summary"] if n.startswith(prefix)}
        )
        yield row(f"{label}: requests over (s)", "", f"{mode}.requests_s", ".1f")
        for endpoint in endpoints:
            what = f"{label}: requests per SIM over that time: {endpoint}"
            yield row(what, "", prefix + endpoint, ".3f")
        yield row(f"{label}: body, plain (MB)", "", f"{mode}.body_mb", ".1f")
        yield row(f"{label}: body, gzip (MB)", "", f"{mode}.gzip_body_mb", ".2f")
        for scrapers, who in ((1, "one scraper"), (10, "ten scrapers")):
            for encoding in ("plain", "gzip"):
                key = f"{mode}.scrape_{scrapers}x_{encoding}"
                goal = "≤ 50 / 400 (full)" if (scrapers, encoding) == (1, "gzip") else ""
                what = f"{label}: scrape, {who}, {encoding}"
                yield row(f"{what}, p50 (ms)", "", f"{key}.p50_ms", ".1f")
                yield row(f"{what}, p99 (ms)", goal, f"{key}.p99_ms", ".1f")


def markdown(results: dict[str, Any]) -> str:
    sizes = results["sizes"]
    head = ["measure", *(f"{s['sims']:,} SIMs" for s in sizes), "goal (10k / 100k)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(sizes) + "|---|"]
    for measure, goal, cells in table_rows(results):
        lines.append("| " + " | ".join([measure, *cells, goal]) + " |")
    skipped = {
        m["mode"]: m["skipped"]
        for s in sizes
        for r in s["runs"]
        for m in r["modes"]
        if "skipped" in m
    }
    for mode, reason in skipped.items():
        lines.append(f"\n`per_sim: {mode}` skipped: the config refuses it ({reason}).")
    met = {f"{s['sims']}": s["goals_met"] for s in sizes}
    lines.append(f"\nGoals met: {json.dumps(met, sort_keys=True)}")
    return "\n".join(lines) + "\n"


def child_main(argv: list[str]) -> int:
    kind, *rest = argv
    if kind == "bare":
        out: Any = bare_child(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
    elif kind == "scrape":
        out = scrape_child(rest[0], json.loads(rest[1]))
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(json.dumps(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        return child_main(args[1:])
    settings, out, table = parse_args(args)
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"{time.monotonic() - began:7.1f}s {message}", file=sys.stderr, flush=True)

    results = run(settings, log)
    text = markdown(results)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        log(f"results written to {out}")
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
