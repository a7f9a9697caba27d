"""What admits an API request: the adaptive in-flight limit, the rate limit, the 429-storm pause.

:class:`RequestLimits` is the API client's :class:`~twilio_wireless_exporter.api.transport.Gate`.
An attempt takes a slot of the adaptive limit first (oldest operation first, see adaptive.py),
then waits out a 429 storm's pause, then the requests-per-second bucket (aiolimiter).

A 429 storm: :data:`STORM_429S` answers of 429 in a row (from any requests) mean the account is
over its limit, so every request pauses while the retry of the latest one sleeps out its
``Retry-After``. A lone 429 only makes its own request wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Final

from aiolimiter import AsyncLimiter

from twilio_wireless_exporter.api.adaptive import THROTTLED, AdaptiveLimit, Slot

log = logging.getLogger(__name__)

STORM_429S: Final = 3


class Admission(Slot):
    """One admitted API request: a slot, then the storm pause, then the rate limit.

    It drives the slot's limit itself instead of through ``super()``: this runs for every
    request, and each extra coroutine frame shows in the client's cost per request."""

    __slots__ = ("_limits",)

    def __init__(self, limits: RequestLimits, order: int) -> None:
        super().__init__(limits.slots, order)
        self._limits = limits

    async def __aenter__(self) -> Admission:
        self.ticket = await self._limit._acquire(self._order)
        limits = self._limits
        try:
            if not limits._unpaused.is_set():  # a 429 storm: nothing goes out until it passed
                await limits._unpaused.wait()
            await limits._rate.acquire()
        except BaseException:
            self._limit._release(self)  # cancelled while waiting: hand the slot on
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        status = self.status
        if status is not None:
            limits = self._limits
            limits._consecutive_429 = limits._consecutive_429 + 1 if status == THROTTLED else 0
        self._limit._release(self)


class RequestLimits:
    """At most ``concurrency`` in flight (fewer while the API answers 429), at most
    ``requests_per_second`` started, and a pause of everything during a 429 storm."""

    def __init__(self, concurrency: int, requests_per_second: float) -> None:
        self.slots = AdaptiveLimit(concurrency)
        # Leaky bucket: bursts of at most a tenth of a second's worth of requests.
        burst = max(1.0, requests_per_second / 10.0)
        self._rate = AsyncLimiter(burst, burst / requests_per_second)
        self._consecutive_429 = 0
        self._pause_holders = 0  # retries sleeping out a 429 storm; requests wait while > 0
        self._unpaused = asyncio.Event()
        self._unpaused.set()

    def new_order(self, background: bool = False) -> int:
        """The queueing order of an operation that begins now; a ``background`` one queues
        behind every foreground operation (see adaptive.py)."""
        return self.slots.new_order(background)

    def admit(self, order: int) -> Admission:
        return Admission(self, order)

    def storming(self) -> bool:
        """Whether the latest answers were a run of :data:`STORM_429S` or more 429s."""
        return self._consecutive_429 >= STORM_429S

    @contextlib.contextmanager
    def pausing(self, seconds: float, status: int | None) -> Iterator[None]:
        """Wraps a retry's sleep after an answer of ``status``: in a 429 storm, every request
        waits until the sleep is over, not just the refused ones."""
        if status != THROTTLED or not self.storming():
            yield
            return
        if self._pause_holders == 0:
            log.info(
                "%d or more 429 Too Many Requests in a row: pausing all API requests for %.1fs",
                STORM_429S,
                seconds,
            )
        self._pause_holders += 1
        self._unpaused.clear()
        try:
            yield
        finally:
            self._pause_holders -= 1
            if self._pause_holders == 0:
                self._unpaused.set()
