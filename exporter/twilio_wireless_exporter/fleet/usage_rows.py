"""The state file's usage and status tables (see persist.py for how a file is written and read).

Two tables beside the session accounts, added without a schema version bump: a file without
them (written before usage existed) restores no usage, and an older exporter ignores them.

* ``usage``: one row per SIM with a baselined usage ledger (its counters, floor and per-bucket
  maxima as JSON), and the account's ledger under the SID ``""``.
* ``statuses``: each SIM's last known status and its count of status changes, so a change while
  the exporter was down is counted at the first identity read after the restart.

Like the session accounts, what is restored is held until the SIM's next read (see
:meth:`~twilio_wireless_exporter.fleet.state.FleetState.record_usage` and ``set_identity``).
Every row is checked on its own: a bad row costs only that SIM's usage (a fresh baseline) or
its status history, counted in ``state_rows_rejected_total{table}``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Final

import msgspec

from twilio_wireless_exporter.api.records import INT64_MAX
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.fleet.usage import Bucket, UsageLedger

SCHEMA: Final = """
CREATE TABLE usage (sid TEXT PRIMARY KEY, ledger TEXT NOT NULL);
CREATE TABLE statuses (sid TEXT PRIMARY KEY, status TEXT NOT NULL, changes INTEGER NOT NULL);
"""
ACCOUNT: Final = ""
"""The ``sid`` of the account's own ledger."""

_Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _StoredLedger(msgspec.Struct, forbid_unknown_fields=True):
    """A ledger as the file holds it, with the bounds a ledger can have."""

    baselined: bool
    floor: _Count
    buckets: dict[_Count, tuple[_Count, _Count, _Count, _Count]]
    upload_total: _Count
    download_total: _Count
    commands_from_sim_total: _Count
    commands_to_sim_total: _Count


_DECODE: Final = msgspec.json.Decoder(_StoredLedger)
_ENCODE: Final = msgspec.json.Encoder()


class _StatusRow(msgspec.Struct, array_like=True):
    sid: _Text
    status: _Text
    changes: _Count


@dataclass(slots=True)
class UsageRows:
    """The rows of one save (taken on the event loop)."""

    usage: list[tuple[str, str]] = field(default_factory=list)
    statuses: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass(slots=True)
class LoadedUsage:
    ledgers: dict[str, UsageLedger] = field(default_factory=dict)
    account: UsageLedger | None = None
    statuses: dict[str, tuple[str, int]] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def snapshot_usage(state: FleetState) -> UsageRows:
    """The usage and status rows of ``state``; held (restored, not yet read) ones included."""
    rows = UsageRows()
    ledgers = dict(state.restored_usage)
    statuses = dict(state.restored_status)
    for sid, record in state.sims.items():
        if record.usage is not None and record.usage.ledger.baselined:
            ledgers[sid] = record.usage.ledger
        if record.identity.status:
            statuses[sid] = (record.identity.status, record.status_changes)
    account = state.account_usage.ledger
    if not account.baselined and state.restored_account_usage is not None:
        account = state.restored_account_usage
    if account.baselined:
        ledgers[ACCOUNT] = account
    rows.usage = [(sid, _ENCODE.encode(ledger).decode()) for sid, ledger in ledgers.items()]
    rows.statuses = [(sid, status, changes) for sid, (status, changes) in statuses.items()]
    return rows


def write_usage(conn: sqlite3.Connection, rows: UsageRows) -> list[str]:
    """Fill the tables (created with the file's others from :data:`SCHEMA`); returns the SIDs
    whose rows could not be written (text that is not Unicode)."""
    unsaved: list[str] = []
    for statement, table in (
        ("INSERT INTO usage VALUES (?, ?)", rows.usage),
        ("INSERT INTO statuses VALUES (?, ?, ?)", rows.statuses),
    ):
        try:
            conn.executemany(statement, table)
        except (sqlite3.Error, UnicodeEncodeError, OverflowError, ValueError):
            for row in table:  # find the rows at fault, keep the rest
                try:
                    conn.execute(statement, row)
                except (sqlite3.Error, UnicodeEncodeError, OverflowError, ValueError):
                    unsaved.append(str(row[0]))
    return unsaved


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _ledger(stored: _StoredLedger) -> UsageLedger:
    return UsageLedger(
        baselined=stored.baselined,
        floor=stored.floor,
        buckets={key: Bucket(*values) for key, values in stored.buckets.items()},
        upload_total=stored.upload_total,
        download_total=stored.download_total,
        commands_from_sim_total=stored.commands_from_sim_total,
        commands_to_sim_total=stored.commands_to_sim_total,
    )


def read_usage(conn: sqlite3.Connection, keep: Callable[[str], bool] | None) -> LoadedUsage:
    """The usage and status rows of an open state file (``keep``: the SIDs worth reading)."""
    loaded = LoadedUsage()
    tables = _tables(conn)
    if "usage" in tables:
        for sid, text in conn.execute("SELECT sid, ledger FROM usage"):
            if sid != ACCOUNT and keep is not None and isinstance(sid, str) and not keep(sid):
                continue
            who = "the account" if sid == ACCOUNT else f"SIM {sid}"
            if not isinstance(sid, str) or not isinstance(text, (str, bytes)):
                loaded.rejected.append(("usage", f"not a SID and a text; {who} starts afresh"))
                continue
            try:
                ledger = _ledger(_DECODE.decode(text))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                loaded.rejected.append(("usage", f"{exc}; {who} starts a fresh usage baseline"))
                continue
            if sid == ACCOUNT:
                loaded.account = ledger
            else:
                loaded.ledgers[sid] = ledger
    if "statuses" in tables:
        for cells in conn.execute("SELECT sid, status, changes FROM statuses"):
            if keep is not None and isinstance(cells[0], str) and not keep(cells[0]):
                continue
            try:
                row = msgspec.convert(list(cells), _StatusRow)
            except msgspec.ValidationError as exc:
                loaded.rejected.append(("statuses", f"{exc}; that SIM's status history restarts"))
                continue
            loaded.statuses[row.sid] = (row.status, row.changes)
    return loaded


def restore_usage(state: FleetState, loaded: LoadedUsage) -> None:
    """Hold the loaded rows in ``state`` until each SIM's next read."""
    state.restored_usage = loaded.ledgers
    state.restored_status = loaded.statuses
    state.restored_account_usage = loaded.account
