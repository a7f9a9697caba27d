"""The command line: config checking, exit codes, the demo process and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import twilio_wireless_simulator as simulator
from tests.harness_support import exporter_mapping
from tests.metrics_support import values_by_label
from tests.process_support import PipeLog
from twilio_wireless_exporter import __version__, cli
from twilio_wireless_exporter.cli import _demo_config, build_parser, main, serve
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import config_from_mapping
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.address import parse_listen_address
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_simulator import (
    RunningSimulator,
    SimClock,
    SimulatorConfig,
    start_simulator,
)

SID = "DE" + "1" * 32
GOOD_YAML = f"""
twilio:
  base_url: http://127.0.0.1:9
  account_sid: AC{"a" * 32}
  auth_token: cli-test-token-5e3f
sims:
  - sid: {SID}
    name: pump-17
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_check_config_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(write(tmp_path, GOOD_YAML)), "--check-config"]) == 0
    out = capsys.readouterr()
    assert "is valid: 1 SIMs" in out.out
    assert "cli-test-token-5e3f" not in out.out + out.err


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("poll: {page_size: 5000}", "poll.page_size"),
        ("poll: {concurrency: lots}", "poll.concurrency"),
        ("bogus: 1", "bogus"),
        ("discovery: {refresh_interval: soon}", "discovery.refresh_interval"),
    ],
)
def test_check_config_invalid_exits_2_with_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], patch: str, expected: str
) -> None:
    path = write(tmp_path, GOOD_YAML + patch + "\n")
    assert main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"{expected}:" in err
    assert "cli-test-token-5e3f" not in err


def test_invalid_config_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD_YAML.replace(SID, "DE123"))
    # without --check-config too: exit 2 before any server or poller starts
    assert main(["--config", str(path), "--web.listen-address", "127.0.0.1:0"]) == 2
    assert "sims[0].sid:" in capsys.readouterr().err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml"), "--check-config"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_config_is_required_without_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "--config is required" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "expected"),
    [(":10311", (None, 10311)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:80", ("::1", 80))],
)
def test_listen_address(text: str, expected: tuple[str | None, int]) -> None:
    assert parse_listen_address(text) == expected


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def demo_process() -> Iterator[tuple[subprocess.Popen[str], PipeLog, str]]:
    """``--demo`` on port 0; yields the process, its JSON log (stderr) and its URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twilio_wireless_exporter",
            "--demo",
            "--demo.sims",
            "10",
            "--demo.speed",
            "600",
            "--web.listen-address",
            "127.0.0.1:0",
            "--log.format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        log = PipeLog(proc)
        yield proc, log, log.wait_for_url()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def wait_ready(base: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if fetch(base + "/-/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("exporter did not become ready")


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_serves_metrics_and_shuts_down_cleanly(
    demo_process: tuple[subprocess.Popen[str], PipeLog, str], sig: signal.Signals
) -> None:
    proc, log, base = demo_process
    assert base.startswith("http://127.0.0.1:")
    assert not base.endswith(":0")
    wait_ready(base)
    status, body = fetch(base + "/metrics")
    assert status == 200
    for name in (
        "twilio_wireless_sim_info",
        "twilio_wireless_sim_data_sessions_open",
        "twilio_wireless_sim_up",
        "twilio_wireless_api_requests_total",
        "twilio_wireless_exporter_build_info",
    ):
        assert f"\n{name}{{" in body
    assert fetch(base + "/-/healthy")[0] == 200
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in [*log.lines, *err.splitlines()] if line.strip()]
    messages = [entry["message"] for entry in lines]
    assert any(m.startswith("listening on http://127.0.0.1:") for m in messages)
    assert "shutting down" in messages
    assert not [entry for entry in lines if entry["level"] in ("error", "critical")]


async def test_demo_reports_timestamps_on_the_real_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Six (fake) real hours into ``--demo`` at 60x, 15 simulated days have passed, yet every
    last-session-start the exporter exports is in the past of the real clock it runs on."""
    real = ManualClock()  # the real clock of the exporter, and the simulator's wall clock
    sleeps: list[float] = []
    started: list[RunningSimulator] = []

    @contextlib.asynccontextmanager
    async def on_real_clock(
        config: SimulatorConfig, host: str, port: int
    ) -> AsyncIterator[RunningSimulator]:
        clock = SimClock(speed=config.speed, wall=real.monotonic, wall_start=real.time())
        async with start_simulator(config, host, port, clock=clock) as sim:
            started.append(sim)
            yield sim

    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(simulator, "start_simulator", on_real_clock)
    args = build_parser().parse_args(["--demo", "--demo.sims", "12", "--demo.fault-rate", "0"])
    async with _demo_config(args, "127.0.0.1") as config:
        [sim] = started
        assert (sim.config.speed, sim.config.wall_timestamps) == (60.0, True)
        await real.advance(6 * 3600.0)
        assert sim.clock.now() == real.time() + 59 * 6 * 3600.0
        exporter = Exporter(config, clock=real, retry_sleep=record_sleep)
        await exporter.open()
        http = TestClient(TestServer(make_app(exporter.web_context())))
        await http.start_server()
        try:
            assert await exporter.poller.refresh_sims()
            await exporter.poller.poll_all()
            resp = await http.get("/metrics")
            assert resp.status == 200
            text = await resp.text()
        finally:
            await http.close()
            await exporter.stop()
    assert sleeps == []
    exported = values_by_label(
        text, "twilio_wireless_sim_last_session_start_timestamp_seconds", "sim_sid"
    )
    fleet = sim.fleet
    polled = set(fleet.sim_sids("active")) | set(fleet.sim_sids("suspended"))
    newest = {sid: max(v.start for v in fleet.listing(sid)) for sid in polled if fleet.listing(sid)}
    # exactly the newest session starts, mapped onto the real clock ...
    assert exported == {sid: fleet.reported_time(start) for sid, start in newest.items()}
    assert max(exported.values()) <= real.time()
    # ... where in simulated time most of them lie in the real future
    assert sum(start > real.time() for start in newest.values()) > len(newest) // 2


async def test_the_command_freezes_its_start_up_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` takes what start-up built (the web app among it) out of the collector's
    generations once it listens, after a collection, and keeps serving until told to stop."""
    config = config_from_mapping(exporter_mapping("http://127.0.0.1:9", ["DE" + "f" * 32]), {})
    args = build_parser().parse_args(["--web.listen-address", "127.0.0.1:0"])
    before = gc.get_freeze_count()
    seen: list[tuple[int, int, int]] = []
    real_freeze = cli.freeze_startup_heap

    def freeze_and_stop() -> int:
        frozen = real_freeze()
        apps = sum(isinstance(o, web.Application) for o in gc.get_objects())
        seen.append((frozen, gc.get_count()[0], apps))
        signal.raise_signal(signal.SIGTERM)  # the command's own handler stops it
        return frozen

    monkeypatch.setattr(cli, "freeze_startup_heap", freeze_and_stop)
    try:
        assert await asyncio.wait_for(serve(args, config), 30) == 0
    finally:
        gc.unfreeze()
    [(frozen, young, apps)] = seen
    assert frozen > before + 1000  # the imported modules at least
    assert young < 50  # and it collected first
    assert apps == 0  # the web app it serves is frozen with the rest


async def _exporter_child(config: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twilio_wireless_exporter",
        "--config",
        str(config),
        "--web.listen-address",
        "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.e2e
async def test_sighup_stops_cleanly_with_a_final_save_and_a_second_exporter_is_refused(
    tmp_path: Path,
) -> None:
    """Before: SIGHUP (a closed terminal, ``systemctl reload`` mapped to it) killed the process
    with no final save, and a second exporter on the same state.path ran beside the first."""
    from tests.process_support import read_listen_url
    from twilio_wireless_exporter.fleet.persist import read_state, state_identity

    async with start_simulator(SimulatorConfig(sims=0, seed=4), host="127.0.0.1", port=0) as sim:
        sid = sim.fleet.add_sim()
        sim.fleet.open_session(sid, packets_uploaded=3)
        state = tmp_path / "state.db"
        mapping = exporter_mapping(
            sim.url, [sid], state={"path": str(state), "save_interval": "1h"}
        )
        config = write(tmp_path, json.dumps(mapping))  # JSON is YAML
        first = await _exporter_child(config)
        assert first.stderr is not None
        lines: list[str] = []
        await read_listen_url(first.stderr, lines)

        second = await _exporter_child(config)
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == cli.EXIT_STATE_IN_USE
        assert (
            f"cannot start: state file {state} is in use by another exporter (pid {first.pid}):"
            " give each exporter its own state.path"
        ) in err.decode()
        assert "Traceback" not in err.decode()

        first.send_signal(signal.SIGHUP)
        rest = await asyncio.wait_for(first.stderr.read(), 30)
        assert await asyncio.wait_for(first.wait(), 30) == 0
        log = "\n".join(lines) + rest.decode()
        assert "received SIGHUP" in log
        assert "shutting down" in log
        assert "Traceback" not in log
        identity = state_identity(config_from_mapping(mapping, environ={}))
        assert set(read_state(state, identity).accounts) == {sid}  # the final save


async def never_served(*_: object) -> int:
    raise AssertionError("the exporter was started")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--demo.sims", "-1"], "argument --demo.sims: must be a whole number from 1 to 100000"),
        (["--demo.sims", "0"], "argument --demo.sims: must be a whole number from 1 to 100000"),
        (["--demo.sims", "many"], "argument --demo.sims: must be a whole number from 1 to"),
        (["--demo.sims", "\u0661\u0662"], "argument --demo.sims: must be a whole number from 1"),
        (["--demo.sims", "1000001"], "argument --demo.sims: must be a whole number from 1 to"),
        (["--demo.speed", "0"], "argument --demo.speed: must be a number from 0.001 to 1000000"),
        (["--demo.speed", "nan"], "argument --demo.speed: must be a number from 0.001 to"),
        (["--demo.speed", "inf"], "argument --demo.speed: must be a number from 0.001 to"),
        (["--demo.speed", "-5"], "argument --demo.speed: must be a number from 0.001 to"),
    ],
)
def test_bad_demo_flags_exit_2_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    expected: str,
) -> None:
    monkeypatch.setattr(cli, "serve", never_served)
    with pytest.raises(SystemExit) as exc:
        main(["--demo", *flags, "--web.listen-address", "127.0.0.1:0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra", [[], ["--check-config"]])
def test_demo_refuses_a_config_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
) -> None:
    """``--demo`` runs its own configuration; a ``--config`` beside it was silently ignored."""
    monkeypatch.setattr(cli, "serve", never_served)
    path = write(tmp_path, GOOD_YAML)
    with pytest.raises(SystemExit) as exc:
        main(["--demo", "--config", str(path), "--web.listen-address", "127.0.0.1:0", *extra])
    assert exc.value.code == 2
    assert "--demo and --config cannot be combined" in capsys.readouterr().err


def test_demo_check_config_needs_a_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--demo", "--check-config"])
    assert exc.value.code == 2
    assert "--check-config checks --config; --demo has nothing to check" in (
        capsys.readouterr().err
    )
