"""Log lines that a hostile client could repeat thousands of times a second, at most once per
interval per kind, with the count of what was left out.

A flood of bad connections or requests must not turn into a flood of log lines (the disk and the
log pipeline are shared with everything else on the host); one line per interval still tells the
operator what is going on, and the ``twilio_wireless_http_rejected_total`` counter has the exact
numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

DEFAULT_INTERVAL = 60.0


class RateLimitedLog:
    """``log(key, level, message, *args)`` writes the first line of each ``key`` and then at
    most one per ``interval`` seconds, saying how many like it were not written in between."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, key: str, level: int, message: str, *args: object) -> bool:
        """Log (``True``) or count as suppressed (``False``)."""
        now = self._clock()
        if now < self._next.get(key, float("-inf")):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._next[key] = now + self._interval
        left_out = self._suppressed.pop(key, 0)
        if left_out:
            message += " (%d more like it in the last %gs not logged)"
            args = (*args, left_out, self._interval)
        self._logger.log(level, message, *args)
        return True
