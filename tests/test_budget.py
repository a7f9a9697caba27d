"""The API budget ``--check-config`` prints (config/budget.py): exact rates by endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from twilio_wireless_exporter.cli import main
from twilio_wireless_exporter.config import Config, config_from_mapping
from twilio_wireless_exporter.config.budget import budget, describe
from twilio_wireless_exporter.sharding import Shard

ACCOUNT = {"account_sid": "AC" + "0" * 32, "auth_token": "x"}
SIDS = [f"DE{n:032x}" for n in range(10_000)]


def config(**sections: Any) -> Config:
    return config_from_mapping({"twilio": ACCOUNT, "sims": SIDS, **sections}, environ={})


def test_ten_thousand_sims_polled_every_minute_and_read_every_hour() -> None:
    share = budget(config(poll={"interval": "60s"}, usage={"interval": "1h"}))
    assert share.sims == 10_000
    assert share.rates == pytest.approx(
        {
            "data_sessions": 10_000 / 60,
            "sims": 10 / 600,  # the identity listing: 10 pages per refresh
            "usage_records": 10_000 / 3600,
            "account_usage_records": 1 / 3600,
            "rate_plans": 1 / 600,
        }
    )
    assert share.usage_share == pytest.approx(
        (10_000 / 3600 + 1 / 3600) / (10_000 / 60 + 10 / 600 + 1 / 600)
    )
    assert share.usage_share <= 0.02  # the bound


def test_each_shard_has_its_own_share_and_only_shard_0_reads_the_account() -> None:
    cfg = config(shard={"index": 0, "count": 4})
    shares = [budget(cfg, Shard(index, 4)) for index in range(4)]
    assert sum(share.sims for share in shares) == 10_000
    assert [("account_usage_records" in s.rates, "rate_plans" in s.rates) for s in shares] == [
        (True, True),
        (False, False),
        (False, False),
        (False, False),
    ]
    total = sum(share.rates["data_sessions"] for share in shares)
    assert total == pytest.approx(10_000 / 60)


def test_without_usage_there_are_no_usage_endpoints() -> None:
    share = budget(config(usage={"enabled": False}))
    assert set(share.rates) == {"data_sessions", "sims"}
    lines = describe(config(usage={"enabled": False}))
    assert "usage adds" not in "\n".join(lines)


def test_a_fleet_beyond_the_request_rate_gets_a_warning() -> None:
    lines = describe(config(poll={"requests_per_second": 20.0}))
    assert lines[0] == "projected API requests per second (10000 configured SIMs):"
    assert lines[1] == "  data_sessions               166.6667"
    assert any(line.startswith("  total") and "usage adds 1.7%" in line for line in lines)
    assert lines[-1].startswith("  warning: more than poll.requests_per_second (20)")
    assert not describe(config(poll={"requests_per_second": 500.0}))[-1].startswith("  warning")


def test_check_config_prints_the_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "twilio: {account_sid: AC" + "0" * 32 + ", auth_token: x}\n"
        "sims: [" + ", ".join(SIDS[:60]) + "]\n"
    )
    assert main(["--config", str(path), "--check-config"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"configuration {path} is valid: 60 SIMs, discovery off"
    assert out[1] == "projected API requests per second (60 configured SIMs):"
    assert out[2] == "  data_sessions                 1.0000"
