"""The benchmark (benchmarks/run.py) runs end to end at a tiny size and computes every figure.

Not a timed test: numbers are only checked to be finite and positive. The real measurements
come from running the script itself (docs/performance.md says how).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.e2e
@pytest.mark.slow
def test_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sims", "20", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())

    (size,) = results["sizes"]
    cycle = size["poll_cycle"]
    assert cycle["sims"] == 20
    for client in ("bare_aiohttp", "project", "twilio_sdk"):
        assert positive(cycle[client]["wall_s"]), client
        assert cycle[client]["sessions"] > 0, client
    assert all(positive(r) for r in cycle["ratios"].values()), cycle["ratios"]
    assert cycle["requests_per_sim_per_cycle"] == 1.0  # one page per SIM: 6 h of sessions fit

    scenarios = size["scrape"]["scenarios"]
    assert {(s["path"], s["scrapers"], s["gzip"]) for s in scenarios} >= {
        ("fast", 1, False),
        ("fast", 1, True),
        ("fast", 10, False),
        ("fast", 10, True),
        ("stock", 1, False),
        ("stock", 1, True),
    }
    for s in scenarios:
        assert positive(s["p50_ms"])
        assert s["p99_ms"] >= s["p50_ms"]
        assert s["lag_max_ms"] >= 0

    render = size["render"]
    assert all(positive(v) for k, v in render.items() if k.endswith("_ms"))
    memory = size["memory"]
    assert all(math.isfinite(v) for k, v in memory.items() if k.endswith("_per_sim"))

    cap = results["concurrency_cap"]
    assert cap["cycles"][-1]["polls_lost"] == 0
    assert positive(cap["steady_vs_bare_at_cap"])

    assert set(results["goals_met"]) == {
        "poll_wall_vs_bare",
        "sdk_vs_project",
        "scrape_p99_plain",
        "scrape_p99_gzip",
        "memory_per_sim",
        "requests_per_sim",
        "no_poll_lost_under_cap",
    }
    assert all(isinstance(v, bool) for v in results["goals_met"].values())

    machine = results["machine"]
    assert machine["cores"] >= 1
    assert machine["python"]
    # the report names no host and no path of this machine
    text = out.read_text()
    assert "127.0.0.1" not in text
    assert str(Path.home()) not in text
    assert "Poll cycle" in proc.stdout


PROCESS_SCRIPT = SCRIPT.parent / "process.py"


@pytest.mark.e2e
@pytest.mark.slow
def test_process_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """benchmarks/process.py: the real command against the simulator's process, every figure
    computed; a per_sim mode the config refuses is skipped with the reason, not a failure."""
    out, table = tmp_path / "results.json", tmp_path / "table.md"
    proc = subprocess.run(
        [
            *(sys.executable, str(PROCESS_SCRIPT), "--sims", "200", "--quick"),
            *("--modes", "default,none", "--out", str(out), "--markdown", str(table)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())

    (size,) = results["sizes"]
    assert size["sims"] == 200
    (run,) = size["runs"]
    bare, cycle = run["bare"], run["cycle"]
    for figure in ("first_cycle_s", "steady_cycle_s"):
        assert positive(bare[figure]), figure
        assert positive(cycle[figure]), figure
    assert positive(cycle["start_to_first_request_s"])
    assert cycle["errors"] == 0
    # every SIM listed once in the first round; its identity read somewhere in the two rounds
    assert cycle["requests_per_sim_first_cycle"]["data_sessions"] == 1.0
    assert cycle["identity_requests"] >= 1

    default, *others = run["modes"]
    assert default["mode"] == "default"
    assert positive(default["rss_bytes"])
    assert default["series"] > 200  # at least one series per SIM
    assert default["gzip_body_bytes"] < default["body_bytes"]
    assert {(s["scrapers"], s["gzip"]) for s in default["scrapes"]} == {
        (1, False),
        (1, True),
        (10, False),
        (10, True),
    }
    for scrape in default["scrapes"]:
        assert positive(scrape["p50_ms"])
        assert scrape["p99_ms"] >= scrape["p50_ms"]
    for mode in others:  # measured once metrics.per_sim exists, skipped with a reason before
        assert "skipped" in mode or positive(mode["series"]), mode

    summary = size["summary"]
    for name in ("first_cycle_vs_bare", "steady_cycle_vs_bare", "default.rss_per_sim_kb"):
        assert math.isfinite(summary[name]["median"]), name
    assert set(size["goals_met"]) >= {"first_cycle_vs_bare", "identity_requests", "rss_per_sim"}
    assert "first full cycle, exporter / bare loop" in table.read_text()
    text = out.read_text()
    assert "127.0.0.1" not in text
    assert str(Path.home()) not in text
