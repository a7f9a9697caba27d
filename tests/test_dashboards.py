"""The Grafana dashboards: generated output up to date, and the dashboard-linter rules."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.prom_support import (
    CONTRACT,
    DASHBOARD_DIR,
    FIXTURE,
    GRAFANA,
    Json,
    contract_base,
    lint_dashboard,
    lint_expr,
    load_dashboards,
    load_rules,
    panel_exprs,
    panels_of,
    require_tool,
    run,
    scan,
    variable_exprs,
)
from twilio_wireless_exporter import metrics_names

UIDS = {
    "twilio-wireless-fleet.json": "twilio-wireless-fleet",
    "twilio-wireless-sim.json": "twilio-wireless-sim",
}
TITLES = {
    "twilio-wireless-fleet.json": "Twilio Wireless / Fleet overview",
    "twilio-wireless-sim.json": "Twilio Wireless / SIM detail",
}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, Json]:
    return load_dashboards()


def test_committed_json_is_the_generator_output() -> None:
    rendered: dict[str, str] = generator().rendered()
    committed = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARD_DIR.glob("*.json")}
    assert set(committed) == set(rendered) == set(UIDS)
    for name, text in rendered.items():
        assert committed[name] == text, f"{name} is stale: run python3 grafana/generate.py"


def test_the_generator_takes_its_metric_names_from_metrics_names() -> None:
    module = generator()
    assert module.names is metrics_names
    assert metrics_names.SIM_UP.sample == module.SIM_UP
    assert metrics_names.API_REQUEST_DURATION.bucket == module.REQUEST_DURATION_BUCKET


def test_the_generator_runs_without_the_exporter_installed(tmp_path: Path) -> None:
    """``python3 grafana/generate.py`` from a fresh clone: metrics_names is found next to it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-S", str(GRAFANA / "generate.py"), "--check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(UIDS))
def test_dashboard_follows_the_linter_rules(name: str) -> None:
    d = dashboards()[name]
    assert lint_dashboard(d, uid=UIDS[name]) == []
    assert d["title"] == TITLES[name]
    assert d["schemaVersion"] >= 36
    assert d.get("id") is None, "provisioned dashboards carry no numeric id"


def test_every_panel_query_and_variable_uses_the_datasource_variable() -> None:
    for d in dashboards().values():
        for p in panels_of(d):
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"]
        for var, _, _ in variable_exprs(d):
            assert var["datasource"]["uid"] == "${datasource}"


def test_dashboards_cover_the_issue() -> None:
    """The panels the issue asks for, by the metrics they read."""
    fleet = dashboards()["twilio-wireless-fleet.json"]
    sim = dashboards()["twilio-wireless-sim.json"]

    def metrics(d: Json) -> set[str]:
        return {
            contract_base(sel.name) or sel.name
            for e in panel_exprs(d)
            for sel in scan(e.expr).selectors
        }

    # Everything but per-SIM details (SIM dashboard), build info (the job/instance variables) and
    # the shard count (read by the shard alert).
    assert set(CONTRACT) - metrics(fleet) <= {
        "twilio_wireless_sim_imei_changes_total",
        "twilio_wireless_sim_last_updated_timestamp_seconds",
        "twilio_wireless_exporter_build_info",
        "twilio_wireless_exporter_shards",
        "twilio_wireless_sim_data_period_start_timestamp_seconds",
        "twilio_wireless_sim_status_changes_total",
    }
    assert {
        "twilio_wireless_sim_data_sessions_open",
        "twilio_wireless_sim_data_sessions_started_total",
        "twilio_wireless_sim_data_sessions_ended_total",
        "twilio_wireless_sim_packets_uploaded_total",
        "twilio_wireless_sim_packets_downloaded_total",
        "twilio_wireless_sim_session_info",
        "twilio_wireless_sim_cell_latitude_degrees",
        "twilio_wireless_sim_cell_longitude_degrees",
        "twilio_wireless_sim_imei_changes_total",
        "twilio_wireless_sim_up",
        "twilio_wireless_sim_last_poll_success_timestamp_seconds",
        "twilio_wireless_sim_data_bytes_total",
        "twilio_wireless_sim_data_period_bytes",
        "twilio_wireless_sim_data_period_start_timestamp_seconds",
        "twilio_wireless_sim_commands_total",
        "twilio_wireless_sim_usage_last_success_timestamp_seconds",
        "twilio_wireless_sim_status_changes_total",
        "twilio_wireless_sim_connectivity_reset_in_progress",
        "twilio_wireless_rate_plan_data_limit_bytes",
    } <= metrics(sim)
    for d in (fleet, sim):
        geomaps = [p for p in panels_of(d) if p["type"] == "geomap"]
        assert len(geomaps) == 1
        layer = geomaps[0]["options"]["layers"][0]
        assert layer["location"] == {
            "mode": "coords",
            "latitude": "latitude",
            "longitude": "longitude",
        }
        rename = geomaps[0]["transformations"][-1]["options"]["renameByName"]
        assert set(rename.values()) == {"latitude", "longitude"}
        assert all(t["instant"] and t["format"] == "table" for t in geomaps[0]["targets"])
    assert any(p["type"] == "heatmap" for p in panels_of(fleet))


def _panel_titled(d: Json, title: str) -> Json:
    return next(p for p in panels_of(d) if p.get("title") == title)


def _exprs(p: Json) -> list[str]:
    return [str(t["expr"]) for t in p["targets"]]


def test_dashboards_cover_data_usage() -> None:
    """Issue 11's panels: what each reads, and how it shows it."""
    fleet = dashboards()["twilio-wireless-fleet.json"]
    sim = dashboards()["twilio-wireless-sim.json"]
    for d, title in (
        (fleet, "Data reported per day, monitored SIMs"),
        (fleet, "Data reported per day, whole account"),
        (sim, "Data reported per day"),
    ):
        p = _panel_titled(d, title)
        assert (p["interval"], p["timeFrom"]) == ("1d", "14d"), title
        assert p["fieldConfig"]["defaults"]["custom"]["drawStyle"] == "bars", title
        assert p["fieldConfig"]["defaults"]["unit"] == "bytes", title
        (expr,) = _exprs(p)
        assert "increase(twilio_wireless_" in expr, title
        assert "_data_bytes_total{" in expr, title
        assert p["targets"][0]["legendFormat"] == "{{direction}}", title
    top = _panel_titled(fleet, "Top 10 SIMs by data this period")
    assert top["type"] == "bargauge"
    assert all(t["instant"] for t in top["targets"])
    assert (
        "topk(10, sum without (network, direction) (twilio_wireless_sim_data_period_bytes{"
        in (_exprs(top)[0])
    )
    share = _panel_titled(fleet, "SIMs by share of their plan's data limit (top 50)")
    assert share["type"] == "table"
    assert share["options"]["sortBy"] == [{"displayName": "Share of limit", "desc": True}]
    assert all(t["instant"] and t["format"] == "table" for t in share["targets"])
    for expr in _exprs(share):
        assert (
            'twilio_wireless_rate_plan_data_limit_bytes{job=~"$job", instance=~"$instance", '
            in (expr)
        )
        assert 'network="home"}' in expr
        assert "twilio_wireless_rate_plan_info" in expr  # the plan's name
    roaming = _panel_titled(fleet, "Data this period by network")
    assert "sum by (network) (twilio_wireless_sim_data_period_bytes{" in _exprs(roaming)[0]
    roamers = _panel_titled(fleet, "Top 10 SIMs by roaming data this period")
    assert 'network=~"national_roaming|international_roaming"' in _exprs(roamers)[0]
    status = _panel_titled(fleet, "SIMs by status")
    assert _exprs(status) == [
        'sum by (status) (twilio_wireless_sims{job=~"$job", instance=~"$instance"})'
    ]
    against = _panel_titled(sim, "Data this period against the limit")
    assert [t["legendFormat"] for t in against["targets"]] == [
        "used this period",
        "home data limit",
    ]
    assert "twilio_wireless_rate_plan_data_limit_bytes" in _exprs(against)[1]
    percent = _panel_titled(sim, "Share of the plan's data limit")
    assert percent["fieldConfig"]["defaults"]["unit"] == "percentunit"
    steps = percent["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 0.8, 1]
    commands = _panel_titled(sim, "Commands")
    assert "increase(twilio_wireless_sim_commands_total{" in _exprs(commands)[0]


def test_the_dashboards_share_of_the_limit_is_the_recording_rules() -> None:
    """The panels compute the share of the plan's limit themselves (they work without the
    rules); it must be the recorded series the alerts read."""
    rule = next(
        r
        for _, r in load_rules()
        if r.get("record") == "sim:twilio_wireless_sim_data_period_bytes_per_home_limit:ratio"
    )

    def canonical(expr: str) -> str:
        expr = expr.replace('job=~"$job", instance=~"$instance"', "")
        expr = expr.replace("{, ", "{").replace("{}", "")
        return re.sub(r"[\s()]", "", expr)

    assert canonical(generator().limit_share()) == canonical(rule["expr"])
    assert canonical(generator().limit_share()) != canonical(rule["expr"].replace("home|", "home"))


def test_rate_plans_are_joined_by_job_not_instance() -> None:
    """Only shard 0 reads the rate plans, so a plan's series come from its instance alone: a
    join on the instance would leave the SIMs of every other shard without their plan."""
    joins = [
        (title, expr)
        for d in dashboards().values()
        for title, p in ((p.get("title"), p) for p in d["panels"] if "targets" in p)
        for expr in _exprs(p)
        if "rate_plan_sid" in expr
    ]
    assert joins
    for title, expr in joins:
        assert "instance, rate_plan_sid)" not in expr, title


def test_sim_variable_shows_the_name_and_keeps_the_sid() -> None:
    sim = dashboards()["twilio-wireless-sim.json"]
    var = next(v for v in sim["templating"]["list"] if v["name"] == "sim")
    assert var["multi"] is False
    assert var["includeAll"] is False
    assert "twilio_wireless_sim_info" in var["query"]
    # What Grafana gets back from query_result() for one series (labels sorted by Prometheus).
    rendered = (
        'twilio_wireless_sim_info{display_name="pump-17",friendly_name="Pump 17",'
        'instance="exp:10311",job="tw",sim_name="pump-17",sim_sid="DE0123",status="active"}'
        " 1 1700000000000"
    )
    pattern = var["regex"]
    assert pattern.startswith("/")
    assert pattern.endswith("/")
    match = re.search(pattern[1:-1].replace("(?<", "(?P<"), rendered)
    assert match
    assert match.groupdict() == {"text": "pump-17", "value": "DE0123"}


def test_per_sim_queries_filter_on_the_sim_variable() -> None:
    sim = dashboards()["twilio-wireless-sim.json"]
    for e in panel_exprs(sim):
        for sel in scan(e.expr).selectors:
            if sel.name.startswith("twilio_wireless_sim_"):
                assert sel.matchers.get("sim_sid") == ("=~", "$sim"), (e.where, sel.name)


def test_fixture_follows_the_contract() -> None:
    """The sample exposition used in tests serves every contract metric with its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(FIXTURE.read_text())}
    for name, (kind, labels) in CONTRACT.items():
        family_name = name.removesuffix("_total") if kind == "counter" else name
        assert family_name in families, name
        family = families[family_name]
        assert family.type == kind, name
        for sample in family.samples:
            assert labels <= set(sample.labels), (name, sample.labels)


def test_fixture_families_are_declared_in_metrics_names() -> None:
    """The sample exposition serves only families the exporter exposes, with their types."""
    from prometheus_client.parser import text_string_to_metric_families

    declared = {family.name: family for family in metrics_names.ALL}
    served = list(text_string_to_metric_families(FIXTURE.read_text()))
    assert served
    for family in served:
        assert family.name in declared, family.name
        assert family.type == declared[family.name].kind, family.name


@pytest.mark.e2e
def test_fixture_passes_promtool_check_metrics() -> None:
    promtool = require_tool("promtool")
    code, output = run([promtool, "check", "metrics"], stdin=FIXTURE.read_text())
    assert code == 0, output
    assert output.strip() == ""


# --- the checks can fail ---------------------------------------------------------------------


def _first_target(d: Json, kind: str = "timeseries") -> Json:
    panel = next(p for p in panels_of(d) if p["type"] == kind)
    target: Json = panel["targets"][0]
    return target


def _panel(d: Json, kind: str = "timeseries") -> Json:
    return next(p for p in panels_of(d) if p["type"] == kind)


def _set_expr(expr: str) -> Callable[[Json], None]:
    def mutate(d: Json) -> None:
        _first_target(d)["expr"] = expr

    return mutate


BROKEN: dict[str, tuple[Callable[[Json], Any], str]] = {
    "counter without rate": (
        _set_expr(
            'sum(twilio_wireless_sim_data_sessions_started_total{job=~"$job", instance=~"$instance"})'
        ),
        "outside rate()",
    ),
    "fixed rate window": (
        _set_expr(
            'sum(rate(twilio_wireless_api_requests_total{job=~"$job", instance=~"$instance"}[5m]))'
        ),
        "over [5m]",
    ),
    "irate": (
        _set_expr(
            "sum(irate(twilio_wireless_api_requests_total"
            '{job=~"$job", instance=~"$instance"}[$__rate_interval]))'
        ),
        "outside rate()",
    ),
    "histogram bucket without rate": (
        _set_expr(
            "histogram_quantile(0.5, sum by (le) (twilio_wireless_api_request_duration_seconds_bucket"
            '{job=~"$job", instance=~"$instance"}))'
        ),
        "outside rate()",
    ),
    "no job matcher": (
        _set_expr('sum(twilio_wireless_sim_up{instance=~"$instance"})'),
        "lacks job",
    ),
    "no instance matcher in a join": (
        _set_expr(
            'twilio_wireless_sim_up{job=~"$job", instance=~"$instance"} * on (sim_sid) '
            'group_left (sim_name) twilio_wireless_sim_info{job=~"$job"}'
        ),
        "lacks instance",
    ),
    "unknown metric": (
        _set_expr('sum(twilio_wireless_sim_online{job=~"$job", instance=~"$instance"})'),
        "not in the metric contract",
    ),
    "SIM list without names": (
        _set_expr(
            "topk(5, rate(twilio_wireless_sim_data_sessions_started_total"
            '{job=~"$job", instance=~"$instance"}[$__rate_interval]))'
        ),
        "without joining",
    ),
    "unknown label": (
        _set_expr(
            "sum by (radio_lnk) (twilio_wireless_sim_session_info"
            '{job=~"$job", instance=~"$instance"})'
        ),
        "unknown label radio_lnk",
    ),
    "unknown legend label": (
        lambda d: _first_target(d).update(legendFormat="{{operator}}"),
        "unknown label operator",
    ),
    "graph panel": (lambda d: _panel(d).update(type="graph"), "graph panel"),
    "no unit": (lambda d: _panel(d)["fieldConfig"]["defaults"].pop("unit"), "no unit"),
    "no description": (lambda d: _panel(d).update(description=""), "no description"),
    "fixed datasource": (
        lambda d: _panel(d).update(datasource={"type": "prometheus", "uid": "P1234"}),
        "datasource is not",
    ),
    "job not multi": (
        lambda d: next(v for v in d["templating"]["list"] if v["name"] == "job").update(
            multi=False
        ),
        "multi-value",
    ),
    "instance variable ignores job": (
        lambda d: next(v for v in d["templating"]["list"] if v["name"] == "instance").update(
            query="label_values(twilio_wireless_exporter_build_info, instance)"
        ),
        "lacks job",
    ),
    "old schema": (lambda d: d.update(schemaVersion=27), "schemaVersion"),
    "uid changed": (lambda d: d.update(uid="abc123"), "stable"),
    "overlapping panels": (
        lambda d: _panel(d, "stat")["gridPos"].update(x=0, y=0, w=24),
        "overlaps",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_linter_catches(case: str) -> None:
    mutate, expected = BROKEN[case]
    d = copy.deepcopy(dashboards()["twilio-wireless-fleet.json"])
    mutate(d)
    problems = lint_dashboard(d, uid="twilio-wireless-fleet")
    assert any(expected in p for p in problems), problems


def test_lint_expr_accepts_good_queries() -> None:
    sel = 'job=~"$job", instance=~"$instance"'
    good = [
        f"sum(rate(twilio_wireless_api_requests_total{{{sel}}}[$__rate_interval]))",
        f"sum by (le) (increase(twilio_wireless_data_session_duration_seconds_bucket{{{sel}}}"
        "[$__rate_interval]))",
        f"time() - twilio_wireless_sim_last_poll_success_timestamp_seconds{{{sel}}}",
        f'label_replace(twilio_wireless_sim_info{{{sel}}}, "x", "$1", "sim_name", "(.+)")',
    ]
    for expr in good:
        assert lint_expr("q", expr) == [], expr
