"""Request statistics of a running simulator (what the client under test actually did)."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import NamedTuple

from .faults import API_KINDS

__all__ = ["RequestLogEntry", "SimulatorStats"]


class RequestLogEntry(NamedTuple):
    """One request as it arrived: monotonic time and the kind of path."""

    at: float
    path_kind: str


class SimulatorStats:
    """Counters of the requests the simulator served.

    * ``requests``: ``Counter`` of ``(path_kind, status)``; path kinds are ``sims``, ``sim``,
      ``data_sessions``, ``usage_records``, ``account_usage_records``, ``rate_plans``,
      ``rate_plan``, ``token``, ``health`` and ``other``; a request the client abandoned before
      the answer (e.g. during an injected timeout) counts with status 499.
    * ``total``: all requests; ``token_requests``: requests to the token endpoint.
    * ``in_flight`` / ``max_in_flight``: concurrent API requests (every kind of
      :data:`~.faults.API_KINDS`), counted from arrival (including ones rejected by
      ``max_concurrent``) until the answer.
    * ``log``: ``RequestLogEntry(at, path_kind)`` per request, the newest ``log_size`` kept.
    """

    def __init__(self, log_size: int = 100_000) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.total = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.token_requests = 0
        self.log: deque[RequestLogEntry] = deque(maxlen=log_size)

    def started(self, path_kind: str, now: float | None = None) -> None:
        self.total += 1
        self.log.append(RequestLogEntry(time.monotonic() if now is None else now, path_kind))
        if path_kind == "token":
            self.token_requests += 1
        elif path_kind in API_KINDS:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def finished(self, path_kind: str, status: int) -> None:
        self.requests[(path_kind, status)] += 1
        if path_kind in API_KINDS:
            self.in_flight -= 1

    def count(self, path_kind: str | None = None, status: int | None = None) -> int:
        """Finished requests matching ``path_kind`` and ``status`` (``None`` matches any)."""
        return sum(
            n
            for (kind, code), n in self.requests.items()
            if (path_kind is None or kind == path_kind) and (status is None or code == status)
        )

    def reset(self) -> None:
        """Zero everything except the current in-flight count."""
        self.requests.clear()
        self.total = 0
        self.max_in_flight = self.in_flight
        self.token_requests = 0
        self.log.clear()

    def __repr__(self) -> str:
        return (
            f"SimulatorStats(total={self.total}, in_flight={self.in_flight}, "
            f"max_in_flight={self.max_in_flight}, token_requests={self.token_requests}, "
            f"requests={dict(self.requests)!r})"
        )
