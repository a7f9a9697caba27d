"""Scale-out with real processes, as a StatefulSet of N shards runs them.

One simulator process (``tests.scaleout_support``: the real simulator app on a manual clock the
test moves), three exporter processes started with ``--shard 0/3``, ``1/3`` and ``2/3``, one
unsharded exporter on the same simulator for comparison, all with the same configuration
(discovery on: every replica lists the account's SIMs and keeps its own), and a real Prometheus
that discovers the three shards through ``file_sd`` and has the shipped rules loaded. Each
exporter authenticates with an API key of its own, so the simulator can tell who asked for what.

The simulated clock stands still until every exporter has polled every SIM once (the baseline),
then moves 6 simulated hours in one step and stands still again: from then on every poll of
every exporter sees exactly the same answers, so the shards' sums must equal the unsharded
exporter's values exactly. Then one shard is killed with SIGKILL: its SIMs' series must go stale
in Prometheus (absent, not zero), ``TwilioWirelessShardMissing`` must fire, and the other shards
must carry on.

``TwilioWirelessShardMissing`` ships with ``for: 10m``; this test loads a copy of the rule files
in which only that alert's ``for`` is ``3s`` (every other rule as shipped), so that it can see
it fire. Measured figures are printed (``pytest -s``) and recorded in docs/performance.md.
Every wait has a deadline; nothing sleeps blindly except the one measuring window of the API
request count.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metrics_support import SampleKey, parse_samples
from tests.process_support import LISTENING, stop_process, wait_for_log_line
from tests.prom_support import (
    ALERTS_DIR,
    RULE_FILES,
    Json,
    Prometheus,
    http_get,
    require_tool,
    wait_for,
    write_file_sd,
)
from tests.scaleout_support import ScaleoutSimulator, scaleout_simulator
from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.sharding import shard_of
from twilio_wireless_simulator import DEMO_ACCOUNT_SID

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SHARDS = 3
SIMS = 60
SEED = 13
POLL_INTERVAL = 3.0  # seconds (wall): every SIM is listed once per interval
ADVANCE = 6 * 3600.0  # simulated seconds moved in one step after the baseline
#: A poll that finished more than a poll interval and this margin after the step listed after
#: it (its listing would otherwise have taken longer than that to process).
SETTLE_MARGIN = 0.5
WINDOW_INTERVALS = 3  # poll intervals over which the API's listings are counted
SHARD_JOB = "twilio-wireless-shards"
SINGLE_JOB = "twilio-wireless-single"
ALERT = "TwilioWirelessShardMissing"
SHIPPED_FOR = "10m"
TEST_FOR = "3s"
KILLED = 1  # the shard index the test kills
DEADLINE = 30.0  # seconds for any one wait

#: Per-SIM series that legitimately differ between two exporters: when each one polled.
POLL_TIME_SERIES = {names.LAST_SUCCESS.sample}
#: Fleet-wide series the shards' sums must reproduce.
FLEET_SUMMED = {*names.SESSION_DURATION.series, names.SIMS_MONITORED.sample}
#: Families whose fleet-wide sums are compared in Prometheus.
SUMMED_IN_PROMETHEUS = (
    names.SESSIONS_OPEN.sample,
    names.SESSIONS_STARTED.sample,
    names.SESSIONS_ENDED.sample,
    names.PACKETS_UP.sample,
    names.PACKETS_DOWN.sample,
    names.IMEI_CHANGES.sample,
    names.SIM_UP.sample,
    names.SIM_INFO.sample,
    names.SIMS_MONITORED.sample,
    names.SESSION_DURATION.name + "_count",
    names.SESSION_DURATION.name + "_sum",
)


def api_key(n: int) -> tuple[str, str]:
    """The API key (SID, secret) of exporter ``n`` (0..2 the shards, 3 the unsharded one)."""
    return f"SK{n + 1:032x}", f"scaleout-secret-{n}"


@dataclass
class Exporter:
    name: str
    key: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""  # host:port, once it logged it
    shard: int | None = None  # None: the unsharded one

    def metrics(self) -> dict[SampleKey, float]:
        return parse_samples(http_get(f"http://{self.address}/metrics"))


@dataclass
class Cluster:
    simulator: ScaleoutSimulator
    shards: list[Exporter]
    single: Exporter
    prometheus: Prometheus
    sids: list[str]  # the SIMs the unsharded exporter watches (every active SIM)
    settled_at: float  # wall time by which every exporter has polled every SIM after the step
    requests_at_settle: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    killed: bool = False

    def owned(self, shard: int) -> list[str]:
        return [sid for sid in self.sids if shard_of(sid, SHARDS) == shard]

    def log_tail(self) -> str:
        logs = [self.simulator.log, *(e.log for e in (*self.shards, self.single))]
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs]
        parts.append(f"--- prometheus\n{self.prometheus.log.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)


def report(cluster: Cluster, **figures: Any) -> None:
    cluster.figures.update(figures)
    for key, value in figures.items():
        print(f"scale-out: {key} = {value}")


def start_exporter(workdir: Path, name: str, n: int, config: Path, shard: int | None) -> Exporter:
    key, secret = api_key(n)
    env = {
        **os.environ,
        "TWILIO_ACCOUNT_SID": DEMO_ACCOUNT_SID,
        "TWILIO_API_KEY": key,
        "TWILIO_API_SECRET": secret,
    }
    env.pop("TWILIO_AUTH_TOKEN", None)
    command = [
        sys.executable,
        "-m",
        "twilio_wireless_exporter",
        f"--config={config}",
        "--web.listen-address=127.0.0.1:0",
        "--log.level=info",
    ]
    if shard is not None:
        command.append(f"--shard={shard}/{SHARDS}")
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Exporter(name, key, proc, log, shard=shard)


def exporter_config(workdir: Path, sim_url: str) -> Path:
    """The one configuration every replica runs (the shard comes from the flag)."""
    config = {
        "twilio": {"base_url": sim_url, "timeout": "2s"},
        "poll": {
            "interval": f"{POLL_INTERVAL:g}s",
            "page_size": 1000,  # one page per listing: a request is a listing
            "concurrency": 8,
            "requests_per_second": 500.0,
            "max_retries": 2,
            "backoff_initial": "100ms",
            "backoff_max": "1s",
        },
        "discovery": {"enabled": True, "status": ["active"], "refresh_interval": "10s"},
    }
    path = workdir / "exporter.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def rules_with_short_for(workdir: Path) -> list[Path]:
    """The shipped rule files, with only the shard alert's ``for`` shortened to TEST_FOR."""
    alerts_file = ALERTS_DIR / "twilio-wireless-alerts.yaml"
    doc = yaml.safe_load(alerts_file.read_text(encoding="utf-8"))
    rules = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    assert len(rules) == 1, f"{ALERT} is not in {alerts_file.name}"
    assert rules[0]["for"] == SHIPPED_FOR, "the shipped for: changed; update this test's note"
    rules[0]["for"] = TEST_FOR
    copy = workdir / alerts_file.name
    copy.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return [copy if path == alerts_file else path for path in RULE_FILES]


def scraped_after(prom: Prometheus, selector: str, since: float) -> bool:
    """Prometheus holds a sample of every series of ``selector`` scraped after ``since``."""
    oldest = prom.query(f"min(timestamp({selector}))")
    return bool(oldest) and float(oldest[0]["value"][1]) > since


def ready(exporter: Exporter) -> bool:
    if exporter.proc.poll() is not None:
        raise AssertionError(f"{exporter.name} exited: {exporter.log.read_text(errors='replace')}")
    http_get(f"http://{exporter.address}/-/ready", timeout=1)  # 503 raises HTTPError (OSError)
    return True


def polled_after(exporter: Exporter, since: float) -> bool:
    """Every SIM of ``exporter`` was last polled successfully after ``since`` (unix time)."""
    samples = exporter.metrics()
    times = [v for (name, _), v in samples.items() if name == names.LAST_SUCCESS.sample]
    return bool(times) and min(times) > since


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("scaleout")
    keys = dict(api_key(n) for n in range(SHARDS + 1))
    with contextlib.ExitStack() as stack:
        simulator = stack.enter_context(
            scaleout_simulator(workdir, sims=SIMS, seed=SEED, api_keys=keys, repo=REPO)
        )
        config = exporter_config(workdir, simulator.url)
        shards = [start_exporter(workdir, f"shard-{i}", i, config, i) for i in range(SHARDS)]
        single = start_exporter(workdir, "single", SHARDS, config, None)
        for exporter in (*shards, single):
            stack.callback(stop_process, exporter.proc)
        for exporter in (*shards, single):
            url = wait_for_log_line(exporter.log, LISTENING, exporter.proc, within=DEADLINE)["url"]
            exporter.address = url.removeprefix("http://")

        targets = workdir / "shards.json"
        write_file_sd(targets, [e.address for e in shards])
        prometheus = Prometheus(
            binary,
            workdir,
            {SINGLE_JOB: single.address},
            file_sd={SHARD_JOB: targets},
            rule_files=rules_with_short_for(workdir),
        )
        prometheus.start()
        stack.callback(prometheus.stop)

        # The baseline: every exporter has polled every SIM at the same simulated instant.
        for exporter in (*shards, single):
            wait_for(partial(ready, exporter), timeout=DEADLINE, what=f"{exporter.name} ready")
        simulator.advance(ADVANCE)
        stepped = time.time()
        for exporter in (*shards, single):
            wait_for(
                partial(polled_after, exporter, stepped + POLL_INTERVAL + SETTLE_MARGIN),
                timeout=DEADLINE,
                what=f"{exporter.name} to poll every SIM after the step",
            )
        settled = time.time()
        sids = sorted(
            dict(labels)["sim_sid"]
            for (name, labels) in single.metrics()
            if name == names.SIM_UP.sample
        )
        yield Cluster(simulator, shards, single, prometheus, sids, settled, simulator.requests())


def per_sim_series(samples: dict[SampleKey, float]) -> dict[SampleKey, float]:
    return {
        key: value
        for key, value in samples.items()
        if any(label == "sim_sid" for label, _ in key[1]) and key[0] not in POLL_TIME_SERIES
    }


def test_shards_add_up_to_one_unsharded_exporter(cluster: Cluster) -> None:
    assert not cluster.killed, "run this test before the kill test"
    single = cluster.single.metrics()
    shards = [e.metrics() for e in cluster.shards]
    assert len(cluster.sids) > SIMS // 2  # discovery found the active SIMs

    # Each SIM's series are on exactly one shard, the one its SID hashes to.
    for shard, samples in zip(cluster.shards, shards, strict=True):
        listed = {dict(k[1])["sim_sid"] for k in samples if k[0] == names.SIM_UP.sample}
        assert listed == set(cluster.owned(shard.shard or 0)), shard.name
    union: dict[SampleKey, float] = {}
    for samples in shards:
        part = per_sim_series(samples)
        assert union.keys().isdisjoint(part), "a series on two shards"
        union.update(part)
    # ... and together they are exactly the unsharded exporter's, value for value.
    assert union == per_sim_series(single)

    # Fleet-wide families sum up exactly.
    for key in (k for k in single if k[0] in FLEET_SUMMED):
        assert sum(s.get(key, 0.0) for s in shards) == single[key], key
    # The comparison is not one of zeros: sessions started, ended and moved packets.
    for family in (names.SESSIONS_STARTED, names.SESSIONS_ENDED, names.PACKETS_UP):
        assert sum(v for k, v in single.items() if k[0] == family.sample) > 0, family.name

    # The same in Prometheus, once it has scraped every target after the data settled.
    prom = cluster.prometheus
    wait_for(
        partial(
            scraped_after, prom, f'up{{job=~"{SHARD_JOB}|{SINGLE_JOB}"}}', cluster.settled_at + 1
        ),
        timeout=DEADLINE,
        what="a scrape of every target after the data settled",
    )
    for series in SUMMED_IN_PROMETHEUS:
        sums = {job: prom.query(f'sum({series}{{job="{job}"}})') for job in (SHARD_JOB, SINGLE_JOB)}
        values = {job: [float(r["value"][1]) for r in result] for job, result in sums.items()}
        assert values[SHARD_JOB] == values[SINGLE_JOB], series
        assert values[SINGLE_JOB], f"no {series}"
    buckets = {
        job: {
            (r["metric"].get("radio_link", ""), r["metric"]["le"]): float(r["value"][1])
            for r in prom.query(
                f'sum by (radio_link, le) ({names.SESSION_DURATION.bucket}{{job="{job}"}})'
            )
        }
        for job in (SHARD_JOB, SINGLE_JOB)
    }
    assert buckets[SHARD_JOB] == buckets[SINGLE_JOB] != {}
    assert (
        prom.query(f'count by (sim_sid) ({names.SIM_INFO.sample}{{job="{SHARD_JOB}"}}) > 1') == []
    )

    # Every shard says which one it is and how many there are; the unsharded one is 0 of 1.
    announced = {
        (r["metric"]["job"], r["metric"]["index"]): float(r["value"][1])
        for r in prom.query(names.SHARDS.sample)
    }
    assert announced == {
        **{(SHARD_JOB, str(i)): float(SHARDS) for i in range(SHARDS)},
        (SINGLE_JOB, "0"): 1.0,
    }

    # The shipped rules are loaded and evaluate without errors.
    groups: list[Json] = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {ALERT, "TwilioWirelessPollStale"}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"] == []

    per_shard = {
        cluster.shards[i].name: {
            "sims": len(cluster.owned(i)),
            "series": len(samples),
            "per_sim_series": len(per_sim_series(samples)),
        }
        for i, samples in enumerate(shards)
    }
    report(
        cluster,
        sims=len(cluster.sids),
        series_per_shard=per_shard,
        series_unsharded={
            "series": len(single),
            "per_sim_series": len(per_sim_series(single)),
        },
    )


def test_the_api_sees_one_listing_per_sim_per_interval_in_total(cluster: Cluster) -> None:
    assert not cluster.killed, "run this test before the kill test"
    before = cluster.requests_at_settle
    window = WINDOW_INTERVALS * POLL_INTERVAL
    time.sleep(max(0.0, cluster.settled_at + window - time.time()))  # the measuring window
    after = cluster.simulator.requests()
    elapsed = time.time() - cluster.settled_at

    def listings(snapshot: Json, key: str) -> dict[str, int]:
        counts: dict[str, int] = snapshot["clients"].get(key, {}).get("listings", {})
        return counts

    # Over the whole run, each shard listed exactly the SIMs it owns, no other.
    for shard in cluster.shards:
        assert set(listings(after, shard.key)) == set(cluster.owned(shard.shard or 0)), shard.name
    assert set(listings(after, cluster.single.key)) == set(cluster.sids)

    def in_window(key: str, sid: str) -> int:
        return listings(after, key).get(sid, 0) - listings(before, key).get(sid, 0)

    sharded = {sid: sum(in_window(s.key, sid) for s in cluster.shards) for sid in cluster.sids}
    single = {sid: in_window(cluster.single.key, sid) for sid in cluster.sids}
    # The three shards together list each SIM as often as one exporter does (the window's
    # edges may cut one poll either way), and every SIM was listed in the window.
    assert {sid: n for sid, n in sharded.items() if abs(n - single[sid]) > 1} == {}
    assert min(sharded.values()) >= 1
    assert min(single.values()) >= 1

    intervals = elapsed / POLL_INTERVAL
    pages = {
        e.name: after["clients"][e.key]["session_pages"] for e in (*cluster.shards, cluster.single)
    }
    sims_requests = {
        e.name: after["clients"][e.key]["sims_requests"] for e in (*cluster.shards, cluster.single)
    }
    report(
        cluster,
        window_seconds=round(elapsed, 2),
        listings_per_sim_per_interval_all_shards=round(
            sum(sharded.values()) / len(cluster.sids) / intervals, 3
        ),
        listings_per_sim_per_interval_unsharded=round(
            sum(single.values()) / len(cluster.sids) / intervals, 3
        ),
        session_pages_whole_run=pages,
        sims_list_requests_whole_run=sims_requests,
        simulator_stats=after["stats"],
    )


def test_a_killed_shard_goes_stale_and_fires_the_shard_alert(cluster: Cluster) -> None:
    prom = cluster.prometheus
    victim = cluster.shards[KILLED]
    lost = cluster.owned(KILLED)
    kept = [sid for sid in cluster.sids if sid not in set(lost)]
    lost_re = "|".join(lost)
    up_lost = f'{names.SIM_UP.sample}{{job="{SHARD_JOB}",sim_sid=~"{lost_re}"}}'
    assert len(prom.query(up_lost)) == len(lost)  # there before the kill
    before = cluster.simulator.requests()

    victim.proc.kill()  # SIGKILL: no goodbye, as when a node dies
    victim.proc.wait()
    cluster.killed = True
    killed_at = time.monotonic()
    killed_wall = time.time()

    try:
        # Stale: the series are absent from an instant query (not 0), though they existed.
        wait_for(lambda: prom.query(up_lost) == [], timeout=DEADLINE, interval=0.1, what="stale")
        stale_after = time.monotonic() - killed_at
        assert len(prom.query(f"last_over_time({up_lost}[5m])")) == len(lost)
        for family in (names.SESSIONS_STARTED, names.SESSIONS_OPEN, names.SIM_INFO):
            selector = f'{family.sample}{{job="{SHARD_JOB}",sim_sid=~"{lost_re}"}}'
            assert prom.query(selector) == [], family.name
        up = {
            r["metric"]["instance"]: r["value"][1] for r in prom.query(f'up{{job="{SHARD_JOB}"}}')
        }
        assert up[victim.address] == "0"

        # The shard alert: pending, then firing after the (test's) for:, for the sharded job.
        pending_after: float | None = None
        firing: list[Json] = []
        deadline = time.monotonic() + DEADLINE
        while not firing and time.monotonic() < deadline:
            alerts = [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == ALERT]
            if pending_after is None and alerts:
                pending_after = time.monotonic() - killed_at
            firing = [a for a in alerts if a["state"] == "firing"]
            time.sleep(0.1)
        fired_after = time.monotonic() - killed_at
        assert firing, f"{ALERT} did not fire within {DEADLINE}s"
        assert [(a["labels"]["job"], float(a["value"])) for a in firing] == [(SHARD_JOB, 1.0)]

        # The other shards carry on: their SIMs stay fresh in Prometheus and they keep listing
        # every SIM they own, and only those: no other shard takes the killed shard's SIMs over.
        up_kept = f'{names.SIM_UP.sample}{{job="{SHARD_JOB}"}} == 1'
        wait_for(
            partial(scraped_after, prom, up_kept, killed_wall + 1),
            timeout=DEADLINE,
            what="fresh scrapes of the other shards",
        )
        assert sorted(r["metric"]["sim_sid"] for r in prom.query(up_kept)) == kept

        def listed_again() -> bool:
            now = cluster.simulator.requests()["clients"]
            return all(
                now[e.key]["listings"].get(sid, 0)
                > before["clients"][e.key]["listings"].get(sid, 0)
                for e in cluster.shards
                if e is not victim
                for sid in cluster.owned(e.shard or 0)
            )

        wait_for(listed_again, timeout=DEADLINE, what="the other shards to poll every SIM again")
        after = cluster.simulator.requests()["clients"]
        for exporter in cluster.shards:
            if exporter is not victim:
                assert ready(exporter)
                owned = set(cluster.owned(exporter.shard or 0))
                assert set(after[exporter.key]["listings"]) == owned, exporter.name
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{cluster.log_tail()}") from exc
    report(
        cluster,
        killed_shard=f"{KILLED}/{SHARDS} ({len(lost)} SIMs)",
        seconds_kill_to_stale=round(stale_after, 2),
        seconds_kill_to_alert_pending=None if pending_after is None else round(pending_after, 2),
        seconds_kill_to_alert_firing=round(fired_after, 2),
        alert_for_in_test=TEST_FOR,
    )
