#!/usr/bin/env python3
"""Render a preview of the fleet overview dashboard as SVG from a live Prometheus.

It runs the dashboard's own panel queries (from grafana/dashboards/twilio-wireless-fleet.json,
with the variables set to All and $__rate_interval to --rate-interval) as range queries and
draws them as line charts, so the picture shows what the dashboard shows for real data.

    python3 grafana/preview/render_preview.py --prometheus http://127.0.0.1:9090 \
        --minutes 15 --out grafana/preview/fleet-overview.svg

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from html import escape
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "twilio-wireless-fleet.json"
PANELS = [
    "Open data sessions",
    "Session churn, fleet (per hour)",
    "Open sessions by radio link",
    "Packets uploaded vs downloaded",
    "Session duration percentiles",
    "Twilio API requests by status code",
]
COLORS = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#B877D9", "#5794F2", "#FADE2A"]
W, H, COLS, PAD = 600, 270, 2, 12
Series = tuple[str, list[tuple[float, float]]]


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    url = f"{base}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 (URL from the command line)
        doc = json.loads(resp.read())
    result: list[Any] = doc["data"]["result"]
    return result


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def substitute(expr: str, rate_interval: str) -> str:
    expr = expr.replace('job=~"$job"', 'job=~".+"').replace(
        'instance=~"$instance"', 'instance=~".+"'
    )
    return expr.replace("$__rate_interval", rate_interval)


def fmt_value(value: float, unit: str) -> str:
    if unit == "s":
        for seconds, suffix in ((86400, "d"), (3600, "h"), (60, "min")):
            if abs(value) >= seconds:
                return f"{value / seconds:.3g} {suffix}"
        return f"{value:.3g} s"
    suffix = {"reqps": " req/s", "pps": " p/s"}.get(unit, "")
    for size, prefix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{prefix}{suffix}"
    return f"{value:.3g}{suffix}"


def chart(x0: float, y0: float, panel: dict[str, Any], series: list[Series]) -> list[str]:
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    stacked = panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode")
    out = [
        f'<rect x="{x0}" y="{y0}" width="{W - PAD}" height="{H - PAD}" rx="3" fill="#181b1f" '
        'stroke="#2c3235"/>',
        f'<text x="{x0 + 10}" y="{y0 + 20}" fill="#d8d9da" font-size="13" font-weight="600">'
        f"{escape(panel['title'])}</text>",
    ]
    left, top = x0 + 62.0, y0 + 34.0
    width, height = W - PAD - 80.0, H - PAD - 90.0
    if stacked == "normal" and series:
        totals: dict[float, float] = {}
        stacked_series: list[Series] = []
        for name, points in series:
            new_points = []
            for t, v in points:
                totals[t] = totals.get(t, 0.0) + v
                new_points.append((t, totals[t]))
            stacked_series.append((name, new_points))
        series = stacked_series
    values = [v for _, pts in series for _, v in pts if math.isfinite(v)]
    times = [t for _, pts in series for t, _ in pts]
    if not values:
        out.append(f'<text x="{left}" y="{top + 40}" fill="#8e8e8e">No data</text>')
        return out
    lo, hi = min(0.0, min(values)), max(values)
    hi = hi if hi > lo else lo + 1
    t_lo, t_hi = min(times), max(times)
    t_span = (t_hi - t_lo) or 1

    def xy(t: float, v: float) -> str:
        x = left + (t - t_lo) / t_span * width
        y = top + (1 - (v - lo) / (hi - lo)) * height
        return f"{x:.1f},{y:.1f}"

    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = top + (1 - i / 4) * height
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#2c3235"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" fill="#8e8e8e" font-size="10" '
            f'text-anchor="end">{escape(fmt_value(v, unit))}</text>'
        )
    for i in range(4):
        t = t_lo + t_span * i / 3
        label = time.strftime("%H:%M", time.gmtime(t))
        out.append(
            f'<text x="{left + width * i / 3:.1f}" y="{top + height + 14}" fill="#8e8e8e" '
            f'font-size="10" text-anchor="middle">{label}</text>'
        )
    below: list[tuple[float, float]] = []
    legend_x, legend_y = x0 + 14.0, y0 + H - PAD - 26.0
    for i, (name, points) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        finite = [(t, v) for t, v in points if math.isfinite(v)]
        if finite and stacked == "normal":
            floor = below or [(t, lo) for t, _ in finite]
            area = " ".join(xy(t, v) for t, v in [*finite, *reversed(floor)])
            out.append(
                f'<polygon points="{area}" fill="{color}" fill-opacity="0.25" stroke="none"/>'
            )
            below = finite
        if finite:
            path = " ".join(xy(t, v) for t, v in finite)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>'
            )
        label = escape(name[:26])
        item_width = 24 + 6 * len(name[:26])
        if legend_x + item_width > x0 + W - PAD and legend_x > x0 + 14:
            legend_x, legend_y = x0 + 14.0, legend_y + 14
        lx, ly = legend_x, legend_y
        legend_x += item_width
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{color}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly - 3}" fill="#ccccdc" font-size="10">{label}</text>')
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prometheus", required=True, help="base URL of the Prometheus")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--rate-interval", default="1m")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = {p["title"]: p for p in dashboard["panels"]}
    end = time.time()
    start = end - args.minutes * 60
    step = max(5.0, args.minutes * 60 / 240)
    rows = math.ceil(len(PANELS) / COLS)
    body: list[str] = []
    for i, title in enumerate(PANELS):
        panel = panels[title]
        series: list[Series] = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], args.rate_interval)
            for s in query_range(args.prometheus.rstrip("/"), expr, start, end, step):
                points = [(float(t), float(v)) for t, v in s["values"]]
                series.append((legend(target["legendFormat"], s["metric"]), points))
        series.sort(key=lambda item: item[0])
        body += chart(PAD + (i % COLS) * W, 40 + (i // COLS) * H, panel, series)
    total_w, total_h = COLS * W + PAD, 40 + rows * H
    header = (
        f'<text x="{PAD}" y="26" fill="#d8d9da" font-size="16" font-weight="600">'
        f"{escape(dashboard['title'])} (preview: real queries, exporter --demo, "
        f"{args.minutes:g} minutes)</text>"
    )
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'viewBox="0 0 {total_w} {total_h}" font-family="Inter, Helvetica, Arial, sans-serif">',
        f'<rect width="{total_w}" height="{total_h}" fill="#111217"/>',
        header,
        *body,
        "</svg>",
    ]
    args.out.write_text("\n".join(svg) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
