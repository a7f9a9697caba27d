"""A scripted Wireless API for hostile-input tests, and builders of good and bad records.

:class:`ScriptedApi` answers ``/v1/Sims``, ``/v1/Sims/{sid}/DataSessions``, both UsageRecords
resources and ``/v1/RatePlans`` with whatever body a test put there (raw bytes, so any JSON at
all), and records the paths it was asked for. The
exporter under test is the real one (:func:`start_exporter`), on a manual clock, scraped
through aiohttp's test client.
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest

from tests.harness_support import exporter_mapping, serving
from twilio_wireless_exporter.api.auth import BasicAuthenticator
from twilio_wireless_exporter.api.client import ClientSettings, TwilioClient
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import config_from_mapping
from twilio_wireless_exporter.exposition.collector import ApiMetrics
from twilio_wireless_exporter.service import Exporter

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


def counts(up: Any = 0, down: Any = 0, units: Any = "bytes", **fields: Any) -> dict[str, Any]:
    """Per-network data counts with every field KORE's ``DataUsageCounts`` requires."""
    total = up + down if isinstance(up, int) and isinstance(down, int) else 0
    record = {"upload": up, "download": down, "total": total, "units": units}
    return {**record, "billed": 0, "billing_units": "USD", **fields}


def usage_record(
    day: int = 20,
    *,
    up: Any = 1000,
    down: Any = 3000,
    units: Any = "bytes",
    sim: str | None = SIM_A,
    hours: int = 24,
    **data: Any,
) -> dict[str, Any]:
    """A good usage record of ``day`` (as JSON-able data), valid for Twilio's and KORE's
    schemas: all data at home. ``data`` overrides fields of ``data``; ``sim=None`` makes it an
    account record."""
    start = stamp(day)
    end = T_BASE.format(day=day + hours // 24, hour=hours % 24)
    total = up + down if isinstance(up, int) and isinstance(down, int) else 0
    details: dict[str, Any] = {
        "upload": up,
        "download": down,
        "total": total,
        "units": units,
        "billed": 0.25,
        "billing_units": "USD",
        "home": counts(up, down, units),
        "national_roaming": counts(units=units),
        "international_roaming": [],
        **data,
    }
    record: dict[str, Any] = {
        "account_sid": ACCOUNT,
        "period": {"start": start, "end": end},
        "data": details,
        "commands": {"from_sim": 1, "to_sim": 2, "total": 3, "billed": 0, "billing_units": "USD"},
    }
    if sim is not None:
        record["sim_sid"] = sim
    return record


def usage_page(records: list[dict[str, Any]], next_page_url: str | None = None) -> bytes:
    return json.dumps({"usage_records": records, "meta": {"next_page_url": next_page_url}}).encode()


def rate_plan(n: int = 1, **fields: Any) -> dict[str, Any]:
    """A good rate plan (as JSON-able data); ``fields`` override any field."""
    plan: dict[str, Any] = {
        "sid": f"WP{n:032x}",
        "unique_name": f"plan-{n}",
        "account_sid": ACCOUNT,
        "friendly_name": f"Plan {n}",
        "data_enabled": True,
        "data_metering": "payg",
        "data_limit": 1000,
        "messaging_enabled": True,
        "voice_enabled": False,
        "national_roaming_enabled": True,
        "national_roaming_data_limit": 500,
        "international_roaming": ["data", "messaging"],
        "international_roaming_data_limit": 100,
        **fields,
    }
    return plan


def rate_plans_page(plans: list[dict[str, Any]], next_page_url: str | None = None) -> bytes:
    return json.dumps({"rate_plans": plans, "meta": {"next_page_url": next_page_url}}).encode()


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
    usage: dict[str, bytes] = field(default_factory=dict)
    """``/v1/Sims/{sid}/UsageRecords`` bodies per SIM (an empty page unless set)."""
    account_usage: bytes = field(default_factory=lambda: usage_page([]))
    rate_plans: bytes = field(default_factory=lambda: rate_plans_page([]))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/Sims", self._sims)
        app.router.add_get("/v1/Sims/{sid}/DataSessions", self._sessions)
        app.router.add_get("/v1/Sims/{sid}/UsageRecords", self._usage)
        app.router.add_get("/v1/Sims/{sid}", self._sim)
        app.router.add_get("/v1/UsageRecords", self._account_usage)
        app.router.add_get("/v1/RatePlans", self._rate_plans)
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

    async def _usage(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        return self._answer(self.usage.get(request.match_info["sid"], usage_page([])))

    async def _account_usage(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        return self._answer(self.account_usage)

    async def _rate_plans(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        return self._answer(self.rate_plans)

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


class ServesApi(Protocol):
    """A fake API: :class:`ScriptedApi`, or a test's own with a special behaviour."""

    def app(self) -> web.Application: ...


@dataclass
class ScriptedClient:
    """The real API client against a fake API, its metrics in ``registry``."""

    client: TwilioClient
    metrics: ApiMetrics
    registry: CollectorRegistry
    url: str

    def scrape(self) -> str:
        return generate_latest(self.registry).decode()


@asynccontextmanager
async def start_client(api: ServesApi, **settings: Any) -> AsyncIterator[ScriptedClient]:
    """A :class:`TwilioClient` for ``api`` served on port 0, retrying without waiting;
    ``settings`` override :class:`ClientSettings` fields."""
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)

    async def no_wait(seconds: float) -> None:
        return None

    async with TestServer(api.app(), host="127.0.0.1", port=0) as server:
        url = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as http:
            client = TwilioClient(
                http,
                BasicAuthenticator(ACCOUNT, "token"),
                ClientSettings(base_url=url, **settings),
                observer=metrics,
                sleep=no_wait,
                rng=random.Random(1),
            )
            yield ScriptedClient(client, metrics, registry, url)


@asynccontextmanager
async def start_exporter(
    api: ScriptedApi,
    sids: list[str],
    *,
    clock_start: float | None = None,
    port: int = 0,
    **sections: Any,
) -> AsyncIterator[Running]:
    """The real exporter against ``api``: retries without waiting, a manual clock (from
    ``clock_start``, unix time, if given); ``port``: the API's (a restart against the same API
    URL passes the port of the first run)."""
    server = TestServer(api.app(), port=port)
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    config = config_from_mapping(exporter_mapping(url, sids, **sections), environ={})
    clock = ManualClock() if clock_start is None else ManualClock(clock_start)
    try:
        async with serving(config, clock) as (exporter, http):
            yield Running(api, exporter, http, clock, url)
    finally:
        await server.close()
