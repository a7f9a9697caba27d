"""The simulator's command line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from tests.process_support import read_listen_url
from tests.simulator_support import basic, get_json
from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    SimulatorConfig,
    main,
)
from twilio_wireless_simulator.cli import build_parser, config_from_args, parse_duration
from twilio_wireless_simulator.config import describe_errors


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 2592000.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("45s", 45.0),
        ("250ms", 0.25),
        ("90", 90.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "1h 30m", "-"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(Exception, match="duration"):
        parse_duration(text)


def test_flags_map_to_the_config() -> None:
    args = build_parser().parse_args(
        [
            "--sims=7",
            "--seed=3",
            "--speed=60",
            "--wall-timestamps",
            "--auth-mode=bearer",
            "--token-lifetime=5m",
            "--retention=2h",
            "--max-concurrent=4",
            "--fault-429=0.1",
            "--retry-after=2",
            "--fault-500=0.05",
            "--fault-timeout=0.01",
            "--timeout-delay=10s",
            "--fault-truncated=0.02",
            "--latency=0.01:0.2",
            "--api-key=SK" + "a" * 32 + ":s3cret",
        ]
    )
    config = config_from_args(args)
    assert (config.sims, config.seed, config.speed, config.auth_mode) == (7, 3, 60.0, "bearer")
    assert (config.token_lifetime, config.retention, config.max_concurrent) == (300.0, 7200.0, 4)
    assert config.api_keys == {"SK" + "a" * 32: "s3cret"}
    assert config.keep_history is False
    assert config.wall_timestamps is True
    f = config.faults
    assert (f.rate_429, f.retry_after, f.rate_500, f.rate_timeout) == (0.1, 2.0, 0.05, 0.01)
    assert (f.timeout_delay, f.rate_truncated, f.latency) == (10.0, 0.02, (0.01, 0.2))


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["--sims=-1"], ["--fault-500=2"], ["--listen=nowhere"], ["--latency=3:1"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--fault-429" in out
    assert "--wall-timestamps" in out


def test_timestamps_are_simulated_unless_asked() -> None:
    assert config_from_args(build_parser().parse_args([])).wall_timestamps is False


def test_wall_timestamps_need_an_accelerated_clock() -> None:
    with pytest.raises(ValueError, match="wall_timestamps needs speed"):
        SimulatorConfig(wall_timestamps=True)
    assert SimulatorConfig(speed=1.0, wall_timestamps=True).wall_timestamps


BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"sims": -1}, "sims: Input should be greater than or equal to 0 (got -1)"),
    ({"account_sid": "AC123"}, "account_sid: String should match pattern"),
    ({"api_keys": {"SK1": "secret"}}, "api_keys.SK1: String should match pattern"),
    ({"auth_mode": "digest"}, "auth_mode: Input should be 'basic' or 'bearer' (got 'digest')"),
    ({"token_lifetime": 0}, "token_lifetime: Input should be greater than 0 (got 0)"),
    ({"retention": -1.0}, "retention: Input should be greater than 0"),
    ({"backfill": -1.0}, "backfill: Input should be greater than or equal to 0"),
    ({"speed": 0.0}, "speed: Input should be greater than 0"),
    ({"update_granularity": 0.0}, "update_granularity: Input should be greater than 0"),
    ({"max_concurrent": 0}, "max_concurrent: Input should be greater than or equal to 1"),
    ({"concurrency_retry_after": -1}, "concurrency_retry_after: Input should be greater than"),
    ({"public_url": "https://host/path"}, "public_url: String should match pattern"),
    ({"public_url": "ftp://host"}, "public_url: String should match pattern"),
    ({"wall_timestamps": True}, "wall_timestamps needs speed (a manual clock has no wall time)"),
]


@pytest.mark.parametrize(("settings", "problem"), BAD_SETTINGS)
def test_bad_settings_are_rejected_where_the_config_is_made(
    settings: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValidationError) as info:
        SimulatorConfig(**settings)
    assert describe_errors(info.value).startswith("invalid SimulatorConfig: ")
    assert problem in describe_errors(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        SimulatorConfig(sims=-1, speed=-2.0)
    assert describe_errors(info.value) == (
        "invalid SimulatorConfig: sims: Input should be greater than or equal to 0 (got -1);"
        " speed: Input should be greater than 0 (got -2.0)"
    )


def test_good_urls_and_keys_are_accepted() -> None:
    key = "SK" + "a" * 32
    config = SimulatorConfig(public_url="https://wireless.example:8443/", api_keys={key: "s"})
    assert (config.public_url, dict(config.api_keys)) == (
        "https://wireless.example:8443/",
        {key: "s"},
    )


def test_a_bad_setting_from_the_command_line_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--sims=-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m twilio_wireless_simulator: error: invalid SimulatorConfig:"
        " sims: Input should be greater than or equal to 0 (got -1)"
    ]


@pytest.mark.e2e
async def test_standalone_process_serves_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twilio_wireless_simulator",
        "--listen=127.0.0.1:0",
        "--sims=5",
        "--speed=60",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    try:
        lines: list[str] = []
        url = await read_listen_url(proc.stderr, lines, within=15)
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        log = "\n".join(lines)
        # The demo credentials are printed for the user.
        while DEMO_AUTH_TOKEN not in log:
            log += (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
        assert DEMO_ACCOUNT_SID in log
        async with aiohttp.ClientSession() as http:
            status, body, _ = await get_json(http, f"{url}/v1/Sims", basic())
            assert status == 200
            assert len(body["sims"]) == 5
            async with http.get(f"{url}/health") as resp:
                assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
