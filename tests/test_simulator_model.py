"""The simulator's fleet model: determinism, time, retention, scripting, realism (no sockets)."""

from __future__ import annotations

import collections
import math

import pytest

from twilio_wireless_simulator import (
    COUNTRIES,
    DEFAULT_START_TIME,
    RADIO_LINKS,
    Fleet,
    Operator,
    SessionView,
    SimClock,
    SimulatorConfig,
    format_time,
    luhn_check_digit,
)

HOUR = 3600.0
DAY = 86400.0


def make_fleet(sims: int = 30, seed: int = 5, **kwargs: float | bool) -> Fleet:
    return Fleet(SimClock(), sims=sims, seed=seed, **kwargs)  # type: ignore[arg-type]


def snapshot(fleet: Fleet) -> dict[str, list[SessionView]]:
    return {sid: fleet.listing(sid) for sid in fleet.sim_sids()}


def luhn_valid(number: str) -> bool:
    return luhn_check_digit(number[:-1]) == number[-1]


# ------------------------------------------------------------------------------------------
# Clock
# ------------------------------------------------------------------------------------------


def test_manual_clock() -> None:
    clock = SimClock()
    assert clock.manual
    assert clock.now() == DEFAULT_START_TIME
    assert format_time(int(clock.now())) == "2026-01-01T00:00:00Z"
    assert clock.advance(90.5) == DEFAULT_START_TIME + 90.5
    clock.set(DEFAULT_START_TIME + 10)
    assert clock.now() == DEFAULT_START_TIME + 10
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_accelerated_clock_uses_speed_times_wall_time() -> None:
    wall = [100.0]
    clock = SimClock(1_000_000.0, speed=60.0, wall=lambda: wall[0])
    assert not clock.manual
    assert clock.now() == 1_000_000.0
    wall[0] += 1.0
    assert clock.now() == 1_000_060.0
    clock.advance(5)
    assert clock.now() == 1_000_065.0
    clock.set(2_000_000.0)
    wall[0] += 2.0
    assert clock.now() == 2_000_120.0
    with pytest.raises(ValueError, match="speed"):
        SimClock(speed=0)


SIM_START = 1_767_225_600  # simulated start (2026-01-01T00:00:00Z)
WALL_START = 1_700_000_000  # the real unix time at which the clock started


def accelerated(speed: float = 60.0) -> tuple[SimClock, list[float]]:
    """An accelerated clock on a fake monotonic wall clock (advance it through the list)."""
    wall = [5000.0]
    return SimClock(SIM_START, speed=speed, wall=lambda: wall[0], wall_start=WALL_START), wall


def test_wall_time_maps_simulated_time_onto_the_real_clock() -> None:
    clock, wall = accelerated()
    assert clock.wall_start_time == WALL_START
    assert clock.wall_time(SIM_START) == WALL_START
    assert clock.wall_time(SIM_START + HOUR) == WALL_START + 60
    # backfilled past maps to the recent past, compressed the same way
    assert clock.wall_time(SIM_START - DAY) == WALL_START - 1440
    # while the clock runs, simulated now maps to the real time now
    wall[0] += 90.0
    assert clock.wall_time(clock.now()) == WALL_START + 90
    # a fixed mapping: manual adjustments do not move it
    clock.advance(HOUR)
    assert clock.wall_time(SIM_START + HOUR) == WALL_START + 60
    # without a start time, simulated time starts at the real time
    assert SimClock(speed=10.0, wall_start=WALL_START).start_time == WALL_START
    with pytest.raises(ValueError, match="manual"):
        SimClock().wall_time(SIM_START)
    with pytest.raises(ValueError, match="wall_start"):
        SimClock(wall_start=WALL_START)
    assert SimClock().wall_start_time is None


def test_wall_timestamps_report_mapped_times_and_compress_durations() -> None:
    clock, _ = accelerated()
    fleet = Fleet(clock, sims=0, wall_timestamps=True)
    sid = fleet.add_sim(unique_name="pump-1")
    clock.set(SIM_START + 2 * HOUR)
    session = fleet.open_session(sid)  # started at simulated X = start + 2 h
    clock.advance(HOUR)
    fleet.close_session(session)  # lasted one simulated hour
    [view] = fleet.listing(sid)
    # the model stays in simulated time ...
    assert (view.start, view.end, view.last_updated) == (
        SIM_START + 2 * HOUR,
        SIM_START + 3 * HOUR,
        SIM_START + 3 * HOUR,
    )
    assert fleet.history(sid) == [view]
    # ... what the API reports is on the real clock: X maps to wall_start + 2 h / 60
    api = view.to_api(fleet.time_format)
    assert (api["start"], api["end"], api["last_updated"]) == (
        "2023-11-14T22:15:20Z",
        "2023-11-14T22:16:20Z",
        "2023-11-14T22:16:20Z",
    )
    assert api["start"] == format_time(WALL_START + 120)
    assert fleet.reported_time(view.start) == WALL_START + 120
    # one simulated hour lasts one reported minute
    assert fleet.reported_time(view.end or 0) - fleet.reported_time(view.start) == 60
    sim = fleet.sim(sid)
    assert sim is not None
    assert sim.date_created == SIM_START  # added before the clock was set forward
    dates = sim.to_api("http://sim", fleet.time_format)
    assert (dates["date_created"], dates["date_updated"]) == (
        format_time(WALL_START),
        format_time(WALL_START),
    )
    # a fraction of a reported second rounds down, never into the future
    assert fleet.reported_time(SIM_START + 59) == WALL_START
    assert fleet.reported_time(SIM_START - 1) == WALL_START - 1


def test_wall_timestamps_are_per_fleet_and_off_by_default() -> None:
    clock, _ = accelerated()
    plain = Fleet(clock, sims=3, seed=9)
    assert plain.wall_timestamps is False
    assert plain.time_format is format_time
    assert plain.reported_time(SIM_START + HOUR) == SIM_START + HOUR
    # another fleet with another mapping at the same simulated second: the shared format_time
    # cache holds reported seconds, so neither leaks into the other
    fast, _ = accelerated(speed=600.0)
    wall = Fleet(clock, sims=3, seed=9, wall_timestamps=True)
    faster = Fleet(fast, sims=3, seed=9, wall_timestamps=True)
    t = SIM_START + 3600
    assert [f.time_format(t) for f in (plain, wall, faster)] == [
        format_time(SIM_START + 3600),
        format_time(WALL_START + 60),
        format_time(WALL_START + 6),
    ]
    # the same generated sessions, reported differently
    sid = next(s for s in plain.sim_sids() if plain.listing(s))
    assert plain.listing(sid) == wall.listing(sid)
    assert [v.to_api() for v in plain.listing(sid)] == [
        v.to_api(plain.time_format) for v in plain.listing(sid)
    ]
    # the rule lives in the config, which the fleet trusts
    with pytest.raises(ValueError, match="wall_timestamps"):
        SimulatorConfig(wall_timestamps=True)


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


def test_same_seed_same_fleet_and_listings() -> None:
    a, b = make_fleet(seed=5, retention=2 * DAY), make_fleet(seed=5, retention=2 * DAY)
    assert list(a) == list(b)
    assert snapshot(a) == snapshot(b)
    for fleet in (a, b):
        fleet.clock.advance(7 * HOUR)
    assert snapshot(a) == snapshot(b)
    c = make_fleet(seed=6, retention=2 * DAY)
    assert [s.sid for s in c] != [s.sid for s in a]
    assert snapshot(c) != snapshot(a)


def test_listing_does_not_depend_on_how_time_was_advanced() -> None:
    one_step = make_fleet(seed=9, retention=DAY)
    many_steps = make_fleet(seed=9, retention=DAY)
    one_step.clock.advance(DAY)
    for _ in range(24):
        many_steps.clock.advance(HOUR)
        snapshot(many_steps)  # generate lazily at every step
    assert snapshot(one_step) == snapshot(many_steps)
    assert {sid: one_step.history(sid) for sid in one_step.sim_sids()} == {
        sid: many_steps.history(sid) for sid in many_steps.sim_sids()
    }


def test_ids_are_well_formed_and_unique() -> None:
    fleet = make_fleet(sims=200, seed=1, retention=DAY)
    sims = list(fleet)
    assert len({s.sid for s in sims}) == 200
    for sim in sims:
        assert sim.sid.startswith("DE")
        assert len(sim.sid) == 34
        int(sim.sid[2:], 16)
        assert sim.account_sid.startswith("AC")
        assert sim.rate_plan_sid is not None
        assert sim.rate_plan_sid.startswith("WP")
        assert len(sim.rate_plan_sid) == 34
        assert sim.iccid is not None
        assert luhn_valid(sim.iccid)
        assert sim.unique_name == f"sim-{sims.index(sim):05d}"
    assert len({s.rate_plan_sid for s in sims}) > 1
    assert collections.Counter(s.status for s in sims).most_common(1)[0][0] == "active"
    assert {s.status for s in sims} >= {"active", "suspended", "deactivated", "ready"}
    assert any(s.friendly_name is None for s in sims)
    sessions = [v for sid in fleet.sim_sids() for v in fleet.listing(sid)]
    assert len({v.sid for v in sessions}) == len(sessions)
    for v in sessions:
        assert v.sid.startswith("WN")
        assert len(v.sid) == 34
        int(v.sid[2:], 16)
        if v.imei is not None:
            assert len(v.imei) == 15
            assert luhn_valid(v.imei)


def test_luhn_check_digit_matches_known_values() -> None:
    assert luhn_check_digit("01493100012970") == "0"  # the IMEI in Twilio's docs
    assert luhn_check_digit("49015420323751") == "8"  # the usual Wikipedia IMEI example
    assert luhn_check_digit("7992739871") == "3"


# ------------------------------------------------------------------------------------------
# Time passing
# ------------------------------------------------------------------------------------------


def test_time_brings_new_sessions_growing_packets_and_ends() -> None:
    fleet = make_fleet(sims=40, seed=3, retention=2 * DAY)
    before = snapshot(fleet)
    open_before = {v.sid: v for views in before.values() for v in views if v.end is None}
    assert open_before
    fleet.clock.advance(2 * HOUR)
    after = snapshot(fleet)
    all_before = {v.sid for views in before.values() for v in views}
    all_after = {v.sid: v for views in after.values() for v in views}
    assert set(all_after) - all_before, "no new sessions in two hours"
    grew = ended = 0
    for sid, old in open_before.items():
        new = all_after[sid]
        assert new.start == old.start
        assert new.packets_uploaded >= old.packets_uploaded
        assert new.packets_downloaded >= old.packets_downloaded
        assert new.last_updated >= old.last_updated
        grew += new.packets_uploaded + new.packets_downloaded > (
            old.packets_uploaded + old.packets_downloaded
        )
        ended += new.end is not None
    assert grew > 0
    assert ended > 0


def test_packets_never_decrease_and_last_updated_is_granular() -> None:
    fleet = make_fleet(sims=25, seed=4, retention=DAY, update_granularity=300.0)
    seen: dict[str, SessionView] = {}
    for _ in range(40):
        fleet.clock.advance(97.0)
        now = fleet.clock.now()
        for sid in fleet.sim_sids():
            for v in fleet.listing(sid):
                assert v.start <= now
                assert v.last_updated <= now
                if v.end is None:
                    assert v.last_updated == v.start or v.last_updated % 300 == 0
                else:
                    assert v.last_updated == v.end
                old = seen.get(v.sid)
                if old is not None:
                    assert v.packets_uploaded >= old.packets_uploaded
                    assert v.packets_downloaded >= old.packets_downloaded
                    assert v.last_updated >= old.last_updated
                    assert old.end is None or v.end == old.end
                seen[v.sid] = v


def test_retention_drops_old_sessions_but_history_keeps_them() -> None:
    fleet = make_fleet(sims=30, seed=8, retention=2 * HOUR)
    listed_ever: dict[str, set[str]] = collections.defaultdict(set)
    for _ in range(12):
        fleet.clock.advance(HOUR)
        now = fleet.clock.now()
        for sid in fleet.sim_sids():
            listing = fleet.listing(sid)
            for v in listing:
                assert v.end is None or v.end >= now - 2 * HOUR
                listed_ever[sid].add(v.sid)
            history = {v.sid: v for v in fleet.history(sid)}
            assert {v.sid for v in listing} <= set(history)
            # Everything in history that is recent enough is listed.
            for v in history.values():
                recent = v.end is None or v.end >= now - 2 * HOUR
                assert recent == (v.sid in {x.sid for x in listing}), v
    dropped = sum(
        1
        for sid in fleet.sim_sids()
        for v in fleet.history(sid)
        if v.sid in listed_ever[sid] and v.sid not in {x.sid for x in fleet.listing(sid)}
    )
    assert dropped > 0
    # Memory stays bounded: aged-out sessions are no longer held for listing.
    assert fleet.live_session_count() == sum(len(fleet.listing(s)) for s in fleet.sim_sids())


def test_history_can_be_turned_off() -> None:
    fleet = make_fleet(sims=5, keep_history=False)
    with pytest.raises(RuntimeError, match="keep_history"):
        fleet.history(fleet.sim_sids()[0])
    fleet.clock.advance(DAY)
    assert sum(len(v) for v in snapshot(fleet).values()) > 0


def test_without_history_listings_are_the_same() -> None:
    a = make_fleet(sims=20, seed=12, keep_history=False, retention=HOUR)
    b = make_fleet(sims=20, seed=12, keep_history=True, retention=HOUR)
    for _ in range(5):
        a.clock.advance(HOUR)
        b.clock.advance(HOUR)
        assert snapshot(a) == snapshot(b)


def test_backfill_controls_how_much_past_exists() -> None:
    short = make_fleet(sims=30, seed=2, backfill=0.0, retention=3 * DAY)
    full = make_fleet(sims=30, seed=2, retention=3 * DAY)
    start = short.clock.now()
    n_short = sum(len(short.history(sid)) for sid in short.sim_sids())
    n_full = sum(len(full.history(sid)) for sid in full.sim_sids())
    assert n_short * 5 < n_full
    for sid in short.sim_sids():
        for v in short.history(sid):
            # At most one cycle (longest session + longest gap) before the start.
            assert v.start >= start - 3 * DAY - 3 * DAY


# ------------------------------------------------------------------------------------------
# Realism
# ------------------------------------------------------------------------------------------


def test_fleet_behaviour_is_varied_and_realistic() -> None:
    fleet = make_fleet(sims=300, seed=21, retention=3 * DAY)
    now = fleet.clock.now()
    counts = [len(fleet.listing(sid)) for sid in fleet.sim_sids()]
    views = [v for sid in fleet.sim_sids() for v in fleet.listing(sid)]
    assert max(counts) >= 200, "no chatty SIM"
    assert sorted(counts)[len(counts) // 2] < 100
    active_silent = [
        sid
        for sid in fleet.sim_sids("active")
        if not any(v.end is None or v.end > now - DAY for v in fleet.listing(sid))
    ]
    assert active_silent, "no dead SIM"
    durations = [v.end - v.start for v in views if v.end is not None]
    assert min(durations) <= 120
    assert max(durations) >= DAY
    known = {op for country in COUNTRIES for op in country.operators}
    ops = {
        Operator(v.operator_mcc, v.operator_mnc, v.operator_country, v.operator_name) for v in views
    }
    for op in ops:
        if op.mcc not in ("", None) and op.name != "":
            assert op in known, op
    assert len({v.operator_country for v in views}) >= 6
    assert {v.radio_link for v in views} - {None} <= set(RADIO_LINKS)
    # Locations are near the reported country's cities.
    cities = {c.iso3: c.cities for c in COUNTRIES}
    located = 0
    for v in views:
        loc = v.cell_location_estimate
        if loc and v.operator_country:
            located += 1
            nearest = min(
                math.hypot(loc["lat"] - lat, loc["lon"] - lon)
                for lat, lon in cities[v.operator_country]
            )
            assert nearest < 0.5, (v.operator_country, loc)
    assert located > len(views) / 2
    # Upload and download differ; IMEIs sometimes change within one SIM.
    assert sum(v.packets_uploaded != v.packets_downloaded for v in views) > len(views) * 0.9
    imeis_per_sim = [len({v.imei for v in fleet.history(sid)} - {None}) for sid in fleet.sim_sids()]
    assert max(imeis_per_sim) >= 2


# ------------------------------------------------------------------------------------------
# Scripting
# ------------------------------------------------------------------------------------------


def test_scripted_sessions_show_exactly_what_was_scripted() -> None:
    fleet = make_fleet(sims=0)
    t0 = int(fleet.clock.now())
    sid = fleet.add_sim(unique_name="truck-1", status="active")
    assert fleet.sim_sids() == [sid]
    assert fleet.listing(sid) == []
    s1 = fleet.open_session(
        sid,
        radio_link="LTE-M",
        operator=("310", "410", "USA", "AT&T"),
        imei="490154203237518",
        cell_location={"lat": 40.7, "lon": -74.0},
        packets_uploaded=5,
        packets_downloaded=7,
    )
    [v] = fleet.listing(sid)
    assert v.to_api() == {
        "sid": s1,
        "sim_sid": sid,
        "account_sid": fleet.account_sid,
        "radio_link": "LTE-M",
        "operator_mcc": "310",
        "operator_mnc": "410",
        "operator_country": "USA",
        "operator_name": "AT&T",
        "cell_id": v.cell_id,
        "cell_location_estimate": {"lat": 40.7, "lon": -74.0},
        "packets_uploaded": 5,
        "packets_downloaded": 7,
        "last_updated": format_time(t0),
        "start": format_time(t0),
        "end": None,
        "imei": "490154203237518",
    }
    fleet.clock.advance(600)
    # Scripted values do not move by themselves.
    assert fleet.listing(sid) == [v]
    fleet.update_session(s1, packets_uploaded=50, packets_downloaded=70)
    [v2] = fleet.listing(sid)
    assert (v2.packets_uploaded, v2.packets_downloaded, v2.last_updated) == (50, 70, t0 + 600)
    fleet.update_session(s1, packets_uploaded=60, last_updated=t0 + 650, imei=None)
    [v3] = fleet.listing(sid)
    assert (v3.packets_uploaded, v3.packets_downloaded, v3.last_updated, v3.imei) == (
        60,
        70,
        t0 + 650,
        None,
    )
    fleet.close_session(s1, end=t0 + 700)
    [v4] = fleet.listing(sid)
    assert (v4.end, v4.last_updated) == (t0 + 700, t0 + 700)
    s2 = fleet.open_session(sid, start=t0 + 900)
    assert {x.sid for x in fleet.listing(sid)} == {s1}  # s2 starts in the future
    fleet.clock.advance(300)
    assert {x.sid for x in fleet.listing(sid)} == {s1, s2}
    fleet.remove_session(s1)
    assert [x.sid for x in fleet.listing(sid)] == [s2]
    assert [x.sid for x in fleet.history(sid)] == [s1, s2]
    # Scripted SIMs never generate sessions.
    fleet.clock.advance(10 * DAY)
    assert [x.sid for x in fleet.history(sid)] == [s1, s2]
    assert fleet.sim("truck-1") == fleet.sim(sid)


def test_scripted_sessions_age_out_with_retention() -> None:
    fleet = make_fleet(sims=0, retention=HOUR)
    sid = fleet.add_sim()
    s1 = fleet.open_session(sid)
    fleet.clock.advance(60)
    fleet.close_session(s1)
    fleet.clock.advance(HOUR)
    assert [v.sid for v in fleet.listing(sid)] == [s1]
    fleet.clock.advance(1)
    assert fleet.listing(sid) == []
    with pytest.raises(KeyError):
        fleet.update_session(s1, packets_uploaded=1)


def test_scripting_a_generated_session_freezes_it() -> None:
    fleet = make_fleet(sims=20, seed=3)
    sid = next(s for s in fleet.sim_sids() if any(v.end is None for v in fleet.listing(s)))
    open_view = next(v for v in fleet.listing(sid) if v.end is None)
    fleet.close_session(open_view.sid, packets_uploaded=open_view.packets_uploaded + 1)
    closed = fleet.session(open_view.sid)
    assert closed.end == int(fleet.clock.now())
    assert closed.packets_uploaded == open_view.packets_uploaded + 1
    fleet.clock.advance(HOUR)
    assert fleet.session(open_view.sid) == closed


def test_scripting_validates_input() -> None:
    fleet = make_fleet(sims=1)
    with pytest.raises(ValueError, match="status"):
        fleet.add_sim(status="sleeping")
    with pytest.raises(ValueError, match="SID"):
        fleet.add_sim(sid="DE123")
    with pytest.raises(ValueError, match="exists"):
        fleet.add_sim(sid=fleet.sim_sids()[0])
    with pytest.raises(KeyError):
        fleet.open_session("DE" + "0" * 32)
    with pytest.raises(KeyError):
        fleet.close_session("WN" + "0" * 32)
    fleet.set_sim_status(fleet.sim_sids()[0], "suspended")
    assert fleet.sim_sids("suspended") == fleet.sim_sids()
