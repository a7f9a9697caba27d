"""A scripted Wireless API for hostile-input tests, and builders of good and bad records.

:class:`ScriptedApi` answers ``/v1/Sims`` and ``/v1/Sims/{sid}/DataSessions`` with whatever body
a test put there (raw bytes, so any JSON at all), and records the paths it was asked for. The
exporter under test is the real one (:func:`start_exporter`), on a manual clock, scraped
through aiohttp's test client.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.harness_support import exporter_mapping
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import config_from_mapping
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.app import make_app

SIM_A = "DE" + "a" * 32
SIM_B = "DE" + "b" * 32
ACCOUNT = "AC" + "0" * 32
T_BASE = "2026-11-{day:02d}T{hour:02d}:00:00Z"


def stamp(day: int, hour: int = 0) -> str:
    """A timestamp in November 2026 (inside the API's window in every test run)."""
    return T_BASE.format(day=day, hour=hour)


def session(
    n: int,
    sim: str = SIM_A,
    *,
    day: int = 20,
    ended: bool = False,
    up: Any = 10,
    down: Any = 20,
    imei: str = "356938035643809",
    **fields: Any,
) -> dict[str, Any]:
    """A good DataSession record (as JSON-able data); ``fields`` override any field."""
    record: dict[str, Any] = {
        "sid": f"WN{n:032x}",
        "sim_sid": sim,
        "account_sid": ACCOUNT,
        "radio_link": "LTE",
        "operator_mcc": "262",
        "operator_mnc": "01",
        "operator_country": "DEU",
        "operator_name": "Telekom",
        "cell_id": "1234",
        "cell_location_estimate": {"lat": 52.5, "lon": 13.4},
        "packets_uploaded": up,
        "packets_downloaded": down,
        "last_updated": stamp(day, 2),
        "start": stamp(day, 1),
        "end": stamp(day, 2) if ended else None,
        "imei": imei,
    }
    record.update(fields)
    return record


def sessions_page(records: list[dict[str, Any]], next_page_url: str | None = None) -> bytes:
    return json.dumps({"data_sessions": records, "meta": {"next_page_url": next_page_url}}).encode()


def sims_page(sids: list[str], next_page_url: str | None = None, **extra: Any) -> bytes:
    sims = [{"sid": sid, "unique_name": sid[-4:], "status": "active"} for sid in sids]
    return json.dumps({"sims": sims, "meta": {"next_page_url": next_page_url}, **extra}).encode()


def deeply_nested(depth: int = 1000) -> str:
    """JSON nested ``depth`` levels deep."""
    return "[" * depth + "]" * depth


@dataclass
class ScriptedApi:
    """Bodies to answer with: per SIM for DataSessions, a queue (then a default) for /v1/Sims."""

    sessions: dict[str, bytes] = field(default_factory=dict)
    sims: deque[bytes] = field(default_factory=deque)
    sims_default: bytes = field(default_factory=lambda: sims_page([]))
    paths: list[str] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    """The HTTP status of a SIM's DataSessions answers (200 unless set)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/Sims", self._sims)
        app.router.add_get("/v1/Sims/{sid}/DataSessions", self._sessions)
        app.router.add_get("/v1/Sims/{sid}", self._sim)
        return app

    def _answer(self, body: bytes, status: int = 200) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    async def _sims(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        return self._answer(self.sims.popleft() if self.sims else self.sims_default)

    async def _sessions(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        sid = request.match_info["sid"]
        return self._answer(self.sessions.get(sid, sessions_page([])), self.status.get(sid, 200))

    async def _sim(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        sid = request.match_info["sid"]
        return self._answer(json.dumps({"sid": sid, "status": "active"}).encode())


@dataclass
class Running:
    api: ScriptedApi
    exporter: Exporter
    http: TestClient[Any, Any]
    clock: ManualClock
    url: str

    async def poll(self) -> None:
        await self.exporter.poller.poll_all()

    async def scrape(self, accept: str | None = None) -> str:
        headers = {"Accept": accept} if accept else {}
        resp = await self.http.get("/metrics", headers=headers)
        assert resp.status == 200, await resp.text()
        return await resp.text()


@asynccontextmanager
async def start_exporter(
    api: ScriptedApi, sids: list[str], **sections: Any
) -> AsyncIterator[Running]:
    """The real exporter against ``api``: retries without waiting, a manual clock."""
    server = TestServer(api.app())
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    config = config_from_mapping(exporter_mapping(url, sids, **sections), environ={})
    clock = ManualClock()

    async def no_wait(seconds: float) -> None:
        return None

    exporter = Exporter(config, clock=clock, retry_sleep=no_wait)
    await exporter.open()
    http: TestClient[Any, Any] = TestClient(TestServer(make_app(exporter.web_context())))
    await http.start_server()
    try:
        yield Running(api, exporter, http, clock, url)
    finally:
        await http.close()
        await exporter.stop()
        await server.close()
