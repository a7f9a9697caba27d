"""Seeded SIM lifecycle: suspensions that end in reactivation, connectivity resets, plan changes.

Each generated SIM that starts ``active`` draws, from its own RNG, a sequence of episodes after
the clock's start time: the gaps between them are exponential (mean :data:`MEAN_GAP`), so over
a fleet they are rare and steady. An episode is one of

* ``suspended`` for an hour to two days, then ``active`` again (no data session is open then:
  the session timeline skips the episode);
* ``resetting``: ``reset_status`` is ``resetting`` for two to thirty minutes;
* ``plan``: the SIM moves to another rate plan for good.

The sequence depends only on the seed and the SIM, never on when or how often it is read.
"""

from __future__ import annotations

import math
import random
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


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


class Lifecycle:
    """The episodes of one SIM, drawn lazily in time order."""

    __slots__ = (
        "_cursor",
        "_next",
        "_plan",
        "_plans",
        "_rng",
        "episodes",
        "horizon",
        "transitions",
    )

    def __init__(self, seed: int, index: int, start: int, plan: int, plans: int) -> None:
        self._rng = random.Random(f"{seed}:lifecycle:{index}")
        self._plan = plan
        self._plans = plans
        self._next = start + int(self._rng.expovariate(1.0 / MEAN_GAP)) + 1
        self.episodes: list[Episode] = []
        #: Status, reset and plan changes in time order, for the fleet's event queue.
        self.transitions: list[Transition] = []
        self._cursor = 0
        #: No suspension begins before this time (nor has one begun that is not yet passed):
        #: sessions before it need no look at the episodes (the session timeline's fast path).
        self.horizon = self._next

    def _refresh(self) -> None:
        episodes = self.episodes
        cursor = self._cursor
        while cursor < len(episodes) and episodes[cursor].kind != "suspended":
            cursor += 1
        self.horizon = episodes[cursor].start if cursor < len(episodes) else self._next

    def until(self, t: int) -> None:
        """Draw every episode that starts at or before ``t``."""
        rng = self._rng
        while self._next <= t:
            at = self._next
            roll = rng.random()
            if roll < 0.55:
                end = at + int(_log_uniform(rng, 3600.0, 2 * 86400.0))
                episode = Episode("suspended", at, end, self._plan)
                self.transitions += (
                    Transition(at, "status", "suspended"),
                    Transition(end, "status", "active"),
                )
            elif roll < 0.90 or self._plans < 2:
                end = at + int(rng.uniform(120.0, 1800.0))
                episode = Episode("resetting", at, end, self._plan)
                self.transitions += (
                    Transition(at, "reset", "resetting"),
                    Transition(end, "reset", None),
                )
            else:
                plan = (self._plan + rng.randrange(1, self._plans)) % self._plans
                self._plan = plan
                end = at
                episode = Episode("plan", at, at, plan)
                self.transitions.append(Transition(at, "plan", plan))
            self.episodes.append(episode)
            self._next = end + 1 + int(rng.expovariate(1.0 / MEAN_GAP))
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
