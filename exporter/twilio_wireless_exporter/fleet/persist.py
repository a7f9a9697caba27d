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
crashes on a bad file. SIMs in the file that are no longer monitored are dropped.

Restored state is *held* until the SIMs are polled again (see
:meth:`~twilio_wireless_exporter.fleet.state.FleetState.restore`): the file can be older than
what the exporter showed just before a crash, and showing the older, lower counters would look
like a counter reset to Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.config import BasicCredentials, Config
from twilio_wireless_exporter.fleet.accounting import SessionAttributes, SessionMemo, SimAccount
from twilio_wireless_exporter.fleet.state import SESSION_DURATION_BUCKETS, FleetState, Histogram

log = logging.getLogger(__name__)

#: Version of the file layout. Bump it (and teach :func:`read_state` the old one, if worth it)
#: whenever a table or column changes meaning.
SCHEMA_VERSION: Final = 1
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
"""

_INSERT_SIM: Final = (
    "INSERT INTO sims VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class StateFileError(Exception):
    """Why a state file cannot be used (the message is shown to the operator)."""


@dataclass(frozen=True, slots=True)
class StateIdentity:
    """Whose state a file holds: a file written for another API or account is foreign."""

    base_url: str
    account: str


def state_identity(config: Config) -> StateIdentity:
    """The API base URL and the account (or API key / OAuth2 client) of ``config``."""
    creds = config.twilio.credentials
    if isinstance(creds, BasicCredentials):
        account = creds.account_sid or creds.username
    else:
        account = f"oauth2:{creds.client_id}"
    return StateIdentity(base_url=config.twilio.base_url.rstrip("/"), account=account)


@dataclass(slots=True)
class Snapshot:
    """Rows of one save, taken on the event loop and written by a worker thread."""

    sims: list[tuple[Any, ...]] = field(default_factory=list)
    sessions: list[tuple[str, str, int, int, int, int]] = field(default_factory=list)
    durations: list[tuple[str, str, str, float, int]] = field(default_factory=list)


@dataclass(slots=True)
class LoadedState:
    """What a state file holds."""

    accounts: dict[str, SimAccount]
    last_success: dict[str, float]
    durations: dict[str, Histogram]
    saved_at: float
    exporter_version: str


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


def snapshot(state: FleetState) -> Snapshot:
    """Everything worth keeping of ``state``, as rows (cheap; runs on the event loop).

    A SIM whose restored account is still held (not polled since the restart) is saved with
    that account, so a second crash right after a restart loses nothing either.
    """
    snap = Snapshot()
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
    return snap


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


def write_state(path: Path, snap: Snapshot, identity: StateIdentity, saved_at: float) -> None:
    """Write ``snap`` to ``path`` atomically (blocking; run it in a worker thread)."""
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left over by a crash during an earlier save
    # Created here so the file is private from the first byte (it may hold IMEIs).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("application", APPLICATION),
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("exporter_version", __version__),
                    ("base_url", identity.base_url),
                    ("account", identity.account),
                    ("saved_at", repr(saved_at)),
                ],
            )
            conn.executemany(_INSERT_SIM, snap.sims)
            conn.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)", snap.sessions)
            conn.executemany("INSERT INTO durations VALUES (?, ?, ?, ?, ?)", snap.durations)
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


# ----------------------------------------------------------------------------------- reading

#: A counter, a count or a flag: an integer (not a float, not a bool), never negative.
Count = Annotated[int, msgspec.Meta(ge=0)]
#: A SID: text, not empty.
Sid = Annotated[str, msgspec.Meta(min_length=1)]


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
    latest_start: float | None
    latitude: float | None
    longitude: float | None
    location_start: float | None
    last_updated: float | None
    last_imei: str | None
    last_success: float | None


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


_CELL_AT: Final = re.compile(r"(?P<reason>.*) - at `\$\[(?P<index>\d+)\]`$")


_R = TypeVar("_R", bound=_Row)


def _decode(row: tuple[Any, ...], kind: type[_R], table: str) -> _R:
    """``row`` as a ``kind``, or a :class:`StateFileError` naming the bad cell and its value."""
    try:
        return msgspec.convert(row, kind, strict=True)
    except msgspec.ValidationError as exc:
        message = _reason(exc)
        cell = _CELL_AT.match(message)
        if cell is None:  # the row itself: too few or too many columns
            raise StateFileError(f"bad {table} row ({message})") from None
        index = int(cell["index"])
        field = kind.__struct_fields__[index]
        raise StateFileError(
            f"bad {field}: {row[index]!r} in table {table} ({cell['reason']})"
        ) from None


def _reason(exc: msgspec.DecodeError) -> str:
    text = str(exc)
    return text[:1].lower() + text[1:]


def _account(row: SimRow) -> SimAccount:
    latest: SessionAttributes | None = None
    if row.latest_radio_link is not None:
        latest = SessionAttributes(
            row.latest_radio_link,
            row.latest_operator_name or "",
            row.latest_operator_country or "",
            row.latest_operator_mcc or "",
            row.latest_operator_mnc or "",
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
    if version < SCHEMA_VERSION:
        raise StateFileError(f"schema {version} is too old to be read (expected {SCHEMA_VERSION})")
    if meta.get("base_url") != identity.base_url or meta.get("account") != identity.account:
        raise StateFileError(
            f"it belongs to another API or account ({meta.get('base_url')!r},"
            f" {meta.get('account')!r}; configured: {identity.base_url!r}, {identity.account!r})"
        )
    try:
        saved_at = float(meta.get("saved_at", "nan"))
    except ValueError:
        saved_at = float("nan")

    accounts: dict[str, SimAccount] = {}
    last_success: dict[str, float] = {}
    for cells in conn.execute("SELECT * FROM sims"):
        sim = _decode(cells, SimRow, "sims")
        if keep is not None and not keep(sim.sid):
            continue
        accounts[sim.sid] = _account(sim)
        if sim.last_success is not None:
            last_success[sim.sid] = sim.last_success
    for cells in conn.execute("SELECT * FROM sessions"):
        if len(cells) != len(SessionRow.__struct_fields__):
            raise StateFileError("bad sessions row")
        acct_of = accounts.get(cells[0])
        if acct_of is None:
            continue  # a SIM that is no longer monitored (or a stray row)
        ses = _decode(cells, SessionRow, "sessions")
        acct_of.sessions[ses.sid] = SessionMemo(
            ses.packets_uploaded, ses.packets_downloaded, bool(ses.ended), ses.absent
        )
    durations: dict[str, Histogram] = {}
    for cells in conn.execute("SELECT * FROM durations"):
        row = _decode(cells, DurationRow, "durations")
        hist = _histogram(row)
        if hist is not None:
            durations[row.radio_link] = hist
    return LoadedState(accounts, last_success, durations, saved_at, written_by)


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
    ) -> None:
        self.path = path
        self.identity = identity
        self._time = wall_time
        self._lock = asyncio.Lock()
        self._writing: asyncio.Future[None] | None = None
        self._saved_version: int | None = None
        self.last_duration: float | None = None
        self._errors: Counter | None = None
        self._last_save: Gauge | None = None
        self._save_seconds: Gauge | None = None
        if registry is not None:
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
        except (StateFileError, OSError) as exc:
            self._reject(exc)
            return None
        for sid, success in loaded.last_success.items():
            record = state.sims.get(sid)
            if record is not None and record.last_success is None:
                record.last_success = success
        state.restore(loaded.accounts, loaded.durations)
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
            snap = snapshot(state)
            loop = asyncio.get_running_loop()
            self._writing = loop.run_in_executor(
                None, write_state, self.path, snap, self.identity, self._time()
            )
            try:
                await asyncio.shield(self._writing)
            except (OSError, sqlite3.Error, ValueError, OverflowError) as exc:
                log.warning("cannot save state to %s: %s", self.path, exc)
                if self._errors is not None:
                    self._errors.inc()
                return False
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

    async def run(
        self,
        state: FleetState,
        interval: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Save every ``interval`` seconds until cancelled (failures are logged, never raised)."""
        while True:
            await sleep(interval)
            try:
                await self.save(state)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop future saves
                log.exception("unexpected error while saving state to %s", self.path)


def _ago(saved_at: float, now: float) -> str:
    if saved_at != saved_at:
        return "at an unknown time"
    seconds = max(0.0, now - saved_at)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
