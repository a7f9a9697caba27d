"""Hostile values in API records: each is rejected for its record alone, counted under
``twilio_wireless_api_records_rejected_total{endpoint,reason}``, logged once per SIM and reason;
the rest of the listing is counted exactly, and ``/metrics`` keeps answering."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.fleet_support import session as plain_session
from tests.fleet_support import ts
from tests.hostile_support import (
    SIM_A,
    SIM_B,
    Running,
    ScriptedApi,
    session,
    sessions_page,
    stamp,
    start_exporter,
)
from tests.metrics_support import find_value, sample_value
from twilio_wireless_exporter.api.records import DataSession
from twilio_wireless_exporter.api.transport import ApiError
from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.formats import Encoding, Escaping, Format
from twilio_wireless_exporter.exposition.reference import ReferenceExposition
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.accounting import ListingOutcome, SimAccount, apply_listing
from twilio_wireless_exporter.fleet.state import FleetState

INT64_MAX = 2**63 - 1
REJECTED = "twilio_wireless_api_records_rejected_total"
STARTED = "twilio_wireless_sim_data_sessions_started_total"
UPLOADED = "twilio_wireless_sim_packets_uploaded_total"
DOWNLOADED = "twilio_wireless_sim_packets_downloaded_total"


def rejected(text: str, reason: str, endpoint: str = "data_sessions") -> float | None:
    return sample_value(text, REJECTED, endpoint=endpoint, reason=reason)


async def baseline_then(run: Running, *later: list[dict[str, object]]) -> list[str]:
    """Baseline SIM_A on one old session, then poll each later listing; the scrapes after each."""
    run.api.sessions[SIM_A] = sessions_page([session(0, day=1, ended=True)])
    await run.poll()
    texts = []
    for listing in later:
        run.api.sessions[SIM_A] = sessions_page(listing)
        await run.poll()
        texts.append(await run.scrape())
    return texts


HOSTILE = [
    ("packets", {"packets_uploaded": 10**309}),
    ("packets", {"packets_uploaded": -1}),
    ("packets", {"packets_downloaded": 2**63}),
    ("packets", {"packets_uploaded": "12"}),
    ("timestamp", {"start": "0001-01-01T00:00:00"}),
    ("timestamp", {"start": "2026-11-20T01:00:00"}),  # no zone
    ("timestamp", {"start": "9999-12-31T00:00:00Z", "last_updated": "9999-12-31T00:00:00Z"}),
    ("timestamp", {"last_updated": "1970-01-01T00:00:00Z"}),
    ("timestamp", {"end": "not a time"}),
    ("duration", {"end": stamp(19)}),  # ends the day before it starts
    ("duration", {"start": "2024-01-01T00:00:00Z"}),  # open for nearly three years, then ends
    ("location", {"cell_location_estimate": {"lat": 91.0, "lon": 0.0}}),
    ("location", {"cell_location_estimate": {"lat": 0.0, "lon": -180.5}}),
    ("location", {"cell_location_estimate": {"lat": 1e308, "lon": 0.0}}),
    ("sid", {"sid": "WN/../../x"}),
    ("sid", {"sim_sid": "not a sim"}),
    ("sid", {"account_sid": "AC1"}),
    ("foreign_sim", {"sim_sid": SIM_B}),
    ("malformed", {"operator_name": "x" * 10_000}),
    ("malformed", {"imei": 12}),
]


@pytest.mark.parametrize(("reason", "fields"), HOSTILE, ids=[repr(f)[:40] for _, f in HOSTILE])
async def test_a_hostile_record_is_rejected_alone(
    reason: str, fields: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    api = ScriptedApi()
    async with start_exporter(api, [SIM_A]) as run:
        bad = session(2, ended="end" in fields or "start" in fields, up=7, down=7, **fields)
        good = session(1, day=21, up=5, down=6)
        [text, again, gone] = await baseline_then(
            run,
            [session(0, day=1, ended=True), good, bad],
            [session(0, day=1, ended=True), good, bad],
            [session(0, day=1, ended=True), good],
        )
        for scrape in (text, again, gone):
            assert find_value(scrape, "twilio_wireless_sim_up", SIM_A) == 1.0
            assert find_value(scrape, STARTED, SIM_A) == 1.0
            assert find_value(scrape, UPLOADED, SIM_A) == 5.0
            assert find_value(scrape, DOWNLOADED, SIM_A) == 6.0
            assert (
                find_value(
                    scrape, "twilio_wireless_sim_last_session_start_timestamp_seconds", SIM_A
                )
                == datetime(2026, 11, 21, 1, tzinfo=UTC).timestamp()
            )
            assert (
                sample_value(scrape, "twilio_wireless_poll_errors_total", kind="internal") is None
            )
        assert rejected(text, reason) == 1.0
        assert rejected(again, reason) == 2.0  # counted on every poll that lists it
        assert rejected(gone, reason) == 2.0
    # logged once per SIM and reason, not on every poll; never a traceback
    lines = [r for r in caplog.records if "rejected a record" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert reason in lines[0].getMessage()
    assert SIM_A in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_310_digit_packet_count_does_not_take_down_metrics() -> None:
    """The issue's case: /metrics answered 500 for the whole fleet, and stayed so."""
    api = ScriptedApi()
    async with start_exporter(api, [SIM_A, SIM_B]) as run:
        api.sessions[SIM_B] = sessions_page([session(5, SIM_B)])
        huge = session(1, up=int("9" * 310))
        [text] = await baseline_then(run, [huge])
        for accept in (
            None,
            "application/openmetrics-text; version=1.0.0",
            "text/plain; version=0.0.4; escaping=values",
        ):
            body = await run.scrape(accept)
            assert f'sim_sid="{SIM_B}"' in body
        assert rejected(text, "packets") == 1.0
        assert find_value(text, STARTED, SIM_A) == 0.0


async def test_packet_counts_fit_the_state_file(tmp_path: object) -> None:
    """-1 and 2**63 no longer reach the state file: it is saved and loads again."""
    api = ScriptedApi()
    path = f"{tmp_path}/state.db"
    async with start_exporter(api, [SIM_A], state={"path": path}) as run:
        await baseline_then(
            run, [session(1, up=-1), session(2, up=2**63), session(3, up=INT64_MAX, down=1)]
        )
        store = run.exporter._store
        assert store is not None
        assert await store.save(run.exporter.state, force=True)
        account = run.exporter.state.sims[SIM_A].account
        assert account.packets_uploaded_total == INT64_MAX
        assert set(account.sessions) == {f"WN{0:032x}", f"WN{3:032x}"}
        loaded = FleetState()
        assert store.load(loaded, lambda sid: True) is not None
        assert loaded.restored[SIM_A].packets_uploaded_total == INT64_MAX


def test_counters_saturate_at_int64_instead_of_overflowing() -> None:
    account = SimAccount()
    apply_listing(account, [])
    for n in range(3):
        apply_listing(account, [plain_session(f"WN{n}", up=INT64_MAX)])
    assert account.packets_uploaded_total == INT64_MAX
    assert account.started_total == 3


def test_a_session_that_cannot_be_applied_is_left_out_whole() -> None:
    """Accounting applies each session whole: a timestamp that cannot be converted (a naive
    year-1 datetime, which only a caller bypassing the records check can hand in) leaves that
    session out, and the SIM's real new session is counted, now and later."""
    account = SimAccount()
    apply_listing(account, [plain_session("WN0", start=0)])
    odd = DataSession(sid="WN9", start=datetime(1, 1, 1), end=datetime(1, 1, 1, 1))
    outcome = apply_listing(account, [plain_session("WN0"), plain_session("WN1", up=5), odd])
    assert (outcome.started, outcome.invalid) == (1, 1)
    assert (account.started_total, account.packets_uploaded_total) == (1, 5)
    apply_listing(account, [plain_session("WN0"), plain_session("WN1", up=7)])
    assert (account.started_total, account.packets_uploaded_total) == (1, 7)
    assert "WN9" not in account.sessions


async def test_a_session_dated_9999_does_not_freeze_the_latest_session() -> None:
    api = ScriptedApi()
    async with start_exporter(api, [SIM_A], metrics={"imei_label": True}) as run:
        odd = session(9, start="9999-12-31T00:00:00Z", imei="111111111111111")
        [text, later] = await baseline_then(
            run,
            [session(0, day=1, ended=True), odd],
            [session(0, day=1, ended=True), odd, session(1, day=25, imei="222222222222222")],
        )
        start = "twilio_wireless_sim_last_session_start_timestamp_seconds"
        assert find_value(text, start, SIM_A) == datetime(2026, 11, 1, 1, tzinfo=UTC).timestamp()
        assert find_value(later, start, SIM_A) == datetime(2026, 11, 25, 1, tzinfo=UTC).timestamp()
        assert find_value(later, "twilio_wireless_sim_session_info", SIM_A, imei="222222222222222")
        assert find_value(later, "twilio_wireless_sim_imei_changes_total", SIM_A) == 1.0


def test_the_latest_session_recovers_once_an_odd_one_leaves() -> None:
    """A far-future latest session taken up earlier (a state file of an older version) holds
    the latest only while it may still be listed: once forgotten, the listing wins again."""
    account = SimAccount()
    future = plain_session("WNodd", start=10**9, imei="1")
    apply_listing(account, [plain_session("WN0", start=0, imei="0"), future])
    assert account.latest_start == ts(10**9).timestamp()
    real = plain_session("WN1", start=100, imei="2")
    for _ in range(3):  # missing from the listing, the odd one is forgotten after 3 listings
        assert account.latest is not None
        assert account.latest.imei == "1"
        apply_listing(account, [plain_session("WN0", start=0, imei="0"), real])
    assert "WNodd" not in account.sessions
    assert account.latest_start == ts(100).timestamp()
    assert account.latest is not None
    assert account.latest.imei == "2"
    # a restored account remembers no odd session at all: the first listing wins at once
    restored = SimAccount(baselined=True, latest_start=ts(10**9).timestamp())
    apply_listing(restored, [real])
    assert restored.latest_start == ts(100).timestamp()


async def test_every_sid_in_a_url_is_escaped() -> None:
    api = ScriptedApi()
    async with start_exporter(api, [SIM_A]) as run:
        await run.exporter.client.list_data_sessions("DE1/../x?y=#", 10)
        with pytest.raises(ApiError, match="matching regex"):  # the answer's sid is no SID
            await run.exporter.client.fetch_sim("DE2/../x?y=#")
    assert "/v1/Sims/DE1%2F..%2Fx%3Fy=%23/DataSessions?PageSize=10" in api.paths
    assert "/v1/Sims/DE2%2F..%2Fx%3Fy=%23" in api.paths


def test_a_page_decodes_good_records_beside_rejected_ones() -> None:
    from twilio_wireless_exporter.api.client import Listing, check_sessions, decode_session_page
    from twilio_wireless_exporter.api.records import RejectReason, Window

    page = decode_session_page(
        sessions_page([session(1), session(2, up=-5), session(3, start="0001-01-01T00:00:00")])
    )
    assert [s.sid for s in page.records] == [f"WN{1:032x}"]
    assert [(r.reason, r.sid) for r in page.rejected] == [
        (RejectReason.PACKETS, f"WN{2:032x}"),
        (RejectReason.TIMESTAMP, f"WN{3:032x}"),
    ]
    listing: Listing[DataSession] = Listing()
    window = Window.around(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    check_sessions(page.records, SIM_A.upper().replace("DE", "DE", 1), window, listing)
    assert len(listing) == 1  # SIDs compare without case


def test_a_sim_that_cannot_be_rendered_is_skipped_and_counted() -> None:
    """The last line of defence: a value no records check let through (set here by hand)
    leaves that one SIM out of /metrics, in every path, and only until its record changes."""
    state = FleetState()
    for sid in (SIM_A, SIM_B):
        record = state.ensure(sid)
        apply_listing(record.account, [])
        state.record_success(sid, apply_listing(record.account, []), 1.0)
    errors: list[None] = []
    sims = SimFamilies(state, on_error=lambda: errors.append(None))
    exposition = Exposition(sims, CollectorRegistry())
    bad = state.sims[SIM_A]
    state.record_success(SIM_A, ListingOutcome(), 2.0)
    bad.account.packets_uploaded_total = 10**400
    for encoding in (Encoding(Format.TEXT), Encoding(Format.TEXT, Escaping.VALUES)):
        text = exposition.text(encoding).decode()
        assert SIM_A not in text
        assert SIM_B in text
    assert len(errors) == 1  # every escaping is rewritten from the one cached render
    reference = ReferenceExposition(sims, CollectorRegistry()).text().decode()
    assert SIM_A not in reference
    assert SIM_B in reference
    assert len(errors) == 2  # the stock path skips and counts it too
    exposition.text()
    assert len(errors) == 2  # the cached (empty) fragment is not rendered again
    bad.account.packets_uploaded_total = 3
    state.record_success(SIM_A, ListingOutcome(), 3.0)
    assert f'sim_sid="{SIM_A}"' in exposition.text().decode()
