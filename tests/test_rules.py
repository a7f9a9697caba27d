"""The alerting and recording rules: conventions, ``promtool check rules``, ``promtool test rules``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prom_support import (
    ALERTS_DIR,
    RULE_FILES,
    RULE_TEST_FILES,
    contract_base,
    load_dashboards,
    load_rules,
    panel_exprs,
    require_tool,
    run,
    scan,
    unknown_labels,
    variable_exprs,
)
from twilio_wireless_exporter import metrics_names

SEVERITIES = {"critical", "warning", "info"}
# A description must tell the reader what to do: at least one of these imperative verbs.
ACTIONS = re.compile(
    r"\b(check|open|read|fix|lower|raise|update|restart|suspend|verify|shard|replace)\b", re.I
)
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
ALERT_NAME = re.compile(r"^TwilioWireless(?:[A-Z][a-z0-9]*)+$")
SIM_NAME_TEMPLATE = "or $labels.sim_name $labels.unique_name $labels.friendly_name $labels.sim_sid"
RUNBOOKS = "docs/dashboards-and-alerts.md"


def alert_problems(rule: dict[str, Any]) -> list[str]:
    """Convention problems of one alerting rule (empty when it follows them)."""
    name = str(rule.get("alert", ""))
    problems: list[str] = []
    if not ALERT_NAME.match(name):
        problems.append(f"{name}: not a CamelCase TwilioWireless... name")
    labels = rule.get("labels") or {}
    if labels.get("severity") not in SEVERITIES:
        problems.append(f"{name}: severity label must be one of {sorted(SEVERITIES)}")
    annotations = rule.get("annotations") or {}
    for key in ("summary", "description", "runbook_url"):
        if not str(annotations.get(key, "")).strip():
            problems.append(f"{name}: no {key} annotation")
    description = str(annotations.get("description", ""))
    if not ACTIONS.search(description):
        problems.append(f"{name}: description does not say what to do")
    if len(re.findall(r"[.:;]\s", description + " ")) < 2:
        problems.append(f"{name}: description is not a short runbook (what happened, what to do)")
    expr = str(rule.get("expr", ""))
    per_sim = any(sel.name.startswith("twilio_wireless_sim_") for sel in scan(expr).selectors)
    if per_sim:
        if "group_left" not in expr or "twilio_wireless_sim_info" not in expr:
            problems.append(f"{name}: per-SIM alert does not join twilio_wireless_sim_info")
        for key in ("summary", "description"):
            if SIM_NAME_TEMPLATE not in str(annotations.get(key, "")):
                problems.append(f"{name}: {key} does not name the SIM")
    return problems


def test_alerts_follow_conventions() -> None:
    alerts = [rule for _, rule in load_rules() if "alert" in rule]
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert {
        "TwilioWirelessSimSessionChurnHigh",
        "TwilioWirelessFleetSessionChurnSpike",
        "TwilioWirelessSimOffline",
        "TwilioWirelessSimDown",
        "TwilioWirelessApiAuthFailure",
        "TwilioWirelessApiErrors",
        "TwilioWirelessPollStale",
        "TwilioWirelessSimImeiChanged",
        "TwilioWirelessShardMissing",
        "TwilioWirelessSimDataLimitNear",
        "TwilioWirelessSimDataLimitReached",
        "TwilioWirelessSimRoamingNotAllowed",
        "TwilioWirelessSimDataUsageSpike",
        "TwilioWirelessSimDataStopped",
        "TwilioWirelessSimLeftActive",
    } <= set(names)
    problems = [p for rule in alerts for p in alert_problems(rule)]
    assert problems == []


def test_auth_failure_pages_at_once() -> None:
    rule = next(r for _, r in load_rules() if r.get("alert") == "TwilioWirelessApiAuthFailure")
    assert rule["labels"]["severity"] == "critical"
    assert rule.get("for") in (None, "0s", "0m")
    assert "401|403" in rule["expr"]


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ({"alert": "twilio_sim_down"}, "CamelCase"),
        ({"labels": {}}, "severity"),
        ({"labels": {"severity": "page"}}, "severity"),
        ({"annotations": {"summary": "x", "runbook_url": "y"}}, "no description"),
        (
            {
                "annotations": {
                    "summary": "x",
                    "description": "It is down. Bad.",
                    "runbook_url": "y",
                }
            },
            "what to do",
        ),
        ({"expr": "twilio_wireless_sim_up == 0"}, "does not join"),
    ],
)
def test_convention_check_catches_problems(mutation: dict[str, Any], expected: str) -> None:
    rule = next(r for _, r in load_rules() if r.get("alert") == "TwilioWirelessSimDown")
    assert alert_problems(rule) == []
    broken = {**rule, **mutation}
    assert any(expected in p for p in alert_problems(broken)), alert_problems(broken)


def test_recording_rules_follow_naming() -> None:
    records = [rule["record"] for _, rule in load_rules() if "record" in rule]
    assert records
    for name in records:
        assert RECORD_NAME.match(name), f"{name}: not level:metric:operations"
        assert not name.split(":")[1].endswith("_total"), f"{name}: drop _total after rate()"


def test_rules_use_only_contract_or_recorded_metrics() -> None:
    recorded = {rule["record"] for _, rule in load_rules() if "record" in rule}
    unknown = {
        sel.name
        for _, rule in load_rules()
        for sel in scan(rule["expr"]).selectors
        if contract_base(sel.name) is None and sel.name not in recorded
    }
    assert unknown == set()


def recorded_names() -> set[str]:
    return {rule["record"] for _, rule in load_rules() if "record" in rule}


def undeclared(exprs: list[tuple[str, str]]) -> dict[str, set[str]]:
    """Series read by ``(where, PromQL)`` pairs that neither the exporter exposes (per
    ``metrics_names``) nor a recording rule records: where -> names."""
    recorded = recorded_names()
    found: dict[str, set[str]] = {}
    for where, expr in exprs:
        for sel in scan(expr).selectors:
            if metrics_names.family_of(sel.name) is None and sel.name not in recorded:
                found.setdefault(where, set()).add(sel.name)
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    exprs: list[tuple[str, str]] = []
    for name, dashboard in load_dashboards().items():
        exprs += [(e.where, e.expr) for e in panel_exprs(dashboard)]
        exprs += [(f"{name}: ${var['name']}", q) for var, q, _ in variable_exprs(dashboard) if q]
    return exprs


def test_every_metric_the_rules_read_is_declared_in_metrics_names() -> None:
    rules = [(rule.get("alert") or rule["record"], rule["expr"]) for _, rule in load_rules()]
    assert rules
    assert undeclared(rules) == {}


def test_every_metric_the_dashboards_read_is_declared_in_metrics_names() -> None:
    exprs = dashboard_exprs()
    read = {sel.name for _, expr in exprs for sel in scan(expr).selectors}
    assert metrics_names.BUILD_INFO.sample in read  # the variables are scanned too
    assert undeclared(exprs) == {}


def test_every_series_the_rule_unit_tests_feed_is_declared_in_metrics_names() -> None:
    """A unit test fed a metric the exporter does not expose would test a rule that cannot
    fire."""
    fed: set[str] = set()
    for path in RULE_TEST_FILES:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for test in doc["tests"]:
            for series in test.get("input_series", []):
                fed.add(re.split(r"[{\s]", series["series"], maxsplit=1)[0])
    assert fed
    assert {name for name in fed if metrics_names.family_of(name) is None} == set()


def test_the_name_check_catches_an_undeclared_metric() -> None:
    assert undeclared([("q", "rate(twilio_wireless_sim_online_total[5m])")]) == {
        "q": {"twilio_wireless_sim_online_total"}
    }
    # a family name is not a series name: a counter is read as ..._total
    assert undeclared([("q", "twilio_wireless_sim_data_sessions_started")]) == {
        "q": {"twilio_wireless_sim_data_sessions_started"}
    }
    assert undeclared([("q", "sum(twilio_wireless_sim_up) or job:x:y")]) == {"q": {"job:x:y"}}


def test_rules_use_only_known_labels() -> None:
    for _, rule in load_rules():
        name = rule.get("alert") or rule.get("record")
        assert unknown_labels(rule["expr"]) == set(), name
        templates = " ".join(str(v) for v in (rule.get("annotations") or {}).values())
        used = set(re.findall(r"\$labels\.(\w+)", templates))
        assert unknown_labels(" ".join(f"by ({label})" for label in used)) == set(), name


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TEST_FILES:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {rule["alert"] for _, rule in load_rules() if "alert" in rule}
    assert alerts - fired == set(), "alerts without a unit test in which they fire"
    assert alerts - silent == set(), "alerts without a unit test in which they stay silent"


def test_runbook_urls_point_at_the_alerts_runbook_section() -> None:
    """Every alert links its own section of the runbooks page (test_docs checks the anchor)."""
    for _, rule in load_rules():
        if "alert" not in rule:
            continue
        url = rule["annotations"]["runbook_url"]
        assert url == f"{RUNBOOKS}#{rule['alert'].lower()}", url


@pytest.mark.e2e
def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    code, output = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert code == 0, output
    assert "SUCCESS" in output
    assert "WARNING" not in output.upper(), output


@pytest.mark.e2e
def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    assert RULE_TEST_FILES
    code, output = run([promtool, "test", "rules", *map(str, RULE_TEST_FILES)])
    assert code == 0, output


ALERTS_FILE = "twilio-wireless-alerts.yaml"
RECORDING_FILE = "twilio-wireless-recording.yaml"


def affected_alerts(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> set[str]:
    """The alerts a change of the rules (``before`` -> ``after``) can alter: those whose rule
    changed, and those that read a changed recorded series (through other recorded series)."""
    old = {rule.get("alert") or rule["record"]: rule for rule in before}
    changed = {
        rule.get("alert") or rule["record"]
        for rule in after
        if old.get(rule.get("alert") or rule["record"]) != rule
    }
    grew = True
    while grew:
        readers = {
            rule.get("alert") or rule["record"]
            for rule in after
            if any(sel.name in changed for sel in scan(rule["expr"]).selectors)
        }
        grew = not readers <= changed
        changed |= readers
    return {rule["alert"] for rule in after if "alert" in rule and rule["alert"] in changed}


def _rules_in(folder: Path) -> list[dict[str, Any]]:
    """Every rule of the rule files in ``folder``."""
    rules: list[dict[str, Any]] = []
    for name in (RECORDING_FILE, ALERTS_FILE):
        doc = yaml.safe_load((folder / name).read_text(encoding="utf-8"))
        rules += [rule for group in doc["groups"] for rule in group["rules"]]
    return rules


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        (ALERTS_FILE, "started_total[1h]) > 12", "started_total[1h]) > 120"),  # churn threshold
        (ALERTS_FILE, "> 21600", "> 86400"),  # offline after a day instead of 6 hours
        (ALERTS_FILE, "(twilio_wireless_sim_up == 0)", "(twilio_wireless_sim_up == 2)"),  # never
        (ALERTS_FILE, 'code=~"401|403"', 'code=~"401"'),  # 403 no longer counts
        # stale after one poll interval instead of three
        (
            ALERTS_FILE,
            "3 * twilio_wireless_poll_interval_seconds",
            "1 * twilio_wireless_poll_interval_seconds",
        ),
        (ALERTS_FILE, "poll_interval_seconds, 900)", "poll_interval_seconds, 300)"),  # no floor
        (ALERTS_FILE, "or on (job, instance)", "or"),  # the fallback duplicates a threshold
        # replicas of one shard counted as shards: an HA fleet missing a shard stays silent
        (
            ALERTS_FILE,
            "count by (job) (count by (job, index) (twilio_wireless_exporter_shards))",
            "count by (job) (twilio_wireless_exporter_shards)",
        ),
        (ALERTS_FILE, "          > 0\n        for: 10m", "          >= 0\n        for: 10m"),
        (ALERTS_FILE, "        for: 10m", "        for: 1m"),  # a missing shard pages at once
        (ALERTS_FILE, "ratio >= 0.8 < 1", "ratio >= 0.9 < 1"),  # 85 % no longer near
        (ALERTS_FILE, "ratio >= 1\n", "ratio > 1.2\n"),  # 110 % not yet reached
        # roaming bytes counted against the home limit: 85 % + 30 % is reached, not near
        (RECORDING_FILE, 'network=~"home|"', 'network=~".*"'),
        # plans matched by instance: SIMs of the shards that do not read the plans never alert
        (RECORDING_FILE, "/ on (job, rate_plan_sid)", "/ on (job, instance, rate_plan_sid)"),
        (
            ALERTS_FILE,
            "and on (job, rate_plan_sid, network)",
            "and on (job, instance, rate_plan_sid, network)",
        ),
        # roaming is held against plans whose roaming limit is not 0
        (ALERTS_FILE, 'international_roaming"} == 0', 'international_roaming"} >= 0'),
        # national roaming is held against plans that allow it
        (
            ALERTS_FILE,
            'national_roaming_enabled="false"',
            'national_roaming_enabled=~"true|false"',
        ),
        (ALERTS_FILE, '!~"active|"', '!~""'),  # a reactivated SIM "left active"
        (ALERTS_FILE, "status_changes_total[1h]) > 0", "status_changes_total[1d]) > 0"),
        (ALERTS_FILE, ">= 5 * sim:", ">= 3 * sim:"),  # a 4x day is a spike
        # without the history guard a SIM younger than the baseline week spikes
        (ALERTS_FILE, "increase1d offset 8d", "increase1d offset 1d"),
        # one quiet day (which the usage lag explains) counts as stopped
        (ALERTS_FILE, "increase1d[1d]) == 0", "increase1d[1h]) == 0"),
        # a week with a gap counts as daily
        (ALERTS_FILE, "(min_over_time(sim:", "(avg_over_time(sim:"),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, file: str, old: str, new: str) -> None:
    """The promtool unit tests fail when a rule is changed (they can fail). Only the test files
    that test an alert the change can alter run (the others would pass)."""
    promtool = require_tool("promtool")
    shutil.copytree(ALERTS_DIR, tmp_path / "alerts")
    target = tmp_path / "alerts" / file
    text = target.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    before = _rules_in(target.parent)
    target.write_text(text.replace(old, new), encoding="utf-8")
    alerts = affected_alerts(before, _rules_in(target.parent))
    assert alerts, f"{old!r} changes no alert"
    tests = [
        path
        for path in sorted((tmp_path / "alerts" / "tests").glob("*.yaml"))
        if any(f"alertname: {alert}\n" in path.read_text(encoding="utf-8") for alert in alerts)
    ]
    assert tests, f"no unit test tests {sorted(alerts)}"
    code, output = run([promtool, "test", "rules", *map(str, tests)])
    assert code != 0, output
    assert "FAILED" in output


def test_affected_alerts_follow_recorded_series() -> None:
    rules = [rule for _, rule in load_rules()]
    changed = [
        {**rule, "expr": rule["expr"] + " * 2"}
        if rule.get("record") == "sim:twilio_wireless_sim_data_bytes:increase1d"
        else rule
        for rule in rules
    ]
    assert affected_alerts(rules, changed) == {
        "TwilioWirelessSimDataUsageSpike",
        "TwilioWirelessSimDataStopped",
    }
    assert affected_alerts(rules, rules) == set()
