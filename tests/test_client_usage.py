"""The client's usage-record, rate-plan and SIM-lifecycle reads, over real servers on port 0:
the query each sends, paging by ``next_page_url`` (on the configured origin only, at most
``max_pages``), rate plans as both OpenAPI descriptions give them, ``reset_status``, and the
background priority that keeps a queued usage request behind every session poll."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aiohttp import web

from tests.harness_support import eventually
from tests.hostile_support import (
    SIM_A,
    SIM_B,
    ScriptedApi,
    rate_plan,
    rate_plans_page,
    sessions_page,
    sims_page,
    start_client,
    usage_page,
    usage_record,
)
from tests.metrics_support import sample_value
from tests.simulator_support import kore_response_schema, openapi, response_schema, validate
from twilio_wireless_exporter.api.client import TwilioClient
from twilio_wireless_exporter.api.records import INT64_MAX, RatePlan, RejectReason
from twilio_wireless_exporter.api.transport import ApiError, ErrorKind
from twilio_wireless_exporter.api.usage import mb_to_bytes

START = datetime(2026, 11, 1, tzinfo=UTC)
REQUESTS = "twilio_wireless_api_requests_total"
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------
# Queries
# ------------------------------------------------------------------------------------------


async def test_sim_usage_asks_for_the_period_in_utc_seconds() -> None:
    api = ScriptedApi()
    end = datetime(2026, 11, 3, 5, 6, 7, 890, tzinfo=timezone(timedelta(hours=2)))
    async with start_client(api) as run:
        await run.client.list_sim_usage(SIM_A, START, end)
        await run.client.list_sim_usage(SIM_A, START, granularity="all", page_size=50)
        text = run.scrape()
    assert api.paths == [
        f"/v1/Sims/{SIM_A}/UsageRecords?Granularity=daily&Start=2026-11-01T00:00:00Z"
        "&End=2026-11-03T03:06:07Z&PageSize=1000",
        f"/v1/Sims/{SIM_A}/UsageRecords?Granularity=all&Start=2026-11-01T00:00:00Z&PageSize=50",
    ]
    assert sample_value(text, REQUESTS, endpoint="usage_records", code="200") == 2.0


async def test_account_usage_is_hourly_by_default() -> None:
    api = ScriptedApi()
    async with start_client(api) as run:
        await run.client.list_account_usage(START, START + timedelta(days=1))
        text = run.scrape()
    assert api.paths == [
        "/v1/UsageRecords?Granularity=hourly&Start=2026-11-01T00:00:00Z"
        "&End=2026-11-02T00:00:00Z&PageSize=1000"
    ]
    assert sample_value(text, REQUESTS, endpoint="account_usage_records", code="200") == 1.0


async def test_a_sim_sid_is_escaped_in_the_usage_url() -> None:
    api = ScriptedApi()
    async with start_client(api) as run:
        await run.client.list_sim_usage("DE/../x?y", START)
    assert api.paths[0].startswith("/v1/Sims/DE%2F..%2Fx%3Fy/UsageRecords?")


async def test_a_naive_time_or_unknown_granularity_is_refused_before_any_request() -> None:
    api = ScriptedApi()
    async with start_client(api) as run:
        with pytest.raises(ValueError, match="time zone"):
            await run.client.list_sim_usage(SIM_A, datetime(2026, 11, 1))
        with pytest.raises(ValueError, match="time zone"):
            await run.client.list_account_usage(START, datetime(2026, 11, 2))
        with pytest.raises(ValueError, match="granularity"):
            await run.client.list_sim_usage(SIM_A, START, granularity="weekly")
    assert api.paths == []


# ------------------------------------------------------------------------------------------
# Paging
# ------------------------------------------------------------------------------------------


class PagedUsage:
    """Three pages per listing, linked by absolute ``next_page_url``s; ``next_url`` replaces
    the link (another origin, a loop)."""

    def __init__(self, pages: int = 3, next_url: str | None = None) -> None:
        self.pages = pages
        self.next_url = next_url
        self.paths: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/Sims/{sid}/UsageRecords", self._usage)
        app.router.add_get("/v1/UsageRecords", self._usage)
        app.router.add_get("/v1/RatePlans", self._plans)
        return app

    def _next(self, request: web.Request, page: int) -> str | None:
        if self.next_url is not None:
            return self.next_url
        if page + 1 >= self.pages:
            return None
        return str(request.url.update_query(Page=str(page + 1)))

    async def _usage(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        page = int(request.query.get("Page", "0"))
        sim = SIM_A if "sid" in request.match_info else None
        records = [usage_record(1 + 2 * page, sim=sim, up=page, down=1)]
        body = usage_page(records, self._next(request, page))
        return web.Response(body=body, content_type="application/json")

    async def _plans(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        page = int(request.query.get("Page", "0"))
        # Pages overlap by one plan, as live pages may when plans change while listed.
        plans = [rate_plan(page, data_limit=page), rate_plan(page + 1, data_limit=10 + page)]
        body = rate_plans_page(plans, self._next(request, page))
        return web.Response(body=body, content_type="application/json")


@pytest.mark.parametrize("account", [False, True])
async def test_usage_pages_are_followed_to_the_last(account: bool) -> None:
    api = PagedUsage(pages=3)
    async with start_client(api) as run:
        if account:
            listing = await run.client.list_account_usage(START)
        else:
            listing = await run.client.list_sim_usage(SIM_A, START)
        text = run.scrape()
    assert [(u.upload, u.start) for u in listing] == [
        (0, datetime(2026, 11, 1, tzinfo=UTC).timestamp()),
        (1, datetime(2026, 11, 3, tzinfo=UTC).timestamp()),
        (2, datetime(2026, 11, 5, tzinfo=UTC).timestamp()),
    ]
    assert listing.rejected == []
    assert [p.rsplit("Page=", 1)[-1] if "Page=" in p else "" for p in api.paths] == ["", "1", "2"]
    assert all("Granularity=" in p and "Start=2026-11-01T00:00:00Z" in p for p in api.paths)
    endpoint = "account_usage_records" if account else "usage_records"
    assert sample_value(text, REQUESTS, endpoint=endpoint, code="200") == 3.0


async def _listing(client: TwilioClient, what: str) -> object:
    if what == "sim":
        return await client.list_sim_usage(SIM_A, START)
    if what == "account":
        return await client.list_account_usage(START)
    return await client.list_rate_plans()


@pytest.mark.parametrize("what", ["sim", "account", "plans"])
async def test_a_listing_beyond_max_pages_fails_as_too_many_pages(what: str) -> None:
    api = PagedUsage(pages=100)
    async with start_client(api, max_pages=4) as run:
        with pytest.raises(ApiError) as caught:
            await _listing(run.client, what)
    assert caught.value.kind is ErrorKind.TOO_MANY_PAGES
    endpoints = {"sim": "usage_records", "account": "account_usage_records", "plans": "rate_plans"}
    assert caught.value.endpoint == endpoints[what]
    assert len(api.paths) == 4


@pytest.mark.parametrize("what", ["sim", "account", "plans"])
async def test_a_next_page_on_another_origin_is_never_followed(what: str) -> None:
    api = PagedUsage(next_url="http://127.0.0.2:1/v1/UsageRecords?Page=1")
    async with start_client(api) as run:
        with pytest.raises(ApiError) as caught:
            await _listing(run.client, what)
    assert caught.value.kind is ErrorKind.BAD_NEXT_PAGE
    assert "another origin" in str(caught.value)
    assert len(api.paths) == 1


async def test_rate_plan_pages_are_followed_and_a_plan_listed_twice_counts_once() -> None:
    api = PagedUsage(pages=3)
    async with start_client(api) as run:
        plans = await run.client.list_rate_plans(page_size=2)
        text = run.scrape()
    assert api.paths[0] == "/v1/RatePlans?PageSize=2"
    assert [(p.sid[-1], p.data_limit) for p in plans] == [("0", 0), ("1", 1), ("2", 2), ("3", 12)]
    assert sample_value(text, REQUESTS, endpoint="rate_plans", code="200") == 3.0


# ------------------------------------------------------------------------------------------
# Rate plans
# ------------------------------------------------------------------------------------------


def _twilio_plans_example() -> dict[str, Any]:
    media = openapi()["paths"]["/v1/RatePlans"]["get"]["responses"]["200"]["content"]
    body: dict[str, Any] = copy.deepcopy(media["application/json"]["examples"]["readFull"]["value"])
    return body


async def test_twilios_rate_plan_example_decodes() -> None:
    body = _twilio_plans_example()
    validate(response_schema("/v1/RatePlans"), body)
    validate(kore_response_schema("/v1/RatePlans"), body)
    api = ScriptedApi(rate_plans=json.dumps(body).encode())
    async with start_client(api) as run:
        plans = await run.client.list_rate_plans()
    assert list(plans) == [
        RatePlan(
            sid="WP" + "a" * 32,
            unique_name="unique_name",
            friendly_name="friendly_name",
            data_metering="payg",
            data_enabled=True,
            national_roaming_enabled=True,
            data_limit=1000,
            national_roaming_data_limit=1000,
            international_roaming_data_limit=1000,
            international_roaming=["data", "messaging", "voice"],
            account_sid="AC" + "a" * 32,
        )
    ]
    assert plans.rejected == []
    assert mb_to_bytes(1000) == 1000 * MIB


async def test_a_plan_without_limits_has_none() -> None:
    """KORE's RatePlan makes every limit nullable; an absent one is absent too."""
    plans = [
        rate_plan(1, data_limit=None, national_roaming_data_limit=None),
        {"sid": "WP" + "b" * 32},
    ]
    body = {"rate_plans": plans, "meta": {"key": "rate_plans", "next_page_url": None}}
    validate(kore_response_schema("/v1/RatePlans"), body)
    async with start_client(ScriptedApi(rate_plans=json.dumps(body).encode())) as run:
        listing = await run.client.list_rate_plans()
    first, second = listing
    assert (first.data_limit, first.national_roaming_data_limit) == (None, None)
    assert first.international_roaming_data_limit == 100
    assert second == RatePlan(sid="WP" + "b" * 32)


BAD_PLANS: list[tuple[str, dict[str, Any]]] = [
    ("sid", {"sid": "WP123"}),
    ("sid", {"sid": "DE" + "a" * 32}),
    ("usage", {"data_limit": -1}),
    ("usage", {"data_limit": INT64_MAX // MIB + 1}),  # beyond int64 once in bytes
    ("usage", {"national_roaming_data_limit": "lots"}),
    ("usage", {"international_roaming_data_limit": 1.5}),
    ("malformed", {"data_enabled": "yes"}),
    ("malformed", {"friendly_name": "x" * 1000}),
    ("malformed", {"international_roaming": "data"}),
]


@pytest.mark.parametrize(("reason", "fields"), BAD_PLANS)
async def test_a_bad_plan_is_rejected_alone(reason: str, fields: dict[str, Any]) -> None:
    body = rate_plans_page([rate_plan(1), rate_plan(2, **fields), rate_plan(3)])
    async with start_client(ScriptedApi(rate_plans=body)) as run:
        plans = await run.client.list_rate_plans()
        for rejection in plans.rejected:
            run.metrics.record_rejected("rate_plans", rejection.reason)
        text = run.scrape()
    assert [p.unique_name for p in plans] == ["plan-1", "plan-3"]
    assert [r.reason.value for r in plans.rejected] == [reason]
    rejected = "twilio_wireless_api_records_rejected_total"
    assert sample_value(text, rejected, endpoint="rate_plans", reason=reason) == 1.0


def test_the_largest_plan_limit_fits_int64_in_bytes() -> None:
    assert mb_to_bytes(INT64_MAX // MIB) <= INT64_MAX < mb_to_bytes(INT64_MAX // MIB + 1)


def test_the_test_plans_are_valid_for_both_descriptions() -> None:
    body = json.loads(rate_plans_page([rate_plan(1), rate_plan(2, data_limit=0)]))
    validate(response_schema("/v1/RatePlans"), body)
    validate(kore_response_schema("/v1/RatePlans"), body)


# ------------------------------------------------------------------------------------------
# SIM lifecycle: reset_status
# ------------------------------------------------------------------------------------------


async def test_a_sims_reset_status_is_read() -> None:
    body = json.loads(sims_page([SIM_A, SIM_B]))
    body["sims"][0]["reset_status"] = "resetting"
    body["sims"][1]["reset_status"] = None
    for sim in body["sims"]:
        validate(response_schema("/v1/Sims/{Sid}"), sim)
        validate(kore_response_schema("/v1/Sims/{Sid}"), sim)
    api = ScriptedApi(sims_default=json.dumps(body).encode())
    async with start_client(api) as run:
        sims = await run.client.list_sims([], 100)
    assert [(s.sid, s.reset_status) for s in sims] == [(SIM_A, "resetting"), (SIM_B, None)]


async def test_a_sim_without_reset_status_has_none_and_a_bad_one_is_rejected_alone() -> None:
    body = json.loads(sims_page([SIM_A, SIM_B]))
    body["sims"][1]["reset_status"] = ["resetting"]
    api = ScriptedApi(sims_default=json.dumps(body).encode())
    async with start_client(api) as run:
        sims = await run.client.list_sims([], 100)
    assert [(s.sid, s.reset_status) for s in sims] == [(SIM_A, None)]
    assert [r.reason for r in sims.rejected] == [RejectReason.MALFORMED]


# ------------------------------------------------------------------------------------------
# Priority
# ------------------------------------------------------------------------------------------


class HeldApi:
    """Logs each request; the first DataSessions request waits for ``release``."""

    def __init__(self) -> None:
        self.arrivals: list[str] = []
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/Sims/{sid}/DataSessions", self._sessions)
        app.router.add_get("/v1/Sims/{sid}/UsageRecords", self._usage)
        app.router.add_get("/v1/UsageRecords", self._usage)
        app.router.add_get("/v1/RatePlans", self._plans)
        return app

    async def _sessions(self, request: web.Request) -> web.Response:
        self.arrivals.append(f"sessions {request.match_info['sid'][-1]}")
        if len(self.arrivals) == 1:
            await self.release.wait()
        return web.Response(body=sessions_page([]), content_type="application/json")

    async def _usage(self, request: web.Request) -> web.Response:
        sid = request.match_info.get("sid")
        self.arrivals.append(f"usage {sid[-1] if sid else 'account'}")
        return web.Response(body=usage_page([]), content_type="application/json")

    async def _plans(self, request: web.Request) -> web.Response:
        self.arrivals.append("plans")
        return web.Response(body=rate_plans_page([]), content_type="application/json")


def _waiting(client: TwilioClient) -> int:
    """Requests queued for a slot (read from the client's limit, for the test only)."""
    return len(client._limits.slots._waiters)


async def test_a_queued_session_poll_goes_before_usage_requests_queued_earlier() -> None:
    api = HeldApi()
    async with start_client(api, concurrency=1) as run:
        client = run.client
        first = asyncio.create_task(client.list_data_sessions(SIM_A, 50))
        await eventually(lambda: api.arrivals == ["sessions a"])
        # Background reads queue first, while the poll of A holds the only slot ...
        usage = asyncio.create_task(client.list_sim_usage(SIM_B, START))
        await eventually(lambda: _waiting(client) == 1)
        account = asyncio.create_task(client.list_account_usage(START))
        plans = asyncio.create_task(client.list_rate_plans())
        await eventually(lambda: _waiting(client) == 3)
        # ... then a session poll begins, later than all of them.
        poll = asyncio.create_task(client.list_data_sessions(SIM_B, 50))
        await eventually(lambda: _waiting(client) == 4)
        api.release.set()
        await asyncio.wait_for(asyncio.gather(first, usage, account, plans, poll), 10)
    # Oldest first would have sent the usage reads ahead of the poll of B.
    assert api.arrivals == ["sessions a", "sessions b", "usage b", "usage account", "plans"]
