"""Exposition of the fleet state: exact values, absent data, escaping, promtool."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.fleet_support import PERIOD, PLAN, SID_A, SID_B, T0, polled_state, session, usage
from tests.metrics_support import parse_samples as samples
from tests.metrics_support import sample_value as value
from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.api.auth import TokenResult
from twilio_wireless_exporter.api.transport import ErrorKind, RetryReason
from twilio_wireless_exporter.cli import drop_created_samples
from twilio_wireless_exporter.config import Config, config_from_mapping
from twilio_wireless_exporter.exposition.collector import (
    HttpMetrics,
    SeriesCollector,
    build_registry,
)
from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.reference import ReferenceExposition
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.accounting import apply_listing
from twilio_wireless_exporter.fleet.aggregates import FleetAggregates
from twilio_wireless_exporter.fleet.persist import StateStore, state_identity
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.sharding import Shard

Render = Callable[..., str]


def reference_render(state: FleetState, *, imei_label: bool = False) -> str:
    """The whole exposition of ``state`` by the reference path (every family, stock output)."""
    registry, _ = build_registry(state)
    return ReferenceExposition(SimFamilies(state, imei_label=imei_label), registry).text().decode()


def incremental_render(state: FleetState, *, imei_label: bool = False) -> str:
    registry, _ = build_registry(state)
    return Exposition(SimFamilies(state, imei_label=imei_label), registry).text().decode()


@pytest.fixture(params=[reference_render, incremental_render], ids=["reference", "incremental"])
def render(request: pytest.FixtureRequest) -> Render:
    """Every test here holds for the stock generator and for the incremental exposition."""
    renderer: Render = request.param
    return renderer


def test_exact_values_of_a_polled_sim(render: Render) -> None:
    text = render(polled_state())
    base = {"sim_sid": SID_A, "site": "berlin"}
    assert value(text, "twilio_wireless_sim_data_sessions_open", **base) == 1
    assert value(text, "twilio_wireless_sim_data_sessions_started_total", **base) == 1
    assert value(text, "twilio_wireless_sim_data_sessions_ended_total", **base) == 1
    assert value(text, "twilio_wireless_sim_packets_uploaded_total", **base) == 2 + 3
    assert value(text, "twilio_wireless_sim_packets_downloaded_total", **base) == 4 + 1
    assert value(text, "twilio_wireless_sim_imei_changes_total", **base) == 1
    assert value(text, "twilio_wireless_sim_up", **base) == 1
    assert (
        value(text, "twilio_wireless_sim_last_poll_success_timestamp_seconds", **base) == T0 + 5000
    )
    assert (
        value(text, "twilio_wireless_sim_last_session_start_timestamp_seconds", **base) == T0 + 4000
    )
    assert value(text, "twilio_wireless_sim_last_updated_timestamp_seconds", **base) == T0 + 4100
    assert value(text, "twilio_wireless_sim_cell_latitude_degrees", **base) == 52.52
    assert value(text, "twilio_wireless_sim_cell_longitude_degrees", **base) == 13.405
    info = {
        **base,
        "sim_name": "pump-17",
        "unique_name": "sim-a",
        "friendly_name": "",
        "status": "active",
        "rate_plan_sid": "WP1",
    }
    assert value(text, "twilio_wireless_sim_info", **info) == 1
    session_info = {
        **base,
        "radio_link": "LTE-M",
        "operator_name": "Telekom",
        "operator_country": "DEU",
        "operator_mcc": "262",
        "operator_mnc": "01",
    }
    assert value(text, "twilio_wireless_sim_session_info", **session_info) == 1
    assert value(text, "twilio_wireless_sims_monitored") == 2
    # one session ended after the baseline: 3600 s, radio link LTE
    hist = "twilio_wireless_data_session_duration_seconds"
    assert value(text, hist + "_count", radio_link="LTE") == 1
    assert value(text, hist + "_sum", radio_link="LTE") == 3600
    assert value(text, hist + "_bucket", radio_link="LTE", le="1800.0") == 0
    assert value(text, hist + "_bucket", radio_link="LTE", le="3600.0") == 1
    assert value(text, hist + "_bucket", radio_link="LTE", le="+Inf") == 1


def test_poll_interval_is_exported_only_when_given(render: Render) -> None:
    registry, _ = build_registry(polled_state(), poll_interval=450.0)
    text = generate_latest(registry).decode()
    assert value(text, "twilio_wireless_poll_interval_seconds") == 450
    assert "# TYPE twilio_wireless_poll_interval_seconds gauge\n" in text
    assert "twilio_wireless_poll_interval_seconds" not in render(polled_state())


def test_shard_is_exported_only_when_given(render: Render) -> None:
    registry, _ = build_registry(polled_state(), shard=Shard(2, 5))
    text = generate_latest(registry).decode()
    assert value(text, "twilio_wireless_exporter_shards", index="2") == 5
    assert "# TYPE twilio_wireless_exporter_shards gauge\n" in text
    assert [key for key in samples(text) if key[0] == "twilio_wireless_exporter_shards"] == [
        ("twilio_wireless_exporter_shards", (("index", "2"),))
    ]
    assert "twilio_wireless_exporter_shards" not in render(polled_state())


def test_absent_data_is_absent_not_zero(render: Render) -> None:
    text = render(polled_state())
    names_for_b = {name for (name, labels) in samples(text) if ("sim_sid", SID_B) in labels}
    assert names_for_b == {"twilio_wireless_sim_info"}


def test_imei_label_only_on_opt_in(render: Render) -> None:
    assert 'imei="' not in render(polled_state())
    text = render(polled_state(), imei_label=True)
    assert 'imei="356938035643809"' in text


def test_every_family_has_help_saying_values_are_cached(render: Render) -> None:
    text = render(polled_state())
    helps = [line for line in text.splitlines() if line.startswith("# HELP twilio_wireless_sim_")]
    assert helps
    own = ("sim_up ", "last_poll_success", "sim_info", "usage_last_success", "period_start")
    cached = [h for h in helps if not any(name in h for name in own)]
    assert all("Cached from the exporter's latest" in h for h in cached)


def test_hostile_label_values_are_escaped(render: Render) -> None:
    state = FleetState()
    rec = state.ensure(SID_A, name='evil "name"\nwith newline \\ and ünïcödé')
    apply_listing(rec.account, [session("WN1", operator='Op "quoted"\n\\ 📶')])
    state.record_success(SID_A, apply_listing(rec.account, []), now=T0)
    text = render(state)
    parsed = samples(text)
    names = {dict(labels).get("sim_name") for (name, labels) in parsed if "sim_info" in name}
    assert 'evil "name"\nwith newline \\ and ünïcödé' in names
    operators = {dict(labels).get("operator_name") for (name, labels) in parsed}
    assert 'Op "quoted"\n\\ 📶' in operators
    # one sample per line: no raw newline leaked into the exposition
    assert all(line.startswith(("#", "twilio_wireless_")) for line in text.splitlines())


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_metrics_is_clean(render: Render) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=render(polled_state()).encode(),
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b""
    assert result.stderr.strip() == b""


def fully_populated() -> tuple[FleetState, CollectorRegistry]:
    """A polled fleet and a registry with every optional family: OAuth2 tokens, the state file,
    the HTTP server's."""
    state = polled_state()
    state.set_rate_plans([PLAN])
    account = [usage(PERIOD, upload=5, download=7, commands_from_sim=1)]
    state.record_account_usage(account, window_start=PERIOD, now=T0)
    registry, api = build_registry(
        state, poll_interval=60.0, shard=Shard(0, 1), aggregates=FleetAggregates(("site",))
    )
    api.request_done("/v1/Sims/{sid}/DataSessions", "200", 0.2)
    api.retry("/v1/Sims/{sid}/DataSessions", RetryReason.THROTTLED)
    api.poll_error("data_sessions", ErrorKind.TIMEOUT)
    api.token_request(TokenResult.SUCCESS)
    api.watch_token(lambda: (T0 + 3600.0, 3600.0))
    StateStore(Path("unused.db"), state_identity(minimal_config()), registry=registry)
    http = HttpMetrics(registry)
    http.reject("header_timeout")
    http.watch_connections(lambda: (3, 512))
    registry.register(SeriesCollector(lambda: {names.SIM_UP.name: 2}))
    return state, registry


def minimal_config() -> Config:
    return config_from_mapping(
        {
            "twilio": {"account_sid": "AC" + "0" * 32, "auth_token": "x"},
            "sims": [{"sid": SID_A}],
        },
        environ={},
    )


def test_the_private_registry_holds_no_per_sim_family() -> None:
    """The seam runs one way: per-SIM families come only from SimFamilies."""
    _, registry = fully_populated()
    per_sim = {family.name for family in names.PER_SIM}
    assert {metric.name for metric in registry.collect()} & per_sim == set()
    assert [metric.name for metric in SimFamilies(polled_state()).collect()] == [
        family.name for family in names.PER_SIM
    ]


@pytest.mark.usefixtures("created_samples_off")
def test_every_exposed_family_is_declared_in_metrics_names() -> None:
    state, registry = fully_populated()
    families = SimFamilies(state, imei_label=True, billed=True)
    exposed = list(ReferenceExposition(families, registry).collect())
    declared = {family.name: family for family in names.ALL}
    assert sorted(metric.name for metric in exposed) == sorted(declared)
    user_labels = {"site"}
    for metric in exposed:
        family = declared[metric.name]
        assert (metric.type, metric.documentation) == (family.kind, family.help), metric.name
        grouped = family in names.PER_SIM or family in names.AGGREGATES  # + the SIMs' labels
        extra = user_labels if grouped else set()
        if family is names.SESSION_INFO:
            extra |= {names.SESSION_INFO_IMEI}
        for sample in metric.samples:
            assert sample.name in family.series, sample.name
            labels = set(sample.labels) - {"le"}
            assert set(family.labels) <= labels <= set(family.labels) | extra, sample


def test_family_series_names() -> None:
    assert names.SIM_UP.series == ("twilio_wireless_sim_up",)
    assert names.SESSIONS_STARTED.sample == "twilio_wireless_sim_data_sessions_started_total"
    assert names.SESSION_DURATION.bucket == "twilio_wireless_data_session_duration_seconds_bucket"
    assert names.family_of("twilio_wireless_api_request_duration_seconds_sum") is (
        names.API_REQUEST_DURATION
    )
    assert names.family_of("twilio_wireless_sim_data_sessions_started") is None
    with pytest.raises(ValueError, match="histogram"):
        _ = names.SESSION_DURATION.sample
    with pytest.raises(ValueError, match="not a histogram"):
        _ = names.SIM_UP.bucket
    assert len({family.name for family in names.ALL}) == len(names.ALL)


def test_created_samples_are_the_commands_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the registry leaves the process-wide setting alone; the command's switch
    (``cli.drop_created_samples``) takes the ``*_created`` series away."""
    metrics = prometheus_client.metrics
    monkeypatch.setattr(metrics, "_use_created", True)
    registry, api = build_registry(FleetState())
    api.request_done("/v1/Sims", "200", 0.1)
    assert "twilio_wireless_api_requests_created{" in generate_latest(registry).decode()
    drop_created_samples()
    assert "_created" not in generate_latest(registry).decode()
