"""Usage, plans and lifecycle end to end: the real exporter against the real simulator, every new
metric's exact value checked against the simulator's ground truth, across late revisions, a
unit change, a SIM that changes status and plan, and restarts with and without the state file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.harness_support import exporter_mapping, serving
from tests.metrics_support import find_value, sample_value
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import config_from_mapping
from twilio_wireless_exporter.fleet.usage import counting_start, period_start
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_simulator import RunningSimulator, SimulatorConfig, start_simulator

HOUR = 3600
DAY = 86400
MB = 1024 * 1024
REVISION_DAYS = 2
FACTORS = {"bytes": 1, "kilobytes": 1024, "megabytes": MB}


@dataclass
class Running:
    exporter: Exporter
    http: TestClient[Any, Any]
    clock: ManualClock

    async def scrape(self) -> str:
        resp = await self.http.get("/metrics")
        assert resp.status == 200
        return await resp.text()

    async def read_everything(self) -> None:
        """One identity refresh and one usage read of every SIM, the account and the plans."""
        assert await self.exporter.poller.refresh_sims()
        usage = self.exporter.usage_poller
        for sid in self.exporter.state.sims:
            assert await usage.read_sim(sid)
        assert await usage.read_account()
        assert await usage.read_rate_plans()


@asynccontextmanager
async def exporter_for(sim: RunningSimulator, state_path: Path) -> AsyncIterator[Running]:
    mapping = exporter_mapping(
        sim.url,
        sim.fleet.sim_sids(),
        usage={"enabled": True, "revision_days": REVISION_DAYS},
        state={"path": str(state_path)},
    )
    clock = ManualClock(sim.clock.time())
    async with serving(config_from_mapping(mapping, environ={}), clock) as (exporter, http):
        yield Running(exporter, http, clock)


def in_bytes(records: Iterable[Any], field: str) -> dict[int, int]:
    """``{bucket start: value}`` of the simulator's records as the API serves them, data in
    bytes (the unit's factor times the rounded-down amount), commands as counted."""
    commands = field.startswith("commands")
    return {r.start: getattr(r, field) * (1 if commands else FACTORS[r.units]) for r in records}


class Truth:
    """What the exporter must show, worked out from the simulator's records read at the same
    instants as the exporter's reads: counters grow by each day's growth over its largest value
    seen since the baseline, for the days the exporter follows."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str | None, str], dict[int, int]] = {}
        self.totals: dict[tuple[str | None, str], int] = {}
        self.floor: dict[str | None, int] = {}

    def read(self, sim: RunningSimulator, sid: str | None, now: float) -> None:
        granularity = "daily" if sid is not None else "hourly"
        records = sim.fleet.usage_records(
            sid, granularity=granularity, start=counting_start(now, REVISION_DAYS) - 40 * DAY
        )
        baseline = sid not in self.floor
        floor = self.floor.setdefault(sid, counting_start(now, REVISION_DAYS))
        for field in ("upload", "download", "commands_from_sim", "commands_to_sim"):
            key = (sid, field)
            seen = self.seen.setdefault(key, {})
            total = self.totals.setdefault(key, 0)
            for day, value in in_bytes(records, field).items():
                if day < floor:
                    continue
                old = seen.get(day)
                if old is None:
                    seen[day] = value
                    total += 0 if baseline else value
                elif value > old:
                    total += value - old
                    seen[day] = value
            self.totals[key] = total
        self.floor[sid] = max(floor, counting_start(now, REVISION_DAYS))
        for key in [k for k in self.seen if k[0] == sid]:
            self.seen[key] = {d: v for d, v in self.seen[key].items() if d >= self.floor[sid]}


def check_sim(text: str, sim: RunningSimulator, sid: str, truth: Truth, now: float) -> None:
    period = period_start(now, 1)
    records = sim.fleet.usage_records(sid, granularity="daily", start=period)
    expect = {
        "upload": sum(r.upload * FACTORS[r.units] for r in records),
        "download": sum(r.download * FACTORS[r.units] for r in records),
        "total": sum(r.total * FACTORS[r.units] for r in records),
    }
    name = "twilio_wireless_sim_data_period_bytes"
    for direction, value in expect.items():
        assert sample_value(text, name, sim_sid=sid, direction=direction) == value, (sid, direction)
    for direction in ("upload", "download"):
        got = sample_value(
            text, "twilio_wireless_sim_data_bytes_total", sim_sid=sid, direction=direction
        )
        assert got == truth.totals[(sid, direction)], (sid, direction)
    for field in ("from_sim", "to_sim"):
        got = sample_value(text, "twilio_wireless_sim_commands_total", sim_sid=sid, direction=field)
        assert got == truth.totals[(sid, f"commands_{field}")], (sid, field)
    start = "twilio_wireless_sim_data_period_start_timestamp_seconds"
    assert find_value(text, start, sid) == period
    view = sim.fleet.sim(sid)
    assert view is not None
    reset = "twilio_wireless_sim_connectivity_reset_in_progress"
    assert find_value(text, reset, sid) == (1.0 if view.reset_status == "resetting" else 0.0)


def check_fleet(text: str, sim: RunningSimulator, truth: Truth) -> None:
    for direction in ("upload", "download"):
        got = sample_value(text, "twilio_wireless_account_data_bytes_total", direction=direction)
        assert got == truth.totals[(None, direction)], direction
    counts: dict[tuple[str, str], int] = {}
    for view in sim.fleet:
        key = (view.status, view.rate_plan_sid or "")
        counts[key] = counts.get(key, 0) + 1
    for (status, plan_sid), count in counts.items():
        got = sample_value(text, "twilio_wireless_sims", status=status, rate_plan_sid=plan_sid)
        assert got == count, (status, plan_sid)
    for plan in sim.fleet.rate_plans():
        limits = {
            "home": plan.data_limit,
            "national_roaming": plan.national_roaming_data_limit,
            "international_roaming": plan.international_roaming_data_limit,
        }
        for network, megabytes in limits.items():
            got = find_value(
                text,
                "twilio_wireless_rate_plan_data_limit_bytes",
                rate_plan_sid=plan.sid,
                network=network,
            )
            assert got == (None if megabytes is None else megabytes * MB), (plan.sid, network)
        info = find_value(
            text,
            "twilio_wireless_rate_plan_info",
            rate_plan_sid=plan.sid,
            unique_name=plan.unique_name,
            data_enabled="true" if plan.data_enabled else "false",
            national_roaming_enabled="true" if plan.national_roaming_enabled else "false",
        )
        assert info == 1.0, plan.sid


@pytest.mark.parametrize("keep_state", [True, False], ids=["with-state", "without-state"])
async def test_usage_plans_and_lifecycle_match_the_simulator(
    tmp_path: Path, keep_state: bool
) -> None:
    config = SimulatorConfig(sims=12, seed=11, usage_lag=2 * HOUR, usage_final_after=30 * HOUR)
    async with start_simulator(config, host="127.0.0.1", port=0) as sim:
        sim.clock.advance(5 * DAY)  # days of traffic, some of it still being revised
        sids = sim.fleet.sim_sids()
        moved, suspended, kilobytes = sids[0], sids[1], sids[2]
        truth = Truth()
        state_path = tmp_path / "state.db"
        async with exporter_for(sim, state_path) as run:
            await run.read_everything()
            now = run.clock.time()
            for sid in [*sids, None]:
                truth.read(sim, sid, now)
            text = await run.scrape()
            for sid in sids:
                check_sim(text, sim, sid, truth, now)
            check_fleet(text, sim, truth)
            assert all(truth.totals[(sid, "upload")] == 0 for sid in sids)  # the baseline

            # Six hours later: revisions of yesterday, today's new hours; a SIM moves plan,
            # one is suspended, one reports in kilobytes from now on.
            sim.clock.advance(6 * HOUR)
            await run.clock.advance(6 * HOUR)
            current = sim.fleet.sim(moved)
            assert current is not None
            other = next(p for p in sim.fleet.rate_plans() if p.sid != current.rate_plan_sid)
            sim.fleet.set_sim_rate_plan(moved, other.sid)
            sim.fleet.set_sim_status(suspended, "suspended")
            sim.fleet.set_sim_unit(kilobytes, "kilobytes")
            await run.read_everything()
            now = run.clock.time()
            for sid in [*sids, None]:
                truth.read(sim, sid, now)
            text = await run.scrape()
            for sid in sids:
                check_sim(text, sim, sid, truth, now)
            check_fleet(text, sim, truth)
            assert sum(truth.totals[(sid, "download")] for sid in sids) > 0, "revisions counted"
            changes = "twilio_wireless_sim_status_changes_total"
            assert find_value(text, changes, suspended) == 1.0
            info = find_value(text, "twilio_wireless_sim_info", moved, rate_plan_sid=other.sid)
            assert info == 1.0
        # down for three hours, with or without the state file
        sim.clock.advance(3 * HOUR)
        if not keep_state:
            state_path.unlink()
            truth = Truth()
        async with exporter_for(sim, state_path) as run:
            await run.read_everything()
            now = run.clock.time()
            for sid in [*sids, None]:
                truth.read(sim, sid, now)
            text = await run.scrape()
            for sid in sids:
                check_sim(text, sim, sid, truth, now)
            check_fleet(text, sim, truth)
            changes = "twilio_wireless_sim_status_changes_total"
            assert find_value(text, changes, suspended) == (1.0 if keep_state else 0.0)
            if not keep_state:
                assert all(truth.totals[(sid, "upload")] == 0 for sid in sids)
