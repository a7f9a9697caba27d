"""The usage ledger (fleet/usage.py): baseline, late revisions, no double counting, periods."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fleet_support import usage
from twilio_wireless_exporter.api.records import INT64_MAX
from twilio_wireless_exporter.api.usage import Usage
from twilio_wireless_exporter.fleet.usage import (
    DAY,
    UsageLedger,
    apply_usage,
    counting_start,
    period_start,
    period_usage,
    window_start,
)

D0 = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())


def day(n: int, up: int = 0, down: int = 0, cmd_from: int = 0, cmd_to: int = 0) -> Usage:
    return usage(
        D0 + n * DAY,
        upload=up,
        download=down,
        total=up + down,
        commands_from_sim=cmd_from,
        commands_to_sim=cmd_to,
    )


def totals(ledger: UsageLedger) -> tuple[int, int, int, int]:
    return (
        ledger.upload_total,
        ledger.download_total,
        ledger.commands_from_sim_total,
        ledger.commands_to_sim_total,
    )


def test_every_ledger_shares_one_object_per_bucket_start_and_floor() -> None:
    """Each read decodes its own numbers; thousands of ledgers keep the same few days, so the
    keys and floors they keep must be one object each (memory per SIM)."""
    first, second = UsageLedger(), UsageLedger()
    start = D0 + 10**6 * DAY  # beyond any int CPython keeps as one object anyway
    apply_usage(first, [day(10**6, 5)], int(str(start)))
    apply_usage(second, [day(10**6, 7)], int(str(start)))
    (key_a,) = first.buckets
    (key_b,) = second.buckets
    assert key_a == key_b == start
    assert key_a is key_b
    assert first.floor is second.floor
    assert first.floor is key_a


def test_the_first_read_is_the_baseline() -> None:
    ledger = UsageLedger()
    outcome = apply_usage(ledger, [day(0, 100, 200, 1, 2), day(1, 5, 6)], D0)
    assert ledger.baselined
    assert totals(ledger) == (0, 0, 0, 0)
    assert outcome.new_buckets == 2
    assert sorted(ledger.buckets) == [D0, D0 + DAY]


def test_growth_of_a_known_day_counts_by_how_much_it_grew() -> None:
    ledger = UsageLedger()
    apply_usage(ledger, [day(0, 100, 200, 1, 2)], D0)
    apply_usage(ledger, [day(0, 150, 260, 1, 5)], D0)
    assert totals(ledger) == (50, 60, 0, 3)
    apply_usage(ledger, [day(0, 150, 260, 1, 5)], D0)  # the same again: nothing
    assert totals(ledger) == (50, 60, 0, 3)


def test_a_day_first_seen_after_the_baseline_counts_whole() -> None:
    ledger = UsageLedger()
    apply_usage(ledger, [day(0, 100, 200)], D0)
    apply_usage(ledger, [day(0, 100, 200), day(1, 7, 9, 1, 1)], D0)
    assert totals(ledger) == (7, 9, 1, 1)


def test_a_day_reported_lower_counts_nothing_and_only_the_excess_later() -> None:
    ledger = UsageLedger()
    apply_usage(ledger, [day(0, 100, 200)], D0)
    apply_usage(ledger, [day(0, 40, 50)], D0)  # a glitch (or coarser units)
    assert totals(ledger) == (0, 0, 0, 0)
    apply_usage(ledger, [day(0, 120, 190)], D0)
    assert totals(ledger) == (20, 0, 0, 0)


def test_a_day_missing_from_a_read_is_not_forgotten_inside_the_window() -> None:
    ledger = UsageLedger()
    apply_usage(ledger, [day(0, 100), day(1, 10)], D0)
    apply_usage(ledger, [day(1, 10)], D0)  # day 0 left out (rejected, say)
    apply_usage(ledger, [day(0, 100), day(1, 10)], D0)  # back: not counted again
    assert totals(ledger) == (0, 0, 0, 0)


def test_days_before_the_window_are_forgotten_and_never_counted_again() -> None:
    ledger = UsageLedger()
    apply_usage(ledger, [day(0, 100), day(1, 10)], D0)
    apply_usage(ledger, [day(1, 10), day(2, 5)], D0 + DAY)
    assert sorted(ledger.buckets) == [D0 + DAY, D0 + 2 * DAY]
    assert ledger.floor == D0 + DAY
    # The window moves back (a changed period_start_day): the forgotten day is ignored.
    outcome = apply_usage(ledger, [day(0, 100), day(1, 10), day(2, 5)], D0)
    assert outcome.ignored == 1
    assert totals(ledger) == (5, 0, 0, 0)
    assert ledger.floor == D0 + DAY


def test_repeated_records_of_one_day_count_once_at_their_largest() -> None:
    ledger = UsageLedger()
    apply_usage(ledger, [], D0)
    apply_usage(ledger, [day(3, 10, 1), day(3, 30, 2), day(3, 20, 3)], D0)
    assert totals(ledger) == (30, 3, 0, 0)


def test_counters_saturate_at_int64() -> None:
    ledger = UsageLedger(baselined=True, floor=D0, upload_total=INT64_MAX - 5)
    apply_usage(ledger, [day(0, 100)], D0)
    assert ledger.upload_total == INT64_MAX


def test_period_usage_sums_the_days_of_the_period() -> None:
    records = [day(0, 1, 2), day(14, 10, 20), day(15, 100, 200)]
    period = period_usage(records, D0 + 14 * DAY)
    assert (period.upload, period.download, period.total) == (110, 220, 330)
    assert period.start == D0 + 14 * DAY
    assert period.home is None


def test_period_usage_sums_networks_and_billing_where_given() -> None:
    a = usage(D0, total=10, home=7, international_roaming=3, billed=0.5)
    b = usage(D0 + DAY, total=4, home=4, billed=0.25, billing_units="USD")
    period = period_usage([a, b], D0)
    assert (period.home, period.national_roaming, period.international_roaming) == (11, None, 3)
    assert period.billed == 0.75
    assert period.billing_units == "USD"


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def test_period_start_is_the_latest_configured_day_not_after_now() -> None:
    assert period_start(ts(2026, 12, 1, 0, 0), 1) == ts(2026, 12, 1)
    assert period_start(ts(2026, 12, 1, 13, 5), 15) == ts(2026, 11, 15)
    assert period_start(ts(2026, 12, 20), 15) == ts(2026, 12, 15)
    assert period_start(ts(2026, 1, 3), 28) == ts(2025, 12, 28)
    assert period_start(ts(2026, 3, 1), 28) == ts(2026, 2, 28)


def test_the_window_reaches_back_over_the_days_still_revised() -> None:
    now = ts(2026, 12, 1, 10)
    assert window_start(now, ts(2026, 12, 1), 2) == ts(2026, 11, 29)
    assert window_start(now, ts(2026, 11, 15), 2) == ts(2026, 11, 15)
    assert window_start(now, ts(2026, 12, 1), 0) == ts(2026, 12, 1)
    assert counting_start(now, 2) == ts(2026, 11, 29)
    assert counting_start(now, 0) == ts(2026, 12, 1)


# The API's model: each day's value only grows over time (revisions), and each read shows some
# of the days of the window. Whatever the order, the ledger counts exactly the growth after the
# baseline: final value minus the value at the baseline read (0 for a day not in it).
reads_strategy = st.lists(
    st.dictionaries(st.integers(0, 6), st.integers(0, 10**6), max_size=7), min_size=1, max_size=12
)


@settings(max_examples=300, deadline=None)
@given(reads=reads_strategy)
def test_exactly_the_growth_after_the_baseline_is_counted(reads: list[dict[int, int]]) -> None:
    ledger = UsageLedger()
    truth: dict[int, int] = {}  # the API's current value of each day (only grows)
    baseline: dict[int, int] = {}
    previous_total = 0
    for index, read in enumerate(reads):
        for n, grow in read.items():
            truth[n] = truth.get(n, 0) + grow
        shown = {n: truth[n] for n in read}
        apply_usage(ledger, [day(n, v) for n, v in shown.items()], D0)
        if index == 0:
            baseline = dict(shown)
        assert ledger.upload_total >= previous_total
        previous_total = ledger.upload_total
    # values only grow, so each day's current value is the largest ever shown
    expected = sum(value - baseline.get(n, 0) for n, value in truth.items())
    assert ledger.upload_total == expected


@settings(max_examples=300, deadline=None)
@given(
    reads=st.lists(
        st.tuples(
            st.integers(0, 10),  # window start (days after D0)
            st.lists(st.tuples(st.integers(0, 12), st.integers(0, 10**9)), max_size=10),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_no_counter_ever_goes_down_whatever_the_api_says(
    reads: list[tuple[int, list[tuple[int, int]]]],
) -> None:
    ledger = UsageLedger()
    before = totals(ledger)
    for start, records in reads:
        apply_usage(ledger, [day(n, v, v, v, v) for n, v in records], D0 + start * DAY)
        after = totals(ledger)
        assert all(b <= a <= INT64_MAX for b, a in zip(before, after, strict=True))
        assert all(key >= ledger.floor for key in ledger.buckets)
        before = after
