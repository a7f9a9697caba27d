"""Session accounting: the pure core where the counter semantics live.

Given the per-SIM state and a fresh listing of a SIM's data sessions, :func:`apply_listing`
updates the state in place and returns what happened. No I/O and no clock of its own.

Semantics (the metric contract):

* The first successful listing of a SIM is the *baseline*: the sessions in it are remembered
  but not counted as started or ended, and their packets so far are not counted.
* Afterwards, every session ``sid`` not seen before counts once as started, with all of its
  packets; a session seen to get an ``end`` (or first seen already ended) counts once as ended
  and its duration is observed once.
* Packet counters grow by the growth of each session's counters since it was first seen; a
  counter that goes backwards (an upstream glitch) contributes nothing and is not re-counted.
* Counters saturate at ``2**63 - 1`` (the state file's integers) rather than overflow.
* Each session is applied whole or not at all; a listing never half-applies.
* Listings may repeat a session (overlapping pages) and come in any order: sessions are
  de-duplicated by ``sid``, keeping the most advanced copy.
* A session that leaves the listing is forgotten only after it has been absent from
  ``forget_after`` consecutive successful listings, so a page boundary that shifts while the
  exporter pages through a listing cannot make one session count twice. Per-SIM memory is
  therefore bounded by the API's own retention window.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from twilio_wireless_exporter.api.records import INT64_MAX, DataSession

DEFAULT_FORGET_AFTER = 3


# The long-lived per-SIM records below are msgspec Structs with ``gc=False``: they hold only
# scalars, strings and records of their own kind, so they can never be part of a reference
# cycle, and leaving them out of the cyclic garbage collector's bookkeeping keeps a full
# collection short at fleet scale, where its pause would land in the middle of scrapes
# (docs/performance.md has the figures).


class SessionMemo(msgspec.Struct, gc=False):
    """What is remembered of one session between listings."""

    packets_uploaded: int
    packets_downloaded: int
    ended: bool
    absent: int = 0


class SessionAttributes(msgspec.Struct, frozen=True, gc=False):
    """Attributes of a SIM's most recent session (exported as an info metric)."""

    radio_link: str
    operator_name: str
    operator_country: str
    operator_mcc: str
    operator_mnc: str
    imei: str


class SimAccount(msgspec.Struct, gc=False):
    """Accounting state of one SIM. Counters only ever grow.

    Not tracked by the garbage collector (see above); ``sessions``, the one container, is.
    """

    baselined: bool = False
    sessions: dict[str, SessionMemo] = msgspec.field(default_factory=dict)
    started_total: int = 0
    ended_total: int = 0
    packets_uploaded_total: int = 0
    packets_downloaded_total: int = 0
    imei_changes_total: int = 0
    open_sessions: int = 0
    latest: SessionAttributes | None = None
    latest_start: float | None = None
    location: tuple[float, float] | None = None
    location_start: float | None = None
    last_updated: float | None = None
    last_imei: str | None = None


@dataclass(slots=True)
class ListingOutcome:
    """What one listing changed (for logs, histograms and tests)."""

    started: int = 0
    ended: int = 0
    packets_uploaded: int = 0
    packets_downloaded: int = 0
    imei_changed: bool = False
    durations: list[tuple[str, float]] = field(default_factory=list)
    """``(radio_link, seconds)`` of each session newly seen ended."""
    forgotten: int = 0
    skipped_without_sid: int = 0
    invalid: int = 0
    """Sessions left out whole because a timestamp could not be converted."""


def _more_advanced(a: DataSession, b: DataSession) -> DataSession:
    """Of two copies of one session, the one that shows more progress."""
    if (a.end is None) != (b.end is None):
        return a if a.end is not None else b
    a_upd, b_upd = a.last_updated, b.last_updated
    if a_upd is not None and b_upd is not None and a_upd != b_upd:
        with contextlib.suppress(TypeError):  # naive and aware: undecided, by packets
            return a if a_upd > b_upd else b
    a_packets = (a.packets_uploaded or 0) + (a.packets_downloaded or 0)
    b_packets = (b.packets_uploaded or 0) + (b.packets_downloaded or 0)
    return b if b_packets > a_packets else a


def deduplicate(listing: Iterable[DataSession]) -> tuple[dict[str, DataSession], int]:
    """Sessions by ``sid`` (most advanced copy wins) and the count of sessions without a sid."""
    by_sid: dict[str, DataSession] = {}
    without_sid = 0
    for session in listing:
        sid = session.sid
        if not sid:
            without_sid += 1
            continue
        known = by_sid.get(sid)
        by_sid[sid] = session if known is None else _more_advanced(known, session)
    return by_sid, without_sid


_CONVERSION_ERRORS = (ValueError, OverflowError, OSError, TypeError, AttributeError)


def shared(value: str | None) -> str:
    """``value`` (``""`` for ``None``) as the one copy every SIM shares.

    Radio links, operators, countries, statuses and rate plans repeat across a fleet, but each
    decoded page makes its own copies; a SIM keeps its latest session's attributes and its
    identity for good, so without sharing every SIM would hold its own copy of each.
    """
    return sys.intern(value) if value else ""


def _seconds(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _count(value: int | None) -> int:
    """A packet count as remembered: absent and negative as 0, capped at int64."""
    if value is None or value <= 0:
        return 0
    return value if value <= INT64_MAX else INT64_MAX


def add_saturating(total: int, delta: int) -> int:
    """A counter grown by ``delta``, saturating at int64 (what the state file can hold)."""
    total += delta
    return total if total <= INT64_MAX else INT64_MAX


def apply_listing(
    account: SimAccount,
    listing: Iterable[DataSession],
    *,
    forget_after: int = DEFAULT_FORGET_AFTER,
    keep: Collection[str] = (),
) -> ListingOutcome:
    """Fold one successful listing of a SIM's sessions into ``account``.

    Each session is applied whole or not at all: everything about it that could fail is worked
    out before the account changes. ``keep`` names sessions that were listed but rejected (see
    ``api/records.py``): they are not counted, and their memory does not age while they are.
    """
    sessions, without_sid = deduplicate(listing)
    outcome = ListingOutcome(skipped_without_sid=without_sid)
    baseline = not account.baselined
    memos = account.sessions
    # (session, start, last_updated) of the sessions applied, for the latest-session logic
    applied: list[tuple[DataSession, float | None, float | None]] = []
    left_out: set[str] = set()
    open_sessions = 0

    for sid, session in sessions.items():
        # Everything that can fail comes first, before this session changes anything.
        try:
            start = _seconds(session.start)
            end = _seconds(session.end)
            updated = _seconds(session.last_updated)
        except _CONVERSION_ERRORS:
            outcome.invalid += 1
            left_out.add(sid)
            continue
        applied.append((session, start, updated))
        ended = end is not None
        if not ended:
            open_sessions += 1
        memo = memos.get(sid)
        if memo is None:
            up = _count(session.packets_uploaded)
            down = _count(session.packets_downloaded)
            memos[sid] = SessionMemo(up, down, ended)
            if baseline:
                continue
            outcome.started += 1
            outcome.packets_uploaded += up
            outcome.packets_downloaded += down
            if ended:
                outcome.ended += 1
                _observe_duration(outcome, session, start, end)
            continue
        memo.absent = 0
        delta, memo.packets_uploaded = _grow(memo.packets_uploaded, session.packets_uploaded)
        outcome.packets_uploaded += delta
        delta, memo.packets_downloaded = _grow(memo.packets_downloaded, session.packets_downloaded)
        outcome.packets_downloaded += delta
        if ended and not memo.ended:
            memo.ended = True
            outcome.ended += 1
            _observe_duration(outcome, session, start, end)

    # Forget sessions that have left the listing for long enough (bounded memory).
    if len(memos) > len(applied):
        gone = []
        for sid, memo in memos.items():
            if (sid not in sessions or sid in left_out) and sid not in keep:
                memo.absent += 1
                if memo.absent >= forget_after:
                    gone.append(sid)
        for sid in gone:
            del memos[sid]
        outcome.forgotten = len(gone)

    account.baselined = True
    account.started_total = add_saturating(account.started_total, outcome.started)
    account.ended_total = add_saturating(account.ended_total, outcome.ended)
    account.packets_uploaded_total = add_saturating(
        account.packets_uploaded_total, outcome.packets_uploaded
    )
    account.packets_downloaded_total = add_saturating(
        account.packets_downloaded_total, outcome.packets_downloaded
    )
    account.open_sessions = open_sessions
    _update_latest(account, applied, len(applied) < len(memos), outcome)
    return outcome


def _grow(previous: int, current: int | None) -> tuple[int, int]:
    """(delta to count, new remembered value) for a packet counter."""
    if current is None or current <= previous:
        return 0, previous
    current = _count(current)
    return current - previous, current


def _observe_duration(
    outcome: ListingOutcome, session: DataSession, start: float | None, end: float | None
) -> None:
    if start is not None and end is not None and end >= start:
        outcome.durations.append((session.radio_link or "", end - start))


def _update_latest(
    account: SimAccount,
    applied: Iterable[tuple[DataSession, float | None, float | None]],
    missing: bool,
    outcome: ListingOutcome,
) -> None:
    """Latest session, location and newest update from the sessions ``applied``; ``missing``
    says whether a remembered session is missing from them."""
    latest: DataSession | None = None
    latest_start: float | None = None
    location: tuple[float, float] | None = None
    location_start: float | None = None
    newest_update: float | None = None
    for session, start, updated in applied:
        if updated is not None and (newest_update is None or updated > newest_update):
            newest_update = updated
        if start is None:
            continue
        if latest_start is None or start > latest_start:
            latest, latest_start = session, start
        loc = session.cell_location_estimate
        if (
            loc is not None
            and loc.lat is not None
            and loc.lon is not None
            and (location_start is None or start > location_start)
        ):
            location, location_start = (loc.lat, loc.lon), start

    if newest_update is not None and (
        account.last_updated is None or newest_update > account.last_updated
    ):
        account.last_updated = newest_update

    stale = False
    if (
        latest_start is not None
        and account.latest_start is not None
        and latest_start < account.latest_start
    ):
        # The listing's newest session is older than the one already known. While a remembered
        # session is missing from this listing (missed on a shifting page, or listed but
        # rejected), that may be the newer one: it stays the latest. Once every remembered
        # session is listed again or forgotten, the listing wins, so a session dated in the
        # future (or restored from a state file) cannot freeze the latest session for good.
        if missing:
            stale = True
        else:
            account.location_start = None
    if (
        location is not None
        and location_start is not None
        and (account.location_start is None or location_start >= account.location_start)
    ):
        account.location, account.location_start = location, location_start

    if stale or latest is None or latest_start is None:
        return
    account.latest_start = latest_start
    imei = latest.imei
    if imei and imei == account.last_imei:
        imei = account.last_imei  # the object already kept, not one more copy per listing
    account.latest = SessionAttributes(
        radio_link=shared(latest.radio_link),
        operator_name=shared(latest.operator_name),
        operator_country=shared(latest.operator_country),
        operator_mcc=shared(latest.operator_mcc),
        operator_mnc=shared(latest.operator_mnc),
        imei=imei or "",
    )
    if imei:
        if account.last_imei is not None and imei != account.last_imei:
            account.imei_changes_total = add_saturating(account.imei_changes_total, 1)
            outcome.imei_changed = True
        account.last_imei = imei
