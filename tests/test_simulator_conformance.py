"""The simulator against Twilio's OpenAPI description and the official Python SDK."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.rest import Client

from tests.simulator_support import (
    TWILIO_ERROR_SCHEMA,
    assert_absolute_url,
    basic,
    get_json,
    kore_response_schema,
    list_all,
    query_of,
    response_schema,
    running,
    validate,
    validate_list_page,
    validate_session,
)
from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    SIM_STATUSES,
    STATE_KEY,
    UNKNOWN_OPERATOR,
    RunningSimulator,
    SimClock,
    SimulatorConfig,
    build_app,
    format_time,
    start_simulator,
)

DS_PATH = "/v1/Sims/{SimSid}/DataSessions"
SIMS_PATH = "/v1/Sims"
SIM_PATH = "/v1/Sims/{Sid}"

Pair = tuple[RunningSimulator, aiohttp.ClientSession]


@pytest.fixture
async def fleet_sim() -> AsyncIterator[Pair]:
    """A generated fleet, two simulated days of retention."""
    async with running(SimulatorConfig(sims=40, seed=7, retention=2 * 86400.0)) as pair:
        yield pair


def _busiest(sim: RunningSimulator) -> list[str]:
    """SIM SIDs ordered by how many sessions they list, most first."""
    return sorted(sim.fleet.sim_sids(), key=lambda sid: -len(sim.fleet.listing(sid)))


def _ds_url(sim: RunningSimulator, sid: str, page_size: int | None = None) -> str:
    url = f"{sim.url}/v1/Sims/{sid}/DataSessions"
    return url if page_size is None else f"{url}?PageSize={page_size}"


# ------------------------------------------------------------------------------------------
# Schema conformance
# ------------------------------------------------------------------------------------------


async def test_sims_list_pages_validate_and_cover_every_sim(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    for page_size in (1, 7, 50):
        items, pages = await list_all(
            http, f"{sim.url}/v1/Sims?PageSize={page_size}", "sims", path=SIMS_PATH
        )
        sids = [item["sid"] for item in items]
        assert sids == sim.fleet.sim_sids()
        assert pages == -(-len(sids) // page_size)
    for item in items:
        assert item["account_sid"] == DEMO_ACCOUNT_SID
        assert item["url"] == f"{sim.url}/v1/Sims/{item['sid']}"
        assert item["links"]["data_sessions"] == f"{sim.url}/v1/Sims/{item['sid']}/DataSessions"
        assert item["iccid"].isdigit()
        assert len(item["iccid"]) == 19
        # Every property of wireless.v1.sim is present.
        assert set(item) == set(response_schema(SIM_PATH)["properties"])


async def test_sims_status_filter_matches_the_fleet(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    seen = set()
    for status in SIM_STATUSES:
        items, _ = await list_all(
            http, f"{sim.url}/v1/Sims?Status={status}&PageSize=10", "sims", path=SIMS_PATH
        )
        assert [i["sid"] for i in items] == sim.fleet.sim_sids(status)
        assert all(i["status"] == status for i in items)
        if items:
            seen.add(status)
            # The filter is carried into every paging URL.
            status_code, body, _ = await get_json(http, f"{sim.url}/v1/Sims?Status={status}")
            assert status_code == 200
            assert query_of(body["meta"]["first_page_url"])["Status"] == status
    assert "active" in seen
    assert len(seen) >= 2

    status_code, body, _ = await get_json(http, f"{sim.url}/v1/Sims?Status=bogus")
    assert status_code == 400
    validate(TWILIO_ERROR_SCHEMA, body)


async def test_single_sim_validates_by_sid_and_unique_name(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.sim_sids()[3]
    status, body, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}")
    assert status == 200
    validate(response_schema(SIM_PATH), body)
    assert body["sid"] == sid
    status, by_name, _ = await get_json(http, f"{sim.url}/v1/Sims/{body['unique_name']}")
    assert status == 200
    assert by_name == body


async def test_unknown_sim_is_a_twilio_404(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = "DE" + "f" * 32
    status, body, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}")
    assert status == 404
    assert body == {
        "code": 20404,
        "message": f"The requested resource /v1/Sims/{sid} was not found",
        "more_info": "https://www.twilio.com/docs/errors/20404",
        "status": 404,
    }
    status, body, _ = await get_json(http, _ds_url(sim, sid))
    assert status == 404
    validate(TWILIO_ERROR_SCHEMA, body)
    assert body["code"] == 20404
    assert body["message"] == f"The requested resource /v1/Sims/{sid}/DataSessions was not found"


async def test_unknown_route_and_method_are_twilio_errors(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    status, body, _ = await get_json(http, f"{sim.url}/v1/Nope")
    assert status == 404
    validate(TWILIO_ERROR_SCHEMA, body)
    async with http.delete(f"{sim.url}/v1/Sims") as resp:
        assert resp.status == 405
        validate(TWILIO_ERROR_SCHEMA, await resp.json())


async def test_every_data_session_of_the_fleet_validates() -> None:
    """A larger fleet so every realistic quirk (nulls, {}, "") shows up and is validated."""
    config = SimulatorConfig(sims=150, seed=11, retention=3 * 86400.0)
    async with running(config) as (sim, http):
        sessions: list[dict[str, Any]] = []
        for sid in sim.fleet.sim_sids():
            status, body, _ = await get_json(http, _ds_url(sim, sid, 1000))
            assert status == 200
            validate_list_page(DS_PATH, body, "data_sessions")
            assert body["meta"]["next_page_url"] is None
            assert body["meta"]["previous_page_url"] is None
            for item in body["data_sessions"]:
                validate_session(item)
                assert item["sim_sid"] == sid
            sessions.extend(body["data_sessions"])
    assert len(sessions) > 500

    def some(pred: Any) -> bool:
        return any(pred(s) for s in sessions)

    assert some(lambda s: s["end"] is None)
    assert some(lambda s: s["end"] is not None)
    assert some(lambda s: s["cell_location_estimate"] == {})
    assert some(lambda s: s["cell_location_estimate"] not in ({}, None))
    assert some(lambda s: s["imei"] is None)
    assert some(lambda s: s["operator_mcc"] == "")
    assert some(lambda s: s["operator_name"] == "" and s["operator_mcc"] != "")
    assert some(lambda s: s["cell_id"] is None)
    assert some(lambda s: s["radio_link"] is None)
    radio = {s["radio_link"] for s in sessions} - {None}
    assert radio <= {"2G", "3G", "4G", "LTE", "LTE-M", "NB-IoT"}
    assert len(radio) >= 4
    countries = {s["operator_country"] for s in sessions} - {"", None}
    assert len(countries) >= 5


async def test_sims_and_sessions_validate_against_kore_too(fleet_sim: Pair) -> None:
    """KORE's typed description of the same resources (its usage and rate plan lists are
    checked in test_simulator_usage.py)."""
    sim, http = fleet_sim
    sim.fleet.set_sim_reset_status(sim.fleet.sim_sids()[0], "resetting")
    url: str | None = f"{sim.url}/v1/Sims?PageSize=15"
    resets = set()
    while url is not None:
        status, body, _ = await get_json(http, url)
        assert status == 200
        validate(kore_response_schema("/v1/Sims"), body)
        resets |= {item["reset_status"] for item in body["sims"]}
        url = body["meta"]["next_page_url"]
    assert resets == {None, "resetting"}
    for sid in sim.fleet.sim_sids():
        status, one, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}")
        validate(kore_response_schema("/v1/Sims/{Sid}"), one)
        status, body, _ = await get_json(http, _ds_url(sim, sid, 1000))
        assert status == 200
        validate(kore_response_schema("/v1/Sims/{Sid}/DataSessions"), body)


async def test_scripted_nulls_validate() -> None:
    async with running(SimulatorConfig(sims=0)) as (sim, http):
        fleet = sim.fleet
        sid = fleet.add_sim(unique_name="scripted")
        fleet.open_session(
            sid,
            radio_link=None,
            operator=(None, None, None, None),
            imei=None,
            cell_id=None,
            cell_location=None,
        )
        fleet.open_session(sid, operator=UNKNOWN_OPERATOR, cell_id="", packets_uploaded=3)
        status, body, _ = await get_json(http, _ds_url(sim, sid))
        assert status == 200
        validate_list_page(DS_PATH, body, "data_sessions")
        for item in body["data_sessions"]:
            validate_session(item)
        assert {item["sid"] for item in body["data_sessions"]} == {
            s.sid for s in fleet.listing(sid)
        }
        assert list(body["data_sessions"]) == [s.to_api() for s in fleet.listing(sid)]


async def test_wall_timestamps_validate_and_never_lie_in_the_real_future() -> None:
    """An accelerated fleet reporting wall-clock times, one fake real hour (60 simulated) in."""
    sim_start, wall_start, speed = 1_767_225_600, 1_700_000_000, 60.0
    wall = [0.0]
    clock = SimClock(sim_start, speed=speed, wall=lambda: wall[0], wall_start=wall_start)
    config = SimulatorConfig(
        sims=40, seed=7, retention=2 * 86400.0, speed=speed, wall_timestamps=True
    )
    async with (
        start_simulator(config, clock=clock) as sim,
        aiohttp.ClientSession() as http,
    ):
        wall[0] += 3600.0
        real_now = wall_start + 3600
        fleet = sim.fleet
        assert clock.now() == sim_start + 60 * 3600.0

        def reported(t: int) -> str:
            return dt.datetime.fromtimestamp(wall_start + (t - sim_start) // 60, dt.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )

        sims, _ = await list_all(http, f"{sim.url}/v1/Sims", "sims", path=SIMS_PATH)
        assert len(sims) == 40
        for item in sims:
            sim_view = fleet.sim(item["sid"])
            assert sim_view is not None
            assert item["date_created"] == reported(sim_view.date_created)
            assert item["date_updated"] == reported(sim_view.date_updated)
        _, one, _ = await get_json(http, f"{sim.url}/v1/Sims/{sims[0]['sid']}")
        validate(response_schema(SIM_PATH), one)
        assert one == sims[0]

        starts: list[int] = []
        for sid in fleet.sim_sids():
            status, body, _ = await get_json(http, _ds_url(sim, sid, 1000))
            assert status == 200
            validate_list_page(DS_PATH, body, "data_sessions")
            views = fleet.listing(sid)
            assert body["data_sessions"] == [v.to_api(fleet.time_format) for v in views]
            for item, view in zip(body["data_sessions"], views, strict=True):
                validate_session(item)
                assert item["start"] == reported(view.start)
                assert item["last_updated"] == reported(view.last_updated)
                assert item["end"] == (None if view.end is None else reported(view.end))
                assert item["last_updated"] <= format_time(real_now)
                starts.append(view.start)
    # sessions started during the hour, hours of simulated time in the real future: the
    # mapping is what kept them in the past
    assert sum(start > real_now for start in starts) > 10
    assert max(starts) > sim_start + 59 * 3600


async def test_schema_validation_can_fail() -> None:
    """Guard against a validator that accepts everything."""
    schema = response_schema(DS_PATH)
    bad = {"data_sessions": [{"packets_uploaded": "12"}], "meta": {}}
    with pytest.raises(Exception, match="12"):
        validate(schema, bad)
    with pytest.raises(Exception, match=r"date-time|not a"):
        validate(schema, {"data_sessions": [{"start": "yesterday"}], "meta": {}})
    with pytest.raises(Exception, match=r"pattern|does not match"):
        validate(response_schema(SIM_PATH), {"sid": "XX" + "0" * 32})


# ------------------------------------------------------------------------------------------
# Paging
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 7, 50, 1000])
async def test_paging_returns_every_session_exactly_once(fleet_sim: Pair, page_size: int) -> None:
    sim, http = fleet_sim
    busiest = _busiest(sim)
    chosen = [busiest[0], busiest[len(busiest) // 2], busiest[-1]]
    for sid in chosen:
        expected = sim.fleet.listing(sid)
        items, pages = await list_all(
            http, _ds_url(sim, sid, page_size), "data_sessions", path=DS_PATH
        )
        sids = [item["sid"] for item in items]
        assert len(sids) == len(set(sids)) == len(expected)
        assert set(sids) == {s.sid for s in expected}
        # Same order and the same values as the ground truth.
        assert items == [s.to_api() for s in expected]
        assert pages == max(1, -(-len(expected) // page_size))
    assert len(sim.fleet.listing(busiest[0])) > 50


async def test_listing_order_is_a_shuffle_not_by_start(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = _busiest(sim)[0]
    status, body, _ = await get_json(http, _ds_url(sim, sid, 1000))
    assert status == 200
    starts = [item["start"] for item in body["data_sessions"]]
    assert len(starts) > 10
    assert starts != sorted(starts)
    assert starts != sorted(starts, reverse=True)
    # ... but deterministic.
    _, again, _ = await get_json(http, _ds_url(sim, sid, 1000))
    assert again == body


async def test_meta_urls_are_absolute_and_consistent(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = _busiest(sim)[0]
    status, first, _ = await get_json(http, _ds_url(sim, sid, 5))
    assert status == 200
    meta = first["meta"]
    assert meta["page"] == 0
    assert meta["page_size"] == 5
    assert meta["previous_page_url"] is None
    assert meta["first_page_url"] == f"{sim.url}/v1/Sims/{sid}/DataSessions?PageSize=5&Page=0"
    assert meta["url"] == meta["first_page_url"]
    next_url = meta["next_page_url"]
    assert next_url is not None
    assert next_url.startswith(f"{sim.url}/v1/Sims/{sid}/DataSessions?")
    q = query_of(next_url)
    assert q["Page"] == "1"
    assert q["PageSize"] == "5"
    assert q["PageToken"].startswith("PA")
    status, second, _ = await get_json(http, next_url)
    assert status == 200
    assert second["meta"]["url"] == next_url
    assert second["meta"]["page"] == 1
    # previous_page_url leads back to the first page's items.
    prev = second["meta"]["previous_page_url"]
    assert prev is not None
    assert_absolute_url(prev)
    status, back, _ = await get_json(http, prev)
    assert status == 200
    assert back["data_sessions"] == first["data_sessions"]
    assert back["meta"]["page"] == 0
    # The default page size is 50.
    _, default, _ = await get_json(http, _ds_url(sim, sid))
    assert default["meta"]["page_size"] == 50
    assert len(default["data_sessions"]) == min(50, len(sim.fleet.listing(sid)))


async def test_public_url_is_used_in_meta() -> None:
    config = SimulatorConfig(sims=3, public_url="https://wireless.example.test")
    async with running(config) as (sim, http):
        status, body, _ = await get_json(http, f"{sim.url}/v1/Sims?PageSize=1")
        assert status == 200
        assert body["meta"]["next_page_url"].startswith("https://wireless.example.test/v1/Sims?")
        assert body["sims"][0]["url"].startswith("https://wireless.example.test/v1/Sims/DE")


async def test_empty_listing_has_one_page(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.add_sim()
    status, body, _ = await get_json(http, _ds_url(sim, sid))
    assert status == 200
    validate_list_page(DS_PATH, body, "data_sessions")
    assert body["data_sessions"] == []
    assert body["meta"]["next_page_url"] is None


@pytest.mark.parametrize("page_size", ["0", "1001", "abc", "-1", "1.5", ""])
async def test_bad_page_size_is_400(fleet_sim: Pair, page_size: str) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.sim_sids()[0]
    for url in (
        f"{_ds_url(sim, sid)}?PageSize={page_size}",
        f"{sim.url}/v1/Sims?PageSize={page_size}",
    ):
        status, body, _ = await get_json(http, url)
        assert status == 400, url
        validate(TWILIO_ERROR_SCHEMA, body)
        assert body["status"] == 400


async def test_page_without_valid_token_is_400_21481(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sids = _busiest(sim)
    base = _ds_url(sim, sids[0])
    status, body, _ = await get_json(http, f"{base}?PageSize=2&Page=1")
    assert status == 400
    validate(TWILIO_ERROR_SCHEMA, body)
    assert body["code"] == 21481
    for token in ("garbage", "PA", "PA!!!!", "PAZm9v"):
        status, body, _ = await get_json(http, f"{base}?PageSize=2&Page=1&PageToken={token}")
        assert status == 400, token
        assert body["code"] == 21481
    # A token of another SIM's listing is not valid here.
    _, other, _ = await get_json(http, _ds_url(sim, sids[1], 1))
    foreign = query_of(other["meta"]["next_page_url"])["PageToken"]
    status, body, _ = await get_json(http, f"{base}?PageSize=2&Page=1&PageToken={foreign}")
    assert status == 400
    assert body["code"] == 21481
    status, body, _ = await get_json(http, f"{base}?Page=-1")
    assert status == 400
    validate(TWILIO_ERROR_SCHEMA, body)


# ------------------------------------------------------------------------------------------
# The official SDK
# ------------------------------------------------------------------------------------------


def _client(sim: RunningSimulator) -> Client:
    client = Client(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN)
    client.wireless.base_url = sim.url
    return client


async def test_sdk_lists_exactly_the_same_sessions(fleet_sim: Pair) -> None:
    sim, _ = fleet_sim
    client = _client(sim)
    for sid in _busiest(sim)[:3]:
        records = await asyncio.to_thread(
            client.wireless.v1.sims(sid).data_sessions.list, page_size=7
        )
        expected = sim.fleet.listing(sid)
        assert [r.sid for r in records] == [s.sid for s in expected]
        for record, truth in zip(records, expected, strict=True):
            assert record.sim_sid == sid
            assert record.account_sid == DEMO_ACCOUNT_SID
            assert isinstance(record.start, dt.datetime)
            assert record.start.tzinfo is not None
            assert record.start.timestamp() == truth.start
            assert isinstance(record.last_updated, dt.datetime)
            assert record.last_updated.timestamp() == truth.last_updated
            if truth.end is None:
                assert record.end is None
            else:
                assert isinstance(record.end, dt.datetime)
                assert record.end.timestamp() == truth.end
            assert isinstance(record.packets_uploaded, int)
            assert record.packets_uploaded == truth.packets_uploaded
            assert isinstance(record.packets_downloaded, int)
            assert record.packets_downloaded == truth.packets_downloaded
            assert record.cell_location_estimate is None or isinstance(
                record.cell_location_estimate, dict
            )
            for name in (
                "radio_link",
                "operator_mcc",
                "operator_mnc",
                "operator_country",
                "operator_name",
                "cell_id",
                "imei",
            ):
                value = getattr(record, name)
                assert value is None or isinstance(value, str)
                assert value == getattr(truth, name)


async def test_sdk_lists_and_fetches_sims(fleet_sim: Pair) -> None:
    sim, _ = fleet_sim
    client = _client(sim)
    active = await asyncio.to_thread(lambda: client.wireless.v1.sims.list(status="active"))
    assert [s.sid for s in active] == sim.fleet.sim_sids("active")
    assert all(s.status == "active" for s in active)
    every = await asyncio.to_thread(lambda: client.wireless.v1.sims.list(page_size=9))
    assert [s.sid for s in every] == sim.fleet.sim_sids()
    one = every[0]
    assert isinstance(one.date_created, dt.datetime)
    assert isinstance(one.links, dict)
    fetched = await asyncio.to_thread(lambda: client.wireless.v1.sims(one.sid).fetch())
    assert fetched.sid == one.sid
    assert fetched.iccid == one.iccid


async def test_sdk_sees_twilio_errors(fleet_sim: Pair) -> None:
    sim, _ = fleet_sim
    client = _client(sim)
    missing = "DE" + "0" * 32
    with pytest.raises(TwilioRestException) as info:
        await asyncio.to_thread(lambda: client.wireless.v1.sims(missing).fetch())
    assert info.value.status == 404
    assert info.value.code == 20404
    with pytest.raises(TwilioException):
        await asyncio.to_thread(lambda: client.wireless.v1.sims(missing).data_sessions.list())
    wrong = Client(DEMO_ACCOUNT_SID, "wrong-token")
    wrong.wireless.base_url = sim.url
    with pytest.raises(TwilioRestException) as info:
        await asyncio.to_thread(lambda: wrong.wireless.v1.sims(sim.fleet.sim_sids()[0]).fetch())
    assert info.value.status == 401
    assert info.value.code == 20003


async def test_build_app_serves_in_process() -> None:
    """``build_app`` gives a plain aiohttp app (e.g. for aiohttp's TestServer)."""
    app = build_app(SimulatorConfig(sims=4, seed=2))
    state = app[STATE_KEY]
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/v1/Sims", headers=basic())
        assert resp.status == 200
        body = await resp.json()
        validate_list_page(SIMS_PATH, body, "sims")
        assert [s["sid"] for s in body["sims"]] == state.fleet.sim_sids()
        assert state.stats.count("sims", 200) == 1
