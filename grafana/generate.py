#!/usr/bin/env python3
"""Generate the Grafana dashboards of twilio-wireless-exporter.

Pure Python: the standard library and the exporter's ``metrics_names`` module (itself standard
library only, found in ``exporter/`` next to this folder, so the exporter need not be installed),
so every metric name in a query is the one the exporter exposes. The JSON files in
``grafana/dashboards/`` are the output of this script and are committed;
``tests/test_dashboards.py`` checks that they are up to date.

    python3 grafana/generate.py            # rewrite grafana/dashboards/*.json
    python3 grafana/generate.py --check    # exit 1 if a committed file differs

Conventions (Grafana dashboard linter): a ``datasource`` variable of type prometheus used by every
panel and variable; ``job`` and ``instance`` variables (multi-value, include All) applied to every
metric selector; counters only inside ``rate()``/``increase()`` over ``$__rate_interval``; a unit
and a description on every panel; stable uids; names of SIMs joined from
``twilio_wireless_sim_info``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_EXPORTER = str(Path(__file__).resolve().parent.parent / "exporter")
if _EXPORTER not in sys.path:
    sys.path.insert(0, _EXPORTER)

from twilio_wireless_exporter import metrics_names as names  # noqa: E402 - found via sys.path

Json = dict[str, Any]

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 39  # Grafana 10.4 / 11
TAGS = ["twilio-wireless", "twilio", "iot", "prometheus-exporter"]
FLEET_UID = "twilio-wireless-fleet"
SIM_UID = "twilio-wireless-sim"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label selector applied to every metric: the job and instance variables.
SEL = 'job=~"$job", instance=~"$instance"'
# ... plus the chosen SIM on the SIM detail dashboard.
SIM_SEL = SEL + ', sim_sid=~"$sim"'
# How SIM series are joined to their identity.
JOIN_ON = "on (job, instance, sim_sid)"
# Label holding a SIM's display name after the join: sim_name, else unique_name, else
# friendly_name, else the SID (label_replace only overwrites when its regex matches a non-empty
# source, so the last replacement that matches wins).
NAME_LABEL = "display_name"
NAME_SOURCES = ("sim_sid", "friendly_name", "unique_name", "sim_name")

# The series the queries read, by their names in metrics_names.
SIM_INFO = names.SIM_INFO.sample
LATITUDE = names.LATITUDE.sample
LONGITUDE = names.LONGITUDE.sample
BUILD_INFO = names.BUILD_INFO.sample
STARTED = names.SESSIONS_STARTED.sample
ENDED = names.SESSIONS_ENDED.sample
UPLOADED = names.PACKETS_UP.sample
DOWNLOADED = names.PACKETS_DOWN.sample
OPEN = names.SESSIONS_OPEN.sample
SESSION_INFO = names.SESSION_INFO.sample
DURATION = names.SESSION_DURATION.name
DURATION_BUCKET = names.SESSION_DURATION.bucket
LAST_START = names.LAST_START.sample
LAST_UPDATED = names.LAST_UPDATED.sample
LAST_POLL = names.LAST_SUCCESS.sample
IMEI_CHANGES = names.IMEI_CHANGES.sample
SIM_UP = names.SIM_UP.sample
SIMS_MONITORED = names.SIMS_MONITORED.sample
POLL_INTERVAL = names.POLL_INTERVAL.sample
REQUESTS = names.API_REQUESTS.sample
FLEET_OPEN = names.FLEET_SESSIONS_OPEN.sample
FLEET_STARTED = names.FLEET_SESSIONS_STARTED.sample
FLEET_UPLOADED = names.FLEET_PACKETS_UP.sample
FLEET_DOWNLOADED = names.FLEET_PACKETS_DOWN.sample
FLEET_DOWN = names.FLEET_SIMS_DOWN.sample
RETRIES = names.API_RETRIES.sample
REQUEST_DURATION_BUCKET = names.API_REQUEST_DURATION.bucket
DATA_BYTES = names.SIM_DATA_BYTES.sample
PERIOD_BYTES = names.SIM_DATA_PERIOD_BYTES.sample
PERIOD_START = names.SIM_DATA_PERIOD_START.sample
COMMANDS = names.SIM_COMMANDS.sample
USAGE_LAST = names.SIM_USAGE_LAST_SUCCESS.sample
STATUS_CHANGES = names.SIM_STATUS_CHANGES.sample
RESETTING = names.SIM_RESETTING.sample
ACCOUNT_BYTES = names.ACCOUNT_DATA_BYTES.sample
ACCOUNT_COMMANDS = names.ACCOUNT_COMMANDS.sample
ACCOUNT_USAGE_LAST = names.ACCOUNT_USAGE_LAST_SUCCESS.sample
PLAN_INFO = names.RATE_PLAN_INFO.sample
PLAN_LIMIT = names.RATE_PLAN_DATA_LIMIT.sample
SIMS_BY_STATUS = names.SIMS_BY_STATUS.sample

# How rate plan series are joined to each other and to the SIMs on them: by job, not instance,
# as only shard 0 reads the plans (the plan series are first taken once per job and plan with
# max, which also folds an HA twin's copy).
PLAN_ON = "on (job, rate_plan_sid)"
# A rate plan's display name after the join: unique_name, else friendly_name, else the SID.
PLAN_NAME_LABEL = "rate_plan_name"
PLAN_NAME_SOURCES = ("rate_plan_sid", "friendly_name", "unique_name")
# The period gauge's series of all directions together. With usage.roaming_split they are
# also split by network; every query sums the network label away or selects on it, so each
# works with and without the split.
TOTAL = 'direction="total"'
# The bytes that count against a plan's data_limit, which is the home network's: the home
# network's with the split, the total without it (network="" matches a series without the
# label). The recording rule sim:twilio_wireless_sim_data_period_bytes_per_home_limit:ratio
# reads the same series.
COUNTED = TOTAL + ', network=~"home|"'
ROAMING = TOTAL + ', network=~"national_roaming|international_roaming"'
SPLIT = TOTAL + ', network!=""'  # only with usage.roaming_split
NOT_ACTIVE = 'status!="active"'
# Usage moves once per usage.interval (1h by default) and a day or two behind the traffic:
# the per-day panels show two weeks in daily steps, whatever the dashboard's time range.
DAILY: Json = {"interval": "1d", "timeFrom": "14d"}
LAG = (
    " Usage records lag the traffic by 24 to 48 hours, and the exporter reads them once per "
    "usage.interval."
)


def m(metric: str, sel: str = SEL, extra: str = "") -> str:
    """A metric selector with the dashboard's label matchers."""
    matchers = f"{sel}, {extra}" if extra else sel
    return f"{metric}{{{matchers}}}"


def rate(metric: str, sel: str = SEL, extra: str = "", fn: str = "rate") -> str:
    return f"{fn}({m(metric, sel, extra)}[$__rate_interval])"


def sim_names(sel: str = SEL) -> str:
    """``twilio_wireless_sim_info`` with the display name label added."""
    expr = m(SIM_INFO, sel)
    for source in NAME_SOURCES:
        expr = f'label_replace({expr}, "{NAME_LABEL}", "$1", "{source}", "(.+)")'
    return expr


def named(expr: str, sel: str = SEL) -> str:
    """Join per-SIM series to their names (the info metric's value is 1)."""
    return f"({expr})\n* {JOIN_ON} group_left ({NAME_LABEL})\n  {sim_names(sel)}"


def period_total(sel: str = SEL) -> str:
    """Bytes of each SIM's current metering period, all networks."""
    return f"sum without (network, direction) ({m(PERIOD_BYTES, sel, TOTAL)})"


def with_plan(expr: str, sel: str = SEL) -> str:
    """Per-SIM series with the SIM's ``rate_plan_sid`` added (from twilio_wireless_sim_info)."""
    return f"({expr})\n* {JOIN_ON} group_left (rate_plan_sid)\n  {m(SIM_INFO, sel)}"


def home_limit() -> str:
    """The rate plans' home-network data limits (plans without one have no series)."""
    limits = m(PLAN_LIMIT, SEL, 'network="home"')
    return f"max by (job, rate_plan_sid) ({limits})"


def limit_share(sel: str = SEL) -> str:
    """Share of its plan's home data limit each SIM used this period (1 = the limit), with
    the SIM's ``rate_plan_sid``."""
    counted = f"sum without (network, direction) ({m(PERIOD_BYTES, sel, COUNTED)})"
    return f"{with_plan(counted, sel)}\n/ {PLAN_ON} group_left ()\n  {home_limit()}"


def plan_named(expr: str) -> str:
    """Join series that carry ``rate_plan_sid`` to the plan's display name."""
    names_expr = m(PLAN_INFO)
    for source in PLAN_NAME_SOURCES:
        names_expr = f'label_replace({names_expr}, "{PLAN_NAME_LABEL}", "$1", "{source}", "(.+)")'
    names_expr = f"max by (job, rate_plan_sid, {PLAN_NAME_LABEL}) ({names_expr})"
    return f"({expr})\n* {PLAN_ON} group_left ({PLAN_NAME_LABEL})\n  {names_expr}"


def hq(q: float, bucket_metric: str, by: str = "le", sel: str = SEL) -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({rate(bucket_metric, sel)}))"


# --------------------------------------------------------------------------------------------
# Panels


def target(
    expr: str,
    legend: str = "__auto",
    *,
    ref: str = "A",
    instant: bool = False,
    fmt: str = "time_series",
) -> Json:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "format": fmt,
        "instant": instant,
        "legendFormat": legend,
        "range": not instant,
        "refId": ref,
    }


def targets(*items: tuple[str, str]) -> list[Json]:
    """Range targets from (expr, legend) pairs, refIds A, B, C ..."""
    return [target(expr, legend, ref=chr(65 + i)) for i, (expr, legend) in enumerate(items)]


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


GREEN = thresholds((None, "green"))


_SERIES = re.compile(r"\btwilio_wireless_[a-z0-9_]+")


def per_sim_note(tgts: list[Json]) -> str:
    """What a ``metrics.per_sim`` mode takes from the panel, said in its description, so that
    a mode leaving out what it reads shows why the panel is empty instead of a silent gap."""
    read = {names.family_of(m) for t in tgts for m in _SERIES.findall(t.get("expr", ""))}
    per_sim = {family for family in read if family in names.PER_SIM}
    if not per_sim:
        return ""
    if per_sim - set(names.ESSENTIAL):
        return " Needs `metrics.per_sim: full` (empty with `essential` or `none`)."
    return " Empty with `metrics.per_sim: none`."


def panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    tgts: list[Json],
    *,
    w: int,
    h: int,
    options: Json | None = None,
    custom: Json | None = None,
    defaults: Json | None = None,
    overrides: list[Json] | None = None,
    transformations: list[Json] | None = None,
    links: list[Json] | None = None,
    extra: Json | None = None,
) -> Json:
    field_defaults: Json = {"unit": unit, "thresholds": GREEN, "mappings": []}
    if kind in ("timeseries", "stat", "bargauge", "piechart", "table", "state-timeline"):
        field_defaults["color"] = {
            "mode": "palette-classic" if kind in ("timeseries", "piechart") else "thresholds"
        }
    if custom is not None:
        field_defaults["custom"] = custom
    if links:
        field_defaults["links"] = links
    field_defaults.update(defaults or {})
    result: Json = {
        "type": kind,
        "title": title,
        "description": description + per_sim_note(tgts),
        "datasource": DS,
        "fieldConfig": {"defaults": field_defaults, "overrides": overrides or []},
        "options": options or {},
        "targets": tgts,
        "gridPos": {"w": w, "h": h},
    }
    if transformations:
        result["transformations"] = transformations
    result.update(extra or {})
    return result


def timeseries(
    title: str,
    description: str,
    unit: str,
    tgts: list[Json],
    *,
    w: int = 12,
    h: int = 8,
    stack: bool = False,
    bars: bool = False,
    links: list[Json] | None = None,
    overrides: list[Json] | None = None,
    defaults: Json | None = None,
    extra: Json | None = None,
    threshold_lines: Json | None = None,
) -> Json:
    """A time series panel; ``threshold_lines`` (thresholds()) are drawn as dashed lines."""
    custom: Json = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 80 if bars else (30 if stack else 10),
        "gradientMode": "none",
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "axisSoftMin": 0,
    }
    if threshold_lines is not None:
        custom["thresholdsStyle"] = {"mode": "dashed"}
        defaults = {"thresholds": threshold_lines, **(defaults or {})}
    options: Json = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel(
        "timeseries",
        title,
        description,
        unit,
        tgts,
        w=w,
        h=h,
        options=options,
        custom=custom,
        links=links,
        overrides=overrides,
        defaults=defaults,
        extra=extra,
    )


def stat(
    title: str,
    description: str,
    unit: str,
    expr: str,
    *,
    w: int = 4,
    h: int = 4,
    steps: Json = GREEN,
    mappings: list[Json] | None = None,
    graph: bool = True,
) -> Json:
    options: Json = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "auto",
        "textMode": "auto",
        "colorMode": "value",
        "graphMode": "area" if graph else "none",
        "justifyMode": "auto",
    }
    defaults: Json = {"thresholds": steps}
    if mappings:
        defaults["mappings"] = mappings
    return panel(
        "stat",
        title,
        description,
        unit,
        [target(expr, "")],
        w=w,
        h=h,
        options=options,
        defaults=defaults,
    )


def table(
    title: str,
    description: str,
    unit: str,
    tgts: list[Json],
    *,
    w: int,
    h: int,
    rename: dict[str, str],
    order: Sequence[str],
    sort_by: str | None = None,
    hide: Iterable[str] = ("Time", "__name__", "job"),
    merge: bool = False,
    links: list[Json] | None = None,
    overrides: list[Json] | None = None,
) -> Json:
    transformations: list[Json] = []
    if merge:
        transformations.append({"id": "merge", "options": {}})
    transformations.append(
        {
            "id": "organize",
            "options": {
                "excludeByName": dict.fromkeys(hide, True),
                "indexByName": {name: i for i, name in enumerate(order)},
                "renameByName": rename,
            },
        }
    )
    options: Json = {
        "showHeader": True,
        "cellHeight": "sm",
        "footer": {"show": False, "reducer": ["sum"], "fields": "", "countRows": False},
        "sortBy": [{"displayName": sort_by, "desc": True}] if sort_by else [],
    }
    return panel(
        "table",
        title,
        description,
        unit,
        tgts,
        w=w,
        h=h,
        options=options,
        custom={"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False},
        transformations=transformations,
        links=links,
        overrides=overrides,
    )


def geomap(title: str, description: str, sel: str, *, w: int, h: int) -> Json:
    """Markers from two instant table queries (latitude, longitude) merged row by row."""
    tgts = [
        target(
            named(m(LATITUDE, sel), sel),
            ref="A",
            instant=True,
            fmt="table",
        ),
        target(
            named(m(LONGITUDE, sel), sel),
            ref="B",
            instant=True,
            fmt="table",
        ),
    ]
    options: Json = {
        "view": {"id": "fit", "lat": 0, "lon": 0, "zoom": 2, "allLayers": True},
        "controls": {"showZoom": True, "mouseWheelZoom": True, "showAttribution": True},
        "basemap": {"type": "default", "name": "Basemap", "config": {}},
        "layers": [
            {
                "type": "markers",
                "name": "SIMs",
                "tooltip": True,
                "location": {"mode": "coords", "latitude": "latitude", "longitude": "longitude"},
                "config": {
                    "showLegend": False,
                    "style": {
                        "size": {"fixed": 6},
                        "color": {"fixed": "dark-blue"},
                        "opacity": 0.8,
                        "symbol": {"mode": "fixed", "fixed": "img/icons/marker/circle.svg"},
                        "text": {"mode": "field", "field": NAME_LABEL, "fixed": ""},
                        "textConfig": {
                            "fontSize": 10,
                            "offsetY": -10,
                            "textAlign": "center",
                            "textBaseline": "bottom",
                        },
                    },
                },
            }
        ],
        "tooltip": {"mode": "details"},
    }
    transformations: list[Json] = [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True, "__name__": True, "job": True},
                "indexByName": {},
                "renameByName": {"Value #A": "latitude", "Value #B": "longitude"},
            },
        },
    ]
    return panel(
        "geomap",
        title,
        description,
        "degree",
        tgts,
        w=w,
        h=h,
        options=options,
        transformations=transformations,
    )


def state_timeline(
    title: str,
    description: str,
    tgts: list[Json],
    *,
    w: int,
    h: int,
    mappings: list[Json],
    steps: Json = GREEN,
) -> Json:
    options: Json = {
        "mergeValues": True,
        "showValue": "auto",
        "alignValue": "left",
        "rowHeight": 0.9,
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
        "tooltip": {"mode": "single", "sort": "none"},
    }
    return panel(
        "state-timeline",
        title,
        description,
        "none",
        tgts,
        w=w,
        h=h,
        options=options,
        custom={"lineWidth": 0, "fillOpacity": 80},
        defaults={"mappings": mappings, "thresholds": steps},
    )


def row(title: str) -> Json:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": {"w": 24, "h": 1},
    }


def value_map(*items: tuple[str, str, str]) -> list[Json]:
    return [
        {
            "type": "value",
            "options": {
                value: {"text": text, "color": color, "index": i}
                for i, (value, text, color) in enumerate(items)
            },
        }
    ]


def layout(panels: list[Json]) -> list[Json]:
    """Assign ids and grid positions: left to right, wrapping at width 24, rows start a line."""
    x = y = line_h = 0
    out: list[Json] = []
    for pid, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        p = {"id": pid, **p, "gridPos": {"h": h, "w": w, "x": x, "y": y}}
        out.append(p)
        x, line_h = x + w, max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return out


# --------------------------------------------------------------------------------------------
# Variables and dashboard


def variables(with_sim: bool) -> list[Json]:
    def query_var(name: str, label: str, query: str, **extra: Any) -> Json:
        var: Json = {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "query": query,
            "definition": query,
            "refresh": 2,
            "regex": "",
            "sort": 1,
            "hide": 0,
            "multi": True,
            "includeAll": True,
            "allValue": ".+",
            "current": {},
            "options": [],
        }
        var.update(extra)
        return var

    result: list[Json] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "hide": 0,
            "multi": False,
            "includeAll": False,
            "current": {},
            "options": [],
        },
        query_var("job", "job", f"label_values({BUILD_INFO}, job)"),
        query_var(
            "instance",
            "instance",
            f'label_values({BUILD_INFO}{{job=~"$job"}}, instance)',
        ),
    ]
    if with_sim:
        # Grafana turns each result into `name{label="value",...} value timestamp` (labels in
        # Prometheus' sorted order); the regex shows the name and keeps the SID as the value.
        result.append(
            query_var(
                "sim",
                "SIM",
                f"query_result({sim_names()})",
                regex=f'/{NAME_LABEL}="(?<text>[^"]*)".*sim_sid="(?<value>[^"]+)"/',
                multi=False,
                includeAll=False,
                allValue=None,
            )
        )
    return result


def dashboard(uid: str, title: str, description: str, panels: list[Json], with_sim: bool) -> Json:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "timezone": "",
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "id": None,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "Twilio Wireless",
                "type": "dashboards",
                "tags": ["twilio-wireless"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": {"list": variables(with_sim)},
        "panels": layout(panels),
    }


# Data links from per-SIM series (time series: field labels; tables: the row's field).
SIM_LINK_PARAMS = (
    "${datasource:queryparam}&${job:queryparam}&${instance:queryparam}&${__url_time_range}"
)


def sim_link(field_ref: str) -> list[Json]:
    return [
        {
            "title": "SIM detail",
            "url": f"/d/{SIM_UID}/twilio-wireless-sim-detail?{SIM_LINK_PARAMS}&var-sim={field_ref}",
        }
    ]


SERIES_SIM_LINK = sim_link("${__field.labels.sim_sid}")
ROW_SIM_LINK = sim_link("${__data.fields.sim_sid}")

# --------------------------------------------------------------------------------------------
# Fleet overview

CODE_429 = 'code="429"'


def poll_stale_threshold() -> tuple[str, str]:
    """The age at which TwilioWirelessPollStale fires (3 x poll.interval, at least 15
    minutes), for the longest poll.interval of the chosen exporters: (expr, legend)."""
    return f"clamp_min(3 * max({m(POLL_INTERVAL)}), 900)", "PollStale threshold"


# The threshold line is dashed, so that it does not read as one more SIM.
DASHED_THRESHOLD = [
    {
        "matcher": {"id": "byName", "options": "PollStale threshold"},
        "properties": [
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.fillOpacity", "value": 0},
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        ],
    }
]


def unknown_if_empty(expr: str, labels: str) -> str:
    """Show an empty (null in the API) attribute label as "unknown" in legends."""
    for label in (name.strip() for name in labels.split(",")):
        expr = f'label_replace({expr}, "{label}", "unknown", "{label}", "")'
    return expr


def open_by(labels: str, sel: str = SEL) -> str:
    return unknown_if_empty(
        f"sum by ({labels}) (\n  {m(OPEN, sel)}\n"
        f"  * {JOIN_ON} group_left ({labels}) {m(SESSION_INFO, sel)}\n)",
        labels,
    )


# Horizontal bars, one per series of an instant query.
BAR_OPTIONS: Json = {
    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    "orientation": "horizontal",
    "displayMode": "basic",
    "showUnfilled": True,
    "valueMode": "color",
    "namePlacement": "auto",
    "sizing": "auto",
    "minVizHeight": 16,
    "minVizWidth": 8,
    "maxVizHeight": 300,
}


def top_bars(title: str, description: str, unit: str, expr: str, *, w: int = 12) -> Json:
    """Horizontal bars of per-SIM values (an instant query), one per SIM, named."""
    return panel(
        "bargauge",
        title,
        description,
        unit,
        [target(named(expr), f"{{{{{NAME_LABEL}}}}}", instant=True)],
        w=w,
        h=8,
        options=BAR_OPTIONS,
        links=SERIES_SIM_LINK,
    )


# Colours of a share of a data limit: orange from 80 % (TwilioWirelessSimDataLimitNear), red
# from 100 % (TwilioWirelessSimDataLimitReached).
LIMIT_STEPS = thresholds((None, "green"), (0.8, "orange"), (1, "red"))
SHARE_ROWS = 50


def limit_table() -> Json:
    """The SIMs closest to (or over) their plan's home data limit, most used share first."""
    top = f"topk({SHARE_ROWS}, {limit_share()})"

    def of_top(expr: str) -> str:
        return f"{expr}\n  and {JOIN_ON} {top}"

    used = with_plan(f"sum without (network, direction) ({m(PERIOD_BYTES, extra=COUNTED)})")
    limit = f"0 * {used}\n+ {PLAN_ON} group_left ()\n  {home_limit()}"
    tgts = [
        target(named(plan_named(expr)), ref=ref, instant=True, fmt="table")
        for ref, expr in (("A", top), ("B", of_top(f"({used})")), ("C", of_top(f"({limit})")))
    ]
    return table(
        f"SIMs by share of their plan's data limit (top {SHARE_ROWS})",
        "Each SIM's data this metering period against the home-network data limit of its rate "
        "plan (the plans' data_limit, converted at 1 MB = 1,048,576 bytes), highest share first. "
        "With usage.roaming_split only home-network bytes count; without it the total does, "
        "roaming included. SIMs on a plan without a limit are not listed. From 80 % "
        "TwilioWirelessSimDataLimitNear fires, from 100 % TwilioWirelessSimDataLimitReached." + LAG,
        "bytes",
        tgts,
        w=12,
        h=8,
        merge=True,
        hide=("Time", "__name__", "job", "rate_plan_sid"),
        rename={
            NAME_LABEL: "SIM",
            "sim_sid": "SID",
            PLAN_NAME_LABEL: "Rate plan",
            "Value #A": "Share of limit",
            "Value #B": "Used this period",
            "Value #C": "Home limit",
        },
        order=[NAME_LABEL, "Value #A", "Value #B", "Value #C", PLAN_NAME_LABEL, "sim_sid"],
        sort_by="Share of limit",
        links=ROW_SIM_LINK,
        overrides=[
            {
                "matcher": {"id": "byName", "options": "Share of limit"},
                "properties": [
                    {"id": "unit", "value": "percentunit"},
                    {"id": "thresholds", "value": LIMIT_STEPS},
                    {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                ],
            }
        ],
    )


def per_day(title: str, description: str, expr: str, legend: str = "{{direction}}") -> Json:
    """Bytes reported per day as bars (panel interval 1d, last 14 days)."""
    return timeseries(
        title,
        description,
        "bytes",
        targets((expr, legend)),
        bars=True,
        stack=True,
        extra=DAILY,
    )


def usage_panels() -> list[Json]:
    """The fleet overview's data usage, rate plan and SIM lifecycle rows."""
    amber_from_1 = thresholds((None, "green"), (1, "orange"))
    red_from_1 = thresholds((None, "green"), (1, "red"))
    return [
        row("Data usage"),
        stat(
            "Data used this period",
            "Bytes all selected SIMs used in their current metering periods (all networks), as "
            "the API reports them now." + LAG,
            "bytes",
            f"sum({m(PERIOD_BYTES, extra=TOTAL)})",
        ),
        stat(
            "SIMs at 80 % of their limit",
            "SIMs that used at least 80 % (and less than 100 %) of their rate plan's home data "
            "limit this period (alert TwilioWirelessSimDataLimitNear).",
            "none",
            f"count(\n  {limit_share()}\n  >= 0.8 < 1\n) or vector(0)",
            steps=amber_from_1,
        ),
        stat(
            "SIMs at their limit",
            "SIMs that used all of their rate plan's home data limit this period: the network "
            "stops their data until the next period (alert TwilioWirelessSimDataLimitReached).",
            "none",
            f"count(\n  {limit_share()}\n  >= 1\n) or vector(0)",
            steps=red_from_1,
        ),
        stat(
            "SIMs not active",
            f"Monitored SIMs whose status is not active ({SIMS_BY_STATUS}): suspended, "
            "deactivated, ... Only statuses that discovery.status lists (or configured SIMs) are "
            "seen.",
            "none",
            f"sum({m(SIMS_BY_STATUS, extra=NOT_ACTIVE)}) or vector(0)",
            steps=amber_from_1,
        ),
        stat(
            "SIMs resetting connectivity",
            "SIMs with a connectivity reset in progress (reset_status resetting).",
            "none",
            f"sum({m(RESETTING)})",
        ),
        stat(
            "Oldest usage read",
            "Age of the oldest successful read of a SIM's usage records. It should stay below "
            "usage.interval plus the time a read takes; the data it read is older still (24 to "
            "48 hours).",
            "s",
            f"max(time() - {m(USAGE_LAST)})",
        ),
        per_day(
            "Data reported per day, monitored SIMs",
            "Bytes the API added to the usage records of the selected SIMs, per day, upload and "
            "download (growth of twilio_wireless_sim_data_bytes_total, last 14 days). The API "
            "reports a day's usage over the next one or two days, so the latest days fill up "
            "later and each bar holds some of the days before.",
            f"sum by (direction) ({rate(DATA_BYTES, fn='increase')})",
        ),
        per_day(
            "Data reported per day, whole account",
            "Bytes the API reported for the whole account (/v1/UsageRecords), per day, upload "
            "and download, including SIMs this exporter does not monitor (usage.account). "
            "Exporters reading the same account report it once each; the panel takes the "
            "largest per job." + LAG,
            "sum by (direction) (\n  max by (job, direction) ("
            f"{rate(ACCOUNT_BYTES, fn='increase')})\n)",
        ),
        top_bars(
            "Top 10 SIMs by data this period",
            "The SIMs that used the most data in their current metering period (all networks). "
            "Click a bar for its SIM detail dashboard." + LAG,
            "bytes",
            f"topk(10, {period_total()})",
        ),
        limit_table(),
        row("Roaming and SIM lifecycle"),
        timeseries(
            "Data this period by network",
            "Bytes of the current metering periods of all selected SIMs by network: home, "
            "national roaming (other networks in the home country) and international roaming. "
            "Needs usage.roaming_split (without it the usage has no network label and this "
            "panel is empty)." + LAG,
            "bytes",
            targets((f"sum by (network) ({m(PERIOD_BYTES, extra=SPLIT)})", "{{network}}")),
            stack=True,
        ),
        top_bars(
            "Top 10 SIMs by roaming data this period",
            "The SIMs with the most national and international roaming data in their current "
            "metering period (usage.roaming_split). National roaming on a plan without it fires "
            "TwilioWirelessSimRoamingNotEnabled." + LAG,
            "bytes",
            f"topk(10, sum without (network, direction) ({m(PERIOD_BYTES, extra=ROAMING)}))",
        ),
        timeseries(
            "SIMs by status",
            f"Monitored SIMs by status over time ({SIMS_BY_STATUS}, from the /v1/Sims listing). "
            "A SIM whose status changes to anything but active fires TwilioWirelessSimLeftActive; "
            "statuses discovery.status does not list are not seen.",
            "none",
            targets((f"sum by (status) ({m(SIMS_BY_STATUS)})", "{{status}}")),
            stack=True,
        ),
        timeseries(
            "Commands per interval",
            "SMS and IP commands the API reported, from and to the SIMs, per interval: for the "
            "selected SIMs and for the whole account (the largest per job, as for the data). "
            "They come from the usage records and lag like the data.",
            "short",
            targets(
                (f"sum by (direction) ({rate(COMMANDS, fn='increase')})", "SIMs {{direction}}"),
                (
                    "sum by (direction) (\n  max by (job, direction) ("
                    f"{rate(ACCOUNT_COMMANDS, fn='increase')})\n)",
                    "account {{direction}}",
                ),
            ),
        ),
    ]


AGGREGATES_NOTE = (
    " One series per group of metrics.aggregate_by (one for the whole fleet without it), summed"
    " over the selected exporters: works with every metrics.per_sim mode."
)


def by_group(expr: str) -> str:
    """``expr`` summed over the selected exporters, keeping the group's labels."""
    return f"sum without (job, instance) ({expr})"


def aggregate_panels() -> list[Json]:
    """The fleet aggregates (``twilio_wireless_fleet_*``): what the per-SIM panels show, by
    group, and what is left with ``metrics.per_sim: none``."""
    return [
        timeseries(
            "Open data sessions by group",
            "Open data sessions of each group's SIMs." + AGGREGATES_NOTE,
            "none",
            targets((by_group(m(FLEET_OPEN)), "__auto")),
        ),
        timeseries(
            "Sessions started per hour by group",
            "Data sessions started per hour by each group's SIMs; the counters keep what SIMs"
            " that moved to another group had counted, so moves show no drop." + AGGREGATES_NOTE,
            "short",
            targets((f"{by_group(rate(FLEET_STARTED))} * 3600", "__auto")),
        ),
        timeseries(
            "SIMs down by group",
            "SIMs whose latest poll failed, per group: their metrics are stale (see the exporter"
            " health row)." + AGGREGATES_NOTE,
            "none",
            targets((by_group(m(FLEET_DOWN)), "__auto")),
        ),
        timeseries(
            "Packets per second by group",
            "Packets uploaded plus downloaded per second by each group's SIMs." + AGGREGATES_NOTE,
            "pps",
            targets(
                (
                    f"{by_group(rate(FLEET_UPLOADED))}\n+ {by_group(rate(FLEET_DOWNLOADED))}",
                    "__auto",
                )
            ),
        ),
    ]


def fleet() -> Json:
    red_from_1 = thresholds((None, "green"), (1, "red"))
    panels: list[Json] = [
        row("Fleet"),
        stat(
            "SIMs monitored",
            "SIMs the selected exporters poll (configured plus discovered).",
            "none",
            f"sum({m(SIMS_MONITORED)})",
        ),
        stat(
            "SIMs up",
            f"SIMs whose latest poll of the Twilio API succeeded ({SIM_UP} == 1).",
            "none",
            f"sum({m(SIM_UP)})",
        ),
        stat(
            "SIMs down",
            "SIMs whose latest poll failed: their metrics are stale. See the exporter health "
            "row and the exporter's log.",
            "none",
            f"sum(1 - {m(SIM_UP)})",
            steps=red_from_1,
        ),
        stat(
            "Open data sessions",
            "Data sessions without an end in the latest listing, over all SIMs.",
            "none",
            f"sum({m(OPEN)})",
        ),
        stat(
            "SIMs with an open session",
            "SIMs with at least one open data session.",
            "none",
            f"sum(clamp_max({m(OPEN)}, 1))",
        ),
        stat(
            "Sessions started per hour",
            "Data sessions started per hour over all SIMs (rate over the last interval).",
            "short",
            f"sum({rate(STARTED)}) * 3600",
        ),
        *usage_panels(),
        row("Data sessions"),
        timeseries(
            "Open data sessions",
            "Open data sessions over all selected SIMs, and how many SIMs have one.",
            "none",
            targets(
                (f"sum({m(OPEN)})", "open sessions"),
                (f"sum(clamp_max({m(OPEN)}, 1))", "SIMs with an open session"),
            ),
        ),
        timeseries(
            "Session churn, fleet (per hour)",
            "Data sessions started and ended per hour over all selected SIMs. A sudden rise "
            "means many devices reconnect at once (network trouble, roll-outs).",
            "short",
            targets(
                (f"sum({rate(STARTED)}) * 3600", "started"),
                (f"sum({rate(ENDED)}) * 3600", "ended"),
            ),
        ),
        timeseries(
            "Top 10 SIMs by sessions started per hour",
            "The SIMs that start the most data sessions (per hour); a SIM far above the rest "
            "is reconnecting in a loop. Click a series for its SIM detail dashboard.",
            "short",
            targets((named(f"topk(10, {rate(STARTED)} * 3600)"), f"{{{{{NAME_LABEL}}}}}")),
            links=SERIES_SIM_LINK,
        ),
        timeseries(
            "Packets uploaded vs downloaded",
            "Packets per second moved by all selected SIMs, growth of the sessions' packet "
            "counters as seen by the poller.",
            "pps",
            targets(
                (f"sum({rate(UPLOADED)})", "uploaded"),
                (f"sum({rate(DOWNLOADED)})", "downloaded"),
            ),
        ),
        timeseries(
            "Open sessions by radio link",
            "Open data sessions split by the radio link (2G, 3G, 4G/LTE, LTE-M, NB-IoT) of each "
            "SIM's most recent session.",
            "none",
            targets((open_by("radio_link"), "{{radio_link}}")),
            stack=True,
        ),
        timeseries(
            "Open sessions by operator",
            "Open data sessions split by the mobile operator and country of each SIM's most "
            "recent session.",
            "none",
            targets(
                (
                    open_by("operator_name, operator_country"),
                    "{{operator_name}} ({{operator_country}})",
                )
            ),
            stack=True,
        ),
        panel(
            "piechart",
            "SIMs by operator country",
            "Where the SIMs are attached now: the operator country of each SIM's most recent "
            "data session.",
            "none",
            [
                target(
                    unknown_if_empty(
                        f"count by (operator_country) ({m(SESSION_INFO)})", "operator_country"
                    ),
                    "{{operator_country}}",
                    instant=True,
                )
            ],
            w=6,
            h=8,
            options={
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "pieType": "donut",
                "displayLabels": ["name"],
                "legend": {"displayMode": "table", "placement": "right", "values": ["value"]},
                "tooltip": {"mode": "single", "sort": "none"},
            },
        ),
        panel(
            "bargauge",
            "SIMs by radio link",
            "How many SIMs use each radio link in their most recent data session.",
            "none",
            [
                target(
                    unknown_if_empty(f"count by (radio_link) ({m(SESSION_INFO)})", "radio_link"),
                    "{{radio_link}}",
                    instant=True,
                )
            ],
            w=6,
            h=8,
            options=BAR_OPTIONS,
        ),
        row("Location"),
        geomap(
            "SIM locations (cell estimate)",
            "Each SIM at the cell location estimate of its most recent session that has one "
            "(cell tower, not GPS: expect hundreds of metres to kilometres of error).",
            SEL,
            w=24,
            h=12,
        ),
        row("Session duration"),
        panel(
            "heatmap",
            "Session duration distribution",
            "Durations (end - start) of the data sessions that ended, per interval, from the "
            f"histogram {DURATION}.",
            "short",
            [
                target(
                    f"sum by (le) ({rate(DURATION_BUCKET, fn='increase')})",
                    "{{le}}",
                    fmt="heatmap",
                )
            ],
            w=12,
            h=8,
            options={
                "calculate": False,
                "yAxis": {"axisPlacement": "left", "unit": "s", "reverse": False},
                "rowsFrame": {"layout": "auto"},
                "color": {
                    "mode": "scheme",
                    "scheme": "Oranges",
                    "fill": "dark-orange",
                    "scale": "exponential",
                    "exponent": 0.5,
                    "steps": 64,
                    "reverse": False,
                },
                "cellGap": 1,
                "filterValues": {"le": 1e-9},
                "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
                "legend": {"show": True},
                "exemplars": {"color": "rgba(255,0,255,0.7)"},
                "showValue": "never",
            },
        ),
        timeseries(
            "Session duration percentiles",
            "Median, 90th and 99th percentile of the duration of ended data sessions "
            "(estimated from histogram buckets, 1 minute to 7 days).",
            "s",
            targets(
                (hq(0.5, DURATION_BUCKET), "p50"),
                (hq(0.9, DURATION_BUCKET), "p90"),
                (hq(0.99, DURATION_BUCKET), "p99"),
            ),
        ),
        row("Quiet SIMs"),
        table(
            "SIMs longest without a new data session",
            "The 20 SIMs whose most recent data session started longest ago, with their open "
            "sessions. A SIM with no open session here for hours is offline "
            "(alert TwilioWirelessSimOffline). SIMs without any session in the API's retention "
            "window have no start time and are not listed.",
            "s",
            [
                target(
                    named(f"topk(20, time() - {m(LAST_START)})"), ref="A", instant=True, fmt="table"
                ),
                target(
                    named(f"{m(OPEN)}\n  and {JOIN_ON} topk(20, time() - {m(LAST_START)})"),
                    ref="B",
                    instant=True,
                    fmt="table",
                ),
            ],
            w=24,
            h=9,
            merge=True,
            rename={
                NAME_LABEL: "SIM",
                "sim_sid": "SID",
                "Value #A": "Since last session start",
                "Value #B": "Open sessions",
            },
            order=[NAME_LABEL, "sim_sid", "Value #A", "Value #B", "instance"],
            sort_by="Since last session start",
            links=ROW_SIM_LINK,
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "Open sessions"},
                    "properties": [{"id": "unit", "value": "none"}],
                }
            ],
        ),
        row("Fleet aggregates"),
        *aggregate_panels(),
        row("Exporter health"),
        timeseries(
            "Twilio API requests by status code",
            "Requests per second from the exporters to the Twilio API by HTTP status code "
            "('error': no response, e.g. timeout or connection failure). 401/403 mean bad "
            "credentials (alert TwilioWirelessApiAuthFailure).",
            "reqps",
            targets((f"sum by (code) ({rate(REQUESTS)})", "{{code}}")),
            stack=True,
        ),
        timeseries(
            "Rate limiting and retries",
            "HTTP 429 (rate limited) responses and retries per second, by reason. Sustained "
            "429s: lower poll.requests_per_second or raise poll.interval.",
            "reqps",
            targets(
                (f"sum({rate(REQUESTS, extra=CODE_429)})", "429 responses"),
                (
                    f"sum by (reason) ({rate(RETRIES)})",
                    "retries: {{reason}}",
                ),
            ),
        ),
        timeseries(
            "Twilio API request latency",
            "Median and 99th percentile latency of requests to the Twilio API, by endpoint.",
            "s",
            targets(
                (
                    hq(0.5, REQUEST_DURATION_BUCKET, "le, endpoint"),
                    "p50 {{endpoint}}",
                ),
                (
                    hq(0.99, REQUEST_DURATION_BUCKET, "le, endpoint"),
                    "p99 {{endpoint}}",
                ),
            ),
        ),
        timeseries(
            "Poll staleness",
            "Age of the newest successful poll: the oldest over all SIMs and the median. It "
            "should stay near poll.interval; growth means polls fail or the exporter cannot "
            "keep up. A SIM above the dashed line (3 x poll.interval, at least 15 minutes) "
            "for 5 minutes fires TwilioWirelessPollStale.",
            "s",
            targets(
                (f"max(time() - {m(LAST_POLL)})", "oldest"),
                (f"quantile(0.5, time() - {m(LAST_POLL)})", "median"),
                poll_stale_threshold(),
            ),
            overrides=DASHED_THRESHOLD,
        ),
        timeseries(
            "Usage read staleness",
            "Age of the newest successful read of the usage records: the oldest and the median "
            "over all SIMs, and the account's (usage.account). It should stay near "
            "usage.interval; growth means usage reads fail (twilio_wireless_poll_errors_total "
            "with endpoint usage_records) or queue behind the session polls.",
            "s",
            targets(
                (f"max(time() - {m(USAGE_LAST)})", "oldest SIM"),
                (f"quantile(0.5, time() - {m(USAGE_LAST)})", "median SIM"),
                (f"max(time() - {m(ACCOUNT_USAGE_LAST)})", "account"),
            ),
        ),
        timeseries(
            "SIMs up / down",
            "SIMs whose latest poll succeeded (up) or failed (down), over time.",
            "none",
            targets(
                (f"sum({m(SIM_UP)})", "up"),
                (f"sum(1 - {m(SIM_UP)})", "down"),
            ),
            stack=True,
        ),
        table(
            "Stalest SIMs",
            "The 10 SIMs whose last successful poll is oldest, and whether their latest poll "
            "succeeded (1) or failed (0).",
            "s",
            [
                target(
                    named(f"topk(10, time() - {m(LAST_POLL)})"), ref="A", instant=True, fmt="table"
                ),
                target(
                    named(f"{m(SIM_UP)}\n  and {JOIN_ON} topk(10, time() - {m(LAST_POLL)})"),
                    ref="B",
                    instant=True,
                    fmt="table",
                ),
            ],
            w=12,
            h=8,
            merge=True,
            rename={
                NAME_LABEL: "SIM",
                "sim_sid": "SID",
                "Value #A": "Since last successful poll",
                "Value #B": "Up",
            },
            order=[NAME_LABEL, "sim_sid", "Value #A", "Value #B", "instance"],
            sort_by="Since last successful poll",
            links=ROW_SIM_LINK,
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "Up"},
                    "properties": [{"id": "unit", "value": "none"}],
                }
            ],
        ),
    ]
    return dashboard(
        FLEET_UID,
        "Twilio Wireless / Fleet overview",
        "Data sessions, churn, traffic, radio and operators, location and exporter health of a "
        "fleet of Twilio Programmable Wireless SIMs (twilio-wireless-exporter).",
        panels,
        with_sim=False,
    )


# --------------------------------------------------------------------------------------------
# SIM detail


# The limit line of the usage panel is dashed red, so that it does not read as usage.
DASHED_LIMIT = [
    {
        "matcher": {"id": "byName", "options": "home data limit"},
        "properties": [
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.fillOpacity", "value": 0},
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        ],
    }
]


def sim_usage_panels(s: str) -> list[Json]:
    """The SIM detail dashboard's data usage row, for the SIMs of selector ``s``."""
    limit = f"{home_limit()}\n  and {PLAN_ON} {m(SIM_INFO, s)}"
    return [
        row("Data usage"),
        stat(
            "Data used this period",
            "Bytes the SIM used in its current metering period (all networks), as the API "
            "reports them now." + LAG,
            "bytes",
            f"sum({m(PERIOD_BYTES, s, TOTAL)})",
        ),
        stat(
            "Share of the plan's data limit",
            "Share of its rate plan's home-network data limit the SIM used this period (with "
            "usage.roaming_split home-network bytes only). 80 % fires "
            "TwilioWirelessSimDataLimitNear, 100 % TwilioWirelessSimDataLimitReached. Empty when "
            "the plan sets no limit.",
            "percentunit",
            f"max(\n  {limit_share(s)}\n)",
            steps=LIMIT_STEPS,
        ),
        stat(
            "Home data limit",
            "The data limit of the SIM's rate plan on the home network per metering period "
            "(data_limit, 1 MB = 1,048,576 bytes).",
            "bytes",
            f"max(\n  {limit}\n)",
            graph=False,
        ),
        stat(
            "Metering period started",
            "Start of the SIM's current metering period (usage.period_start_day, or the SIM's "
            "usage_period_start_day): the day its plan's limit starts again.",
            "dateTimeAsIso",
            f"max({m(PERIOD_START, s)}) * 1000",
            graph=False,
        ),
        stat(
            "Last usage read",
            "When the exporter last read the SIM's usage records successfully (once per "
            "usage.interval). The usage itself lags by 24 to 48 hours.",
            "dateTimeFromNow",
            f"max({m(USAGE_LAST, s)}) * 1000",
            graph=False,
        ),
        stat(
            "Connectivity reset",
            "Whether a connectivity reset of the SIM is in progress (reset_status resetting).",
            "none",
            f"max({m(RESETTING, s)})",
            mappings=value_map(("0", "No", "green"), ("1", "In progress", "orange")),
            graph=False,
        ),
        timeseries(
            "Data this period against the limit",
            "Bytes of the SIM's current metering period (all networks, upload and download "
            "together) and the home data limit of its rate plan (dashed). The usage drops to "
            "zero when a new period starts." + LAG,
            "bytes",
            targets(
                (named(period_total(s), s), "used this period"),
                (limit, "home data limit"),
            ),
            overrides=DASHED_LIMIT,
        ),
        timeseries(
            "Share of the plan's data limit over time",
            "Share of its plan's home data limit the SIM used this period; the dashed lines are "
            "the thresholds of TwilioWirelessSimDataLimitNear (80 %) and "
            "TwilioWirelessSimDataLimitReached (100 %).",
            "percentunit",
            targets((named(limit_share(s), s), "share of the limit")),
            threshold_lines=LIMIT_STEPS,
        ),
        per_day(
            "Data reported per day",
            "Bytes the API added to the SIM's usage records per day, upload and download (last "
            "14 days). The API reports a day's usage over the next one or two days, so each bar "
            "also holds late revisions of the days before. A day 5 times the average fires "
            "TwilioWirelessSimDataUsageSpike, two quiet days after daily use "
            "TwilioWirelessSimDataStopped.",
            named(rate(DATA_BYTES, s, fn="increase"), s),
        ),
        timeseries(
            "Commands",
            "SMS and IP commands from and to the SIM per interval, from its usage records (they "
            "lag like the data). The command text is never exported.",
            "short",
            targets((named(rate(COMMANDS, s, fn="increase"), s), "{{direction}}")),
            bars=True,
        ),
        state_timeline(
            "Status and rate plan over time",
            "The SIM's status and rate plan from /v1/Sims over time, one line per combination, "
            "filled while it was current. Leaving active fires TwilioWirelessSimLeftActive.",
            targets((named(m(SIM_INFO, s), s), "{{status}} · {{rate_plan_sid}}")),
            w=12,
            h=8,
            mappings=value_map(("1", "current", "blue")),
        ),
        timeseries(
            "Status changes",
            "Changes of the SIM's status the exporter saw, per interval.",
            "short",
            targets((named(rate(STATUS_CHANGES, s, fn="increase"), s), "status changes")),
            bars=True,
        ),
    ]


def sim_detail() -> Json:
    s = SIM_SEL
    ago = "dateTimeFromNow"
    panels: list[Json] = [
        row("SIM"),
        table(
            "SIM identity",
            f"Name, Twilio unique and friendly name, status and rate plan of the SIM ({SIM_INFO}).",
            "none",
            [target(named(m(SIM_INFO, s), s), instant=True, fmt="table")],
            w=12,
            h=4,
            hide=("Time", "__name__", "job", "Value"),
            rename={
                NAME_LABEL: "SIM",
                "sim_sid": "SID",
                "unique_name": "Unique name",
                "friendly_name": "Friendly name",
                "status": "Status",
                "rate_plan_sid": "Rate plan",
            },
            order=[
                NAME_LABEL,
                "sim_sid",
                "unique_name",
                "friendly_name",
                "status",
                "rate_plan_sid",
            ],
        ),
        table(
            "Most recent session",
            "Radio link and mobile operator (name, country, MCC/MNC) of the SIM's most recent "
            f"data session ({SESSION_INFO}).",
            "none",
            [target(named(m(SESSION_INFO, s), s), instant=True, fmt="table")],
            w=12,
            h=4,
            hide=("Time", "__name__", "job", "Value", NAME_LABEL),
            rename={
                "sim_sid": "SID",
                "radio_link": "Radio link",
                "operator_name": "Operator",
                "operator_country": "Country",
                "operator_mcc": "MCC",
                "operator_mnc": "MNC",
            },
            order=[
                "radio_link",
                "operator_name",
                "operator_country",
                "operator_mcc",
                "operator_mnc",
                "sim_sid",
            ],
        ),
        stat(
            "Poll status",
            "Whether the exporter's latest poll of this SIM succeeded.",
            "none",
            f"min({m(SIM_UP, s)})",
            mappings=value_map(("0", "Down", "red"), ("1", "Up", "green")),
            graph=False,
        ),
        stat(
            "Open sessions",
            "Data sessions of this SIM without an end in the latest listing.",
            "none",
            f"sum({m(OPEN, s)})",
        ),
        stat(
            "Sessions started per hour",
            "Data sessions this SIM started per hour (rate over the last interval).",
            "short",
            f"sum({rate(STARTED, s)}) * 3600",
            steps=thresholds((None, "green"), (12, "orange")),
        ),
        stat(
            "Last session started",
            "When the SIM's most recent data session started.",
            ago,
            f"max({m(LAST_START, s)}) * 1000",
            graph=False,
        ),
        stat(
            "Session data updated",
            "The newest last_updated of the SIM's data sessions (Twilio updates them during a "
            "session).",
            ago,
            f"max({m(LAST_UPDATED, s)}) * 1000",
            graph=False,
        ),
        stat(
            "Last successful poll",
            "When the exporter last polled this SIM successfully.",
            ago,
            f"max({m(LAST_POLL, s)}) * 1000",
            graph=False,
        ),
        *sim_usage_panels(s),
        row("Sessions and traffic"),
        timeseries(
            "Open data sessions",
            "Open data sessions of the SIM over time.",
            "none",
            targets((named(m(OPEN, s), s), "open sessions")),
        ),
        timeseries(
            "Session churn (per hour)",
            "Data sessions the SIM started and ended per hour. More than 12 per hour for 30 "
            "minutes fires TwilioWirelessSimSessionChurnHigh.",
            "short",
            targets(
                (named(f"{rate(STARTED, s)} * 3600", s), "started"),
                (named(f"{rate(ENDED, s)} * 3600", s), "ended"),
            ),
        ),
        timeseries(
            "Packets uploaded vs downloaded",
            "Packets per second moved by the SIM (growth of its sessions' packet counters).",
            "pps",
            targets(
                (named(rate(UPLOADED, s), s), "uploaded"),
                (named(rate(DOWNLOADED, s), s), "downloaded"),
            ),
        ),
        timeseries(
            "IMEI changes",
            "Times the IMEI of the SIM's most recent session changed (the SIM moved to another "
            "device), per interval. Fires TwilioWirelessSimImeiChanged.",
            "short",
            targets(
                (
                    named(rate(IMEI_CHANGES, s, fn="increase"), s),
                    "IMEI changes",
                )
            ),
            bars=True,
        ),
        row("Radio, operator and location"),
        state_timeline(
            "Radio link and operator history",
            "Radio link and operator of the SIM's most recent session over time: one line per "
            "combination, filled while it was current.",
            targets(
                (
                    named(m(SESSION_INFO, s), s),
                    "{{radio_link}} · {{operator_name}} ({{operator_country}} "
                    "{{operator_mcc}}-{{operator_mnc}})",
                )
            ),
            w=24,
            h=7,
            mappings=value_map(("1", "current", "blue")),
        ),
        geomap(
            "Location (cell estimate)",
            "The cell location estimate of the SIM's most recent session that has one.",
            s,
            w=12,
            h=10,
        ),
        timeseries(
            "Cell location estimate over time",
            "Latitude and longitude of the SIM's cell location estimate; steps mean the SIM "
            "moved or attached to another cell.",
            "degree",
            targets(
                (named(m(LATITUDE, s), s), "latitude"),
                (named(m(LONGITUDE, s), s), "longitude"),
            ),
            h=10,
            defaults={"custom": {"axisSoftMin": None}},
        ),
        row("Poll health"),
        timeseries(
            "Time since last successful poll",
            "Age of the SIM's newest successful poll; should stay near poll.interval. Above "
            "the dashed line (3 x poll.interval, at least 15 minutes) for 5 minutes fires "
            "TwilioWirelessPollStale.",
            "s",
            targets(
                (named(f"time() - {m(LAST_POLL, s)}", s), "since last successful poll"),
                poll_stale_threshold(),
            ),
            w=8,
            overrides=DASHED_THRESHOLD,
        ),
        state_timeline(
            "Poll status over time",
            "Whether each poll of this SIM succeeded (up) or failed (down). Down for 15 "
            "minutes fires TwilioWirelessSimDown.",
            targets((named(m(SIM_UP, s), s), "{{display_name}}")),
            w=8,
            h=8,
            mappings=value_map(("0", "down", "red"), ("1", "up", "green")),
        ),
        timeseries(
            "Age of session data",
            "Time since the SIM's most recent session started and since Twilio last updated "
            "its sessions. Without an open session, a start more than 6 hours ago fires "
            "TwilioWirelessSimOffline.",
            "s",
            targets(
                (named(f"time() - {m(LAST_START, s)}", s), "since last session start"),
                (named(f"time() - {m(LAST_UPDATED, s)}", s), "since last update"),
            ),
            w=8,
        ),
    ]
    return dashboard(
        SIM_UID,
        "Twilio Wireless / SIM detail",
        "One SIM of a Twilio Programmable Wireless fleet: identity, data sessions, traffic, "
        "radio link and operator history, location, IMEI changes and poll health.",
        panels,
        with_sim=True,
    )


# --------------------------------------------------------------------------------------------

DASHBOARDS = {
    "twilio-wireless-fleet.json": fleet,
    "twilio-wireless-sim.json": sim_detail,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: render(build) for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date (run python3 grafana/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
