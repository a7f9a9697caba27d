"""State kept across restarts: the per-SIM accounts and the duration histograms, in SQLite.

Why: without it every restart re-baselines every SIM, so sessions that start or end while the
exporter is down are never counted and every counter drops to zero.

How a save works (:meth:`StateStore.save`):

1. A snapshot of the state is taken on the event loop (plain tuples; the poller only mutates the
   state between awaits, so the snapshot is consistent).
2. In a worker thread, a *new* SQLite database is written next to the target
   (``<path>.tmp``, mode 0600, one transaction, no journal since nobody else reads it yet),
   fsynced, renamed over the target with :func:`os.replace`, and the directory is fsynced.

A ``SIGKILL`` (or power loss) at any moment therefore leaves either the complete old file or
the complete new one: the rename is atomic, and nothing ever writes into the live file. This was
chosen over in-place SQLite transactions in WAL mode because every save rewrites every SIM anyway
(each poll changes its SIM's record), so an in-place transaction would write the same pages
plus a WAL copy of them, and a rejected or corrupt file can simply be replaced instead of
having to be repaired first. A stale ``.tmp`` left by a crash is removed by the next save.

Loading (:meth:`StateStore.load`) checks a ``meta`` table: schema version, exporter version,
API base URL and account. A missing, empty, truncated, corrupt, foreign or newer file is moved
aside to ``<path>.rejected`` with one clear warning, and the exporter starts fresh; it never
crashes on a bad file. Inside a good file every row is checked on its own: a bad row costs only
its SIM (which starts a fresh baseline) or its histogram, counted and logged, never the file.
SIMs in the file that are no longer monitored are dropped.

The account, not the credential, owns a file: ``meta`` holds the account SID (configured, or
learned from the API's answers when only an API key or an OAuth2 client is configured), so a
rotated API key or OAuth2 client of the same account continues the counters.

A value SQLite cannot hold never fails a save: a counter beyond int64 is written as the float
Prometheus shows anyway, and a SIM with a value no state file may hold (a negative count, a
number beyond any float, text that is not Unicode) keeps the rows of its previous save.

One process at a time: :class:`StateLock` holds ``<path>.lock`` (``flock``) for the process's
life, so a second exporter given the same path refuses to start instead of overwriting.

Restored state is *held* until the SIMs are polled again (see
:meth:`~twilio_wireless_exporter.fleet.state.FleetState.restore`): the file can be older than
what the exporter showed just before a crash, and showing the older, lower counters would look
like a counter reset to Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar, cast

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.config import BasicCredentials, Config
from twilio_wireless_exporter.fleet.accounting import (
    SessionAttributes,
    SessionMemo,
    SimAccount,
    shared,
)
from twilio_wireless_exporter.fleet.aggregates import AggregateMember, FleetAggregates, GroupKey
from twilio_wireless_exporter.fleet.state import (
    SESSION_DURATION_BUCKETS,
    FleetState,
    Histogram,
    is_account_sid,
)
from twilio_wireless_exporter.fleet.usage_rows import (
    SCHEMA as USAGE_SCHEMA,
)
from twilio_wireless_exporter.fleet.usage_rows import (
    LoadedUsage,
    UsageRows,
    read_usage,
    restore_usage,
    snapshot_usage,
    write_usage,
)

log = logging.getLogger(__name__)

#: Version of the file layout. Bump it (and teach :func:`read_state` the old one, if worth it)
#: whenever a table or column changes meaning. 2 added the fleet aggregates' tables; a file of
#: schema 1 is read as one without aggregates (they start from the SIMs' restored counters).
SCHEMA_VERSION: Final = 2
#: Older layouts :func:`read_state` still reads, with the tables they lack.
_MIGRATED: Final = {1: frozenset({"aggregate_groups", "aggregate_members"})}
APPLICATION: Final = "twilio-wireless-exporter"

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sims (
    sid TEXT PRIMARY KEY,
    baselined INTEGER NOT NULL,
    started_total INTEGER NOT NULL,
    ended_total INTEGER NOT NULL,
    packets_uploaded_total INTEGER NOT NULL,
    packets_downloaded_total INTEGER NOT NULL,
    imei_changes_total INTEGER NOT NULL,
    open_sessions INTEGER NOT NULL,
    latest_radio_link TEXT,
    latest_operator_name TEXT,
    latest_operator_country TEXT,
    latest_operator_mcc TEXT,
    latest_operator_mnc TEXT,
    latest_imei TEXT,
    latest_start REAL,
    latitude REAL,
    longitude REAL,
    location_start REAL,
    last_updated REAL,
    last_imei TEXT,
    last_success REAL
);
CREATE TABLE sessions (
    sim_sid TEXT NOT NULL,
    sid TEXT NOT NULL,
    packets_uploaded INTEGER NOT NULL,
    packets_downloaded INTEGER NOT NULL,
    ended INTEGER NOT NULL,
    absent INTEGER NOT NULL
);
CREATE TABLE durations (
    radio_link TEXT PRIMARY KEY,
    bounds TEXT NOT NULL,
    counts TEXT NOT NULL,
    total REAL NOT NULL,
    count INTEGER NOT NULL
);
CREATE TABLE aggregate_groups (key TEXT PRIMARY KEY, carried TEXT NOT NULL);
CREATE TABLE aggregate_members (sid TEXT PRIMARY KEY, key TEXT NOT NULL, counters TEXT NOT NULL);
"""

#: The tables whose rows are checked one by one (``twilio_wireless_state_rows_rejected``).
TABLES: Final = ("sims", "sessions", "durations", "aggregate_groups", "aggregate_members")

_INSERT_SIM: Final = (
    "INSERT INTO sims VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class StateFileError(Exception):
    """Why a state file cannot be used (the message is shown to the operator)."""


@dataclass(frozen=True, slots=True)
class StateIdentity:
    """Whose state a file holds: a file written for another API or account is foreign.

    ``account`` is what earlier versions compared (the account SID, else the API key SID or
    ``oauth2:<client id>``); it is still written, so a previous version keeps reading a file
    written with the same credentials. ``account_sid`` is the configured account, when the
    configuration names one; otherwise the account is learned from the API's answers
    (:attr:`FleetState.account_sid`) and stored in the file as soon as it is known.
    """

    base_url: str
    account: str
    account_sid: str | None = None

    @property
    def known_account(self) -> str | None:
        if self.account_sid is not None:
            return self.account_sid
        return self.account if is_account_sid(self.account) else None


def state_identity(config: Config) -> StateIdentity:
    """The API base URL, the credential (as earlier versions stored it) and the account SID."""
    creds = config.twilio.credentials
    if isinstance(creds, BasicCredentials):
        account = creds.account_sid or creds.username
        account_sid = creds.account_sid
    else:
        account = f"oauth2:{creds.client_id}"
        account_sid = None  # learned from the API's answers
    return StateIdentity(
        base_url=config.twilio.base_url.rstrip("/"), account=account, account_sid=account_sid
    )


@dataclass(slots=True)
class Snapshot:
    """Rows of one save, taken on the event loop and written by a worker thread."""

    sims: list[tuple[Any, ...]] = field(default_factory=list)
    sessions: list[tuple[str, str, int, int, int, int]] = field(default_factory=list)
    durations: list[tuple[str, str, str, float, int]] = field(default_factory=list)
    account_sid: str | None = None
    """The account the API answered for, when learned from its answers."""
    usage: UsageRows = field(default_factory=UsageRows)
    aggregate_by: tuple[str, ...] | None = None
    """The labels the aggregates group by (``None``: no aggregates to save)."""
    aggregate_groups: list[tuple[str, str]] = field(default_factory=list)
    aggregate_members: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Written:
    """What a save wrote: the SIMs it could not write from memory, with why."""

    unsaved: dict[str, str] = field(default_factory=dict)
    """SIM SID -> the value that no state file may hold; its previous rows were kept."""


@dataclass(slots=True)
class LoadedState:
    """What a state file holds."""

    accounts: dict[str, SimAccount]
    last_success: dict[str, float]
    durations: dict[str, Histogram]
    saved_at: float
    exporter_version: str
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(table, why) per rejected row; the SIM of a rejected row starts a fresh baseline."""
    unverified_account: str | None = None
    """The file's account SID when the configuration names none: checked against the first
    API answer (:meth:`FleetState.learn_account`)."""
    usage: LoadedUsage = field(default_factory=LoadedUsage)
    aggregate_by: tuple[str, ...] | None = None
    """The labels the file's aggregates were grouped by (``None``: it has none)."""
    aggregate_groups: dict[GroupKey, dict[str, float]] = field(default_factory=dict)
    aggregate_members: dict[str, AggregateMember] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- snapshot


def _sim_row(sid: str, acct: SimAccount, last_success: float | None) -> tuple[Any, ...]:
    latest = acct.latest
    location = acct.location
    return (
        sid,
        int(acct.baselined),
        acct.started_total,
        acct.ended_total,
        acct.packets_uploaded_total,
        acct.packets_downloaded_total,
        acct.imei_changes_total,
        acct.open_sessions,
        None if latest is None else latest.radio_link,
        None if latest is None else latest.operator_name,
        None if latest is None else latest.operator_country,
        None if latest is None else latest.operator_mcc,
        None if latest is None else latest.operator_mnc,
        None if latest is None else latest.imei,
        acct.latest_start,
        None if location is None else location[0],
        None if location is None else location[1],
        acct.location_start,
        acct.last_updated,
        acct.last_imei,
        last_success,
    )


def snapshot(state: FleetState, aggregates: FleetAggregates | None = None) -> Snapshot:
    """Everything worth keeping of ``state`` (and of its ``aggregates``), as rows (cheap; runs
    on the event loop).

    A SIM whose restored account is still held (not polled since the restart) is saved with
    that account, so a second crash right after a restart loses nothing either.
    """
    snap = Snapshot()
    if aggregates is not None:
        aggregates.update(state)  # the remainders of the state being saved
        groups, members = aggregates.remembered()
        snap.aggregate_by = aggregates.by
        snap.aggregate_groups = [(_json_key(k), _json_counts(c)) for k, c in groups.items()]
        snap.aggregate_members = [
            (sid, _json_key(m.key), _json_counts(m.counters)) for sid, m in members.items()
        ]
    sims, sessions = snap.sims, snap.sessions
    held = state.restored
    accounts: list[tuple[str, SimAccount, float | None]] = []
    for sid, record in state.sims.items():
        acct = held.get(sid, record.account)
        if acct.baselined:
            accounts.append((sid, acct, record.last_success))
    for sid, acct in held.items():
        if sid not in state.sims:  # e.g. waiting for discovery to list it again
            accounts.append((sid, acct, None))
    for sid, acct, last_success in accounts:
        sims.append(_sim_row(sid, acct, last_success))
        sessions.extend(
            (sid, ses, m.packets_uploaded, m.packets_downloaded, int(m.ended), m.absent)
            for ses, m in acct.sessions.items()
        )
    for radio_link, hist in sorted(state.duration_histograms().items()):
        snap.durations.append(
            (radio_link, json.dumps(hist.bounds), json.dumps(hist.counts), hist.total, hist.count)
        )
    snap.account_sid = state.account_sid
    snap.usage = snapshot_usage(state)
    return snap


def _json_key(key: GroupKey) -> str:
    return json.dumps(list(key), ensure_ascii=False)


def _json_counts(counts: Mapping[str, float]) -> str:
    return json.dumps(dict(counts), ensure_ascii=False, allow_nan=False)


# ----------------------------------------------------------------------------------- writing


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_state(path: Path, snap: Snapshot, identity: StateIdentity, saved_at: float) -> Written:
    """Write ``snap`` to ``path`` atomically (blocking; run it in a worker thread).

    A SIM whose rows hold a value no state file may hold is left out and keeps the rows of the
    previous file, if it has any (see :func:`_insert_rows`); the rest is written as usual.
    """
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left over by a crash during an earlier save
    # Created here so the file is private from the first byte (it may hold IMEIs).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    account_sid = identity.known_account or snap.account_sid
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.executescript(_SCHEMA + USAGE_SCHEMA)
            conn.execute("BEGIN")
            meta = [
                ("application", APPLICATION),
                ("schema_version", str(SCHEMA_VERSION)),
                ("exporter_version", __version__),
                ("base_url", identity.base_url),
                ("account", identity.account),
                ("saved_at", repr(saved_at)),
            ]
            if account_sid is not None:
                meta.append(("account_sid", account_sid))
            if snap.aggregate_by is not None:
                meta.append(("aggregate_by", json.dumps(list(snap.aggregate_by))))
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta)
            written = _insert_rows(conn, snap, path)
            for sid in write_usage(conn, snap.usage):
                written.unsaved.setdefault(sid, "usage or status text that is not valid Unicode")
            conn.executemany("INSERT INTO durations VALUES (?, ?, ?, ?, ?)", snap.durations)
            _insert_aggregates(conn, snap)
            conn.execute("COMMIT")
        finally:
            conn.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return written


def _insert_aggregates(conn: sqlite3.Connection, snap: Snapshot) -> None:
    """The aggregates' rows; one SQLite refuses (text that is not Unicode) is left out alone:
    its group's counters, or its SIM's place, start again after a restart."""
    for insert, rows in (
        ("INSERT INTO aggregate_groups VALUES (?, ?)", snap.aggregate_groups),
        ("INSERT INTO aggregate_members VALUES (?, ?, ?)", snap.aggregate_members),
    ):
        try:
            conn.executemany(insert, rows)
        except (UnicodeEncodeError, sqlite3.Error, ValueError):
            for row in rows:
                with contextlib.suppress(UnicodeEncodeError, sqlite3.Error, ValueError):
                    conn.execute(insert, row)


#: The largest integer an SQLite INTEGER holds.
INT64_MAX: Final = 2**63 - 1
_INSERT_SESSION: Final = "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)"
#: Rows holding a negative count, which :func:`read_state` would reject.
_NEGATIVE: Final = (
    "SELECT sid FROM sims WHERE min(baselined, started_total, ended_total,"
    " packets_uploaded_total, packets_downloaded_total, imei_changes_total, open_sessions) < 0"
    " UNION SELECT sim_sid FROM sessions"
    " WHERE min(packets_uploaded, packets_downloaded, ended, absent) < 0"
)


class _UnsavableError(ValueError):
    """A cell no state file may hold (the message names the value)."""


def _storable(cell: object) -> object:
    """``cell`` as SQLite can store it: an integer beyond int64 as the float it is shown as."""
    if type(cell) is int and cell > INT64_MAX:
        try:
            return float(cell)
        except OverflowError:
            raise _UnsavableError(f"a number of {len(str(cell))} digits") from None
    if type(cell) is int and cell < 0:
        raise _UnsavableError(f"the negative count {cell}")
    if type(cell) is str:
        try:
            cell.encode("utf-8")
        except UnicodeEncodeError:
            raise _UnsavableError("text that is not valid Unicode") from None
    return cell


def _insert_rows(conn: sqlite3.Connection, snap: Snapshot, previous: Path) -> Written:
    """Insert the SIM and session rows; a SIM that cannot be written keeps its previous rows.

    The fast path inserts everything at once. Only when SQLite refuses a value (an integer
    beyond int64, text that is not Unicode) are the rows inserted one by one, to find the SIMs
    at fault; negative counts, which SQLite stores but the loader rejects, are found by a query.
    """
    written = Written()
    try:
        conn.executemany(_INSERT_SIM, snap.sims)
        conn.executemany(_INSERT_SESSION, snap.sessions)
    except (OverflowError, UnicodeEncodeError, sqlite3.Error, ValueError):
        # No ROLLBACK: the new file has no journal. The two tables hold only these rows.
        conn.execute("DELETE FROM sims")
        conn.execute("DELETE FROM sessions")
        _insert_one_by_one(conn, snap, written.unsaved)
    for (sid,) in conn.execute(_NEGATIVE).fetchall():
        written.unsaved.setdefault(sid, "a negative count")
    if written.unsaved:
        bad = list(written.unsaved)
        marks = ",".join("?" * len(bad))
        conn.execute(f"DELETE FROM sims WHERE sid IN ({marks})", bad)  # noqa: S608 - marks only
        conn.execute(f"DELETE FROM sessions WHERE sim_sid IN ({marks})", bad)  # noqa: S608
        _keep_previous_rows(conn, previous, bad)
    return written


def _insert_one_by_one(conn: sqlite3.Connection, snap: Snapshot, unsaved: dict[str, str]) -> None:
    for row in snap.sims:
        try:
            conn.execute(_INSERT_SIM, tuple(_storable(cell) for cell in row))
        except (_UnsavableError, OverflowError, sqlite3.Error) as exc:
            unsaved.setdefault(row[0], str(exc))
    for ses in snap.sessions:
        if ses[0] in unsaved:
            continue
        try:
            conn.execute(_INSERT_SESSION, tuple(_storable(cell) for cell in ses))
        except (_UnsavableError, OverflowError, sqlite3.Error) as exc:
            unsaved.setdefault(ses[0], str(exc))


def _keep_previous_rows(conn: sqlite3.Connection, previous: Path, sids: list[str]) -> None:
    """Copy the rows of ``sids`` from the previous file (which this exporter wrote or loaded).

    Restoring an older row is what a restart after a crash does anyway: the SIM's next listing
    counts on top of it, so nothing is lost that the API still lists."""
    if not previous.exists():
        return
    marks = ",".join("?" * len(sids))
    try:
        old = sqlite3.connect(f"{previous.resolve().as_uri()}?mode=ro", uri=True)
        try:
            sims = old.execute(
                f"SELECT * FROM sims WHERE sid IN ({marks})",  # noqa: S608 - marks only
                sids,
            ).fetchall()
            sessions = old.execute(
                f"SELECT * FROM sessions WHERE sim_sid IN ({marks})",  # noqa: S608
                sids,
            ).fetchall()
        finally:
            old.close()
        try:
            conn.executemany(_INSERT_SIM, sims)
            conn.executemany(_INSERT_SESSION, sessions)
        except sqlite3.Error:  # all of a SIM's rows, or none (no journal to roll back)
            conn.execute(f"DELETE FROM sims WHERE sid IN ({marks})", sids)  # noqa: S608
            conn.execute(f"DELETE FROM sessions WHERE sim_sid IN ({marks})", sids)  # noqa: S608
            raise
    except sqlite3.Error as exc:
        log.warning(
            "cannot keep the previous rows of %d SIMs from %s: %s", len(sids), previous, exc
        )


# ----------------------------------------------------------------------------------- reading

#: A counter, a count or a flag: an integer (not a float, not a bool), never negative. A
#: counter beyond int64 is stored as a float (see :func:`_storable`) and read back as an integer.
Count = Annotated[int, msgspec.Meta(ge=0)]
#: A SID: text, not empty.
Sid = Annotated[str, msgspec.Meta(min_length=1)]
#: A unix time from the API: 1970 up to the end of year 9999.
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=253_402_300_799)]
Latitude = Annotated[float, msgspec.Meta(ge=-90, le=90)]
Longitude = Annotated[float, msgspec.Meta(ge=-180, le=180)]


class _Row(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """A table row as SQLite returns it (a tuple in column order), checked cell by cell by
    :func:`_decode` against the types its subclass declares, in the order of ``_SCHEMA``."""


class SimRow(_Row):
    sid: Sid
    baselined: Count
    started_total: Count
    ended_total: Count
    packets_uploaded_total: Count
    packets_downloaded_total: Count
    imei_changes_total: Count
    open_sessions: Count
    latest_radio_link: str | None
    latest_operator_name: str | None
    latest_operator_country: str | None
    latest_operator_mcc: str | None
    latest_operator_mnc: str | None
    latest_imei: str | None
    latest_start: Timestamp | None
    latitude: Latitude | None
    longitude: Longitude | None
    location_start: Timestamp | None
    last_updated: Timestamp | None
    last_imei: str | None
    last_success: Timestamp | None


class SessionRow(_Row):
    sim_sid: str
    sid: Sid
    packets_uploaded: Count
    packets_downloaded: Count
    ended: Count
    absent: Count


class DurationRow(_Row):
    radio_link: str
    bounds: str
    """JSON list of the bucket bounds."""
    counts: str
    """JSON list of the per-bucket counts (one more than the bounds: the +Inf bucket)."""
    total: float
    count: Count


class AggregateGroupRow(_Row):
    key: str
    """JSON list of the group's label values."""
    carried: str
    """JSON object: source key -> carried remainder."""


class AggregateMemberRow(_Row):
    sid: Sid
    key: str
    counters: str
    """JSON object: source key -> what the SIM contributed."""


#: A carried remainder or contribution: a finite count, never negative.
_Amount = Annotated[float, msgspec.Meta(ge=0)]
_AMOUNTS: Final = msgspec.json.Decoder(dict[str, _Amount])
_KEY: Final = msgspec.json.Decoder(list[str])


def _aggregate_key(text: str, table: str) -> GroupKey:
    try:
        return tuple(_KEY.decode(text))
    except msgspec.DecodeError as exc:
        raise StateFileError(f"bad key {text!r} in table {table} ({_reason(exc)})") from None


def _amounts(text: str, table: str) -> dict[str, float]:
    try:
        amounts = _AMOUNTS.decode(text)
    except msgspec.DecodeError as exc:
        raise StateFileError(f"bad counts {text!r} in table {table} ({_reason(exc)})") from None
    if any(value != value or value == float("inf") for value in amounts.values()):
        raise StateFileError(f"bad counts {text!r} in table {table} (not finite)")
    return amounts


_ROWS_LOGGED: Final = 10
_CELL_AT: Final = re.compile(r"(?P<reason>.*) - at `\$\[(?P<index>\d+)\]`$")


_R = TypeVar("_R", bound=_Row)


def _decode(row: tuple[Any, ...], kind: type[_R], table: str) -> _R:
    """``row`` as a ``kind``, or a :class:`StateFileError` naming the bad cell and its value."""
    for _ in range(len(row)):  # each round may take up one counter stored as a float
        try:
            return msgspec.convert(row, kind, strict=True)
        except msgspec.ValidationError as exc:
            message = _reason(exc)
            cell = _CELL_AT.match(message)
            if cell is None:  # the row itself: too few or too many columns
                raise StateFileError(f"bad {table} row ({message})") from None
            index = int(cell["index"])
            value = row[index]
            field = kind.__struct_fields__[index]
            if _is_big_count(value) and kind.__annotations__.get(field) == "Count":
                row = (*row[:index], int(value), *row[index + 1 :])
                continue
            reason = cell["reason"]
            raise StateFileError(f"bad {field}: {value!r} in table {table} ({reason})") from None
    raise StateFileError(f"bad {table} row")


def _is_big_count(value: object) -> bool:
    """A counter beyond int64, as :func:`_storable` writes it: a whole float above the range."""
    return type(value) is float and value > INT64_MAX and value.is_integer()


def _reason(exc: msgspec.DecodeError) -> str:
    text = str(exc)
    return text[:1].lower() + text[1:]


def _account(row: SimRow) -> SimAccount:
    latest: SessionAttributes | None = None
    if row.latest_radio_link is not None:
        latest = SessionAttributes(
            shared(row.latest_radio_link),
            shared(row.latest_operator_name),
            shared(row.latest_operator_country),
            shared(row.latest_operator_mcc),
            shared(row.latest_operator_mnc),
            row.latest_imei or "",
        )
    lat, lon = row.latitude, row.longitude
    return SimAccount(
        baselined=bool(row.baselined),
        started_total=row.started_total,
        ended_total=row.ended_total,
        packets_uploaded_total=row.packets_uploaded_total,
        packets_downloaded_total=row.packets_downloaded_total,
        imei_changes_total=row.imei_changes_total,
        open_sessions=row.open_sessions,
        latest=latest,
        latest_start=row.latest_start,
        location=None if lat is None or lon is None else (lat, lon),
        location_start=row.location_start,
        last_updated=row.last_updated,
        last_imei=row.last_imei,
    )


def _histogram(row: DurationRow) -> Histogram | None:
    """The histogram of ``row``; None when its buckets are not today's (it starts afresh)."""
    try:
        bounds = msgspec.json.decode(row.bounds, type=list[float])
        counts = msgspec.json.decode(row.counts, type=list[Count])
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise StateFileError(
            f"bad duration histogram of {row.radio_link!r} ({_reason(exc)})"
        ) from None
    if tuple(bounds) != SESSION_DURATION_BUCKETS:
        return None  # buckets changed between versions: start this histogram afresh
    if len(counts) != len(bounds) + 1:
        raise StateFileError(
            f"bad duration histogram of {row.radio_link!r}: {len(counts)} counts for"
            f" {len(bounds)} buckets and +Inf"
        )
    if sum(counts) != row.count:
        raise StateFileError(
            f"inconsistent duration histogram of {row.radio_link!r}: its buckets hold"
            f" {sum(counts)} sessions, its count says {row.count}"
        )
    return Histogram(SESSION_DURATION_BUCKETS, counts, row.total, row.count)


def read_state(
    path: Path, identity: StateIdentity, keep: Callable[[str], bool] | None = None
) -> LoadedState:
    """The state in ``path`` (SIMs for which ``keep(sid)`` is false are skipped).

    Raises :class:`StateFileError` (never a raw ``sqlite3`` error) if the file is unusable.
    """
    if path.stat().st_size == 0:
        raise StateFileError("the file is empty")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateFileError(f"cannot open it: {exc}") from None
    try:
        return _read(conn, identity, keep)
    except sqlite3.Error as exc:
        raise StateFileError(f"not a readable state database ({exc})") from None
    finally:
        conn.close()


def _read(
    conn: sqlite3.Connection, identity: StateIdentity, keep: Callable[[str], bool] | None
) -> LoadedState:
    check = conn.execute("PRAGMA quick_check").fetchall()
    if check != [("ok",)]:
        raise StateFileError(f"the database is damaged ({check[0][0] if check else '?'})")
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError:
        raise StateFileError("it is not a state file of this exporter (no meta table)") from None
    if meta.get("application") != APPLICATION:
        raise StateFileError("it is not a state file of this exporter")
    version_text = meta.get("schema_version", "")
    if not str(version_text).isdigit():
        raise StateFileError(f"unknown schema version {version_text!r}")
    version = int(version_text)
    written_by = str(meta.get("exporter_version", "?"))
    if version > SCHEMA_VERSION:
        raise StateFileError(
            f"it was written by a newer exporter ({written_by}, schema {version};"
            f" this is {__version__}, schema {SCHEMA_VERSION})"
        )
    missing = _MIGRATED.get(version, frozenset()) if version < SCHEMA_VERSION else frozenset()
    if version < SCHEMA_VERSION and version not in _MIGRATED:
        raise StateFileError(f"schema {version} is too old to be read (expected {SCHEMA_VERSION})")
    unverified = _check_identity(meta, identity)
    try:
        saved_at = float(meta.get("saved_at", "nan"))
    except ValueError:
        saved_at = float("nan")
    tables: tuple[tuple[str, type[_Row]], ...] = (
        ("sims", SimRow),
        ("sessions", SessionRow),
        ("durations", DurationRow),
        ("aggregate_groups", AggregateGroupRow),
        ("aggregate_members", AggregateMemberRow),
    )
    for table, kind in tables:
        if table in missing:
            continue
        columns = [info[1] for info in conn.execute(f"PRAGMA table_info({table})")]
        if not columns:
            raise StateFileError(f"not a readable state database (no such table: {table})")
        if columns != list(kind.__struct_fields__):  # a layout this version does not know
            raise StateFileError(f"bad {table} row (columns {', '.join(columns)})")

    rejected: list[tuple[str, str]] = []
    accounts: dict[str, SimAccount] = {}
    last_success: dict[str, float] = {}
    for cells in conn.execute("SELECT * FROM sims"):
        if keep is not None and isinstance(cells[0], str) and not keep(cells[0]):
            continue  # no longer monitored: not even checked
        try:
            sim = _decode(cells, SimRow, "sims")
        except StateFileError as exc:
            rejected.append(("sims", _row_problem(exc, cells[0])))
            continue
        accounts[sim.sid] = _account(sim)
        if sim.last_success is not None:
            last_success[sim.sid] = sim.last_success
    for cells in conn.execute("SELECT * FROM sessions"):
        owner = cells[0]
        acct_of = accounts.get(owner) if isinstance(owner, str) else None
        if acct_of is None:
            continue  # a SIM that is no longer monitored, was rejected, or a stray row
        try:
            ses = _decode(cells, SessionRow, "sessions")
        except StateFileError as exc:
            # Without this session the SIM would count it again as new: the whole SIM goes.
            rejected.append(("sessions", _row_problem(exc, owner)))
            del accounts[owner]
            last_success.pop(owner, None)
            continue
        acct_of.sessions[ses.sid] = SessionMemo(
            ses.packets_uploaded, ses.packets_downloaded, bool(ses.ended), ses.absent
        )
    durations: dict[str, Histogram] = {}
    for cells in conn.execute("SELECT * FROM durations"):
        try:
            row = _decode(cells, DurationRow, "durations")
            hist = _histogram(row)
        except StateFileError as exc:
            rejected.append(("durations", f"{exc}; that histogram starts afresh"))
            continue
        if hist is not None:
            durations[row.radio_link] = hist
    usage = read_usage(conn, keep)
    rejected.extend(usage.rejected)
    loaded = LoadedState(
        accounts, last_success, durations, saved_at, written_by, rejected, unverified, usage
    )
    if not missing:
        _read_aggregates(conn, meta, loaded, keep)
    return loaded


def _read_aggregates(
    conn: sqlite3.Connection,
    meta: dict[Any, Any],
    loaded: LoadedState,
    keep: Callable[[str], bool] | None,
) -> None:
    """The aggregates' rows into ``loaded``; a bad row costs its group's remainders or its
    SIM's place, counted and logged like the other tables."""
    by = meta.get("aggregate_by")
    if by is None:
        return
    try:
        loaded.aggregate_by = tuple(_KEY.decode(str(by)))
    except msgspec.DecodeError:
        loaded.rejected.append(("aggregate_groups", f"bad aggregate_by {by!r}; they start afresh"))
        return
    for cells in conn.execute("SELECT * FROM aggregate_groups"):
        try:
            group = _decode(cells, AggregateGroupRow, "aggregate_groups")
            key = _aggregate_key(group.key, "aggregate_groups")
            loaded.aggregate_groups[key] = _amounts(group.carried, "aggregate_groups")
        except StateFileError as exc:
            why = f"{exc}; that group's counters start again from its SIMs' counts"
            loaded.rejected.append(("aggregate_groups", why))
    for cells in conn.execute("SELECT * FROM aggregate_members"):
        if keep is not None and isinstance(cells[0], str) and not keep(cells[0]):
            continue  # no longer monitored: its count stays with its group anyway
        try:
            member = _decode(cells, AggregateMemberRow, "aggregate_members")
            key = _aggregate_key(member.key, "aggregate_members")
            counters = _amounts(member.counters, "aggregate_members")
        except StateFileError as exc:
            why = f"{exc}; that SIM joins its group afresh"
            loaded.rejected.append(("aggregate_members", why))
            continue
        loaded.aggregate_members[member.sid] = AggregateMember(key, counters)


def _row_problem(exc: StateFileError, sid: object) -> str:
    who = f"SIM {sid}" if isinstance(sid, str) and sid else "a SIM without a SID"
    return f"{exc}; {who} starts a fresh baseline"


def _check_identity(meta: dict[Any, Any], identity: StateIdentity) -> str | None:
    """Raise if the file is another API's or account's; else the file's account SID when it
    still has to be checked against the API's answers (no account SID configured).

    The account SID decides, not the credential: a rotated API key or OAuth2 client of the same
    account keeps the file. A file without an account SID (written by an earlier version with
    an API key or an OAuth2 client, or before any answer named the account) is taken up: SIM
    SIDs are unique across accounts, so it cannot restore another account's SIMs.
    """
    stored = meta.get("account_sid")
    if not is_account_sid(stored):
        legacy = meta.get("account")
        stored = legacy if is_account_sid(legacy) else None
    configured = identity.known_account
    same_api = meta.get("base_url") == identity.base_url
    if not same_api or (stored is not None and configured is not None and stored != configured):
        raise StateFileError(
            f"it belongs to another API or account ({meta.get('base_url')!r},"
            f" {stored or meta.get('account')!r}; configured: {identity.base_url!r},"
            f" {configured or identity.account!r})"
        )
    if configured is None and stored is not None:
        return cast(str, stored)
    return None


# ----------------------------------------------------------------------------------- the store


class StateStore:
    """Loads the state file at start and saves it periodically and at shutdown."""

    def __init__(
        self,
        path: Path,
        identity: StateIdentity,
        *,
        registry: CollectorRegistry | None = None,
        wall_time: Callable[[], float] = time.time,
        aggregates: FleetAggregates | None = None,
    ) -> None:
        """``aggregates``: the fleet aggregates whose remainders the file keeps."""
        self.path = path
        self.aggregates = aggregates
        self.identity = identity
        self._time = wall_time
        self._lock = asyncio.Lock()
        self._writing: asyncio.Future[Written] | None = None
        self._saved_version: int | None = None
        self.last_duration: float | None = None
        self.unsaved: dict[str, str] = {}
        """SIMs the latest save could not write from memory (their previous rows were kept)."""
        self._errors: Counter | None = None
        self._last_save: Gauge | None = None
        self._save_seconds: Gauge | None = None
        self._rejected: Counter | None = None
        self._unsaved_gauge: Gauge | None = None
        if registry is not None:
            self._rejected = Counter(
                names.STATE_ROWS_REJECTED.name,
                names.STATE_ROWS_REJECTED.help,
                names.STATE_ROWS_REJECTED.labels,
                registry=registry,
            )
            for table in TABLES:
                self._rejected.labels(table)
            self._unsaved_gauge = Gauge(
                names.STATE_UNSAVED_SIMS.name, names.STATE_UNSAVED_SIMS.help, registry=registry
            )
            self._errors = Counter(
                names.STATE_SAVE_ERRORS.name, names.STATE_SAVE_ERRORS.help, registry=registry
            )
            self._last_save = Gauge(
                names.STATE_LAST_SAVE.name, names.STATE_LAST_SAVE.help, registry=registry
            )
            self._save_seconds = Gauge(
                names.STATE_SAVE_DURATION.name, names.STATE_SAVE_DURATION.help, registry=registry
            )

    # -- loading ------------------------------------------------------------------------------

    def load(self, state: FleetState, keep: Callable[[str], bool]) -> LoadedState | None:
        """Restore the file into ``state`` (held until each SIM is polled); None: fresh start."""
        if not self.path.exists():
            log.info("no state file at %s yet; starting fresh", self.path)
            return None
        started = time.perf_counter()
        try:
            loaded = read_state(self.path, self.identity, keep)
        except StateFileError as exc:
            self._reject(exc)
            return None
        except OSError as exc:
            raise StateUnreadableError(
                f"state file {self.path} cannot be read ({exc}); it is left as it is: fix the"
                " cause (permissions, disk) or move the file away to start fresh"
            ) from exc
        for sid, success in loaded.last_success.items():
            record = state.sims.get(sid)
            if record is not None and record.last_success is None:
                record.last_success = success
        state.restore(loaded.accounts, loaded.durations)
        restore_usage(state, loaded.usage)
        state.unverified_account = loaded.unverified_account
        self._restore_aggregates(loaded)
        self._report_rejected(loaded.rejected)
        sessions = sum(len(a.sessions) for a in loaded.accounts.values())
        log.info(
            "restored %d SIMs (%d remembered sessions) from %s, saved %s by version %s"
            " (%.0f ms); their counters continue after their next poll",
            len(loaded.accounts),
            sessions,
            self.path,
            _ago(loaded.saved_at, self._time()),
            loaded.exporter_version,
            (time.perf_counter() - started) * 1000,
        )
        return loaded

    def _restore_aggregates(self, loaded: LoadedState) -> None:
        aggregates = self.aggregates
        if aggregates is None or loaded.aggregate_by is None:
            return
        if loaded.aggregate_by != aggregates.by:
            log.info(
                "state file %s: its fleet aggregates were grouped by %s, now by %s; they start"
                " from the SIMs' counters",
                self.path,
                list(loaded.aggregate_by),
                list(aggregates.by),
            )
            return
        aggregates.restore(
            loaded.aggregate_groups, loaded.aggregate_members, account=loaded.unverified_account
        )

    def _report_rejected(self, rejected: list[tuple[str, str]]) -> None:
        """One warning per rejected row (the first few), then one line for the rest."""
        for index, (table, why) in enumerate(rejected):
            if self._rejected is not None:
                self._rejected.labels(table).inc()
            if index < _ROWS_LOGGED:
                log.warning("state file %s: ignoring a row of table %s: %s", self.path, table, why)
        if len(rejected) > _ROWS_LOGGED:
            log.warning(
                "state file %s: %d more rows rejected (see %s)",
                self.path,
                len(rejected) - _ROWS_LOGGED,
                names.STATE_ROWS_REJECTED.series[0],
            )

    def _reject(self, exc: BaseException) -> None:
        aside = self.path.with_name(self.path.name + ".rejected")
        try:
            os.replace(self.path, aside)
            where = f"it was moved to {aside}"
        except OSError as move_error:
            where = f"it could not be moved aside ({move_error}) and will be overwritten"
        log.warning(
            "ignoring state file %s: %s; starting fresh (counters restart from zero, every SIM"
            " is baselined again); %s",
            self.path,
            exc,
            where,
        )

    # -- saving -------------------------------------------------------------------------------

    async def save(self, state: FleetState, *, force: bool = False) -> bool:
        """Write the state now (unless nothing changed since the last save). True on success."""
        async with self._lock:
            if self._writing is not None and not self._writing.done():
                # A save cancelled while its thread was writing: let that write finish first.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._writing)
            version = state.version
            if not force and version == self._saved_version:
                return True
            started = time.perf_counter()
            snap = snapshot(state, self.aggregates)
            loop = asyncio.get_running_loop()
            self._writing = loop.run_in_executor(
                None, write_state, self.path, snap, self.identity, self._time()
            )
            try:
                written = await asyncio.shield(self._writing)
            except (OSError, sqlite3.Error, ValueError, OverflowError) as exc:
                log.warning("cannot save state to %s: %s", self.path, exc)
                if self._errors is not None:
                    self._errors.inc()
                return False
            self._note_unsaved(written.unsaved)
            self._saved_version = version
            self.last_duration = time.perf_counter() - started
            if self._last_save is not None and self._save_seconds is not None:
                self._last_save.set(self._time())
                self._save_seconds.set(self.last_duration)
            log.debug(
                "saved %d SIMs, %d sessions to %s in %.0f ms",
                len(snap.sims),
                len(snap.sessions),
                self.path,
                self.last_duration * 1000,
            )
            return True

    def _note_unsaved(self, unsaved: dict[str, str]) -> None:
        """Log each SIM once when a save first leaves it out, and once when it is saved again."""
        for sid, why in unsaved.items():
            if sid not in self.unsaved:
                log.warning(
                    "cannot save the state of SIM %s (it holds %s, which a state file cannot"
                    " hold); its previous saved state is kept",
                    sid,
                    why,
                )
        back = [sid for sid in self.unsaved if sid not in unsaved]
        if back:
            log.info("the state of %d SIMs is saved again", len(back))
        self.unsaved = dict(unsaved)
        if self._unsaved_gauge is not None:
            self._unsaved_gauge.set(len(unsaved))

    async def run(
        self,
        state: FleetState,
        interval: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        tick: float = 1.0,
    ) -> None:
        """Save every ``interval`` seconds until cancelled (failures are logged, never raised),
        and also as soon as every SIM has its baseline (checked every ``tick`` seconds).

        Without the early save a crash before the first interval would lose every baseline,
        so sessions that start and end while the exporter is down would never be counted. It
        fires again whenever more SIMs have a baseline and none is missing one (SIMs found by
        discovery later), never more often than every ``tick``.
        """
        step = min(tick, interval)
        waited = 0.0
        # SIMs restored from the file have their baseline already: no early save for them.
        saved_baselines = complete_baselines(state) or 0
        while True:
            await sleep(step)
            waited += step
            baselines = complete_baselines(state)
            early = baselines is not None and baselines > saved_baselines
            if waited < interval and not early:
                continue
            waited = 0.0
            try:
                if await self.save(state) and baselines is not None:
                    saved_baselines = baselines
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop future saves
                log.exception("unexpected error while saving state to %s", self.path)


def complete_baselines(state: FleetState) -> int | None:
    """How many SIMs have a baseline (from a poll, or restored and still held), when none
    lacks one; ``None`` while some SIM lacks one."""
    held = state.restored
    for sid, record in state.sims.items():
        if not record.account.baselined and sid not in held:
            return None
    return len(state.sims)


class StateUnavailableError(Exception):
    """The state file cannot be used at all, so the exporter refuses to start rather than
    overwrite it with fresh counters (the message is shown to the operator)."""


class StateLockedError(StateUnavailableError):
    """Another process holds the state file's lock."""


class StateUnreadableError(StateUnavailableError):
    """The file exists but the system refused to read it (permissions, I/O error, no file
    descriptors left): nothing says it is damaged, so it is neither moved aside nor replaced."""


class StateLock:
    """``<path>.lock``, locked with ``flock`` for as long as this process uses ``path``.

    Two exporters given the same ``state.path`` (two shards by mistake) would overwrite each
    other's saves; the second one is refused at start instead. The lock file holds the PID of
    the holder for the message; the lock itself is released by the kernel when the process
    ends, however it ends, so a ``SIGKILL`` never leaves a stale lock behind.
    """

    def __init__(self, path: Path) -> None:
        self.state_path = path
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # Saves into that directory will fail too, and are counted and logged: no reason to
            # refuse to serve what the API says.
            log.warning("cannot lock the state file %s (%s); continuing unlocked", self.path, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateLockedError(
                f"state file {self.state_path} is in use by another exporter"
                f"{f' (pid {holder})' if holder else ''}: give each exporter its own state.path"
            ) from None
        except OSError as exc:
            os.close(fd)
            log.warning("cannot lock the state file %s (%s); continuing unlocked", self.path, exc)
            return
        with contextlib.suppress(OSError):  # the PID is only for the message
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _ago(saved_at: float, now: float) -> str:
    if saved_at != saved_at:
        return "at an unknown time"
    seconds = max(0.0, now - saved_at)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
