"""Time as a dependency: the poller and accounting never read the system clock directly.

Tests use :class:`ManualClock` and advance it explicitly; nothing waits for wall-clock time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Unix time in seconds (for timestamps that are exported)."""

    def monotonic(self) -> float:
        """Monotonic seconds (for scheduling and durations)."""

    async def sleep(self, seconds: float) -> None:
        """Sleep on this clock's time."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that only moves when told to; sleepers wake when time passes their deadline."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._start = start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """Number of tasks currently sleeping on this clock."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has passed, in order."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            # let the woken task run before waking the next one
            for _ in range(3):
                await asyncio.sleep(0)
        self._now = target


async def sleep_or_wake(clock: Clock, wake: asyncio.Event, delay: float | None) -> None:
    """Sleep ``delay`` seconds on ``clock`` (forever when ``None``), or less if ``wake`` is set."""
    waiter = asyncio.create_task(wake.wait())
    tasks: set[asyncio.Task[object]] = {waiter}
    if delay is not None:
        tasks.add(asyncio.create_task(clock.sleep(delay)))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # The helpers' own cancellations are results here; a cancellation of the caller that
        # arrives meanwhile is raised, never swallowed (that left a cancelled loop running).
        await asyncio.gather(*tasks, return_exceptions=True)
