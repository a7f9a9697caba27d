"""Shared fixtures: a real simulator on port 0 and exporters wired to it with a manual clock."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings

from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import Config, config_from_mapping
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    RunningSimulator,
    SimulatorConfig,
    start_simulator,
)

# CI runs the property tests with a fixed seed (reproducible runs); developers get fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``cli.main()`` replaces the root logger's handlers and level; put them back after a test."""
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    handlers, level, access_level = root.handlers[:], root.level, access.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.setLevel(access_level)


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until ``condition()`` holds, driven by real I/O (bounded; not a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.002)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """An empty, script-only simulated fleet on a manual clock."""
    async with start_simulator(SimulatorConfig(sims=0, seed=7), host="127.0.0.1", port=0) as s:
        yield s


def exporter_mapping(base_url: str, sids: list[str], **sections: Any) -> dict[str, Any]:
    """A config mapping pointing at ``base_url`` with fast, test-friendly limits."""
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
    return {
        "twilio": twilio,
        "poll": poll,
        "sims": [{"sid": sid} for sid in sids],
        **sections,
    }


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


@pytest.fixture
async def harness(sim: RunningSimulator) -> AsyncIterator[MakeHarness]:
    made: list[Harness] = []

    async def make(sids: list[str], config: Config | None = None, **sections: Any) -> Harness:
        cfg = config or config_from_mapping(exporter_mapping(sim.url, sids, **sections), environ={})
        clock = ManualClock()
        sleeps: list[float] = []

        async def record_sleep(seconds: float) -> None:
            sleeps.append(seconds)

        exporter = Exporter(cfg, clock=clock, retry_sleep=record_sleep)
        await exporter.open()
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(exporter.web_context())))
        await client.start_server()
        h = Harness(exporter, client, clock)
        h.sleeps = sleeps
        made.append(h)
        return h

    yield make
    for h in made:
        await h.http.close()
        await h.exporter.stop()
