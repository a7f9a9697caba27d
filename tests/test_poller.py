"""Scheduling with a manual clock: first poll at once, then one poll per SIM per interval."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.harness_support import MakeHarness, eventually
from twilio_wireless_exporter.polling.poller import sim_offset
from twilio_wireless_simulator import FaultResponse, RunningSimulator


def session_requests(sim: RunningSimulator) -> int:
    return sim.stats.count("data_sessions")


async def settle(h_poller_idle: Callable[[], bool]) -> None:
    await eventually(h_poller_idle)
    for _ in range(20):  # let any wrongly scheduled extra poll show itself
        await asyncio.sleep(0)


async def test_first_poll_at_once_then_once_per_interval(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sids = [sim.fleet.add_sim() for _ in range(6)]
    h = await harness(sids, poll={"interval": "60s"})
    poller = h.exporter.poller
    task = asyncio.create_task(poller.run())
    try:
        await eventually(lambda: session_requests(sim) == 6)
        await settle(lambda: poller.in_flight == 0 and h.clock.sleepers > 0)
        assert poller.ready
        # slots are spread over the interval by a stable hash of the SID
        offsets = sorted(sim_offset(s) for s in sids)
        assert offsets[0] != offsets[-1]
        await h.clock.advance(60 * (1 + offsets[0]) - 0.001)
        await settle(lambda: poller.in_flight == 0)
        assert session_requests(sim) == 6, "no SIM is due before its slot"
        for cycle in (2, 3, 4):
            await h.clock.advance(60)
            await eventually(lambda c=cycle: session_requests(sim) >= 6 * c)  # type: ignore[misc]
            await settle(lambda: poller.in_flight == 0)
            assert session_requests(sim) == 6 * cycle
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_slow_sim_does_not_delay_others(sim: RunningSimulator, harness: MakeHarness) -> None:
    slow, fast = sim.fleet.add_sim(), sim.fleet.add_sim()
    h = await harness([slow, fast], poll={"concurrency": 2})
    sim.faults.script("data_sessions", [FaultResponse(delay=1.5)])  # the first request hangs
    poller = h.exporter.poller
    task = asyncio.create_task(poller.run())
    try:
        await eventually(lambda: sum(r.up is not None for r in h.exporter.state.sims.values()) == 1)
        assert poller.in_flight == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert poller.in_flight == 0


async def test_discovery_adds_and_removes_sims(sim: RunningSimulator, harness: MakeHarness) -> None:
    active = [sim.fleet.add_sim(unique_name=f"a{i}") for i in range(3)]
    suspended = sim.fleet.add_sim(unique_name="s", status="suspended")
    h = await harness(
        [], sims=[], discovery={"enabled": True, "status": ["active"], "refresh_interval": "10m"}
    )
    poller = h.exporter.poller
    assert not poller.ready
    task = asyncio.create_task(poller.run())
    try:
        await eventually(lambda: poller.ready)
        assert set(h.exporter.state.sims) == set(active)
        assert suspended not in h.exporter.state.sims
        sim.fleet.set_sim_status(active[0], "deactivated")
        newcomer = sim.fleet.add_sim(unique_name="n")
        await h.clock.advance(600)
        await eventually(lambda: newcomer in h.exporter.state.sims)
        # A SIM leaves once missing from DISCOVERY_FORGET_AFTER (3) discoveries in a row.
        for _ in range(2):
            assert active[0] in h.exporter.state.sims
            listed = sim.stats.count("sims")
            await eventually(lambda: h.clock.sleepers > 0)
            await h.clock.advance(600)
            await eventually(lambda n=listed: sim.stats.count("sims") > n)  # type: ignore[misc]
        await eventually(lambda: active[0] not in h.exporter.state.sims)
        await eventually(lambda: h.exporter.state.sims[newcomer].up is True)
        text = await h.scrape()
        assert f'sim_sid="{active[0]}"' not in text
        assert "twilio_wireless_sims_monitored 3.0" in text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_discovery_failure_is_retried(sim: RunningSimulator, harness: MakeHarness) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([], sims=[], discovery={"enabled": True, "refresh_interval": "10m"})
    sim.faults.script("sims", [FaultResponse(status=403)])
    poller = h.exporter.poller
    task = asyncio.create_task(poller.run())
    try:
        await eventually(lambda: sim.stats.count("sims") == 1)
        assert not poller.ready
        await h.clock.advance(60)  # a failed discovery is retried within a minute
        await eventually(lambda: poller.ready)
        assert sid in h.exporter.state.sims
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("cancel_while_polling", [True, False])
async def test_shutdown_cancels_in_flight_polls(
    sim: RunningSimulator, harness: MakeHarness, cancel_while_polling: bool
) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid])
    if cancel_while_polling:
        sim.faults.script("data_sessions", [FaultResponse(delay=30)])
    await h.exporter.start()
    if cancel_while_polling:
        await eventually(lambda: sim.stats.in_flight == 1)
    else:
        await eventually(lambda: h.exporter.is_ready())
    await asyncio.wait_for(h.exporter.stop(), timeout=2)
    assert h.exporter.poller.in_flight == 0


async def test_discovery_uses_the_largest_pages(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """Discovery pages /v1/Sims 1,000 at a time, whatever poll.page_size says."""
    sids = {sim.fleet.add_sim(unique_name=f"d{i}") for i in range(5)}
    h = await harness(
        [], sims=[], poll={"page_size": 2, "max_pages": 1}, discovery={"enabled": True}
    )
    assert await h.exporter.poller.refresh_sims()
    assert set(h.exporter.state.sims) == sids
    assert sim.stats.count("sims") == 1


async def test_sims_are_kept_in_poll_slot_order(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """SIMs polled one after the other sit side by side in the state (and in /metrics), so
    the changes of any second touch a few cached blocks of the exposition."""
    configured = [sim.fleet.add_sim() for _ in range(12)]
    discovered = [sim.fleet.add_sim() for _ in range(12)]
    h = await harness(
        configured,
        discovery={"enabled": True, "status": ["active"], "refresh_interval": "10m"},
    )
    state = h.exporter.state
    assert list(state.sims) == sorted(configured, key=sim_offset)
    assert await h.exporter.poller.refresh_sims()
    assert list(state.sims) == sorted(configured + discovered, key=sim_offset)
    version = state.version
    assert await h.exporter.poller.refresh_sims()
    assert state.version == version  # nothing moved, nothing to re-lay out
    newcomer = sim.fleet.add_sim()
    assert await h.exporter.poller.refresh_sims()
    assert list(state.sims) == sorted([*configured, *discovered, newcomer], key=sim_offset)
    await h.poll()
    text = await h.scrape()
    shown = [
        line.split('sim_sid="')[1][:34]
        for line in text.splitlines()
        if line.startswith("twilio_wireless_sim_up{")
    ]
    assert shown == list(state.sims)


async def test_one_unreadable_sim_repeats_its_own_read_not_the_fleet_listing(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """Before: a configured SIM whose read failed made the whole refresh (the /v1/Sims
    listing of the fleet) run again every minute instead of every refresh_interval."""
    listed = sim.fleet.add_sim()
    missing = "DE" + "f" * 32  # configured, but not a SIM of this account: 404
    h = await harness([missing], discovery={"enabled": True, "refresh_interval": "10m"})
    poller = h.exporter.poller
    task = asyncio.create_task(poller.run())
    try:

        def idle(reads: int) -> Callable[[], bool]:
            # both loops (scheduler, refresh) asleep on the clock after that many SIM reads
            return lambda: sim.stats.count("sim") == reads and h.clock.sleepers == 2

        await eventually(idle(1))
        assert sim.stats.count("sims") == 1
        for minute in range(1, 10):
            await h.clock.advance(60)
            await eventually(idle(1 + minute))  # the failed read, tried again each minute
        assert sim.stats.count("sims") == 1  # the listing waits for its refresh_interval
        await h.clock.advance(60)
        await eventually(lambda: sim.stats.count("sims") == 2)
        assert listed in h.exporter.state.sims
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_configured_sims_are_polled_while_discovery_fails(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """Before: with discovery on, configured SIMs waited for the first successful listing, so
    an API key without the right to list SIMs left every configured SIM unwatched."""
    sid = sim.fleet.add_sim()
    sim.faults.script("sims", [FaultResponse(status=403)] * 5)
    h = await harness([sid], discovery={"enabled": True, "refresh_interval": "10m"})
    task = asyncio.create_task(h.exporter.poller.run())
    try:
        await eventually(lambda: session_requests(sim) == 1)
        assert sim.stats.count("sims", 403) == 1
        assert not h.exporter.poller.ready  # ready needs one good discovery
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
