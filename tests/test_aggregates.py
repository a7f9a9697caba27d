"""Fleet aggregates (``fleet/aggregates.py``): sums by group whose counters never go down.

The property test drives a fleet through random polls, group moves, fresh baselines and
removals, and compares every update with a reference model that knows nothing of carried
remainders: it adds to a group what each SIM's counter grew by while in it (all of a counter
that started again from zero, all of a SIM's count when it joins).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tests.harness_support import MakeHarness, eventually, exporter_mapping
from tests.metrics_support import values_by_label
from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import Config, config_from_mapping
from twilio_wireless_exporter.config.metrics import SIM_ATTRIBUTE_LABELS
from twilio_wireless_exporter.exposition.collector import build_registry
from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.formats import TEXT
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.accounting import ListingOutcome, SessionAttributes, SimAccount
from twilio_wireless_exporter.fleet.aggregates import ATTRIBUTE_LABELS, OTHER, FleetAggregates
from twilio_wireless_exporter.fleet.persist import StateIdentity, StateStore, read_state
from twilio_wireless_exporter.fleet.state import FleetState, SimRecord, SimUsage
from twilio_wireless_simulator import RunningSimulator

SIDS = [f"DE{n:032x}" for n in range(5)]
SITES = ["berlin", "paris", "rome"]
STATUSES = ["active", "suspended"]


def poll(state: FleetState, sid: str, grow: int, up: bool = True) -> None:
    """A poll of ``sid`` whose counters grew by ``grow`` (each by a different multiple); a
    failed poll changes no counter."""
    if not up:
        state.record_failure(sid, "boom", now=1.0)
        return
    acct = state.sims[sid].account
    acct.baselined = True
    acct.started_total += grow
    acct.ended_total += grow // 2
    acct.packets_uploaded_total += 3 * grow
    acct.packets_downloaded_total += 5 * grow
    acct.open_sessions = grow % 3
    record = state.sims[sid]
    if record.usage is None:
        record.usage = SimUsage()
    record.usage.ledger.upload_total += 7 * grow
    record.usage.ledger.download_total += 11 * grow
    state.record_success(sid, ListingOutcome(), now=1.0)


def counters_of(record: SimRecord) -> list[float]:
    """The session counters (0 before the baseline) and the usage counters (their own)."""
    acct = record.account
    usage = record.usage
    sessions = [
        float(acct.started_total),
        float(acct.ended_total),
        float(acct.packets_uploaded_total),
        float(acct.packets_downloaded_total),
    ]
    return [
        *(sessions if acct.baselined else [0.0] * 4),
        0.0 if usage is None else float(usage.ledger.upload_total),
        0.0 if usage is None else float(usage.ledger.download_total),
    ]


@dataclass
class Model:
    """What each group should show, from the SIMs seen at each update."""

    seen: dict[str, tuple[tuple[str, ...], list[float]]] = field(default_factory=dict)
    totals: dict[tuple[str, ...], list[float]] = field(default_factory=dict)

    def observe(self, state: FleetState) -> None:
        for sid, record in state.sims.items():
            key = (dict(record.labels)["site"], record.identity.status)
            now = counters_of(record)
            total = self.totals.setdefault(key, [0.0] * 6)
            before = self.seen.get(sid)
            for i, value in enumerate(now):
                if before is None or before[0] != key:
                    total[i] += value  # joins with all it has
                elif value >= before[1][i]:
                    total[i] += value - before[1][i]
                else:
                    total[i] += value  # started again from zero
            self.seen[sid] = (key, now)
        for sid in [sid for sid in self.seen if sid not in state.sims]:
            del self.seen[sid]  # its count stays with its group


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("poll"), st.sampled_from(SIDS), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("move"), st.sampled_from(SIDS), st.sampled_from(SITES)),
        st.tuples(st.just("status"), st.sampled_from(SIDS), st.sampled_from(STATUSES)),
        st.tuples(st.just("reset"), st.sampled_from(SIDS)),
        st.tuples(st.just("remove"), st.sampled_from(SIDS)),
        st.tuples(
            st.just("update"),
        ),
    ),
    max_size=40,
)


def apply(state: FleetState, op: tuple[object, ...], sites: dict[str, str]) -> None:
    kind, *args = op
    if kind == "update":
        return
    sid = str(args[0])
    if sid not in state.sims:  # a removed SIM comes back (rediscovered) with a fresh account
        state.ensure(sid, {"site": sites.setdefault(sid, SITES[0])})
        state.set_identity(
            sid, unique_name=None, friendly_name=None, status="active", rate_plan_sid=None
        )
    if kind == "poll":
        poll(state, sid, int(str(args[1])), up=bool(args[2]))
    elif kind == "move":
        sites[sid] = str(args[1])
        state.ensure(sid, {"site": sites[sid]})
    elif kind == "status":
        state.set_identity(
            sid, unique_name=None, friendly_name=None, status=str(args[1]), rate_plan_sid=None
        )
    elif kind == "reset":  # a fresh baseline, lower counters
        state.sims[sid].account = SimAccount()
        poll(state, sid, 1)
    elif kind == "remove":
        state.retain(s for s in state.sims if s != sid)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_counters_are_monotonic_and_match_the_model(ops: list[tuple[object, ...]]) -> None:
    state = FleetState()
    sites: dict[str, str] = {}
    aggregates = FleetAggregates(("site", "status"), max_groups=100)
    model = Model()
    previous: dict[tuple[str, ...], list[float]] = {}
    for op in [*ops, ("update",)]:
        apply(state, op, sites)
        if op[0] != "update":
            continue
        aggregates.update(state)
        model.observe(state)
        totals = {key: counters for key, counters, _ in aggregates.totals()}
        assert totals == model.totals
        for key, before in previous.items():  # no group vanishes, no counter goes down
            assert all(a >= b for a, b in zip(totals[key], before, strict=True)), key
        previous = totals
        # members' counters plus carried remainders, and gauges are the members' sums
        for key, group in aggregates.groups.items():
            members = [
                (counters_of(r), r)
                for sid, r in state.sims.items()
                if aggregates.members[sid].key == key
            ]
            sums = [sum(c[i] for c, _ in members) for i in range(6)]
            assert group.members == sums
            assert group.counters() == [c + s for c, s in zip(group.carried, sums, strict=True)]
            assert all(c >= 0 for c in group.carried)
            assert group.gauges == [
                sum(r.account.open_sessions for _, r in members if r.account.baselined),
                sum(r.up is True for _, r in members),
                sum(r.up is False for _, r in members),
            ]


def fleet(*sites: str) -> FleetState:
    state = FleetState()
    for sid, site in zip(SIDS, sites, strict=False):
        state.ensure(sid, {"site": site})
        poll(state, sid, 10)
    return state


def test_without_moves_the_aggregates_are_the_sums_of_the_sims() -> None:
    state = fleet("berlin", "berlin", "paris")
    aggregates = FleetAggregates(("site",))
    aggregates.update(state)
    assert aggregates.totals() == [
        (("berlin",), [20.0, 10.0, 60.0, 100.0, 140.0, 220.0], [2, 2, 0]),
        (("paris",), [10.0, 5.0, 30.0, 50.0, 70.0, 110.0], [1, 1, 0]),
    ]


def test_without_aggregate_by_there_is_one_group_for_the_fleet() -> None:
    state = fleet("berlin", "paris")
    aggregates = FleetAggregates(())
    aggregates.update(state)
    assert aggregates.totals() == [((), [20.0, 10.0, 60.0, 100.0, 140.0, 220.0], [2, 2, 0])]


def test_groups_beyond_the_cap_go_to_other() -> None:
    state = fleet("berlin", "paris", "rome", "oslo")
    aggregates = FleetAggregates(("site",), max_groups=2)
    aggregates.update(state)
    by_group = {key: counters[0] for key, counters, _ in aggregates.totals()}
    assert by_group == {("berlin",): 10.0, ("paris",): 10.0, (OTHER,): 20.0}
    state.ensure(SIDS[2], {"site": "berlin"})  # a SIM of other moves into a made group
    aggregates.update(state)
    by_group = {key: counters[0] for key, counters, _ in aggregates.totals()}
    assert by_group == {("berlin",): 20.0, ("paris",): 10.0, (OTHER,): 20.0}
    assert aggregates.members[SIDS[2]].key == ("berlin",)


def test_an_unknown_label_keeps_the_previous_group() -> None:
    state = fleet("berlin")
    sid = SIDS[0]
    acct = state.sims[sid].account
    acct.latest = SessionAttributes("LTE", "Telekom", "DEU", "262", "01", "")
    state.set_identity(
        sid, unique_name=None, friendly_name=None, status="active", rate_plan_sid="WP"
    )
    aggregates = FleetAggregates(("radio_link", "status"))
    aggregates.update(state)
    assert aggregates.members[sid].key == ("LTE", "active")
    acct.latest = None  # e.g. a restart: neither is known again yet
    state.set_identity(sid, unique_name=None, friendly_name=None, status=None, rate_plan_sid=None)
    aggregates.update(state)
    assert aggregates.members[sid].key == ("LTE", "active")
    assert [key for key, _, _ in aggregates.totals()] == [("LTE", "active")]


def test_restored_accounts_count_while_held() -> None:
    state = fleet("berlin")
    aggregates = FleetAggregates(("site",))
    aggregates.update(state)
    groups, members = aggregates.remembered()
    restarted = FleetState()
    restarted.ensure(SIDS[0], {"site": "berlin"})
    restarted.restore({SIDS[0]: state.sims[SIDS[0]].account}, {})
    again = FleetAggregates(("site",))
    again.restore(groups, members)
    again.update(restarted)
    assert again.totals()[0][1] == aggregates.totals()[0][1]


def test_max_groups_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_groups"):
        FleetAggregates(("site",), max_groups=0)


def test_the_attribute_labels_are_the_ones_the_config_accepts() -> None:
    assert ATTRIBUTE_LABELS == SIM_ATTRIBUTE_LABELS


# ---------------------------------------------------------------- the state file

IDENTITY = StateIdentity(base_url="http://api", account="AC" + "0" * 32)


async def saved(path: Path, state: FleetState, aggregates: FleetAggregates) -> None:
    assert await StateStore(path, IDENTITY, aggregates=aggregates).save(state, force=True)


def restarted(path: Path, by: tuple[str, ...], *sites: str) -> tuple[FleetState, FleetAggregates]:
    """A new exporter on ``path``: the SIMs configured again, the file loaded."""
    state = FleetState()
    for sid, site in zip(SIDS, sites, strict=False):
        state.ensure(sid, {"site": site})
    aggregates = FleetAggregates(by)
    registry = CollectorRegistry()
    StateStore(path, IDENTITY, registry=registry, aggregates=aggregates).load(
        state, lambda sid: sid in state.sims
    )
    return state, aggregates


def totals_of(aggregates: FleetAggregates, state: FleetState) -> dict[tuple[str, ...], list[float]]:
    aggregates.update(state)
    return {key: counters for key, counters, _ in aggregates.totals()}


async def test_a_restart_keeps_the_carried_remainders(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = fleet("berlin", "berlin", "paris")
    aggregates = FleetAggregates(("site",))
    aggregates.update(state)
    state.ensure(SIDS[1], {"site": "paris"})  # moves: berlin keeps its 10 sessions
    state.retain(SIDS[:2])  # the paris SIM goes: paris keeps its 10
    before = totals_of(aggregates, state)
    assert before == {
        ("berlin",): [20.0, 10.0, 60.0, 100.0, 140.0, 220.0],
        ("paris",): [20.0, 10.0, 60.0, 100.0, 140.0, 220.0],
    }
    await saved(path, state, aggregates)

    again, again_aggregates = restarted(path, ("site",), "berlin", "paris")
    assert totals_of(again_aggregates, again) == before  # restored accounts count while held
    for sid in SIDS[:2]:  # the first polls after the restart count on top
        again.resume(again.sims[sid])
        poll(again, sid, 1)
    after = totals_of(again_aggregates, again)
    # usage was not saved (no ledger had its baseline): each SIM's usage starts again from 0,
    # and what it had before stays with its group
    assert after == {
        ("berlin",): [21.0, 10.0, 63.0, 105.0, 147.0, 231.0],
        ("paris",): [21.0, 10.0, 63.0, 105.0, 147.0, 231.0],
    }


def test_a_sim_whose_sessions_start_afresh_keeps_its_usage_count() -> None:
    """A SIM whose session account starts a fresh baseline (its state row was rejected) still
    has its usage ledger: its data bytes are not counted as restarted, nor twice."""
    state = fleet("berlin")
    aggregates = FleetAggregates(("site",))
    assert totals_of(aggregates, state)[("berlin",)][4:] == [70.0, 110.0]
    state.sims[SIDS[0]].account = SimAccount()  # sessions afresh, usage as it was
    state.record_failure(SIDS[0], "restored without its sessions", now=1.0)
    assert totals_of(aggregates, state)[("berlin",)][4:] == [70.0, 110.0]
    poll(state, SIDS[0], 1)
    assert totals_of(aggregates, state)[("berlin",)][4:] == [77.0, 121.0]


async def test_other_groupings_in_the_file_start_afresh(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = fleet("berlin", "paris")
    aggregates = FleetAggregates(("site",))
    aggregates.update(state)
    state.retain(SIDS[:1])
    await saved(path, state, aggregates)
    again, again_aggregates = restarted(path, ("status",), "berlin")
    # only the SIM still monitored: the remainders of the other grouping are gone
    # usage is unknown until the SIM's next usage read: it contributes nothing yet
    assert totals_of(again_aggregates, again) == {("",): [10.0, 5.0, 30.0, 50.0, 0.0, 0.0]}


async def test_a_state_file_of_schema_1_is_read_without_aggregates(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = fleet("berlin")
    aggregates = FleetAggregates(("site",))
    aggregates.update(state)
    await saved(path, state, aggregates)
    with sqlite3.connect(path) as conn:  # what version 1 wrote
        conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
        conn.execute("DELETE FROM meta WHERE key='aggregate_by'")
        conn.execute("DROP TABLE aggregate_groups")
        conn.execute("DROP TABLE aggregate_members")
    conn.close()
    loaded = read_state(path, IDENTITY)
    assert list(loaded.accounts) == [SIDS[0]]
    assert loaded.aggregate_by is None
    again, again_aggregates = restarted(path, ("site",), "berlin")
    assert totals_of(again_aggregates, again) == {("berlin",): [10.0, 5.0, 30.0, 50.0, 0.0, 0.0]}


@pytest.mark.parametrize(
    ("sql", "table"),
    [
        ("UPDATE aggregate_groups SET carried='{\"x\": -1}'", "aggregate_groups"),
        ("UPDATE aggregate_groups SET key='not json'", "aggregate_groups"),
        ("UPDATE aggregate_groups SET carried='[1]'", "aggregate_groups"),
        ('UPDATE aggregate_members SET counters=\'{"x": "many"}\'', "aggregate_members"),
        ("UPDATE aggregate_members SET key='[1, 2]'", "aggregate_members"),
        ("UPDATE aggregate_members SET counters=3", "aggregate_members"),
    ],
)
async def test_a_bad_aggregate_row_costs_only_itself(tmp_path: Path, sql: str, table: str) -> None:
    path = tmp_path / "state.db"
    state = fleet("berlin", "paris")
    aggregates = FleetAggregates(("site",))
    aggregates.update(state)
    await saved(path, state, aggregates)
    with sqlite3.connect(path) as conn:
        conn.execute(sql + " WHERE rowid = 1")
    conn.close()
    loaded = read_state(path, IDENTITY)
    assert [t for t, _ in loaded.rejected] == [table]
    assert len(loaded.accounts) == 2  # the SIMs themselves are restored
    registry = CollectorRegistry()
    fresh = FleetState()
    store = StateStore(path, IDENTITY, registry=registry, aggregates=FleetAggregates(("site",)))
    store.load(fresh, lambda sid: True)
    assert (
        registry.get_sample_value("twilio_wireless_state_rows_rejected_total", {"table": table})
        == 1.0
    )


def test_steps_take_up_changes_made_between_them() -> None:
    state = fleet("berlin", "berlin", "paris", "paris", "rome")
    aggregates = FleetAggregates(("site",))
    steps = aggregates.steps(state, every=1)
    next(steps)  # one SIM taken up; now the fleet changes under the loop
    state.retain(SIDS[1:])
    state.ensure(SIDS[1], {"site": "rome"})
    poll(state, SIDS[2], 7)
    for _ in steps:
        pass
    aggregates.update(state)
    totals = {key: counters[0] for key, counters, _ in aggregates.totals()}
    # berlin keeps SIM 0's ten sessions (removed after it was taken up); SIM 1 moved to rome
    # before it was first seen, so only rome counts it
    assert totals == {("berlin",): 10.0, ("paris",): 27.0, ("rome",): 20.0}
    assert set(aggregates.members) == set(SIDS[1:])


async def test_the_exposition_refresher_keeps_the_aggregates_fresh() -> None:
    state = fleet("berlin", "paris")
    aggregates = FleetAggregates(("site",))
    registry, _ = build_registry(state, aggregates=aggregates)
    stepped: list[int] = []

    def companion() -> Iterator[None]:
        stepped.append(state.version)
        return aggregates.steps(state, every=1)

    exposition = Exposition(SimFamilies(state), registry, companions=[companion])
    clock = ManualClock()
    refresher = asyncio.ensure_future(exposition.keep_fresh(1.0, clock.sleep))
    try:
        await eventually(lambda: clock.sleepers == 1)
        assert b"fleet_sims_up" in b"".join(await exposition.render(TEXT, compress=False))
        poll(state, SIDS[0], 5)
        await clock.advance(1.0)
        await eventually(lambda: clock.sleepers == 1)
        assert stepped == [state.version]  # brought up to date between scrapes
        assert aggregates.groups[("berlin",)].members[0] == 15.0
    finally:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)


# ---------------------------------------------------------------- a whole exporter


def fleet_config(url: str, path: Path, sites: dict[str, str]) -> Config:
    mapping = exporter_mapping(
        url,
        [],
        state={"path": str(path)},
        metrics={"aggregate_by": ["site"], "per_sim": "none"},
    )
    mapping["sims"] = [{"sid": sid, "labels": {"site": site}} for sid, site in sites.items()]
    return config_from_mapping(mapping, environ={})


def started(text: str) -> dict[str, float]:
    return values_by_label(text, names.FLEET_SESSIONS_STARTED.sample, "site")


async def test_a_restarted_exporter_continues_its_aggregates(
    sim: RunningSimulator, harness: MakeHarness, tmp_path: Path
) -> None:
    path = tmp_path / "state.db"
    a, b = sim.fleet.add_sim(), sim.fleet.add_sim()
    h = await harness([], config=fleet_config(sim.url, path, {a: "berlin", b: "paris"}))
    await h.poll()  # the baselines
    for sid in (a, b, b):
        sim.fleet.open_session(sid)
    await h.poll()
    assert started(await h.scrape()) == {"berlin": 1.0, "paris": 2.0}
    await h.exporter.stop()  # the final save

    # restarted with SIM b moved to berlin: paris keeps b's two sessions, berlin gains them
    again = await harness([], config=fleet_config(sim.url, path, {a: "berlin", b: "berlin"}))
    assert started(await again.scrape()) == {"berlin": 3.0, "paris": 2.0}
    sim.fleet.open_session(b)
    await again.poll()  # counts on top of the restored accounts
    assert started(await again.scrape()) == {"berlin": 4.0, "paris": 2.0}


@pytest.mark.parametrize(("answered", "kept"), [("AC" + "1" * 32, True), ("AC" + "2" * 32, False)])
def test_remainders_of_an_unconfirmed_account_wait_for_the_api(answered: str, kept: bool) -> None:
    state = fleet("berlin", "paris")
    aggregates = FleetAggregates(("site",))
    aggregates.update(state)
    state.retain(SIDS[:1])  # paris keeps SIM 1's ten sessions as its remainder
    aggregates.update(state)
    groups, members = aggregates.remembered()

    restarted = FleetState()
    restarted.ensure(SIDS[0], {"site": "berlin"})
    restarted.restore({SIDS[0]: state.sims[SIDS[0]].account}, {})
    restarted.unverified_account = "AC" + "1" * 32  # the file's; no account configured
    again = FleetAggregates(("site",))
    again.restore(groups, members, account=restarted.unverified_account)
    again.update(restarted)
    assert again.totals() == []  # nothing shown until the API names the account
    restarted.learn_account(answered)
    again.update(restarted)
    totals = {key: counters[0] for key, counters, _ in again.totals()}
    if kept:
        assert totals == {("berlin",): 10.0, ("paris",): 10.0}
    else:  # another account's file: its SIMs start afresh, its remainders are dropped
        assert totals == {("berlin",): 0.0}
