"""The simulator's usage records, rate plans and SIM lifecycle: both OpenAPI descriptions, the
official SDK, the lag and its revisions, and the ground truth the exporter's tests compare to."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from twilio.base.exceptions import TwilioException
from twilio.rest import Client

from tests.simulator_support import (
    TWILIO_ERROR_SCHEMA,
    get_json,
    kore_openapi,
    kore_response_schema,
    list_all,
    query_of,
    response_schema,
    running,
    until,
    validate,
    validate_list_page,
)
from twilio_wireless_simulator import (
    COUNTRIES,
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    UNKNOWN_OPERATOR,
    FaultResponse,
    Fleet,
    RunningSimulator,
    SimClock,
    SimulatorConfig,
    UsageView,
    format_time,
    start_simulator,
)
from twilio_wireless_simulator.cli import build_parser, config_from_args
from twilio_wireless_simulator.usage import HourSeries, floor_hour

HOUR = 3600
DAY = 86400
START = 1_767_225_600  # 2026-01-01T00:00:00Z, the manual clock's start
SIM_USAGE = "/v1/Sims/{SimSid}/UsageRecords"
KORE_SIM_USAGE = "/v1/Sims/{Sid}/UsageRecords"
ACCOUNT_USAGE = "/v1/UsageRecords"
PLANS = "/v1/RatePlans"
PLAN = "/v1/RatePlans/{Sid}"
FRANCE = COUNTRIES[3].operators[0]
GERMANY = COUNTRIES[0].operators[1]

Pair = tuple[RunningSimulator, aiohttp.ClientSession]
#: KORE's error body of the usage and rate plan resources (Twilio's satisfies it).
KORE_ERROR_SCHEMA = kore_openapi()["components"]["schemas"]["UsageApiErrorResponse"]


def _q(t: int) -> str:
    return format_time(t).replace(":", "%3A")


@pytest.fixture
async def fleet_sim() -> AsyncIterator[Pair]:
    """A generated fleet three days in, with a short lag so recent hours are reported."""
    config = SimulatorConfig(
        sims=30, seed=5, retention=2 * DAY, usage_lag=600.0, usage_final_after=6 * HOUR
    )
    async with running(config) as (sim, http):
        sim.clock.advance(3 * DAY + 1234)
        yield sim, http


@pytest.fixture
async def scripted() -> AsyncIterator[Pair]:
    """An empty fleet for scripts: lag 1 h, complete after 5 h."""
    config = SimulatorConfig(sims=0, seed=3, usage_lag=HOUR, usage_final_after=5 * HOUR)
    async with running(config) as (sim, http):
        yield sim, http


def _validate_usage_page(body: Any, *, account: bool) -> None:
    if account:
        validate_list_page(ACCOUNT_USAGE, body, "usage_records")
        validate(kore_response_schema(ACCOUNT_USAGE), body)
    else:
        validate_list_page(SIM_USAGE, body, "usage_records")
        validate(kore_response_schema(KORE_SIM_USAGE), body)
    for record in body["usage_records"]:
        assert ("sim_sid" in record) is not account
        data = record["data"]
        parts = [data["home"], data["national_roaming"], *data["international_roaming"]]
        assert data["upload"] + data["download"] == data["total"]
        for part in parts:
            assert part["upload"] + part["download"] == part["total"]
            assert part["units"] == data["units"]
        if data["units"] == "bytes":
            assert sum(p["upload"] for p in parts) == data["upload"]
            assert sum(p["download"] for p in parts) == data["download"]
        commands = record["commands"]
        assert commands["from_sim"] + commands["to_sim"] == commands["total"]
        assert record["period"]["start"] <= record["period"]["end"]


def _bytes(records: list[dict[str, Any]], field: str = "total") -> int:
    return sum(r["data"][field] for r in records)


# ------------------------------------------------------------------------------------------
# Both descriptions
# ------------------------------------------------------------------------------------------


async def test_every_usage_page_validates_against_twilio_and_kore(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    records: list[dict[str, Any]] = []
    start = _q(START - 2 * DAY)
    for sid in sim.fleet.sim_sids():
        for granularity in ("hourly", "daily", "all"):
            url = f"{sim.url}/v1/Sims/{sid}/UsageRecords?Granularity={granularity}&Start={start}"
            items, _ = await list_all(http, url + "&PageSize=40", "usage_records")
            for page_url in {url, url + "&PageSize=40"}:
                status, body, _ = await get_json(http, page_url)
                assert status == 200
                _validate_usage_page(body, account=False)
            assert all(item["sim_sid"] == sid for item in items)
            records.extend(items)
    for granularity in ("hourly", "daily", "all"):
        url = f"{sim.url}/v1/UsageRecords?Granularity={granularity}&Start={start}&PageSize=30"
        status, body, _ = await get_json(http, url)
        assert status == 200
        _validate_usage_page(body, account=True)
    # the fleet shows every kind of usage somewhere
    assert any(r["data"]["home"]["total"] > 0 for r in records)
    assert any(r["data"]["international_roaming"] for r in records)
    assert any(r["commands"]["from_sim"] > 0 for r in records)
    assert any(r["commands"]["to_sim"] > 0 for r in records)
    assert any(r["data"]["billed"] > 0 for r in records)


async def test_rate_plans_validate_and_the_sims_use_them(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    items, pages = await list_all(
        http, f"{sim.url}/v1/RatePlans?PageSize=3", "rate_plans", path=PLANS
    )
    assert pages == 2
    status, body, _ = await get_json(http, f"{sim.url}/v1/RatePlans")
    validate(kore_response_schema(PLANS), body)
    assert body["rate_plans"] == items
    assert [p["sid"] for p in items] == [p.sid for p in sim.fleet.rate_plans()]
    for plan in items:
        for name, path in ((plan["sid"], plan["sid"]), (plan["unique_name"], plan["sid"])):
            status, one, _ = await get_json(http, f"{sim.url}/v1/RatePlans/{name}")
            assert status == 200
            validate(response_schema(PLAN), one)
            validate(kore_response_schema(PLAN), one)
            assert one == plan
            assert one["url"] == f"{sim.url}/v1/RatePlans/{path}"
    limited = [p for p in items if "data_limit" in p]
    assert limited
    assert all(isinstance(p["data_limit"], int) and p["data_limit"] > 0 for p in limited)
    unlimited = [p for p in items if "data_limit" not in p]
    assert len(unlimited) == 1
    assert "international_roaming_data_limit" not in unlimited[0]
    assert any(p["national_roaming_enabled"] is False for p in items)
    assert any("data" not in p["international_roaming"] for p in items)
    sims, _ = await list_all(http, f"{sim.url}/v1/Sims", "sims")
    used = {s["rate_plan_sid"] for s in sims}
    assert used <= {p["sid"] for p in items}
    assert len(used) >= 3
    for s in sims:
        assert s["links"]["rate_plan"] == f"{sim.url}/v1/RatePlans/{s['rate_plan_sid']}"
    status, missing, _ = await get_json(http, f"{sim.url}/v1/RatePlans/WP{'0' * 32}")
    assert status == 404
    validate(TWILIO_ERROR_SCHEMA, missing)
    assert missing["code"] == 20404


async def test_kore_validation_can_fail() -> None:
    """Guard against a KORE schema that accepts everything."""
    schema = kore_response_schema(KORE_SIM_USAGE)
    good = {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"}
    with pytest.raises(Exception, match=r"period|start"):
        validate(schema, {"usage_records": [{"period": {"end": "x"}}]})
    with pytest.raises(Exception, match="country_code"):
        validate(
            schema,
            {"usage_records": [{"period": good, "data": {"international_roaming": [{}]}}]},
        )
    with pytest.raises(Exception, match="download"):
        validate(schema, {"usage_records": [{"period": good, "data": {"home": {"upload": 1}}}]})
    with pytest.raises(Exception, match=r"pattern|does not match"):
        validate(kore_response_schema(PLAN), {"sid": "XX" + "0" * 32})


# ------------------------------------------------------------------------------------------
# Paging, ground truth, sums
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 7, 50, 1000])
async def test_paging_returns_each_record_once_and_matches_the_ground_truth(
    fleet_sim: Pair, page_size: int
) -> None:
    sim, http = fleet_sim
    fleet = sim.fleet
    sid = fleet.sim_sids()[1]
    begin = START - DAY
    end = START + 2 * DAY + 1800
    for granularity in ("hourly", "daily"):
        url = (
            f"{sim.url}/v1/Sims/{sid}/UsageRecords?Granularity={granularity}"
            f"&Start={_q(begin)}&End={_q(end)}&PageSize={page_size}"
        )
        items, pages = await list_all(http, url, "usage_records", path=SIM_USAGE)
        truth = fleet.usage_records(sid, granularity=granularity, start=begin, end=end)
        assert items == [r.to_api(fleet.time_format) for r in truth]
        starts = [i["period"]["start"] for i in items]
        assert starts == sorted(set(starts))
        assert pages == max(1, -(-len(items) // page_size))
    assert len(items) == 4  # four days, two of them partial
    assert items[0]["period"]["start"] == format_time(begin)
    assert items[-1]["period"]["end"] == format_time(end)


async def test_hourly_sums_equal_daily_equal_all(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    begin = _q(START - 2 * DAY)
    base = f"&Start={begin}&End={_q(START + 3 * DAY)}&PageSize=1000"
    totals: list[tuple[int, int, int, int]] = []
    for sid in [*sim.fleet.sim_sids()[:10], None]:
        path = "/v1/UsageRecords" if sid is None else f"/v1/Sims/{sid}/UsageRecords"
        sums: dict[str, tuple[int, int, int, int]] = {}
        for granularity in ("hourly", "daily", "all"):
            items, _ = await list_all(
                http, f"{sim.url}{path}?Granularity={granularity}{base}", "usage_records"
            )
            sums[granularity] = (
                _bytes(items, "upload"),
                _bytes(items, "download"),
                sum(i["commands"]["total"] for i in items),
                sum(i["data"]["home"]["total"] for i in items),
            )
        assert sums["hourly"] == sums["daily"] == sums["all"], sid
        totals.append(sums["all"])
    assert sum(t[0] for t in totals) > 0


async def test_account_totals_are_the_sum_of_the_sims_final_bytes(fleet_sim: Pair) -> None:
    sim, _ = fleet_sim
    fleet = sim.fleet
    begin = START - 3 * DAY
    for sid in fleet.sim_sids():
        fleet.listing(sid)  # sessions age out into the archive on the way
    account = fleet.usage_totals(None, start=begin, final=True)
    sims = [fleet.usage_totals(sid, start=begin, final=True) for sid in fleet.sim_sids()]
    assert account.upload == sum(t.upload for t in sims)
    assert account.download == sum(t.download for t in sims)
    assert account.international == sum(t.international for t in sims)
    assert account.commands_from_sim == sum(t.commands_from_sim for t in sims)
    # as reported now: rounded once on the account's own bytes, so at least the SIMs' sum
    now_account = fleet.usage_totals(None, start=begin)
    now_sims = [fleet.usage_totals(sid, start=begin) for sid in fleet.sim_sids()]
    assert sum(t.upload for t in now_sims) <= now_account.upload <= account.upload
    # a script taking over a generated session moves that SIM out of the ledger, not its bytes
    busiest = max(fleet.sim_sids(), key=lambda sid: len(fleet.listing(sid)))
    session = fleet.listing(busiest)[-1]
    before = fleet.usage_totals(None, start=begin, final=True)
    fleet.update_session(session.sid, packets_uploaded=session.packets_uploaded)
    after = fleet.usage_totals(None, start=begin, final=True)
    sims = [fleet.usage_totals(sid, start=begin, final=True) for sid in fleet.sim_sids()]
    assert after.upload == sum(t.upload for t in sims)
    assert abs(after.upload - before.upload) <= 2 * fleet.bytes_per_packet(busiest) * 80


def test_the_account_ledger_is_built_in_steps_and_keeps_what_a_step_did() -> None:
    fleet = Fleet(SimClock(), sims=450, seed=6, retention=DAY, usage_lag=0.0)
    fleet.clock.advance(2 * DAY)
    steps = fleet.account_usage_steps()
    next(steps)  # a first share of the SIMs, then the request is abandoned
    steps.close()
    begin = START - DAY
    account = fleet.usage_totals(None, start=begin, final=True)
    sims = [fleet.usage_totals(sid, start=begin, final=True) for sid in fleet.sim_sids()]
    assert account.upload == sum(t.upload for t in sims) > 0
    assert account.download == sum(t.download for t in sims)
    assert account.commands_to_sim == sum(t.commands_to_sim for t in sims) > 0
    assert len(list(fleet.account_usage_steps())) == 9  # every 50 SIMs, even with nothing new


async def test_bytes_follow_the_packets_even_after_sessions_age_out() -> None:
    config = SimulatorConfig(sims=12, seed=9, retention=DAY, usage_lag=0.0, usage_final_after=0.0)
    async with running(config) as (sim, _):
        fleet = sim.fleet
        fleet.clock.advance(6 * DAY)  # on an hour: every closed session has ended hours
        aged_out = 0
        for sid in fleet.sim_sids():
            listed = {v.sid for v in fleet.listing(sid)}  # older sessions leave the listing
            history = fleet.history(sid)
            aged_out += sum(1 for v in history if v.sid not in listed)
            bpp = fleet.bytes_per_packet(sid)
            usage = fleet.usage_totals(sid, start=0)
            assert usage == fleet.usage_totals(sid, start=0, final=True)
            closed = [v for v in history if v.end is not None]
            open_ = [v for v in history if v.end is None]
            # every closed session in full; an open one up to the last full hour, no more
            # than its packets so far (plus one for the rounding of each)
            assert usage.upload >= bpp * sum(v.packets_uploaded for v in closed)
            assert usage.upload < bpp * (sum(v.packets_uploaded for v in history) + len(open_) + 1)
            assert usage.download >= bpp * sum(v.packets_downloaded for v in closed)
            assert usage.download < bpp * (
                sum(v.packets_downloaded for v in history) + len(open_) + 1
            )
        assert aged_out > 50


# ------------------------------------------------------------------------------------------
# Lag and revision, units, roaming, commands (scripted)
# ------------------------------------------------------------------------------------------


async def _hour_of(sim: RunningSimulator, http: aiohttp.ClientSession, sid: str) -> dict[str, Any]:
    url = (
        f"{sim.url}/v1/Sims/{sid}/UsageRecords?Granularity=hourly"
        f"&Start={_q(START)}&End={_q(START + HOUR)}"
    )
    status, body, _ = await get_json(http, url)
    assert status == 200
    _validate_usage_page(body, account=False)
    assert len(body["usage_records"]) == 1
    record: dict[str, Any] = body["usage_records"][0]
    assert record["period"] == {"start": format_time(START), "end": format_time(START + HOUR)}
    return record


async def test_an_hour_is_reported_after_the_lag_and_revised_upward(scripted: Pair) -> None:
    sim, http = scripted
    fleet = sim.fleet
    sid = fleet.add_sim(bytes_per_packet=100)
    session = fleet.open_session(sid, start=START)
    fleet.clock.advance(HOUR)
    fleet.close_session(session, packets_uploaded=1000, packets_downloaded=3000)
    seen = []
    # ages after the hour's end: 0, 1799, 3599 | 3600, 10799 | 10800, 17999 | 18000, 20000
    for step in (0, 1799, 1800, 1, 7199, 1, 7199, 1, 2000):
        fleet.clock.advance(step)
        record = await _hour_of(sim, http, sid)
        seen.append((record["data"]["upload"], record["data"]["download"]))
        truth = fleet.usage_records(sid, granularity="hourly", start=START, end=START + HOUR)
        assert record == truth[0].to_api(fleet.time_format)
    ups = [u for u, _ in seen]
    assert ups[:3] == [0, 0, 0]  # not before the lag (1 h after the hour's end)
    assert 0 < ups[3] == ups[4] < 100_000  # first a part of it
    assert ups[4] < ups[5] == ups[6] < 100_000  # revised upward half-way to final
    assert ups[7:] == [100_000, 100_000]  # complete from 5 h after the hour on
    assert ups == sorted(ups)
    assert seen[-1] == (100_000, 300_000)
    final = fleet.usage_totals(sid, start=START, end=START + HOUR, final=True)
    assert (final.upload, final.download, final.home) == (100_000, 300_000, 400_000)


async def test_units_round_down_and_can_change(scripted: Pair) -> None:
    sim, http = scripted
    fleet = sim.fleet
    sid = fleet.add_sim(bytes_per_packet=1000, unit="kilobytes")
    fleet.open_session(sid, start=START, packets_uploaded=3000, packets_downloaded=5000)
    fleet.clock.advance(6 * HOUR)
    record = await _hour_of(sim, http, sid)
    data = record["data"]
    assert (data["units"], data["upload"], data["download"]) == ("kilobytes", 2929, 4882)
    assert data["total"] == 2929 + 4882
    assert data["home"] == {**data["home"], "units": "kilobytes", "upload": 2929}
    fleet.set_sim_unit(sid, "megabytes")
    data = (await _hour_of(sim, http, sid))["data"]
    assert (data["units"], data["upload"], data["download"]) == ("megabytes", 2, 4)
    fleet.set_sim_unit(sid, "bytes")
    data = (await _hour_of(sim, http, sid))["data"]
    assert (data["units"], data["upload"]) == ("bytes", 3_000_000)
    assert fleet.sim_unit(sid) == "bytes"
    with pytest.raises(ValueError, match="unit"):
        fleet.set_sim_unit(sid, "gigabytes")
    with pytest.raises(ValueError, match="unit"):
        fleet.add_sim(unit="bits")


async def test_the_fleet_unit_applies_to_every_sim() -> None:
    config = SimulatorConfig(sims=3, seed=2, usage_unit="megabytes", usage_lag=0.0)
    async with running(config) as (sim, http):
        sim.clock.advance(DAY)
        for sid in sim.fleet.sim_sids():
            assert sim.fleet.sim_unit(sid) == "megabytes"
            _, body, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}/UsageRecords")
            assert body["usage_records"][0]["data"]["units"] == "megabytes"
        _, body, _ = await get_json(http, f"{sim.url}/v1/UsageRecords")
        assert body["usage_records"][0]["data"]["units"] == "bytes"


async def test_roaming_is_by_the_operator_country(scripted: Pair) -> None:
    sim, http = scripted
    fleet = sim.fleet
    sid = fleet.add_sim(bytes_per_packet=10, home_country="DEU")
    fleet.open_session(sid, start=START, operator=GERMANY, packets_uploaded=1, packets_downloaded=2)
    fleet.open_session(
        sid, start=START, operator=FRANCE, packets_uploaded=30, packets_downloaded=40
    )
    fleet.open_session(
        sid, start=START + 60, operator=UNKNOWN_OPERATOR, packets_uploaded=5, packets_downloaded=0
    )
    fleet.clock.advance(6 * HOUR)
    data = (await _hour_of(sim, http, sid))["data"]
    assert (data["home"]["upload"], data["home"]["download"]) == (60, 20)
    assert data["international_roaming"] == [
        {
            "country_code": "FRA",
            "billing_units": "USD",
            "billed": round(700 / 1048576 * 0.5, 4),
            "total": 700,
            "upload": 300,
            "download": 400,
            "units": "bytes",
        }
    ]
    assert data["national_roaming"]["total"] == 0
    assert (data["upload"], data["download"]) == (360, 420)
    totals = fleet.usage_totals(sid, start=START, final=True)
    assert totals.international_roaming == {"FRA": (300, 400)}


async def test_scripted_checkpoints_place_the_bytes_in_their_hours(scripted: Pair) -> None:
    sim, _ = scripted
    fleet = sim.fleet
    sid = fleet.add_sim(bytes_per_packet=1)
    session = fleet.open_session(sid, start=START)
    fleet.clock.advance(2 * HOUR)
    fleet.update_session(session, packets_uploaded=7200)  # evenly over two hours
    fleet.clock.advance(HOUR)
    fleet.update_session(session, packets_uploaded=7000)  # a drop is no traffic
    fleet.clock.advance(HOUR)
    fleet.close_session(session, packets_uploaded=9000)  # only growth above 7200 counts
    fleet.clock.advance(10 * HOUR)
    hours = fleet.usage_records(sid, granularity="hourly", start=START, end=START + 4 * HOUR)
    assert [r.upload for r in hours] == [3600, 3600, 0, 1800]
    daily = fleet.usage_records(sid, granularity="daily", start=START, end=START + 4 * HOUR)
    assert [r.upload for r in daily] == [9000]
    assert daily[0].bytes.upload == 9000
    fleet.remove_session(session)  # gone from the listing, not from the usage
    assert fleet.usage_totals(sid, start=START).upload == 9000


async def test_commands_are_counted_in_their_hour(scripted: Pair) -> None:
    sim, http = scripted
    fleet = sim.fleet
    sid = fleet.add_sim()
    fleet.record_commands(sid, from_sim=2, to_sim=1, at=START + 10)
    fleet.record_commands(sid, to_sim=4, at=START + 20)
    fleet.clock.advance(6 * HOUR)
    commands = (await _hour_of(sim, http, sid))["commands"]
    assert (commands["from_sim"], commands["to_sim"], commands["total"]) == (2, 5, 7)
    assert commands["home"]["total"] == 7
    assert commands["billed"] == 0.07
    _, body, _ = await get_json(http, f"{sim.url}/v1/UsageRecords?Start={_q(START)}")
    assert body["usage_records"][0]["commands"]["total"] == 7
    with pytest.raises(ValueError, match="negative"):
        fleet.record_commands(sid, from_sim=-1)


# ------------------------------------------------------------------------------------------
# Parameters and errors
# ------------------------------------------------------------------------------------------


async def test_defaults_are_all_over_the_last_month(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.sim_sids()[0]
    now = int(sim.clock.now())
    status, body, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}/UsageRecords")
    assert status == 200
    (record,) = body["usage_records"]
    assert record["period"] == {"start": format_time(now - 31 * DAY), "end": format_time(now)}
    meta = body["meta"]
    assert meta["key"] == "usage_records"
    assert meta["page_size"] == 50
    assert query_of(meta["url"]) == {
        "Start": format_time(now - 31 * DAY),
        "End": format_time(now),
        "Granularity": "all",
        "PageSize": "50",
        "Page": "0",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02", START + DAY),
        ("2026-01-02T03:04:05Z", START + DAY + 3 * HOUR + 245),
        ("2026-01-02T03:04:05.999Z", START + DAY + 3 * HOUR + 245),
        ("2026-01-02T05:04:05+02:00", START + DAY + 3 * HOUR + 245),
        ("2026-01-02T03:04:05", START + DAY + 3 * HOUR + 245),
    ],
)
async def test_start_takes_iso_8601(fleet_sim: Pair, text: str, expected: int) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.sim_sids()[0]
    url = f"{sim.url}/v1/Sims/{sid}/UsageRecords?Start={text.replace('+', '%2B')}"
    status, body, _ = await get_json(http, url)
    assert status == 200, body
    assert body["usage_records"][0]["period"]["start"] == format_time(expected)


@pytest.mark.parametrize(
    ("query", "code", "needle"),
    [
        ("Granularity=weekly", 20001, "Granularity"),
        ("Granularity=Daily", 20001, "Granularity"),
        ("Start=yesterday", 20001, "Start"),
        ("End=2026-02-30T00:00:00Z", 20001, "End"),
        ("Start=2026-01-01T00:00:00Zjunk", 20001, "Start"),
        ("Start=2026-01-03&End=2026-01-02", 20001, "after"),
        ("PageSize=0", 20001, "PageSize"),
        ("Page=1", 21481, "PageToken"),
        ("Page=1&PageToken=PAZm9v", 21481, "PageToken"),
    ],
)
async def test_bad_parameters_are_twilio_400s(
    fleet_sim: Pair, query: str, code: int, needle: str
) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.sim_sids()[0]
    for path in (f"/v1/Sims/{sid}/UsageRecords", "/v1/UsageRecords"):
        status, body, _ = await get_json(http, f"{sim.url}{path}?{query}")
        assert status == 400, (path, body)
        validate(TWILIO_ERROR_SCHEMA, body)
        validate(KORE_ERROR_SCHEMA, body)
        assert body["code"] == code
        assert needle in body["message"]


async def test_unknown_sim_and_foreign_tokens(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    missing = "DE" + "f" * 32
    status, body, _ = await get_json(http, f"{sim.url}/v1/Sims/{missing}/UsageRecords")
    assert status == 404
    validate(KORE_ERROR_SCHEMA, body)
    assert body == {
        "code": 20404,
        "message": f"The requested resource /v1/Sims/{missing}/UsageRecords was not found",
        "more_info": "https://www.twilio.com/docs/errors/20404",
        "status": 404,
    }
    a, b = sim.fleet.sim_sids()[:2]
    query = f"Granularity=hourly&Start={_q(START)}&End={_q(START + DAY)}&PageSize=2"
    _, first, _ = await get_json(http, f"{sim.url}/v1/Sims/{a}/UsageRecords?{query}")
    token = query_of(first["meta"]["next_page_url"])["PageToken"]
    # a token of another SIM, or of another range, is not valid here
    status, body, _ = await get_json(
        http, f"{sim.url}/v1/Sims/{b}/UsageRecords?{query}&Page=1&PageToken={token}"
    )
    assert (status, body["code"]) == (400, 21481)
    other = f"Granularity=hourly&Start={_q(START + HOUR)}&End={_q(START + DAY)}&PageSize=2"
    status, body, _ = await get_json(
        http, f"{sim.url}/v1/Sims/{a}/UsageRecords?{other}&Page=1&PageToken={token}"
    )
    assert (status, body["code"]) == (400, 21481)


async def test_faults_and_headers_apply_to_the_new_endpoints(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.sim_sids()[0]
    sim.faults.script("usage_records", [FaultResponse(status=503)])
    sim.faults.script("rate_plans", [FaultResponse(malformed=True)])
    status, body, resp = await get_json(http, f"{sim.url}/v1/Sims/{sid}/UsageRecords")
    assert status == 503
    assert body["code"] == 20503
    assert resp.headers["Twilio-Concurrent-Requests"] == "1"
    status, body, _ = await get_json(http, f"{sim.url}/v1/RatePlans")
    assert status == 200
    assert not (
        isinstance(body, dict) and isinstance(body.get("rate_plans"), list) and "meta" in body
    )
    assert sim.stats.count("usage_records", 503) == 1
    assert sim.stats.count("rate_plans", 200) == 1


async def test_concurrency_headers_count_the_requests_in_flight(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    sid = sim.fleet.sim_sids()[0]
    sim.faults.script("data_sessions", [FaultResponse(delay=60.0)] * 3)
    held = [
        asyncio.create_task(get_json(http, f"{sim.url}/v1/Sims/{sid}/DataSessions"))
        for _ in range(3)
    ]
    await until(lambda: sim.stats.in_flight == 3)
    status, _, resp = await get_json(http, f"{sim.url}/v1/RatePlans/unlimited")
    assert status == 200
    assert resp.headers["Twilio-Concurrent-Requests"] == "4"
    assert float(resp.headers["Twilio-Request-Duration"]) >= 0.0
    sim.release_delayed()
    answers = await asyncio.gather(*held)
    counts = sorted(int(r.headers["Twilio-Concurrent-Requests"]) for _, _, r in answers)
    assert counts[-1] <= 3
    assert all(float(r.headers["Twilio-Request-Duration"]) >= 0.0 for _, _, r in answers)
    _, _, health = await get_json(http, f"{sim.url}/health")
    assert "Twilio-Concurrent-Requests" not in health.headers


# ------------------------------------------------------------------------------------------
# The official SDK
# ------------------------------------------------------------------------------------------


def _client(sim: RunningSimulator) -> Client:
    client = Client(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN)
    client.wireless.base_url = sim.url
    return client


async def test_sdk_lists_usage_records_and_rate_plans(fleet_sim: Pair) -> None:
    sim, _ = fleet_sim
    fleet = sim.fleet
    client = _client(sim)
    sid = fleet.sim_sids()[2]
    begin = dt.datetime.fromtimestamp(START - DAY, dt.UTC)
    end = dt.datetime.fromtimestamp(START + 2 * DAY, dt.UTC)
    records = await asyncio.to_thread(
        lambda: client.wireless.v1.sims(sid).usage_records.list(
            start=begin, end=end, granularity="hourly", page_size=25
        )
    )
    truth = fleet.usage_records(
        sid, granularity="hourly", start=begin.timestamp(), end=end.timestamp()
    )
    assert len(records) == len(truth) == 72
    for record, expected in zip(records, truth, strict=True):
        assert record.sim_sid == sid
        assert record.account_sid == DEMO_ACCOUNT_SID
        assert record.data == expected.to_api(fleet.time_format)["data"]
        assert record.period == {
            "start": format_time(expected.start),
            "end": format_time(expected.end),
        }
    account = await asyncio.to_thread(
        lambda: client.wireless.v1.usage_records.list(
            start=begin, end=end, granularity="daily", page_size=1
        )
    )
    expected_account = fleet.usage_records(
        None, granularity="daily", start=begin.timestamp(), end=end.timestamp()
    )
    assert [r.data["total"] for r in account] == [r.total for r in expected_account]
    assert len(account) == 3
    plans = await asyncio.to_thread(lambda: client.wireless.v1.rate_plans.list(page_size=2))
    assert [p.sid for p in plans] == [p.sid for p in fleet.rate_plans()]
    plan = fleet.rate_plans()[0]
    fetched = await asyncio.to_thread(
        lambda: client.wireless.v1.rate_plans(plan.unique_name).fetch()
    )
    assert fetched.sid == plan.sid
    assert fetched.data_limit == plan.data_limit
    assert fetched.national_roaming_enabled == plan.national_roaming_enabled
    assert isinstance(fetched.date_created, dt.datetime)
    with pytest.raises(TwilioException, match="20404"):
        await asyncio.to_thread(
            lambda: client.wireless.v1.sims("DE" + "0" * 32).usage_records.list()
        )


# ------------------------------------------------------------------------------------------
# Lifecycle
# ------------------------------------------------------------------------------------------


def _lifecycle_fleet(status_changes: bool = True) -> Fleet:
    return Fleet(SimClock(), sims=60, seed=4, retention=2 * DAY, status_changes=status_changes)


def test_statuses_plans_and_resets_change_over_time_and_come_back() -> None:
    fleet = _lifecycle_fleet()
    initial = {s.sid: (s.status, s.rate_plan_sid) for s in fleet}
    seen_suspended: set[str] = set()
    seen_reset: set[str] = set()
    for _ in range(24 * 30):
        fleet.clock.advance(HOUR)
        for view in fleet:
            if view.status == "suspended" and initial[view.sid][0] == "active":
                seen_suspended.add(view.sid)
            if view.reset_status == "resetting":
                seen_reset.add(view.sid)
            assert view.reset_status in (None, "resetting")
        # the listing filter follows the statuses as they are now
        assert fleet.sim_sids("suspended") == [
            s.sid for s in fleet.sims() if s.status == "suspended"
        ]
    assert len(seen_suspended) >= 3
    assert seen_reset
    moved = [s.sid for s in fleet if s.rate_plan_sid != initial[s.sid][1]]
    assert moved
    for sid in seen_suspended:
        episodes = [e for e in fleet.status_episodes(sid) if e.kind == "suspended"]
        assert episodes
        # no session starts while the SIM is suspended, none runs into a suspension
        for session in fleet.history(sid):
            for e in episodes:
                assert not e.start <= session.start < e.end
                assert session.end is None or not (session.start < e.start < session.end)
    # reactivated: a SIM suspended by its lifecycle is active again after its episode
    back = [
        sid
        for sid in seen_suspended
        if all(e.end <= fleet.clock.now() for e in fleet.status_episodes(sid))
        and fleet.sim(sid) is not None
        and fleet.sim(sid).status == "active"  # type: ignore[union-attr]
    ]
    assert back
    # scripted SIMs and SIMs that did not start active have no episodes
    assert all(
        not fleet.status_episodes(sid) for sid, (status, _) in initial.items() if status != "active"
    )


def test_the_lifecycle_is_the_same_whatever_the_steps() -> None:
    one, other = _lifecycle_fleet(), _lifecycle_fleet()
    one.clock.advance(9 * DAY)
    for _ in range(9 * 24):
        other.clock.advance(HOUR)
        list(other)
    assert [(s.status, s.rate_plan_sid, s.reset_status, s.date_updated) for s in one] == [
        (s.status, s.rate_plan_sid, s.reset_status, s.date_updated) for s in other
    ]


def test_status_changes_can_be_switched_off_and_set_by_tests() -> None:
    fleet = _lifecycle_fleet(status_changes=False)
    initial = [(s.status, s.rate_plan_sid, s.reset_status) for s in fleet]
    fleet.clock.advance(60 * DAY)
    assert [(s.status, s.rate_plan_sid, s.reset_status) for s in fleet] == initial
    sid = fleet.sim_sids("active")[0]
    assert fleet.status_episodes(sid) == []
    fleet.set_sim_rate_plan(sid, "unlimited")
    fleet.set_sim_reset_status(sid, "resetting")
    view = fleet.sim(sid)
    assert view is not None
    assert view.rate_plan_sid == fleet.rate_plans()[2].sid
    assert view.reset_status == "resetting"
    assert view.to_api("http://x")["reset_status"] == "resetting"
    fleet.set_sim_reset_status(sid, None)
    with pytest.raises(ValueError, match="rate plan"):
        fleet.set_sim_rate_plan(sid, "WP" + "0" * 32)
    with pytest.raises(ValueError, match="reset_status"):
        fleet.set_sim_reset_status(sid, "done")


async def test_sims_pages_show_the_changes(fleet_sim: Pair) -> None:
    sim, http = fleet_sim
    fleet = sim.fleet
    sid = fleet.sim_sids("active")[0]
    fleet.set_sim_reset_status(sid, "resetting")
    fleet.set_sim_status(sid, "suspended")
    items, _ = await list_all(http, f"{sim.url}/v1/Sims?Status=suspended", "sims")
    assert sid in [i["sid"] for i in items]
    one = next(i for i in items if i["sid"] == sid)
    assert one["reset_status"] == "resetting"
    validate(response_schema("/v1/Sims/{Sid}"), one)
    plan = fleet.rate_plan("tracker-50mb")
    assert plan is not None
    fleet.set_sim_rate_plan(sid, plan.sid)
    items, _ = await list_all(http, f"{sim.url}/v1/Sims?RatePlan={plan.sid}", "sims")
    assert sid in [i["sid"] for i in items]
    assert all(i["rate_plan_sid"] == plan.sid for i in items)
    _, one, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}")
    assert (one["status"], one["rate_plan_sid"]) == ("suspended", plan.sid)
    assert one["links"]["rate_plan"] == f"{sim.url}/v1/RatePlans/{plan.sid}"


# ------------------------------------------------------------------------------------------
# Wall-clock timestamps (the demo) and configuration
# ------------------------------------------------------------------------------------------


async def test_wall_time_usage_validates_and_echoes_the_requested_bounds() -> None:
    sim_start, wall_start, speed = START, 1_790_000_000.5, 60.0
    wall = [0.0]
    clock = SimClock(sim_start, speed=speed, wall=lambda: wall[0], wall_start=wall_start)
    config = SimulatorConfig(
        sims=10, seed=7, speed=speed, wall_timestamps=True, usage_lag=10.0, usage_final_after=1800
    )
    async with start_simulator(config, clock=clock) as sim, aiohttp.ClientSession() as http:
        wall[0] += 600.0
        real_now = int(wall_start + 600)
        begin = real_now - 3 * HOUR
        for path in ("/v1/UsageRecords", f"/v1/Sims/{sim.fleet.sim_sids()[0]}/UsageRecords"):
            url = f"{sim.url}{path}?Granularity=daily&Start={_q(begin)}&PageSize=1000"
            status, body, _ = await get_json(http, url)
            assert status == 200
            _validate_usage_page(body, account=path == "/v1/UsageRecords")
            records = body["usage_records"]
            assert records[0]["period"]["start"] == format_time(begin)
            assert records[-1]["period"]["end"] == format_time(real_now)
            for record in records:
                assert record["period"]["end"] <= format_time(real_now)
            # three real hours are 180 simulated ones: more than seven days of usage
            assert len(records) >= 7
        assert _bytes(records) > 0


def test_usage_settings_are_checked_and_reach_the_fleet() -> None:
    with pytest.raises(ValidationError, match="usage_final_after"):
        SimulatorConfig(usage_lag=100.0, usage_final_after=50.0)
    with pytest.raises(ValidationError, match="usage_unit"):
        SimulatorConfig(usage_unit="bits")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="usage_lag"):
        SimulatorConfig(usage_lag=-1.0)
    args = build_parser().parse_args(
        [
            "--usage-lag",
            "2h",
            "--usage-final-after",
            "1d",
            "--usage-retention",
            "40d",
            "--usage-unit",
            "kilobytes",
            "--no-status-changes",
        ]
    )
    config = config_from_args(args)
    assert (config.usage_lag, config.usage_final_after, config.usage_retention) == (
        7200.0,
        86400.0,
        40 * 86400.0,
    )
    assert config.usage_unit == "kilobytes"
    assert config.status_changes is False
    defaults = config_from_args(build_parser().parse_args([]))
    assert (defaults.usage_lag, defaults.usage_final_after) == (86400.0, 2 * 86400.0)
    assert defaults.status_changes is True


# ------------------------------------------------------------------------------------------
# Property: what is reported never goes down
# ------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=10_000),
    lag=st.sampled_from([0.0, 600.0, 3 * HOUR]),
    extra=st.sampled_from([0.0, 1800.0, 8 * HOUR]),
    steps=st.lists(st.floats(min_value=0.0, max_value=5 * HOUR), min_size=1, max_size=8),
)
def test_reported_usage_never_decreases(
    seed: int, lag: float, extra: float, steps: list[float]
) -> None:
    fleet = Fleet(
        SimClock(),
        sims=5,
        seed=seed,
        retention=6 * HOUR,
        usage_lag=lag,
        usage_final_after=lag + extra,
    )
    begin, end = START - DAY, START + 3 * DAY
    previous: dict[tuple[str | None, int], UsageView] = {}
    for step in steps:
        fleet.clock.advance(step)
        for sid in [*fleet.sim_sids(), None]:
            if sid is not None:
                fleet.listing(sid)  # let sessions age out between reads
            hourly = fleet.usage_records(sid, granularity="hourly", start=begin, end=end)
            for record in hourly:
                old = previous.get((sid, record.start))
                if old is not None:
                    b, o = record.bytes, old.bytes
                    assert b.upload >= o.upload
                    assert b.download >= o.download
                    assert b.commands_from_sim >= o.commands_from_sim
                    assert b.commands_to_sim >= o.commands_to_sim
                    for country, (up, down) in o.international_roaming.items():
                        assert b.international_roaming[country][0] >= up
                        assert b.international_roaming[country][1] >= down
                previous[(sid, record.start)] = record
            daily = fleet.usage_records(sid, granularity="daily", start=begin, end=end)
            assert sum(r.bytes.total for r in daily) == sum(r.bytes.total for r in hourly)
            final = fleet.usage_totals(sid, start=begin, end=end, final=True)
            assert sum(r.bytes.total for r in hourly) <= final.total


segments_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=5 * DAY),
        st.integers(min_value=0, max_value=3 * DAY),
        st.integers(min_value=0, max_value=10**12),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(segments=segments_strategy, cut=st.integers(min_value=0, max_value=8 * DAY))
def test_hour_series_splits_exactly(segments: list[tuple[int, int, int]], cut: int) -> None:
    """Every segment's hours add up to its total, none is negative, and taking the segments
    out again leaves nothing: the account ledger relies on all three."""
    series = HourSeries()
    lo, hi = 0, 9 * DAY
    for ta, length, total in segments:
        alone = HourSeries()
        alone.add(START + ta, START + ta + length, total)
        values = alone.values(START + lo, START + hi)
        assert sum(values) == total
        assert min(values) >= 0
        # only the hours the segment touches hold any of it
        first, last = (START + ta) // HOUR, (START + ta + max(length, 1) - 1) // HOUR
        held = [i for i, v in enumerate(values) if v]
        assert all(first <= (START + lo) // HOUR + i <= last for i in held)
        series.add(START + ta, START + ta + length, total)
    whole = series.values(START + lo, START + hi)
    assert sum(whole) == sum(total for _, _, total in segments)
    # reading a range in two parts gives the same hours
    split = floor_hour(START + cut)
    assert series.values(START + lo, split) + series.values(split, START + hi) == whole
    for ta, length, total in segments:
        series.add(START + ta, START + ta + length, total, sign=-1)
    assert not any(series.values(START + lo, START + hi))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=1000),
    steps=st.lists(st.floats(min_value=0.0, max_value=3 * DAY), min_size=1, max_size=6),
)
def test_lifecycle_does_not_depend_on_how_time_is_read(seed: int, steps: list[float]) -> None:
    walked = Fleet(SimClock(), sims=20, seed=seed)
    for step in steps:
        walked.clock.advance(step)
        list(walked)
        for sid in walked.sim_sids()[::3]:
            walked.listing(sid)
    jumped = Fleet(SimClock(), sims=20, seed=seed)
    jumped.clock.advance(walked.clock.now() - jumped.clock.now())
    assert [(s.status, s.rate_plan_sid, s.reset_status, s.date_updated) for s in walked] == [
        (s.status, s.rate_plan_sid, s.reset_status, s.date_updated) for s in jumped
    ]
    for sid in walked.sim_sids():
        assert walked.listing(sid) == jumped.listing(sid)
        assert walked.usage_totals(sid, start=START - DAY) == jumped.usage_totals(
            sid, start=START - DAY
        )
