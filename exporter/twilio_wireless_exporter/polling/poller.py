"""Scheduling: when each SIM is polled, SIM discovery, and handing listings to accounting.

* The first poll of every SIM starts at once; after that SIM ``s`` is polled on the slots
  ``anchor + offset(s) + k * interval`` (k >= 1), where ``offset`` is a stable hash of the SID
  spread over one interval: 10,000 SIMs do not fire together, and each SIM keeps its rhythm.
* Each poll is its own task, so a slow or failing SIM never delays the others; a SIM whose
  previous poll is still running skips a slot instead of piling up requests.
* The client enforces the global concurrency and requests-per-second limits.
* Time comes from an injected :class:`~twilio_wireless_exporter.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from twilio_wireless_exporter.api.auth import ENDPOINT_TOKEN
from twilio_wireless_exporter.api.client import (
    ENDPOINT_DATA_SESSIONS,
    ENDPOINT_SIM,
    ENDPOINT_SIMS,
    Rejection,
    TwilioClient,
)
from twilio_wireless_exporter.api.records import RejectReason, Sim
from twilio_wireless_exporter.api.transport import ApiError, ErrorKind
from twilio_wireless_exporter.clock import Clock, SystemClock, sleep_or_wake
from twilio_wireless_exporter.fleet.accounting import DEFAULT_FORGET_AFTER, apply_listing
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.polling.identity import ListingCensus
from twilio_wireless_exporter.sharding import Shard

log = logging.getLogger(__name__)

_DISCOVERY_RETRY = 60.0
#: A discovered SIM stops being polled once absent from this many successful discoveries in a
#: row: one odd answer (an empty or short /v1/Sims) cannot drop SIMs and lose their counters.
DISCOVERY_FORGET_AFTER = 3
# /v1/Sims pages are cheap: always the API's maximum, so poll.max_pages covers 50,000+ SIMs.
DISCOVERY_PAGE_SIZE = 1000
_AUTH_LOG_EVERY = 60.0
# Polls running at once (most of them waiting for one of the client's request slots). More only
# cost memory and CPU: 10,000 waiting polls each hold a stack of coroutine frames.
_POLL_TASKS_PER_REQUEST_SLOT = 16
_MIN_POLL_TASKS = 256


@dataclass(frozen=True, slots=True)
class SimTarget:
    """A SIM from the static configuration."""

    sid: str
    name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PollerSettings:
    interval: float = 60.0
    page_size: int = 100
    discovery: bool = False
    discovery_statuses: tuple[str, ...] = ("active",)
    discovery_interval: float = 600.0
    forget_after: int = DEFAULT_FORGET_AFTER
    shard: Shard = field(default_factory=Shard)
    """Poll only the SIMs (configured or discovered) that this shard owns."""


class PollObserver(Protocol):
    def poll_error(self, endpoint: str, kind: ErrorKind) -> None:
        """A failed read of ``endpoint`` (the operation's, not the token's when a token failed)."""

    def record_rejected(self, endpoint: str, reason: RejectReason) -> None: ...


def sim_offset(sid: str) -> float:
    """A stable number in [0, 1) derived from the SID (spreads polls over the interval)."""
    digest = hashlib.blake2b(sid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Poller:
    def __init__(
        self,
        client: TwilioClient,
        state: FleetState,
        targets: Sequence[SimTarget],
        settings: PollerSettings,
        *,
        clock: Clock | None = None,
        observer: PollObserver | None = None,
    ) -> None:
        self._client = client
        self._state = state
        targets = [t for t in targets if settings.shard.owns(t.sid)]
        self._targets = {t.sid: t for t in targets}
        self._settings = settings
        self._clock: Clock = clock or SystemClock()
        self._observer = observer
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._max_tasks = max(
            _MIN_POLL_TASKS, _POLL_TASKS_PER_REQUEST_SLOT * client.settings.concurrency
        )
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._anchor = 0.0
        self._discovered_once = not settings.discovery
        self._last_auth_log = -math.inf
        self._absent: dict[str, int] = {}
        self._unread: set[str] | None = set()  # see refresh_sims
        """Discovered SIMs missing from the latest successful discoveries, and how often."""
        self._rejects_logged: set[tuple[str, RejectReason]] = set()
        self._census = ListingCensus(DISCOVERY_PAGE_SIZE)
        # While run() starts: SIMs whose first poll has not started yet, and the event set
        # once none is left (identity work waits for it, see refresh_sims).
        self._first_pending: set[str] = set()
        self._first_polls: asyncio.Event | None = None
        for target in targets:
            state.ensure(target.sid, target.labels, target.name)
        state.arrange(sim_offset)

    # ------------------------------------------------------------------ status

    @property
    def ready(self) -> bool:
        """True once discovery (if any) ran and every SIM has been polled once."""
        return self._discovered_once and self._state.all_polled()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # ------------------------------------------------------------------ one-shot operations

    async def poll_sim(self, sid: str) -> bool:
        """Poll one SIM now and fold the result into the state. Never raises ApiError."""
        try:
            sessions = await self._client.list_data_sessions(sid, self._settings.page_size)
        except ApiError as exc:
            self._failed(sid, exc)
            return False
        record = self._state.sims.get(sid)
        if record is None:  # removed while we were polling
            return False
        rejected = sessions.rejected
        keep = {r.sid for r in rejected if r.sid} if rejected else ()
        if self._state.account_sid is None:
            self._learn_account(s.account_sid for s in sessions)
        account = self._state.resume(record)  # a restored account is taken up at its first poll
        outcome = apply_listing(
            account, sessions, forget_after=self._settings.forget_after, keep=keep
        )
        self._state.record_success(sid, outcome, self._clock.time())
        if outcome.invalid:  # unreachable for checked records; counted all the same
            rejected = [
                *rejected,
                *[Rejection(RejectReason.TIMESTAMP, None, "unusable timestamp")] * outcome.invalid,
            ]
        if rejected:
            self._rejected(sid, ENDPOINT_DATA_SESSIONS, rejected)
        if outcome.started or outcome.ended or outcome.imei_changed:
            log.debug(
                "sim %s: %d started, %d ended, imei changed: %s",
                sid,
                outcome.started,
                outcome.ended,
                outcome.imei_changed,
            )
        return True

    async def poll_all(self) -> None:
        """Poll every known SIM once, concurrently, and wait for all of them."""
        await self._for_each(list(self._state.sims), self.poll_sim)

    async def _for_each(
        self, sids: Sequence[str], action: Callable[[str], Awaitable[object]]
    ) -> None:
        """``action`` for every SID, at most as many at once as polls: a few workers drain the
        list, so a large fleet never becomes one task per SIM."""
        pending = iter(sids)

        async def worker() -> None:
            for sid in pending:
                await action(sid)

        await asyncio.gather(*(worker() for _ in range(min(self._max_tasks, len(sids)))))

    async def refresh_sims(self) -> bool:
        """Discover SIMs and/or refresh what ``/v1/Sims`` says about them. True on success.

        Configured SIMs that discovery does not cover get their identity from the unfiltered
        listing when that takes fewer requests than reading each of them, else (and for the
        ones the listing did not hold) from their own ``/v1/Sims/{sid}``; see identity.py.
        While :meth:`run` dispatches the first polls, this identity work waits for them: the
        polls go first, identity fills in (the discovery listing does not wait: it brings SIMs
        to poll).

        Afterwards :attr:`_unread` holds the configured SIMs whose identity could not be read,
        or ``None`` when the discovery listing itself failed (then everything is tried again).
        """
        discovered: dict[str, Sim] = {}
        if self._settings.discovery:
            listed = await self._discover()
            if listed is None:
                self._unread = None
                return False
            discovered = listed
        for sim in discovered.values():
            self._set_identity(sim)
        uncovered = [sid for sid in self._targets if sid not in discovered]
        if uncovered and self._first_polls is not None:
            await self._first_polls.wait()
        self._unread = await self._refresh_identities(uncovered)
        return not self._unread

    async def _discover(self) -> dict[str, Sim] | None:
        """One discovery listing applied to the state: the SIMs of this shard, None on failure."""
        try:
            sims = await self._client.list_sims(
                self._settings.discovery_statuses, DISCOVERY_PAGE_SIZE
            )
        except ApiError as exc:
            self._count(ENDPOINT_SIMS, exc)
            self._report(exc, "SIM discovery failed")
            return None
        if sims.rejected:
            self._rejected("", ENDPOINT_SIMS, sims.rejected)
        self._learn_account(sim.account_sid for sim in sims)
        self._census.counted(len(sims) + len(sims.rejected))
        discovered = {sim.sid: sim for sim in sims if self._settings.shard.owns(sim.sid)}
        wanted = set(self._targets) | set(discovered) | self._still_listed(discovered)
        for sid in discovered:
            target = self._targets.get(sid)
            if target is not None:
                self._state.ensure(sid, target.labels, target.name)
            elif sid not in self._state.sims:
                self._state.ensure(sid)
        dropped = self._state.retain(wanted)
        self._state.arrange(sim_offset)
        if dropped:
            log.info("discovery: %d SIMs no longer listed, stopped polling them", len(dropped))
            gone = set(dropped)
            self._rejects_logged = {k for k in self._rejects_logged if k[0] not in gone}
        self._schedule_new()
        self._discovered_once = True
        return discovered

    async def _refresh_identities(self, sids: Sequence[str]) -> set[str]:
        """The identity of configured SIMs: from the listing when it is cheaper, else and for
        the SIMs it did not hold, each SIM's own read. Returns the SIDs whose identity could
        not be read."""
        # Bounded like every listing against a hostile API's endless chain of pages: by
        # poll.max_pages, but never below the pages the configured SIMs (or the account, as
        # last listed) fill, so a fleet of 100,000 SIMs costs 100 pages, not 50 pages and
        # 50,000 reads. The census's budget keeps it below the reads it replaces either way;
        # the SIMs beyond it are read alone.
        census = self._census
        cap = max(
            self._client.settings.max_pages,
            math.ceil(len(sids) / DISCOVERY_PAGE_SIZE) + 1,
            census.estimate() + 1,
        )
        budget = min(census.budget(len(sids)), cap)
        if budget:
            sids = await self._identities_from_listing(sids, budget)
        return await self._read_identities(sids)

    async def _identities_from_listing(self, sids: Sequence[str], budget: int) -> list[str]:
        """Identity of ``sids`` from at most ``budget`` pages of the unfiltered listing.

        Returns the SIDs still to read alone: the ones the listing did not hold (a SIM of
        another account, one created since, pages beyond the budget), or all the ones not seen
        yet when the listing failed (logged and counted; reading each SIM costs what it did
        before the listing existed). A SIM whose record the listing held but rejected is
        counted, keeps its previous identity, and is not read again: its own read would
        answer the same record."""
        wanted = set(sids)
        pages = 0
        complete = False
        try:
            async for page in self._client.sim_pages(DISCOVERY_PAGE_SIZE, budget):
                pages += 1
                complete = page.next_page_url is None
                if page.rejected:
                    self._rejected("", ENDPOINT_SIMS, page.rejected)
                    wanted.difference_update(r.sid for r in page.rejected if r.sid)
                self._learn_account(sim.account_sid for sim in page.records)
                for sim in page.records:
                    if sim.sid in wanted:
                        wanted.discard(sim.sid)
                        self._set_identity(sim)
        except ApiError as exc:
            self._count(ENDPOINT_SIMS, exc)
            self._report(exc, f"SIM identity listing failed; reading {len(wanted)} SIMs alone")
        else:
            self._census.listed(pages, complete)
            if not complete:
                log.info(
                    "the /v1/Sims listing has more than %d pages: %d SIMs it did not reach are"
                    " read alone",
                    pages,
                    len(wanted),
                )
        return [sid for sid in sids if sid in wanted]

    async def _read_identities(self, sids: Sequence[str]) -> set[str]:
        """``GET /v1/Sims/{sid}`` for each SID (see :meth:`_for_each`); returns the SIDs whose
        read failed."""
        failed: set[str] = set()

        async def read(sid: str) -> None:
            try:
                sim = await self._client.fetch_sim(sid)
            except ApiError as exc:
                failed.add(sid)
                self._count(ENDPOINT_SIM, exc)
                self._report(exc, f"cannot read SIM {sid}")
                return
            self._learn_account([sim.account_sid])
            self._set_identity(sim)

        await self._for_each(sids, read)
        return failed

    # ------------------------------------------------------------------ the long-running loop

    async def run(self) -> None:
        """Poll forever (until cancelled), with discovery / identity refreshes beside it.

        Every task it starts (the refresh loop, one per in-flight poll) belongs to one task
        group: cancelling ``run`` stops all of them, and a bug that escapes the refresh loop
        ends ``run`` with that error instead of dying unseen.
        """
        self._anchor = self._clock.monotonic()
        self._first_pending = set(self._state.sims)
        self._first_polls = first = asyncio.Event()
        if not self._first_pending:
            first.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._refresh_loop(), name="sim-refresh")
                # Configured SIMs are polled at once; discovered ones join, due at once, as the
                # listing brings them, so a failing discovery leaves no configured SIM unwatched.
                self._schedule_new(initial=True)
                await self._schedule_loop(group)
        finally:
            self._inflight.clear()
            self._first_pending.clear()
            self._first_polls = None

    def _still_listed(self, discovered: Mapping[str, Sim]) -> set[str]:
        """Known SIMs missing from this discovery that stay, as they have not been missing from
        :data:`DISCOVERY_FORGET_AFTER` discoveries in a row yet."""
        absent = self._absent
        for sid in discovered:
            absent.pop(sid, None)
        kept: set[str] = set()
        newly = 0
        for sid in self._state.sims:
            if sid in discovered or sid in self._targets:
                continue
            count = absent.get(sid, 0) + 1
            if count < DISCOVERY_FORGET_AFTER:
                absent[sid] = count
                kept.add(sid)
                newly += count == 1
            else:
                absent.pop(sid, None)
        for sid in [sid for sid in absent if sid not in self._state.sims]:
            del absent[sid]
        if newly:
            log.warning(
                "discovery: %d known SIMs missing from /v1/Sims; they are still polled, and"
                " dropped once missing from %d discoveries in a row",
                newly,
                DISCOVERY_FORGET_AFTER,
            )
        return kept

    async def _refresh_loop(self) -> None:
        """A full refresh every ``discovery_interval``. In between, what failed is tried again
        within a minute: the whole refresh when the discovery listing failed, otherwise only
        the SIM reads that failed (one broken SIM must not repeat the fleet's listing)."""
        while True:
            ok = await self.refresh_sims()
            next_full = self._clock.monotonic() + self._settings.discovery_interval
            while not ok and (left := next_full - self._clock.monotonic()) > 0:
                await self._clock.sleep(min(left, _DISCOVERY_RETRY))
                if self._unread is None:
                    break  # the listing failed: the next full refresh starts now
                self._unread = await self._refresh_identities(sorted(self._unread))
                ok = not self._unread
            if ok:
                await self._clock.sleep(max(0.0, next_full - self._clock.monotonic()))

    def _schedule_new(self, *, initial: bool = False) -> None:
        """Put SIMs that have no slot yet on the heap, due now (their first poll)."""
        scheduled = {sid for _, sid in self._heap} | set(self._inflight)
        now = self._clock.monotonic()
        added = False
        for sid in self._state.sims:
            if sid not in scheduled:
                heapq.heappush(self._heap, (now, sid))
                added = True
        if added and not initial:
            self._wake.set()

    def next_slot(self, sid: str, now: float) -> float:
        """The first slot of ``sid`` strictly after ``now`` (and after its first poll)."""
        interval = self._settings.interval
        base = self._anchor + sim_offset(sid) * interval
        k = max(1, math.floor((now - base) / interval) + 1)
        return base + k * interval

    async def _schedule_loop(self, group: asyncio.TaskGroup) -> None:
        while True:
            now = self._clock.monotonic()
            # Due SIMs beyond the task cap stay on the heap: a finishing poll wakes the loop.
            while self._heap and self._heap[0][0] <= now and len(self._inflight) < self._max_tasks:
                _, sid = heapq.heappop(self._heap)
                if sid not in self._state.sims:
                    if self._first_pending:
                        self._first_started(sid)
                    continue  # no longer monitored
                if sid not in self._inflight:
                    self._inflight[sid] = group.create_task(self._poll_task(sid), name=sid)
                # else: still polling; it takes its next slot when it finishes
            self._wake.clear()
            if len(self._inflight) >= self._max_tasks:
                delay = None  # capped: a finishing poll wakes the loop
            else:
                delay = self._heap[0][0] - now if self._heap else None
            await sleep_or_wake(self._clock, self._wake, delay)

    def _first_started(self, sid: str) -> None:
        """The first poll of ``sid`` since :meth:`run` began starts now (or it left); once
        every SIM known then did, identity work may start. The poll draws its order before
        the waiting refresh runs again (the event only wakes it), so identity requests queue
        behind every first poll at the client's limit."""
        pending = self._first_pending
        pending.discard(sid)
        if not pending:
            self._first_pending = set()  # an emptied set keeps its table: one slot per SIM
            if self._first_polls is not None:
                self._first_polls.set()

    async def _poll_task(self, sid: str) -> None:
        if self._first_pending:
            self._first_started(sid)
        try:
            await self.poll_sim(sid)
        except Exception:  # a bug must not kill the scheduler; it is logged and counted
            log.exception("unexpected error while polling SIM %s", sid)
            self._state.record_failure(sid, "internal error", self._clock.time())
            if self._observer is not None:
                self._observer.poll_error(ENDPOINT_DATA_SESSIONS, ErrorKind.INTERNAL)
        finally:
            self._inflight.pop(sid, None)
            if sid in self._state.sims:
                heapq.heappush(self._heap, (self.next_slot(sid, self._clock.monotonic()), sid))
                self._wake.set()

    # ------------------------------------------------------------------ helpers

    def _learn_account(self, account_sids: Iterable[str | None]) -> None:
        """Tell the state which account answers (a state file is checked against it)."""
        if self._state.account_sid is not None:
            return
        found = next((a for a in account_sids if a), None)  # the state checks its shape
        if self._state.learn_account(found):
            log.warning(
                "the API answers for account %s, not the account of the restored state file;"
                " its SIMs start a fresh baseline",
                found,
            )

    def _set_identity(self, sim: Sim) -> None:
        self._state.set_identity(
            sim.sid,
            unique_name=sim.unique_name,
            friendly_name=sim.friendly_name,
            status=sim.status,
            rate_plan_sid=sim.rate_plan_sid,
            reset_status=sim.reset_status,
        )

    def _failed(self, sid: str, exc: ApiError) -> None:
        record = self._state.sims.get(sid)
        was_up = record is not None and record.up is not False
        self._state.record_failure(sid, str(exc), self._clock.time())
        self._count(ENDPOINT_DATA_SESSIONS, exc)
        if exc.kind is ErrorKind.AUTH:
            self._report(exc, f"polling SIM {sid} failed")
        elif was_up:
            log.warning("polling SIM %s failed: %s", sid, exc)
        else:
            log.debug("polling SIM %s failed again: %s", sid, exc)

    def _rejected(self, sid: str, endpoint: str, rejected: Sequence[Rejection]) -> None:
        """Count each rejected record; log the first of each reason per SIM (``""``: the
        discovery), so a record the API keeps sending is not logged on every poll."""
        observer = self._observer
        for rejection in rejected:
            if observer is not None:
                observer.record_rejected(endpoint, rejection.reason)
            key = (sid, rejection.reason)
            if key in self._rejects_logged:
                continue
            self._rejects_logged.add(key)
            log.warning(
                "%s: rejected a record (%s, sid %s): %s; such records are counted in"
                " twilio_wireless_api_records_rejected_total and not logged again",
                f"SIM {sid}" if sid else "SIM listing",
                rejection.reason,
                rejection.sid or "unknown",
                rejection.detail,
            )

    def _count(self, endpoint: str, exc: ApiError) -> None:
        if self._observer is not None:
            self._observer.poll_error(endpoint, exc.kind)

    def _report(self, exc: ApiError, what: str) -> None:
        if exc.kind is ErrorKind.AUTH:
            now = self._clock.monotonic()
            if now - self._last_auth_log >= _AUTH_LOG_EVERY:
                self._last_auth_log = now
                hint = (
                    "check twilio.auth.client_id and the client secret"
                    if exc.endpoint == ENDPOINT_TOKEN
                    else "check the account SID / auth token or API key"
                )
                log.error(
                    "%s: the API rejected our credentials (HTTP %s, code %s: %s); %s",
                    what,
                    exc.status,
                    exc.code,
                    exc.message,
                    hint,
                )
            return
        log.warning("%s: %s", what, exc)
