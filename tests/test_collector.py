"""Exposition of the fleet state: exact values, absent data, escaping, promtool."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest
from prometheus_client import generate_latest

from tests.fleet_support import SID_A, SID_B, T0, polled_state, session
from tests.metrics_support import parse_samples as samples
from tests.metrics_support import sample_value as value
from twilio_wireless_exporter.exposition.collector import build_registry
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.accounting import apply_listing
from twilio_wireless_exporter.fleet.state import FleetState

Render = Callable[..., str]


def reference_render(state: FleetState, *, imei_label: bool = False) -> str:
    registry, _ = build_registry(state, imei_label=imei_label)
    return generate_latest(registry).decode()


def incremental_render(state: FleetState, *, imei_label: bool = False) -> str:
    registry, _ = build_registry(state, imei_label=imei_label)
    return Exposition(state, registry, imei_label=imei_label).text().decode()


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
    cached = [
        h
        for h in helps
        if "sim_up " not in h and "last_poll_success" not in h and "sim_info" not in h
    ]
    assert all("Cached from the exporter's latest poll" in h for h in cached)


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
