"""The session-accounting core: table tests and a property test against a reference model."""

from __future__ import annotations

from hypothesis import given, settings

from tests.fleet_support import T0, Model, histories, session
from twilio_wireless_exporter.api.records import CellLocation, DataSession
from twilio_wireless_exporter.fleet.accounting import SimAccount, apply_listing, deduplicate


def test_first_listing_is_the_baseline() -> None:
    acct = SimAccount()
    out = apply_listing(acct, [session("WN1", up=10, down=20), session("WN2", end=50, up=5)])
    assert (out.started, out.ended, out.packets_uploaded, out.packets_downloaded) == (0, 0, 0, 0)
    assert (acct.started_total, acct.ended_total) == (0, 0)
    assert acct.open_sessions == 1
    assert acct.baselined


def test_new_open_session_counts_started_with_all_its_packets() -> None:
    acct = SimAccount()
    apply_listing(acct, [session("WN1", up=10, down=20)])
    out = apply_listing(acct, [session("WN1", up=15, down=21), session("WN2", start=60, up=7)])
    assert out.started == 1
    assert out.ended == 0
    assert acct.packets_uploaded_total == 5 + 7
    assert acct.packets_downloaded_total == 1
    assert acct.open_sessions == 2


def test_session_that_starts_and_ends_between_polls_counts_once_each() -> None:
    acct = SimAccount()
    apply_listing(acct, [])
    out = apply_listing(acct, [session("WN9", start=100, end=400, up=3, down=4)])
    assert (out.started, out.ended) == (1, 1)
    assert out.durations == [("LTE", 300.0)]
    again = apply_listing(acct, [session("WN9", start=100, end=400, up=3, down=4)])
    assert (again.started, again.ended, again.durations) == (0, 0, [])
    assert (acct.started_total, acct.ended_total) == (1, 1)
    assert acct.open_sessions == 0


def test_baseline_session_that_ends_later_counts_as_ended() -> None:
    acct = SimAccount()
    apply_listing(acct, [session("WN1", start=0)])
    out = apply_listing(acct, [session("WN1", start=0, end=7200)])
    assert (out.started, out.ended) == (0, 1)
    assert out.durations == [("LTE", 7200.0)]


def test_duplicates_across_pages_keep_the_most_advanced_copy() -> None:
    acct = SimAccount()
    apply_listing(acct, [])
    listing = [
        session("WN1", up=5, updated=10),
        session("WN1", up=9, updated=20),
        session("WN1", up=7, updated=15),
    ]
    out = apply_listing(acct, listing)
    assert out.started == 1
    assert acct.packets_uploaded_total == 9
    by_sid, without_sid = deduplicate([*listing, session("WN1", end=30, up=1, updated=5)])
    assert by_sid["WN1"].end is not None  # an ended copy beats an open one
    assert without_sid == 0


def test_packets_never_go_backwards_and_nulls_are_unknown() -> None:
    acct = SimAccount()
    apply_listing(acct, [session("WN1", up=100, down=100)])
    apply_listing(acct, [session("WN1", up=90, down=None)])
    assert (acct.packets_uploaded_total, acct.packets_downloaded_total) == (0, 0)
    apply_listing(acct, [session("WN1", up=120, down=130)])
    assert (acct.packets_uploaded_total, acct.packets_downloaded_total) == (20, 30)


def test_packets_survive_age_out_and_sids_are_forgotten_after_absence() -> None:
    acct = SimAccount()
    apply_listing(acct, [session("WN1", up=10)])
    apply_listing(acct, [session("WN1", up=50, end=100)])
    assert acct.packets_uploaded_total == 40
    for _ in range(2):
        out = apply_listing(acct, [])
        assert out.forgotten == 0
    out = apply_listing(acct, [])
    assert out.forgotten == 1
    assert acct.sessions == {}
    assert acct.packets_uploaded_total == 40
    assert acct.ended_total == 1


def test_a_session_missing_from_one_listing_is_not_counted_twice() -> None:
    acct = SimAccount()
    apply_listing(acct, [])
    apply_listing(acct, [session("WN1", up=5)])
    apply_listing(acct, [])  # a page boundary shifted and the session slipped through
    apply_listing(acct, [session("WN1", up=6)])
    assert acct.started_total == 1
    assert acct.packets_uploaded_total == 6


def test_sessions_without_sid_are_skipped() -> None:
    acct = SimAccount()
    apply_listing(acct, [])
    out = apply_listing(acct, [DataSession(), session("WN1")])
    assert out.skipped_without_sid == 1
    assert out.started == 1


def test_latest_session_attributes_location_and_timestamps() -> None:
    acct = SimAccount()
    located = CellLocation(lat=52.5, lon=13.4)
    apply_listing(
        acct,
        [
            session("WN1", start=0, end=10, loc=located, updated=10, radio="3G"),
            session("WN2", start=100, loc=CellLocation(), updated=150, radio="LTE-M"),
        ],
    )
    assert acct.latest is not None
    assert acct.latest.radio_link == "LTE-M"
    assert acct.latest_start == T0 + 100
    assert acct.last_updated == T0 + 150
    # the newest session has an empty estimate: the last known location stays
    assert acct.location == (52.5, 13.4)


def test_null_fields_map_to_empty_attributes() -> None:
    acct = SimAccount()
    apply_listing(acct, [session("WN1", radio=None, operator=None)])
    assert acct.latest is not None
    assert (acct.latest.radio_link, acct.latest.operator_name) == ("", "")
    acct2 = SimAccount()
    apply_listing(acct2, [session("WN1", start=None)])
    assert acct2.latest is None
    assert acct2.latest_start is None


def test_imei_changes_count_device_swaps_only() -> None:
    acct = SimAccount()
    apply_listing(acct, [session("WN1", start=0, imei="490154203237518")])
    apply_listing(acct, [session("WN1", start=0, imei="490154203237518")])
    assert acct.imei_changes_total == 0
    apply_listing(acct, [session("WN2", start=50, imei=None)])  # unknown IMEI is no change
    assert acct.imei_changes_total == 0
    out = apply_listing(acct, [session("WN3", start=100, imei="356938035643809")])
    assert out.imei_changed
    assert acct.imei_changes_total == 1


def test_attributes_are_one_shared_copy_across_sims_and_the_imei_is_kept_once() -> None:
    """Each decoded page brings its own copies of the strings; a SIM keeps its latest session's
    attributes for good, so equal values must be one object across SIMs (memory per SIM)."""

    def fresh(text: str) -> str:
        return "".join(list(text))  # an equal string that is another object, as a decode makes

    first, second = SimAccount(), SimAccount()
    apply_listing(first, [session("WN1", radio=fresh("LTE-M"), operator=fresh("Vodafone"))])
    apply_listing(second, [session("WN2", radio=fresh("LTE-M"), operator=fresh("Vodafone"))])
    assert first.latest is not None
    assert second.latest is not None
    assert first.latest.radio_link is second.latest.radio_link
    assert first.latest.operator_name is second.latest.operator_name
    apply_listing(first, [session("WN1", imei=fresh("490154203237518"))])
    kept = first.last_imei
    apply_listing(first, [session("WN1", imei=fresh("490154203237518"))])
    assert first.last_imei is kept
    assert first.latest is not None
    assert first.latest.imei is kept
    assert first.imei_changes_total == 0


# --------------------------------------------------------------------------- property test


@settings(max_examples=300, deadline=None)
@given(histories())
def test_counters_match_reference_model(case: tuple[list[list[DataSession]], Model]) -> None:
    listings, model = case
    acct = SimAccount()
    previous = (0, 0, 0)
    for listing in listings:
        apply_listing(acct, listing, forget_after=len(listings) + 1)
        now = (acct.started_total, acct.ended_total, acct.packets_uploaded_total)
        assert all(b >= a for a, b in zip(previous, now, strict=True)), "a counter went down"
        previous = now
    assert acct.started_total == model.started
    assert acct.ended_total == model.ended
    assert acct.packets_uploaded_total == model.up
