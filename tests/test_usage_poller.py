"""Usage reads end to end against a scripted API: exact metric values, bad records, failures,
rate plans, statuses, scheduling and restarts with and without the state file."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness_support import eventually
from tests.hostile_support import (
    SIM_A,
    SIM_B,
    ScriptedApi,
    rate_plan,
    rate_plans_page,
    sims_page,
    start_exporter,
    usage_page,
    usage_record,
)
from tests.metrics_support import find_value, sample_value

NOW = datetime(2026, 11, 21, 12, tzinfo=UTC).timestamp()
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
NOV_15 = datetime(2026, 11, 15, tzinfo=UTC).timestamp()
USAGE = {"enabled": True, "interval": "1h", "account": False, "rate_plans": False}
BYTES = "twilio_wireless_sim_data_bytes_total"
PERIOD = "twilio_wireless_sim_data_period_bytes"
COMMANDS = "twilio_wireless_sim_commands_total"
ERRORS = "twilio_wireless_poll_errors_total"
REJECTED = "twilio_wireless_api_records_rejected_total"


def period(text: str, direction: str, sim: str = SIM_A) -> float | None:
    return sample_value(text, PERIOD, sim_sid=sim, direction=direction)


def counted(text: str, name: str, direction: str, sim: str = SIM_A) -> float | None:
    return sample_value(text, name, sim_sid=sim, direction=direction)


async def test_usage_is_baselined_then_counts_growth_and_new_days() -> None:
    api = ScriptedApi()
    api.usage[SIM_A] = usage_page([usage_record(20, up=1000, down=3000)])
    async with start_exporter(api, [SIM_A], clock_start=NOW, usage=USAGE) as run:
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        text = await run.scrape()
        assert counted(text, BYTES, "upload") == 0.0
        assert counted(text, BYTES, "download") == 0.0
        assert (period(text, "upload"), period(text, "download"), period(text, "total")) == (
            1000.0,
            3000.0,
            4000.0,
        )
        assert counted(text, COMMANDS, "from_sim") == 0.0
        start = "twilio_wireless_sim_data_period_start_timestamp_seconds"
        assert find_value(text, start, SIM_A) == NOV_1
        last = "twilio_wireless_sim_usage_last_success_timestamp_seconds"
        assert find_value(text, last, SIM_A) == NOW
        assert find_value(text, "twilio_wireless_sim_up", SIM_A) is None  # sessions only

        # day 20 revised upward, day 21 appears: counted once each, commands of the new day
        api.usage[SIM_A] = usage_page(
            [usage_record(20, up=1500, down=3000), usage_record(21, up=10, down=20)]
        )
        await run.clock.advance(3600)
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        text = await run.scrape()
        assert counted(text, BYTES, "upload") == 510.0
        assert counted(text, BYTES, "download") == 20.0
        assert counted(text, COMMANDS, "from_sim") == 1.0
        assert counted(text, COMMANDS, "to_sim") == 2.0
        assert period(text, "total") == 4530.0
        # the same answer again counts nothing
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        assert counted(await run.scrape(), BYTES, "upload") == 510.0


async def test_units_are_converted_and_an_unknown_unit_rejects_that_record_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    api = ScriptedApi()
    api.usage[SIM_A] = usage_page(
        [
            usage_record(19, up=2, down=3, units="kilobytes"),
            usage_record(20, up=1, down=1, units="megabytes"),
            usage_record(21, up=5, down=5, units="parsecs"),
        ]
    )
    async with start_exporter(api, [SIM_A], clock_start=NOW, usage=USAGE) as run:
        for _ in range(2):
            assert await run.exporter.usage_poller.read_sim(SIM_A)
        text = await run.scrape()
        assert period(text, "upload") == 2 * 1024 + 1024**2
        assert period(text, "download") == 3 * 1024 + 1024**2
        assert find_value(text, REJECTED, endpoint="usage_records", reason="units") == 2.0
    logged = [r for r in caplog.records if "rejected a record (units)" in r.getMessage()]
    assert len(logged) == 1, "logged once, counted every time"


async def test_a_failed_usage_read_is_counted_and_leaves_sim_up_alone() -> None:
    api = ScriptedApi()
    api.usage[SIM_A] = b"{not json"
    async with start_exporter(api, [SIM_A], clock_start=NOW, usage=USAGE) as run:
        await run.poll()
        assert not await run.exporter.usage_poller.read_sim(SIM_A)
        text = await run.scrape()
        assert sample_value(text, ERRORS, endpoint="usage_records", kind="decode") == 1.0
        assert find_value(text, ERRORS, endpoint="data_sessions") is None
        assert find_value(text, "twilio_wireless_sim_up", SIM_A) == 1.0
        assert find_value(text, BYTES, SIM_A, direction="upload") is None  # no usage yet


async def test_the_period_start_day_of_the_fleet_and_of_one_sim() -> None:
    api = ScriptedApi()
    for sid in (SIM_A, SIM_B):
        records = [usage_record(day, up=100, down=0, sim=sid) for day in (2, 14, 15, 20)]
        api.usage[sid] = usage_page(records)
    sims = [{"sid": SIM_A}, {"sid": SIM_B, "usage_period_start_day": 15}]
    async with start_exporter(
        api, [], clock_start=NOW, usage=USAGE | {"period_start_day": 1}, sims=sims
    ) as run:
        for sid in (SIM_A, SIM_B):
            assert await run.exporter.usage_poller.read_sim(sid)
        text = await run.scrape()
        assert period(text, "upload", SIM_A) == 400.0
        assert period(text, "upload", SIM_B) == 200.0
        start = "twilio_wireless_sim_data_period_start_timestamp_seconds"
        assert find_value(text, start, SIM_B) == NOV_15
    # the request reads the period and the days still revised
    starts = sorted({p.split("Start=")[1].split("&")[0] for p in api.paths if "Start=" in p})
    assert starts == ["2026-11-01T00:00:00Z", "2026-11-15T00:00:00Z"]


async def test_roaming_split_and_billed_are_opt_in() -> None:
    api = ScriptedApi()
    record = usage_record(20, up=1000, down=3000)
    record["data"]["international_roaming"] = [
        {
            "country_code": "FR",
            "upload": 10,
            "download": 20,
            "total": 30,
            "units": "bytes",
            "billed": 0.1,
            "billing_units": "USD",
        }
    ]
    api.usage[SIM_A] = usage_page([record])
    usage = USAGE | {"roaming_split": True, "billed": True}
    async with start_exporter(api, [SIM_A], clock_start=NOW, usage=usage) as run:
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        text = await run.scrape()
    total = {"sim_sid": SIM_A, "direction": "total"}
    assert sample_value(text, PERIOD, **total, network="home") == 4000.0
    assert sample_value(text, PERIOD, **total, network="national_roaming") == 0.0
    assert sample_value(text, PERIOD, **total, network="international_roaming") == 30.0
    assert sample_value(text, PERIOD, **total) is None
    billed = "twilio_wireless_sim_data_period_billed"
    assert sample_value(text, billed, sim_sid=SIM_A, billing_units="USD") == 0.25


async def test_with_the_split_a_total_without_networks_is_shown_unsplit() -> None:
    api = ScriptedApi()
    record = usage_record(20, up=1000, down=3000)
    for network in ("home", "national_roaming", "international_roaming"):
        del record["data"][network]
    api.usage[SIM_A] = usage_page([record])
    usage = USAGE | {"roaming_split": True}
    async with start_exporter(api, [SIM_A], clock_start=NOW, usage=usage) as run:
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        text = await run.scrape()
    assert sample_value(text, PERIOD, sim_sid=SIM_A, direction="total") == 4000.0
    assert find_value(text, PERIOD, SIM_A, direction="total", network="home") is None


async def test_account_usage_and_rate_plans() -> None:
    api = ScriptedApi()
    api.account_usage = usage_page([usage_record(20, up=7, down=9, sim=None, hours=1)])
    api.rate_plans = rate_plans_page(
        [rate_plan(1), rate_plan(2, data_limit=None, national_roaming_data_limit=0)]
    )
    usage = USAGE | {"account": True, "rate_plans": True}
    async with start_exporter(api, [SIM_A], clock_start=NOW, usage=usage) as run:
        poller = run.exporter.usage_poller
        assert await poller.read_account()
        assert await poller.read_rate_plans()
        text = await run.scrape()
        account = "twilio_wireless_account_data_bytes_total"
        assert sample_value(text, account, direction="upload") == 0.0  # the baseline
        api.account_usage = usage_page(
            [
                usage_record(20, up=17, down=9, sim=None, hours=1),
                usage_record(21, up=1, down=2, sim=None, hours=1),
            ]
        )
        assert await poller.read_account()
        text = await run.scrape()
    assert sample_value(text, account, direction="upload") == 11.0
    assert sample_value(text, account, direction="download") == 2.0
    commands = "twilio_wireless_account_commands_total"
    assert sample_value(text, commands, direction="from_sim") == 1.0
    plan1 = f"WP{1:032x}"
    plan2 = f"WP{2:032x}"
    limit = "twilio_wireless_rate_plan_data_limit_bytes"
    assert sample_value(text, limit, rate_plan_sid=plan1, network="home") == 1000 * 1024**2
    assert sample_value(text, limit, rate_plan_sid=plan1, network="national_roaming") == (
        500 * 1024**2
    )
    assert find_value(text, limit, rate_plan_sid=plan2, network="home") is None
    # a limit of 0 allows none (TwilioWirelessSimRoamingNotAllowed reads it): not "no limit"
    assert sample_value(text, limit, rate_plan_sid=plan2, network="national_roaming") == 0.0
    info = {
        "rate_plan_sid": plan2,
        "unique_name": "plan-2",
        "friendly_name": "Plan 2",
        "data_metering": "payg",
        "data_enabled": "true",
        "national_roaming_enabled": "true",
    }
    assert sample_value(text, "twilio_wireless_rate_plan_info", **info) == 1.0


async def test_status_changes_and_counts_by_status_from_the_listing() -> None:
    api = ScriptedApi()
    plan = f"WP{1:032x}"
    body: dict[str, Any] = json.loads(sims_page([SIM_A, SIM_B]))
    for sim in body["sims"]:
        sim["rate_plan_sid"] = plan
    api.sims_default = json.dumps(body).encode()
    discovery = {"enabled": True, "status": "all"}
    async with start_exporter(api, [], sims=[], discovery=discovery, clock_start=NOW) as run:
        poller = run.exporter.poller
        assert await poller.refresh_sims()
        text = await run.scrape()
        assert sample_value(text, "twilio_wireless_sims", status="active", rate_plan_sid=plan) == 2
        changes = "twilio_wireless_sim_status_changes_total"
        assert find_value(text, changes, SIM_A) == 0.0
        body["sims"][0]["status"] = "suspended"
        body["sims"][1]["reset_status"] = "resetting"
        body["sims"][1]["status"] = "active"
        api.sims_default = json.dumps(body).encode()
        assert await poller.refresh_sims()
        text = await run.scrape()
    assert find_value(text, changes, SIM_A) == 1.0
    assert find_value(text, changes, SIM_B) == 0.0
    reset = "twilio_wireless_sim_connectivity_reset_in_progress"
    assert (find_value(text, reset, SIM_A), find_value(text, reset, SIM_B)) == (0.0, 1.0)
    assert sample_value(text, "twilio_wireless_sims", status="suspended", rate_plan_sid=plan) == 1
    assert sample_value(text, "twilio_wireless_sims", status="active", rate_plan_sid=plan) == 1
    # discovery.status: all lists without a Status filter
    assert all("Status=" not in p for p in api.paths if p.startswith("/v1/Sims?"))


async def test_the_scheduler_reads_every_sim_at_once_then_once_per_interval() -> None:
    api = ScriptedApi()
    sids = [f"DE{n:032x}" for n in range(40)]
    usage = USAGE | {"interval": "100s"}
    async with start_exporter(api, sids, clock_start=NOW, usage=usage) as run:
        running = asyncio.ensure_future(run.exporter.usage_poller.run())
        try:

            def reads() -> int:
                return sum(1 for p in api.paths if "/UsageRecords" in p)

            await eventually(lambda: reads() == 40)
            for _ in range(20):
                await run.clock.advance(10)
                await asyncio.sleep(0.01)
            await eventually(lambda: reads() == 80)
            text = await run.scrape()
            assert all(find_value(text, BYTES, sid, direction="upload") == 0.0 for sid in sids)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


@pytest.mark.parametrize("keep_state", [True, False])
async def test_a_restart_continues_usage_with_state_and_starts_at_zero_without(
    tmp_path: Path, keep_state: bool
) -> None:
    api = ScriptedApi()
    api.usage[SIM_A] = usage_page([usage_record(20, up=1000, down=0)])
    state = {"path": str(tmp_path / "state.db")}
    async with start_exporter(api, [SIM_A], clock_start=NOW, usage=USAGE, state=state) as run:
        await run.poll()
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        api.usage[SIM_A] = usage_page([usage_record(20, up=1600, down=0)])
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        assert counted(await run.scrape(), BYTES, "upload") == 600.0
        port = int(run.url.rsplit(":", 1)[1])
    # the exporter saved its state when it stopped; while down, day 20 grew by 100
    if not keep_state:
        (tmp_path / "state.db").unlink()
    api.usage[SIM_A] = usage_page([usage_record(20, up=1700, down=0)])
    restart = start_exporter(api, [SIM_A], clock_start=NOW, port=port, usage=USAGE, state=state)
    async with restart as run:
        text = await run.scrape()
        assert find_value(text, BYTES, SIM_A, direction="upload") is None  # held until read
        assert await run.exporter.usage_poller.read_sim(SIM_A)
        text = await run.scrape()
    assert counted(text, BYTES, "upload") == (700.0 if keep_state else 0.0)


async def test_a_sim_that_left_is_forgotten_by_the_usage_poller() -> None:
    """What the poller notes per SIM (failing reads, rejections logged) goes with the SIM:
    with discovery churning SIMs for months, it would otherwise only ever grow."""
    api = ScriptedApi()
    api.usage[SIM_A] = usage_page([usage_record(21, up=5, down=5, units="parsecs")])
    api.usage[SIM_B] = b"{not json"
    usage = USAGE | {"interval": "100s"}
    async with start_exporter(api, [SIM_A, SIM_B], clock_start=NOW, usage=usage) as run:
        poller = run.exporter.usage_poller
        running = asyncio.ensure_future(poller.run())
        try:
            await eventually(lambda: len(poller._rejects_logged) == 1 and len(poller._failing) == 1)
            run.exporter.state.retain([])
            for _ in range(25):  # past every SIM's next slot
                await run.clock.advance(10)
                await asyncio.sleep(0.01)
            await eventually(lambda: not poller._rejects_logged and not poller._failing)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
