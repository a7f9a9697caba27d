"""Tests of the configuration module: every kind of bad config, the good paths, and secrecy."""

import json
import math
import os
import pickle
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, TypeAdapter, ValidationError

from twilio_wireless_exporter.config import (
    BasicCredentials,
    Config,
    ConfigError,
    OAuth2Credentials,
    config_from_mapping,
    load_config,
    loading,
)
from twilio_wireless_exporter.config.errors import dotted
from twilio_wireless_exporter.config.models import (
    DiscoverySettings,
    MetricsSettings,
    PollSettings,
    SimSettings,
    StateSettings,
    TwilioSettings,
)
from twilio_wireless_exporter.config.types import Size, format_duration, parse_duration

REPO_ROOT = Path(__file__).resolve().parents[1]

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
OTHER_ACCOUNT_SID = "AC" + "f" * 32
API_KEY = "SK" + "fedcba9876543210" * 2
SIM_A = "DE" + "a" * 32
SIM_B = "DE" + "b" * 32
SIM_C = "DE" + "c" * 32
TOKEN = "env-token-0000"
SECRET = "s3cr3t-XYZZY-do-not-show"  # a distinctive fake secret to look for

ENV: dict[str, str] = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": TOKEN}


def make(**sections: Any) -> dict[str, Any]:
    """A valid configuration (one SIM; credentials from ENV) with some sections replaced."""
    data: dict[str, Any] = {"sims": [{"sid": SIM_A}]}
    data.update(sections)
    return data


def problems_of(data: object, environ: Mapping[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, environ)
    return info.value.problems


def assert_problem(problems: list[str], path: str, fragment: str) -> None:
    matching = [p for p in problems if p.startswith(f"{path}: ")]
    assert matching, f"no problem at {path!r} in {problems}"
    assert any(fragment in p for p in matching), f"{fragment!r} not in {matching}"


def write_secret(path: Path, content: str, mode: int = 0o600) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


# ----------------------------------------------------------------------------------------------
# Bad configurations, one kind per row: (data, environment, field path, message fragment)

BAD_CONFIGS = [
    pytest.param(make(bogus=1), ENV, "bogus", "unknown option", id="unknown-top-level"),
    pytest.param(make(sim=[]), ENV, "sim", "did you mean sims?", id="unknown-top-level-hint"),
    pytest.param(
        make(poll={"foo": 1}),
        ENV,
        "poll.foo",
        "unknown option (valid options: interval",
        id="unknown-nested",
    ),
    pytest.param(
        make(poll={"intervall": "5s"}),
        ENV,
        "poll.intervall",
        "did you mean interval?",
        id="unknown-nested-hint",
    ),
    pytest.param(
        make(twilio={"auth": {"typ": "basic"}}),
        ENV,
        "twilio.auth.typ",
        "did you mean type?",
        id="unknown-deeply-nested",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "label": {}}]),
        ENV,
        "sims[0].label",
        "did you mean labels?",
        id="unknown-in-list-item",
    ),
    pytest.param(
        make(poll=[1, 2]),
        ENV,
        "poll",
        "must be a mapping of options, got a list",
        id="section-not-mapping",
    ),
    pytest.param(
        make(twilio="x"),
        ENV,
        "twilio",
        "must be a mapping of options, got a string",
        id="twilio-not-mapping",
    ),
    pytest.param(make(sims={"sid": SIM_A}), ENV, "sims", "must be a list", id="sims-not-list"),
    pytest.param(make(sims=[5]), ENV, "sims[0]", "must be a mapping", id="sim-not-mapping"),
    pytest.param(
        make(poll={"page_size": "100"}),
        ENV,
        "poll.page_size",
        "must be an integer, got '100'",
        id="int-as-string",
    ),
    pytest.param(
        make(poll={"page_size": 10.5}),
        ENV,
        "poll.page_size",
        "must be an integer, got 10.5",
        id="int-as-float",
    ),
    pytest.param(
        make(poll={"concurrency": True}),
        ENV,
        "poll.concurrency",
        "must be an integer, got true",
        id="int-as-bool",
    ),
    pytest.param(
        make(poll={"page_size": 0}),
        ENV,
        "poll.page_size",
        "must be between 1 and 1000, got 0",
        id="page-size-0",
    ),
    pytest.param(
        make(poll={"page_size": 1001}),
        ENV,
        "poll.page_size",
        "must be between 1 and 1000, got 1001",
        id="page-size-1001",
    ),
    pytest.param(
        make(poll={"concurrency": 0}),
        ENV,
        "poll.concurrency",
        "must be between 1 and 256, got 0",
        id="concurrency-0",
    ),
    pytest.param(
        make(poll={"max_retries": 11}),
        ENV,
        "poll.max_retries",
        "must be between 0 and 10, got 11",
        id="max-retries-11",
    ),
    pytest.param(
        make(poll={"max_pages": 0}),
        ENV,
        "poll.max_pages",
        "must be between 1 and 10000, got 0",
        id="max-pages-0",
    ),
    pytest.param(
        make(poll={"requests_per_second": 0}),
        ENV,
        "poll.requests_per_second",
        "must be a number greater than 0, got 0",
        id="rps-0",
    ),
    pytest.param(
        make(poll={"requests_per_second": "fast"}),
        ENV,
        "poll.requests_per_second",
        "must be a number, got 'fast'",
        id="rps-garbage",
    ),
    pytest.param(
        make(poll={"max_response_bytes": "lots"}),
        ENV,
        "poll.max_response_bytes",
        "must be a size like 16MiB",
        id="size-garbage",
    ),
    pytest.param(
        make(poll={"max_response_bytes": 10}),
        ENV,
        "poll.max_response_bytes",
        "must be between 1KiB and 1GiB, got 10",
        id="size-too-small",
    ),
    pytest.param(
        make(poll={"max_response_bytes": "1.5B"}),
        ENV,
        "poll.max_response_bytes",
        "whole number of bytes",
        id="size-fractional-bytes",
    ),
    pytest.param(
        make(twilio={"timeout": "soon"}),
        ENV,
        "twilio.timeout",
        "must be a duration like 30s, 5m or a number of seconds, got 'soon'",
        id="duration-garbage",
    ),
    pytest.param(
        make(twilio={"timeout": "-5s"}),
        ENV,
        "twilio.timeout",
        "must not be negative, got '-5s'",
        id="duration-negative-string",
    ),
    pytest.param(
        make(poll={"interval": -1}),
        ENV,
        "poll.interval",
        "must not be negative, got -1",
        id="duration-negative-number",
    ),
    pytest.param(
        make(twilio={"timeout": 0}),
        ENV,
        "twilio.timeout",
        "must be longer than 0s, got 0",
        id="timeout-zero",
    ),
    pytest.param(
        make(poll={"interval": "500ms"}),
        ENV,
        "poll.interval",
        "must be at least 1s, got '500ms'",
        id="interval-below-1s",
    ),
    pytest.param(
        make(poll={"interval": "5m1h"}),
        ENV,
        "poll.interval",
        "must be a duration like",
        id="duration-units-out-of-order",
    ),
    pytest.param(
        make(poll={"interval": "1m1m"}),
        ENV,
        "poll.interval",
        "must be a duration like",
        id="duration-unit-repeated",
    ),
    pytest.param(
        make(poll={"interval": "1 hour"}),
        ENV,
        "poll.interval",
        "must be a duration like",
        id="duration-words",
    ),
    pytest.param(
        make(poll={"interval": [1]}), ENV, "poll.interval", "got a list", id="duration-list"
    ),
    pytest.param(
        make(poll={"interval": ".inf"}),
        ENV,
        "poll.interval",
        "must be a duration like",
        id="duration-inf-string",
    ),
    pytest.param(
        make(poll={"interval": math.inf}),
        ENV,
        "poll.interval",
        "must be a duration like",
        id="duration-inf",
    ),
    pytest.param(
        make(poll={"interval": "400d"}),
        ENV,
        "poll.interval",
        "must be at most 365d",
        id="duration-too-long",
    ),
    pytest.param(
        make(poll={"backoff_initial": "10s", "backoff_max": "5s"}),
        ENV,
        "poll.backoff_max",
        "must not be shorter than poll.backoff_initial (10s), got 5s",
        id="backoff-max-below-initial",
    ),
    pytest.param(
        make(discovery={"enabled": True, "refresh_interval": "5s"}),
        ENV,
        "discovery.refresh_interval",
        "must be at least 10s, got '5s'",
        id="refresh-interval-short",
    ),
    pytest.param(
        make(twilio={"auth": {"type": "oauth2_client_credentials", "refresh_margin": "-1m"}}),
        {"KORE_CLIENT_ID": "id", "KORE_CLIENT_SECRET": "x"},
        "twilio.auth.refresh_margin",
        "must not be negative",
        id="refresh-margin-negative",
    ),
    pytest.param(
        make(sims=[{"sid": "DE123"}]),
        ENV,
        "sims[0].sid",
        "must look like DE followed by 32 hex digits, got 'DE123'",
        id="sim-sid-short",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A}, {"sid": "XX" + "a" * 32}]),
        ENV,
        "sims[1].sid",
        "must look like DE followed by 32 hex digits",
        id="sim-sid-prefix",
    ),
    pytest.param(
        make(sims=[{"sid": "DE" + "g" * 32}]),
        ENV,
        "sims[0].sid",
        "must look like DE followed by 32 hex digits",
        id="sim-sid-not-hex",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A + "\n"}]),
        ENV,
        "sims[0].sid",
        "must look like DE",
        id="sim-sid-trailing-newline",
    ),
    pytest.param(
        make(sims=[{"name": "x"}]), ENV, "sims[0].sid", "is required", id="sim-sid-missing"
    ),
    pytest.param(make(sims=[{"sid": 12}]), ENV, "sims[0].sid", "got 12", id="sim-sid-number"),
    pytest.param(
        make(twilio={"account_sid": "AC123"}),
        ENV,
        "twilio.account_sid",
        "must look like AC followed by 32 hex digits, got a 5-character value",
        id="account-sid-bad",
    ),
    pytest.param(
        make(twilio={"api_key": "SK12", "api_secret": "x"}),
        {},
        "twilio.api_key",
        "must look like SK followed by 32 hex digits",
        id="api-key-bad",
    ),
    pytest.param(
        make(twilio={"api_key": ACCOUNT_SID, "api_secret": "x"}),
        {},
        "twilio.api_key",
        "must look like SK followed by 32 hex digits",
        id="api-key-is-account-sid",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A}, {"sid": SIM_B}, {"sid": SIM_A}]),
        ENV,
        "sims[2].sid",
        "duplicate of sims[0].sid",
        id="duplicate-sid",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A}, {"sid": "DE" + "A" * 32}]),
        ENV,
        "sims[1].sid",
        "duplicate of sims[0].sid",
        id="duplicate-sid-other-case",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"bad-name": "x"}}]),
        ENV,
        "sims[0].labels.bad-name",
        "invalid label name",
        id="label-name-invalid",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"1st": "x"}}]),
        ENV,
        "sims[0].labels.1st",
        "invalid label name",
        id="label-name-digit-first",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"__meta": "x"}}]),
        ENV,
        "sims[0].labels.__meta",
        "reserved for Prometheus",
        id="label-name-dunder",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"sim_sid": "x"}}]),
        ENV,
        "sims[0].labels.sim_sid",
        "a label the exporter sets itself",
        id="label-name-reserved-sim-sid",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"instance": "x"}}]),
        ENV,
        "sims[0].labels.instance",
        "a label the exporter sets itself",
        id="label-name-reserved-instance",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"display_name": "x"}}]),
        ENV,
        "sims[0].labels.display_name",
        "a label the exporter sets itself",
        id="label-name-reserved-display-name",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"floor": 3}}]),
        ENV,
        "sims[0].labels.floor",
        "must be a string, got 3; put it in quotes",
        id="label-value-number",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"on": True}}]),
        ENV,
        "sims[0].labels.on",
        "must be a string, got true",
        id="label-value-bool",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"site": None}}]),
        ENV,
        "sims[0].labels.site",
        "must be a string, got null",
        id="label-value-null",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": {"site": ""}}]),
        ENV,
        "sims[0].labels.site",
        "must not be empty",
        id="label-value-empty",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "labels": ["site"]}]),
        ENV,
        "sims[0].labels",
        "must be a mapping of names to values, got a list",
        id="labels-not-mapping",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "name": 17}]),
        ENV,
        "sims[0].name",
        "must be a string, got 17; put it in quotes",
        id="name-number",
    ),
    pytest.param(
        make(sims=[{"sid": SIM_A, "name": ""}]),
        ENV,
        "sims[0].name",
        "must not be empty",
        id="name-empty",
    ),
    pytest.param({}, ENV, "sims", "no SIMs to monitor", id="nothing-to-poll"),
    pytest.param(make(sims=[]), ENV, "sims", "set discovery.enabled: true", id="sims-empty"),
    pytest.param(
        make(sims=None, discovery={"enabled": False}),
        ENV,
        "sims",
        "no SIMs to monitor",
        id="sims-null-discovery-off",
    ),
    pytest.param(
        make(discovery={"enabled": True, "status": ["active", "gone"]}),
        ENV,
        "discovery.status[1]",
        "must be one of new, ready, active",
        id="status-invalid",
    ),
    pytest.param(
        make(discovery={"enabled": True, "status": "ACTIVE"}),
        ENV,
        "discovery.status[0]",
        "got 'ACTIVE'",
        id="status-wrong-case",
    ),
    pytest.param(
        make(discovery={"enabled": True, "status": []}),
        ENV,
        "discovery.status",
        "must list at least one of new, ready, active",
        id="status-empty",
    ),
    pytest.param(
        make(discovery={"enabled": "yes"}),
        ENV,
        "discovery.enabled",
        "must be true or false, got 'yes'",
        id="bool-as-string",
    ),
    pytest.param(
        make(metrics={"imei_label": 1}),
        ENV,
        "metrics.imei_label",
        "must be true or false, got 1",
        id="bool-as-int",
    ),
    pytest.param(
        make(state={"path": "/nonexistent-dir-for-test/state.json"}),
        ENV,
        "state.path",
        "directory /nonexistent-dir-for-test does not exist",
        id="state-parent-missing",
    ),
    pytest.param(
        make(state={"path": 5}), ENV, "state.path", "must be a file path", id="state-path-number"
    ),
    pytest.param(
        make(twilio={"base_url": "ftp://example.com"}),
        ENV,
        "twilio.base_url",
        "must be an http or https URL",
        id="base-url-scheme",
    ),
    pytest.param(
        make(twilio={"base_url": "wireless.twilio.com"}),
        ENV,
        "twilio.base_url",
        "must be an http or https URL",
        id="base-url-no-scheme",
    ),
    pytest.param(
        make(twilio={"base_url": "https://example.com/?x=1"}),
        ENV,
        "twilio.base_url",
        "must not have a query string",
        id="base-url-query",
    ),
    pytest.param(
        make(twilio={"base_url": "https://example.com:99999"}),
        ENV,
        "twilio.base_url",
        "must be an http or https URL",
        id="base-url-bad-port",
    ),
    pytest.param(
        make(twilio={"auth": {"type": "bearer"}}),
        ENV,
        "twilio.auth.type",
        "must be one of basic, oauth2_client_credentials, got 'bearer'",
        id="auth-type",
    ),
    # credentials
    pytest.param(
        make(), {}, "twilio.auth_token", "no Twilio credentials configured", id="no-credentials"
    ),
    pytest.param(
        make(twilio={"account_sid": ACCOUNT_SID}),
        {},
        "twilio.auth_token",
        "TWILIO_API_KEY and TWILIO_API_SECRET",
        id="sid-without-token",
    ),
    pytest.param(
        make(twilio={"auth_token": "x"}),
        {},
        "twilio.account_sid",
        "is required with an auth token",
        id="token-without-sid",
    ),
    pytest.param(
        make(
            twilio={
                "account_sid": ACCOUNT_SID,
                "auth_token": "x",
                "auth_token_file": "/run/secrets/token",
            }
        ),
        {},
        "twilio.auth_token_file",
        "twilio.auth_token and twilio.auth_token_file are both set; use only one",
        id="both-token-sources",
    ),
    pytest.param(
        make(twilio={"api_key": API_KEY, "api_secret": "x", "api_secret_file": "/run/secrets/s"}),
        {},
        "twilio.api_secret_file",
        "twilio.api_secret and twilio.api_secret_file are both set",
        id="both-api-secrets",
    ),
    pytest.param(
        make(
            twilio={
                "account_sid": ACCOUNT_SID,
                "auth_token": "x",
                "api_key": API_KEY,
                "api_secret": "y",
            }
        ),
        {},
        "twilio.api_key",
        "cannot be combined with twilio.auth_token",
        id="token-and-api-key",
    ),
    pytest.param(
        make(twilio={"api_secret": "y"}),
        {},
        "twilio.api_key",
        "is required with an API secret",
        id="api-secret-without-key",
    ),
    pytest.param(
        make(twilio={"api_key": API_KEY}),
        {},
        "twilio.api_secret",
        "an API key needs its secret",
        id="api-key-without-secret",
    ),
    pytest.param(
        make(twilio={"auth_token": ""}),
        ENV,
        "twilio.auth_token",
        "must not be empty",
        id="empty-token",
    ),
    pytest.param(
        make(twilio={"auth_token": 123456}),
        ENV,
        "twilio.auth_token",
        "must be a string, got a number; put it in quotes",
        id="token-number",
    ),
    pytest.param(
        make(),
        {"TWILIO_ACCOUNT_SID": "AC1", "TWILIO_AUTH_TOKEN": "x"},
        "twilio.account_sid",
        "environment variable TWILIO_ACCOUNT_SID must look like AC followed by 32 hex",
        id="env-account-sid-bad",
    ),
    pytest.param(
        make(),
        {"TWILIO_API_KEY": "SK1", "TWILIO_API_SECRET": "x"},
        "twilio.api_key",
        "environment variable TWILIO_API_KEY must look like SK",
        id="env-api-key-bad",
    ),
    pytest.param(
        make(),
        {"TWILIO_API_KEY": API_KEY},
        "twilio.api_secret",
        "TWILIO_API_SECRET",
        id="env-api-key-without-secret",
    ),
    pytest.param(
        make(twilio={"auth": {"type": "oauth2_client_credentials"}}),
        {"KORE_CLIENT_SECRET": "x"},
        "twilio.auth.client_id",
        "is required for oauth2_client_credentials; set twilio.auth.client_id or the "
        "environment variable KORE_CLIENT_ID",
        id="oauth2-missing-client-id",
    ),
    pytest.param(
        make(twilio={"auth": {"type": "oauth2_client_credentials", "client_id": "c"}}),
        {},
        "twilio.auth.client_secret",
        "KORE_CLIENT_SECRET",
        id="oauth2-missing-client-secret",
    ),
    pytest.param(
        make(
            twilio={
                "auth": {
                    "type": "oauth2_client_credentials",
                    "client_id": "c",
                    "client_secret": "s",
                    "client_secret_file": "/run/secrets/k",
                }
            }
        ),
        {},
        "twilio.auth.client_secret_file",
        "twilio.auth.client_secret and twilio.auth.client_secret_file are both set",
        id="oauth2-both-secret-sources",
    ),
    pytest.param(
        make(
            twilio={
                "auth_token": "x",
                "auth": {
                    "type": "oauth2_client_credentials",
                    "client_id": "c",
                    "client_secret": "s",
                },
            }
        ),
        {},
        "twilio.auth_token",
        "cannot be used with twilio.auth.type oauth2",
        id="oauth2-with-auth-token",
    ),
    pytest.param(
        make(
            twilio={
                "api_key": API_KEY,
                "auth": {
                    "type": "oauth2_client_credentials",
                    "client_id": "c",
                    "client_secret": "s",
                },
            }
        ),
        {},
        "twilio.api_key",
        "is a Twilio basic-auth option",
        id="oauth2-with-api-key",
    ),
    pytest.param(
        make(
            twilio={
                "account_sid": ACCOUNT_SID,
                "auth": {
                    "type": "oauth2_client_credentials",
                    "client_id": "c",
                    "client_secret": "s",
                },
            }
        ),
        {},
        "twilio.account_sid",
        "remove it",
        id="oauth2-with-account-sid",
    ),
    pytest.param(
        make(twilio={"auth": {"client_id": "c"}}),
        ENV,
        "twilio.auth.client_id",
        "is only used with type: oauth2_client_credentials",
        id="oauth2-option-with-basic",
    ),
    pytest.param(
        make(
            twilio={
                "auth": {
                    "type": "oauth2_client_credentials",
                    "client_id": "c",
                    "client_secret": "s",
                    "token_url": "not a url",
                }
            }
        ),
        {},
        "twilio.auth.token_url",
        "must be an http or https URL",
        id="token-url-bad",
    ),
]


@pytest.mark.parametrize(("data", "environ", "path", "fragment"), BAD_CONFIGS)
def test_bad_config_is_reported_at_its_path(
    data: dict[str, Any], environ: dict[str, str], path: str, fragment: str
) -> None:
    assert_problem(problems_of(data, environ), path, fragment)


def test_every_problem_line_has_a_path() -> None:
    data = make(
        poll={"page_size": 0, "concurrency": 0, "foo": 1},
        sims=[{"sid": "DE1"}, {"sid": SIM_B, "labels": {"job": "x", "n": 1}}],
        discovery={"status": ["nope"]},
    )
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, ENV)
    problems = info.value.problems
    assert problems == [
        "poll.page_size: must be between 1 and 1000, got 0",
        "poll.concurrency: must be between 1 and 256, got 0",
        "poll.foo: unknown option (valid options: interval, page_size, concurrency, "
        "requests_per_second, max_retries, backoff_initial, backoff_max, max_pages, "
        "max_response_bytes)",
        "sims[0].sid: must look like DE followed by 32 hex digits, got 'DE1'",
        "sims[1].labels.job: is a label the exporter sets itself; choose another name",
        "sims[1].labels.n: must be a string, got 1; put it in quotes",
        "discovery.status[0]: must be one of new, ready, active, suspended, deactivated, "
        "canceled, scheduled, updating, all, got 'nope'",
    ]
    assert str(info.value) == "\n".join(problems)


def test_nothing_to_poll_is_reported_together_with_other_problems() -> None:
    problems = problems_of({"poll": {"page_size": 0}}, {})
    assert_problem(problems, "poll.page_size", "between 1 and 1000")
    assert_problem(problems, "sims", "no SIMs to monitor")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(["sims"], ENV, source="x.yaml")
    assert info.value.problems == [
        "x.yaml: the top level must be a mapping of options "
        "(twilio, poll, sims, discovery, metrics, usage, state, shard), got a list"
    ]


def test_none_is_an_empty_configuration() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: the configuration is empty$"):
        config_from_mapping(None, ENV)


# ----------------------------------------------------------------------------------------------
# Secret files


def test_missing_secret_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(missing)})
    assert problems_of(data, {}) == [
        f"twilio.auth_token_file: cannot read {missing}: No such file or directory"
    ]


def test_secret_file_that_is_a_directory(tmp_path: Path) -> None:
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(tmp_path)})
    assert_problem(problems_of(data, {}), "twilio.auth_token_file", f"cannot read {tmp_path}")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file"
)
def test_unreadable_secret_file(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "token", SECRET, mode=0o000)
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(secret)})
    problems = problems_of(data, {})
    assert problems == [f"twilio.auth_token_file: cannot read {secret}: Permission denied"]


def test_permission_denied_on_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the same as the test above, but also when running as root
    secret = write_secret(tmp_path / "token", SECRET)
    real_open = os.open

    def guarded_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == secret:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(secret)})
    assert problems_of(data, {}) == [
        f"twilio.auth_token_file: cannot read {secret}: Permission denied"
    ]


@pytest.mark.parametrize("content", ["", "\n", "  \n\t\n"])
def test_empty_secret_file(tmp_path: Path, content: str) -> None:
    secret = write_secret(tmp_path / "secret", content)
    data = make(twilio={"api_key": API_KEY, "api_secret_file": str(secret)})
    assert problems_of(data, {}) == [f"twilio.api_secret_file: {secret} is empty"]


def test_oversized_secret_file(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "big", "x" * (65 * 1024))
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(secret)})
    assert_problem(problems_of(data, {}), "twilio.auth_token_file", "larger than 64 KiB")


def test_non_utf8_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "bin"
    secret.write_bytes(b"\xff\xfe\x00")
    secret.chmod(0o600)
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(secret)})
    assert_problem(problems_of(data, {}), "twilio.auth_token_file", "is not UTF-8 text")


def test_world_readable_secret_file_gives_a_warning(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "token", "file-token\n", mode=0o644)
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(secret)})
    cfg = config_from_mapping(data, {})
    assert cfg.warnings == (
        f"twilio.auth_token_file: {secret} is readable by other users (mode 0644); chmod 600 it",
    )
    assert isinstance(cfg.twilio.credentials, BasicCredentials)
    assert cfg.twilio.credentials.password.get_secret_value() == "file-token"


def test_group_readable_client_secret_file_gives_a_warning(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "kore", "k", mode=0o640)
    data = make(
        twilio={
            "auth": {
                "type": "oauth2_client_credentials",
                "client_id": "c",
                "client_secret_file": str(secret),
            }
        }
    )
    cfg = config_from_mapping(data, {})
    assert cfg.warnings == (
        f"twilio.auth.client_secret_file: {secret} is readable by other users (mode 0640); "
        "chmod 600 it",
    )


def test_private_secret_file_gives_no_warning(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "token", "file-token")
    cfg = config_from_mapping(
        make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(secret)}), {}
    )
    assert cfg.warnings == ()


def test_secret_file_content_is_stripped_of_trailing_whitespace_only(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret", " lead and trail \r\n\n")
    cfg = config_from_mapping(make(twilio={"api_key": API_KEY, "api_secret_file": str(secret)}), {})
    credentials = cfg.twilio.credentials
    assert isinstance(credentials, BasicCredentials)
    assert credentials.password.get_secret_value() == " lead and trail"


def test_relative_secret_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    write_secret(conf_dir / "token", "relative-token")
    config_file = conf_dir / "exporter.yaml"
    config_file.write_text(
        f"twilio:\n  account_sid: {ACCOUNT_SID}\n  auth_token_file: token\nsims: [{SIM_A}]\n"
    )
    cfg = load_config(config_file, {})
    assert cfg.twilio.auth_token_file == conf_dir / "token"
    credentials = cfg.twilio.credentials
    assert isinstance(credentials, BasicCredentials)
    assert credentials.password.get_secret_value() == "relative-token"


# ----------------------------------------------------------------------------------------------
# Files and YAML


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_problems(path: Path, environ: Mapping[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ)
    return info.value.problems


PARITY_TEXTS = [
    "poll:\n  interval: 30s\n  interval: 60s\n",  # duplicate key
    "twilio:\n  account_sid: AC\n    bad: indent: here\n",  # mapping values not allowed
    "sims: [\n",  # cut short
    "sims: " + "[" * 2000 + "]" * 2000 + "\n",  # nested too deeply
    "poll: 'unterminated\n",  # a quoted string never closed
    "poll: *nowhere\n",  # an undefined alias
    "poll: !!python/object:os.system ls\n",  # no Python tags
]


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_yaml_errors_read_the_same_with_and_without_libyaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """Files are parsed by libyaml where PyYAML has it (much faster for a large fleet), and a
    refused file again by the pure-Python loader, so every message is the same either way."""
    path = write_config(tmp_path, text)
    fast = load_problems(path)
    monkeypatch.setattr(loading, "_FastLoader", loading._UniqueKeyLoader)
    assert load_problems(path) == fast
    assert fast[0].startswith(f"{path}: ")


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML was built without libyaml")
def test_libyaml_parses_good_files() -> None:
    assert loading._FastLoader is not loading._UniqueKeyLoader
    text = "poll: {interval: 30s}\nsims:\n  - {sid: DE" + "0" * 32 + ", labels: {a: b}}\n"
    assert yaml.load(text, Loader=loading._FastLoader) == yaml.safe_load(text)


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path, "poll:\n  interval: 5s\n  page_size: [1, 2\nsims: []\n")
    problems = load_problems(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: line 4, column 5: ")
    assert "expected ',' or ']'" in problems[0]


def test_yaml_error_does_not_show_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"twilio:\n  auth_token: {SECRET}: oops\n")
    problems = load_problems(path)
    column = len(f"  auth_token: {SECRET}") + 1  # at the second colon
    assert problems == [f"{path}: line 2, column {column}: mapping values are not allowed here"]


def test_yaml_tab_indentation(tmp_path: Path) -> None:
    path = write_config(tmp_path, "poll:\n\tinterval: 5s\n")
    assert load_problems(path)[0].startswith(f"{path}: line 2, column 1: ")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"sims: [{SIM_A}]\npoll:\n  interval: 5s\n  interval: 6s\n")
    assert load_problems(path) == [f"{path}: line 4, column 3: duplicate key 'interval'"]


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "x-labels: &common {site: berlin}\n"
        f"sims:\n  - sid: {SIM_A}\n    labels:\n      <<: *common\n      floor: '2'\n",
    )
    problems = load_problems(path)
    # the anchor holder is not an option, but the merge itself worked
    assert problems == [
        "x-labels: unknown option (valid options: twilio, poll, sims, discovery, metrics, usage, state, shard)"
    ]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)
    assert load_problems(path) == [f"{path}: the configuration file is empty"]


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("42\n", "a number")]
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write_config(tmp_path, text)
    problems = load_problems(path)
    assert problems == [
        f"{path}: the top level must be a mapping of options "
        f"(twilio, poll, sims, discovery, metrics, usage, state, shard), got {kind}"
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert load_problems(path) == [f"{path}: cannot read config file: No such file or directory"]


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    assert load_problems(tmp_path) == [f"{tmp_path}: cannot read config file: Is a directory"]


def test_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"sims: []\n# caf\xe9\n")
    assert load_problems(path) == [f"{path}: cannot read config file: not UTF-8 text (byte 14)"]


def test_multiple_documents(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"sims: [{SIM_A}]\n---\nsims: [{SIM_B}]\n")
    assert load_problems(path)[0].startswith(f"{path}: line 2, column 1: ")


def test_error_has_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({}, ENV, source="mine.yaml")
    assert info.value.source == "mine.yaml"


# ----------------------------------------------------------------------------------------------
# Good configurations


def test_shipped_example_loads_with_env_credentials() -> None:
    cfg = load_config(REPO_ROOT / "config.example.yaml", ENV)
    assert cfg.twilio.base_url == "https://wireless.twilio.com"
    assert cfg.twilio.credentials == BasicCredentials(
        username=ACCOUNT_SID, password=SecretStr(TOKEN), account_sid=ACCOUNT_SID
    )
    assert [sim.sid for sim in cfg.sims] == [
        "DE0123456789abcdef0123456789abcdef",
        "DEfedcba9876543210fedcba9876543210",
    ]
    assert cfg.sims[0].labels == {"site": "berlin", "building": "7"}
    assert cfg.poll == PollSettings()
    assert cfg.discovery == DiscoverySettings()
    assert cfg.metrics == MetricsSettings()
    assert cfg.state == StateSettings()
    assert cfg.warnings == ()


def test_shipped_example_needs_credentials() -> None:
    problems = load_problems(REPO_ROOT / "config.example.yaml", {})
    assert_problem(problems, "twilio.auth_token", "no Twilio credentials configured")


def test_defaults() -> None:
    cfg = config_from_mapping({"sims": [{"sid": SIM_A}]}, ENV)
    assert cfg.twilio.base_url == "https://wireless.twilio.com"
    assert cfg.twilio.timeout == 10.0
    assert cfg.twilio.auth.type == "basic"
    assert cfg.poll.interval == 60.0
    assert cfg.poll.page_size == 100
    assert cfg.poll.concurrency == 8
    assert cfg.poll.requests_per_second == 20.0
    assert cfg.poll.max_retries == 4
    assert cfg.poll.backoff_initial == 1.0
    assert cfg.poll.backoff_max == 60.0
    assert cfg.poll.max_pages == 50
    assert cfg.poll.max_response_bytes == 16 * 1024 * 1024
    assert cfg.discovery.enabled is False
    assert cfg.discovery.status == ("active",)
    assert cfg.discovery.refresh_interval == 600.0
    assert cfg.metrics.imei_label is False
    assert cfg.state.path is None
    assert cfg.sims == (SimSettings(sid=SIM_A),)
    assert cfg.sims[0].name is None
    assert cfg.sims[0].labels == {}


def test_full_configuration(tmp_path: Path) -> None:
    cfg = config_from_mapping(
        {
            "twilio": {"base_url": "http://127.0.0.1:8080/", "timeout": "2.5s"},
            "poll": {
                "interval": "1m30s",
                "page_size": 1000,
                "concurrency": 256,
                "requests_per_second": 0.5,
                "max_retries": 0,
                "backoff_initial": "250ms",
                "backoff_max": "2m",
                "max_pages": 10000,
                "max_response_bytes": "512KiB",
            },
            "sims": [SIM_A, {"sid": SIM_B, "name": "pump-17", "labels": {"site": "berlin"}}],
            "discovery": {
                "enabled": True,
                "status": ["active", "suspended", "active"],
                "refresh_interval": 30,
            },
            "metrics": {"imei_label": True},
            "state": {"path": str(tmp_path / "state.json")},
        },
        ENV,
    )
    assert cfg.twilio.base_url == "http://127.0.0.1:8080"
    assert cfg.twilio.timeout == 2.5
    assert cfg.poll.interval == 90.0
    assert cfg.poll.requests_per_second == 0.5
    assert cfg.poll.backoff_initial == 0.25
    assert cfg.poll.backoff_max == 120.0
    assert cfg.poll.max_response_bytes == 512 * 1024
    assert cfg.sims == (
        SimSettings(sid=SIM_A),
        SimSettings(sid=SIM_B, name="pump-17", labels={"site": "berlin"}),
    )
    assert cfg.discovery.status == ("active", "suspended")
    assert cfg.discovery.refresh_interval == 30.0
    assert cfg.metrics.imei_label is True
    assert cfg.state.path == tmp_path / "state.json"
    assert cfg.warnings == ()  # plain http to a loopback address is fine


def test_discovery_alone_is_enough() -> None:
    cfg = config_from_mapping({"discovery": {"enabled": True}}, ENV)
    assert cfg.sims == ()
    assert cfg.discovery.enabled is True


def test_empty_sections_take_defaults() -> None:
    cfg = config_from_mapping(
        {"twilio": None, "poll": None, "sims": [SIM_A], "metrics": None, "state": None}, ENV
    )
    assert cfg.poll == PollSettings()


def test_plain_http_to_a_remote_host_warns() -> None:
    cfg = config_from_mapping(make(twilio={"base_url": "http://proxy.example.com"}), ENV)
    assert cfg.warnings == (
        "twilio.base_url: uses plain http; credentials would cross the network unencrypted",
    )


def test_base_url_with_api_version_warns() -> None:
    cfg = config_from_mapping(
        make(twilio={"base_url": "https://programmable-wireless.api.korewireless.com/v1/"}), ENV
    )
    assert cfg.twilio.base_url == "https://programmable-wireless.api.korewireless.com/v1"
    assert cfg.warnings == (
        "twilio.base_url: ends in /v1, but the exporter adds /v1 itself; give the URL without it",
    )


def test_config_error_pickles() -> None:
    error = ConfigError(["a: one", "b: two"], "x.yaml")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == ["a: one", "b: two"]
    assert copy.source == "x.yaml"
    assert str(copy) == "a: one\nb: two"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("2.5", 2.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1d2h3m4s5ms", 93784.005),
        ("1.5h", 5400.0),
        ("0.1s", 0.1),
        (" 10s ", 10.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "",
        "s",
        "soon",
        "5 m",
        "1m1h",
        "1s1s",
        "1ms1s",
        "5x",
        "-1s",
        -1,
        True,
        None,
        [5],
        "1e3",
        "nan",
        float("nan"),
        math.inf,
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="must"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (2048, 2048),
        ("2048", 2048),
        ("16MiB", 16 * 1024 * 1024),
        ("16mib", 16 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1MB", 1_000_000),
        ("1 GiB", 1024**3),
        ("1.5KiB", 1536),
        ("10B", 10),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert TypeAdapter(Size).validate_python(value) == size


@pytest.mark.parametrize("value", ["", "MiB", "16 MeB", "-1", -1, 1.5, True, "1.5B"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Size).validate_python(value)


# ----------------------------------------------------------------------------------------------
# Credentials


def test_env_fallback_account_sid_and_token() -> None:
    cfg = config_from_mapping(make(), ENV)
    assert cfg.twilio.credentials == BasicCredentials(
        username=ACCOUNT_SID, password=SecretStr(TOKEN), account_sid=ACCOUNT_SID
    )


def test_env_fills_in_what_the_config_leaves_unset() -> None:
    cfg = config_from_mapping(
        make(twilio={"account_sid": OTHER_ACCOUNT_SID}), {"TWILIO_AUTH_TOKEN": TOKEN}
    )
    assert cfg.twilio.credentials == BasicCredentials(
        username=OTHER_ACCOUNT_SID, password=SecretStr(TOKEN), account_sid=OTHER_ACCOUNT_SID
    )
    cfg = config_from_mapping(
        make(twilio={"auth_token": "config-token"}), {"TWILIO_ACCOUNT_SID": ACCOUNT_SID}
    )
    assert cfg.twilio.credentials == BasicCredentials(
        username=ACCOUNT_SID, password=SecretStr("config-token"), account_sid=ACCOUNT_SID
    )


def test_config_wins_over_env() -> None:
    env = {**ENV, "TWILIO_API_KEY": API_KEY, "TWILIO_API_SECRET": "env-api-secret"}
    cfg = config_from_mapping(
        make(twilio={"account_sid": OTHER_ACCOUNT_SID, "auth_token": "config-token"}), env
    )
    assert cfg.twilio.credentials == BasicCredentials(
        username=OTHER_ACCOUNT_SID,
        password=SecretStr("config-token"),
        account_sid=OTHER_ACCOUNT_SID,
    )


def test_secret_file_wins_over_env(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "token", "file-token\n")
    cfg = config_from_mapping(make(twilio={"auth_token_file": str(secret)}), ENV)
    assert cfg.twilio.credentials == BasicCredentials(
        username=ACCOUNT_SID, password=SecretStr("file-token"), account_sid=ACCOUNT_SID
    )
    assert cfg.twilio.auth_token_file == secret


def test_env_api_key_is_preferred_over_env_auth_token() -> None:
    env = {**ENV, "TWILIO_API_KEY": API_KEY, "TWILIO_API_SECRET": "env-api-secret"}
    cfg = config_from_mapping(make(), env)
    assert cfg.twilio.credentials == BasicCredentials(
        username=API_KEY, password=SecretStr("env-api-secret"), account_sid=ACCOUNT_SID
    )


def test_env_api_key_without_account_sid() -> None:
    env = {"TWILIO_API_KEY": API_KEY, "TWILIO_API_SECRET": "env-api-secret"}
    cfg = config_from_mapping(make(), env)
    assert cfg.twilio.credentials == BasicCredentials(
        username=API_KEY, password=SecretStr("env-api-secret"), account_sid=None
    )


def test_api_key_auth_in_config(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "api-secret", "file-api-secret\n")
    cfg = config_from_mapping(
        make(
            twilio={"account_sid": ACCOUNT_SID, "api_key": API_KEY, "api_secret_file": str(secret)}
        ),
        {"TWILIO_AUTH_TOKEN": "ignored"},
    )
    assert cfg.twilio.credentials == BasicCredentials(
        username=API_KEY, password=SecretStr("file-api-secret"), account_sid=ACCOUNT_SID
    )


def test_api_key_with_secret_from_env() -> None:
    cfg = config_from_mapping(make(twilio={"api_key": API_KEY}), {"TWILIO_API_SECRET": "from-env"})
    assert cfg.twilio.credentials == BasicCredentials(
        username=API_KEY, password=SecretStr("from-env"), account_sid=None
    )


def test_empty_env_values_count_as_unset() -> None:
    env = {"TWILIO_API_KEY": "", "TWILIO_API_SECRET": "", **ENV}
    cfg = config_from_mapping(make(), env)
    assert isinstance(cfg.twilio.credentials, BasicCredentials)
    assert cfg.twilio.credentials.username == ACCOUNT_SID


def test_oauth2_with_env() -> None:
    cfg = config_from_mapping(
        make(
            twilio={
                "base_url": "https://programmable-wireless.api.korewireless.com",
                "auth": {"type": "oauth2_client_credentials"},
            }
        ),
        {"KORE_CLIENT_ID": "kore-client", "KORE_CLIENT_SECRET": "kore-secret", **ENV},
    )
    assert cfg.twilio.credentials == OAuth2Credentials(
        token_url="https://api.korewireless.com/api-services/v1/auth/token",
        client_id="kore-client",
        client_secret=SecretStr("kore-secret"),
        scope=None,
        refresh_margin=60.0,
    )


def test_oauth2_in_config(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "kore", "file-secret\n")
    cfg = config_from_mapping(
        make(
            twilio={
                "auth": {
                    "type": "oauth2_client_credentials",
                    "token_url": "https://auth.example.com/token",
                    "client_id": "config-client",
                    "client_secret_file": str(secret),
                    "scope": "wireless",
                    "refresh_margin": "5m",
                }
            }
        ),
        {"KORE_CLIENT_ID": "env-client", "KORE_CLIENT_SECRET": "env-secret"},
    )
    assert cfg.twilio.credentials == OAuth2Credentials(
        token_url="https://auth.example.com/token",
        client_id="config-client",
        client_secret=SecretStr("file-secret"),
        scope="wireless",
        refresh_margin=300.0,
    )


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TWILIO_API_KEY", "TWILIO_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "process-env-token")
    cfg = config_from_mapping(make())
    assert isinstance(cfg.twilio.credentials, BasicCredentials)
    assert cfg.twilio.credentials.password.get_secret_value() == "process-env-token"


def test_model_validate_with_context() -> None:
    cfg = Config.model_validate(make(), context={"environ": ENV})
    assert cfg.twilio.credentials.password == SecretStr(TOKEN)  # type: ignore[union-attr]
    settings = TwilioSettings.model_validate(
        {"account_sid": ACCOUNT_SID}, context={"environ": {"TWILIO_AUTH_TOKEN": "t"}}
    )
    assert isinstance(settings.credentials, BasicCredentials)


# ----------------------------------------------------------------------------------------------
# Secrets never show


def test_secrets_do_not_appear_in_reprs_or_dumps() -> None:
    cfg = config_from_mapping(make(twilio={"account_sid": ACCOUNT_SID, "auth_token": SECRET}), {})
    credentials = cfg.twilio.credentials
    assert isinstance(credentials, BasicCredentials)
    assert credentials.password.get_secret_value() == SECRET  # the value is there...
    for text in (
        repr(cfg),
        str(cfg),
        cfg.model_dump_json(),
        str(cfg.model_dump()),
        repr(cfg.twilio),
        repr(credentials),
        str(credentials),
    ):
        assert SECRET not in text  # ...but never shown


def test_oauth2_secret_does_not_appear() -> None:
    cfg = config_from_mapping(
        make(
            twilio={
                "auth": {
                    "type": "oauth2_client_credentials",
                    "client_id": "c",
                    "client_secret": SECRET,
                }
            }
        ),
        {},
    )
    for text in (repr(cfg), cfg.model_dump_json(), repr(cfg.twilio.credentials)):
        assert SECRET not in text


@pytest.mark.parametrize(
    "twilio",
    [
        # a secret in a config with other problems
        {"auth_token": SECRET, "api_key": API_KEY, "timeout": "soon"},
        {"auth_token": SECRET, "api_key": API_KEY},
        {"auth_token": SECRET, "auth_token_file": "/run/secrets/x", "account_sid": ACCOUNT_SID},
        {"auth_token": SECRET, "auth": {"type": "oauth2_client_credentials"}},
        {"api_secret": SECRET},
        # a secret pasted into the wrong option
        {"account_sid": SECRET, "auth_token": "x"},
        {"api_key": SECRET, "api_secret": "x"},
        {"auth_tokn": SECRET},
        {"base_url": f"https://user:{SECRET}@example.com"},
        {"base_url": f"https://user:{SECRET}@example.com/?q=1"},
        {"base_url": f"https://user:{SECRET}@example.com:99999"},
        {
            "auth": {
                "type": "oauth2_client_credentials",
                "client_id": "c",
                "client_secret": SECRET,
                "refresh_margin": "soon",
            }
        },
        {"auth": {"client_secret": SECRET}},
        {"auth_token": [SECRET]},
    ],
)
def test_secrets_do_not_appear_in_errors(twilio: dict[str, Any]) -> None:
    data = make(twilio=twilio, poll={"page_size": 0})
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, {})
    error = info.value
    assert error.problems  # it did fail
    for text in (str(error), repr(error), *error.problems, str(error.args)):
        assert SECRET not in text
    # the pydantic error (which holds the raw input) is not chained onto the ConfigError
    assert error.__cause__ is None
    assert error.__context__ is None


def test_raw_pydantic_error_hides_the_secret_too() -> None:
    short_secret = "hunter2-XY"  # short enough that pydantic would not truncate it away
    with pytest.raises(ValidationError) as info:
        Config.model_validate(make(twilio={"auth_token": [short_secret]}))
    assert short_secret not in str(info.value)


def test_secret_in_a_yaml_file_with_problems(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        f"twilio:\n  auth_token: '{SECRET}'\n  api_key: {API_KEY}\nsims: [{{sid: DE1}}]\n",
    )
    problems = load_problems(path, {})
    assert_problem(problems, "twilio.api_key", "cannot be combined")
    assert_problem(problems, "sims[0].sid", "got 'DE1'")
    assert all(SECRET not in p for p in problems)


# ----------------------------------------------------------------------------------------------
# Properties


@given(
    hours=st.integers(min_value=0, max_value=10_000),
    minutes=st.integers(min_value=0, max_value=59),
    seconds=st.integers(min_value=0, max_value=59),
)
def test_parse_duration_hms(hours: int, minutes: int, seconds: int) -> None:
    assert parse_duration(f"{hours}h{minutes}m{seconds}s") == hours * 3600 + minutes * 60 + seconds


@given(
    parts=st.lists(st.booleans(), min_size=3, max_size=3).filter(any),
    hours=st.integers(min_value=0, max_value=1000),
    minutes=st.integers(min_value=0, max_value=10_000),
    seconds=st.integers(min_value=0, max_value=10_000),
)
def test_parse_duration_any_subset_of_units(
    parts: list[bool], hours: int, minutes: int, seconds: int
) -> None:
    text = "".join(
        f"{value}{unit}"
        for use, value, unit in zip(parts, (hours, minutes, seconds), "hms", strict=True)
        if use
    )
    expected = sum(
        value * factor
        for use, value, factor in zip(parts, (hours, minutes, seconds), (3600, 60, 1), strict=True)
        if use
    )
    assert parse_duration(text) == expected


@given(millis=st.integers(min_value=0, max_value=400 * 86_400_000))
def test_format_duration_round_trips(millis: int) -> None:
    seconds = millis / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == seconds


@given(seconds=st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_format_duration_round_trips_floats(seconds: float) -> None:
    assert math.isclose(parse_duration(format_duration(seconds)), seconds, abs_tol=1e-9)


def test_secret_file_mode_constant_is_what_the_warning_uses(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "t", "x", mode=0o604)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o604
    cfg = config_from_mapping(
        make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": str(secret)}), {}
    )
    assert len(cfg.warnings) == 1
    assert "(mode 0604)" in cfg.warnings[0]


# ----------------------------------------------------------------------------------------------
# Hostile values: each is one clear line at its path, never a traceback, never a hang


def finishes(call: Any) -> Any:
    """``call()`` in a thread that the test gives up on if it blocks (e.g. opening a FIFO)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the caller inspects it
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "blocked (a FIFO opened for reading waits for a writer)"
    return outcome[0]


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        pytest.param(
            make(poll={"requests_per_second": 10**400}),
            "poll.requests_per_second",
            "is too large, got a 401-digit number",
            id="rps-401-digits",
        ),
        pytest.param(
            make(poll={"page_size": -(10**400)}),
            "poll.page_size",
            "must be between 1 and 1000, got a 401-digit number",
            id="int-401-digits",
        ),
        pytest.param(
            make(poll={"max_response_bytes": "9" * 400 + "GiB"}),
            "poll.max_response_bytes",
            "must be between 1KiB and 1GiB, got '99999",
            id="size-400-digits",
        ),
        pytest.param(
            make(poll={"max_response_bytes": -1}),
            "poll.max_response_bytes",
            "must not be negative, got -1",
            id="size-negative",
        ),
        pytest.param(
            make(poll={"max_response_bytes": "-1KiB"}),
            "poll.max_response_bytes",
            "must not be negative, got '-1KiB'",
            id="size-negative-text",
        ),
        pytest.param(
            make(state={"path": ""}), "state.path", "must not be empty", id="state-path-empty"
        ),
        pytest.param(
            make(state={"path": "/tmp/" + "x" * 300}),
            "state.path",
            "File name too long",
            id="state-path-component-too-long",
        ),
        pytest.param(
            make(state={"path": "/tmp/" + "x" * 300 + "/state.db"}),
            "state.path",
            "File name too long",
            id="state-dir-component-too-long",
        ),
        pytest.param(
            make(twilio={"auth_token_file": "/tmp/" + "x" * 300}),
            "twilio.auth_token_file",
            "File name too long",
            id="secret-file-component-too-long",
        ),
        pytest.param(
            make(twilio={"auth_token_file": " "}),
            "twilio.auth_token_file",
            "must not be empty",
            id="secret-file-blank",
        ),
        pytest.param(
            make(twilio={"account_sid": 5, "auth_token": "x"}),
            "twilio.account_sid",
            "must be a string like AC followed by 32 hex digits, got a number",
            id="account-sid-number",
        ),
        pytest.param(
            make(twilio={"api_key": ["SK"], "api_secret": "x"}),
            "twilio.api_key",
            "must be a string like SK followed by 32 hex digits, got a list",
            id="api-key-list",
        ),
    ],
)
def test_hostile_value_is_one_line_at_its_path(data: Any, path: str, message: str) -> None:
    problems = problems_of(data)
    assert_problem(problems, path, message)
    assert all(len(line) < 600 for line in problems), problems


def test_state_path_that_is_a_directory(tmp_path: Path) -> None:
    assert problems_of(make(state={"path": str(tmp_path)})) == [
        f"state.path: {tmp_path} is a directory; give the path of a file"
    ]


def test_state_path_that_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "state"
    os.mkfifo(fifo)
    assert problems_of(make(state={"path": str(fifo)})) == [
        f"state.path: {fifo} is not a regular file"
    ]


@pytest.mark.parametrize(
    ("twilio", "option"),
    [
        ({"account_sid": ACCOUNT_SID, "auth_token_file": "{fifo}"}, "twilio.auth_token_file"),
        ({"api_key": API_KEY, "api_secret_file": "{fifo}"}, "twilio.api_secret_file"),
        (
            {
                "auth": {
                    "type": "oauth2_client_credentials",
                    "client_id": "c",
                    "client_secret_file": "{fifo}",
                }
            },
            "twilio.auth.client_secret_file",
        ),
    ],
)
def test_secret_file_that_is_a_fifo_does_not_block(
    tmp_path: Path, twilio: dict[str, Any], option: str
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    filled = json.loads(json.dumps(twilio).replace("{fifo}", str(fifo)))
    error = finishes(lambda: config_from_mapping(make(twilio=filled), {}))
    assert isinstance(error, ConfigError)
    assert error.problems == [f"{option}: cannot read {fifo}: not a regular file"]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_secret_file_that_is_a_device(device: str) -> None:
    data = make(twilio={"account_sid": ACCOUNT_SID, "auth_token_file": device})
    assert problems_of(data, {}) == [
        f"twilio.auth_token_file: cannot read {device}: not a regular file"
    ]


def test_config_file_that_is_a_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    error = finishes(lambda: load_config(fifo, ENV))
    assert isinstance(error, ConfigError)
    assert error.problems == [f"{fifo}: cannot read config file: not a regular file"]


@pytest.mark.parametrize(
    "text",
    [
        "sims: " + "[" * 5000 + "]" * 5000 + "\n",
        "sims:\n" + "".join("  " * depth + "- \n" for depth in range(1, 3000)),
    ],
)
def test_yaml_nested_too_deeply(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)
    assert load_problems(path) == [f"{path}: invalid YAML: nested too deeply"]


def test_config_file_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("twilio_wireless_exporter.config.loading.MAX_FILE_BYTES", 1024)
    path = write_config(tmp_path, "# " + "x" * 2000 + "\n")
    assert load_problems(path) == [f"{path}: cannot read config file: larger than 1KiB"]


def test_check_config_with_a_fifo_secret_exits_2(tmp_path: Path) -> None:
    """The issue's case end to end: ``--check-config`` used to wait forever for a writer."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"twilio: {{account_sid: {ACCOUNT_SID}, auth_token_file: token}}\nsims: [{SIM_A}]\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "twilio_wireless_exporter",
            "--config",
            str(config),
            "--check-config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "exporter")},
        check=False,
    )
    assert done.returncode == 2
    assert f"twilio.auth_token_file: cannot read {fifo}: not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------------
# Property: any hostile configuration is a Config or a ConfigError with paths, nothing else

#: Every option of the file, by section (``sims`` items: see SIM_OPTIONS).
OPTIONS: dict[str, tuple[str, ...]] = {
    "twilio": (*TwilioSettings.model_fields, "auth"),
    "twilio.auth": ("type", "token_url", "client_id", "client_secret", "client_secret_file"),
    "poll": tuple(PollSettings.model_fields),
    "discovery": tuple(DiscoverySettings.model_fields),
    "metrics": tuple(MetricsSettings.model_fields),
    "state": tuple(StateSettings.model_fields),
    "shard": ("index", "count"),
}
SIM_OPTIONS = ("sid", "name", "labels")

odd_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\r\nb",
        "\x7f",
        "~nobody-here/x",
        "/tmp/" + "x" * 300,
        "9" * 400 + "GiB",
        "9" * 400 + "s",
        "-1",
        "nan",
        "-inf",
        "1e308",
        "1h1h",
        "http://[::1",
        "https://u:p@h",
        "DE" + "a" * 32,
        "active",
        "oauth2_client_credentials",
        "{fifo}",
        "{dir}",
    ]
)
hostile_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1, 2**1024]),
    st.floats(),
    st.text(max_size=40),
    odd_text,
)
hostile_value = st.recursive(
    hostile_scalar,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def hostile_configs(draw: st.DrawFn) -> dict[Any, Any]:
    data: dict[Any, Any] = {}
    for path in draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=4, unique=True)):
        section = data
        for part in path.split("."):
            if not isinstance(section.get(part), dict):
                section[part] = {}
            section = section[part]
        names = st.sampled_from(OPTIONS[path]) | st.text(max_size=6)
        values = odd_text | hostile_value
        section.update(draw(st.dictionaries(names, values, max_size=4)))
    if draw(st.booleans()):
        sim = st.dictionaries(st.sampled_from(SIM_OPTIONS), hostile_value, max_size=3)
        data["sims"] = draw(st.lists(sim | hostile_value, max_size=3))
    if draw(st.booleans()):  # now and then a whole section of the wrong kind
        data[draw(st.sampled_from([*sorted(OPTIONS), "sims"]))] = draw(hostile_value)
    return data


def input_paths(data: object, prefix: tuple[str | int, ...] = ()) -> set[str]:
    """Every location of ``data``, written as the error lines write them."""
    found = {dotted(prefix)} if prefix else set()
    if isinstance(data, Mapping):
        for key, value in data.items():
            found |= input_paths(value, (*prefix, key))
            found.add(dotted((*prefix, key, "[key]")))  # an integer key, named as the key
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found |= input_paths(value, (*prefix, index))
    return found


MODEL_PATHS = {f"{section}.{name}" for section, names in OPTIONS.items() for name in names} | {
    *OPTIONS,
    "sims",
    *(f"sims.{name}" for name in SIM_OPTIONS),
}


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    where = tmp_path_factory.mktemp("odd")
    os.mkfifo(where / "fifo")
    return {"{fifo}": str(where / "fifo"), "{dir}": str(where)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_configs(), environ=st.sampled_from([ENV, {}]))
def test_a_hostile_config_is_valid_or_reported_at_real_paths(
    odd_files: dict[str, str], data: dict[Any, Any], environ: dict[str, str]
) -> None:
    data = fill_in(data, odd_files)
    config = finishes(lambda: config_from_mapping(data, environ))
    if isinstance(config, Config):
        return
    assert isinstance(config, ConfigError), repr(config)
    known = input_paths(data) | MODEL_PATHS
    for line in config.problems:
        path = line.split(": ", 1)[0]
        generic = re.sub(r"\[\d+\]", "", path)
        assert path in known or generic in known, f"{line!r} does not start with a field path"
        assert len(line) < 1000, line


def fill_in(value: Any, files: dict[str, str]) -> Any:
    if isinstance(value, str):
        return files.get(value, value)
    if isinstance(value, dict):
        return {key: fill_in(item, files) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_in(item, files) for item in value]
    return value
