"""Helpers for the dashboard, rule and end-to-end Prometheus tests.

* the metric contract (issue "Core exporter", table "Metric contract");
* a small PromQL scanner: metric selectors with their matchers, ranges and enclosing function;
* the dashboard linter (the Grafana dashboard-linter rules this project follows);
* finding ``prometheus``/``promtool`` (skip outside CI, fail in CI);
* a throw-away Prometheus server for the end-to-end tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.process_support import stop_process, wait_for_log_line

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
ALERTS_DIR = GRAFANA / "alerts"
RULE_FILES = [
    ALERTS_DIR / "twilio-wireless-recording.yaml",
    ALERTS_DIR / "twilio-wireless-alerts.yaml",
]
RULE_TEST_FILES = sorted((ALERTS_DIR / "tests").glob("*.yaml"))
FIXTURE = REPO / "tests" / "fixtures" / "sample_metrics.prom"

Json = dict[str, Any]

# --------------------------------------------------------------------------------------------
# The metric contract: name -> (type, labels besides the user's constant labels)

CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    "twilio_wireless_sim_info": (
        "gauge",
        frozenset(
            {"sim_sid", "sim_name", "unique_name", "friendly_name", "status", "rate_plan_sid"}
        ),
    ),
    "twilio_wireless_sim_data_sessions_open": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_data_sessions_started_total": ("counter", frozenset({"sim_sid"})),
    "twilio_wireless_sim_data_sessions_ended_total": ("counter", frozenset({"sim_sid"})),
    "twilio_wireless_sim_packets_uploaded_total": ("counter", frozenset({"sim_sid"})),
    "twilio_wireless_sim_packets_downloaded_total": ("counter", frozenset({"sim_sid"})),
    "twilio_wireless_sim_session_info": (
        "gauge",
        frozenset(
            {
                "sim_sid",
                "radio_link",
                "operator_name",
                "operator_country",
                "operator_mcc",
                "operator_mnc",
            }
        ),
    ),
    "twilio_wireless_sim_cell_latitude_degrees": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_cell_longitude_degrees": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_last_session_start_timestamp_seconds": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_last_updated_timestamp_seconds": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_imei_changes_total": ("counter", frozenset({"sim_sid"})),
    "twilio_wireless_data_session_duration_seconds": ("histogram", frozenset({"radio_link"})),
    "twilio_wireless_sim_up": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_last_poll_success_timestamp_seconds": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_api_requests_total": ("counter", frozenset({"endpoint", "code"})),
    "twilio_wireless_api_request_duration_seconds": ("histogram", frozenset({"endpoint"})),
    "twilio_wireless_api_retries_total": ("counter", frozenset({"endpoint", "reason"})),
    "twilio_wireless_sims_monitored": ("gauge", frozenset()),
    "twilio_wireless_poll_interval_seconds": ("gauge", frozenset()),
    "twilio_wireless_exporter_build_info": ("gauge", frozenset({"version", "python_version"})),
    "twilio_wireless_exporter_shards": ("gauge", frozenset({"index"})),
    # issue 11: data usage, rate plans, SIM lifecycle
    "twilio_wireless_sim_data_bytes_total": ("counter", frozenset({"sim_sid", "direction"})),
    "twilio_wireless_sim_data_period_bytes": ("gauge", frozenset({"sim_sid", "direction"})),
    "twilio_wireless_sim_data_period_start_timestamp_seconds": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_commands_total": ("counter", frozenset({"sim_sid", "direction"})),
    "twilio_wireless_sim_usage_last_success_timestamp_seconds": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_sim_status_changes_total": ("counter", frozenset({"sim_sid"})),
    "twilio_wireless_sim_connectivity_reset_in_progress": ("gauge", frozenset({"sim_sid"})),
    "twilio_wireless_account_data_bytes_total": ("counter", frozenset({"direction"})),
    "twilio_wireless_account_commands_total": ("counter", frozenset({"direction"})),
    "twilio_wireless_account_usage_last_success_timestamp_seconds": ("gauge", frozenset()),
    "twilio_wireless_rate_plan_info": (
        "gauge",
        frozenset(
            {
                "rate_plan_sid",
                "unique_name",
                "friendly_name",
                "data_metering",
                "data_enabled",
                "national_roaming_enabled",
            }
        ),
    ),
    "twilio_wireless_rate_plan_data_limit_bytes": (
        "gauge",
        frozenset({"rate_plan_sid", "network"}),
    ),
    "twilio_wireless_sims": ("gauge", frozenset({"status", "rate_plan_sid"})),
    # the fleet aggregates: their group labels are the configuration's (metrics.aggregate_by)
    "twilio_wireless_fleet_data_sessions_open": ("gauge", frozenset()),
    "twilio_wireless_fleet_data_sessions_started_total": ("counter", frozenset()),
    "twilio_wireless_fleet_packets_uploaded_total": ("counter", frozenset()),
    "twilio_wireless_fleet_packets_downloaded_total": ("counter", frozenset()),
    "twilio_wireless_fleet_sims_down": ("gauge", frozenset()),
}
# Labels a contract metric carries only in some configurations: the period gauge's network
# with usage.roaming_split.
OPTIONAL_LABELS: dict[str, frozenset[str]] = {
    "twilio_wireless_sim_data_period_bytes": frozenset({"network"}),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
COUNTER_SUFFIXES = ("_total", *HISTOGRAM_SUFFIXES)


def contract_base(name: str) -> str | None:
    """The contract metric a series name belongs to (``x_bucket`` -> ``x``), else None."""
    if name in CONTRACT:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and CONTRACT.get(base, ("", frozenset()))[0] == "histogram":
            return base
    return None


def is_counter_series(name: str) -> bool:
    return name.endswith(COUNTER_SUFFIXES)


# --------------------------------------------------------------------------------------------
# PromQL scanning (enough for linting: not a parser)

AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ]
)
KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "inf",
        "nan",
        "atan2",
    ]
)
LABEL_LIST_KEYWORDS = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(0x[0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+)([smhdwy]|ms)*")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass
class Selector:
    """One vector or range selector found in an expression."""

    name: str
    matchers: dict[str, tuple[str, str]]  # label -> (operator, value)
    range: str | None
    function: str | None  # the function whose argument list directly contains the selector
    start: int


@dataclass
class Scan:
    selectors: list[Selector] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _skip_string(expr: str, i: int) -> int:
    quote = expr[i]
    i += 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" else 1
    return i + 1


def _closing(expr: str, i: int, open_char: str, close_char: str) -> int:
    """Index just past the bracket that closes the one at ``i`` (strings skipped)."""
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
            continue
        if c == open_char:
            depth += 1
        elif c == close_char:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_char!r} in {expr!r}")


def _parse_matchers(body: str) -> dict[str, tuple[str, str]]:
    result: dict[str, tuple[str, str]] = {}
    pos = 0
    while pos < len(body) and body[pos:].strip():
        match = _MATCHER.match(body, pos)
        if not match:
            raise ValueError(f"cannot read label matchers {body!r}")
        result[match.group(1)] = (match.group(2), match.group(3))
        pos = match.end()
    return result


def scan(expr: str) -> Scan:
    """Selectors, ranges and function calls of a PromQL expression."""
    out = Scan()
    stack: list[str | None] = []  # function (or None) of every open parenthesis
    pending: str | None = None  # identifier that may be a function name
    i = 0
    n = len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
            continue
        if c == "#":  # comment to end of line
            while i < n and expr[i] != "\n":
                i += 1
            continue
        if c in "\"'`":
            i = _skip_string(expr, i)
            pending = None
            continue
        if c == "(":
            stack.append(pending)
            if pending:
                out.functions.append(pending)
            pending = None
            i += 1
            continue
        if c == ")":
            if stack:
                stack.pop()
            i += 1
            pending = None
            continue
        if c == "[":
            end = _closing(expr, i, "[", "]")
            out.ranges.append(expr[i + 1 : end - 1].strip())
            i = end
            continue
        if c == "{":  # selector without a metric name
            end = _closing(expr, i, "{", "}")
            out.problems.append(f"selector without metric name: {expr[i:end]}")
            i = end
            continue
        number = _NUMBER.match(expr, i) if (c.isdigit() or c == ".") else None
        if number:
            i = number.end()
            continue
        ident = _IDENT.match(expr, i)
        if not ident:
            i += 1
            pending = None
            continue
        word = ident.group(0)
        i = ident.end()
        j = i
        while j < n and expr[j].isspace():
            j += 1
        if word in LABEL_LIST_KEYWORDS:
            if j < n and expr[j] == "(":
                i = _closing(expr, j, "(", ")")
            pending = None
            continue
        if word in KEYWORDS:
            pending = None
            continue
        if (j < n and expr[j] == "(") or word in AGGREGATIONS:
            pending = word  # a function call or an aggregation (maybe with by (...) first)
            continue
        # A metric name.
        matchers: dict[str, tuple[str, str]] = {}
        if j < n and expr[j] == "{":
            end = _closing(expr, j, "{", "}")
            try:
                matchers = _parse_matchers(expr[j + 1 : end - 1])
            except ValueError as exc:
                out.problems.append(str(exc))
            i = end
        k = i
        while k < n and expr[k].isspace():
            k += 1
        rng = None
        if k < n and expr[k] == "[":
            end = _closing(expr, k, "[", "]")
            rng = expr[k + 1 : end - 1].strip()
            out.ranges.append(rng)
            i = end
        out.selectors.append(Selector(word, matchers, rng, stack[-1] if stack else None, i))
        pending = None
    return out


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!~)")


def with_bool(expr: str) -> str:
    """Turn every filtering comparison into a ``bool`` one (keeps all series, values 0/1).

    Used to check that an alert expression's underlying series exist while the alert itself
    is (rightly) not firing. Comparisons inside label matchers and strings are left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            end = _skip_string(expr, i)
            out.append(expr[i:end])
            i = end
            continue
        if c == "{":
            end = _closing(expr, i, "{", "}")
            out.append(expr[i:end])
            i = end
            continue
        match = _COMPARISON.match(expr, i)
        if match:
            rest = expr[match.end() :].lstrip()
            out.append(match.group(1))
            if not rest.startswith("bool"):
                out.append(" bool")
            i = match.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Dashboards


def load_dashboards() -> dict[str, Json]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def panels_of(dashboard: Json) -> Iterator[Json]:
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])  # collapsed rows


def variable_query(var: Json) -> str:
    query = var.get("query", "")
    if isinstance(query, dict):
        return str(query.get("query", ""))
    return str(query)


@dataclass
class Expr:
    where: str
    expr: str
    legend: str = ""
    panel_type: str = ""


def panel_exprs(dashboard: Json) -> list[Expr]:
    result = []
    for p in panels_of(dashboard):
        for t in p.get("targets", []):
            result.append(
                Expr(
                    f"{dashboard.get('uid')}: panel {p.get('title')!r} {t.get('refId')}",
                    str(t.get("expr", "")),
                    str(t.get("legendFormat", "")),
                    str(p.get("type", "")),
                )
            )
    return result


_LABEL_VALUES = re.compile(
    r"^\s*label_values\((?:(.*),)?\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S
)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def variable_exprs(dashboard: Json) -> list[tuple[Json, str | None, str | None]]:
    """(variable, PromQL to run or None, label expected in the result or None) per query var."""
    result: list[tuple[Json, str | None, str | None]] = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = variable_query(var)
        lv = _LABEL_VALUES.match(query)
        qr = _QUERY_RESULT.match(query)
        if lv:
            result.append((var, lv.group(1).strip() if lv.group(1) else None, lv.group(2)))
        elif qr:
            result.append((var, qr.group(1).strip(), None))
        else:
            result.append((var, None, None))
    return result


DS_REFS = ("${datasource}", "$datasource")
SIM_NAME_LABELS = ("display_name", "sim_name")


def _ds_ok(ds: Any) -> bool:
    if isinstance(ds, str):
        return ds in DS_REFS
    return isinstance(ds, dict) and ds.get("uid") in DS_REFS and ds.get("type") == "prometheus"


# Labels a query may group by, match on or show: the contract's, Prometheus' target labels,
# histogram buckets and the display names the dashboards add (of SIMs and of rate plans).
KNOWN_LABELS = frozenset(
    {label for _, labels in CONTRACT.values() for label in labels}
    | {label for labels in OPTIONAL_LABELS.values() for label in labels}
    | {"job", "instance", "le", "display_name", "rate_plan_name"}
)
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def unknown_labels(expr: str, legend: str = "") -> set[str]:
    """Labels used in grouping/matching clauses or the legend that no series carries."""
    used = {
        label.strip()
        for group in _LABEL_LIST.findall(expr)
        for label in group.split(",")
        if label.strip()
    }
    used |= set(_LEGEND_LABEL.findall(legend))
    return used - KNOWN_LABELS


def lint_expr(where: str, expr: str, *, job_instance: bool = True, legend: str = "") -> list[str]:
    problems: list[str] = []
    try:
        s = scan(expr)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    problems += [f"{where}: {p}" for p in s.problems]
    problems += [
        f"{where}: unknown label {label}" for label in sorted(unknown_labels(expr, legend))
    ]
    if not s.selectors:
        problems.append(f"{where}: no metric selector")
    for sel in s.selectors:
        if contract_base(sel.name) is None:
            problems.append(f"{where}: {sel.name} is not in the metric contract")
        if job_instance:
            for label in ("job", "instance"):
                if sel.matchers.get(label) != ("=~", f"${label}"):
                    problems.append(f'{where}: {sel.name} lacks {label}=~"${label}"')
        if is_counter_series(sel.name):
            if sel.function not in ("rate", "increase"):
                problems.append(f"{where}: counter {sel.name} outside rate()/increase()")
            elif sel.range != "$__rate_interval":
                problems.append(f"{where}: {sel.function}({sel.name}) over [{sel.range}]")
    for rng in s.ranges:
        if rng != "$__rate_interval":
            problems.append(f"{where}: range [{rng}] is not [$__rate_interval]")
    for fn in s.functions:
        if fn == "irate":
            problems.append(f"{where}: irate() (use rate() with $__rate_interval)")
    return problems


def lint_dashboard(d: Json, *, uid: str) -> list[str]:
    """The project's dashboard rules (a superset of the Grafana dashboard linter's)."""
    problems: list[str] = []
    if d.get("uid") != uid:
        problems.append(f"uid is {d.get('uid')!r}, expected the stable {uid!r}")
    if not d.get("title"):
        problems.append("dashboard has no title")
    if "twilio-wireless" not in d.get("tags", []):
        problems.append("dashboard lacks the twilio-wireless tag")
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        problems.append(f"schemaVersion {d.get('schemaVersion')} < 36")

    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no datasource variable of type prometheus")
    for name in ("job", "instance"):
        var = variables.get(name)
        if not var:
            problems.append(f"no {name} variable")
            continue
        if not (var.get("type") == "query" and var.get("multi") and var.get("includeAll")):
            problems.append(f"{name} variable must be a multi-value query variable with All")
        if var.get("refresh") != 2:
            problems.append(f"{name} variable must refresh on time range change")
    for var, promql, _label in variable_exprs(d):
        where = f"variable {var.get('name')}"
        if not _ds_ok(var.get("datasource")):
            problems.append(f"{where}: datasource is not $datasource")
        if promql is None:
            if var.get("name") != "job" or "twilio_wireless_" not in variable_query(var):
                problems.append(f"{where}: unsupported query {variable_query(var)!r}")
            continue
        if var.get("name") == "job":
            continue
        problems += lint_expr(where, promql, job_instance=False)
        wanted = ("job",) if var.get("name") == "instance" else ("job", "instance")
        for sel in scan(promql).selectors:
            for label in wanted:
                if sel.matchers.get(label) != ("=~", f"${label}"):
                    problems.append(f'{where}: {sel.name} lacks {label}=~"${label}"')

    ids: set[Any] = set()
    occupied: set[tuple[int, int]] = set()
    for p in panels_of(d):
        title = p.get("title") or "<untitled>"
        where = f"panel {title!r}"
        if p.get("id") in ids:
            problems.append(f"{where}: duplicate id {p.get('id')}")
        ids.add(p.get("id"))
        if not p.get("title"):
            problems.append(f"{where}: no title")
        grid = p.get("gridPos", {})
        x, y, w, h = (grid.get(k, -1) for k in ("x", "y", "w", "h"))
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > 24:
            problems.append(f"{where}: bad gridPos {grid}")
        else:
            cells = {(cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)}
            if cells & occupied:
                problems.append(f"{where}: overlaps another panel")
            occupied |= cells
        if p.get("type") == "row":
            continue
        if p.get("type") == "graph":
            problems.append(f"{where}: deprecated graph panel")
        if not str(p.get("description", "")).strip():
            problems.append(f"{where}: no description")
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if not isinstance(unit, str) or not unit:
            problems.append(f"{where}: no unit")
        if not _ds_ok(p.get("datasource")):
            problems.append(f"{where}: datasource is not $datasource")
        targets = p.get("targets", [])
        if not targets:
            problems.append(f"{where}: no queries")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{where}: duplicate refIds {ref_ids}")
        for t in targets:
            twhere = f"{where} {t.get('refId')}"
            if not _ds_ok(t.get("datasource")):
                problems.append(f"{twhere}: datasource is not $datasource")
            expr = str(t.get("expr", ""))
            problems += lint_expr(twhere, expr, legend=str(t.get("legendFormat", "")))
            lists_sims = (
                p.get("type") in ("table", "geomap")
                or "topk" in expr
                or any(label in str(t.get("legendFormat", "")) for label in SIM_NAME_LABELS)
            )
            info = "twilio_wireless_sim_info" in expr and "group_left" in expr
            if lists_sims and not info:
                problems.append(f"{twhere}: lists SIMs without joining twilio_wireless_sim_info")
    return problems


# --------------------------------------------------------------------------------------------
# Rule files


def load_rules() -> list[tuple[Path, Json]]:
    """(file, rule) for every rule of the shipped rule files."""
    result = []
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in doc["groups"]:
            for rule in group["rules"]:
                result.append((path, rule))
    return result


# --------------------------------------------------------------------------------------------
# External tools


def require_tool(name: str) -> str:
    """Path of ``name``; a missing tool skips the test, or fails it when CI is set."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} not found on PATH (Debian/Ubuntu: apt-get install -y prometheus)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it", pytrace=False)
    pytest.skip(reason)


def run(cmd: list[str], *, stdin: str | None = None, timeout: float = 60) -> tuple[int, str]:
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def http_get(url: str, *, timeout: float = 5, headers: Mapping[str, str] | None = None) -> str:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body.decode("utf-8")


def wait_for(
    check: Callable[[], Any], *, timeout: float, interval: float = 0.25, what: str = ""
) -> Any:
    """Poll ``check`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} ({last_error})")
        time.sleep(interval)


# Prometheus' web server, once bound (2.x logfmt and 3.x slog alike).
_PROMETHEUS_LISTENING = re.compile(r'msg="Listening on".*?\baddress=(?P<address>\S+)')


class PromQueryError(Exception):
    pass


class Prometheus:
    """A Prometheus server of its own: temp storage, port 0, 1 s scrapes and evaluations.

    Prometheus binds ``127.0.0.1:0`` and logs the address it got (``msg="Listening on"
    address=127.0.0.1:PORT``, at info); ``start`` reads it from the log, so no port is picked
    first and bound later.

    ``scrape`` maps a job to one static target; ``file_sd`` maps a job to a file of targets in
    Prometheus' ``file_sd`` format (see :func:`write_file_sd`), discovered the way a service
    discovery would hand them over. ``rule_files`` replaces the shipped rule files (for a copy
    with a shorter ``for:``, say).
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        scrape: Mapping[str, str],
        *,
        file_sd: Mapping[str, Path] | None = None,
        rule_files: Sequence[Path] | None = None,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.scrape = scrape  # job -> host:port
        self.file_sd = dict(file_sd or {})  # job -> targets file
        self.rule_files = list(RULE_FILES if rule_files is None else rule_files)
        self.url = ""  # known once started
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    def config(self) -> Json:
        return {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [address]}]}
                for job, address in self.scrape.items()
            ]
            + [
                {"job_name": job, "file_sd_configs": [{"files": [str(path)]}]}
                for job, path in self.file_sd.items()
            ],
        }

    def start(self, timeout: float = 20) -> None:
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    "--web.listen-address=127.0.0.1:0",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            listening = wait_for_log_line(self.log, _PROMETHEUS_LISTENING, self.proc, timeout)
            self.url = f"http://{listening['address']}"
            wait_for(self._ready, timeout=timeout, what="Prometheus to be ready")
        except (TimeoutError, AssertionError):
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Prometheus exited: {self.log.read_text(errors='replace')}")
        http_get(f"{self.url}/-/ready", timeout=1)
        return True

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = http_get(url)
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise PromQueryError(f"{doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[Json]:
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PromQueryError(f"expected an instant vector, got {data['resultType']}")
        result: list[Json] = data["result"]
        return result


def write_file_sd(
    path: Path, targets: Sequence[str], labels: Mapping[str, str] | None = None
) -> None:
    """Write ``host:port`` targets as one group of a ``file_sd`` file (JSON), atomically, as
    Prometheus wants it (it re-reads the file when it changes)."""
    group: Json = {"targets": list(targets), "labels": dict(labels or {})}
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps([group]), encoding="utf-8")
    partial.replace(path)


# Values for Grafana's variables when running dashboard queries outside Grafana.
def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana renders it for Prometheus (escaped, inside a string)."""
    escaped = [re.escape(v).replace("\\", "\\\\") for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``[[x]]``); unknown ones stay (e.g. ``$1``)."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return values.get(name, match.group(0))

    return _VARIABLE.sub(repl, expr)


def grafana_query_result_text(series: Json) -> str:
    """How Grafana's query_result() variable query renders one series (before the regex)."""
    labels = dict(series["metric"])
    text = labels.pop("__name__", "")
    text += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    ts, value = series["value"]
    return f"{text} {value} {int(float(ts) * 1000)}"


def js_regex(pattern: str) -> re.Pattern[str]:
    """A Grafana variable regex (``/.../flags`` JavaScript syntax) for Python's ``re``."""
    body = pattern
    flags = 0
    if pattern.startswith("/"):
        body, _, flag_text = pattern[1:].rpartition("/")
        if "i" in flag_text:
            flags |= re.IGNORECASE
    return re.compile(
        body.replace("(?<", "(?P<").replace("(?P<=", "(?<=").replace("(?P<!", "(?<!"), flags
    )
