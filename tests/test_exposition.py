"""The incremental exposition against the reference exposition: same bytes, same samples.

Random fleets (hypothesis) with hostile label values are rendered by both paths, then changed
(SIMs polled again, renamed, relabelled, added, removed) and rendered again, so the cached,
spliced blocks are compared with a from-scratch reference every time. Content negotiation
(``web/negotiation.py``) is compared with ``prometheus_client``'s ``choose_encoder``.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as om_text_to_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from tests.fleet_support import SID_A, polled_state
from tests.harness_support import eventually
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import RESERVED_LABEL_NAMES
from twilio_wireless_exporter.exposition import renderer as renderer_module
from twilio_wireless_exporter.exposition.collector import build_registry
from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.formats import (
    OPENMETRICS,
    TEXT,
    Encoding,
    Escaping,
    Format,
    generate,
)
from twilio_wireless_exporter.exposition.reference import ReferenceExposition
from twilio_wireless_exporter.exposition.renderer import (
    Exposition,
    _Block,
    escape_label_value,
    format_value,
)
from twilio_wireless_exporter.fleet.accounting import ListingOutcome, SessionAttributes
from twilio_wireless_exporter.fleet.state import FleetState, SimRecord
from twilio_wireless_exporter.web.app import WebContext, make_app
from twilio_wireless_exporter.web.negotiation import choose, negotiate

HOSTILE = st.text(
    alphabet=st.one_of(
        st.sampled_from(['"', "\\", "\n", "\r", "\t", "{", "}", ",", "=", " ", "ü", "📶", "\x00"]),
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
    ),
    max_size=12,
)
LABEL_NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in RESERVED_LABEL_NAMES and not n.startswith("__")
)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
COUNT = st.integers(min_value=0, max_value=2**53)
TIMESTAMP = st.one_of(st.floats(min_value=0, max_value=4e9), st.integers(0, 2**31).map(float))


@dataclass(frozen=True)
class Change:
    """What a poll (or a config reload) may set on one SIM."""

    name: str
    labels: dict[str, str]
    identity: tuple[str, str, str, str]
    up: bool | None
    last_success: float | None
    baselined: bool
    counters: tuple[int, int, int, int, int, int]
    latest: tuple[str, str, str, str, str, str] | None
    location: tuple[float, float] | None
    latest_start: float | None
    last_updated: float | None


sim_change = st.builds(
    Change,
    name=HOSTILE,
    labels=st.dictionaries(LABEL_NAME, HOSTILE, max_size=2),
    identity=st.tuples(HOSTILE, HOSTILE, HOSTILE, HOSTILE),
    up=st.sampled_from([None, True, False]),
    last_success=st.none() | TIMESTAMP,
    baselined=st.booleans(),
    counters=st.tuples(COUNT, COUNT, COUNT, COUNT, COUNT, COUNT),
    latest=st.none() | st.tuples(HOSTILE, HOSTILE, HOSTILE, HOSTILE, HOSTILE, HOSTILE),
    location=st.none() | st.tuples(FINITE, FINITE),
    latest_start=st.none() | TIMESTAMP,
    last_updated=st.none() | TIMESTAMP,
)


def apply_change(state: FleetState, sid: str, change: Change) -> None:
    record = state.ensure(sid, change.labels, change.name)
    unique, friendly, status, plan = change.identity
    state.set_identity(
        sid, unique_name=unique, friendly_name=friendly, status=status, rate_plan_sid=plan
    )
    acct = record.account
    acct.baselined = change.baselined
    (
        acct.started_total,
        acct.ended_total,
        acct.packets_uploaded_total,
        acct.packets_downloaded_total,
        acct.imei_changes_total,
        acct.open_sessions,
    ) = change.counters
    acct.latest = None if change.latest is None else SessionAttributes(*change.latest)
    acct.location = change.location
    acct.latest_start = change.latest_start
    acct.last_updated = change.last_updated
    if change.up is None:
        record.up = None
        record.last_success = None
        record.version += 1  # what the state's own updates do on every change
        state.version += 1
    elif change.up:
        outcome = ListingOutcome(durations=[("LTE", 90.0)] if acct.ended_total % 3 == 0 else [])
        state.record_success(sid, outcome, now=0.0)
        record.last_success = change.last_success
    else:
        state.record_failure(sid, "boom", now=0.0)
        record.version += 1
        state.version += 1


def sid_of(n: int) -> str:
    return f"DE{n:032x}"


def parsed(text: str, parser: Callable[[str], Iterable[Metric]]) -> list[tuple[object, ...]]:
    """Every sample (family, name, labels, value) in document order."""
    return [
        (family.name, s.name, tuple(sorted(s.labels.items())), s.value)
        for family in parser(text)
        for s in family.samples
    ]


def expositions(
    state: FleetState, *, imei_label: bool = False, block_size: int = 128
) -> tuple[Exposition, ReferenceExposition]:
    """The incremental exposition of ``state`` and its reference, over one private registry."""
    registry, _ = build_registry(state)
    sims = SimFamilies(state, imei_label=imei_label)
    return Exposition(sims, registry, block_size=block_size), ReferenceExposition(sims, registry)


def assert_same(exposition: Exposition, state: FleetState, imei_label: bool) -> None:
    """Fast output == reference output: byte for byte, sample for sample, gzip included."""
    registry, _ = build_registry(state)
    reference = ReferenceExposition(SimFamilies(state, imei_label=imei_label), registry)
    ref_text = reference.text()
    fast_text = exposition.text()
    assert fast_text == ref_text
    assert parsed(fast_text.decode(), text_string_to_metric_families) == parsed(
        ref_text.decode(), text_string_to_metric_families
    )
    ref_om = reference.text(OPENMETRICS)
    fast_om = exposition.text(OPENMETRICS)
    assert fast_om == ref_om
    assert parsed(fast_om.decode(), om_text_to_families) == parsed(
        ref_om.decode(), om_text_to_families
    )
    body = exposition.gzip()
    # one gzip member that a single-member decoder (zlib, aiohttp, curl) reads to the end
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert inflater.decompress(body) + inflater.flush() == ref_text
    assert inflater.eof
    assert not inflater.unused_data
    assert gzip.decompress(exposition.gzip(OPENMETRICS)) == ref_om
    for fmt in Format:  # the escaping schemes derived from the cached blocks
        for escaping in (Escaping.DOTS, Escaping.VALUES):
            encoding = Encoding(fmt, escaping)
            assert exposition.text(encoding) == reference.text(encoding), encoding


@pytest.mark.slow
@pytest.mark.usefixtures("created_samples_off")
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    first=st.lists(sim_change, max_size=8),
    rounds=st.lists(
        st.lists(st.tuples(st.integers(0, 11), st.none() | sim_change), max_size=6),
        max_size=4,
    ),
    block_size=st.integers(1, 4),
    imei_label=st.booleans(),
)
def test_matches_the_reference_collector_through_changes(
    first: list[Change],
    rounds: list[list[tuple[int, Change | None]]],
    block_size: int,
    imei_label: bool,
) -> None:
    state = FleetState()
    exposition, _ = expositions(state, imei_label=imei_label, block_size=block_size)
    for n, change in enumerate(first):
        apply_change(state, sid_of(n), change)
    assert_same(exposition, state, imei_label)
    for changes in rounds:
        for n, maybe in changes:
            sid = sid_of(n)
            if maybe is None:  # removed (e.g. no longer discovered)
                state.retain(s for s in state.sims if s != sid)
            else:  # polled again, relabelled, or new
                apply_change(state, sid, maybe)
        assert_same(exposition, state, imei_label)


def test_an_unchanged_state_renders_nothing_again() -> None:
    state = polled_state()
    exposition, reference = expositions(state, block_size=1)
    first = exposition.refresh()
    assert first.relayout
    assert first.rendered == 2
    again = exposition.refresh()
    assert (again.rendered, again.blocks_changed, again.relayout) == (0, 0, False)
    state.record_success(SID_A, ListingOutcome(), now=1.0)
    polled = exposition.refresh()
    assert polled.rendered == 1
    # only the timestamp of the poll moved: one block of one family was spliced
    assert polled.blocks_changed == 1
    assert exposition.text() == reference.text()


@given(st.floats() | st.integers(-(2**70), 2**70))
def test_values_are_formatted_like_prometheus_client(value: float) -> None:
    assert format_value(value) == floatToGoString(value)  # type: ignore[no-untyped-call]


@given(st.text())
def test_label_values_are_escaped_like_prometheus_client(value: str) -> None:
    assert escape_label_value(value) == om_format._escape(
        value, om_format.ALLOWUTF8, om_format._is_legacy_labelname_rune
    )


ACCEPT_CASES = [
    ("", Encoding(Format.TEXT)),
    ("text/plain;version=0.0.4", Encoding(Format.TEXT)),
    ("text/plain;version=1.0.0;escaping=allow-utf-8", Encoding(Format.TEXT, Escaping.ALLOW_UTF8)),
    ("text/plain; version=1.0.0; escaping=dots", Encoding(Format.TEXT, Escaping.DOTS)),
    ("application/openmetrics-text;version=1.0.0", Encoding(Format.OPENMETRICS)),
    ("application/openmetrics-text", Encoding(Format.OPENMETRICS)),
    ("application/openmetrics-text;escaping=dots", Encoding(Format.OPENMETRICS)),
    (
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
        "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        Encoding(Format.OPENMETRICS, Escaping.ALLOW_UTF8),
    ),
    (
        "application/openmetrics-text;version=1.0.0;escaping=dots",
        Encoding(Format.OPENMETRICS, Escaping.DOTS),
    ),
    ("application/openmetrics-text;version=2.0.0", Encoding(Format.OPENMETRICS)),
    ("application/openmetrics-text;version=0.0.1,text/plain", Encoding(Format.TEXT)),
    ("text/plain;version=1.0.0;escaping=nonsense", Encoding(Format.TEXT)),
    ("application/json, text/html", Encoding(Format.TEXT)),
]


def utf8_registry() -> CollectorRegistry:
    """A private registry whose output depends on the escaping scheme (a non-legacy label)."""
    state = FleetState()
    state.ensure(sid_of(1), {"späti": "ja", "a.b": "c"})
    registry, _ = build_registry(state)
    return registry


@pytest.mark.parametrize(("accept", "expected"), ACCEPT_CASES)
def test_negotiation_agrees_with_choose_encoder(accept: str, expected: Encoding) -> None:
    encoding, content_type = choose(accept)
    assert encoding == expected
    encoder, stock_content_type = choose_encoder(accept)
    assert content_type == stock_content_type
    registry = utf8_registry()
    assert generate(encoding, registry) == encoder(registry)


ACCEPT_ENTRY = st.tuples(
    st.sampled_from(["application/openmetrics-text", "text/plain", "*/*", "text/html", ""]),
    st.lists(
        st.sampled_from(
            [
                "version=1.0.0",
                "version=0.0.4",
                "version=2.0.0",
                "version=1",
                "version=",
                "version=0.9",
                " version=1.0.0 ",
                "escaping=allow-utf-8",
                "escaping=underscores",
                "escaping=dots",
                "escaping=values",
                "escaping=bogus",
                "q=0.5",
                "charset=utf-8",
            ]
        ),
        max_size=3,
    ),
).map(lambda entry: ";".join([entry[0], *entry[1]]))


@given(st.lists(ACCEPT_ENTRY, max_size=4).map(",".join))
def test_negotiation_agrees_with_choose_encoder_on_any_header(accept: str) -> None:
    encoding, content_type = choose(accept)
    encoder, stock_content_type = choose_encoder(accept)
    assert content_type == stock_content_type
    registry = utf8_registry()
    assert generate(encoding, registry) == encoder(registry)


@pytest.mark.parametrize(
    "accept", ["text/plain;version=abc", "application/openmetrics-text;version=1.x"]
)
def test_a_version_that_is_not_a_number_is_skipped(accept: str) -> None:
    """``choose_encoder`` raises on these; negotiation treats them like an old version."""
    with pytest.raises(TypeError):
        choose_encoder(accept)
    assert choose(accept + ",application/openmetrics-text") == choose(
        "application/openmetrics-text"
    )
    assert choose(accept) == choose("")


@pytest.mark.parametrize(
    ("accept_encoding", "gzip_wanted"),
    [
        ("", False),
        ("gzip", True),
        ("GZIP;q=0.5", True),
        ("br, *", True),
        ("gzip;q=0", False),
        ("gzip;q=nonsense", False),
        ("identity", False),
        ("deflate, gzip;q=1.0", True),
    ],
)
def test_gzip_negotiation(accept_encoding: str, gzip_wanted: bool) -> None:
    assert negotiate("", accept_encoding).gzip is gzip_wanted


@pytest.mark.parametrize(("accept", "expected"), ACCEPT_CASES)
async def test_metrics_endpoint_serves_the_negotiated_body(accept: str, expected: Encoding) -> None:
    """Through the web layer: headers from the negotiation, the body in that encoding."""
    state = FleetState()
    state.ensure(sid_of(1), {"späti": "ja"})
    apply_change(state, sid_of(2), sample_change(2))
    exposition, reference = expositions(state)
    context = WebContext(state, lambda: True, "http://api", exposition)
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(context)))
    await client.start_server()
    try:
        for accept_encoding in ("identity", "gzip"):
            resp = await client.get(
                "/metrics", headers={"Accept": accept, "Accept-Encoding": accept_encoding}
            )
            assert resp.status == 200
            assert resp.headers["Content-Type"] == choose_encoder(accept)[1]
            assert resp.headers.get("Content-Encoding") == (
                "gzip" if accept_encoding == "gzip" else None
            )
            assert await resp.read() == reference.text(expected)
    finally:
        await client.close()


def sample_change(n: int) -> Change:
    return Change(
        name=f"sim {n}",
        labels={"site": "x\ny"},
        identity=("u", "f", "active", "WP1"),
        up=True,
        last_success=1_700_000_000.5 + n,
        baselined=True,
        counters=(n, n, n * 1000, n * 2000, 0, 1),
        latest=("LTE", "Op", "DEU", "262", "01", "490154203237518"),
        location=(52.5, 13.4),
        latest_start=1_700_000_000,
        last_updated=1_700_000_100,
    )


async def test_async_render_matches_and_shares_work() -> None:
    state = FleetState()
    for n in range(300):
        apply_change(state, sid_of(n), sample_change(n))
    exposition, reference = expositions(state, block_size=16)
    plain = await rendered(exposition, TEXT, compress=False)
    assert plain == reference.text()
    zipped = await rendered(exposition, TEXT, compress=True)
    assert gzip.decompress(zipped) == plain
    om = await rendered(exposition, OPENMETRICS, compress=True)
    assert gzip.decompress(om) == reference.text(OPENMETRICS)
    # an escaping scheme that rewrites names: derived from the cache, same bytes
    dots = Encoding(Format.OPENMETRICS, Escaping.DOTS)
    assert await rendered(exposition, dots, compress=False) == reference.text(dots)
    assert b"twilio__wireless__sim__up{" in reference.text(dots)
    assert gzip.decompress(await rendered(exposition, dots, compress=True)) == reference.text(dots)


SLOW_PATH_ENCODINGS = [
    Encoding(fmt, escaping)
    for fmt in Format
    for escaping in (Escaping.DOTS, Escaping.VALUES, Escaping.ALLOW_UTF8, Escaping.UNDERSCORES)
]


@pytest.mark.parametrize("encoding", SLOW_PATH_ENCODINGS, ids=str)
async def test_every_escaping_is_served_from_the_cache(
    encoding: Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No encoding re-renders the fleet from scratch on a scrape (the reference exposition,
    about a second of event loop per scrape at thousands of SIMs): all come from the cache,
    and only blocks that changed are rewritten for the schemes that rename."""
    state = FleetState()
    for n in range(40):
        apply_change(state, sid_of(n), sample_change(n))
    exposition, reference = expositions(state, block_size=8)
    expected = reference.text(encoding)
    monkeypatch.setattr(exposition._reference, "render", pytest.fail)
    monkeypatch.setattr(exposition._reference, "text", pytest.fail)
    monkeypatch.setattr(exposition._reference, "gzip", pytest.fail)
    escaped: list[bytes] = []
    original = renderer_module.escape_block

    def counting(data: bytes, encoding: Encoding) -> bytes:
        escaped.append(data)
        return original(data, encoding)

    monkeypatch.setattr(renderer_module, "escape_block", counting)
    assert await rendered(exposition, encoding, compress=False) == expected
    assert gzip.decompress(await rendered(exposition, encoding, compress=True)) == expected
    first = len(escaped)
    state.record_success(sid_of(3), ListingOutcome(), now=5.0)  # one SIM's poll time moves
    assert await rendered(exposition, encoding, compress=False) == reference.text(encoding)
    assert len(escaped) - first <= 1  # one block of one family rewritten, not the fleet


async def test_openmetrics_2_is_served_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    state = FleetState()
    apply_change(state, sid_of(1), sample_change(1))
    exposition, reference = expositions(state)
    monkeypatch.setattr(exposition._reference, "render", pytest.fail)
    chosen = negotiate("application/openmetrics-text; version=2.0.0", "gzip")
    body = gzip.decompress(await rendered(exposition, chosen.encoding, compress=chosen.gzip))
    assert body == reference.text(OPENMETRICS)
    assert chosen.content_type.startswith("application/openmetrics-text; version=2.0.0")


async def rendered(exposition: Exposition, encoding: Encoding, *, compress: bool) -> bytes:
    """The body that ``render`` gives in parts."""
    return b"".join(await exposition.render(encoding, compress=compress))


async def test_non_legacy_label_names_fall_back_for_utf8_escaping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = FleetState()
    state.ensure(sid_of(1), {"späti": "ja"})
    exposition, reference = expositions(state)
    assert exposition.text() == reference.text()
    utf8 = Encoding(Format.TEXT, Escaping.ALLOW_UTF8)
    cached = exposition._text_parts
    monkeypatch.setattr(exposition, "_text_parts", lambda *_: pytest.fail("cache used"))
    body = await rendered(exposition, utf8, compress=False)
    assert body == reference.text(utf8)
    assert '"späti"="ja"'.encode() in body
    assert exposition.text(utf8) == body
    monkeypatch.setattr(exposition, "_text_parts", cached)
    assert exposition.text(TEXT) == reference.text()  # the default scheme is still cached


def test_values_survive_the_round_trip() -> None:
    """Sanity check of the parser-based comparison itself: it sees every sample."""
    state = polled_state()
    samples = parsed(expositions(state)[0].text().decode(), text_string_to_metric_families)
    assert len(samples) > 15
    assert all(isinstance(v, float) and not math.isnan(v) for *_, v in samples)


async def test_concurrent_scrapes_share_a_render_that_starts_after_they_arrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = polled_state()
    exposition, reference = expositions(state)
    renders = 0
    text_parts = exposition._text_parts

    def counting(*args: Any) -> list[bytes]:
        nonlocal renders
        renders += 1
        return text_parts(*args)

    monkeypatch.setattr(exposition, "_text_parts", counting)
    bodies = await asyncio.gather(*(rendered(exposition, TEXT, compress=False) for _ in range(10)))
    assert renders == 1
    assert all(body == reference.text() for body in bodies)

    # a render already under way is not shared with a request that arrives after a change
    first = asyncio.ensure_future(rendered(exposition, TEXT, compress=False))
    for _ in range(3):
        await asyncio.sleep(0)
    state.record_success(SID_A, ListingOutcome(), now=12345.0)
    second = await rendered(exposition, TEXT, compress=False)
    await first
    assert second == reference.text()
    assert b"_last_poll_success_timestamp_seconds{" in second
    assert b"} 12345.0\n" in second
    assert renders == 3


async def test_keep_fresh_renders_changes_between_scrapes(monkeypatch: pytest.MonkeyPatch) -> None:
    state = FleetState()
    for n in range(40):
        state.ensure(sid_of(n))
        state.record_success(sid_of(n), ListingOutcome(), now=1_700_000_000.0 + n)
    exposition, reference = expositions(state, block_size=8)
    rendered_sids: list[str] = []
    render_sim = exposition.render_sim

    def counting(record: SimRecord) -> list[bytes]:
        rendered_sids.append(record.sid)
        return render_sim(record)

    monkeypatch.setattr(exposition, "render_sim", counting)
    clock = ManualClock()

    async def tick() -> None:
        """One refresh interval passes; returns once the refresher sleeps again."""
        await clock.advance(1.0)
        await eventually(lambda: clock.sleepers == 1)

    refresher = asyncio.ensure_future(exposition.keep_fresh(1.0, clock.sleep))
    try:
        await eventually(lambda: clock.sleepers == 1)
        await tick()
        assert rendered_sids == []  # nobody has scraped yet: no work

        assert await rendered(exposition, TEXT, compress=True) != b""
        assert len(rendered_sids) == 40
        changed = [sid_of(3), sid_of(17), sid_of(39)]
        for sid in changed:
            state.record_success(sid, ListingOutcome(), now=1_800_000_000.0)
        rendered_sids.clear()
        await tick()
        assert sorted(rendered_sids) == sorted(changed)  # rendered between scrapes ...
        assert exposition._stale_blocks() == []  # ... and compressed too

        rendered_sids.clear()
        body = await rendered(exposition, TEXT, compress=True)
        assert rendered_sids == []  # so the scrape had nothing left to do
        assert gzip.decompress(body) == reference.text()
        assert b"} 1.8e+09\n" in gzip.decompress(body)
    finally:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)


@given(
    st.lists(st.binary(max_size=6), min_size=1, max_size=12).flatmap(
        lambda frags: st.tuples(
            st.just(frags),
            st.dictionaries(
                st.integers(0, len(frags) - 1), st.binary(max_size=9), max_size=len(frags)
            ),
        )
    )
)
def test_block_splice_equals_a_rebuilt_block(case: tuple[list[bytes], dict[int, bytes]]) -> None:
    frags, replacements = case
    block = _Block(frags)
    block.gz = b"stale"
    block.splice(replacements)
    expected = [replacements.get(j, f) for j, f in enumerate(frags)]
    assert block.data == b"".join(expected)
    assert [block.fragment(j) for j in range(len(frags))] == expected
    assert block.ends == _Block(expected).ends
    assert block.gz is (b"stale" if not replacements else None)
