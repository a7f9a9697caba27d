"""Persistent state: round trips, bad files, atomic saves, and restarts (in process and SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import sqlite3
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fleet_support import Model, histories
from tests.harness_support import eventually, exporter_mapping
from tests.metrics_support import sample_value as value
from tests.process_support import listen_url
from twilio_wireless_exporter.api.records import DataSession
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import Config, ConfigError, config_from_mapping
from twilio_wireless_exporter.fleet import persist
from twilio_wireless_exporter.fleet.accounting import (
    ListingOutcome,
    SessionAttributes,
    SessionMemo,
    SimAccount,
    apply_listing,
)
from twilio_wireless_exporter.fleet.persist import (
    SCHEMA_VERSION,
    DurationRow,
    SessionRow,
    SimRow,
    StateFileError,
    StateIdentity,
    StateStore,
    StateUnreadableError,
    read_state,
    snapshot,
    state_identity,
    temp_path,
    write_state,
)
from twilio_wireless_exporter.fleet.state import SESSION_DURATION_BUCKETS, FleetState, Histogram
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_simulator import (
    FaultResponse,
    RunningSimulator,
    SessionView,
    SimulatorConfig,
    start_simulator,
)

IDENTITY = StateIdentity("http://127.0.0.1:1", "AC" + "1" * 32)
SID = "DE" + "a" * 32
HOUR = 3600.0


def sim_sid(i: int) -> str:
    return f"DE{i:032x}"


# ------------------------------------------------------------------------------ helpers


def account(i: int, sessions: int = 3) -> SimAccount:
    """A varied, baselined account (every optional field both set and unset across ``i``)."""
    acct = SimAccount(
        baselined=True,
        started_total=10 * i + 1,
        ended_total=10 * i,
        packets_uploaded_total=1_000_003 * i,
        packets_downloaded_total=2**40 + i,
        imei_changes_total=i % 3,
        open_sessions=i % 2,
        latest=None
        if i % 4 == 0
        else SessionAttributes(
            "LTE-M", 'Telekom "DE"\n', "DEU", "262", "01", "35693803564380" + str(i % 10)
        ),
        latest_start=None if i % 4 == 0 else 1_767_225_600.0 + i,
        location=None if i % 3 == 0 else (52.5 + i / 1000, -13.25),
        location_start=None if i % 3 == 0 else 1_767_225_000.0,
        last_updated=None if i % 5 == 0 else 1_767_225_601.5,
        last_imei=None if i % 4 == 0 else "356938035643809",
    )
    for j in range(sessions):
        acct.sessions[f"WN{i:016x}{j:016x}"] = SessionMemo(j * 7, j * 11, j % 2 == 1, j % 3)
    return acct


def fleet_state(n: int, sessions: int = 3) -> FleetState:
    state = FleetState()
    for i in range(n):
        record = state.ensure(sim_sid(i))
        record.account = account(i, sessions)
        record.last_success = 1_767_225_700.0 + i
    hist = state.durations["LTE"] = Histogram(SESSION_DURATION_BUCKETS)
    for seconds in (30.0, 61.0, 3600.0, 10 * 86400.0):
        hist.observe(seconds)
    state.durations[""] = Histogram(SESSION_DURATION_BUCKETS)
    state.durations[""].observe(90.5)
    return state


def fresh_state(sids: list[str]) -> FleetState:
    state = FleetState()
    for sid in sids:
        state.ensure(sid)
    return state


def save(state: FleetState, path: Path, identity: StateIdentity = IDENTITY) -> None:
    write_state(path, snapshot(state), identity, 1_767_230_000.0)


def counters(text: str, sid: str) -> tuple[float | None, ...]:
    return tuple(
        value(text, f"twilio_wireless_sim_{name}", sim_sid=sid)
        for name in (
            "data_sessions_started_total",
            "data_sessions_ended_total",
            "packets_uploaded_total",
            "packets_downloaded_total",
        )
    )


def truth(
    sim: RunningSimulator, sid: str, baseline: dict[str, SessionView]
) -> tuple[int, int, int, int]:
    """(started, ended, packets up, packets down) the exporter must count for ``sid``.

    ``baseline``: the SIM's listing at its first successful poll. Nothing ages out in these
    tests, so every session the simulator ever created was listed at some successful poll.
    """
    started = ended = up = down = 0
    for s in sim.fleet.history(sid):
        before = baseline.get(s.sid)
        if before is None:
            started += 1
            up += s.packets_uploaded
            down += s.packets_downloaded
            ended += s.end is not None
        else:
            up += s.packets_uploaded - before.packets_uploaded
            down += s.packets_downloaded - before.packets_downloaded
            ended += s.end is not None and before.end is None
    return started, ended, up, down


def listing(sim: RunningSimulator, sid: str) -> dict[str, SessionView]:
    return {s.sid: s for s in sim.fleet.listing(sid)}


# ------------------------------------------------------------------------------ round trips


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    state = fleet_state(12)
    path = tmp_path / "state.db"
    save(state, path)
    loaded = read_state(path, IDENTITY)
    assert loaded.accounts == {sid: r.account for sid, r in state.sims.items()}
    assert loaded.last_success == {sid: r.last_success for sid, r in state.sims.items()}
    assert loaded.durations == state.durations
    assert loaded.saved_at == 1_767_230_000.0
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not temp_path(path).exists()


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_maybe_time = st.none() | st.floats(0, 4e9, allow_nan=False)
_count = st.integers(0, 2**62)


@st.composite
def accounts(draw: st.DrawFn) -> SimAccount:
    latest = draw(
        st.none() | st.builds(SessionAttributes, _text, _text, _text, _text, _text, _text)
    )
    sessions = draw(
        st.dictionaries(
            st.text("WN0123456789abcdef", min_size=1, max_size=34),
            st.builds(SessionMemo, _count, _count, st.booleans(), st.integers(0, 5)),
            max_size=6,
        )
    )
    return SimAccount(
        baselined=True,
        sessions=sessions,
        started_total=draw(_count),
        ended_total=draw(_count),
        packets_uploaded_total=draw(_count),
        packets_downloaded_total=draw(_count),
        imei_changes_total=draw(_count),
        open_sessions=draw(st.integers(0, 1000)),
        latest=latest,
        latest_start=draw(_maybe_time),
        location=draw(
            st.none() | st.tuples(st.floats(-90, 90), st.floats(-180, 180, allow_subnormal=False))
        ),
        location_start=draw(_maybe_time),
        last_updated=draw(_maybe_time),
        last_imei=draw(st.none() | _text),
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(accounts(), max_size=5), st.lists(st.floats(0, 1e7), max_size=20))
def test_round_trip_property(accts: list[SimAccount], durations: list[float]) -> None:
    state = FleetState()
    for i, acct in enumerate(accts):
        state.ensure(sim_sid(i)).account = acct
    hist = state.durations["NB-IoT"] = Histogram(SESSION_DURATION_BUCKETS)
    for seconds in durations:
        hist.observe(seconds)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        save(state, path)
        loaded = read_state(path, IDENTITY)
    assert loaded.accounts == {sid: r.account for sid, r in state.sims.items()}
    assert loaded.durations == state.durations


@settings(max_examples=150, deadline=None)
@given(histories(), st.integers(0, 8))
def test_a_restart_between_any_two_listings_changes_nothing(
    case: tuple[list[list[DataSession]], Model], cut: int
) -> None:
    """Listings applied straight through, or with a save and restore after any of them: the same
    account (counters, remembered sessions with their absence counts, attributes)."""
    listings, _ = case
    cut = min(cut, len(listings))
    straight = SimAccount()
    for listing in listings:
        apply_listing(straight, listing)

    before = fresh_state([SID])
    for listing in listings[:cut]:
        apply_listing(before.sims[SID].account, listing)
    after = fresh_state([SID])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        save(before, path)
        StateStore(path, IDENTITY).load(after, keep=lambda sid: True)
    record = after.sims[SID]
    for listing in listings[cut:]:
        apply_listing(after.resume(record), listing)
    assert after.restored.get(SID, record.account) == straight  # still held if nothing came


def test_sims_no_longer_monitored_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    save(fleet_state(6), path)
    state = fresh_state([sim_sid(1), sim_sid(4), sim_sid(9)])
    store = StateStore(path, IDENTITY)
    loaded = store.load(state, keep=lambda sid: sid in state.sims)
    assert loaded is not None
    assert set(state.restored) == {sim_sid(1), sim_sid(4)}
    assert state.restored[sim_sid(4)] == account(4)
    assert state.sims[sim_sid(4)].last_success == 1_767_225_704.0
    assert state.sims[sim_sid(9)].last_success is None


def test_unbaselined_sims_are_not_saved(tmp_path: Path) -> None:
    state = fleet_state(2)
    state.ensure(sim_sid(7))  # never polled successfully: nothing to keep
    path = tmp_path / "state.db"
    save(state, path)
    assert set(read_state(path, IDENTITY).accounts) == {sim_sid(0), sim_sid(1)}


# ------------------------------------------------------------------------------ held restore


def test_restored_state_is_held_until_each_sim_is_polled() -> None:
    state = fresh_state([sim_sid(0), sim_sid(1)])
    hist = Histogram(SESSION_DURATION_BUCKETS)
    hist.observe(100.0)
    state.restore({sim_sid(0): account(1), sim_sid(1): account(2)}, {"LTE": hist})
    assert state.durations == {}  # out of sight while SIMs still have to be polled
    assert not state.sims[sim_sid(0)].account.baselined  # counters not shown yet
    # a snapshot still holds the restored accounts and histogram
    snap = snapshot(state)
    assert [row[0] for row in snap.sims] == [sim_sid(0), sim_sid(1)]
    assert snap.durations[0][0] == "LTE"

    record = state.sims[sim_sid(0)]
    assert state.resume(record) is record.account
    assert record.account == account(1)
    assert sim_sid(0) not in state.restored
    state.record_success(sim_sid(0), ListingOutcome(durations=[("LTE", 5.0)]), 1.0)
    assert state.durations == {}
    # a failed poll of the other SIM releases the histogram but keeps its account held
    state.record_failure(sim_sid(1), "boom", 2.0)
    assert state.durations["LTE"].count == 2
    assert sim_sid(1) in state.restored
    assert not state.sims[sim_sid(1)].account.baselined


def test_retain_drops_restored_sims_that_left() -> None:
    state = fresh_state([sim_sid(0)])
    state.restore({sim_sid(0): account(1), sim_sid(5): account(5)}, {})
    state.resume(state.sims[sim_sid(0)])
    state.record_success(sim_sid(0), ListingOutcome(), 1.0)
    assert sim_sid(5) in state.restored  # e.g. waiting for discovery
    state.retain([sim_sid(0)])
    assert state.restored == {}


# ------------------------------------------------------------------------------ bad files


def _valid(path: Path) -> None:
    save(fleet_state(3), path)


def _sql(path: Path, *statements: str) -> None:
    _valid(path)
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _truncated(path: Path) -> None:
    save(fleet_state(400, sessions=6), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbled(path: Path) -> None:
    save(fleet_state(400, sessions=6), path)
    data = bytearray(path.read_bytes())
    rng = random.Random(3)
    for _ in range(400):
        data[rng.randrange(100, len(data))] = rng.randrange(256)
    path.write_bytes(bytes(data))


def _other_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE songs (title TEXT)")
    conn.commit()
    conn.close()


BAD_FILES = [
    pytest.param(lambda p: p.write_bytes(b""), "the file is empty", id="empty"),
    pytest.param(
        lambda p: p.write_text('{"sims": []}\n'), "not a readable state database", id="json"
    ),
    pytest.param(
        lambda p: p.write_bytes(random.Random(1).randbytes(5000)),
        "not a readable state database",
        id="random-bytes",
    ),
    pytest.param(_truncated, "", id="truncated"),
    pytest.param(_garbled, "", id="garbled"),
    pytest.param(_other_database, "no meta table", id="other-database"),
    pytest.param(
        lambda p: _sql(p, "UPDATE meta SET value='someone-else' WHERE key='application'"),
        "not a state file of this exporter",
        id="other-application",
    ),
    pytest.param(
        lambda p: _sql(p, "UPDATE meta SET value='https://wireless.example' WHERE key='base_url'"),
        "belongs to another API or account",
        id="foreign-api",
    ),
    pytest.param(
        lambda p: _sql(
            p, "UPDATE meta SET value='AC" + "9" * 32 + "' WHERE key IN ('account', 'account_sid')"
        ),
        "belongs to another API or account",
        id="foreign-account",
    ),
    pytest.param(
        lambda p: _sql(
            p,
            f"UPDATE meta SET value='{SCHEMA_VERSION + 1}' WHERE key='schema_version'",
            "UPDATE meta SET value='9.9.9' WHERE key='exporter_version'",
        ),
        f"written by a newer exporter (9.9.9, schema {SCHEMA_VERSION + 1};",
        id="newer-schema",
    ),
    pytest.param(
        lambda p: _sql(p, "UPDATE meta SET value='0' WHERE key='schema_version'"),
        "schema 0 is too old",
        id="older-schema",
    ),
    pytest.param(
        lambda p: _sql(p, "UPDATE meta SET value='x1' WHERE key='schema_version'"),
        "unknown schema version 'x1'",
        id="bad-schema-version",
    ),
    pytest.param(
        lambda p: _sql(p, "DROP TABLE sessions"),
        "not a readable state database (no such table: sessions)",
        id="missing-table",
    ),
    pytest.param(
        lambda p: _sql(p, "ALTER TABLE sims ADD COLUMN extra INTEGER"),
        "bad sims row",
        id="extra-column",
    ),
]


@pytest.mark.parametrize(("spoil", "reason"), BAD_FILES)
def test_bad_files_give_a_warning_and_a_fresh_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: Any, reason: str
) -> None:
    path = tmp_path / "state.db"
    spoil(path)
    spoiled = path.read_bytes()
    with pytest.raises(StateFileError, match=None) as info:
        read_state(path, IDENTITY)
    assert reason in str(info.value)

    state = fresh_state([sim_sid(i) for i in range(3)])
    store = StateStore(path, IDENTITY)
    with caplog.at_level(logging.WARNING, logger="twilio_wireless_exporter.fleet.persist"):
        assert store.load(state, keep=lambda sid: True) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"ignoring state file {path}: ")
    assert reason in warnings[0]
    assert "starting fresh" in warnings[0]
    assert f"it was moved to {path}.rejected" in warnings[0]
    assert state.restored == {}
    assert not path.exists()
    assert (tmp_path / "state.db.rejected").read_bytes() == spoiled  # kept for inspection

    # and the next save writes a good file again
    asyncio.run(store.save(fleet_state(2)))
    assert set(read_state(path, IDENTITY).accounts) == {sim_sid(0), sim_sid(1)}


FIRST = sim_sid(0)
ONE_SIM = f"WHERE sid='{FIRST}'"
ITS_SESSIONS = f"WHERE sim_sid='{FIRST}'"

BAD_ROWS = [
    pytest.param(
        f"UPDATE sims SET started_total='many' {ONE_SIM}",
        "sims",
        "bad started_total: 'many'",
        id="text-in-counter",
    ),
    pytest.param(
        f"UPDATE sims SET packets_uploaded_total=-5 {ONE_SIM}",
        "sims",
        "bad packets_uploaded_total: -5",
        id="negative-counter",
    ),
    pytest.param(
        f"UPDATE sims SET ended_total=2.5 {ONE_SIM}",
        "sims",
        "bad ended_total: 2.5",
        id="fraction-in-counter",
    ),
    pytest.param(
        f"UPDATE sessions SET ended=2.5 {ITS_SESSIONS}",
        "sessions",
        "bad ended: 2.5",
        id="float-flag",
    ),
    pytest.param(
        f"UPDATE sessions SET packets_uploaded=-1 {ITS_SESSIONS}",
        "sessions",
        "bad packets_uploaded: -1",
        id="negative-session-packets",
    ),
    pytest.param(
        f"UPDATE sims SET latitude='north' {ONE_SIM}",
        "sims",
        "bad latitude: 'north'",
        id="text-in-location",
    ),
    pytest.param(
        f"UPDATE sims SET latitude=91 {ONE_SIM}",
        "sims",
        "bad latitude: 91.0",
        id="latitude-off-the-globe",
    ),
    pytest.param(
        f"UPDATE sims SET latest_start=1e300 {ONE_SIM}",
        "sims",
        "bad latest_start: 1e+300",
        id="time-beyond-year-9999",
    ),
    pytest.param(
        f"UPDATE sims SET latest_operator_name=X'00ff' {ONE_SIM}",
        "sims",
        "bad latest_operator_name: b'\\x00\\xff'",
        id="blob-in-attribute",
    ),
    pytest.param(
        f"UPDATE sessions SET sid='' {ITS_SESSIONS}",
        "sessions",
        "bad sid: ''",
        id="empty-session-sid",
    ),
]


@pytest.mark.parametrize(("statement", "table", "reason"), BAD_ROWS)
def test_a_bad_row_costs_only_its_sim(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, statement: str, table: str, reason: str
) -> None:
    """The SIM of a bad row starts a fresh baseline; every other SIM and the file are kept."""
    from prometheus_client import CollectorRegistry

    path = tmp_path / "state.db"
    _sql(path, statement)
    loaded = read_state(path, IDENTITY)
    expected = fleet_state(3)
    assert loaded.accounts == {sid: r.account for sid, r in expected.sims.items() if sid != FIRST}
    assert [(t, why.split(" in table ")[0]) for t, why in loaded.rejected] == [(table, reason)]
    assert f"SIM {FIRST} starts a fresh baseline" in loaded.rejected[0][1]

    registry = CollectorRegistry()
    state = fresh_state([sim_sid(i) for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="twilio_wireless_exporter.fleet.persist"):
        assert StateStore(path, IDENTITY, registry=registry).load(state, keep=lambda s: True)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"state file {path}: ignoring a row of table {table}: {reason}")
    assert set(state.restored) == {sim_sid(1), sim_sid(2)}
    assert path.exists()
    assert not (tmp_path / "state.db.rejected").exists()
    rejected = "twilio_wireless_state_rows_rejected_total"
    assert registry.get_sample_value(rejected, {"table": table}) == 1
    assert (
        sum(
            registry.get_sample_value(rejected, {"table": t}) or 0
            for t in ("sims", "sessions", "durations")
        )
        == 1
    )


BAD_HISTOGRAMS = [
    pytest.param(
        "UPDATE durations SET counts='[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1]'",
        "bad duration histogram",
        id="negative-bucket",
    ),
    pytest.param(
        "UPDATE durations SET counts='[1, 2]'", "bad duration histogram", id="too-few-buckets"
    ),
    pytest.param(
        "UPDATE durations SET total='long'", "bad total: 'long'", id="text-in-histogram-sum"
    ),
    pytest.param(
        "UPDATE durations SET count=count+1",
        "inconsistent duration histogram",
        id="inconsistent-histogram",
    ),
    pytest.param(
        "UPDATE durations SET counts='[1, 2'", "bad duration histogram", id="bad-histogram-json"
    ),
]


@pytest.mark.parametrize(("statement", "reason"), BAD_HISTOGRAMS)
def test_a_bad_histogram_row_starts_that_histogram_afresh(
    tmp_path: Path, statement: str, reason: str
) -> None:
    path = tmp_path / "state.db"
    _sql(path, statement + " WHERE radio_link='LTE'")
    loaded = read_state(path, IDENTITY)
    assert set(loaded.durations) == {""}  # the other histogram is kept
    assert len(loaded.accounts) == 3
    [(table, why)] = loaded.rejected
    assert table == "durations"
    assert reason in why


def test_a_whole_file_of_bad_rows_still_restores_the_good_ones(tmp_path: Path) -> None:
    """Before: one bad session row (packets_uploaded -1) made the whole file rejected."""
    path = tmp_path / "state.db"
    save(fleet_state(50), path)
    bad = [sim_sid(i) for i in range(0, 50, 7)]
    conn = sqlite3.connect(path)
    conn.executemany("UPDATE sessions SET packets_uploaded=-1 WHERE sim_sid=?", [(s,) for s in bad])
    conn.commit()
    conn.close()
    loaded = read_state(path, IDENTITY)
    assert set(loaded.accounts) == {sim_sid(i) for i in range(50)} - set(bad)
    assert len(loaded.rejected) == len(bad)


HOSTILE_CELLS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.none(),
)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 7),
            st.sampled_from(["sims", "sessions"]),
            st.integers(0, 20),
            HOSTILE_CELLS,
        ),
        max_size=6,
    )
)
def test_hostile_cells_cost_at_most_their_own_sim(
    spoils: list[tuple[int, str, int, object]],
) -> None:
    """Whatever lands in a cell, loading never fails and every SIM not touched is restored
    exactly; a touched SIM is restored or reported as rejected, nothing in between."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "state.db"
        state = fleet_state(8)
        save(state, path)
        touched: set[str] = set()
        conn = sqlite3.connect(path)
        for sim, table, column, cell in spoils:
            sid = sim_sid(sim)
            names = SimRow.__struct_fields__ if table == "sims" else SessionRow.__struct_fields__
            name = names[1 + column % (len(names) - 1)]  # never the key column
            where = "sid" if table == "sims" else "sim_sid"
            try:
                conn.execute(f"UPDATE {table} SET {name}=? WHERE {where}=?", (cell, sid))
            except sqlite3.IntegrityError:
                continue  # NOT NULL: the schema itself refuses it
            touched.add(sid)
        conn.commit()
        conn.close()
        loaded = read_state(path, IDENTITY)
    rejected = {why.split("; SIM ")[1].split(" ")[0] for _, why in loaded.rejected}
    for sid, record in state.sims.items():
        if sid not in touched:
            assert loaded.accounts[sid] == record.account
        else:
            assert (sid in loaded.accounts) != (sid in rejected)


COUNTS = st.one_of(
    st.integers(0, 2**63 - 1),
    st.integers(2**63, 2**90),
    st.integers(-(2**70), -1),
    st.just(10**400),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(COUNTS, COUNTS), min_size=1, max_size=6))
def test_a_save_never_fails_whatever_the_counters_hold(counts: list[tuple[int, int]]) -> None:
    """Counters beyond int64 are saved as the floats /metrics shows; a SIM holding a negative
    count or a number beyond any float is left out; every other SIM is saved exactly."""
    state = FleetState()
    for i, (total, memo) in enumerate(counts):
        acct = state.ensure(sim_sid(i)).account
        acct.baselined = True
        acct.packets_uploaded_total = total
        acct.sessions["WN" + "0" * 32] = SessionMemo(memo, 0, False, 0)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "state.db"
        store = StateStore(path, IDENTITY)
        assert asyncio.run(store.save(state))
        loaded = read_state(path, IDENTITY).accounts
    for i, (total, memo) in enumerate(counts):
        sid = sim_sid(i)
        storable = all(v >= 0 and math.isfinite(float(min(v, 10**300))) for v in (total, memo))
        storable = storable and total < 10**308 and memo < 10**308
        if not storable:
            assert sid not in loaded
            assert sid in store.unsaved
            continue
        got = loaded[sid]
        assert float(got.packets_uploaded_total) == float(total)
        assert float(got.sessions["WN" + "0" * 32].packets_uploaded) == float(memo)
        if total <= 2**63 - 1 and memo <= 2**63 - 1:
            assert got == state.sims[sid].account


def test_the_row_types_declare_the_columns_of_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _valid(path)
    conn = sqlite3.connect(path)
    try:
        for table, row_type in (
            ("sims", SimRow),
            ("sessions", SessionRow),
            ("durations", DurationRow),
        ):
            columns = [info[1] for info in conn.execute(f"PRAGMA table_info({table})")]
            assert columns == list(row_type.__struct_fields__)
    finally:
        conn.close()


def test_histogram_with_other_buckets_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _sql(path, "UPDATE durations SET bounds='[1.0, 2.0]', counts='[0, 0, 0]', count=0")
    loaded = read_state(path, IDENTITY)
    assert loaded.durations == {}
    assert len(loaded.accounts) == 3


def test_no_file_is_a_quiet_fresh_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path / "state.db", IDENTITY)
    with caplog.at_level(logging.INFO, logger="twilio_wireless_exporter.fleet.persist"):
        assert store.load(FleetState(), keep=lambda sid: True) is None
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "no state file" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------ atomic saves


def test_a_failed_save_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    save(fleet_state(2), path)
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    store = StateStore(path, IDENTITY, registry=registry)
    with caplog.at_level(logging.WARNING, logger="twilio_wireless_exporter.fleet.persist"):
        assert asyncio.run(store.save(fleet_state(5))) is False
    assert path.read_bytes() == before
    assert not temp_path(path).exists()
    assert f"cannot save state to {path}: [Errno 28] No space left on device" in caplog.text
    assert registry.get_sample_value("twilio_wireless_state_save_errors_total") == 1.0
    assert registry.get_sample_value("twilio_wireless_state_last_save_timestamp_seconds") == 0.0


def test_values_sqlite_cannot_hold_never_fail_a_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: one counter at 2**63 made every save fail, so no state was ever written.

    Now a counter beyond int64 is saved as the float Prometheus shows (and read back as that
    whole number), and a SIM holding what no state file may hold (a negative count, a number
    beyond any float, text that is not Unicode) keeps its previously saved rows; nothing else
    is lost and no shown counter goes down after a restart."""
    from prometheus_client import CollectorRegistry

    path = tmp_path / "state.db"
    registry = CollectorRegistry()
    store = StateStore(path, IDENTITY, registry=registry)
    state = fleet_state(6)
    assert asyncio.run(store.save(state))
    accounts = {sid: r.account for sid, r in state.sims.items()}
    before = {sid: read_state(path, IDENTITY).accounts[sid] for sid in accounts}

    big = 2**63 + 12_345
    accounts[sim_sid(0)].packets_uploaded_total = big
    memo = next(iter(accounts[sim_sid(1)].sessions.values()))
    memo.packets_uploaded = -1
    accounts[sim_sid(1)].started_total += 1
    accounts[sim_sid(2)].packets_downloaded_total = 10**310
    accounts[sim_sid(3)].last_imei = "\ud800"
    accounts[sim_sid(4)].started_total += 7
    with caplog.at_level(logging.WARNING, logger="twilio_wireless_exporter.fleet.persist"):
        assert asyncio.run(store.save(state))
        assert asyncio.run(store.save(state, force=True))  # logged once per SIM
    loaded = read_state(path, IDENTITY).accounts
    assert loaded[sim_sid(0)].packets_uploaded_total == int(float(big))
    assert float(loaded[sim_sid(0)].packets_uploaded_total) == float(big)  # as shown
    for kept in (1, 2, 3):  # their rows of the previous save
        assert loaded[sim_sid(kept)] == before[sim_sid(kept)]
    assert loaded[sim_sid(4)] == accounts[sim_sid(4)]
    assert loaded[sim_sid(5)] == accounts[sim_sid(5)]
    assert set(store.unsaved) == {sim_sid(1), sim_sid(2), sim_sid(3)}
    assert registry.get_sample_value("twilio_wireless_state_unsaved_sims") == 3
    assert registry.get_sample_value("twilio_wireless_state_save_errors_total") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert any("the negative count -1" in w for w in warnings)
    assert any("a number of 311 digits" in w for w in warnings)
    assert any("text that is not valid Unicode" in w for w in warnings)

    # the SIM's values heal: it is saved again, and the gauge goes back to 0
    memo.packets_uploaded = 3
    accounts[sim_sid(2)].packets_downloaded_total = 5
    accounts[sim_sid(3)].last_imei = None
    accounts[sim_sid(0)].packets_uploaded_total = int(float(big))  # as written and shown
    assert asyncio.run(store.save(state, force=True))
    assert read_state(path, IDENTITY).accounts == accounts
    assert registry.get_sample_value("twilio_wireless_state_unsaved_sims") == 0


def test_the_first_save_leaves_out_only_the_sims_it_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = fleet_state(3)
    state.sims[sim_sid(1)].account.packets_uploaded_total = -3
    store = StateStore(path, IDENTITY)
    assert asyncio.run(store.save(state))
    assert set(read_state(path, IDENTITY).accounts) == {sim_sid(0), sim_sid(2)}
    assert store.unsaved == {sim_sid(1): "a negative count"}


def test_a_stale_temp_file_from_a_crash_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    temp_path(path).write_bytes(b"half a database")
    save(fleet_state(2), path)
    assert not temp_path(path).exists()
    assert len(read_state(path, IDENTITY).accounts) == 2


def test_saves_are_skipped_when_nothing_changed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = fleet_state(2)
    store = StateStore(path, IDENTITY)

    async def scenario() -> None:
        assert await store.save(state)
        mtime = path.stat().st_mtime_ns
        path.unlink()
        assert await store.save(state)  # unchanged: no write
        assert not path.exists()
        state.ensure(sim_sid(9))
        assert await store.save(state)
        assert path.stat().st_mtime_ns >= mtime

    asyncio.run(scenario())


_KILL_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from twilio_wireless_exporter.fleet.accounting import SessionMemo
    from twilio_wireless_exporter.fleet.persist import StateIdentity, snapshot, write_state
    from twilio_wireless_exporter.fleet.state import FleetState

    path = Path(sys.argv[1])
    ident = StateIdentity("http://127.0.0.1:1", "AC" + "1" * 32)
    state = FleetState()
    for i in range(3000):
        state.ensure(f"DE{i:032x}").account.baselined = True
    generation = 0
    while True:
        generation += 1
        for record in state.sims.values():
            record.account.started_total = generation
            record.account.sessions = {
                f"WN{generation:016x}{j:016x}": SessionMemo(generation, j, False)
                for j in range(generation % 7 + 1)
            }
        write_state(path, snapshot(state), ident, time.time())
        print(generation, flush=True)
    """
)


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_whole_old_or_new_file(tmp_path: Path) -> None:
    """A writer saving 3,000 SIMs in a loop is killed at random moments; the file is always whole."""
    import subprocess

    path = tmp_path / "state.db"
    rng = random.Random(5)
    generations: list[int] = []
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_WRITER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # at least one save finished
        assert first.strip().isdigit()
        time.sleep(rng.uniform(0.0, 0.5))  # bounded: a random moment inside later saves
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        loaded = read_state(path, IDENTITY)
        started = {a.started_total for a in loaded.accounts.values()}
        assert len(loaded.accounts) == 3000
        assert len(started) == 1  # one generation, never a mix
        (generation,) = started
        assert all(len(a.sessions) == generation % 7 + 1 for a in loaded.accounts.values())
        assert all(
            {m.packets_uploaded for m in a.sessions.values()} == {generation}
            for a in loaded.accounts.values()
        )
        generations.append(generation)
    assert len(set(generations)) > 1  # the kills really landed at different moments


# ------------------------------------------------------------------------------ 10k SIMs


@pytest.mark.slow
def test_save_and_load_of_10k_sims_are_cheap(tmp_path: Path) -> None:
    state = fleet_state(10_000, sessions=5)
    path = tmp_path / "state.db"
    store = StateStore(path, IDENTITY)
    started = time.perf_counter()
    snap = snapshot(state)
    snapshot_seconds = time.perf_counter() - started
    assert asyncio.run(store.save(state))
    save_seconds = store.last_duration
    assert save_seconds is not None
    fresh = fresh_state(list(state.sims))
    started = time.perf_counter()
    assert StateStore(path, IDENTITY).load(fresh, keep=lambda sid: True) is not None
    load_seconds = time.perf_counter() - started
    assert len(fresh.restored) == 10_000
    assert sum(len(a.sessions) for a in fresh.restored.values()) == 50_000
    print(
        f"\n10k SIMs x 5 sessions: snapshot {snapshot_seconds * 1000:.0f} ms (event loop),"
        f" save {save_seconds * 1000:.0f} ms total, load {load_seconds * 1000:.0f} ms,"
        f" file {path.stat().st_size / 1e6:.1f} MB, {len(snap.sessions)} session rows"
    )
    # generous bounds: a regression by an order of magnitude fails, a slow CI machine does not
    assert snapshot_seconds < 2.0
    assert save_seconds < 5.0
    assert load_seconds < 5.0


# ------------------------------------------------------------------------------ the exporter


@pytest.fixture
async def scripted() -> AsyncIterator[RunningSimulator]:
    async with start_simulator(SimulatorConfig(sims=0, seed=11), host="127.0.0.1", port=0) as s:
        yield s


def make_config(sim: RunningSimulator, sids: list[str], path: Path, **state: Any) -> Config:
    mapping = exporter_mapping(sim.url, sids, state={"path": str(path), **state})
    mapping["poll"]["page_size"] = 2  # several pages per SIM: restored memos must cover them all
    return config_from_mapping(mapping, environ={})


async def no_sleep(_: float) -> None:
    return None


@contextlib.asynccontextmanager
async def exporter(config: Config) -> AsyncIterator[Exporter]:
    exp = Exporter(config, clock=ManualClock(), retry_sleep=no_sleep)
    await exp.open()
    try:
        yield exp
    finally:
        await exp.stop()


def text(exp: Exporter) -> str:
    return exp.exposition.text().decode()


async def test_restart_continues_counters_and_counts_downtime_churn_once(
    scripted: RunningSimulator, tmp_path: Path
) -> None:
    fleet = scripted.fleet
    a, b = fleet.add_sim(), fleet.add_sim()
    a1 = fleet.open_session(a, packets_uploaded=100, packets_downloaded=200)
    a2 = fleet.open_session(a, packets_uploaded=5, packets_downloaded=5)
    old = fleet.open_session(b, packets_uploaded=1, packets_downloaded=1)
    fleet.close_session(old)
    b1 = fleet.open_session(b, radio_link="NB-IoT")
    path = tmp_path / "state.db"
    config = make_config(scripted, [a, b], path)
    baseline = {sid: listing(scripted, sid) for sid in (a, b)}

    async with exporter(config) as exp:
        await exp.poller.poll_all()  # the baseline
        scripted.clock.advance(HOUR)
        fleet.update_session(a1, packets_uploaded=150, packets_downloaded=260)
        fleet.close_session(a2, packets_uploaded=9)
        b2 = fleet.open_session(b, packets_uploaded=3, packets_downloaded=4)
        await exp.poller.poll_all()
        before = text(exp)
        assert counters(before, a) == (0, 1, 54, 60)
        assert counters(before, b) == (1, 0, 3, 4)
    # stopped cleanly: saved

    # churn while the exporter is down
    scripted.clock.advance(HOUR)
    fleet.close_session(a1, packets_uploaded=170)
    short = fleet.open_session(a, start=scripted.clock.now() - 600, packets_uploaded=7)
    fleet.close_session(short)
    fleet.close_session(b2, packets_downloaded=10)
    b3 = fleet.open_session(b, packets_uploaded=2)
    fleet.update_session(b1, packets_uploaded=4)

    async with exporter(config) as exp:
        shown = text(exp)
        # restored but held: no counter until the SIM is polled again
        assert counters(shown, a) == (None, None, None, None)
        assert (
            value(shown, "twilio_wireless_data_session_duration_seconds_count", radio_link="LTE")
            is None
        )
        await exp.poller.poll_all()
        after = text(exp)
        assert counters(after, a) == truth(scripted, a, baseline[a]) == (1, 3, 54 + 20 + 7, 60)
        assert counters(after, b) == truth(scripted, b, baseline[b]) == (2, 1, 3 + 2 + 4, 4 + 6)
        assert (
            value(after, "twilio_wireless_data_session_duration_seconds_count", radio_link="LTE")
            == 4
        )
        assert value(after, "twilio_wireless_sim_data_sessions_open", sim_sid=b) == 2
        assert exp.state.sims[b].account.sessions.keys() == {old, b1, b2, b3}
    assert read_state(path, state_identity(config)).accounts[a].started_total == 1


async def test_crash_after_a_periodic_save_recounts_later_sessions_exactly_once(
    scripted: RunningSimulator, tmp_path: Path
) -> None:
    fleet = scripted.fleet
    sids = [fleet.add_sim() for _ in range(3)]
    for sid in sids:
        for _ in range(3):
            fleet.open_session(sid, packets_uploaded=10)
    path = tmp_path / "state.db"
    config = make_config(scripted, sids, path, save_interval="30s")
    baseline = {sid: listing(scripted, sid) for sid in sids}
    crash_copy = tmp_path / "as-left-by-sigkill.db"

    async with exporter(config) as exp:
        await exp.start()
        clock = exp.clock
        assert isinstance(clock, ManualClock)
        await eventually(lambda: exp.state.all_polled())
        for sid in sids:
            fleet.open_session(sid, packets_uploaded=1)
        await exp.poller.poll_all()
        await clock.advance(30)  # the periodic save
        await eventually(lambda: path.exists())
        saved = read_state(path, state_identity(config))
        assert {a.started_total for a in saved.accounts.values()} == {1}
        # counted after the save, then the process dies before the next one
        for sid in sids:
            new = fleet.open_session(sid, packets_uploaded=5, packets_downloaded=6)
            fleet.close_session(new)
        await exp.poller.poll_all()
        shown_before_crash = text(exp)
        for sid in sids:
            assert counters(shown_before_crash, sid) == truth(scripted, sid, baseline[sid])
        crash_copy.write_bytes(path.read_bytes())
    crash_copy.replace(path)  # the file as a SIGKILL would have left it: the periodic save

    scripted.clock.advance(60)
    for sid in sids:
        fleet.open_session(sid, packets_uploaded=100)

    async with exporter(config) as exp:
        for sid in sids:
            assert counters(text(exp), sid) == (None, None, None, None)
        await exp.poller.poll_all()
        after = text(exp)
        for sid in sids:
            expected = truth(scripted, sid, baseline[sid])
            assert counters(after, sid) == expected == (3, 1, 1 + 5 + 100, 6)
            # the killed process showed (2, 1, 6, 6): nothing goes backwards
            assert counters(shown_before_crash, sid) == (2, 1, 6, 6)


async def test_discovered_sims_take_up_their_state_when_discovery_lists_them(
    scripted: RunningSimulator, tmp_path: Path
) -> None:
    fleet = scripted.fleet
    kept, gone = fleet.add_sim(), fleet.add_sim()
    for sid in (kept, gone):
        fleet.open_session(sid, packets_uploaded=10)
    path = tmp_path / "state.db"
    mapping = exporter_mapping(
        scripted.url, [], discovery={"enabled": True}, state={"path": str(path)}
    )
    config = config_from_mapping(mapping, environ={})
    async with exporter(config) as exp:
        assert await exp.poller.refresh_sims()
        await exp.poller.poll_all()
        fleet.open_session(kept)
        fleet.open_session(gone)
        await exp.poller.poll_all()
    fleet.set_sim_status(gone, "deactivated")  # discovery lists active SIMs only
    fleet.open_session(kept)
    async with exporter(config) as exp:
        assert set(exp.state.restored) == {kept, gone}
        assert await exp.poller.refresh_sims()
        assert set(exp.state.restored) == {kept}
        await exp.poller.poll_all()
        assert counters(text(exp), kept)[:2] == (2, 0)
        assert set(exp.state.sims) == {kept}


async def test_a_file_for_another_account_is_set_aside_at_start(
    scripted: RunningSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sid = scripted.fleet.add_sim()
    scripted.fleet.open_session(sid)
    path = tmp_path / "state.db"
    save(fleet_state(1), path, StateIdentity("https://wireless.twilio.com", "AC" + "2" * 32))
    config = make_config(scripted, [sid], path)
    with caplog.at_level(logging.WARNING):
        async with exporter(config) as exp:
            assert exp.state.restored == {}
            await exp.poller.poll_all()
    assert "belongs to another API or account" in caplog.text
    assert (tmp_path / "state.db.rejected").exists()
    assert set(read_state(path, state_identity(config)).accounts) == {sid}


KEY_A, KEY_B = "SK" + "a" * 32, "SK" + "b" * 32


async def test_a_rotated_api_key_of_the_same_account_keeps_the_counters(tmp_path: Path) -> None:
    """Before: with an API key and no account SID configured, the key identified the file, so
    rotating the key made the file "belong to another account" and every counter restarted."""
    config = SimulatorConfig(sims=0, seed=11, api_keys={KEY_A: "secret-a", KEY_B: "secret-b"})
    async with start_simulator(config, host="127.0.0.1", port=0) as sim:
        sid = sim.fleet.add_sim()
        sim.fleet.open_session(sid, packets_uploaded=5)
        path = tmp_path / "state.db"

        def keyed(key: str, secret: str) -> Config:
            mapping = exporter_mapping(sim.url, [sid], state={"path": str(path)})
            mapping["twilio"] = {"base_url": sim.url, "api_key": key, "api_secret": secret}
            return config_from_mapping(mapping, environ={})

        async with exporter(keyed(KEY_A, "secret-a")) as exp:
            await exp.poller.poll_all()  # baseline
            sim.fleet.open_session(sid, packets_uploaded=7)
            await exp.poller.poll_all()
            assert exp.state.account_sid == sim.config.account_sid  # learned from the answers
        assert read_state(path, state_identity(keyed(KEY_A, "secret-a"))).accounts
        sim.fleet.open_session(sid, packets_uploaded=11)  # while no exporter runs
        async with exporter(keyed(KEY_B, "secret-b")) as exp:
            assert set(exp.state.restored) == {sid}
            await exp.poller.poll_all()
            shown = text(exp)
        assert value(shown, "twilio_wireless_sim_data_sessions_started_total", sim_sid=sid) == 2
        assert value(shown, "twilio_wireless_sim_packets_uploaded_total", sim_sid=sid) == 18
        assert not (tmp_path / "state.db.rejected").exists()


def test_the_account_not_the_credential_identifies_a_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    account = "AC" + "1" * 32
    client_a = StateIdentity("http://127.0.0.1:1", "oauth2:client-a")
    state = fleet_state(2)
    state.account_sid = account  # learned from the API's answers
    save(state, path, client_a)
    # another OAuth2 client (or API key) of the same API: read, its account checked later
    loaded = read_state(path, StateIdentity("http://127.0.0.1:1", "oauth2:client-b"))
    assert len(loaded.accounts) == 2
    assert loaded.unverified_account == account
    # a configured account SID is compared at once
    same = StateIdentity("http://127.0.0.1:1", account, account)
    assert read_state(path, same).unverified_account is None
    other = StateIdentity("http://127.0.0.1:1", "AC" + "2" * 32, "AC" + "2" * 32)
    with pytest.raises(StateFileError, match="belongs to another API or account"):
        read_state(path, other)
    # an earlier version's file of an OAuth2 client (no account SID anywhere): taken up
    legacy = tmp_path / "legacy.db"
    save(fleet_state(2), legacy, client_a)
    loaded = read_state(legacy, StateIdentity("http://127.0.0.1:1", "oauth2:client-b"))
    assert (len(loaded.accounts), loaded.unverified_account) == (2, None)
    # an earlier version's file (no account_sid row) written with an account SID
    _sql(path, "DELETE FROM meta WHERE key='account_sid'")
    assert read_state(path, IDENTITY).unverified_account is None
    with pytest.raises(StateFileError, match="belongs to another API or account"):
        read_state(path, other)


def test_restored_state_of_another_account_is_dropped_at_the_first_answer() -> None:
    state = fresh_state([sim_sid(0), sim_sid(1)])
    state.restore({sim_sid(0): account(1)}, {"LTE": Histogram(SESSION_DURATION_BUCKETS)})
    state.unverified_account = "AC" + "1" * 32
    assert state.learn_account("AC" + "2" * 32)
    assert state.restored == {}
    assert state.duration_histograms() == {}
    assert not state.learn_account("AC" + "3" * 32)  # learned once
    same = fresh_state([sim_sid(0)])
    same.restore({sim_sid(0): account(1)}, {})
    same.unverified_account = "AC" + "1" * 32
    assert not same.learn_account("AC" + "1" * 32)
    assert same.restored == {sim_sid(0): account(1)}


async def test_a_second_exporter_on_the_same_state_file_is_refused(
    scripted: RunningSimulator, tmp_path: Path
) -> None:
    """Before: two exporters given one state.path overwrote each other's saves silently."""
    from twilio_wireless_exporter.fleet.persist import StateLockedError

    sid = scripted.fleet.add_sim()
    path = tmp_path / "state.db"
    config = make_config(scripted, [sid], path)
    async with exporter(config) as first:
        await first.poller.poll_all()
        second = Exporter(config, clock=ManualClock(), retry_sleep=no_sleep)
        with pytest.raises(StateLockedError) as info:
            await second.open()
        assert str(info.value) == (
            f"state file {path} is in use by another exporter (pid {os.getpid()}):"
            " give each exporter its own state.path"
        )
        assert second.state.restored == {}
        await second.stop()
    async with exporter(config) as third:  # released when the first stopped
        assert set(third.state.restored) == {sid}


async def test_the_first_save_comes_once_every_sim_has_its_baseline(
    scripted: RunningSimulator, tmp_path: Path
) -> None:
    """Before: nothing was saved before the first state.save_interval, so a SIGKILL in the first
    minute lost every baseline."""
    sids = [scripted.fleet.add_sim() for _ in range(3)]
    path = tmp_path / "state.db"
    config = make_config(scripted, sids, path, save_interval="10m")
    clock = ManualClock()
    exp = Exporter(config, clock=clock, retry_sleep=no_sleep)
    await exp.open()
    store = exp._store
    assert store is not None
    saver = asyncio.create_task(store.run(exp.state, 600.0, clock.sleep))
    try:
        await exp.poller.poll_sim(sids[0])
        await clock.advance(5)
        assert not path.exists()  # a SIM without its baseline yet: nothing worth saving
        await exp.poller.poll_sim(sids[1])
        await exp.poller.poll_sim(sids[2])
        await clock.advance(1)
        await eventually(path.exists)
        assert set(read_state(path, state_identity(config)).accounts) == set(sids)
    finally:
        saver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saver
        await exp.stop()


async def test_sims_restored_from_the_file_need_no_early_save(
    scripted: RunningSimulator, tmp_path: Path
) -> None:
    sids = [scripted.fleet.add_sim() for _ in range(3)]
    path = tmp_path / "state.db"
    config = make_config(scripted, sids, path, save_interval="10m")
    async with exporter(config) as first:
        await first.poller.poll_all()
    written = path.stat().st_mtime_ns
    clock = ManualClock()
    exp = Exporter(config, clock=clock, retry_sleep=no_sleep)
    await exp.open()
    assert exp._store is not None
    saver = asyncio.create_task(exp._store.run(exp.state, 600.0, clock.sleep))
    try:
        await exp.poller.poll_all()
        for _ in range(5):
            await clock.advance(1)
        assert path.stat().st_mtime_ns == written  # every SIM had its baseline from the file
    finally:
        saver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saver
        await exp.stop()


async def test_the_issues_hostile_sessions_cost_nothing_else_across_a_restart(
    scripted: RunningSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a session at packets_uploaded -1 was saved, and at the next start the whole file
    was rejected (every SIM back to 0); a session at 2**63 made every save fail. Now the API
    records check rejects both sessions where they enter, so every SIM is saved and restored;
    the file's own defences against such values are tested above on the store directly."""
    fleet = scripted.fleet
    negative, huge, good = (fleet.add_sim() for _ in range(3))
    for sid in (negative, huge, good):
        fleet.open_session(sid, packets_uploaded=1, packets_downloaded=1)
    path = tmp_path / "state.db"
    config = make_config(scripted, [negative, huge, good], path)
    async with exporter(config) as exp:
        await exp.poller.poll_all()  # baselines
        fleet.open_session(negative, packets_uploaded=-1)
        fleet.open_session(huge, packets_uploaded=2**63)
        fleet.open_session(good, packets_uploaded=5)
        await exp.poller.poll_all()
        assert exp._store is not None
        with caplog.at_level(logging.WARNING):
            assert await exp._store.save(exp.state)
        before = {sid: exp.state.sims[sid].account for sid in (huge, good)}
        before_negative = exp.state.sims[negative].account.packets_uploaded_total
    saved = read_state(path, state_identity(config)).accounts
    assert set(saved) == {negative, huge, good}  # the hostile sessions never reached the state
    assert saved[negative].packets_uploaded_total == before_negative
    assert float(saved[huge].packets_uploaded_total) == float(before[huge].packets_uploaded_total)
    assert saved[good] == before[good]
    fleet.open_session(good, packets_uploaded=2)  # while the exporter is down
    async with exporter(config) as exp:
        assert set(exp.state.restored) == {negative, huge, good}
        await exp.poller.poll_all()
        shown = text(exp)
    assert value(shown, "twilio_wireless_sim_data_sessions_started_total", sim_sid=good) == 2
    assert value(shown, "twilio_wireless_sim_packets_uploaded_total", sim_sid=good) == 7
    for sid in (negative, huge):  # their hostile sessions are rejected, never counted
        assert value(shown, "twilio_wireless_sim_data_sessions_started_total", sim_sid=sid) == 0
        assert value(shown, "twilio_wireless_sim_up", sim_sid=sid) == 1
    assert not (tmp_path / "state.db.rejected").exists()
    assert "cannot save state" not in caplog.text


async def test_failing_saves_are_logged_and_counted(
    scripted: RunningSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sid = scripted.fleet.add_sim()
    directory = tmp_path / "gone"
    directory.mkdir()
    config = make_config(scripted, [sid], directory / "state.db")
    directory.rmdir()
    with caplog.at_level(logging.WARNING):
        async with exporter(config) as exp:
            await exp.poller.poll_all()
            registry = exp.registry
    assert f"cannot save state to {directory / 'state.db'}" in caplog.text
    assert registry.get_sample_value("twilio_wireless_state_save_errors_total") == 1.0


def test_save_interval_is_validated() -> None:
    mapping = exporter_mapping("http://127.0.0.1:1", [SID], state={"save_interval": "500ms"})
    with pytest.raises(
        ConfigError, match=r"state\.save_interval: must be at least 1s, got '500ms'"
    ):
        config_from_mapping(mapping, environ={})
    mapping["state"]["save_interval"] = "5m"
    assert config_from_mapping(mapping, environ={}).state.save_interval == 300.0
    assert (
        config_from_mapping(
            exporter_mapping("http://127.0.0.1:1", [SID]), environ={}
        ).state.save_interval
        == 60.0
    )


# ------------------------------------------------------------------------------ real processes


class ExporterProcess:
    """``python -m twilio_wireless_exporter`` on port 0; its stderr is collected."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "twilio_wireless_exporter",
            "--config",
            str(self.config),
            "--web.listen-address",
            "127.0.0.1:0",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        listening = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(listening))
        self.url = await asyncio.wait_for(listening, 30)

    async def _read(self, listening: asyncio.Future[str]) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if (url := listen_url(line)) and not listening.done():
                listening.set_result(url)
        if not listening.done():
            listening.set_exception(AssertionError("exporter exited:\n" + "\n".join(self.lines)))

    async def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        assert self._reader is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self._reader
        return code

    async def scrape(self, http: aiohttp.ClientSession) -> str:
        async with http.get(self.url + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


async def wait_for_counts(
    proc: ExporterProcess,
    http: aiohttp.ClientSession,
    want: dict[str, tuple[int, int, int, int]],
    floor: dict[str, tuple[float | None, ...]] | None = None,
    within: float = 30.0,
) -> str:
    """Scrape until every SIM shows ``want``; no scrape may show less than ``floor`` (no dip)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        shown = await proc.scrape(http)
        got = {sid: counters(shown, sid) for sid in want}
        for sid, values in got.items():
            for now_value, before in zip(values, (floor or {}).get(sid, ()), strict=False):
                if now_value is not None and before is not None:
                    assert now_value >= before, (sid, got[sid], floor)
            for now_value, limit in zip(values, want[sid], strict=True):
                assert now_value is None or now_value <= limit, (sid, values, want[sid])
        if got == want:
            return shown
        if loop.time() > deadline:
            raise AssertionError(f"counters {got} never reached {want}\n" + "\n".join(proc.lines))
        await asyncio.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.slow
async def test_sigkill_mid_cycle_and_restart_loses_nothing_and_counts_nothing_twice(
    scripted: RunningSimulator, tmp_path: Path
) -> None:
    fleet = scripted.fleet
    sids = [fleet.add_sim() for _ in range(4)]
    for sid in sids:
        for _ in range(5):  # three pages of two: a kill can land between pages
            fleet.open_session(sid, packets_uploaded=50, packets_downloaded=60)
    baseline = {sid: listing(scripted, sid) for sid in sids}
    path = tmp_path / "state.db"

    def write_config(save_interval: str) -> Path:
        mapping = exporter_mapping(
            scripted.url,
            sids,
            poll={"interval": "1s", "page_size": 2},
            state={"path": str(path), "save_interval": save_interval},
        )
        config_path = tmp_path / f"config-{save_interval}.yaml"
        config_path.write_text(yaml.safe_dump(mapping))
        return config_path

    def expected() -> dict[str, tuple[int, int, int, int]]:
        return {sid: truth(scripted, sid, baseline[sid]) for sid in sids}

    def churn(round_: int) -> None:
        scripted.clock.advance(600)
        for i, sid in enumerate(sids):
            new = fleet.open_session(sid, packets_uploaded=round_, packets_downloaded=i)
            if i % 2:
                fleet.close_session(new, packets_uploaded=round_ + 1)
            oldest = next(s for s in fleet.listing(sid) if s.end is None and s.sid != new)
            fleet.close_session(oldest.sid, packets_downloaded=oldest.packets_downloaded + 3)

    async def kill_mid_cycle(proc: ExporterProcess) -> None:
        # hold the next listing requests so the kill lands while polls are in flight
        scripted.faults.script("data_sessions", [FaultResponse(delay=60)] * 3)
        await eventually(lambda: scripted.stats.in_flight >= 1, within=10)
        assert await proc.stop(signal.SIGKILL) == -signal.SIGKILL
        scripted.faults.clear_script()
        scripted.release_delayed()

    async with aiohttp.ClientSession() as http:
        # 1: baseline, churn, a periodic save that holds the churn, SIGKILL mid-cycle
        first = ExporterProcess(write_config("1s"))
        await first.start()
        await wait_for_counts(first, http, dict.fromkeys(sids, (0, 0, 0, 0)))
        churn(1)
        await wait_for_counts(first, http, expected())
        want = expected()
        await eventually(
            lambda: (
                path.exists()
                and {
                    sid: (
                        a.started_total,
                        a.ended_total,
                        a.packets_uploaded_total,
                        a.packets_downloaded_total,
                    )
                    for sid, a in read_state(path, identity_of(scripted)).accounts.items()
                }
                == want
            ),
            within=10,
        )
        await kill_mid_cycle(first)

        # 2: churn while down; restart without periodic saves; more churn; SIGKILL again
        churn(2)
        second = ExporterProcess(write_config("1h"))
        await second.start()
        await wait_for_counts(second, http, expected(), floor={sid: want[sid] for sid in sids})
        churn(3)
        shown = await wait_for_counts(second, http, expected())
        high_water = {sid: counters(shown, sid) for sid in sids}
        await kill_mid_cycle(second)
        assert not any("Traceback" in line for line in second.lines), second.lines

        # 3: restart from the older file: rounds 2 and 3 are counted again, exactly once,
        # and no scrape ever shows less than what the killed process showed
        churn(4)
        third = ExporterProcess(write_config("1s"))
        await third.start()
        final = await wait_for_counts(third, http, expected(), floor=high_water)
        assert any("restored 4 SIMs" in line for line in third.lines), third.lines
        assert await third.stop(signal.SIGTERM) == 0
        saved = read_state(path, identity_of(scripted)).accounts
        for sid in sids:
            acct = saved[sid]
            assert (
                (
                    acct.started_total,
                    acct.ended_total,
                    acct.packets_uploaded_total,
                    acct.packets_downloaded_total,
                )
                == expected()[sid]
                == counters(final, sid)
            )
        for proc in (first, second, third):
            assert not any("Traceback" in line or "CRITICAL" in line for line in proc.lines)


def identity_of(sim: RunningSimulator) -> StateIdentity:
    return state_identity(config_from_mapping(exporter_mapping(sim.url, [SID]), environ={}))


async def test_a_state_file_the_system_cannot_read_is_left_alone_and_start_is_refused(
    scripted: RunningSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: any OSError while reading (permission denied, EIO, no descriptors left) moved a
    possibly good file aside and started every counter from zero."""
    sid = scripted.fleet.add_sim()
    path = tmp_path / "state.db"
    config = make_config(scripted, [sid], path)
    async with exporter(config) as first:
        await first.poller.poll_all()
    saved = path.read_bytes()

    def refuse(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(persist, "read_state", refuse)
    exp = Exporter(config, clock=ManualClock(), retry_sleep=no_sleep)
    with pytest.raises(StateUnreadableError, match=r"cannot be read .*Permission denied"):
        await exp.open()
    assert path.read_bytes() == saved  # neither moved aside nor replaced
    assert not (tmp_path / "state.db.rejected").exists()
    monkeypatch.undo()
    async with exporter(config) as again:  # the lock and the session were released
        assert set(again.state.restored) == {sid}
