"""Cardinality controls: ``metrics.include``/``exclude``, ``per_sim``, ``sim_labels``, the
scrape-time selection of sections and the series count.

Every test renders the same fleet through the incremental exposition and the reference (over
one private registry, so both read the same counters) and checks exactly which series are
there and which are not.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import re
import zlib
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from tests.fleet_support import SID_A, SID_B, polled_state
from tests.metrics_support import parse_samples
from tests.prom_support import load_dashboards, load_rules, panels_of, scan
from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.api.transport import ErrorKind
from twilio_wireless_exporter.config import Config, ConfigError, config_from_mapping
from twilio_wireless_exporter.config.metrics import SIM_ATTRIBUTE_LABELS
from twilio_wireless_exporter.exposition.collector import (
    HttpMetrics,
    SeriesCollector,
    build_registry,
)
from twilio_wireless_exporter.exposition.formats import (
    OPENMETRICS,
    TEXT,
    Encoding,
    Escaping,
    Format,
)
from twilio_wireless_exporter.exposition.reference import ReferenceExposition
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.exposition.selection import Section, section_of
from twilio_wireless_exporter.fleet.accounting import ListingOutcome
from twilio_wireless_exporter.fleet.aggregates import FleetAggregates
from twilio_wireless_exporter.fleet.state import FleetState, SimRecord
from twilio_wireless_exporter.service import kept_families, sim_families
from twilio_wireless_exporter.web.app import WebContext, make_app

ENV = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "x"}


def config(**metrics: Any) -> Config:
    sims = [{"sid": SID_A, "labels": {"site": "berlin", "team": "ops"}}, {"sid": SID_B}]
    return config_from_mapping({"sims": sims, "metrics": metrics}, environ=ENV)


def problems(**metrics: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(**metrics)
    return info.value.problems


def render(cfg: Config, state: FleetState | None = None) -> tuple[Exposition, ReferenceExposition]:
    """The incremental exposition and its reference for ``cfg``'s metrics settings."""
    state = state or polled_state()
    registry, api = build_registry(state, poll_interval=60.0)
    api.poll_error("data_sessions", ErrorKind.TIMEOUT)
    sims = sim_families(cfg, state)
    return Exposition(sims, registry, block_size=1), ReferenceExposition(sims, registry)


def families_of(text: bytes) -> set[str]:
    """The families of the series in an exposition."""
    found = set()
    for name, _ in parse_samples(text.decode()):
        family = names.family_of(name)
        assert family is not None, name
        found.add(family.name)
    return found


def exposed(cfg: Config) -> set[str]:
    """The families ``cfg`` exposes, checked to be the same by both paths and both formats."""
    fast, reference = render(cfg)
    text = fast.text()
    assert text == reference.text()
    assert fast.text(OPENMETRICS) == reference.text(OPENMETRICS)
    assert gzip.decompress(fast.gzip()) == text
    return families_of(text)


PER_SIM = {family.name for family in names.PER_SIM}


@pytest.fixture(autouse=True)
def _created_off(created_samples_off: None) -> None:
    """``*_created`` samples off in every test here, as the command runs."""


@pytest.fixture(name="everything")
def everything_exposed() -> set[str]:
    return exposed(config())


def test_by_default_every_family_with_data_is_exposed(everything: set[str]) -> None:
    assert {names.SIM_UP.name, names.SIMS_MONITORED.name, names.POLL_ERRORS.name} <= everything
    assert kept_families(config()) is None


# ---------------------------------------------------------------- include / exclude


def test_exclude_by_name_removes_exactly_that_family(everything: set[str]) -> None:
    assert exposed(config(exclude=["twilio_wireless_sim_cell_latitude_degrees"])) == (
        everything - {names.LATITUDE.name}
    )


def test_exclude_by_series_name_and_by_pattern(everything: set[str]) -> None:
    cfg = config(
        exclude=["twilio_wireless_sim_data_sessions_started_total", "twilio_wireless_sim_cell_.*"]
    )
    assert exposed(cfg) == everything - {
        names.SESSIONS_STARTED.name,
        names.LATITUDE.name,
        names.LONGITUDE.name,
    }


def test_include_applies_to_per_sim_fleet_and_self_families() -> None:
    cfg = config(
        include=["twilio_wireless_sim_up", "twilio_wireless_sims_monitored", ".*_poll_errors"]
    )
    assert exposed(cfg) == {names.SIM_UP.name, names.SIMS_MONITORED.name, names.POLL_ERRORS.name}


def test_exclude_wins_over_include(everything: set[str]) -> None:
    cfg = config(include=["twilio_wireless_sim_.*"], exclude=["twilio_wireless_sim_info"])
    assert exposed(cfg) == (everything & PER_SIM) - {names.SIM_INFO.name}


def test_excluding_every_family_leaves_an_empty_body() -> None:
    fast, reference = render(config(exclude=[".*"]))
    assert fast.text() == reference.text() == b""
    assert fast.text(OPENMETRICS) == b"# EOF\n"
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert inflater.decompress(fast.gzip()) + inflater.flush() == b""
    assert inflater.eof


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("twilio_wireless_sim_upp", "matches no metric family"),
        ("sim_up", "matches no metric family"),
        ("twilio_wireless_(", "neither a metric family of the exporter nor a regular expression"),
        ("twilio_wireless_sim_up_total", "matches no metric family"),
    ],
)
def test_a_name_or_pattern_that_matches_nothing_is_an_error(
    field: str, entry: str, fragment: str
) -> None:
    found = problems(**{field: ["twilio_wireless_sim_up", entry]})
    assert len(found) == 1
    assert found[0].startswith(f"metrics.{field}[1]: "), found
    assert fragment in found[0]


def test_a_non_string_entry_is_an_error() -> None:
    assert problems(include=[3]) == [
        "metrics.include[0]: must be a string, got 3; put it in quotes"
    ]


def test_patterns_match_whole_names(everything: set[str]) -> None:
    # "sim_up" is in many names, but matched whole it is none of them
    assert "matches no metric family" in problems(exclude=["twilio_wireless_sim"])[0]
    assert exposed(config(exclude=["twilio_wireless_sim_u."])) == everything - {names.SIM_UP.name}


def test_every_declared_family_can_be_named() -> None:
    for family in names.ALL:
        cfg = config(include=[re.escape(family.name)])
        assert kept_families(cfg) == frozenset({family.name})


# ---------------------------------------------------------------- per_sim


def test_per_sim_essential_keeps_exactly_the_essential_per_sim_families(
    everything: set[str],
) -> None:
    essential = {family.name for family in names.ESSENTIAL}
    assert exposed(config(per_sim="essential")) == (everything - PER_SIM) | essential
    assert exposed(config(per_sim="essential", exclude=["twilio_wireless_sim_up"])) == (
        everything - PER_SIM
    ) | (essential - {names.SIM_UP.name})


def test_per_sim_none_keeps_fleet_and_self_families_only(everything: set[str]) -> None:
    assert exposed(config(per_sim="none")) == everything - PER_SIM
    fast, _ = render(config(per_sim="none"))
    assert fast.refresh().rendered == 0  # no SIM is rendered at all


def test_per_sim_full_is_the_default(everything: set[str]) -> None:
    assert exposed(config(per_sim="full")) == everything


def test_an_unknown_per_sim_mode_is_an_error() -> None:
    assert problems(per_sim="some") == [
        "metrics.per_sim: must be one of full, essential, none, got 'some'"
    ]


def test_essential_is_a_subset_of_the_per_sim_families() -> None:
    assert set(names.ESSENTIAL) <= set(names.PER_SIM)
    assert len(set(names.ESSENTIAL)) == len(names.ESSENTIAL)


def test_every_per_sim_family_the_rules_read_is_essential() -> None:
    read = {
        names.family_of(sel.name)
        for _, rule in load_rules()
        for sel in scan(rule["expr"]).selectors
    }
    assert names.SIM_UP in read  # the scan sees the rules
    assert {f for f in read if f in names.PER_SIM} - set(names.ESSENTIAL) == set()


def test_every_panel_says_which_per_sim_mode_empties_it() -> None:
    essential = set(names.ESSENTIAL)
    checked = 0
    for dashboard in load_dashboards().values():
        for panel in panels_of(dashboard):
            exprs = [t.get("expr", "") for t in panel.get("targets", [])]
            read = {names.family_of(sel.name) for expr in exprs for sel in scan(expr).selectors}
            per_sim = {f for f in read if f in names.PER_SIM}
            description = panel.get("description", "")
            if per_sim - essential:
                assert "Needs `metrics.per_sim: full`" in description, panel["title"]
            elif per_sim:
                assert "Empty with `metrics.per_sim: none`" in description, panel["title"]
            else:
                assert "`metrics.per_sim: " not in description, panel["title"]
            checked += 1
    assert checked > 20


# ---------------------------------------------------------------- sim_labels


def labelled(cfg: Config) -> dict[str, dict[str, str]]:
    """The labels of SIM A's series, by series name."""
    state = polled_state()
    state.ensure(SID_A, {"site": "berlin", "team": "ops"}, "pump-17")
    fast, reference = render(cfg, state)
    text = fast.text()
    assert text == reference.text()
    return {
        name: dict(labels)
        for name, labels in parse_samples(text.decode())
        if dict(labels).get("sim_sid") == SID_A
    }


def test_by_default_every_configured_label_is_on_every_per_sim_series() -> None:
    series = labelled(config())
    assert series[names.SIM_UP.sample] == {"sim_sid": SID_A, "site": "berlin", "team": "ops"}
    assert all(labels["site"] == "berlin" for labels in series.values())


def test_sim_labels_chooses_the_labels_of_per_sim_series_and_info_keeps_all() -> None:
    series = labelled(config(sim_labels=["team"]))
    assert series[names.SIM_UP.sample] == {"sim_sid": SID_A, "team": "ops"}
    assert series[names.SESSIONS_STARTED.sample] == {"sim_sid": SID_A, "team": "ops"}
    session_info = series[names.SESSION_INFO.sample]
    assert "site" not in session_info
    assert session_info["team"] == "ops"
    info = series[names.SIM_INFO.sample]
    assert (info["site"], info["team"], info["sim_name"]) == ("berlin", "ops", "pump-17")


def test_empty_sim_labels_leaves_only_the_sid_on_per_sim_series() -> None:
    series = labelled(config(sim_labels=[]))
    assert series[names.SIM_UP.sample] == {"sim_sid": SID_A}
    assert series[names.SIM_INFO.sample]["site"] == "berlin"


def test_a_sim_label_no_sim_has_is_an_error() -> None:
    assert problems(sim_labels=["team", "sight"]) == [
        "metrics.sim_labels[1]: is not a label of any SIM under sims (labels: site, team)"
    ]


def test_a_sim_label_must_be_a_label_name() -> None:
    found = problems(sim_labels=["9x"])
    assert len(found) == 1
    assert found[0].startswith("metrics.sim_labels[0]: invalid label name")


# ---------------------------------------------------------------- collect[]

SECTION_FAMILIES = {
    Section.SIMS: {family.name for family in names.PER_SIM},
    Section.FLEET: {family.name for family in names.FLEET},
    Section.EXPORTER: {family.name for family in names.SELF},
}
SELECTIONS = [
    frozenset(chosen) for n in range(1, 4) for chosen in itertools.combinations(sorted(Section), n)
]


@pytest.mark.parametrize("chosen", SELECTIONS, ids=lambda s: "+".join(sorted(s)))
def test_each_selection_holds_exactly_its_sections_families(
    chosen: frozenset[Section], everything: set[str]
) -> None:
    fast, reference = render(config())
    wanted = set().union(*(SECTION_FAMILIES[s] for s in chosen)) & everything
    for encoding in (TEXT, OPENMETRICS):
        text = fast.text(encoding, chosen)
        assert text == reference.text(encoding, chosen)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        assert inflater.decompress(fast.gzip(encoding, chosen)) + inflater.flush() == text
        assert inflater.eof
        assert not inflater.unused_data
    assert families_of(fast.text(TEXT, chosen)) == wanted


def test_the_sections_put_together_are_the_whole_body() -> None:
    fast, _ = render(config())
    whole = fast.text()
    sims = fast.text(TEXT, frozenset({Section.SIMS}))
    fleet = fast.text(TEXT, frozenset({Section.FLEET}))
    own = fast.text(TEXT, frozenset({Section.EXPORTER}))
    assert whole == sims + fleet + own
    assert fast.text(OPENMETRICS).endswith(b"# EOF\n")
    assert fast.text(OPENMETRICS, frozenset({Section.SIMS})).count(b"# EOF\n") == 1


def test_selections_share_the_cache_through_changes() -> None:
    state = polled_state()
    fast, reference = render(config(exclude=["twilio_wireless_sim_cell_.*"]), state)
    sims_only = frozenset({Section.SIMS})
    fleet_only = frozenset({Section.FLEET})
    assert fast.refresh().rendered == 2
    for n in range(3):
        state.record_success(SID_A, ListingOutcome(), now=100.0 + n)
        state.ensure(SID_B, {"round": str(n)})
        for chosen in (sims_only, fleet_only, frozenset(Section)):
            body = fast.gzip(TEXT, chosen)
            assert gzip.decompress(body) == reference.text(TEXT, chosen)
        assert fast.refresh().rendered == 0  # the three bodies came from one render


async def test_metrics_serves_the_collect_sections_and_refuses_unknown_ones() -> None:
    state = polled_state()
    cfg = config()
    registry, api = build_registry(state, poll_interval=60.0)
    api.poll_error("data_sessions", ErrorKind.TIMEOUT)
    http = HttpMetrics(registry)
    sims = sim_families(cfg, state)
    exposition = Exposition(sims, registry)
    reference = ReferenceExposition(sims, registry)
    context = WebContext(state, lambda: True, "http://api", exposition, rejections=http)
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(context)))
    await client.start_server()
    try:
        for query, chosen in [
            ("", frozenset(Section)),
            ("?collect[]=fleet", frozenset({Section.FLEET})),
            ("?collect[]=sims&collect[]=exporter", frozenset({Section.SIMS, Section.EXPORTER})),
            ("?collect[]=fleet&collect[]=fleet", frozenset({Section.FLEET})),
            ("?collect[]=fleet&collect[]=sims&collect[]=exporter", frozenset(Section)),
        ]:
            for accept_encoding in ("identity", "gzip"):
                resp = await client.get(
                    "/metrics" + query, headers={"Accept-Encoding": accept_encoding}
                )
                assert resp.status == 200, query
                assert await resp.read() == reference.text(TEXT, chosen), query
        rejected_before = sample(registry, names.HTTP_REJECTED.sample, reason="bad_request")
        for query, shown in [
            ("?collect[]=flet", "'flet'"),
            ("?collect[]=fleet&collect[]=", "''"),
            ("?collect[]=SIMS", "'SIMS'"),
        ]:
            resp = await client.get("/metrics" + query)
            assert resp.status == 400, query
            assert await resp.text() == (
                f"unknown collect[] value {shown}: use one of fleet, sims, exporter\n"
            )
        after = sample(registry, names.HTTP_REJECTED.sample, reason="bad_request")
        assert after == rejected_before + 3
    finally:
        await client.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


# ---------------------------------------------------------------- series count


def counted(text: bytes) -> dict[str, int]:
    """Series per family, counted from a parsed body."""
    out: dict[str, int] = {}
    for name, _ in parse_samples(text.decode()):
        family = names.family_of(name)
        assert family is not None
        out[family.name] = out.get(family.name, 0) + 1
    return out


def nonzero(series: dict[str, int]) -> dict[str, int]:
    return {name: n for name, n in series.items() if n}


@pytest.mark.parametrize("per_sim", ["full", "essential", "none"])
def test_the_series_count_is_that_of_the_latest_whole_body(per_sim: str) -> None:
    state = polled_state()
    fast, _ = render(config(per_sim=per_sim), state)
    text = fast.text()
    assert nonzero(fast.series) == counted(text)
    for n in range(5):  # more SIMs, some with changes: blocks spliced and rebuilt
        state.ensure(f"DE{n:032x}", {"site": "x"})
    state.retain([SID_A, *(f"DE{n:032x}" for n in range(3))])
    state.record_success(SID_A, ListingOutcome(), now=5.0)
    gz = fast.gzip(OPENMETRICS)
    assert nonzero(fast.series) == counted(fast.text())
    assert gzip.decompress(gz).endswith(b"# EOF\n")
    if per_sim != "none":
        assert fast.series[names.SIM_INFO.name] == 4


def test_a_selection_leaves_the_count_of_the_whole_body() -> None:
    state = polled_state()
    fast, _ = render(config(), state)
    whole = dict(nonzero(fast.series)) if fast.text() else {}
    state.ensure(f"DE{7:032x}")
    fast.text(TEXT, frozenset({Section.FLEET}))
    assert nonzero(fast.series) == whole


def test_the_series_gauge_exposes_the_counts() -> None:
    state = polled_state()
    registry, _ = build_registry(state, poll_interval=60.0)
    fast = Exposition(sim_families(config(), state), registry)
    registry.register(SeriesCollector(lambda: fast.series))
    first = fast.text()
    assert names.EXPOSITION_SERIES.sample.encode() + b"{" not in first  # nothing counted yet
    after_first = dict(fast.series)
    assert nonzero(after_first) == counted(first) | {names.EXPOSITION_SERIES.name: len(after_first)}
    second = fast.text()
    gauge = names.EXPOSITION_SERIES.sample
    shown = {
        dict(labels)["family"]: int(value)
        for (name, labels), value in parse_samples(second.decode()).items()
        if name == gauge
    }
    assert shown == after_first
    assert nonzero(fast.series) == counted(second)  # the second body holds what it says
    assert fast.text() == second  # and an unchanged fleet gives the same body again


def test_too_many_series_warns_once_per_crossing(caplog: pytest.LogCaptureFixture) -> None:
    state = polled_state()
    registry, _ = build_registry(state)
    two_sims = sum(counted(Exposition(sim_families(config(), state), registry).text()).values())
    # three SIMs more add three sim_info series
    fast = Exposition(sim_families(config(), state), registry, max_series=two_sims + 2)
    caplog.set_level(logging.INFO, logger="twilio_wireless_exporter.exposition.renderer")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    fast.text()
    assert warnings() == []
    for n in range(3):
        state.ensure(f"DE{n:032x}")
    fast.text()
    fast.gzip()
    assert len(warnings()) == 1
    assert "more than metrics.max_series" in warnings()[0]
    state.retain([SID_A, SID_B])
    fast.text()
    assert any("within metrics.max_series" in r.getMessage() for r in caplog.records)
    for n in range(3):
        state.ensure(f"DE{n:032x}")
    fast.text()
    assert len(warnings()) == 2


def test_max_series_must_be_positive() -> None:
    assert problems(max_series=0) == ["metrics.max_series: must be at least 1, got 0"]


# ---------------------------------------------------------------- aggregate_by


def aggregated(cfg: Config, state: FleetState) -> str:
    """The whole body of ``state`` with ``cfg``'s aggregates (both paths agreeing)."""
    registry, _ = build_registry(
        state,
        aggregates=FleetAggregates(cfg.metrics.aggregate_by, max_groups=cfg.metrics.max_groups),
    )
    sims = sim_families(cfg, state)
    text = Exposition(sims, registry).text()
    assert text == ReferenceExposition(sims, registry).text()
    return text.decode()


def test_the_aggregates_are_the_sums_of_the_per_sim_series() -> None:
    state = polled_state()
    state.ensure(SID_B, {"site": "paris"})
    cfg = config(aggregate_by=["site", "radio_link"])
    samples = parse_samples(aggregated(cfg, state))
    per_sim = [
        (names.SESSIONS_STARTED, names.FLEET_SESSIONS_STARTED),
        (names.SESSIONS_ENDED, names.FLEET_SESSIONS_ENDED),
        (names.PACKETS_UP, names.FLEET_PACKETS_UP),
        (names.PACKETS_DOWN, names.FLEET_PACKETS_DOWN),
        (names.SESSIONS_OPEN, names.FLEET_SESSIONS_OPEN),
    ]
    radio = {
        dict(labels)["sim_sid"]: dict(labels)["radio_link"]
        for (name, labels) in samples
        if name == names.SESSION_INFO.sample
    }
    for sim_family, fleet_family in per_sim:
        expected: dict[tuple[str, str], float] = {}
        for (name, labels), value in samples.items():
            if name == sim_family.sample:
                found = dict(labels)
                group = (found.get("site", ""), radio.get(found["sim_sid"], ""))
                expected[group] = expected.get(group, 0.0) + value
        shown = {
            (dict(labels).get("site", ""), dict(labels).get("radio_link", "")): value
            for (name, labels), value in samples.items()
            if name == fleet_family.sample
        }
        # SID_B was never polled: its group is there, at 0
        assert {k: v for k, v in shown.items() if k in expected or v} == expected
        assert shown[("paris", "")] == 0.0
        assert sum(shown.values()) > 0
    up = {
        dict(labels).get("site", ""): value
        for (name, labels), value in samples.items()
        if name == names.FLEET_SIMS_UP.sample
    }
    assert up == {"berlin": 1.0, "paris": 0.0}


def test_the_aggregates_stay_with_per_sim_none() -> None:
    text = aggregated(config(per_sim="none"), polled_state())
    found = families_of(text.encode())
    assert found & PER_SIM == set()
    assert {family.name for family in names.AGGREGATES} - found == set()
    # one group for the fleet: no labels
    assert parse_samples(text)[(names.FLEET_SIMS_UP.sample, ())] == 1.0
    assert parse_samples(text)[(names.FLEET_SESSIONS_STARTED.sample, ())] == 1.0


def test_the_aggregates_are_in_the_fleet_section() -> None:
    assert {section_of(family.name) for family in names.AGGREGATES} == {Section.FLEET}


@pytest.mark.parametrize(
    ("aggregate_by", "problem"),
    [
        (["sight"], "metrics.aggregate_by[0]: is neither a label of a SIM under sims"),
        (["site", "site"], "metrics.aggregate_by: names site twice"),
        (["9"], "metrics.aggregate_by[0]: invalid label name"),
        ("site", "metrics.aggregate_by: must be a list"),
    ],
)
def test_a_bad_aggregate_by_is_an_error(aggregate_by: object, problem: str) -> None:
    found = problems(aggregate_by=aggregate_by)
    assert len(found) == 1
    assert found[0].startswith(problem), found


def test_aggregate_by_takes_configured_labels_and_sim_attributes() -> None:
    cfg = config(aggregate_by=["team", *SIM_ATTRIBUTE_LABELS], max_groups=5)
    assert cfg.metrics.aggregate_by == ("team", *SIM_ATTRIBUTE_LABELS)


@pytest.mark.parametrize("max_groups", [0, 100_001, "many"])
def test_max_groups_is_bounded(max_groups: object) -> None:
    assert problems(max_groups=max_groups)[0].startswith("metrics.max_groups: ")


@pytest.mark.parametrize("encoding", [TEXT, OPENMETRICS, Encoding(Format.TEXT, Escaping.DOTS)])
async def test_a_scrape_without_sims_renders_no_sim(
    encoding: Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = polled_state()
    fast, reference = render(config(), state)
    rendered: list[str] = []
    render_sim = fast.render_sim

    def counting(record: SimRecord) -> list[bytes]:
        rendered.append(record.sid)
        return render_sim(record)

    monkeypatch.setattr(fast, "render_sim", counting)
    chosen = frozenset({Section.FLEET, Section.EXPORTER})
    for compress in (False, True):
        body = b"".join(await fast.render(encoding, compress=compress, sections=chosen))
        assert (gzip.decompress(body) if compress else body) == reference.text(encoding, chosen)
    assert rendered == []
    await fast.render(encoding, compress=False, sections=frozenset(Section))
    assert sorted(rendered) == sorted(state.sims)
