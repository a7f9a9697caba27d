"""The identity of configured SIMs at the API's cost: pages of the /v1/Sims listing instead of
one read per SIM, counted per endpoint by the real simulator; the fallbacks when the listing
fails, misses a SIM or holds a bad record; and identity work waiting for the first polls."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.harness_support import MakeHarness, eventually
from tests.hostile_support import SIM_A, SIM_B, ScriptedApi, sims_page, start_exporter
from tests.metrics_support import sample_value
from twilio_wireless_exporter.polling.identity import ListingCensus
from twilio_wireless_exporter.polling.poller import DISCOVERY_PAGE_SIZE
from twilio_wireless_simulator import FaultResponse, RunningSimulator

ERRORS = "twilio_wireless_poll_errors_total"
REJECTED = "twilio_wireless_api_records_rejected_total"
ABSENT = "DE" + "f" * 32  # configured, but no SIM of this account: its read is a 404


def identity_requests(sim: RunningSimulator) -> dict[str, int]:
    """Requests the simulator answered, by endpoint, for the identity of SIMs."""
    return {kind: sim.stats.count(kind) for kind in ("sims", "sim")}


# ------------------------------------------------------------------------------ the census


def test_the_census_lists_only_when_fewer_pages_than_reads() -> None:
    census = ListingCensus(1000)
    assert census.estimate() == 1
    assert census.budget(1) == 0  # one read costs what one page costs
    assert census.budget(2) == 1
    assert census.budget(10_000) == 9_999
    census.listed(11, complete=True)  # 10,500 SIMs, say
    assert (census.pages, census.at_least, census.estimate()) == (11, 0, 11)
    assert census.budget(11) == 0
    assert census.budget(12) == 11
    census.listed(11, complete=False)  # the account grew past the budget
    assert census.estimate() == 12
    assert census.budget(12) == 0
    census.counted(15_001)  # a discovery listing of one status held more
    assert census.estimate() == 16
    census.listed(3, complete=True)  # SIMs were deleted: the latest complete listing wins
    assert (census.pages, census.at_least, census.estimate()) == (3, 0, 3)


@given(
    history=st.lists(
        st.tuples(st.integers(0, 500), st.booleans(), st.integers(0, 600_000)), max_size=20
    ),
    sims=st.integers(0, 100_000),
)
def test_a_listing_never_costs_as_many_requests_as_the_reads_it_replaces(
    history: list[tuple[int, bool, int]], sims: int
) -> None:
    census = ListingCensus(1000)
    for pages, complete, counted in history:
        census.listed(pages, complete)
        census.counted(counted)
    budget = census.budget(sims)
    assert 0 <= budget < max(1, sims)
    assert budget == 0 or census.estimate() < sims


# ------------------------------------------------------------------------------ request counts


@pytest.mark.parametrize(("configured", "account"), [(1_200, 1_200), (1_500, 3_500)])
async def test_identity_of_1000_plus_configured_sims_costs_the_pages_of_the_listing(
    sim: RunningSimulator, harness: MakeHarness, configured: int, account: int
) -> None:
    """Before: one GET /v1/Sims/{sid} per configured SIM (1,200 and 1,500 requests per
    refresh); now ceil(account SIMs / 1000) pages, and one read for the SIM the listing lacks."""
    sids = [sim.fleet.add_sim(unique_name=f"u{i}", status="active") for i in range(account)]
    chosen = sids[:: account // configured][:configured]
    h = await harness([*chosen, ABSENT])
    poller, state = h.exporter.poller, h.exporter.state
    pages = math.ceil(account / DISCOVERY_PAGE_SIZE)
    for refresh in (1, 2):
        assert not await poller.refresh_sims()  # the absent SIM's read fails (404)
        assert identity_requests(sim) == {"sims": pages * refresh, "sim": refresh}
    assert sim.stats.count("sim", 404) == 2
    names = {sid: f"u{i}" for i, sid in enumerate(sids)}
    assert all(state.sims[s].identity.unique_name == names[s] for s in chosen)
    assert state.sims[ABSENT].identity.unique_name == ""
    # the failed read alone is tried again (as a read: one SIM is cheaper than the listing)
    assert await poller._refresh_identities([ABSENT]) == {ABSENT}
    assert identity_requests(sim) == {"sims": 2 * pages, "sim": 3}


async def test_an_account_larger_than_the_budget_is_read_sim_by_sim_next_time(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """Three configured SIMs in an account of 4,500: the first refresh stops the listing at
    two pages (fewer than the three reads) and reads the SIMs it did not reach; the census
    then knows the listing takes more than two pages, and later refreshes read each SIM."""
    sids = [sim.fleet.add_sim() for _ in range(4_500)]
    configured = [sids[0], sids[1_500], sids[4_000]]  # pages 1, 2 and 5 of the listing
    h = await harness(configured)
    poller = h.exporter.poller
    assert await poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 2, "sim": 1}
    assert await poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 2, "sim": 4}
    text = await h.scrape()
    assert sample_value(text, ERRORS, endpoint="sims", kind="too_many_pages") is None


async def test_the_identity_listing_follows_at_most_max_pages(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sids = [sim.fleet.add_sim() for _ in range(2_500)]
    configured = [sids[0], sids[1_000], sids[1_999], sids[2_000]]  # pages 1, 2, 2 and 3
    h = await harness(configured, poll={"max_pages": 2})
    assert await h.exporter.poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 2, "sim": 1}
    text = await h.scrape()
    assert sample_value(text, ERRORS, endpoint="sims", kind="too_many_pages") is None


async def test_a_fleet_larger_than_max_pages_still_costs_one_request_per_page(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """poll.max_pages does not push a fleet back to one read per SIM: 3,000 configured SIMs
    with max_pages 2 take the 3 pages they fill."""
    sids = [sim.fleet.add_sim() for _ in range(3_000)]
    h = await harness(sids, poll={"max_pages": 2})
    assert await h.exporter.poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 3, "sim": 0}


async def test_suspended_sims_beside_active_discovery_come_from_one_more_listing(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    active = [sim.fleet.add_sim(status="active") for _ in range(5)]
    suspended = [sim.fleet.add_sim(status="suspended", unique_name=f"s{i}") for i in range(4)]
    h = await harness(suspended, discovery={"enabled": True, "status": ["active"]})
    assert await h.exporter.poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 2, "sim": 0}
    state = h.exporter.state
    assert set(state.sims) == set(active) | set(suspended)
    assert [state.sims[s].identity.status for s in suspended] == ["suspended"] * 4
    assert [state.sims[s].identity.unique_name for s in suspended] == ["s0", "s1", "s2", "s3"]


# ------------------------------------------------------------------------------ failures


async def test_a_failed_listing_falls_back_to_reading_each_sim(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sids = [sim.fleet.add_sim(unique_name=f"n{i}") for i in range(5)]
    # the first page and its 3 retries (the test config's max_retries) answer 503
    sim.faults.script("sims", [FaultResponse(status=503)] * 4)
    h = await harness(sids)
    assert await h.exporter.poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 4, "sim": 5}
    assert [h.exporter.state.sims[s].identity.unique_name for s in sids] == [
        f"n{i}" for i in range(5)
    ]
    text = await h.scrape()
    assert sample_value(text, ERRORS, endpoint="sims", kind="http") == 1.0
    assert sample_value(text, ERRORS, endpoint="sim", kind="http") is None
    # the census learned nothing from the failure: the next refresh tries the listing again
    assert await h.exporter.poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 5, "sim": 5}


async def test_a_listing_failing_after_its_first_page_reads_only_the_sims_not_seen(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sids = [sim.fleet.add_sim() for _ in range(2_500)]
    configured = [sids[10], sids[20], sids[1_200], sids[2_400]]
    h = await harness(configured)
    sim.faults.script("sims", [FaultResponse(), *[FaultResponse(status=500)] * 4])
    assert await h.exporter.poller.refresh_sims()
    assert identity_requests(sim) == {"sims": 5, "sim": 2}  # SIMs of pages 2 and 3
    assert all(h.exporter.state.sims[s].identity.status == "active" for s in configured)


async def test_a_bad_record_in_the_listing_is_counted_and_not_read_again() -> None:
    good = json.loads(sims_page([SIM_A]))
    good["sims"].append({"sid": SIM_B, "status": 7})  # a status that is no string
    api = ScriptedApi(sims_default=json.dumps(good).encode())
    async with start_exporter(api, [SIM_A, SIM_B]) as run:
        assert await run.exporter.poller.refresh_sims()
        assert api.paths == ["/v1/Sims?PageSize=1000"]
        text = await run.scrape()
        assert sample_value(text, REJECTED, endpoint="sims", reason="malformed") == 1.0
        state = run.exporter.state
        assert state.sims[SIM_A].identity.unique_name == SIM_A[-4:]
        assert state.sims[SIM_B].identity.status == ""  # kept as it was (nothing yet)
        assert await run.exporter.poller.refresh_sims()
        text = await run.scrape()
        assert sample_value(text, REJECTED, endpoint="sims", reason="malformed") == 2.0


# ------------------------------------------------------------------------------ first polls


async def test_first_polls_go_before_identity(sim: RunningSimulator, harness: MakeHarness) -> None:
    """Before: the refresh started with run() and its identity reads took the first request
    slots, so every SIM's first poll waited behind them. With one slot the simulator sees
    the requests in the order the client admits them."""
    sids = [sim.fleet.add_sim() for _ in range(20)]
    h = await harness(sids, poll={"concurrency": 1})
    task = asyncio.create_task(h.exporter.poller.run())
    try:
        await eventually(lambda: sim.stats.count("sims") == 1 and sim.stats.in_flight == 0)
        kinds = [entry.path_kind for entry in sim.stats.log]
        assert kinds == ["data_sessions"] * 20 + ["sims"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_discovery_does_not_wait_for_the_first_polls(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """The discovery listing brings SIMs to poll: it goes first; the identity of configured
    SIMs it does not list waits for their first polls."""
    configured = [sim.fleet.add_sim(status="suspended") for _ in range(3)]
    discovered = [sim.fleet.add_sim() for _ in range(2)]
    h = await harness(
        configured, poll={"concurrency": 1}, discovery={"enabled": True, "status": ["active"]}
    )
    task = asyncio.create_task(h.exporter.poller.run())
    try:
        await eventually(lambda: sim.stats.count("data_sessions") == 5 and sim.stats.in_flight == 0)
        await eventually(lambda: sim.stats.count("sims") == 2 and sim.stats.in_flight == 0)
        kinds = [entry.path_kind for entry in sim.stats.log]
        assert kinds[0] == "sims"  # discovery: at once, ahead of the first polls
        assert kinds.index("sims", 1) > kinds.index("data_sessions") + 2  # after the 3 polls
        assert set(h.exporter.state.sims) == set(configured) | set(discovered)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_unusable_next_page_of_the_listing_fails_it_and_the_rest_is_read_alone() -> None:
    api = ScriptedApi(sims_default=sims_page([]))
    api.sims.append(sims_page([SIM_A], "http://[::1/v1/Sims?Page=1"))
    async with start_exporter(api, [SIM_A, SIM_B]) as run:
        assert await run.exporter.poller.refresh_sims()
        assert api.paths == ["/v1/Sims?PageSize=1000", f"/v1/Sims/{SIM_B}"]
        text = await run.scrape()
        assert sample_value(text, ERRORS, endpoint="sims", kind="bad_next_page") == 1.0
        state = run.exporter.state
        assert [state.sims[s].identity.status for s in (SIM_A, SIM_B)] == ["active", "active"]
