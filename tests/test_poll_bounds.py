"""Polls running at once are bounded (the rest wait their turn), without busy-waiting."""

from __future__ import annotations

import asyncio

import pytest

from tests.harness_support import MakeHarness, eventually
from twilio_wireless_exporter.clock import Clock, sleep_or_wake
from twilio_wireless_exporter.polling import poller as poller_module
from twilio_wireless_simulator import RunningSimulator


async def test_the_first_cycle_runs_a_bounded_number_of_polls_at_once(
    sim: RunningSimulator, harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    sids = [sim.fleet.add_sim() for _ in range(40)]
    h = await harness(sids, poll={"concurrency": 2})
    sim.faults.latency = (0.002, 0.002)  # polls that take a moment: a busy loop would show
    poller = h.exporter.poller
    monkeypatch.setattr(poller, "_max_tasks", 5)
    wakeups = 0

    async def counting(clock: Clock, wake: asyncio.Event, delay: float | None) -> None:
        nonlocal wakeups
        wakeups += 1
        await sleep_or_wake(clock, wake, delay)

    monkeypatch.setattr(poller_module, "sleep_or_wake", counting)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, poller.in_flight)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    task = asyncio.create_task(poller.run())
    try:
        await eventually(lambda: all(r.up for r in h.exporter.state.sims.values()))
        assert sim.stats.count("data_sessions") == 40  # every SIM once, none twice
        assert 1 < peak <= 5
        # woken about once per finishing poll (40 here), not spinning on due ones (thousands)
        assert wakeups <= 100
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def test_poll_all_polls_every_sim_once_with_bounded_workers(
    sim: RunningSimulator, harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    sids = [sim.fleet.add_sim() for _ in range(25)]
    h = await harness(sids)
    poller = h.exporter.poller
    monkeypatch.setattr(poller, "_max_tasks", 3)
    running = peak = 0
    poll_sim = poller.poll_sim

    async def counting(sid: str) -> bool:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await poll_sim(sid)
        finally:
            running -= 1

    monkeypatch.setattr(poller, "poll_sim", counting)
    await poller.poll_all()
    assert sim.stats.count("data_sessions") == 25
    assert all(r.up for r in h.exporter.state.sims.values())
    assert peak == 3
