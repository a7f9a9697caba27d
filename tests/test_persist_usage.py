"""The state file's usage and status tables: round trip, held until read, bad rows cost only
their own SIM's usage or status history."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.fleet_support import PERIOD, SID_A, SID_B, T0, polled_state, usage
from twilio_wireless_exporter.fleet.persist import (
    StateIdentity,
    StateStore,
    read_state,
    snapshot,
    write_state,
)
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.fleet.usage import DAY

IDENTITY = StateIdentity("http://127.0.0.1:1", "AC" + "1" * 32)


def saved(path: Path) -> FleetState:
    """The polled fleet (SIM A with usage and a status), its account usage too, saved."""
    state = polled_state()
    account = [usage(PERIOD, upload=5, download=7, commands_to_sim=2)]
    state.record_account_usage(account, window_start=PERIOD, now=T0)
    write_state(path, snapshot(state), IDENTITY, float(T0))
    return state


def restored(path: Path, registry: CollectorRegistry | None = None) -> FleetState:
    state = FleetState()
    state.ensure(SID_A)
    state.ensure(SID_B)
    StateStore(path, IDENTITY, registry=registry or CollectorRegistry()).load(state, lambda _: True)
    return state


def test_usage_ledgers_statuses_and_the_account_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    before = saved(path)
    after = restored(path)
    record = before.sims[SID_A]
    assert record.usage is not None
    assert after.restored_usage == {SID_A: record.usage.ledger}
    assert after.restored_status == {SID_A: ("active", 0)}
    assert after.restored_account_usage == before.account_usage.ledger
    # held: nothing shows until the next read, which counts on top of the ledger
    assert after.sims[SID_A].usage is None
    grown = [
        usage(PERIOD + 9 * DAY, upload=150, download=350, commands_to_sim=2),
        usage(PERIOD + 10 * DAY, upload=40, download=20, commands_from_sim=3),
    ]
    after.record_usage(SID_A, grown, window_start=PERIOD, period=PERIOD, now=T0 + 9000)
    again = after.sims[SID_A].usage
    assert again is not None
    assert (again.ledger.upload_total, again.ledger.download_total) == (
        record.usage.ledger.upload_total + 30,
        record.usage.ledger.download_total,
    )


def test_a_status_change_while_down_is_counted_at_the_first_read(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    saved(path)
    state = restored(path)
    state.set_identity(
        SID_A, unique_name="sim-a", friendly_name=None, status="suspended", rate_plan_sid="WP1"
    )
    assert state.sims[SID_A].status_changes == 1
    assert state.restored_status == {}


def test_a_file_without_the_usage_tables_restores_the_sessions_only(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    saved(path)
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE usage; DROP TABLE statuses;")
    conn.close()
    loaded = read_state(path, IDENTITY)
    assert SID_A in loaded.accounts
    assert loaded.usage.ledgers == {}
    assert loaded.usage.statuses == {}
    assert loaded.rejected == []


BAD_USAGE_ROWS = [
    pytest.param("UPDATE usage SET ledger='{' WHERE sid=?", "usage", id="not-json"),
    pytest.param(
        "UPDATE usage SET ledger=replace(ledger, '\"upload_total\":', '\"upload_total\":-')"
        " WHERE sid=?",
        "usage",
        id="negative-counter",
    ),
    pytest.param("UPDATE usage SET ledger='{\"x\": 1}' WHERE sid=?", "usage", id="wrong-shape"),
    pytest.param("UPDATE usage SET ledger=x'00ff' WHERE sid=?", "usage", id="a-blob"),
    pytest.param("UPDATE statuses SET changes=-1 WHERE sid=?", "statuses", id="negative-changes"),
    pytest.param("UPDATE statuses SET status='' WHERE sid=?", "statuses", id="empty-status"),
]


@pytest.mark.parametrize(("statement", "table"), BAD_USAGE_ROWS)
def test_a_bad_row_costs_only_that_sims_usage_or_status(
    tmp_path: Path, statement: str, table: str
) -> None:
    path = tmp_path / "state.db"
    saved(path)
    conn = sqlite3.connect(path)
    conn.execute(statement, (SID_A,))
    conn.commit()
    conn.close()
    registry = CollectorRegistry()
    state = restored(path, registry)
    rejected = "twilio_wireless_state_rows_rejected_total"
    assert registry.get_sample_value(rejected, {"table": table}) == 1
    assert SID_A in state.restored  # the sessions are kept
    assert state.restored_account_usage is not None  # and the account's usage
    if table == "usage":
        assert state.restored_usage == {}
        assert state.restored_status == {SID_A: ("active", 0)}
    else:
        assert state.restored_status == {}
        assert SID_A in state.restored_usage
