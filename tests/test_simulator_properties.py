"""Property-based checks of the fleet model's invariants over random seeds and clock walks."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twilio_wireless_simulator import Fleet, SessionView, SimClock

HOUR = 3600.0

steps_strategy = st.lists(st.floats(min_value=0.0, max_value=6 * HOUR), min_size=1, max_size=8)


def _fleet(seed: int, retention: float, granularity: float) -> Fleet:
    return Fleet(
        SimClock(),
        sims=8,
        seed=seed,
        retention=retention,
        update_granularity=granularity,
        backfill=retention,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=10_000),
    retention=st.sampled_from([HOUR, 6 * HOUR, 2 * 86400.0]),
    granularity=st.sampled_from([1.0, 60.0, 900.0]),
    steps=steps_strategy,
)
def test_listing_invariants_hold_along_any_clock_walk(
    seed: int, retention: float, granularity: float, steps: list[float]
) -> None:
    fleet = _fleet(seed, retention, granularity)
    previous: dict[str, SessionView] = {}
    for step in steps:
        fleet.clock.advance(step)
        now = int(fleet.clock.now())  # the API (and the model) resolve whole seconds
        for sim_sid in fleet.sim_sids():
            listing = fleet.listing(sim_sid)
            history = {v.sid: v for v in fleet.history(sim_sid)}
            assert len({v.sid for v in listing}) == len(listing)
            # What is listed is exactly the part of history inside the retention window.
            in_window = {
                sid for sid, v in history.items() if v.end is None or v.end >= now - retention
            }
            assert {v.sid for v in listing} == in_window
            for v in listing:
                assert v.sim_sid == sim_sid
                assert v.start <= v.last_updated <= now
                assert v.end is None or v.start < v.end <= now
                assert v.end is None or v.last_updated == v.end
                assert v.packets_uploaded >= 0
                assert v.packets_downloaded >= 0
                assert history[v.sid] == v
                old = previous.get(v.sid)
                if old is not None:
                    assert v.start == old.start
                    assert v.packets_uploaded >= old.packets_uploaded
                    assert v.packets_downloaded >= old.packets_downloaded
                    assert v.last_updated >= old.last_updated
                    if old.end is not None:
                        assert v == old  # a closed session never changes again
                previous[v.sid] = v
            # Sessions of one device never overlap.
            ordered = sorted(history.values(), key=lambda v: v.start)
            for a, b in itertools.pairwise(ordered):
                assert a.end is not None
                assert a.end <= b.start


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=10_000), steps=steps_strategy)
def test_the_timeline_does_not_depend_on_the_walk(seed: int, steps: list[float]) -> None:
    walked = _fleet(seed, 6 * HOUR, 60.0)
    for step in steps:
        walked.clock.advance(step)
        for sim_sid in walked.sim_sids():
            walked.listing(sim_sid)
    jumped = _fleet(seed, 6 * HOUR, 60.0)
    jumped.clock.set(walked.clock.now())
    for sim_sid in walked.sim_sids():
        assert walked.listing(sim_sid) == jumped.listing(sim_sid)
        assert walked.history(sim_sid) == jumped.history(sim_sid)
