"""Hostile answers to discovery: an answer that cannot be used is an ApiError of a documented
kind, logged and retried, and discovery keeps running; one odd listing drops no SIM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.harness_support import eventually
from tests.hostile_support import (
    SIM_A,
    SIM_B,
    Running,
    ScriptedApi,
    deeply_nested,
    session,
    sessions_page,
    sims_page,
    start_exporter,
)
from tests.metrics_support import find_value, sample_value

DISCOVERY = {"enabled": True, "status": ["active"], "refresh_interval": "10m"}
ERRORS = "twilio_wireless_poll_errors_total"


@asynccontextmanager
async def discovering(api: ScriptedApi) -> AsyncIterator[Running]:
    async with start_exporter(api, [], sims=[], discovery=DISCOVERY) as run:
        task = asyncio.create_task(run.exporter.poller.run())
        try:
            yield run
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def errors(run: Running, kind: str) -> float | None:
    """Failed reads of this kind, of any endpoint."""
    return find_value(await run.scrape(), ERRORS, kind=kind)


def bad_bodies() -> dict[str, tuple[bytes, str, int]]:
    """Answers that are no usable /v1/Sims page: (body, error kind, how many to send)."""
    deep = f'{{"sims": [], "meta": {{}}, "unknown": {deeply_nested()}}}'.encode()
    return {
        # a decode error is retried by the transport (3 retries in the test config)
        "nested 1,000 levels deep": (deep, "decode", 4),
        "next_page_url not a URL": (
            sims_page([SIM_A], "http://[::1/v1/Sims?Page=1"),
            "bad_next_page",
            1,
        ),
    }


@pytest.mark.parametrize("case", list(bad_bodies()))
async def test_an_unusable_discovery_answer_is_retried_and_discovery_keeps_running(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    body, kind, count = bad_bodies()[case]
    api = ScriptedApi(sims_default=sims_page([SIM_A]))
    api.sims.extend([body] * count)
    async with discovering(api) as run:
        await eventually(lambda: not api.sims)
        await eventually(
            lambda: any("SIM discovery failed" in r.getMessage() for r in caplog.records)
        )
        assert await errors(run, kind) == 1.0
        assert not run.exporter.poller.ready
        assert not [r for r in caplog.records if r.exc_info], "no traceback"
        await eventually(lambda: run.clock.sleepers > 0)
        await run.clock.advance(60)  # a failed discovery is retried within a minute
        await eventually(lambda: run.exporter.poller.ready)
        assert find_value(await run.scrape(), "twilio_wireless_sim_up", SIM_A) == 1.0
        assert find_value(await run.scrape(), ERRORS, kind="internal") is None


async def test_a_data_sessions_answer_nested_too_deeply_is_a_decode_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    api = ScriptedApi()
    async with start_exporter(api, [SIM_A, SIM_B]) as run:
        api.sessions[SIM_A] = (
            f'{{"data_sessions": [], "meta": {{}}, "x": {deeply_nested()}}}'.encode()
        )
        api.sessions[SIM_B] = sessions_page([session(1, SIM_B)])
        await run.poll()
        text = await run.scrape()
        assert sample_value(text, ERRORS, endpoint="data_sessions", kind="decode") == 1.0
        assert find_value(text, ERRORS, kind="internal") is None
        assert find_value(text, "twilio_wireless_sim_up", SIM_A) == 0.0
        assert find_value(text, "twilio_wireless_sim_up", SIM_B) == 1.0
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


async def test_a_sim_record_that_is_no_sim_is_rejected_alone() -> None:
    api = ScriptedApi(sims_default=sims_page([SIM_A, "DE/../../etc", SIM_B]))
    async with discovering(api) as run:
        await eventually(lambda: run.exporter.poller.ready)
        text = await run.scrape()
        assert set(run.exporter.state.sims) == {SIM_A, SIM_B}
        assert (
            sample_value(
                text, "twilio_wireless_api_records_rejected_total", endpoint="sims", reason="sid"
            )
            == 1.0
        )


async def test_one_empty_discovery_drops_no_sim() -> None:
    """A 200 with an empty list once: every SIM stays, and its counters go on (no new
    baseline); a SIM goes only once missing from three discoveries in a row."""
    api = ScriptedApi(sims_default=sims_page([SIM_A, SIM_B]))
    api.sessions[SIM_A] = sessions_page([session(1)])
    async with start_exporter(api, [], sims=[], discovery=DISCOVERY) as run:
        poller, state = run.exporter.poller, run.exporter.state

        async def discover(body: bytes) -> None:
            api.sims.append(body)
            assert await poller.refresh_sims()

        await discover(sims_page([SIM_A, SIM_B]))
        await run.poll()
        await discover(sims_page([]))
        assert set(state.sims) == {SIM_A, SIM_B}
        api.sessions[SIM_A] = sessions_page([session(1), session(2, up=3, down=4)])
        await run.poll()
        text = await run.scrape()
        assert find_value(text, "twilio_wireless_sim_data_sessions_started_total", SIM_A) == 1.0
        assert find_value(text, "twilio_wireless_sim_packets_uploaded_total", SIM_A) == 3.0
        # SIM_B really leaves: missing from 3 discoveries in a row (the empty one counts)
        await discover(sims_page([SIM_A]))
        assert SIM_B in state.sims
        await discover(sims_page([SIM_A]))
        assert set(state.sims) == {SIM_A}
        # and a SIM that is listed again starts its count of absences anew
        await discover(sims_page([]))
        await discover(sims_page([SIM_A]))
        await discover(sims_page([]))
        assert set(state.sims) == {SIM_A}


async def test_an_error_answer_nested_too_deeply_is_an_http_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 503 whose body nests 1,000 levels: an ``http`` error (retried), never ``internal``."""
    caplog.set_level(logging.DEBUG)
    body = f'{{"message": "busy", "x": {deeply_nested()}}}'.encode()
    api = ScriptedApi()
    api.status[SIM_A] = 503
    api.sessions[SIM_A] = body
    async with start_exporter(api, [SIM_A]) as run:
        await run.poll()
        text = await run.scrape()
        assert sample_value(text, ERRORS, endpoint="data_sessions", kind="http") == 1.0
        assert find_value(text, ERRORS, kind="internal") is None
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
