"""Fault injection for the simulator: random faults at configured rates plus scripted ones.

A :class:`FaultConfig` is both the configuration and the live fault state of a running
simulator (``sim.faults``): change its rates at any time, or queue exact responses with
:meth:`FaultConfig.script`.

Scripted responses are consumed in order by the next matching requests before any random fault is
drawn. Faults apply to the API endpoints (``sims``, ``sim``, ``data_sessions``,
``usage_records``, ``account_usage_records``, ``rate_plans``, ``rate_plan``) and, when
``apply_to_token`` is set (or when a script names ``path_kind="token"``), to the OAuth token
endpoint. ``/health`` is never affected.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Iterable
from typing import Annotated, Final, Literal

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from .rules import NonNegative, Rate

__all__ = [
    "API_KINDS",
    "LIST_KINDS",
    "FaultConfig",
    "FaultResponse",
    "PathKind",
]

PathKind = Literal[
    "sims",
    "sim",
    "data_sessions",
    "usage_records",
    "account_usage_records",
    "rate_plans",
    "rate_plan",
    "token",
]

#: Request kinds that return a paged list.
LIST_KINDS: Final = frozenset(
    {"sims", "data_sessions", "usage_records", "account_usage_records", "rate_plans"}
)
#: Request kinds that are Twilio API calls.
API_KINDS: Final = frozenset({*LIST_KINDS, "sim", "rate_plan"})
_ALL_KINDS: Final = frozenset({*API_KINDS, "token"})


@dataclass(frozen=True, slots=True)
class FaultResponse:
    """One injected outcome for one request.

    * ``status`` other than 200: an error response with that status and a Twilio-shaped body
      (code ``20429`` for 429, ``20500`` for 500, ``20503`` for 503, ``20000 + status`` otherwise),
      or ``body`` verbatim if given. ``retry_after`` adds a ``Retry-After`` header (integral
      values are written as integers, fractional ones as decimals, which is non-standard but
      keeps tests fast).
    * ``delay``: seconds to wait before answering (a "timeout" when longer than the client's
      timeout); the answer is then produced normally (or as the error above).
    * ``truncated``: status 200, the JSON body cut in half (invalid JSON).
    * ``malformed``: status 200, valid JSON of the wrong shape.
    * ``overlap``: a list page that repeats some items of the previous page, in shuffled order.
    * ``FaultResponse()`` with no options is a normal response (handy to let one request through
      in a script).
    """

    status: Annotated[int, Field(ge=100, le=599)] = 200
    retry_after: NonNegative | None = None
    delay: NonNegative = 0.0
    truncated: bool = False
    malformed: bool = False
    overlap: bool = False
    body: bytes | None = None
    content_type: str = "application/json"

    @property
    def is_error(self) -> bool:
        return self.status != 200


@dataclass(eq=False)
class FaultConfig:
    """Fault rates (probabilities per request, all 0 by default) and the fault script.

    The exclusive outcomes (429, 500, 503, timeout, truncated, malformed) are drawn with one
    uniform number per request, so their rates should sum to at most 1; ``rate_overlap`` is drawn
    independently for list requests. ``latency=(min, max)`` adds a uniformly random delay to every
    API request. The RNG is seeded with ``seed``, so a single-threaded sequence of requests sees
    a reproducible sequence of faults.
    """

    seed: int = 0
    rate_429: Rate = 0.0
    retry_after: NonNegative = 1.0
    rate_500: Rate = 0.0
    rate_503: Rate = 0.0
    rate_timeout: Rate = 0.0
    timeout_delay: NonNegative = 30.0
    rate_truncated: Rate = 0.0
    rate_malformed: Rate = 0.0
    latency: tuple[NonNegative, NonNegative] | None = None
    rate_overlap: Rate = 0.0
    apply_to_token: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> FaultConfig:
        exclusive = (
            self.rate_429
            + self.rate_500
            + self.rate_503
            + self.rate_timeout
            + self.rate_truncated
            + self.rate_malformed
        )
        if exclusive > 1.0 + 1e-9:
            raise ValueError(f"the exclusive fault rates sum to {exclusive:.3f} > 1")
        if self.latency is not None and self.latency[1] < self.latency[0]:
            raise ValueError(f"latency must be (min, max) with min <= max, got {self.latency}")
        return self

    def __post_init__(self) -> None:  # after validation: the live state
        self._script: deque[tuple[str | None, FaultResponse]] = deque()
        self._rng = random.Random(self.seed)

    def validate(self) -> None:
        """Check the settings as they are now (rates may be changed on the live object);
        raises ``ValueError`` (a pydantic ``ValidationError``) if one is out of range."""
        dataclasses.replace(self)  # a checked copy, thrown away

    # -- scripted faults -------------------------------------------------------------------

    def script(
        self,
        path_kind: PathKind | None = None,
        responses: Iterable[FaultResponse] = (),
    ) -> None:
        """Queue ``responses`` for the next requests of ``path_kind`` (``None``: any API request).

        Entries are consumed in the order they were queued; a request takes the first queued
        entry whose kind matches it.
        """
        if path_kind is not None and path_kind not in _ALL_KINDS:
            raise ValueError(
                f"unknown path_kind {path_kind!r}; expected one of {sorted(_ALL_KINDS)}"
            )
        for response in responses:
            if not isinstance(response, FaultResponse):
                raise TypeError(f"expected FaultResponse, got {type(response).__name__}")
            self._script.append((path_kind, response))

    def clear_script(self) -> None:
        """Drop every queued scripted response."""
        self._script.clear()

    def pending(self, path_kind: PathKind | None = None) -> int:
        """How many scripted responses are still queued (for ``path_kind``, or all)."""
        if path_kind is None:
            return len(self._script)
        return sum(1 for kind, _ in self._script if kind == path_kind)

    def clear(self) -> None:
        """Set every rate and the latency to zero and drop the script."""
        self.rate_429 = self.rate_500 = self.rate_503 = 0.0
        self.rate_timeout = self.rate_truncated = self.rate_malformed = 0.0
        self.rate_overlap = 0.0
        self.latency = None
        self.clear_script()

    # -- decisions (used by the app) -------------------------------------------------------

    def _take_scripted(self, kind: str) -> FaultResponse | None:
        for index, (wanted, response) in enumerate(self._script):
            if wanted == kind or (wanted is None and kind in API_KINDS):
                del self._script[index]
                return response
        return None

    def applies_to(self, kind: str) -> bool:
        """Whether random faults and latency apply to requests of ``kind``."""
        return kind in API_KINDS or (kind == "token" and self.apply_to_token)

    def extra_latency(self, kind: str) -> float:
        """Random extra latency for one request of ``kind`` (0 when not configured)."""
        if self.latency is None or not self.applies_to(kind):
            return 0.0
        lo, hi = self.latency
        if hi <= 0:
            return 0.0
        return lo if hi == lo else self._rng.uniform(lo, hi)

    def decide(self, kind: str) -> FaultResponse | None:
        """The fault for one request of ``kind``: scripted first, then random; ``None`` if none."""
        scripted = self._take_scripted(kind)
        if scripted is not None:
            return scripted
        if not self.applies_to(kind):
            return None
        outcome: FaultResponse | None = None
        exclusive = (
            (self.rate_429, 429),
            (self.rate_500, 500),
            (self.rate_503, 503),
            (self.rate_timeout, -1),
            (self.rate_truncated, -2),
            (self.rate_malformed, -3),
        )
        if any(rate > 0 for rate, _ in exclusive):
            draw = self._rng.random()
            acc = 0.0
            for rate, what in exclusive:
                acc += max(0.0, rate)
                if draw < acc:
                    outcome = self._random_outcome(what)
                    break
        if self.rate_overlap > 0 and kind in LIST_KINDS and self._rng.random() < self.rate_overlap:
            if outcome is None:
                outcome = FaultResponse(overlap=True)
            elif not outcome.is_error:
                outcome = FaultResponse(
                    delay=outcome.delay,
                    truncated=outcome.truncated,
                    malformed=outcome.malformed,
                    overlap=True,
                )
        return outcome

    def _random_outcome(self, what: int) -> FaultResponse:
        if what == 429:
            return FaultResponse(status=429, retry_after=self.retry_after)
        if what > 0:
            return FaultResponse(status=what)
        if what == -1:
            return FaultResponse(delay=self.timeout_delay)
        if what == -2:
            return FaultResponse(truncated=True)
        return FaultResponse(malformed=True)

    def choice(self, n: int) -> int:
        """A random index in ``range(n)`` from the fault RNG (for malformed variants)."""
        return self._rng.randrange(n) if n > 1 else 0

    def randint(self, lo: int, hi: int) -> int:
        """A random integer in ``[lo, hi]`` from the fault RNG."""
        return self._rng.randint(lo, hi)

    def shuffle(self, items: list[bytes]) -> None:
        """Shuffle ``items`` in place with the fault RNG."""
        self._rng.shuffle(items)
