"""Seeded SIM lifecycle: suspensions that end in reactivation, connectivity resets, plan changes.

Each generated SIM that starts ``active`` draws, from hashes of the seed, a sequence of episodes
after the clock's start time: the gaps between them are exponential (mean :data:`MEAN_GAP`), so
over a fleet they are rare and steady. An episode is one of

* ``suspended`` for an hour to two days, then ``active`` again (no data session is open then:
  the session timeline skips the episode);
* ``resetting``: ``reset_status`` is ``resetting`` for two to thirty minutes;
* ``plan``: the SIM moves to another rate plan for good.

The sequence depends only on the seed and the SIM, never on when or how often it is read.
"""

from __future__ import annotations

import hashlib
import math
from typing import Final, Literal, NamedTuple

__all__ = ["MEAN_GAP", "Episode", "Lifecycle", "Transition"]

#: Mean simulated time between two episodes of one SIM.
MEAN_GAP: Final = 12 * 86400.0

EpisodeKind = Literal["suspended", "resetting", "plan"]


class Episode(NamedTuple):
    kind: EpisodeKind
    start: int
    end: int
    #: The new plan's index (``plan`` episodes).
    plan: int


class Transition(NamedTuple):
    """A change at ``at``: ``what`` is ``status``, ``reset`` or ``plan``; ``value`` the new one
    (a status, ``"resetting"`` or ``None``, or a plan index)."""

    at: int
    what: str
    value: str | int | None


def _log_uniform(u: float, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _gap(u: float) -> int:
    return int(-math.log(1.0 - u) * MEAN_GAP)


class Lifecycle:
    """The episodes of one SIM, drawn lazily in time order.

    Episode ``n`` draws its numbers from a hash of (seed, SIM, ``n``) rather than from a random
    generator object: no generator state per SIM (a fleet of 10,000 would hold 10,000 of them).
    """

    __slots__ = (
        "_cursor",
        "_key",
        "_n",
        "_next",
        "_plan",
        "_plans",
        "episodes",
        "horizon",
        "transitions",
    )

    def __init__(self, seed: int, index: int, start: int, plan: int, plans: int) -> None:
        self._key = f"{seed}:lifecycle:{index}"
        self._plan = plan
        self._plans = plans
        self._n = 0
        self._next = start + _gap(self._draw(-1)[0]) + 1
        self.episodes: list[Episode] = []
        #: Status, reset and plan changes in time order, for the fleet's event queue.
        self.transitions: list[Transition] = []
        self._cursor = 0
        #: No suspension begins before this time (nor has one begun that is not yet passed):
        #: sessions before it need no look at the episodes (the session timeline's fast path).
        self.horizon = self._next

    def _draw(self, n: int) -> tuple[float, float, float, float]:
        raw = hashlib.blake2b(f"{self._key}:{n}".encode(), digest_size=32).digest()
        a, b, c, d = (int.from_bytes(raw[i : i + 8], "big") / 2.0**64 for i in (0, 8, 16, 24))
        return a, b, c, d

    def _refresh(self) -> None:
        episodes = self.episodes
        cursor = self._cursor
        while cursor < len(episodes) and episodes[cursor].kind != "suspended":
            cursor += 1
        self.horizon = episodes[cursor].start if cursor < len(episodes) else self._next

    def until(self, t: int) -> None:
        """Draw every episode that starts at or before ``t``."""
        while self._next <= t:
            at = self._next
            roll, length, other, gap = self._draw(self._n)
            self._n += 1
            if roll < 0.55:
                end = at + int(_log_uniform(length, 3600.0, 2 * 86400.0))
                episode = Episode("suspended", at, end, self._plan)
                self.transitions += (
                    Transition(at, "status", "suspended"),
                    Transition(end, "status", "active"),
                )
            elif roll < 0.90 or self._plans < 2:
                end = at + int(120.0 + length * 1680.0)
                episode = Episode("resetting", at, end, self._plan)
                self.transitions += (
                    Transition(at, "reset", "resetting"),
                    Transition(end, "reset", None),
                )
            else:
                plan = (self._plan + 1 + int(other * (self._plans - 1))) % self._plans
                self._plan = plan
                end = at
                episode = Episode("plan", at, at, plan)
                self.transitions.append(Transition(at, "plan", plan))
            self.episodes.append(episode)
            self._next = end + 1 + _gap(gap)
        self._refresh()

    def next_transition(self, after: int) -> Transition:
        """The first transition at index ``after`` (drawing more episodes as needed)."""
        while after >= len(self.transitions):
            self.until(self._next)
        return self.transitions[after]

    def _suspension_after(self, t: int) -> Episode | None:
        """The first suspension that has not ended by ``t`` (drawn up to ``t``). Sessions are
        drawn in time order, so suspensions that ended before are passed for good."""
        self.until(t)
        episodes = self.episodes
        cursor = self._cursor
        while cursor < len(episodes) and (
            episodes[cursor].kind != "suspended" or episodes[cursor].end <= t
        ):
            cursor += 1
        self._cursor = cursor
        self._refresh()
        return episodes[cursor] if cursor < len(episodes) else None

    def resume(self, t: int) -> int:
        """When a session due at ``t`` may start: at the end of the suspension ``t`` falls in."""
        suspension = self._suspension_after(t)
        if suspension is not None and suspension.start <= t:
            return suspension.end
        return t

    def cut(self, start: int, end: int) -> int:
        """Where a session ``[start, end)`` that may start at ``start`` ends: at the start of the
        first suspension it runs into."""
        self.until(end)
        suspension = self._suspension_after(start)
        if suspension is not None and start < suspension.start < end:
            return suspension.start
        return end
