"""End to end: a real Prometheus scraping the exporter, with the shipped rules loaded.

Two sources are scraped, each by its own Prometheus (1 s scrapes and rule evaluations):

* ``exporter``: the simulator (600x accelerated time, a few 429/503 faults) and the exporter
  polling it every 2 s, two SIMs configured with a name and a constant ``site`` label, the rest
  discovered;
* ``demo``: ``twilio-wireless-exporter --demo`` (the README's one-command demo, 600x time). It
  injects no API faults, so the 429 and retry queries may be empty there (they must parse);
* ``fixture``: the sample exposition ``tests/fixtures/sample_metrics.prom`` served over HTTP.

Then every dashboard query (template variables substituted as Grafana would) and every rule
must parse and return data, the rules must be healthy and the target up, and the exporter's
output must pass ``promtool check metrics``. Waits poll with deadlines; nothing sleeps blindly.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.process_support import LISTENING, stop_process, wait_for_log_line
from tests.prom_support import (
    FIXTURE,
    Json,
    Prometheus,
    PromQueryError,
    grafana_query_result_text,
    grafana_regex,
    http_get,
    js_regex,
    load_dashboards,
    load_rules,
    panel_exprs,
    require_tool,
    run,
    substitute,
    variable_exprs,
    wait_for,
    with_bool,
)
from twilio_wireless_exporter.cli import demo_period_start_day

pytestmark = pytest.mark.e2e

JOB = "twilio-wireless"
DATA_DEADLINE = 60.0  # seconds for every query to return data
RATE_INTERVAL = "1m"

# Alerts whose underlying series exist only in the situation they alert on, and how to check
# the rest of their expression instead: (old, new) replacements (of every occurrence), and why.
ALERT_PROBES: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    # 401/403 series appear only after an authentication failure: probe with the 2xx series.
    "TwilioWirelessApiAuthFailure": ((('code=~"401|403"', 'code=~"2.."'),), "no 401/403 happened"),
    # The baseline is an hour old: probe without the offset.
    "TwilioWirelessFleetSessionChurnSpike": (((" offset 1h", ""),), "needs 1h of history"),
    # The baseline week ends a day ago and needs a day's series 8 days ago.
    "TwilioWirelessSimDataUsageSpike": (
        ((" offset 1d", ""), (" offset 8d", "")),
        "needs 8 days of history",
    ),
    # The week of daily use ends 2 days ago and needs a day's series 9 days ago.
    "TwilioWirelessSimDataStopped": (
        ((" offset 2d", ""), (" offset 9d", "")),
        "needs 9 days of history",
    ),
}


@dataclass
class Stack:
    name: str
    prometheus: Prometheus
    instance: str
    metrics_url: str
    logs: list[Path] = field(default_factory=list)
    # Queries containing one of these may return nothing (they must still parse).
    may_be_empty: tuple[str, ...] = ()

    def query(self, expr: str) -> list[Json]:
        return self.prometheus.query(expr)

    def variables(self, sim: str) -> dict[str, str]:
        return {
            "job": grafana_regex([JOB]),
            "instance": grafana_regex([self.instance]),
            "sim": grafana_regex([sim]),
            "__rate_interval": RATE_INTERVAL,
            "__interval": "15s",
            "__range": "5m",
        }

    def log_tail(self) -> str:
        parts = []
        for log in self.logs:
            if log.exists():
                text = log.read_text(errors="replace")
                parts.append(f"--- {log.name}\n{text[-3000:]}")
        return "\n".join(parts)


def require_exporter() -> None:
    if importlib.util.find_spec("twilio_wireless_exporter.cli") is None:
        reason = "the exporter package is not installed (pip install -e .)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


class _Fixture(http.server.BaseHTTPRequestHandler):
    body = FIXTURE.read_bytes()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def fixture_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fixture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``cmd`` (which binds port 0) logging to ``log``; yields the address it logged."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield wait_for_log_line(log, LISTENING, proc, within=20)["url"]
    finally:
        stop_process(proc)


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@contextlib.contextmanager
def exporter_on_simulator(workdir: Path) -> Iterator[tuple[str, list[Path]]]:
    """Simulator + exporter as real processes; yields the exporter's host:port and log files."""
    require_exporter()
    from twilio_wireless_simulator import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN

    python = sys.executable
    sim_log, exp_log = workdir / "simulator.log", workdir / "exporter.log"
    simulator = [
        python,
        "-m",
        "twilio_wireless_exporter",
        "simulate",
        "--listen=127.0.0.1:0",
        "--sims=12",
        "--seed=5",
        "--speed=600",
        "--fault-429=0.05",
        "--retry-after=0.2",
        "--fault-503=0.03",
        "--log-level=info",  # for the "listening on" line with the bound port
    ]
    with process(simulator, sim_log) as sim_url:
        wait_for(lambda: http_get(f"{sim_url}/health", timeout=1), timeout=20, what="simulator")
        # Two SIMs get a configured name and a constant label; discovery finds the rest.
        sims = json.loads(
            wait_for(
                lambda: http_get(
                    f"{sim_url}/v1/Sims?Status=active&PageSize=2",
                    headers=_basic(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN),
                    timeout=2,
                ),
                timeout=10,
                what="the simulator's SIM list",
            )
        )["sims"]
        config = {
            "twilio": {"base_url": sim_url, "timeout": "2s"},
            "poll": {
                "interval": "2s",
                "page_size": 100,
                "concurrency": 8,
                "requests_per_second": 200,
                "max_retries": 3,
                "backoff_initial": "100ms",
                "backoff_max": "1s",
            },
            "sims": [
                {"sid": s["sid"], "name": f"e2e-{i}", "labels": {"site": site}}
                for i, (s, site) in enumerate(zip(sims, ["berlin", "hamburg"], strict=False))
            ],
            # Suspended SIMs too, so that a SIM is seen leaving active.
            "discovery": {
                "enabled": True,
                "status": ["active", "suspended"],
                "refresh_interval": "10s",
            },
            # Usage read every few seconds (the simulator's time runs 600x), split by network
            # so that the roaming panels and alert have their series.
            # The period began days ago: usage is reported a day late (on the 1st of a month
            # a period starting that day has none yet).
            "usage": {
                "interval": "5s",
                "roaming_split": True,
                "period_start_day": demo_period_start_day(time.time()),
            },
        }
        config_file = workdir / "exporter.yaml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        env = {
            **os.environ,
            "TWILIO_ACCOUNT_SID": DEMO_ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": DEMO_AUTH_TOKEN,
        }
        exporter = [
            python,
            "-m",
            "twilio_wireless_exporter",
            f"--config={config_file}",
            "--web.listen-address=127.0.0.1:0",
            "--log.level=info",
        ]
        with process(exporter, exp_log, env=env) as exporter_url:
            address = exporter_url.removeprefix("http://")
            try:
                wait_for(
                    lambda: http_get(f"http://{address}/-/healthy", timeout=1),
                    timeout=20,
                    what="the exporter",
                )
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{exp_log.read_text(errors='replace')}") from exc
            yield address, [sim_log, exp_log]


@contextlib.contextmanager
def exporter_demo(workdir: Path) -> Iterator[tuple[str, list[Path]]]:
    """``twilio-wireless-exporter --demo`` as a real process."""
    require_exporter()
    log = workdir / "demo.log"
    command = [
        sys.executable,
        "-m",
        "twilio_wireless_exporter",
        "--demo",
        "--web.listen-address=127.0.0.1:0",
        "--demo.sims=12",
        "--demo.speed=600",
        "--log.level=info",
    ]
    with process(command, log) as url:
        address = url.removeprefix("http://")
        try:
            wait_for(
                lambda: http_get(f"http://{address}/-/healthy", timeout=1),
                timeout=20,
                what="the demo exporter",
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{log.read_text(errors='replace')}") from exc
        yield address, [log]


NO_FAULTS = ("twilio_wireless_api_retries_total", 'code="429"')


@pytest.fixture(scope="module", params=["exporter", "demo", "fixture"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp(f"e2e-{request.param}")
    with contextlib.ExitStack() as stack:
        may_be_empty: tuple[str, ...] = ()
        if request.param == "exporter":
            address, logs = stack.enter_context(exporter_on_simulator(workdir))
        elif request.param == "demo":
            address, logs = stack.enter_context(exporter_demo(workdir))
            may_be_empty = NO_FAULTS
        else:
            address, logs = stack.enter_context(fixture_server()), []
        prometheus = Prometheus(binary, workdir, {JOB: address})
        prometheus.start()
        stack.callback(prometheus.stop)
        result = Stack(
            request.param,
            prometheus,
            address,
            f"http://{address}/metrics",
            [*logs, prometheus.log],
            may_be_empty,
        )
        # A few scrapes and rule evaluations before the tests look.
        try:
            wait_for(
                lambda: result.query(f'count_over_time(up{{job="{JOB}"}}[1m]) >= 3'),
                timeout=30,
                what="three scrapes",
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{result.log_tail()}") from exc
        yield result


def chosen_sim(stack: Stack) -> str:
    """A SIM with a location, a session and session data, and with usage on a plan with a
    data limit: every SIM panel has data for it.

    Without such a SIM within the deadline, a SIM with the session data is chosen: the usage
    panels then fail with "no data" each, and the other panels are still checked."""
    sel = f'{{job="{JOB}"}}'
    sessions = (
        f"twilio_wireless_sim_cell_latitude_degrees{sel}"
        f" and on (sim_sid) twilio_wireless_sim_session_info{sel}"
        f" and on (sim_sid) twilio_wireless_sim_last_updated_timestamp_seconds{sel}"
    )
    usage = (
        f"({sessions})"
        f" and on (sim_sid) twilio_wireless_sim_data_period_bytes{sel}"
        f" and on (sim_sid) twilio_wireless_sim_commands_total{sel}"
        f" and on (sim_sid) (twilio_wireless_sim_info{sel}"
        f' * on (rate_plan_sid) group_left () twilio_wireless_rate_plan_data_limit_bytes{{job="{JOB}", network="home"}})'
    )

    def first(expr: str) -> str | None:
        series = stack.query(expr)
        return str(sorted(s["metric"]["sim_sid"] for s in series)[0]) if series else None

    fallback = wait_for(lambda: first(sessions), timeout=DATA_DEADLINE, what="a SIM with data")
    try:
        return str(wait_for(lambda: first(usage), timeout=DATA_DEADLINE, what="usage"))
    except TimeoutError:
        return str(fallback)


def run_until_all_return_data(
    stack: Stack, queries: dict[str, str]
) -> tuple[dict[str, list[Json]], dict[str, str]]:
    """Run every query until each returns a series or the deadline passes."""
    results: dict[str, list[Json]] = {}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + DATA_DEADLINE
    pending = dict(queries)
    for where, expr in list(pending.items()):
        if any(marker in expr for marker in stack.may_be_empty):
            try:
                results[where] = stack.query(expr)  # must parse; may be empty
            except PromQueryError as exc:
                errors[where] = f"{exc}\n    {expr}"
            del pending[where]
    while True:
        for where, expr in list(pending.items()):
            try:
                series = stack.query(expr)
            except PromQueryError as exc:
                errors[where] = f"{exc}\n    {expr}"
                del pending[where]
                continue
            if series:
                results[where] = series
                del pending[where]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    errors.update({where: f"no data\n    {expr}" for where, expr in pending.items()})
    return results, errors


def _fail_with(stack: Stack, errors: dict[str, str]) -> None:
    if errors:
        listing = "\n".join(f"{where}: {error}" for where, error in sorted(errors.items()))
        pytest.fail(f"[{stack.name}] {len(errors)} queries failed:\n{listing}", pytrace=False)


def test_target_up_and_rules_healthy(stack: Stack) -> None:
    targets = stack.prometheus.api("targets")["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [(JOB, "up")], targets

    def all_evaluated() -> list[Json] | None:
        groups: list[Json] = stack.prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return groups if rules and all(r["health"] != "unknown" for r in rules) else None

    groups = wait_for(all_evaluated, timeout=20, what="every rule to be evaluated")
    assert {g["name"] for g in groups} == {
        "twilio-wireless.rules",
        "twilio-wireless-usage.rules",
        "twilio-wireless-alerts",
    }
    unhealthy = [
        (r["name"], r["health"], r.get("lastError"))
        for g in groups
        for r in g["rules"]
        if r["health"] != "ok"
    ]
    assert unhealthy == []
    assert sum(len(g["rules"]) for g in groups) == len(load_rules())


def test_promtool_check_metrics_on_the_served_exposition(stack: Stack) -> None:
    promtool = require_tool("promtool")
    exposition = http_get(stack.metrics_url)
    assert "twilio_wireless_sim_info" in exposition
    code, output = run([promtool, "check", "metrics"], stdin=exposition)
    assert (code, output.strip()) == (0, ""), output


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    values = stack.variables(chosen_sim(stack))
    queries = {
        e.where: substitute(e.expr, values)
        for d in load_dashboards().values()
        for e in panel_exprs(d)
    }
    assert len(queries) > 40
    results, errors = run_until_all_return_data(stack, queries)
    # Series that identify a SIM carry its name (joined from twilio_wireless_sim_info).
    for where, series in results.items():
        for s in series:
            labels = s["metric"]
            if "sim_sid" in labels and "display_name" not in labels:
                errors[where] = f"series of SIM {labels['sim_sid']} without display_name"
    _fail_with(stack, errors)


def test_every_variable_query_returns_values(stack: Stack) -> None:
    sim = chosen_sim(stack)
    values = stack.variables(sim)
    errors: dict[str, str] = {}
    for d in load_dashboards().values():
        for var, expr, label in variable_exprs(d):
            where = f"{d['uid']}: variable {var['name']}"
            assert expr is not None or label is not None, where
            if expr is None:  # label_values(label): every value of the label
                found = stack.prometheus.api(f"label/{label}/values")
                if not found:
                    errors[where] = f"no values of label {label}"
                continue
            series = stack.query(substitute(expr, values))
            if label is not None:
                found = sorted({s["metric"].get(label, "") for s in series} - {""})
                expected = {"job": [JOB], "instance": [stack.instance]}.get(label)
                if not found or (expected and found != expected):
                    errors[where] = f"values {found}, expected {expected or 'some'}"
                continue
            regex = js_regex(var.get("regex") or "/.*/")
            options = [
                m.groupdict() for s in series if (m := regex.search(grafana_query_result_text(s)))
            ]
            if var["name"] == "sim":
                names = {o["value"]: o["text"] for o in options}
                if sim not in names or not all(names.values()):
                    errors[where] = f"options {names} lack a name for {sim}"
            elif not options:
                errors[where] = "no options"
    _fail_with(stack, errors)


def test_every_rule_expression_returns_data(stack: Stack) -> None:
    queries: dict[str, str] = {}
    for _, rule in load_rules():
        if "record" in rule:
            queries[f"record {rule['record']}"] = rule["expr"]
            queries[f"recorded series {rule['record']}"] = rule["record"]
            continue
        expr = rule["expr"]
        # Alerts are (rightly) silent here: check the expression with its comparisons turned
        # into `bool` ones, which keep every series the alert looks at.
        probe = ALERT_PROBES.get(rule["alert"])
        if probe:
            replacements, _why = probe
            queries[f"alert {rule['alert']} (as written)"] = f"({expr}) or vector(1)"
            for old, new in replacements:
                assert old in expr, (rule["alert"], old)
                expr = expr.replace(old, new)
        queries[f"alert {rule['alert']}"] = with_bool(expr)
    _results, errors = run_until_all_return_data(stack, queries)
    _fail_with(stack, errors)


# What the demo (and the exporter on the simulator) must show within a minute of start:
# non-zero usage, plan limits and statuses (issue 11). The fixture serves them too.
USAGE_SHOWN = {
    "usage this period": 'sum(twilio_wireless_sim_data_period_bytes{direction="total"}) > 0',
    "usage reported since start": "sum(twilio_wireless_sim_data_bytes_total) > 0",
    "usage read": "count(twilio_wireless_sim_usage_last_success_timestamp_seconds) > 0",
    "commands": "count(twilio_wireless_sim_commands_total) > 0",
    "account usage": "count(twilio_wireless_account_data_bytes_total) > 0",
    "rate plans": "count(twilio_wireless_rate_plan_info) > 0",
    "a home data limit": 'count(twilio_wireless_rate_plan_data_limit_bytes{network="home"}) > 0',
    "SIMs by status": "sum(twilio_wireless_sims) > 0",
    "a SIM on a plan with a limit": (
        "count(sim:twilio_wireless_sim_data_period_bytes_per_home_limit:ratio > 0) > 0"
    ),
    "roaming split": (
        'count(twilio_wireless_sim_data_period_bytes{network=~"home|national_roaming|'
        'international_roaming"}) > 0'
    ),
}


def test_usage_plans_and_statuses_show_within_a_minute(stack: Stack) -> None:
    _results, errors = run_until_all_return_data(stack, dict(USAGE_SHOWN))
    _fail_with(stack, errors)


def test_alerts_api_answers(stack: Stack) -> None:
    alerts = stack.prometheus.api("alerts")["alerts"]
    known = {rule["alert"] for _, rule in load_rules() if "alert" in rule}
    assert {a["labels"]["alertname"] for a in alerts} <= known
