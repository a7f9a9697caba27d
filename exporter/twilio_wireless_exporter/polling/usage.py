"""Usage reads: each SIM's usage records, the account's, and the rate plans, on their own clock.

* Every SIM's usage is read once right away (so a fresh exporter shows usage within its first
  interval), then on the slots ``anchor + offset(s) * interval + k * interval`` with the same
  stable per-SID offset the session polls use, so reads are spread over the interval.
* Usage requests run at background priority (see ``api/adaptive.py``): while session polls
  queue for a request slot, a usage read waits, so usage never delays a session poll.
* A fixed pool of workers does the reads; the scheduler hands them due SIMs and waits while all
  of them are busy, so a large fleet is never one task per SIM.
* A failed read is counted (``poll_errors_total{endpoint="usage_records"}``) and the SIM keeps
  its slot; it never touches ``sim_up``, which stays about session polls.
* The account's usage (hourly records) is read every interval, the rate plans every discovery
  refresh interval (within a minute again after a failure).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from twilio_wireless_exporter.api.client import (
    ENDPOINT_ACCOUNT_USAGE,
    ENDPOINT_RATE_PLANS,
    ENDPOINT_USAGE_RECORDS,
    Rejection,
    TwilioClient,
)
from twilio_wireless_exporter.api.records import RatePlan
from twilio_wireless_exporter.api.transport import ApiError
from twilio_wireless_exporter.api.usage import mb_to_bytes
from twilio_wireless_exporter.clock import Clock, SystemClock, sleep_or_wake
from twilio_wireless_exporter.fleet.state import FleetState, PlanInfo
from twilio_wireless_exporter.fleet.usage import (
    counting_start,
    period_start,
    window_start,
)
from twilio_wireless_exporter.polling.poller import PollObserver, sim_offset

log = logging.getLogger(__name__)

#: How often the scheduler looks for SIMs that joined (discovery) when nothing else wakes it.
_RESYNC: Final = 10.0
_RETRY: Final = 60.0
_MIN_WORKERS: Final = 4


@dataclass(frozen=True, slots=True)
class UsageSettings:
    interval: float = 3600.0
    period_start_day: int = 1
    period_start_days: Mapping[str, int] = field(default_factory=dict)
    """Per-SIM overrides of ``period_start_day``."""
    revision_days: int = 2
    account: bool = True
    rate_plans: bool = True
    rate_plans_interval: float = 600.0


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def plan_info(plan: RatePlan) -> PlanInfo:
    """A listed rate plan as the state keeps it: limits converted to bytes (see mb_to_bytes).
    A limit of 0 is kept: it allows no data on that network (the roaming alert reads it); only
    a null limit is no limit."""
    limits = tuple(
        (network, mb_to_bytes(limit))
        for network, limit in (
            ("home", plan.data_limit),
            ("national_roaming", plan.national_roaming_data_limit),
            ("international_roaming", plan.international_roaming_data_limit),
        )
        if limit is not None
    )
    return PlanInfo(
        sid=plan.sid,
        unique_name=plan.unique_name or "",
        friendly_name=plan.friendly_name or "",
        data_metering=plan.data_metering or "",
        data_enabled=plan.data_enabled,
        national_roaming_enabled=plan.national_roaming_enabled,
        limits=limits,
    )


class UsagePoller:
    """Reads usage and rate plans into a :class:`FleetState` (see the module docstring)."""

    def __init__(
        self,
        client: TwilioClient,
        state: FleetState,
        settings: UsageSettings,
        *,
        clock: Clock | None = None,
        observer: PollObserver | None = None,
    ) -> None:
        self._client = client
        self._state = state
        self._settings = settings
        self._clock: Clock = clock or SystemClock()
        self._observer = observer
        self._workers = max(_MIN_WORKERS, client.settings.concurrency)
        self._heap: list[tuple[float, str]] = []
        self._scheduled: set[str] = set()
        self._wake = asyncio.Event()
        self._anchor = 0.0
        self._failing: set[str] = set()
        self._rejects_logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ one-shot reads

    async def read_sim(self, sid: str) -> bool:
        """Read one SIM's usage records of its metering period (and the days still revised)."""
        settings = self._settings
        now = self._clock.time()
        day = settings.period_start_days.get(sid, settings.period_start_day)
        period = period_start(now, day)
        start = window_start(now, period, settings.revision_days)
        counted_from = counting_start(now, settings.revision_days)
        try:
            records = await self._client.list_sim_usage(sid, _instant(start))
        except ApiError as exc:
            self._failed(ENDPOINT_USAGE_RECORDS, sid, exc)
            return False
        self._failing.discard(sid)
        if records.rejected:
            self._rejected(sid, ENDPOINT_USAGE_RECORDS, records.rejected)
        self._state.record_usage(
            sid, records, window_start=counted_from, period=period, now=self._clock.time()
        )
        return True

    async def read_account(self) -> bool:
        """Read the account's hourly usage records of the days still revised and today."""
        start = counting_start(self._clock.time(), self._settings.revision_days)
        try:
            records = await self._client.list_account_usage(_instant(start))
        except ApiError as exc:
            self._failed(ENDPOINT_ACCOUNT_USAGE, "", exc)
            return False
        self._failing.discard("")
        if records.rejected:
            self._rejected("", ENDPOINT_ACCOUNT_USAGE, records.rejected)
        self._state.record_account_usage(records, window_start=start, now=self._clock.time())
        return True

    async def read_rate_plans(self) -> bool:
        try:
            plans = await self._client.list_rate_plans()
        except ApiError as exc:
            self._failed(ENDPOINT_RATE_PLANS, "rate plans", exc)
            return False
        self._failing.discard("rate plans")
        if plans.rejected:
            self._rejected("rate plans", ENDPOINT_RATE_PLANS, plans.rejected)
        self._state.set_rate_plans(plan_info(plan) for plan in plans)
        return True

    # ------------------------------------------------------------------ loops

    async def run(self) -> None:
        """Read forever (until cancelled): SIM usage, account usage and rate plans."""
        self._anchor = self._clock.monotonic()
        async with asyncio.TaskGroup() as group:
            if self._settings.account:
                group.create_task(self._every(self.read_account, self._settings.interval))
            if self._settings.rate_plans:
                interval = self._settings.rate_plans_interval
                group.create_task(self._every(self.read_rate_plans, interval))
            queue: asyncio.Queue[str] = asyncio.Queue(maxsize=self._workers)
            for _ in range(self._workers):
                group.create_task(self._worker(queue))
            await self._schedule(queue)

    async def _every(self, read: Callable[[], Awaitable[bool]], interval: float) -> None:
        while True:
            ok = await read()
            await self._clock.sleep(interval if ok else min(interval, _RETRY))

    async def _worker(self, queue: asyncio.Queue[str]) -> None:
        while True:
            sid = await queue.get()
            try:
                await self.read_sim(sid)
            except Exception:  # a bug must not stop usage reads; it is logged
                log.exception("unexpected error while reading the usage of SIM %s", sid)
            finally:
                if sid in self._state.sims:
                    heapq.heappush(self._heap, (self._next_slot(sid), sid))
                    self._wake.set()
                else:
                    self._forget(sid)

    async def _schedule(self, queue: asyncio.Queue[str]) -> None:
        next_sync = -math.inf
        while True:
            now = self._clock.monotonic()
            if now >= next_sync:
                self._sync(now)
                next_sync = now + _RESYNC
            while self._heap and self._heap[0][0] <= now:
                _, sid = heapq.heappop(self._heap)
                if sid not in self._state.sims:
                    self._forget(sid)
                    continue
                await queue.put(sid)  # waits while every worker is busy
            self._wake.clear()
            delay = next_sync - now
            if self._heap:
                delay = min(delay, self._heap[0][0] - now)
            await sleep_or_wake(self._clock, self._wake, max(0.0, delay))

    def _sync(self, now: float) -> None:
        """SIMs that joined are due now (their first read); SIMs that left drop out when due."""
        for sid in self._state.sims:
            if sid not in self._scheduled:
                self._scheduled.add(sid)
                heapq.heappush(self._heap, (now, sid))

    def _forget(self, sid: str) -> None:
        """A SIM that left: drop what was noted of it (discovery churns SIMs for months)."""
        self._scheduled.discard(sid)
        self._failing.discard(sid)
        if any(key[0] == sid for key in self._rejects_logged):
            self._rejects_logged = {key for key in self._rejects_logged if key[0] != sid}

    def _next_slot(self, sid: str) -> float:
        interval = self._settings.interval
        now = self._clock.monotonic()
        base = self._anchor + sim_offset(sid) * interval
        k = max(1, math.floor((now - base) / interval) + 1)
        return base + k * interval

    # ------------------------------------------------------------------ reporting

    def _failed(self, endpoint: str, what: str, exc: ApiError) -> None:
        if self._observer is not None:
            self._observer.poll_error(endpoint, exc.kind)
        if what in self._failing:
            log.debug("reading %s failed again: %s", what or "the account's usage", exc)
            return
        self._failing.add(what)
        subject = f"the usage of SIM {what}" if endpoint == ENDPOINT_USAGE_RECORDS else what
        log.warning("reading %s failed: %s", subject or "the account's usage", exc)

    def _rejected(self, what: str, endpoint: str, rejected: Sequence[Rejection]) -> None:
        """Count each rejected record; log the first of each reason per subject."""
        for rejection in rejected:
            if self._observer is not None:
                self._observer.record_rejected(endpoint, rejection.reason)
            key = (what, str(rejection.reason))
            if key in self._rejects_logged:
                continue
            self._rejects_logged.add(key)
            log.warning(
                "%s of %s: rejected a record (%s): %s; such records are counted in"
                " twilio_wireless_api_records_rejected_total and not logged again",
                endpoint,
                f"SIM {what}" if endpoint == ENDPOINT_USAGE_RECORDS else what or "the account",
                rejection.reason,
                rejection.detail,
            )
