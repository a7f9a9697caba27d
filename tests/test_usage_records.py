"""Usage records as they enter: both OpenAPI shapes decode, every unit is honoured, every bad
value rejects its record alone (counted under ``twilio_wireless_api_records_rejected_total
{endpoint,reason}``, the rest of the page used), and normalisation never raises.

Every good body here validates against Twilio's OpenAPI description and KORE's typed one
(``tests/openapi/``); the API client under test talks to a real server on port 0.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from tests.hostile_support import (
    SIM_A,
    SIM_B,
    ScriptedApi,
    counts,
    stamp,
    start_client,
    usage_page,
    usage_record,
)
from tests.metrics_support import sample_value
from tests.simulator_support import kore_response_schema, openapi, response_schema, validate
from twilio_wireless_exporter.api.client import (
    ENDPOINT_ACCOUNT_USAGE,
    ENDPOINT_USAGE_RECORDS,
    Listing,
    check_usage,
    decode_usage_page,
)
from twilio_wireless_exporter.api.records import (
    INT64_MAX,
    DataUsage,
    Rejection,
    RejectReason,
    TimePeriod,
    UsageRecord,
    Window,
)
from twilio_wireless_exporter.api.usage import Usage, mb_to_bytes, normalise
from twilio_wireless_exporter.exposition.collector import ApiMetrics

REJECTED = "twilio_wireless_api_records_rejected_total"
SIM_PATH = "/v1/Sims/{SimSid}/UsageRecords"
KORE_SIM_PATH = "/v1/Sims/{Sid}/UsageRecords"
ACCOUNT_PATH = "/v1/UsageRecords"
START = datetime(2026, 11, 1, tzinfo=UTC)
NOW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
WINDOW = Window.around(NOW)
MIB = 1024 * 1024


def unix(day: int, hour: int = 0) -> float:
    return datetime(2026, 11, day, hour, tzinfo=UTC).timestamp()


def validate_records(records: list[dict[str, Any]], *, sim: bool = True) -> None:
    """Each record against the record schema of Twilio's and of KORE's description."""
    twilio = response_schema(SIM_PATH if sim else ACCOUNT_PATH)
    kore = kore_response_schema(KORE_SIM_PATH if sim else ACCOUNT_PATH)
    for record in records:
        validate(twilio["properties"]["usage_records"]["items"], record)
        validate(kore["properties"]["usage_records"]["items"], record)


def at_home(day: int, up: int, down: int, **fields: Any) -> Usage:
    """The Usage of a :func:`usage_record` of ``day`` with all data at home, in bytes."""
    values: dict[str, Any] = {
        "start": unix(day),
        "end": unix(day + 1),
        "upload": up,
        "download": down,
        "total": up + down,
        "home": up + down,
        "national_roaming": 0,
        "international_roaming": 0,
        "billed": 0.25,
        "billing_units": "USD",
        "commands_from_sim": 1,
        "commands_to_sim": 2,
    }
    values.update(fields)
    return Usage(**values)


# ------------------------------------------------------------------------------------------
# Both OpenAPI shapes
# ------------------------------------------------------------------------------------------


def _example(path: str) -> dict[str, Any]:
    media = openapi()["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
    body: dict[str, Any] = copy.deepcopy(media["examples"]["fetch"]["value"])
    return body


EXAMPLE_USAGE = Usage(
    start=datetime(2015, 7, 30, 20, tzinfo=UTC).timestamp(),
    end=datetime(2015, 7, 30, 20, tzinfo=UTC).timestamp(),
    upload=731560,
    download=2763049,
    total=3494609,
    home=3494609,
    national_roaming=0,
    international_roaming=0,
    billed=0.35,
    billing_units="USD",
    commands_from_sim=1,
    commands_to_sim=2,
)


@pytest.mark.parametrize(("path", "endpoint"), [(SIM_PATH, "sim"), (ACCOUNT_PATH, "account")])
async def test_twilios_examples_decode_and_their_empty_period_is_rejected(
    path: str, endpoint: str
) -> None:
    """Twilio's own examples: a full record, and one of ``{}`` objects (no period: rejected)."""
    body = _example(path)
    validate(response_schema(path), body)
    sim = "DE" + "a" * 32
    api = ScriptedApi(
        usage={sim: json.dumps(body).encode()}, account_usage=json.dumps(body).encode()
    )
    async with start_client(api) as run:
        if endpoint == "sim":
            listing = await run.client.list_sim_usage(sim, START)
        else:
            listing = await run.client.list_account_usage(START)
    assert list(listing) == [EXAMPLE_USAGE]
    assert [r.reason for r in listing.rejected] == [RejectReason.TIMESTAMP]


def test_a_kore_typed_page_with_every_network_decodes() -> None:
    """KORE's typed shape: kilobytes at the top, each network in its own unit."""
    record = usage_record(
        up=100,
        down=300,
        units="kilobytes",
        home=counts(50, 150, "kilobytes"),
        national_roaming=counts(1, 0, "megabytes"),
        international_roaming=[
            counts(10, 20, "bytes", country_code="FR"),
            counts(3, 4, "kilobytes", country_code="CH"),
        ],
    )
    body = {
        "usage_records": [record],
        "meta": {"list_key": "usage_records", "page_size": 1000, "direct_token": True},
    }
    validate(kore_response_schema(KORE_SIM_PATH), body)
    validate(response_schema(SIM_PATH), body)
    page = decode_usage_page(json.dumps(body).encode())
    listing: Listing[Usage] = Listing()
    check_usage(page.records, SIM_A, WINDOW, listing)
    assert listing.rejected == []
    assert list(listing) == [
        at_home(
            20,
            100 * 1024,
            300 * 1024,
            home=200 * 1024,
            national_roaming=MIB,
            international_roaming=30 + 7 * 1024,
        )
    ]


def test_the_test_records_are_valid_for_both_descriptions() -> None:
    """The builders' records are good for both servers (so a rejection below is the bad value)."""
    validate_records([usage_record(), usage_record(units="megabytes")])
    validate_records([usage_record(sim=None)], sim=False)


# ------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("units", "factor"),
    [
        ("bytes", 1),
        ("kilobytes", 1024),
        ("megabytes", MIB),
        ("Bytes", 1),
        ("KILOBYTES", 1024),
        ("MegaBytes", MIB),
        (None, 1),
        ("absent", 1),
    ],
)
def test_every_unit_is_converted_to_bytes(units: str | None, factor: int) -> None:
    record = usage_record(up=7, down=11, units=units)
    if units == "absent":
        for part in (record["data"], record["data"]["home"], record["data"]["national_roaming"]):
            del part["units"]
    elif units is not None:  # (KORE's schema has no null units; Twilio's has no schema here)
        validate_records([record])
    page = decode_usage_page(usage_page([record]))
    assert page.rejected == []
    assert normalise(page.records[0], WINDOW) == at_home(20, 7 * factor, 11 * factor)


def test_nested_units_are_each_honoured_and_absent_ones_mean_bytes() -> None:
    record = usage_record(
        up=1,
        down=1,
        units="megabytes",
        home={"total": 5},  # no units: bytes, whatever the top level says
        national_roaming=counts(2, 3, "kilobytes"),
        international_roaming=[{"upload": 1, "download": 2, "units": "megabytes"}, {}],
    )
    [usage] = decode_usage_page(usage_page([record])).records
    assert normalise(usage, WINDOW) == at_home(
        20, MIB, MIB, home=5, national_roaming=5 * 1024, international_roaming=3 * MIB
    )


def test_absent_counts_are_zero_and_absent_networks_none() -> None:
    record = {"period": {"start": stamp(3), "end": stamp(4)}, "data": {}, "commands": None}
    [decoded] = decode_usage_page(usage_page([record])).records
    assert normalise(decoded, WINDOW) == Usage(
        start=unix(3),
        end=unix(4),
        upload=0,
        download=0,
        total=0,
        home=None,
        national_roaming=None,
        international_roaming=None,
        billed=None,
        billing_units="",
        commands_from_sim=0,
        commands_to_sim=0,
    )
    totalled = usage_record(up=5, down=6, total=None)
    [decoded] = decode_usage_page(usage_page([totalled])).records
    assert normalise(decoded, WINDOW) == at_home(20, 5, 6)  # total: upload + download


def test_a_reported_total_is_taken_as_it_is() -> None:
    [decoded] = decode_usage_page(usage_page([usage_record(up=5, down=6, total=20)])).records
    assert normalise(decoded, WINDOW) == at_home(20, 5, 6, total=20)


def test_plan_limits_in_megabytes_are_binary() -> None:
    assert mb_to_bytes(1) == 1_048_576
    assert mb_to_bytes(1000) == 1_048_576_000
    assert mb_to_bytes(INT64_MAX // MIB) <= INT64_MAX


# ------------------------------------------------------------------------------------------
# Bad values: each rejects its record alone
# ------------------------------------------------------------------------------------------

Mutate = Callable[[dict[str, Any]], None]


def data(**fields: Any) -> Mutate:
    return lambda record: record["data"].update(fields)


def period(**fields: Any) -> Mutate:
    return lambda record: record["period"].update(fields)


def home(**fields: Any) -> Mutate:
    return lambda record: record["data"]["home"].update(fields)


def top(**fields: Any) -> Mutate:
    return lambda record: record.update(fields)


def drop_period(record: dict[str, Any]) -> None:
    del record["period"]


HOSTILE: list[tuple[str, str, Mutate]] = [
    ("units", "unknown unit", data(units="gigabytes")),
    ("units", "unknown unit in home", home(units="bits")),
    ("units", "unknown unit abroad", data(international_roaming=[counts(1, 1, "octets")])),
    ("units", "units not a string", data(units=1024)),
    ("units", "an empty unit", data(units="")),
    ("usage", "negative upload", data(upload=-1)),
    ("usage", "upload a string", data(upload="12")),
    ("usage", "upload a fraction", data(upload=1.5)),
    ("usage", "download beyond int64", data(download=2**63)),
    ("usage", "download beyond any float", data(download=10**400)),
    ("usage", "megabytes beyond int64", data(units="megabytes", upload=INT64_MAX // MIB + 1)),
    ("usage", "upload + download beyond int64", data(upload=INT64_MAX, download=1, total=None)),
    ("usage", "home total beyond int64", home(units="kilobytes", total=INT64_MAX // 1024 + 1)),
    (
        "usage",
        "international sum beyond int64",
        data(international_roaming=[counts(INT64_MAX, 0), counts(1, 0)]),
    ),
    ("usage", "negative total", data(total=-5)),
    ("usage", "negative billed", data(billed=-0.5)),
    ("usage", "billed not a number", data(billed="cheap")),
    ("usage", "negative commands", lambda r: r["commands"].update(from_sim=-1)),
    ("usage", "commands a float", lambda r: r["commands"].update(to_sim=2.5)),
    ("timestamp", "no period", drop_period),
    ("timestamp", "empty period", top(period={})),
    ("timestamp", "null period", top(period=None)),
    ("timestamp", "period a string", top(period="2026-11-20")),
    ("timestamp", "no end", lambda r: r["period"].pop("end")),
    ("timestamp", "start without a zone", period(start="2026-11-20T00:00:00")),
    ("timestamp", "a date only", period(start="2026-11-20")),
    ("timestamp", "not a time", period(end="yesterday")),
    ("timestamp", "ends before it starts", period(end=stamp(10, 23))),
    ("timestamp", "before 2010", period(start="2001-01-01T00:00:00Z")),
    ("timestamp", "far future", period(end="2999-01-01T00:00:00Z")),
    ("sid", "sim_sid not a SIM", top(sim_sid="not a sim")),
    ("foreign_sim", "another SIM's record", top(sim_sid=SIM_B)),
    ("malformed", "data not an object", top(data=[1, 2])),
    ("malformed", "home not an object", top(data={"home": 5})),
    ("malformed", "billing_units too long", data(billing_units="x" * 10_000)),
    ("malformed", "international not a list", data(international_roaming={"a": 1})),
]


def _page_with(mutate: Mutate) -> bytes:
    bad = usage_record(11, up=5, down=5)
    mutate(bad)
    return usage_page([usage_record(10, up=1, down=2), bad, usage_record(12, up=3, down=4)])


@pytest.mark.parametrize(("reason", "what", "mutate"), HOSTILE, ids=[h[1] for h in HOSTILE])
async def test_a_bad_value_rejects_its_record_alone(reason: str, what: str, mutate: Mutate) -> None:
    api = ScriptedApi(usage={SIM_A: _page_with(mutate)})
    async with start_client(api) as run:
        listing = await run.client.list_sim_usage(SIM_A, START)
        for rejection in listing.rejected:  # as the usage poller counts them
            run.metrics.record_rejected(ENDPOINT_USAGE_RECORDS, rejection.reason)
        text = run.scrape()
    assert list(listing) == [at_home(10, 1, 2), at_home(12, 3, 4)]
    assert [r.reason.value for r in listing.rejected] == [reason]
    assert listing.rejected[0].detail
    assert sample_value(text, REJECTED, endpoint="usage_records", reason=reason) == 1.0
    others = {r.value for r in RejectReason} - {reason}
    assert all(
        sample_value(text, REJECTED, endpoint="usage_records", reason=o) is None for o in others
    )
    requests = "twilio_wireless_api_requests_total"
    assert sample_value(text, requests, endpoint="usage_records", code="200") == 1.0


async def test_bad_account_records_are_rejected_alone_too() -> None:
    bad = usage_record(11, sim=None, units="terabytes")
    body = usage_page([usage_record(10, sim=None, up=1, down=2), bad])
    async with start_client(ScriptedApi(account_usage=body)) as run:
        listing = await run.client.list_account_usage(START)
    assert list(listing) == [at_home(10, 1, 2)]
    assert [r.reason for r in listing.rejected] == [RejectReason.UNITS]


def test_an_account_record_naming_a_sim_is_not_foreign() -> None:
    """The account listing has no SIM to compare with: a ``sim_sid`` there is not read."""
    page = decode_usage_page(usage_page([usage_record(sim=SIM_B)]))
    listing: Listing[Usage] = Listing()
    check_usage(page.records, None, WINDOW, listing)
    assert len(listing) == 1
    assert listing.rejected == []


def test_a_sim_sid_in_the_other_case_is_the_same_sim() -> None:
    page = decode_usage_page(usage_page([usage_record(sim=SIM_A.upper())]))
    listing: Listing[Usage] = Listing()
    check_usage(page.records, SIM_A, WINDOW, listing)
    assert listing.rejected == []


def test_the_rejected_reasons_are_label_values_of_the_family() -> None:
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    metrics.record_rejected(ENDPOINT_ACCOUNT_USAGE, RejectReason.UNITS)
    metrics.record_rejected(ENDPOINT_ACCOUNT_USAGE, RejectReason.USAGE)
    text = generate_latest(registry).decode()
    for reason in ("units", "usage"):
        assert sample_value(text, REJECTED, endpoint="account_usage_records", reason=reason) == 1


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------

FIELD_NAMES = [
    "period",
    "start",
    "end",
    "data",
    "commands",
    "sim_sid",
    "upload",
    "download",
    "total",
    "units",
    "billed",
    "billing_units",
    "home",
    "national_roaming",
    "international_roaming",
    "from_sim",
    "to_sim",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["bytes", "KiloBytes", "megabytes", "gigabytes", stamp(3), stamp(2), ""])
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=20,
)
timestamps = st.sampled_from(
    [stamp(1), stamp(2, 5), stamp(30), "2015-07-30T20:00:00Z", "2026-11-02T00:00:00+02:00"]
)
count_values = (
    st.none() | st.integers(min_value=0, max_value=2**64) | st.integers(min_value=-3, max_value=3)
)
units_values = st.sampled_from([None, "bytes", "KILOBYTES", "Megabytes", "bits", 1024])
net_counts = st.fixed_dictionaries(
    {},
    optional={
        "upload": count_values,
        "download": count_values,
        "total": count_values,
        "units": units_values,
    },
)
periods = st.lists(timestamps, min_size=2, max_size=2).map(
    lambda ends: {"start": min(ends), "end": max(ends)}
)
usage_records = st.fixed_dictionaries(
    {"period": periods},
    optional={
        "data": st.fixed_dictionaries(
            {},
            optional={
                "upload": count_values,
                "download": count_values,
                "total": count_values,
                "units": units_values,
                "billed": st.none() | st.floats(allow_nan=False, allow_infinity=False),
                "home": net_counts,
                "national_roaming": net_counts,
                "international_roaming": st.lists(net_counts, max_size=3),
            },
        ),
        "commands": st.fixed_dictionaries(
            {}, optional={"from_sim": count_values, "to_sim": count_values}
        ),
        "sim_sid": st.sampled_from([SIM_A, SIM_A.lower(), SIM_B]),
    },
)
"""A usage record of edge values, shaped like one often enough that many are accepted."""
records_of_anything = st.fixed_dictionaries(
    {},
    optional={
        "period": json_values | st.fixed_dictionaries({}, optional={"start": timestamps}),
        "data": json_values,
        "commands": json_values,
        "sim_sid": json_values,
    },
)
"""A record whose every field may be any JSON at all."""


def _check_accepted(usage: Usage) -> None:
    networks = (usage.home, usage.national_roaming, usage.international_roaming)
    values = [usage.upload, usage.download, usage.total, usage.commands_from_sim]
    values += [usage.commands_to_sim, *(n for n in networks if n is not None)]
    assert all(isinstance(n, int) and 0 <= n <= INT64_MAX for n in values), usage
    assert usage.total >= 0
    assert usage.start <= usage.end


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(usage_records | records_of_anything | json_values, max_size=4))
def test_normalisation_never_raises_and_accepts_only_plausible_counts(
    records: list[Any],
) -> None:
    page = decode_usage_page(json.dumps({"usage_records": records, "meta": {}}).encode())
    listing: Listing[Usage] = Listing(rejected=page.rejected)
    check_usage(page.records, SIM_A, WINDOW, listing)
    assert len(listing) + len(listing.rejected) == len(records)
    for usage in listing:
        _check_accepted(usage)
    for rejection in listing.rejected:
        assert isinstance(rejection, Rejection)
        assert isinstance(rejection.reason, RejectReason)


known_units = st.sampled_from([None, "bytes", "Kilobytes", "MEGABYTES"])
FACTOR = {None: 1, "bytes": 1, "kilobytes": 1024, "megabytes": MIB}
big = st.integers(min_value=0, max_value=INT64_MAX) | st.integers(min_value=0, max_value=2**20)


@settings(max_examples=300, deadline=None)
@given(
    up=big,
    down=big,
    total=st.none() | big,
    units=known_units,
    home_total=st.none() | big,
    home_units=known_units,
    abroad=st.lists(st.tuples(big, known_units), max_size=3),
)
def test_normalised_bytes_match_a_reference(
    up: int,
    down: int,
    total: int | None,
    units: str | None,
    home_total: int | None,
    home_units: str | None,
    abroad: list[tuple[int, str | None]],
) -> None:
    """Decoded records of well-typed counts: accepted exactly when every byte count fits int64,
    with the values plain integer arithmetic gives."""
    record = UsageRecord(
        period=TimePeriod(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
        data=msgspec.convert(
            {
                "upload": up,
                "download": down,
                "total": total,
                "units": units,
                "home": {"total": home_total, "units": home_units},
                "international_roaming": [{"total": n, "units": u} for n, u in abroad],
            },
            DataUsage,
        ),
    )

    def factor(unit: str | None) -> int:
        return FACTOR[unit.lower() if unit else None]

    f = factor(units)
    want_total = total * f if total is not None else (up + down) * f
    want_home = home_total * factor(home_units) if home_total is not None else None
    partial = [n * factor(u) for n, u in abroad]
    want_abroad = sum(partial)
    checked = (up * f, down * f, want_total, want_abroad, *partial, want_home or 0)
    fits = all(v <= INT64_MAX for v in checked)
    result = normalise(record, WINDOW)
    if not fits:
        assert isinstance(result, Rejection)
        assert result.reason is RejectReason.USAGE
        return
    assert isinstance(result, Usage)
    _check_accepted(result)
    assert (result.upload, result.download, result.total) == (up * f, down * f, want_total)
    assert result.home == want_home
    assert result.international_roaming == want_abroad
