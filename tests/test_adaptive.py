"""The adaptive in-flight limit: halves on 429 once per round, grows back on success; and the
client's admission around it (the 429-storm pause, the rate limit)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twilio_wireless_exporter.api.adaptive import AdaptiveLimit
from twilio_wireless_exporter.api.limits import STORM_429S, RequestLimits


async def test_without_429_the_limit_stays_at_the_maximum() -> None:
    limit = AdaptiveLimit(4)
    for _ in range(20):
        async with limit.slot() as slot:
            slot.status = 200
    assert limit.limit == 4
    assert limit.decreases == 0


async def test_a_round_of_429s_halves_the_limit_once() -> None:
    limit = AdaptiveLimit(32)
    held = [limit.slot() for _ in range(32)]
    slots = [await cm.__aenter__() for cm in held]
    for cm, slot in zip(held, slots, strict=True):
        slot.status = 429
        await cm.__aexit__(None, None, None)
    assert limit.limit == 16  # 32 echoes of one overload: one cut
    assert limit.decreases == 1
    async with limit.slot() as slot:  # sent after the cut: a new signal
        slot.status = 429
    assert limit.limit == 8


async def test_successes_grow_the_limit_back_to_the_maximum() -> None:
    limit = AdaptiveLimit(8)
    async with limit.slot() as slot:
        slot.status = 429
    assert limit.limit == 4
    successes = 0
    while limit.limit < 8:
        async with limit.slot() as slot:
            slot.status = 200
        successes += 1
    # about one slot more per window of `limit` successes: 4 + 5 + 6 + 7 = 22
    assert 15 <= successes <= 30
    for _ in range(50):
        async with limit.slot() as slot:
            slot.status = 200
    assert limit.limit == 8


async def test_errors_without_a_status_and_5xx_leave_the_limit_alone() -> None:
    limit = AdaptiveLimit(8)
    async with limit.slot() as slot:
        slot.status = 429
    for status in (None, 500, 503):
        async with limit.slot() as slot:
            slot.status = status
    assert limit.limit == 4
    with pytest.raises(RuntimeError):
        async with limit.slot():
            raise RuntimeError("boom")
    assert limit.limit == 4
    assert limit.in_flight == 0


async def test_a_lower_limit_is_enforced_on_admission() -> None:
    limit = AdaptiveLimit(8)
    async with limit.slot() as slot:
        slot.status = 429
    async with limit.slot() as slot:
        slot.status = 429
    assert limit.limit == 2
    peak = 0

    async def request() -> None:
        nonlocal peak
        async with limit.slot() as slot:
            peak = max(peak, limit.in_flight)
            await asyncio.sleep(0.001)
            slot.status = 503

    await asyncio.gather(*(request() for _ in range(20)))
    assert peak == 2


async def test_cancelled_waiters_do_not_leak_permits() -> None:
    limit = AdaptiveLimit(1)
    release = asyncio.Event()

    async def holder() -> None:
        async with limit.slot() as slot:
            await release.wait()
            slot.status = 200

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await first
    await asyncio.gather(waiter, return_exceptions=True)
    async with asyncio.timeout(1):
        async with limit.slot() as slot:
            slot.status = 200
    assert limit.in_flight == 0


async def test_many_cancelled_waiters_raise_cancelled_error_only() -> None:
    """Shutdown cancels every queued request; a slot freed meanwhile skips their waiters."""
    limit = AdaptiveLimit(2)
    release = asyncio.Event()

    async def request() -> None:
        async with limit.slot() as slot:
            await release.wait()
            slot.status = 200

    tasks = [asyncio.create_task(request()) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()  # the two running requests finish first and come across the cancelled
    for task in tasks[2:]:  # waiters before those tasks get to run
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:2] == [None, None]
    assert all(isinstance(r, asyncio.CancelledError) for r in results[2:])
    assert limit.in_flight == 0
    async with asyncio.timeout(1):
        async with limit.slot(), limit.slot():
            pass


@settings(max_examples=200, deadline=None)
@given(
    maximum=st.integers(1, 64),
    statuses=st.lists(st.sampled_from([200, 200, 200, 404, 429, 500, None]), max_size=300),
)
def test_the_limit_stays_within_bounds_and_permits_are_conserved(
    maximum: int, statuses: list[int | None]
) -> None:
    async def scenario() -> None:
        limit = AdaptiveLimit(maximum)
        for status in statuses:
            async with limit.slot() as slot:
                assert limit.in_flight <= limit.limit + 1  # admitted before a cut
                slot.status = status
            assert 1 <= limit.limit <= maximum
        # every permit that is not parked can be taken at once, and no more
        held = [limit.slot() for _ in range(limit.limit)]
        for cm in held:
            await cm.__aenter__()
        extra = asyncio.create_task(limit.slot().__aenter__())
        await asyncio.sleep(0)
        assert not extra.done()
        extra.cancel()
        await asyncio.gather(extra, return_exceptions=True)
        for cm in held:
            await cm.__aexit__(None, None, None)

    asyncio.run(scenario())


async def test_waiters_are_admitted_oldest_operation_first() -> None:
    limit = AdaptiveLimit(1)
    older, newer = limit.new_order(), limit.new_order()
    admitted: list[str] = []

    async def request(name: str, order: int | None) -> None:
        async with limit.slot(order) as slot:
            admitted.append(name)
            slot.status = 200

    held = limit.slot()
    await held.__aenter__()
    tasks = [
        asyncio.create_task(request("newer 1", newer)),
        asyncio.create_task(request("newer 2", newer)),
        asyncio.create_task(request("no order", None)),  # an operation that begins now
        asyncio.create_task(request("older", older)),
    ]
    await asyncio.sleep(0)  # all four queue behind the held slot
    await held.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert admitted == ["older", "newer 1", "newer 2", "no order"]
    assert limit.in_flight == 0


async def test_background_operations_queue_behind_every_foreground_one() -> None:
    """A usage listing that began long before still waits for session polls begun after it;
    background operations keep their own oldest-first order."""
    limit = AdaptiveLimit(1)
    early_usage, late_usage = limit.new_order(background=True), limit.new_order(background=True)
    for _ in range(1000):  # many operations since: the offset still outranks them all
        limit.new_order()
    poll = limit.new_order()
    assert early_usage < late_usage
    assert poll < early_usage
    admitted: list[str] = []

    async def request(name: str, order: int | None) -> None:
        async with limit.slot(order) as slot:
            admitted.append(name)
            slot.status = 200

    held = limit.slot()
    await held.__aenter__()
    tasks = [
        asyncio.create_task(request("late usage", late_usage)),
        asyncio.create_task(request("early usage", early_usage)),
        asyncio.create_task(request("poll", poll)),
        asyncio.create_task(request("no order", None)),  # a foreground operation begun now
    ]
    await asyncio.sleep(0)  # all four queue behind the held slot
    await held.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert admitted == ["poll", "no order", "early usage", "late usage"]


def test_request_limits_hand_out_background_orders() -> None:
    limits = RequestLimits(1, 10.0)
    usage = limits.new_order(background=True)
    assert limits.new_order() < usage
    assert limits.new_order(background=True) > usage


async def test_a_cancelled_waiter_leaves_the_queue_in_order() -> None:
    limit = AdaptiveLimit(1)
    admitted: list[int] = []

    async def request(order: int) -> None:
        async with limit.slot(order) as slot:
            admitted.append(order)
            slot.status = 200

    held = limit.slot()
    await held.__aenter__()
    orders = [limit.new_order() for _ in range(5)]
    tasks = {order: asyncio.create_task(request(order)) for order in reversed(orders)}
    await asyncio.sleep(0)
    tasks[orders[1]].cancel()
    await asyncio.gather(tasks[orders[1]], return_exceptions=True)
    await held.__aexit__(None, None, None)
    await asyncio.gather(*(t for o, t in tasks.items() if o != orders[1]))
    assert admitted == [orders[0], *orders[2:]]
    assert limit.in_flight == 0


# ------------------------------------------------------------------------------ admission


async def test_a_run_of_429s_is_a_storm_and_any_other_answer_ends_it() -> None:
    limits = RequestLimits(4, 1000.0)

    async def answer(status: int | None) -> None:
        async with limits.admit(limits.new_order()) as ticket:
            ticket.status = status

    for status in [429] * (STORM_429S - 1) + [None, 200]:  # no answer (a timeout) keeps the run
        await answer(status)
    assert not limits.storming()
    for _ in range(STORM_429S - 1):
        await answer(429)
    assert not limits.storming()
    await answer(429)
    assert limits.storming()
    await answer(404)
    assert not limits.storming()
    with limits.pausing(60.0, 429):  # a lone 429's retry sleeps: the other requests go on
        async with asyncio.timeout(1):
            await answer(200)
    assert limits.slots.in_flight == 0


async def test_a_request_cancelled_during_the_storm_pause_hands_its_slot_on() -> None:
    limits = RequestLimits(1, 1000.0)
    admitted: list[int] = []

    async def request(name: int, status: int | None = None) -> None:
        async with limits.admit(limits.new_order()) as ticket:
            admitted.append(name)
            ticket.status = status

    for _ in range(STORM_429S):
        await request(0, 429)
    admitted.clear()
    with limits.pausing(60.0, 429):  # a storm's retry sleeps: nothing goes out
        paused = asyncio.create_task(request(1))
        await asyncio.sleep(0)
        assert limits.slots.in_flight == 1  # it holds the only slot while it waits
        assert admitted == []
        paused.cancel()
        with pytest.raises(asyncio.CancelledError):
            await paused
        assert limits.slots.in_flight == 0
    async with asyncio.timeout(1):
        await request(2)
    assert admitted == [2]
    assert limits.slots.in_flight == 0
