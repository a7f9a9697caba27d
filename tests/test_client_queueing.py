"""Queueing for a request slot: a listing that began earlier goes first, page after page.

Regression (found by the soak): requests queued first come, first served, so every next page and
every retry of a listing joined the back of the fleet's queue: a SIM with ten pages waited out the
whole queue ten times or more.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness_support import eventually
from twilio_wireless_exporter.api.auth import BasicAuthenticator
from twilio_wireless_exporter.api.client import ClientSettings, TwilioClient
from twilio_wireless_simulator import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN

LONG = "DE" + "a" * 32  # three pages
SHORT = ["DE" + c * 32 for c in "bcde"]  # one page each


class PagedApi:
    """Every request is logged; ``LONG``'s first page waits for ``release``, and its second
    page fails once with 503."""

    def __init__(self) -> None:
        self.arrivals: list[str] = []
        self.release = asyncio.Event()
        self._failed_once = False

    async def data_sessions(self, request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        page = int(request.query.get("Page", "0"))
        if sid == LONG and page == 1 and not self._failed_once:
            self._failed_once = True
            self.arrivals.append(f"{sid[-1]}{page} 503")
            return web.json_response({"code": 20503, "message": "busy"}, status=503)
        self.arrivals.append(f"{sid[-1]}{page}")
        if sid == LONG and page == 0:
            await self.release.wait()
        last = 2 if sid == LONG else 0
        nxt = None
        if page < last:
            nxt = str(request.url.with_query({"PageSize": "1", "Page": str(page + 1)}))
        return web.json_response({"data_sessions": [], "meta": {"next_page_url": nxt}})


async def test_next_pages_and_retries_of_a_listing_go_before_later_listings() -> None:
    api = PagedApi()
    app = web.Application()
    app.router.add_get("/v1/Sims/{sid}/DataSessions", api.data_sessions)
    sleeps: list[float] = []

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with TestServer(app, host="127.0.0.1", port=0) as server, aiohttp.ClientSession() as http:
        settings = ClientSettings(
            base_url=str(server.make_url("")).rstrip("/"),
            concurrency=1,
            requests_per_second=1000.0,
            max_retries=2,
        )
        client = TwilioClient(
            http,
            BasicAuthenticator(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN),
            settings,
            sleep=no_sleep,
            rng=random.Random(1),
        )
        long_listing = asyncio.create_task(client.list_data_sessions(LONG, 1))
        await eventually(lambda: api.arrivals == ["a0"])
        # Four listings begin while the long one holds the only slot: they queue.
        short_listings = [asyncio.create_task(client.list_data_sessions(s, 1)) for s in SHORT]
        await asyncio.sleep(0)
        api.release.set()
        await asyncio.wait_for(asyncio.gather(long_listing, *short_listings), 10)

    # The slot freed by a0 goes to b (a's next request does not exist yet), but every later
    # request of a (its next pages and its retry) goes ahead of the listings that began after it.
    # First come, first served sent a0 b0 c0 d0 e0 a1 (503) a1 a2: a waited behind everybody.
    assert api.arrivals == ["a0", "b0", "a1 503", "c0", "a1", "d0", "a2", "e0"]
    assert len(sleeps) == 1
