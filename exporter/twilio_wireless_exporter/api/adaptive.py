"""An in-flight limit that adapts to an API's concurrency cap (AIMD, like TCP's window).

Twilio and KORE answer ``429 Too Many Requests`` when a client has too many requests in flight.
With a fixed limit above the server's cap, most requests of a busy cycle come back 429, sleep
out ``Retry-After`` and are sent again into the same wall: the cycle time explodes and polls
run out of retries. :class:`AdaptiveLimit` halves the limit on a 429 (once per round: the 429s
of requests sent before the cut are echoes of the old limit) and gives back one slot per
``limit`` successful requests, never above the configured concurrency. An API without a cap
never sends 429, so the limit stays at the configured concurrency.

A lower limit never touches requests already in flight: new ones wait until enough have
finished.

Twilio reports the account's requests in flight in every answer (``Twilio-Concurrent-Requests``,
set on the slot as ``concurrency`` by the transport). The lowest value reported by the 429s of a
round is where the account's 429s began: :attr:`AdaptiveLimit.ceiling`. The limit then stops
growing while recent answers report a concurrency within :data:`HEADROOM` of it, so it settles
just below the account's cap instead of growing into it and being halved again every time: 429s
are avoided rather than reacted to. "Recent" is the highest value of the latest one or two
windows of ``limit`` answers: a single answer reports the account's requests at one instant,
and the client's requests are not all at the server at every instant (some are being sent or
read), so single answers report less than the pipeline's peak. The concurrency counts the
whole account (other clients too), so the limit also stops growing while others take the room.
A later round of 429s replaces the ceiling; an API that reports no concurrency (KORE) leaves
the limit to plain AIMD (without reports, the peaks fade within two windows).

Waiting requests are admitted oldest operation first, not first come, first served: every
request of one operation (all pages and retries of one listing) carries the order number the
operation drew when it began. When requests queue, a listing's next page or retry therefore goes
ahead of the first pages of listings that began after it, instead of queueing behind the whole
fleet's requests again for every page and every retry: a listing of ten pages would otherwise
wait out the queue ten times.

Background operations (usage records, rate plans) draw their order :data:`BACKGROUND` higher:
behind every foreground operation (session polls, discovery) ever drawn, oldest first among
themselves, so a queued usage request never goes ahead of a session poll, however much older.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

THROTTLED = 429
BACKGROUND = 2**62
"""Added to a background operation's order: more than any count of orders ever drawn."""
#: The limit stops growing once the reported concurrency is within this fraction of the
#: ceiling (at least one request below it).
HEADROOM = 0.1


class Slot:
    """One admitted request (an async context manager). Set ``status`` to the HTTP status of
    its response, if there is one, before leaving the ``async with`` block."""

    __slots__ = ("_limit", "_order", "concurrency", "status", "ticket")

    def __init__(self, limit: AdaptiveLimit, order: int) -> None:
        self._limit = limit
        self._order = order
        self.ticket = 0
        self.status: int | None = None
        self.concurrency: int | None = None
        """The account's requests in flight, as its answer reported them (None: not said)."""

    async def __aenter__(self) -> Slot:
        self.ticket = await self._limit._acquire(self._order)
        return self

    async def __aexit__(self, *_: object) -> None:
        self._limit._release(self)


class AdaptiveLimit:
    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("maximum must be >= 1")
        self.maximum = maximum
        self._target = float(maximum)
        # (order, arrival, waiter): a heap, oldest operation first, then first come.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._orders = itertools.count()
        self._arrivals = itertools.count()
        self._admitted = 0
        self._cut_at = 0  # admission count at the latest decrease
        self.in_flight = 0
        self.decreases = 0
        self.ceiling: int | None = None
        """The reported concurrency at which the latest round of 429s began (None: unknown)."""
        self._stop_at: float = float("inf")  # grow only while recent reports are below this
        # The highest concurrency reported in the current window of `limit` answers, in the
        # previous window, and the current window's answers so far.
        self._peak = 0
        self._last_peak = 0
        self._window = 0

    @property
    def limit(self) -> int:
        """Requests allowed in flight now (those admitted before a cut finish undisturbed)."""
        return max(1, int(self._target))

    def new_order(self, background: bool = False) -> int:
        """An order number for an operation that begins now (later operations get higher ones;
        a ``background`` one, one higher than every foreground operation's).

        Pass it to :meth:`slot` for every request of the operation."""
        order = next(self._orders)
        return order + BACKGROUND if background else order

    def slot(self, order: int | None = None) -> Slot:
        """``async with limit.slot(order) as slot``: wait for a free slot; waiting requests are
        admitted lowest ``order`` first (see :meth:`new_order`; none: an operation of its own
        that begins now), first come, first served within one order. The status set on the
        slot steers the limit."""
        return Slot(self, self.new_order() if order is None else order)

    async def _acquire(self, order: int) -> int:
        """Wait for a slot; returns the admission's ticket number."""
        if not self._waiters and self.in_flight < self.limit:
            self.in_flight += 1
            self._admitted += 1
            return self._admitted
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (order, next(self._arrivals), waiter)
        heapq.heappush(self._waiters, entry)
        try:
            await waiter  # resolved by _wake, which counts us in flight
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1  # admitted, then cancelled before running: hand it on
                self._wake()
            elif entry in self._waiters:  # (_wake drops cancelled waiters it comes across)
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise
        self._admitted += 1
        return self._admitted

    def _release(self, slot: Slot) -> None:
        self.in_flight -= 1
        reported = slot.concurrency
        if reported is not None and reported > self._peak:
            self._peak = reported
        self._window += 1  # every answer: peaks fade when the header stops coming
        if self._window >= self.limit:
            self._last_peak, self._peak, self._window = self._peak, 0, 0
        if slot.status == THROTTLED:
            if slot.ticket > self._cut_at:  # a fresh signal, not an echo of the old limit
                self._cut_at = self._admitted
                self.decreases += 1
                self._target = max(1.0, self._target / 2)
                if reported is not None:
                    self._learn_ceiling(reported)
            elif reported is not None and (self.ceiling is None or reported < self.ceiling):
                self._learn_ceiling(reported)  # an echo: the round's 429s began lower
        elif (
            slot.status is not None
            and slot.status < 500
            and self._target < self.maximum
            and max(self._peak, self._last_peak) < self._stop_at
        ):
            self._target = min(float(self.maximum), self._target + 1 / self._target)
        self._wake()

    def _learn_ceiling(self, reported: int) -> None:
        self.ceiling = reported
        self._stop_at = reported - max(1, int(reported * HEADROOM))

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
