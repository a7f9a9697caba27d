"""The exporter against the real simulator on port 0, with a manual clock: exact metric values."""

from __future__ import annotations

import asyncio
import gc
import gzip
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.harness_support import MakeHarness, eventually, exporter_mapping
from tests.metrics_support import find_value as metric
from twilio_wireless_exporter.cli import build_parser, serve
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import config_from_mapping
from twilio_wireless_exporter.fleet.persist import read_state, state_identity
from twilio_wireless_exporter.polling.poller import Poller
from twilio_wireless_exporter.service import Exporter, Loops
from twilio_wireless_exporter.web import app as web
from twilio_wireless_exporter.web.app import coalesce
from twilio_wireless_simulator import FaultResponse, RunningSimulator

HOUR = 3600.0


def counters(text: str, sid: str) -> tuple[float | None, ...]:
    return tuple(
        metric(text, f"twilio_wireless_sim_{name}", sid)
        for name in (
            "data_sessions_started_total",
            "data_sessions_ended_total",
            "data_sessions_open",
            "packets_uploaded_total",
            "packets_downloaded_total",
        )
    )


async def test_baseline_then_exact_session_accounting(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    fleet = sim.fleet
    sid = fleet.add_sim(unique_name="pump-17", friendly_name="Pump 17")
    old = fleet.open_session(sid, packets_uploaded=100, packets_downloaded=200)
    h = await harness([sid])

    await h.poll()
    text = await h.scrape()
    # the first poll is the baseline: nothing counted, the open session is visible
    assert counters(text, sid) == (0, 0, 1, 0, 0)
    assert metric(text, "twilio_wireless_sim_up", sid) == 1

    sim.clock.advance(HOUR)
    fleet.update_session(old, packets_uploaded=150, packets_downloaded=260)
    fleet.close_session(old)
    new = fleet.open_session(sid, packets_uploaded=7, packets_downloaded=9, radio_link="NB-IoT")
    await h.poll()
    text = await h.scrape()
    assert counters(text, sid) == (1, 1, 1, 50 + 7, 60 + 9)
    duration = "twilio_wireless_data_session_duration_seconds"
    assert metric(text, duration + "_count", radio_link="LTE") == 1
    assert metric(text, duration + "_sum", radio_link="LTE") == HOUR
    assert metric(text, "twilio_wireless_sim_session_info", sid, radio_link="NB-IoT") == 1

    # a session that starts and ends between two polls counts once as started and once as ended
    sim.clock.advance(600)
    short = fleet.open_session(sid, packets_uploaded=5, packets_downloaded=5)
    sim.clock.advance(120)
    fleet.close_session(short)
    await h.poll()
    text = await h.scrape()
    assert counters(text, sid) == (2, 2, 1, 57 + 5, 69 + 5)
    assert metric(text, duration + "_count", radio_link="LTE") == 2

    # the same listing again changes nothing
    await h.poll()
    assert counters(await h.scrape(), sid) == (2, 2, 1, 62, 74)

    # sessions age out of the listing: packet counters keep their value
    fleet.remove_session(old)
    fleet.remove_session(short)
    fleet.update_session(new, packets_uploaded=10, packets_downloaded=9)
    await h.poll()
    assert counters(await h.scrape(), sid) == (2, 2, 1, 65, 74)


async def test_info_location_imei_and_timestamps(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    fleet = sim.fleet
    sid = fleet.add_sim(unique_name="meter-1", friendly_name="Meter 1", status="active")
    t0 = sim.clock.now()
    first = fleet.open_session(
        sid, imei="490154203237518", cell_location={"lat": 52.52, "lon": 13.405}
    )
    h = await harness([sid])
    assert await h.exporter.poller.refresh_sims()
    await h.poll()
    text = await h.scrape()
    assert (
        metric(
            text,
            "twilio_wireless_sim_info",
            sid,
            sim_name="Meter 1",
            unique_name="meter-1",
            friendly_name="Meter 1",
            status="active",
        )
        == 1
    )
    assert metric(text, "twilio_wireless_sim_cell_latitude_degrees", sid) == 52.52
    assert metric(text, "twilio_wireless_sim_last_session_start_timestamp_seconds", sid) == t0
    assert metric(text, "twilio_wireless_sim_imei_changes_total", sid) == 0

    sim.clock.advance(HOUR)
    fleet.close_session(first)
    fleet.open_session(sid, imei="356938035643809", cell_location={})  # device swapped
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_imei_changes_total", sid) == 1
    # the newest session has no estimate: the last known location stays
    assert metric(text, "twilio_wireless_sim_cell_longitude_degrees", sid) == 13.405
    assert (
        metric(text, "twilio_wireless_sim_last_session_start_timestamp_seconds", sid) == t0 + HOUR
    )
    assert metric(text, "twilio_wireless_sim_last_updated_timestamp_seconds", sid) == t0 + HOUR


async def test_identity_from_sims_endpoint(sim: RunningSimulator, harness: MakeHarness) -> None:
    sid = sim.fleet.add_sim(unique_name="tracker-9", friendly_name=None, status="suspended")
    h = await harness([sid], sims=[{"sid": sid, "name": "truck 9", "labels": {"site": "hub"}}])
    assert await h.exporter.poller.refresh_sims()
    text = await h.scrape()
    info = {
        "sim_name": "truck 9",
        "unique_name": "tracker-9",
        "friendly_name": "",
        "status": "suspended",
        "site": "hub",
    }
    assert metric(text, "twilio_wireless_sim_info", sid, **info) == 1
    # absent data is absent: no poll yet, so no sim_up and no counters
    assert metric(text, "twilio_wireless_sim_up", sid) is None
    assert metric(text, "twilio_wireless_sim_data_sessions_open", sid) is None


async def test_sim_up_falls_on_errors_and_recovers(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid], poll={"max_retries": 1})
    await h.poll()
    assert metric(await h.scrape(), "twilio_wireless_sim_up", sid) == 1

    sim.faults.script("data_sessions", [FaultResponse(status=500), FaultResponse(status=503)])
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 0
    assert (
        metric(text, "twilio_wireless_api_retries_total", endpoint="data_sessions", reason="5xx")
        == 1
    )
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="500")
        == 1
    )
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="503")
        == 1
    )
    assert metric(text, "twilio_wireless_poll_errors_total", kind="http") == 1
    # the last good values stay exported while the SIM is down
    assert metric(text, "twilio_wireless_sim_data_sessions_started_total", sid) == 0

    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 1


async def test_retries_honour_retry_after(sim: RunningSimulator, harness: MakeHarness) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid], poll={"max_retries": 3, "backoff_initial": "1s", "backoff_max": "2s"})
    sim.faults.script(
        "data_sessions",
        [FaultResponse(status=429, retry_after=7), FaultResponse(status=502)],
    )
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 1
    assert len(h.sleeps) == 2
    assert h.sleeps[0] == 7  # Retry-After wins over the 0.5..1 s backoff
    assert 1 <= h.sleeps[1] <= 2  # second backoff: half to full of min(2 s cap, 2 s)
    assert (
        metric(text, "twilio_wireless_api_retries_total", endpoint="data_sessions", reason="429")
        == 1
    )
    assert (
        metric(text, "twilio_wireless_api_retries_total", endpoint="data_sessions", reason="5xx")
        == 1
    )


async def test_retries_give_up_after_max_retries(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid], poll={"max_retries": 2})
    sim.faults.script("data_sessions", [FaultResponse(status=503)] * 5)
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 0
    assert len(h.sleeps) == 2
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="503")
        == 3
    )


async def test_no_retry_on_401_and_404(sim: RunningSimulator, harness: MakeHarness) -> None:
    sid = sim.fleet.add_sim()
    unknown = "DE" + "0" * 32
    h = await harness([sid, unknown], twilio={"auth_token": "wrong-token"})
    await h.poll()
    text = await h.scrape()
    assert h.sleeps == []
    assert metric(text, "twilio_wireless_sim_up", sid) == 0
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="401")
        == 2
    )
    assert metric(text, "twilio_wireless_poll_errors_total", kind="auth") == 2

    h2 = await harness([sid, unknown])
    await h2.poll()
    text = await h2.scrape()
    assert h2.sleeps == []
    assert metric(text, "twilio_wireless_sim_up", unknown) == 0
    assert metric(text, "twilio_wireless_sim_up", sid) == 1
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="404")
        == 1
    )


async def test_malformed_responses_fail_the_poll_only(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sid = sim.fleet.add_sim()
    sim.fleet.open_session(sid)
    h = await harness([sid], poll={"max_retries": 0})
    await h.poll()
    sim.faults.script(
        "data_sessions",
        [FaultResponse(status=200, truncated=True), FaultResponse(status=200, malformed=True)],
    )
    await h.poll()
    assert metric(await h.scrape(), "twilio_wireless_sim_up", sid) == 0
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 0
    assert metric(text, "twilio_wireless_poll_errors_total", kind="decode") == 2
    assert metric(text, "twilio_wireless_sim_data_sessions_open", sid) == 1
    await h.poll()
    assert metric(await h.scrape(), "twilio_wireless_sim_up", sid) == 1


async def test_a_garbled_page_is_retried_like_a_5xx(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid], poll={"max_retries": 2, "page_size": 1})
    await h.poll()
    sim.fleet.open_session(sid)
    sim.fleet.open_session(sid)
    sim.faults.script(
        "data_sessions",
        [FaultResponse(), FaultResponse(truncated=True), FaultResponse(malformed=True)],
    )
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 1
    assert metric(text, "twilio_wireless_sim_data_sessions_started_total", sid) == 2
    retries = "twilio_wireless_api_retries_total"
    assert metric(text, retries, endpoint="data_sessions", reason="decode") == 2
    assert metric(text, "twilio_wireless_poll_errors_total", kind="decode") is None
    assert len(h.sleeps) == 2  # backed off before each retry, the second page kept its place


async def test_paging_follows_next_page_url(sim: RunningSimulator, harness: MakeHarness) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid], poll={"page_size": 2})
    await h.poll()
    for _ in range(5):
        sim.fleet.open_session(sid, packets_uploaded=1)
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_data_sessions_started_total", sid) == 5
    assert metric(text, "twilio_wireless_sim_packets_uploaded_total", sid) == 5
    # 1 request for the empty baseline listing + 3 pages of 2, 2, 1 sessions
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="200")
        == 4
    )


async def test_concurrency_limit_is_respected(sim: RunningSimulator, harness: MakeHarness) -> None:
    sids = [sim.fleet.add_sim() for _ in range(24)]
    h = await harness(sids, poll={"concurrency": 3})
    sim.faults.latency = (0.005, 0.02)
    await h.poll()
    sim.faults.latency = None
    assert sim.stats.max_in_flight == 3
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sims_monitored") == 24
    assert sum(metric(text, "twilio_wireless_sim_up", s) or 0 for s in sids) == 24


async def test_poll_interval_is_exported_from_the_config(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    h = await harness([sim.fleet.add_sim()], poll={"interval": "7m30s"})
    text = await h.scrape()  # there before the first poll: alerts compare against it
    assert metric(text, "twilio_wireless_poll_interval_seconds") == 450
    await h.poll()
    assert metric(await h.scrape(), "twilio_wireless_poll_interval_seconds") == 450


async def test_shard_is_exported_from_the_config(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    unsharded = await harness([sim.fleet.add_sim()])
    assert metric(await unsharded.scrape(), "twilio_wireless_exporter_shards", index="0") == 1
    h = await harness([sim.fleet.add_sim()], shard={"index": 1, "count": 3})
    text = await h.scrape()  # there before the first poll: the shard alert counts on it
    assert metric(text, "twilio_wireless_exporter_shards", index="1") == 3
    assert metric(text, "twilio_wireless_exporter_shards", index="0") is None


async def test_health_and_readiness(sim: RunningSimulator, harness: MakeHarness) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid])
    assert (await h.http.get("/-/healthy")).status == 200
    resp = await h.http.get("/-/ready")
    assert resp.status == 503
    assert "0 of 1" in await resp.text()
    await h.poll()
    assert (await h.http.get("/-/ready")).status == 200
    page = await (await h.http.get("/")).text()
    assert 'href="metrics"' in page
    assert "SIMs monitored</th><td>1<" in page


async def test_openmetrics_and_gzip(sim: RunningSimulator, harness: MakeHarness) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid])
    await h.poll()
    resp = await h.http.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).rstrip().endswith("# EOF")
    resp = await h.http.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    body = await resp.read()
    assert body[:2] == b"\x1f\x8b"
    resp = await h.http.get("/metrics", headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "Content-Encoding" not in resp.headers


async def test_per_sim_state_is_invisible_to_the_cyclic_garbage_collector(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """A full collection walks every tracked object, so at fleet scale tracked per-SIM records
    would pause scrapes (docs/performance.md has the measurement). They can form no cycles, so
    they are not tracked at all, nor is a SIM's dict of remembered sessions."""
    fleet = sim.fleet
    sids = [fleet.add_sim(friendly_name=f"pump {i}") for i in range(20)]
    for sid in sids:
        fleet.open_session(sid, packets_uploaded=5, packets_downloaded=6)
        fleet.close_session(fleet.open_session(sid))
    h = await harness(sids, sims=[{"sid": sid, "labels": {"site": "hub"}} for sid in sids])
    await h.poll()
    sim.clock.advance(HOUR)
    for sid in sids:
        fleet.open_session(sid, radio_link="NB-IoT", imei="356938035643809")
    await h.poll()
    await h.scrape()

    records = list(h.exporter.state.sims.values())
    assert len(records) == 20
    assert all(r.account.started_total == 1 and len(r.account.sessions) == 3 for r in records)
    objects = [
        obj
        for r in records
        for obj in (r, r.identity, r.account, r.account.latest, *r.account.sessions.values())
    ]
    assert len(objects) == 20 * 7
    assert [type(o).__name__ for o in objects if gc.is_tracked(o)] == []
    assert [r.sid for r in records if gc.is_tracked(r.account.sessions)] == []


def test_coalesce_regroups_parts_without_copying_big_ones() -> None:
    big = b"c" * 10
    chunks = list(coalesce([b"aaa", b"bbb", big, b"d", b"", b"eeeee", b"f"], 5))
    assert chunks == [b"aaabbb", big, b"d", b"eeeee", b"f"]
    assert chunks[1] is big
    assert list(coalesce([], 5)) == []


async def test_metrics_are_sent_in_chunks_with_the_exact_length(
    sim: RunningSimulator, harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "SEND_CHUNK", 700)  # many chunks even for a small fleet
    sids = [sim.fleet.add_sim(friendly_name=f"meter {i}") for i in range(5)]
    for sid in sids:
        sim.fleet.open_session(sid, packets_uploaded=1, packets_downloaded=2)
    h = await harness(sids)
    await h.poll()
    h.exporter.exposition.text()  # counts its series: the series gauge shows them from now on
    expected = h.exporter.exposition.text()
    assert len(expected) > 5 * 700

    resp = await h.http.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(expected))
    assert "Transfer-Encoding" not in resp.headers
    assert await resp.read() == expected

    resp = await h.http.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    zipped = await resp.read()
    assert resp.headers["Content-Length"] == str(len(zipped))
    assert gzip.decompress(zipped) == expected

    resp = await h.http.head("/metrics", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(expected))
    assert await resp.read() == b""


# ------------------------------------------------------------------------------ lifecycle


async def _stopped() -> None:
    return None


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_crashing_loop_is_logged_by_name_and_stops_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[str] = []
    loops = Loops(on_failure=lambda: failures.append("called"))
    survivor_cancelled = asyncio.Event()

    async def crash() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("a bug in the loop")

    async def survivor() -> None:
        try:
            await _forever()
        finally:
            survivor_cancelled.set()

    with caplog.at_level(logging.CRITICAL, logger="twilio_wireless_exporter.service"):
        loops.start({"crasher": crash, "survivor": survivor})
        assert loops.running
        await asyncio.wait_for(survivor_cancelled.wait(), timeout=5)
        await eventually(lambda: not loops.running)
    assert loops.failed
    assert failures == ["called"]
    [record] = caplog.records
    assert record.getMessage() == "the crasher stopped unexpectedly; stopping the exporter"
    assert record.exc_info is not None
    assert "a bug in the loop" in str(record.exc_info[1])
    await loops.stop()  # the crash is not raised again


async def test_a_loop_that_returns_counts_as_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    loops = Loops()
    with caplog.at_level(logging.CRITICAL, logger="twilio_wireless_exporter.service"):
        loops.start({"quitter": _stopped, "other": _forever})
        await eventually(lambda: not loops.running)
    assert loops.failed
    assert [r.getMessage() for r in caplog.records] == [
        "the quitter returned unexpectedly; stopping the exporter"
    ]
    await loops.stop()


async def test_stop_cancels_every_loop_without_calling_it_a_failure() -> None:
    failures: list[str] = []
    loops = Loops(on_failure=lambda: failures.append("called"))
    ended: list[str] = []

    def loop(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            try:
                await _forever()
            finally:
                ended.append(name)

        return run

    loops.start({"a": loop("a"), "b": loop("b")})
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already running"):
        loops.start({"c": loop("c")})
    await loops.stop()
    assert sorted(ended) == ["a", "b"]
    assert not loops.running
    assert not loops.failed
    assert failures == []
    await loops.stop()  # stopping twice is harmless


async def test_a_crashed_poller_fails_the_exporter_and_the_final_save_still_runs(
    sim: RunningSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sid = sim.fleet.add_sim()
    path = tmp_path / "state.db"
    mapping = exporter_mapping(sim.url, [sid], state={"path": str(path)})
    failures: list[str] = []
    exporter = Exporter(
        config_from_mapping(mapping, environ={}),
        clock=ManualClock(),
        on_failure=lambda: failures.append("failed"),
    )
    await exporter.open()
    await exporter.poller.poll_all()  # a baselined SIM, so the final save has something to keep

    async def broken_refresh() -> bool:
        raise RuntimeError("a bug in discovery")

    exporter.poller.refresh_sims = broken_refresh  # type: ignore[method-assign]
    with caplog.at_level(logging.CRITICAL, logger="twilio_wireless_exporter.service"):
        await exporter.start()
        await eventually(lambda: exporter.failed)
        await eventually(lambda: not exporter.running)
    assert failures == ["failed"]
    assert not exporter.is_ready()  # every SIM was polled, but nothing polls them any more
    [record] = caplog.records
    assert record.getMessage() == "the poller stopped unexpectedly; stopping the exporter"
    assert record.exc_info is not None
    assert "a bug in discovery" in repr(record.exc_info[1])
    await exporter.stop()
    assert sid in read_state(path, state_identity(exporter.config)).accounts


async def test_the_command_exits_with_an_error_status_when_a_loop_crashes(
    sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = sim.fleet.add_sim()
    config = config_from_mapping(exporter_mapping(sim.url, [sid]), environ={})

    async def broken_refresh(self: Poller) -> bool:
        raise RuntimeError("a bug in discovery")

    monkeypatch.setattr(Poller, "refresh_sims", broken_refresh)
    args = build_parser().parse_args(["--web.listen-address=127.0.0.1:0"])
    assert await asyncio.wait_for(serve(args, config), timeout=10) == 1
