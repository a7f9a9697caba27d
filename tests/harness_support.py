"""The in-process exporter harness: an exporter wired to a simulator with a manual clock,
polled by hand and scraped through aiohttp's test client, and a bounded wait on real I/O.

The fixtures that build these live in ``conftest.py``; the types and helpers live here so test
modules import them from a module, never from ``conftest.py`` or from each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import Config
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_simulator import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until ``condition()`` holds, driven by real I/O (bounded; not a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.002)


def exporter_mapping(base_url: str, sids: list[str], **sections: Any) -> dict[str, Any]:
    """A config mapping pointing at ``base_url`` with fast, test-friendly limits.

    Usage reads are off unless a test asks for them (``usage={...}``): the session tests count
    requests and errors that usage reads would add to."""
    poll = {
        "interval": "60s",
        "page_size": 100,
        "concurrency": 4,
        "requests_per_second": 10_000,
        "max_retries": 3,
        "backoff_initial": "1s",
        "backoff_max": "8s",
    }
    poll.update(sections.pop("poll", {}))
    twilio = {
        "base_url": base_url,
        "account_sid": DEMO_ACCOUNT_SID,
        "auth_token": DEMO_AUTH_TOKEN,
        "timeout": "2s",
    }
    twilio.update(sections.pop("twilio", {}))
    sections.setdefault("usage", {"enabled": False})
    return {
        "twilio": twilio,
        "poll": poll,
        "sims": [{"sid": sid} for sid in sids],
        **sections,
    }


@asynccontextmanager
async def serving(
    config: Config,
    clock: ManualClock,
    retry_sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[Exporter, TestClient[Any, Any]]]:
    """An opened exporter on ``clock`` whose retries never wait (``retry_sleep``, by default
    returning at once), and a test client of its web app; stopped (its state saved) and closed
    on the way out."""

    async def no_wait(_: float) -> None:
        return None

    exporter = Exporter(config, clock=clock, retry_sleep=retry_sleep or no_wait)
    await exporter.open()
    http: TestClient[Any, Any] = TestClient(TestServer(make_app(exporter.web_context())))
    await http.start_server()
    try:
        yield exporter, http
    finally:
        await http.close()
        await exporter.stop()


class Harness:
    """An exporter against the simulator, polled by hand; sleeps are recorded, never waited."""

    def __init__(self, exporter: Exporter, client: TestClient[Any, Any], clock: ManualClock):
        self.exporter = exporter
        self.http = client
        self.clock = clock
        self.sleeps: list[float] = []

    async def poll(self) -> None:
        await self.exporter.poller.poll_all()

    async def scrape(self) -> str:
        resp = await self.http.get("/metrics")
        assert resp.status == 200
        return await resp.text()


MakeHarness = Callable[..., Awaitable[Harness]]
