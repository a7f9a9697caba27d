"""The account's load from the API's own answers: Twilio-Concurrent-Requests and
Twilio-Request-Duration read from every answer (bad values ignored and counted), exported as
gauges, and the adaptive limit that stops growing near the concurrency at which 429s began."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from tests.harness_support import exporter_mapping
from tests.metrics_support import sample_value
from tests.simulator_support import get_json, running, until
from twilio_wireless_exporter.api.adaptive import HEADROOM, AdaptiveLimit
from twilio_wireless_exporter.api.auth import BasicAuthenticator
from twilio_wireless_exporter.api.client import ClientSettings, TwilioClient
from twilio_wireless_exporter.api.transport import (
    CONCURRENT_REQUESTS_HEADER,
    REQUEST_DURATION_HEADER,
    ApiError,
    parse_concurrent_requests,
    parse_request_duration,
)
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import config_from_mapping
from twilio_wireless_exporter.exposition.collector import ApiMetrics
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    FaultConfig,
    FaultResponse,
    SimulatorConfig,
    start_simulator,
)

SID = "DE" + "a" * 32
CONCURRENT = "twilio_wireless_api_concurrent_requests"
CONCURRENT_MAX = "twilio_wireless_api_concurrent_requests_max"
DURATION = "twilio_wireless_api_reported_request_duration_seconds"
REJECTED = "twilio_wireless_api_headers_rejected_total"


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0),
        ("7", 7),
        (" 12 ", 12),
        ("1000000", 1_000_000),
        ("1000001", None),  # no account runs a million requests at once
        ("99999999999999999999", None),
        ("-1", None),
        ("+3", None),
        ("3.0", None),
        ("1e3", None),
        ("", None),
        ("٣", None),  # an Arabic-Indic three: a digit to str.isdigit, not to HTTP
        ("3, 4", None),
    ],
)
def test_concurrent_requests_values(raw: str, expected: int | None) -> None:
    assert parse_concurrent_requests(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0.0),
        ("0.125", 0.125),
        (" 2 ", 2.0),
        (".5", 0.5),
        ("3600", 3600.0),
        ("3600.5", None),
        ("-0.1", None),
        ("nan", None),
        ("inf", None),
        ("1e-3", None),
        ("1.2.3", None),
        (".", None),
        ("", None),
        ("0.1s", None),
    ],
)
def test_request_duration_values(raw: str, expected: float | None) -> None:
    assert parse_request_duration(raw) == expected


@given(st.text(max_size=40))
def test_a_header_value_never_raises_and_is_plausible_when_accepted(raw: str) -> None:
    count = parse_concurrent_requests(raw)
    assert count is None or 0 <= count <= 1_000_000
    seconds = parse_request_duration(raw)
    assert seconds is None or 0.0 <= seconds <= 3600.0


# ------------------------------------------------------------------------------ the gauges


class HeaderApi:
    """``GET /v1/Sims/{sid}`` answering with the next headers of ``script``."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script

    async def sim(self, request: web.Request) -> web.Response:
        status, headers = self.script.pop(0)
        body: dict[str, object] = {"sid": request.match_info["sid"], "status": "active"}
        if status != 200:
            body = {"code": 20429, "message": "Too Many Requests", "status": status}
        return web.Response(
            body=json.dumps(body), status=status, headers=headers, content_type="application/json"
        )


@asynccontextmanager
async def client_of(api: HeaderApi, metrics: ApiMetrics) -> AsyncIterator[TwilioClient]:
    app = web.Application()
    app.router.add_get("/v1/Sims/{sid}", api.sim)

    async def no_sleep(seconds: float) -> None:
        return None

    async with TestServer(app, host="127.0.0.1", port=0) as server, aiohttp.ClientSession() as http:
        settings = ClientSettings(
            base_url=str(server.make_url("")).rstrip("/"), concurrency=4, max_retries=1
        )
        yield TwilioClient(
            http,
            BasicAuthenticator(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN),
            settings,
            observer=metrics,
            load=metrics,
            sleep=no_sleep,
            rng=random.Random(1),
        )


def load_of(registry: CollectorRegistry) -> tuple[float | None, ...]:
    text = generate_latest(registry).decode()
    return (
        sample_value(text, CONCURRENT),
        sample_value(text, CONCURRENT_MAX),
        sample_value(text, DURATION),
        sample_value(text, REJECTED, header=CONCURRENT_REQUESTS_HEADER),
        sample_value(text, REJECTED, header=REQUEST_DURATION_HEADER),
    )


async def test_the_load_headers_become_gauges_and_bad_values_are_counted() -> None:
    c, d = CONCURRENT_REQUESTS_HEADER, REQUEST_DURATION_HEADER
    api = HeaderApi(
        [
            (200, {}),  # an API without the headers (KORE): no gauge yet
            (200, {c: "3", d: "0.125"}),
            (200, {c: "7", d: "0.5"}),
            (200, {c: "2", d: "soon"}),  # the duration is ignored and counted, not the count
            (200, {c: "-1", d: "0.25"}),
            (200, {c: "lots", d: "inf"}),  # both ignored: the latest values stay
            (429, {c: "9"}),  # a 429 reports too; then its retry
            (200, {c: "5"}),
        ]
    )
    registry = CollectorRegistry(auto_describe=False)
    metrics = ApiMetrics(registry)
    expected = [
        (None, None, None, None, None),
        (3.0, 3.0, 0.125, None, None),
        (7.0, 7.0, 0.5, None, None),
        (2.0, 7.0, 0.5, None, 1.0),
        (2.0, 7.0, 0.25, 1.0, 1.0),
        (2.0, 7.0, 0.25, 2.0, 2.0),
        (5.0, 9.0, 0.25, 2.0, 2.0),
    ]
    async with client_of(api, metrics) as client:
        for want in expected:
            sim = await client.fetch_sim(SID)  # a bad header never fails the request
            assert sim.sid == SID
            assert load_of(registry) == want
    assert api.script == []


async def test_a_bad_header_on_a_failed_answer_is_counted_and_the_error_kept() -> None:
    api = HeaderApi([(429, {CONCURRENT_REQUESTS_HEADER: "x"})] * 2)
    registry = CollectorRegistry(auto_describe=False)
    metrics = ApiMetrics(registry)
    async with client_of(api, metrics) as client:
        with pytest.raises(ApiError) as info:
            await client.fetch_sim(SID)
    assert info.value.status == 429
    assert load_of(registry) == (None, None, None, 2.0, None)


# ------------------------------------------------------------------------------ the limit


async def answer(limit: AdaptiveLimit, status: int | None, concurrency: int | None) -> None:
    async with limit.slot() as slot:
        slot.status = status
        slot.concurrency = concurrency


async def test_the_ceiling_is_where_the_rounds_429s_began() -> None:
    limit = AdaptiveLimit(32)
    held = [limit.slot() for _ in range(4)]
    slots = [await cm.__aenter__() for cm in held]
    for slot, reported in zip(slots, [40, 35, 38, None], strict=True):
        slot.status, slot.concurrency = 429, reported
    for cm, slot in zip(held, slots, strict=True):
        await cm.__aexit__(None, None, None)
        if slot.concurrency == 40:
            assert (limit.limit, limit.ceiling) == (16, 40)  # the cut
    assert (limit.limit, limit.ceiling, limit.decreases) == (16, 35, 1)  # echoes: lowest
    await answer(limit, 429, 50)  # a new round: its own level, even a higher one
    assert (limit.limit, limit.ceiling, limit.decreases) == (8, 50, 2)
    await answer(limit, 429, None)  # a round without the header keeps what is known
    assert (limit.limit, limit.ceiling, limit.decreases) == (4, 50, 3)


async def test_the_limit_stops_growing_within_the_headroom_of_the_ceiling() -> None:
    limit = AdaptiveLimit(64)
    await answer(limit, 429, 40)
    assert (limit.limit, limit.ceiling, limit._stop_at) == (32, 40, 40 - int(40 * HEADROOM))
    # The 429 reported 40: no growth until two windows of 32 answers (the 429 counts in the
    # first) have passed without it.
    for _ in range(62):
        await answer(limit, 200, 35)
        assert limit._target == 32.0
    await answer(limit, 200, 35)  # below the stop (36) in both windows: growth
    assert limit._target == 32.0 + 1 / 32
    grown = limit._target
    await answer(limit, 200, 36)  # at the stop: none, and none while it is recent
    await answer(limit, 200, 35)
    assert limit._target == grown
    small = AdaptiveLimit(8)
    await answer(small, 429, 5)
    assert (small.limit, small._stop_at) == (4, 4)  # a small ceiling: still one below it


async def test_without_the_header_the_peak_fades_and_aimd_grows() -> None:
    limit = AdaptiveLimit(8)
    await answer(limit, 429, 6)
    assert (limit.limit, limit._stop_at) == (4, 5)
    for _ in range(6):  # two windows of 4 answers, the 429's included: its report fades
        await answer(limit, 200, None)
        assert limit._target == 4.0
    await answer(limit, 200, None)
    assert limit._target == 4.25


@settings(max_examples=200, deadline=None)
@given(
    maximum=st.integers(1, 64),
    answers=st.lists(
        st.tuples(
            st.sampled_from([200, 200, 404, 429, 503, None]),
            st.none() | st.integers(0, 100),
        ),
        max_size=200,
    ),
)
def test_the_limit_never_grows_from_an_answer_near_the_ceiling(
    maximum: int, answers: list[tuple[int | None, int | None]]
) -> None:
    async def scenario() -> None:
        limit = AdaptiveLimit(maximum)
        for status, reported in answers:
            before, ceiling = limit._target, limit.ceiling
            await answer(limit, status, reported)
            assert 1 <= limit.limit <= maximum
            if ceiling is None or reported is None or status == 429:
                continue
            if reported >= ceiling - max(1, int(ceiling * HEADROOM)):
                assert limit._target == before

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ end to end


async def throttled_answers(load_headers: bool) -> tuple[int, int, int]:
    """429s of the first cycle, 429s of the four cycles after it, and the limit at the end:
    150 SIMs polled with 32 slots against a simulator that accepts 8 requests at once."""
    config = SimulatorConfig(
        sims=0,
        seed=3,
        max_concurrent=8,
        concurrency_retry_after=0,
        load_headers=load_headers,
        faults=FaultConfig(latency=(0.002, 0.002)),
    )
    async with start_simulator(config) as sim:
        sids = [sim.fleet.add_sim() for _ in range(150)]
        mapping = exporter_mapping(sim.url, sids, poll={"concurrency": 32, "max_retries": 10})

        async def no_wait(seconds: float) -> None:
            return None

        exporter = Exporter(
            config_from_mapping(mapping, environ={}), clock=ManualClock(), retry_sleep=no_wait
        )
        await exporter.open()
        try:
            await exporter.poller.poll_all()
            first = sim.stats.count("data_sessions", 429)
            for _ in range(4):
                await exporter.poller.poll_all()
            assert all(record.up for record in exporter.state.sims.values())
            later = sim.stats.count("data_sessions", 429) - first
            assert sim.stats.count("data_sessions", 200) == 5 * 150
            return first, later, exporter.client._limits.slots.limit
        finally:
            await exporter.stop()


async def test_the_signal_avoids_429s_against_a_concurrency_cap() -> None:
    """Both learn the cap in the first cycle (32 slots against 8). After it, without the
    header the limit grows back into the cap after every cut (AIMD's saw tooth); with it, it
    settles below the level at which 429s began."""
    first_with, later_with, settled = await throttled_answers(load_headers=True)
    first_without, later_without, _ = await throttled_answers(load_headers=False)
    assert first_with > 0
    assert first_without > 0
    assert later_without >= 8, later_without
    assert later_with * 4 <= later_without, (later_with, later_without)
    assert settled <= 8


async def test_the_simulator_reports_what_its_cap_counts() -> None:
    config = SimulatorConfig(sims=1, max_concurrent=2)
    async with running(config) as (sim, http):
        url = f"{sim.url}/v1/Sims"
        status, _, resp = await get_json(http, url)
        assert status == 200
        assert resp.headers[CONCURRENT_REQUESTS_HEADER] == "1"
        assert parse_request_duration(resp.headers[REQUEST_DURATION_HEADER]) is not None
        sim.faults.script(None, [FaultResponse(delay=60.0), FaultResponse(delay=60.0)])
        held = [asyncio.create_task(get_json(http, url)) for _ in range(2)]
        await until(lambda: sim.stats.in_flight == 2)
        status, _, resp = await get_json(http, url)
        assert (status, resp.headers[CONCURRENT_REQUESTS_HEADER]) == (429, "3")
        sim.release_delayed()
        reported = sorted([(await t)[2].headers[CONCURRENT_REQUESTS_HEADER] for t in held])
        assert reported == ["1", "2"]  # in the order they arrived
        status, _, resp = await get_json(http, f"{sim.url}/health")
        assert CONCURRENT_REQUESTS_HEADER not in resp.headers  # API answers only
    async with running(SimulatorConfig(sims=1, load_headers=False)) as (sim, http):
        _, _, resp = await get_json(http, f"{sim.url}/v1/Sims")
        assert CONCURRENT_REQUESTS_HEADER not in resp.headers
        assert REQUEST_DURATION_HEADER not in resp.headers
