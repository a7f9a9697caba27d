"""Limits: a hostile or broken upstream cannot make the exporter page or buffer without bound.

The page cap is exercised against the simulator; endless ``next_page_url`` chains and huge or
endless bodies, which the simulator does not produce, come from a tiny hostile API on a real port.
"""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tests.harness_support import MakeHarness, exporter_mapping
from tests.metrics_support import find_value as value
from twilio_wireless_exporter.config import config_from_mapping
from twilio_wireless_simulator import RunningSimulator

MIB = 1024 * 1024
ENDLESS = "DE" + "e" * 32
HUGE = "DE" + "b" * 32
STREAM = "DE" + "5" * 32
FINE = "DE" + "f" * 32
STREAM_LIMIT = 256 * MIB  # what the hostile API would send if nobody stopped reading


def poller_messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "twilio_wireless_exporter.polling.poller" and r.levelno == level
    ]


# ------------------------------------------------------------------------------- page cap, simulator


async def test_page_cap_fails_only_that_sim(
    sim: RunningSimulator, harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    busy, quiet = sim.fleet.add_sim(), sim.fleet.add_sim()
    for _ in range(5):
        sim.fleet.open_session(busy)
    sim.fleet.open_session(quiet)
    h = await harness([busy, quiet], poll={"page_size": 1, "max_pages": 3})

    await h.poll()
    text = await h.scrape()
    assert value(text, "twilio_wireless_sim_up", sim_sid=busy) == 0
    assert value(text, "twilio_wireless_sim_up", sim_sid=quiet) == 1
    assert value(text, "twilio_wireless_poll_errors_total", kind="too_many_pages") == 1
    # three pages of the busy SIM's five were fetched, then the poll stopped
    assert sim.stats.count("data_sessions") == 3 + 1
    assert poller_messages(caplog, logging.WARNING) == [
        f"polling SIM {busy} failed: data_sessions: listing has more than 3 pages (poll.max_pages)"
    ]

    # every failed poll counts; the log line is repeated at debug level only
    await h.poll()
    text = await h.scrape()
    assert value(text, "twilio_wireless_poll_errors_total", kind="too_many_pages") == 2
    assert len(poller_messages(caplog, logging.WARNING)) == 1
    assert poller_messages(caplog, logging.DEBUG)[-1].startswith(f"polling SIM {busy} failed again")


# ------------------------------------------------------------------------------- a hostile API


@dataclass
class HostileApi:
    """Endless page chains, a body over the cap, an endless chunked body, and one honest SIM."""

    url: str = ""
    requests: Counter[str] = field(default_factory=Counter)
    streamed: int = 0
    stream_interrupted: bool = False
    stream_done: asyncio.Event = field(default_factory=asyncio.Event)

    async def data_sessions(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        self.requests[sid] += 1
        if sid == ENDLESS:
            page = int(request.query.get("Page", "0"))
            return web.json_response(
                {
                    "data_sessions": [],
                    "meta": {"next_page_url": f"{self.url}{request.path}?Page={page + 1}"},
                }
            )
        if sid == HUGE:
            body = b'{"data_sessions": [' + b" " * (2 * MIB) + b'], "meta": {}}'
            return web.Response(body=body, content_type="application/json")
        if sid == STREAM:
            return await self._endless(request)
        return web.json_response({"data_sessions": [], "meta": {"next_page_url": None}})

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * 65536
        try:
            await response.write(b'{"data_sessions": [')
            while self.streamed < STREAM_LIMIT:
                await response.write(chunk)
                self.streamed += len(chunk)
        except ConnectionError:
            self.stream_interrupted = True
        finally:
            self.stream_done.set()
        return response

    async def sims(self, request: web.Request) -> web.Response:
        self.requests["sims"] += 1
        page = int(request.query.get("Page", "0"))
        return web.json_response(
            {
                "sims": [{"sid": FINE, "status": "active"}],
                "meta": {"next_page_url": f"{self.url}/v1/Sims?Page={page + 1}"},
            }
        )


@pytest.fixture
async def hostile() -> AsyncIterator[HostileApi]:
    api = HostileApi()
    app = web.Application()
    app.router.add_get("/v1/Sims/{sid}/DataSessions", api.data_sessions)
    app.router.add_get("/v1/Sims", api.sims)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield api
    await runner.cleanup()


async def test_hostile_upstream_is_capped(
    hostile: HostileApi, harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sids = [ENDLESS, HUGE, STREAM, FINE]
    config = config_from_mapping(
        exporter_mapping(hostile.url, sids, poll={"max_response_bytes": "1MiB"}), environ={}
    )
    h = await harness(sids, config=config)

    tracemalloc.start()
    try:
        await h.poll()
        await asyncio.wait_for(hostile.stream_done.wait(), timeout=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    text = await h.scrape()
    assert [value(text, "twilio_wireless_sim_up", sim_sid=sid) for sid in sids] == [0, 0, 0, 1]
    assert value(text, "twilio_wireless_poll_errors_total", kind="too_many_pages") == 1
    assert value(text, "twilio_wireless_poll_errors_total", kind="too_large") == 2
    # the endless chain was followed for exactly the default cap of 50 pages
    assert hostile.requests[ENDLESS] == 50
    # no retries of a cap: one request each for the oversized bodies
    assert hostile.requests[HUGE] == hostile.requests[STREAM] == 1
    # the endless body was abandoned: the sender saw the connection go, far from its 256 MiB
    assert hostile.stream_interrupted
    assert hostile.streamed < 32 * MIB
    assert peak < 16 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"
    assert sorted(poller_messages(caplog, logging.WARNING)) == sorted(
        [
            f"polling SIM {ENDLESS} failed: data_sessions: listing has more than 50 pages"
            " (poll.max_pages)",
            f"polling SIM {HUGE} failed: data_sessions: response of {2 * MIB + 33} bytes exceeds"
            f" the {MIB}-byte cap (poll.max_response_bytes) status=200",
            f"polling SIM {STREAM} failed: data_sessions: response exceeds the {MIB}-byte cap"
            " (poll.max_response_bytes) status=200",
        ]
    )
    # and the exporter keeps serving
    assert (await h.http.get("/-/healthy")).status == 200
    assert (await h.http.get("/metrics")).status == 200


async def test_endless_sim_listing_fails_discovery_with_a_metric(
    hostile: HostileApi, harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = config_from_mapping(
        exporter_mapping(hostile.url, [], discovery={"enabled": True}, poll={"max_pages": 7}),
        environ={},
    )
    h = await harness([], config=config)
    assert not await h.exporter.poller.refresh_sims()
    assert hostile.requests["sims"] == 7
    text = await h.scrape()
    assert value(text, "twilio_wireless_poll_errors_total", kind="too_many_pages") == 1
    assert value(text, "twilio_wireless_sims_monitored") == 0
    assert poller_messages(caplog, logging.WARNING) == [
        "SIM discovery failed: sims: listing has more than 7 pages (poll.max_pages)"
    ]
    assert not h.exporter.is_ready()
