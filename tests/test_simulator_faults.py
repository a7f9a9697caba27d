"""Fault injection: scripted and random faults, concurrency cap, delays, broken bodies."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.simulator_support import (
    TWILIO_ERROR_SCHEMA,
    basic,
    get_json,
    list_all,
    running,
    until,
    validate,
)
from twilio_wireless_simulator import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    FaultConfig,
    FaultResponse,
    RunningSimulator,
    SimulatorConfig,
)


def _busiest(sim: RunningSimulator) -> str:
    return max(sim.fleet.sim_sids(), key=lambda sid: len(sim.fleet.listing(sid)))


async def _raw(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, aiohttp.ClientResponse]:
    async with http.get(url, headers=basic()) as resp:
        return resp.status, await resp.read(), resp


def _shape_ok(body: Any, key: str) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get(key), list)
        and isinstance(body.get("meta"), dict)
        and body["meta"].get("key") == key
    )


# ------------------------------------------------------------------------------------------
# Scripted faults
# ------------------------------------------------------------------------------------------


async def test_scripted_429_has_retry_after_and_code_20429() -> None:
    async with running(SimulatorConfig(sims=3)) as (sim, http):
        sid = sim.fleet.sim_sids()[0]
        url = f"{sim.url}/v1/Sims/{sid}/DataSessions"
        sim.faults.script("data_sessions", [FaultResponse(status=429, retry_after=2)])
        status, body, resp = await get_json(http, url)
        assert status == 429
        assert resp.headers["Retry-After"] == "2"
        validate(TWILIO_ERROR_SCHEMA, body)
        assert body == {
            "code": 20429,
            "message": "Too Many Requests",
            "more_info": "https://www.twilio.com/docs/errors/20429",
            "status": 429,
        }
        status, _, _ = await get_json(http, url)
        assert status == 200
        assert sim.stats.count("data_sessions", 429) == 1
        assert sim.stats.count("data_sessions", 200) == 1


async def test_script_is_consumed_in_order_by_matching_requests() -> None:
    async with running(SimulatorConfig(sims=3)) as (sim, http):
        sid = sim.fleet.sim_sids()[0]
        ds = f"{sim.url}/v1/Sims/{sid}/DataSessions"
        one = f"{sim.url}/v1/Sims/{sid}"
        sims = f"{sim.url}/v1/Sims"
        sim.faults.script("data_sessions", [FaultResponse(status=500), FaultResponse(status=503)])
        sim.faults.script(None, [FaultResponse(status=502)])
        sim.faults.script("sim", [FaultResponse(status=504)])
        assert sim.faults.pending() == 4
        assert sim.faults.pending("data_sessions") == 2
        seen = []
        for url in (sims, one, ds, ds, ds, one, sims):
            status, body, _ = await get_json(http, url)
            if status != 200:
                validate(TWILIO_ERROR_SCHEMA, body)
                assert body["status"] == status
            seen.append(status)
        assert seen == [502, 504, 500, 503, 200, 200, 200]
        assert sim.faults.pending() == 0
        assert {(k, s) for (k, s) in sim.stats.requests} >= {("sims", 502), ("sim", 504)}


async def test_scripted_custom_body_and_unusual_status() -> None:
    async with running(SimulatorConfig(sims=1)) as (sim, http):
        url = f"{sim.url}/v1/Sims"
        sim.faults.script(
            "sims",
            [
                FaultResponse(
                    status=502, body=b"<html>bad gateway</html>", content_type="text/html"
                ),
                FaultResponse(status=418),
            ],
        )
        status, raw, resp = await _raw(http, url)
        assert status == 502
        assert raw == b"<html>bad gateway</html>"
        assert resp.content_type == "text/html"
        status, body, _ = await get_json(http, url)
        assert status == 418
        assert body["code"] == 20418


async def test_truncated_body_is_invalid_json() -> None:
    async with running(SimulatorConfig(sims=5, seed=2)) as (sim, http):
        url = f"{sim.url}/v1/Sims/{_busiest(sim)}/DataSessions"
        sim.faults.script("data_sessions", [FaultResponse(truncated=True)])
        status, cut, resp = await _raw(http, url)
        assert status == 200
        assert resp.content_type == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(cut)
        status, whole, _ = await _raw(http, url)
        assert status == 200
        json.loads(whole)
        assert cut == whole[: len(whole) // 2]


async def test_malformed_bodies_are_valid_json_of_the_wrong_shape() -> None:
    faults = FaultConfig(seed=3, rate_malformed=1.0)
    async with running(SimulatorConfig(sims=3, faults=faults)) as (sim, http):
        sid = sim.fleet.sim_sids()[0]
        kinds: Counter[str] = Counter()
        for _ in range(16):
            for url, key in (
                (f"{sim.url}/v1/Sims/{sid}/DataSessions", "data_sessions"),
                (f"{sim.url}/v1/Sims", "sims"),
            ):
                status, raw, _ = await _raw(http, url)
                assert status == 200
                body = json.loads(raw)
                assert not _shape_ok(body, key), body
                kinds[
                    type(body).__name__
                    + ("-no-list" if isinstance(body, dict) and key not in body else "")
                ] += 1
            status, raw, _ = await _raw(http, f"{sim.url}/v1/Sims/{sid}")
            one = json.loads(raw)
            assert not (isinstance(one, dict) and isinstance(one.get("sid"), str))
        assert len(kinds) >= 3


# ------------------------------------------------------------------------------------------
# Random faults
# ------------------------------------------------------------------------------------------


async def test_random_500s_at_the_configured_rate_never_on_health() -> None:
    faults = FaultConfig(seed=1, rate_500=0.3)
    async with running(SimulatorConfig(sims=2, faults=faults)) as (sim, http):
        sid = sim.fleet.sim_sids()[0]
        statuses: Counter[int] = Counter()
        for _ in range(200):
            status, body, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}/DataSessions")
            statuses[status] += 1
            if status == 500:
                validate(TWILIO_ERROR_SCHEMA, body)
                assert body["code"] == 20500
        assert set(statuses) == {200, 500}
        assert 35 <= statuses[500] <= 85, statuses
        sim.faults.rate_500 = 1.0
        for _ in range(20):
            async with http.get(f"{sim.url}/health") as resp:
                assert resp.status == 200
        status, _, _ = await get_json(http, f"{sim.url}/v1/Sims")
        assert status == 500


async def test_random_faults_are_reproducible_with_a_seed() -> None:
    async def run() -> list[int]:
        faults = FaultConfig(seed=42, rate_429=0.2, rate_500=0.1, rate_503=0.1)
        async with running(SimulatorConfig(sims=1, faults=faults)) as (sim, http):
            return [(await get_json(http, f"{sim.url}/v1/Sims"))[0] for _ in range(60)]

    first, second = await run(), await run()
    assert first == second
    assert {200, 429, 500, 503} <= set(first)


@pytest.mark.parametrize(("retry_after", "header"), [(2.0, "2"), (0.25, "0.25")])
async def test_random_429s_carry_retry_after(retry_after: float, header: str) -> None:
    faults = FaultConfig(rate_429=1.0, retry_after=retry_after)
    async with running(SimulatorConfig(sims=1, faults=faults)) as (sim, http):
        status, body, resp = await get_json(http, f"{sim.url}/v1/Sims")
        assert status == 429
        assert body["code"] == 20429
        assert resp.headers["Retry-After"] == header


async def test_overlap_repeats_and_reorders_but_covers_everything() -> None:
    faults = FaultConfig(seed=5, rate_overlap=1.0)
    async with running(SimulatorConfig(sims=20, seed=4, retention=86400.0, faults=faults)) as (
        sim,
        http,
    ):
        sid = _busiest(sim)
        expected = sim.fleet.listing(sid)
        assert len(expected) > 20
        items, _ = await list_all(
            http, f"{sim.url}/v1/Sims/{sid}/DataSessions?PageSize=5", "data_sessions"
        )
        sids = [i["sid"] for i in items]
        assert set(sids) == {s.sid for s in expected}
        assert len(sids) > len(set(sids)), "no page repeated anything"
        assert sids != [s.sid for s in expected]
        sim.faults.rate_overlap = 0.0
        clean, _ = await list_all(
            http, f"{sim.url}/v1/Sims/{sid}/DataSessions?PageSize=5", "data_sessions"
        )
        assert [i["sid"] for i in clean] == [s.sid for s in expected]


# ------------------------------------------------------------------------------------------
# Delays, timeouts, concurrency
# ------------------------------------------------------------------------------------------


async def test_timeout_fault_holds_the_response_until_the_client_gives_up() -> None:
    async with running(SimulatorConfig(sims=1)) as (sim, http):
        sim.faults.script("sims", [FaultResponse(delay=30.0)])
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            async with http.get(
                f"{sim.url}/v1/Sims", headers=basic(), timeout=aiohttp.ClientTimeout(total=0.1)
            ) as resp:
                await resp.read()
        assert time.monotonic() - started < 5
        await until(lambda: sim.stats.count("sims", 499) == 1)
        assert sim.stats.in_flight == 0
        status, _, _ = await get_json(http, f"{sim.url}/v1/Sims")
        assert status == 200


async def test_delayed_responses_are_released_on_demand() -> None:
    faults = FaultConfig(rate_timeout=1.0, timeout_delay=30.0)
    async with running(SimulatorConfig(sims=1, faults=faults)) as (sim, http):
        task = asyncio.create_task(get_json(http, f"{sim.url}/v1/Sims"))
        await until(lambda: sim.stats.in_flight == 1)
        assert not task.done()
        sim.release_delayed()
        status, _, _ = await task
        assert status == 200


async def test_shutdown_does_not_wait_for_delayed_requests() -> None:
    faults = FaultConfig(rate_timeout=1.0, timeout_delay=600.0)
    sim_cm = running(SimulatorConfig(sims=1, faults=faults))
    sim, http = await sim_cm.__aenter__()
    task = asyncio.create_task(get_json(http, f"{sim.url}/v1/Sims"))
    await until(lambda: sim.stats.in_flight == 1)
    started = time.monotonic()
    await sim.close()
    assert time.monotonic() - started < 3
    # Closing wakes the held request: it is answered within the shutdown grace, not cut off
    # and not after ten minutes.
    status, _, _ = await asyncio.wait_for(task, 3)
    assert status == 200
    await sim_cm.__aexit__(None, None, None)


async def test_latency_holds_every_api_request() -> None:
    faults = FaultConfig(latency=(60.0, 60.0))
    async with running(SimulatorConfig(sims=1, faults=faults)) as (sim, http):
        async with http.get(f"{sim.url}/health") as resp:  # never delayed
            assert resp.status == 200
        tasks = [asyncio.create_task(get_json(http, f"{sim.url}/v1/Sims")) for _ in range(3)]
        await until(lambda: sim.stats.in_flight == 3)
        assert not any(t.done() for t in tasks)
        sim.release_delayed()
        assert [(await t)[0] for t in tasks] == [200, 200, 200]
        assert sim.stats.max_in_flight == 3
    lo_hi = FaultConfig(latency=(0.01, 0.02))
    draws = [lo_hi.extra_latency("sims") for _ in range(100)]
    assert all(0.01 <= d <= 0.02 for d in draws)
    assert lo_hi.extra_latency("health") == 0.0


async def test_max_concurrent_rejects_requests_beyond_the_cap() -> None:
    config = SimulatorConfig(sims=1, max_concurrent=2, concurrency_retry_after=3)
    async with running(config) as (sim, http):
        url = f"{sim.url}/v1/Sims"
        sim.faults.script(None, [FaultResponse(delay=60.0), FaultResponse(delay=60.0)])
        held = [asyncio.create_task(get_json(http, url)) for _ in range(2)]
        await until(lambda: sim.stats.in_flight == 2)
        status, body, resp = await get_json(http, url)
        assert status == 429
        validate(TWILIO_ERROR_SCHEMA, body)
        assert body["code"] == 20429
        assert resp.headers["Retry-After"] == "3"
        sim.release_delayed()
        assert [(await t)[0] for t in held] == [200, 200]
        assert sim.stats.max_in_flight == 3
        status, _, _ = await get_json(http, url)
        assert status == 200


# ------------------------------------------------------------------------------------------
# Token endpoint, robustness, validation
# ------------------------------------------------------------------------------------------


async def test_token_endpoint_is_faulted_only_when_asked() -> None:
    faults = FaultConfig(rate_500=1.0)
    config = SimulatorConfig(sims=1, auth_mode="bearer", faults=faults)
    form = {
        "grant_type": "client_credentials",
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
    }
    async with running(config) as (sim, http):
        async with http.post(sim.token_url, data=form) as resp:
            assert resp.status == 200
        sim.faults.apply_to_token = True
        async with http.post(sim.token_url, data=form) as resp:
            assert resp.status == 500
        sim.faults.clear()
        sim.faults.script("token", [FaultResponse(status=503), FaultResponse(malformed=True)])
        async with http.post(sim.token_url, data=form) as resp:
            assert resp.status == 503
        async with http.post(sim.token_url, data=form) as resp:
            assert resp.status == 200
            assert "access_token" not in await resp.json()
        async with http.post(sim.token_url, data=form) as resp:
            assert "access_token" in await resp.json()
        assert sim.stats.token_requests == 5


async def test_broken_live_settings_do_not_crash_the_simulator() -> None:
    async with running(SimulatorConfig(sims=1)) as (sim, http):
        sim.faults.latency = "nonsense"  # type: ignore[assignment]
        status, _, _ = await get_json(http, f"{sim.url}/v1/Sims")
        assert status == 200
        sim.faults.latency = None
        sim.faults.rate_500 = 7.0
        status, _, _ = await get_json(http, f"{sim.url}/v1/Sims")
        assert status == 500


def test_fault_config_validation() -> None:
    with pytest.raises(ValueError, match="rate_500"):
        FaultConfig(rate_500=1.5)
    with pytest.raises(ValueError, match="sum"):
        FaultConfig(rate_429=0.6, rate_500=0.6)
    with pytest.raises(ValueError, match="latency"):
        FaultConfig(latency=(0.2, 0.1))
    with pytest.raises(ValueError, match="path_kind"):
        FaultConfig().script("health", [FaultResponse(status=500)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        FaultResponse(status=1000)
    with pytest.raises(ValueError, match="delay"):
        FaultResponse(delay=-1)
    with pytest.raises(ValueError, match="retry_after"):
        FaultResponse(retry_after=-1)
    with pytest.raises(ValueError, match="retry_after"):
        FaultConfig(retry_after=-0.5)
    with pytest.raises(ValueError, match="timeout_delay"):
        FaultConfig(timeout_delay=-1)
    with pytest.raises(ValueError, match="latency"):
        FaultConfig(latency=(-0.1, 0.1))


def test_changed_rates_are_checked_by_validate() -> None:
    faults = FaultConfig(rate_429=0.5)
    faults.validate()
    faults.rate_500 = 0.75  # a live change is taken as it is ...
    assert faults.rate_500 == 0.75
    with pytest.raises(ValueError, match="sum"):
        faults.validate()  # ... and checked when asked
    faults.rate_500 = 1.5
    with pytest.raises(ValueError, match="rate_500"):
        faults.validate()
