"""Property: random listings that mix good records with hostile ones, fed through the client's
decoding and checks, the accounting and the exposition, never break ``/metrics``, never make a
counter go down, and count the good records exactly as if the hostile ones were not listed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

from tests.hostile_support import SIM_A, SIM_B, session, sessions_page, stamp
from tests.metrics_support import parse_samples
from tests.prom_support import require_tool, run
from twilio_wireless_exporter.api.client import (
    ENDPOINT_DATA_SESSIONS,
    Listing,
    check_sessions,
    decode_session_page,
)
from twilio_wireless_exporter.api.records import DataSession, Window
from twilio_wireless_exporter.exposition.collector import build_registry
from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.formats import OPENMETRICS, TEXT
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.accounting import SimAccount, apply_listing
from twilio_wireless_exporter.fleet.state import FleetState

NOW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
WINDOW = Window.around(NOW)

big = st.integers(min_value=2**63, max_value=10**400)
negative = st.integers(max_value=-1)
bad_times = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59Z",
            "2026-11-20T01:00:00",
            "1970-01-01T00:00:00Z",
            "2009-12-31T23:59:59Z",
            "2031-01-01T00:00:00Z",
            "",
        ]
    ),
    st.text(max_size=30),
    st.integers(),
)


def beyond(limit: float) -> st.SearchStrategy[float]:
    """Finite floats with an absolute value over ``limit``."""
    return st.one_of(
        st.floats(min_value=limit, exclude_min=True, allow_infinity=False),
        st.floats(max_value=-limit, exclude_max=True, allow_infinity=False),
    )


#: One hostile change to a good record.
mutations = st.one_of(
    st.fixed_dictionaries({"packets_uploaded": st.one_of(big, negative, st.text(max_size=5))}),
    st.fixed_dictionaries(
        {
            "packets_downloaded": st.one_of(
                big, negative, st.floats(allow_nan=False, allow_infinity=False)
            )
        }
    ),
    st.fixed_dictionaries({"start": bad_times}),
    st.fixed_dictionaries({"end": bad_times}),
    st.fixed_dictionaries({"last_updated": bad_times}),
    st.fixed_dictionaries({"end": st.just(stamp(1))}),  # ends before it starts
    st.fixed_dictionaries(
        {
            "cell_location_estimate": st.fixed_dictionaries(
                {"lat": beyond(90.0), "lon": st.just(0.0)}
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "cell_location_estimate": st.fixed_dictionaries(
                {"lat": st.just(0.0), "lon": beyond(180.0)}
            )
        }
    ),
    st.fixed_dictionaries({"sid": st.text(min_size=1).filter(lambda s: not s.isalnum())}),
    st.fixed_dictionaries({"sim_sid": st.one_of(st.just(SIM_B), st.text(max_size=40))}),
    st.fixed_dictionaries({"operator_name": st.one_of(st.integers(), st.text(min_size=257))}),
)


@dataclass(frozen=True)
class Plan:
    """A session's life: the poll it appears at, its packet growth, when it ends."""

    first: int
    growth: int
    ends_at: int
    day: int
    imei: str


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Per poll: (the good records, the hostile ones)."""
    polls = draw(st.integers(1, 6))
    plans = draw(
        st.lists(
            st.builds(
                Plan,
                st.integers(0, polls - 1),
                st.integers(0, 10**12),
                st.integers(0, 8),
                st.integers(2, 28),
                st.sampled_from(["356938035643809", "490154203237518"]),
            ),
            max_size=5,
        )
    )
    out = []
    for k in range(polls):
        good = [
            session(
                n,
                day=plan.day,
                ended=k >= plan.ends_at,
                up=plan.growth * (k - plan.first + 1),
                down=plan.growth // 3 * (k - plan.first + 1),
                imei=plan.imei,
            )
            for n, plan in enumerate(plans)
            if plan.first <= k and draw(st.booleans() | st.just(True))
        ]
        bad = []
        for change in draw(st.lists(mutations, max_size=3)):
            n = draw(st.integers(0, 7))
            bad.append({**session(n, day=5, up=1, down=1), **change})
        out.append((good, bad))
    return out


def as_json(records: list[dict[str, Any]]) -> bytes:
    """Like the wire: big integers written out, floats as JSON numbers."""
    return sessions_page(records)


def decode(body: bytes) -> Listing[DataSession]:
    page = decode_session_page(body)
    listing: Listing[DataSession] = Listing(rejected=page.rejected)
    check_sessions(page.records, SIM_A, WINDOW, listing)
    return listing


COUNTERS = (
    "twilio_wireless_sim_data_sessions_started_total",
    "twilio_wireless_sim_data_sessions_ended_total",
    "twilio_wireless_sim_packets_uploaded_total",
    "twilio_wireless_sim_packets_downloaded_total",
    "twilio_wireless_sim_imei_changes_total",
    "twilio_wireless_api_records_rejected_total",
)


def counters_of(account: SimAccount) -> tuple[int, ...]:
    return (
        account.started_total,
        account.ended_total,
        account.packets_uploaded_total,
        account.packets_downloaded_total,
        account.imei_changes_total,
        account.open_sessions,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_hostile_records_change_nothing_but_themselves(
    history: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]],
) -> None:
    state = FleetState()
    record = state.ensure(SIM_A)
    registry, metrics = build_registry(state, poll_interval=60.0)
    exposition = Exposition(SimFamilies(state, on_error=metrics.exposition_error), registry)
    alone = SimAccount()  # the same listings without the hostile records
    previous: dict[Any, float] = {}
    hostile_total = 0
    for t, (good, bad) in enumerate(history):
        listing = decode(as_json(good + bad))
        hostile_total += len(bad)
        assert len(listing) == len(good)
        assert len(listing.rejected) == len(bad)
        keep = {r.sid for r in listing.rejected if r.sid}
        outcome = apply_listing(record.account, listing, keep=keep)
        for rejection in listing.rejected:
            metrics.record_rejected(ENDPOINT_DATA_SESSIONS, rejection.reason)
        state.record_success(SIM_A, outcome, NOW + t)
        apply_listing(alone, decode(as_json(good)), keep=keep)
        assert counters_of(record.account) == counters_of(alone)
        assert record.account.latest == alone.latest
        assert record.account.latest_start == alone.latest_start

        text = exposition.text(TEXT).decode()
        samples = parse_samples(text)  # prometheus_client's parser: a valid exposition
        list(om_parse(exposition.text(OPENMETRICS).decode()))  # type: ignore[no-untyped-call]
        for key, value in samples.items():
            if key[0] in COUNTERS:
                assert value >= previous.get(key, 0.0), key
        previous = samples
        assert ("twilio_wireless_exposition_errors_total", ()) in samples
        assert samples[("twilio_wireless_exposition_errors_total", ())] == 0.0
    rejected = sum(v for (name, _), v in previous.items() if name == COUNTERS[-1])
    assert rejected == hostile_total


@pytest.mark.e2e
def test_promtool_accepts_the_exposition_of_hostile_listings() -> None:
    promtool = require_tool("promtool")
    listings = [
        [session(0)],
        [session(0, up=50), session(1, up=10**400), session(2, start="0001-01-01T00:00:00")],
        [session(0, up=60, ended=True), session(3, sim_sid=SIM_B), session(4, day=25)],
    ]
    state = FleetState()
    record = state.ensure(SIM_A)
    registry, metrics = build_registry(state, poll_interval=60.0)
    exposition = Exposition(SimFamilies(state, on_error=metrics.exposition_error), registry)
    for t, records in enumerate(listings):
        listing = decode(json.dumps({"data_sessions": records, "meta": {}}).encode())
        for rejection in listing.rejected:
            metrics.record_rejected(ENDPOINT_DATA_SESSIONS, rejection.reason)
        state.record_success(SIM_A, apply_listing(record.account, listing), NOW + t)
        code, output = run([promtool, "check", "metrics"], stdin=exposition.text().decode())
        assert code == 0, output
        assert output.strip() == ""
