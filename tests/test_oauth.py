"""OAuth2 client credentials (KORE Wireless) against the real simulator in bearer mode.

The exporter and the simulator's token expiry share one :class:`ManualClock`; retry sleeps are
recorded, never waited. Nothing here waits on wall-clock time except two bounded waits for an
injected timeout of 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.harness_support import eventually
from tests.metrics_support import find_value as metric
from twilio_wireless_exporter.api.auth import (
    OAuth2Authenticator,
    TokenResult,
    TokenSettings,
    TokenStatus,
    parse_expires_in,
    token_result,
)
from twilio_wireless_exporter.api.transport import USER_AGENT, ApiError, ErrorKind
from twilio_wireless_exporter.cli import _demo_config, build_parser, main
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import OAuth2Credentials, config_from_mapping
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_simulator import (
    DEMO_CLIENT_ID,
    FaultResponse,
    RunningSimulator,
    SimulatorConfig,
    start_simulator,
)

SECRET = "kore-secret-5d1f0c9e7ab2"  # the simulator's client secret in these tests
START = 1_700_000_000.0  # ManualClock's default unix start
TOKEN = "twilio_wireless_oauth_token_requests_total"
EXPIRY = "twilio_wireless_oauth_token_expiry_timestamp_seconds"
REMAINING = "twilio_wireless_oauth_token_remaining_lifetime_seconds"
INVALID_CLIENT = b'{"error":"invalid_client","error_description":"Client authentication failed"}'


Answer = bytes | Callable[[], bytes] | tuple[int, bytes]


class TokenEndpoint:
    """A minimal token endpoint serving the given answers in order (the last one repeats).

    The simulator's token endpoint only issues good tokens or errors; this one can answer 200
    with any body. An answer is bytes, or a function returning bytes at request time, or a
    ``(status, bytes)`` pair.
    """

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        app = web.Application()
        app.router.add_post("/oauth/token", self._handle)
        self.server = TestServer(app)

    async def _handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append(({k: str(v) for k, v in form.items()}, dict(request.headers)))
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        status, answer = answer if isinstance(answer, tuple) else (200, answer)
        body = answer() if callable(answer) else answer
        return web.Response(status=status, body=body, content_type="application/json")

    @property
    def url(self) -> str:
        return str(self.server.make_url("/oauth/token"))


@contextlib.asynccontextmanager
async def token_endpoint(answers: list[Answer]) -> AsyncIterator[TokenEndpoint]:
    endpoint = TokenEndpoint(answers)
    await endpoint.server.start_server()
    try:
        yield endpoint
    finally:
        await endpoint.server.close()


def oauth_mapping(
    sim: RunningSimulator,
    sids: list[str],
    *,
    secret: str = SECRET,
    margin: str = "60s",
    timeout: str = "2s",
    token_url: str | None = None,
    **poll: Any,
) -> dict[str, Any]:
    return {
        "twilio": {
            "base_url": sim.url,
            "timeout": timeout,
            "auth": {
                "type": "oauth2_client_credentials",
                "token_url": token_url or sim.token_url,
                "client_id": DEMO_CLIENT_ID,
                "client_secret": secret,
                "refresh_margin": margin,
            },
        },
        "poll": {
            "interval": "60s",
            "page_size": 100,
            "concurrency": 64,
            "requests_per_second": 10_000,
            "max_retries": 4,
            "backoff_initial": "1s",
            "backoff_max": "8s",
            **poll,
        },
        "usage": {"enabled": False},  # the token tests count API requests
        "sims": [{"sid": sid} for sid in sids],
    }


@dataclass
class Env:
    """A bearer-mode simulator and an exporter sharing one manual clock."""

    sim: RunningSimulator
    clock: ManualClock
    sids: list[str] = field(default_factory=list)
    issued: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, token)
    sleeps: list[float] = field(default_factory=list)
    exporter: Exporter | None = None
    http: TestClient[Any, Any] | None = None

    @property
    def exp(self) -> Exporter:
        assert self.exporter is not None
        return self.exporter

    @property
    def tokens(self) -> list[str]:
        return [token for _, token in self.issued]

    async def start(self, mapping: dict[str, Any] | None = None, **options: Any) -> Exporter:
        config = config_from_mapping(
            mapping or oauth_mapping(self.sim, self.sids, **options), environ={}
        )

        async def record_sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.exporter = Exporter(config, clock=self.clock, retry_sleep=record_sleep)
        await self.exporter.open()
        self.http = TestClient(TestServer(make_app(self.exporter.web_context())))
        await self.http.start_server()
        return self.exporter

    async def poll(self) -> None:
        await self.exp.poller.poll_all()

    async def get(self, path: str) -> str:
        assert self.http is not None
        resp = await self.http.get(path)
        assert resp.status == 200
        return await resp.text()

    async def scrape(self) -> str:
        return await self.get("/metrics")

    def up(self) -> list[bool | None]:
        return [self.exp.state.sims[sid].up for sid in self.sids]

    def error(self, sid: str | None = None) -> str | None:
        return self.exp.state.sims[sid or self.sids[0]].last_error

    def api(self, status: int, kind: str = "data_sessions") -> int:
        return self.sim.stats.count(kind, status)


MakeEnv = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeEnv]:
    made: list[tuple[Env, Any]] = []

    async def make(sims: int = 1, lifetime: float = 3600.0, style: str = "opaque") -> Env:
        clock = ManualClock()
        starter = start_simulator(
            SimulatorConfig(
                sims=0,
                seed=3,
                auth_mode="bearer",
                client_id=DEMO_CLIENT_ID,
                client_secret=SECRET,
                token_lifetime=lifetime,
                token_clock=clock.monotonic,
                token_style=style,  # type: ignore[arg-type]
                token_wall_clock=clock.time,
            ),
            host="127.0.0.1",
            port=0,
        )
        sim = await starter.__aenter__()
        env = Env(sim, clock)
        made.append((env, starter))
        original = sim.state.issue_token

        def recording_issue() -> str:
            token = original()
            env.issued.append((clock.monotonic(), token))
            return token

        monkeypatch.setattr(sim.state, "issue_token", recording_issue)
        for i in range(sims):
            sid = sim.fleet.add_sim(unique_name=f"sim-{i}")
            sim.fleet.open_session(sid, packets_uploaded=i, packets_downloaded=i)
            env.sids.append(sid)
        return env

    yield make
    for env, starter in made:
        env.sim.release_delayed()
        if env.http is not None:
            await env.http.close()
        if env.exporter is not None:
            await env.exporter.stop()
        await starter.__aexit__(None, None, None)


# --------------------------------------------------------------------------------------------
# Fetch, reuse, refresh


async def test_one_token_is_fetched_before_the_first_poll_and_shared(make_env: MakeEnv) -> None:
    env = await make_env(sims=5)
    await env.start()
    text = await env.scrape()
    # no token yet: the counters exist at 0, the expiry is absent (not a fake 0)
    assert [metric(text, TOKEN, result=r) for r in ("success", "unauthorized", "error")] == [
        0,
        0,
        0,
    ]
    assert metric(text, EXPIRY) is None
    assert metric(text, REMAINING) is None
    assert env.sim.stats.token_requests == 0

    for _ in range(3):
        await env.poll()
        await env.clock.advance(10)
    assert env.sim.stats.token_requests == 1
    assert env.api(200) == 15
    assert env.api(401) == 0
    assert env.up() == [True] * 5
    text = await env.scrape()
    assert metric(text, TOKEN, result="success") == 1
    assert metric(text, EXPIRY) == START + 3600
    assert metric(text, REMAINING) == 3600 - 30
    assert metric(text, "twilio_wireless_api_requests_total", endpoint="token", code="200") == 1
    assert env.sleeps == []


async def test_token_is_renewed_refresh_margin_before_it_expires(make_env: MakeEnv) -> None:
    env = await make_env(sims=2, lifetime=100)
    await env.start(margin="10s")
    await env.poll()
    await env.clock.advance(89.5)
    await env.poll()
    assert env.sim.stats.token_requests == 1
    await env.clock.advance(0.5)  # t = 90 = expiry - margin
    await env.poll()
    assert env.sim.stats.token_requests == 2
    assert [at for at, _ in env.issued] == [0, 90]
    assert env.api(401) == 0
    assert env.api(200) == 6
    text = await env.scrape()
    assert metric(text, EXPIRY) == START + 190
    assert metric(text, REMAINING) == 100


async def test_a_margin_longer_than_the_lifetime_renews_half_way(make_env: MakeEnv) -> None:
    env = await make_env(lifetime=10)
    await env.start(margin="60s")
    for _ in range(20):  # every second for 20 s
        await env.poll()
        await env.clock.advance(1)
    assert [at for at, _ in env.issued] == [0, 5, 10, 15]
    assert env.api(401) == 0


async def test_401_renews_the_token_once_and_the_request_succeeds(make_env: MakeEnv) -> None:
    env = await make_env(sims=1)
    await env.start()
    await env.poll()
    env.sim.expire_tokens()  # revoked / expired early on the server
    await env.poll()
    assert env.sim.stats.token_requests == 2
    assert env.api(401) == 1
    assert env.api(200) == 2
    assert env.up() == [True]
    text = await env.scrape()
    assert metric(text, "twilio_wireless_poll_errors_total", kind="auth") is None
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="401")
        == 1
    )
    assert metric(text, TOKEN, result="success") == 2


async def test_a_fresh_token_rejected_again_is_reported_not_refetched(make_env: MakeEnv) -> None:
    env = await make_env(sims=1)
    await env.start()
    await env.poll()
    rejected = FaultResponse(
        status=401,
        body=b'{"error":"invalid_token","error_description":"Token not accepted for this API"}',
    )
    env.sim.faults.script("data_sessions", [rejected] * 4)
    await env.poll()  # 401 -> new token -> 401 again: reported like any 401
    assert env.sim.stats.token_requests == 2
    assert env.up() == [False]
    assert env.error() == "data_sessions: Token not accepted for this API status=401"
    await env.poll()  # the brand-new token is rejected again: no third token right away
    assert env.sim.stats.token_requests == 2
    assert env.api(401) == 3
    await env.clock.advance(10)  # renew_min_interval later a renewal is allowed again
    await env.poll()
    assert env.sim.stats.token_requests == 3
    assert env.api(401) == 4
    assert env.up() == [True]


async def test_concurrent_requests_during_a_refresh_make_one_token_request(
    make_env: MakeEnv,
) -> None:
    env = await make_env(sims=50, lifetime=600)
    await env.start(margin="60s")
    # a slow token endpoint keeps the first fetch in flight while 49 more polls queue behind it
    env.sim.faults.script("token", [FaultResponse(delay=0.05)])
    await env.poll()
    assert env.sim.stats.token_requests == 1
    assert env.api(200) == 50

    env.sim.expire_tokens()  # all 50 requests get 401 for the same token
    env.sim.faults.script("token", [FaultResponse(delay=0.05)])
    await env.poll()
    assert env.api(401) == 50
    assert env.sim.stats.token_requests == 2

    await env.clock.advance(540)  # the proactive refresh: 50 requests want a new token at once
    env.sim.faults.script("token", [FaultResponse(delay=0.05)])
    await env.poll()
    assert env.sim.stats.token_requests == 3
    assert env.api(200) == 150
    assert env.up() == [True] * 50
    assert env.sleeps == []


async def test_requests_keep_the_valid_token_while_a_slow_renewal_runs(make_env: MakeEnv) -> None:
    env = await make_env(sims=50, lifetime=600)
    await env.start(margin="60s")
    await env.poll()
    await env.clock.advance(540)  # refresh point
    env.sim.faults.script("token", [FaultResponse(delay=30)])  # held until released
    polls = asyncio.create_task(env.poll())
    # the poll that started the renewal waits for it; the other 49 go ahead with the old token
    await eventually(lambda: env.api(200) == 50 + 49)
    assert env.sim.stats.token_requests == 2
    assert not polls.done()
    env.sim.release_delayed()
    await polls
    assert env.api(200) == 100
    assert env.sim.stats.token_requests == 2
    assert env.up() == [True] * 50
    assert metric(await env.scrape(), EXPIRY) == START + 540 + 600


# --------------------------------------------------------------------------------------------
# Failures


async def test_bad_client_secret_fails_polls_clearly_and_backs_off(
    make_env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(sims=3)
    await env.start(secret="not-the-secret")
    with caplog.at_level(logging.ERROR, logger="twilio_wireless_exporter.api.auth"):
        await env.poll()
    assert env.up() == [False] * 3
    assert env.sim.stats.token_requests == 1  # one request for three polls, no retries
    assert env.sleeps == []
    assert env.error() == "token: unauthorized_client: Invalid client credentials status=401"
    assert env.api(200) + env.api(401) == 0  # no API call without a token
    text = await env.scrape()
    assert metric(text, TOKEN, result="unauthorized") == 1
    assert metric(text, "twilio_wireless_poll_errors_total", kind="auth") == 3
    assert metric(text, "twilio_wireless_sim_up", sim_sid=env.sids[0]) == 0
    assert metric(text, EXPIRY) is None
    [record] = [r for r in caplog.records if r.name == "twilio_wireless_exporter.api.auth"]
    assert "rejected the client credentials" in record.getMessage()
    assert "twilio.auth.client_id" in record.getMessage()

    # no tight loop: further polls fail at once until the cool-down is over; it follows the
    # poll backoff (poll.backoff_initial 1 s doubling, at most poll.backoff_max 8 s)
    await env.poll()
    requests = 1
    for cooldown in (1, 2, 4, 8, 8, 8):
        await env.clock.advance(cooldown - 0.1)
        await env.poll()
        assert env.sim.stats.token_requests == requests
        await env.clock.advance(0.1)
        await env.poll()
        requests += 1
        assert env.sim.stats.token_requests == requests
    assert env.up() == [False] * 3


async def test_rejected_credentials_recover_after_the_cooldown(make_env: MakeEnv) -> None:
    env = await make_env(sims=2)
    await env.start()
    env.sim.faults.script("token", [FaultResponse(status=400, body=INVALID_CLIENT)])
    await env.poll()
    assert env.up() == [False, False]
    assert env.error() == "token: invalid_client: Client authentication failed status=400"
    await env.clock.advance(1)  # poll.backoff_initial
    await env.poll()
    assert env.up() == [True, True]
    assert env.sim.stats.token_requests == 2
    text = await env.scrape()
    assert [metric(text, TOKEN, result=r) for r in ("success", "unauthorized", "error")] == [
        1,
        1,
        0,
    ]


async def test_rejected_credentials_for_a_thousand_rounds_keep_their_cooldown(
    make_env: MakeEnv,
) -> None:
    """Before: the cool-down doubled without a cap on the exponent, so round 1,025 raised
    OverflowError out of the authenticator (every poll an internal error, discovery crashed)."""
    env = await make_env(sims=1)
    await env.start()
    rounds = 1030
    env.sim.faults.script("token", [FaultResponse(status=400, body=INVALID_CLIENT)] * rounds)
    for _ in range(rounds):
        await env.poll()
        await env.clock.advance(60)  # past the longest cool-down (poll.backoff_max)
    assert env.up() == [False]
    assert env.error() == "token: invalid_client: Client authentication failed status=400"
    assert env.sim.stats.token_requests == rounds
    await env.poll()
    assert env.up() == [True]


async def test_token_endpoint_faults_are_retried_with_backoff(make_env: MakeEnv) -> None:
    env = await make_env(sims=2)
    await env.start()
    env.sim.faults.script(
        "token",
        [
            FaultResponse(status=503),
            FaultResponse(status=429, retry_after=7),
            FaultResponse(truncated=True),  # invalid JSON
            FaultResponse(malformed=True),  # no access_token, expires_in an object
        ],
    )
    await env.poll()
    assert env.up() == [True, True]
    assert env.sim.stats.token_requests == 5
    assert len(env.sleeps) == 4
    assert env.sleeps[1] == 7  # Retry-After wins over the 2 s backoff ceiling
    assert 0.5 <= env.sleeps[0] <= 1
    assert 2 <= env.sleeps[2] <= 4
    assert 4 <= env.sleeps[3] <= 8
    text = await env.scrape()
    assert [metric(text, TOKEN, result=r) for r in ("success", "unauthorized", "error")] == [
        1,
        0,
        4,
    ]
    retries = "twilio_wireless_api_retries_total"
    assert metric(text, retries, endpoint="token", reason="5xx") == 1
    assert metric(text, retries, endpoint="token", reason="429") == 1
    assert metric(text, retries, endpoint="token", reason="decode") == 2
    assert metric(text, "twilio_wireless_api_requests_total", endpoint="token", code="200") == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"access_token": "", "expires_in": "3600"}',
            "the token endpoint's answer has no access_token",
        ),
        (
            b'{"expires_in": "3600", "token_type": "Bearer"}',
            "the token endpoint's answer has no access_token",
        ),
        (
            b'{"access_token": "abcdefgh", "expires_in": "soon"}',
            "expires_in is not a positive number of seconds: 'soon'",
        ),
        (
            b'{"access_token": "abcdefgh", "expires_in": "0"}',
            "expires_in is not a positive number of seconds: '0'",
        ),
        (
            b'{"access_token": "abcdefgh", "expires_in": "3600", "token_type": "MAC"}',
            "unsupported token_type 'MAC'",
        ),
        (b'["access_token"]', "the token endpoint answered with a JSON list"),
        (b"<html>oops</html>", "the token endpoint answered with invalid JSON"),
    ],
)
async def test_garbage_token_answers_fail_the_round_and_are_reported(
    make_env: MakeEnv, body: bytes, message: str
) -> None:
    env = await make_env(sims=1)
    async with token_endpoint([body]) as endpoint:
        await env.start(
            mapping=oauth_mapping(env.sim, env.sids, token_url=endpoint.url, max_retries=1)
        )
        await env.poll()
    assert len(endpoint.requests) == 2
    assert len(env.sleeps) == 1
    assert env.up() == [False]
    assert env.error() == f"token: {message} status=200"
    text = await env.scrape()
    assert metric(text, "twilio_wireless_poll_errors_total", kind="decode") == 1


async def test_an_oversized_token_answer_fails_the_round_without_retries(
    make_env: MakeEnv,
) -> None:
    """A size cap is not a transient failure: like an API page, it is not retried."""
    env = await make_env(sims=1)
    huge = b'{"access_token": "' + b"a" * (64 * 1024) + b'"}'
    async with token_endpoint([huge]) as endpoint:
        await env.start(mapping=oauth_mapping(env.sim, env.sids, token_url=endpoint.url))
        await env.poll()
    assert len(endpoint.requests) == 1
    assert env.sleeps == []
    assert env.up() == [False]
    assert env.error() == (
        f"token: response of {len(huge)} bytes exceeds the 65536-byte cap status=200"
    )
    text = await env.scrape()
    assert metric(text, "twilio_wireless_poll_errors_total", kind="too_large") == 1
    assert metric(text, TOKEN, result="error") == 1


async def test_exhausted_retries_fail_the_poll_then_recover(make_env: MakeEnv) -> None:
    env = await make_env(sims=2)
    await env.start()
    html = FaultResponse(
        status=502, body=b"<html><h1>502 Bad Gateway</h1></html>", content_type="text/html"
    )
    env.sim.faults.script("token", [html] * 5)
    await env.poll()
    assert env.sim.stats.token_requests == 5  # 1 + max_retries, shared by both polls
    assert len(env.sleeps) == 4
    assert env.up() == [False, False]
    assert env.error() == "token: <html><h1>502 Bad Gateway</h1></html> status=502"
    text = await env.scrape()
    assert metric(text, "twilio_wireless_poll_errors_total", kind="http") == 2
    assert metric(text, TOKEN, result="error") == 5
    await env.poll()  # cooling down: no new round
    assert env.sim.stats.token_requests == 5
    await env.clock.advance(1)
    await env.poll()
    assert env.sim.stats.token_requests == 6
    assert env.up() == [True, True]


async def test_a_token_endpoint_timeout_is_retried(make_env: MakeEnv) -> None:
    env = await make_env(sims=1)
    await env.start(timeout="100ms")
    env.sim.faults.script("token", [FaultResponse(delay=30)])
    await env.poll()
    assert env.up() == [True]
    assert len(env.sleeps) == 1
    text = await env.scrape()
    assert (
        metric(text, "twilio_wireless_api_retries_total", endpoint="token", reason="timeout") == 1
    )
    assert metric(text, "twilio_wireless_api_requests_total", endpoint="token", code="error") == 1


async def test_an_unreachable_token_endpoint_is_a_connection_error(
    make_env: MakeEnv, refused_port: int
) -> None:
    port = refused_port
    env = await make_env(sims=1)
    await env.start(
        mapping=oauth_mapping(
            env.sim, env.sids, token_url=f"http://127.0.0.1:{port}/token", max_retries=2
        )
    )
    await env.poll()
    assert env.up() == [False]
    assert len(env.sleeps) == 2
    error = env.error()
    assert error is not None
    assert error.startswith("token: ClientConnectorError")
    text = await env.scrape()
    assert metric(text, "twilio_wireless_poll_errors_total", kind="connection") == 1


async def test_the_current_token_stays_in_use_while_its_renewal_fails(
    make_env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(sims=1, lifetime=100)
    await env.start(margin="10s")
    await env.poll()
    await env.clock.advance(90)
    env.sim.faults.script("token", [FaultResponse(status=503)] * 100)
    with caplog.at_level(logging.WARNING, logger="twilio_wireless_exporter.api.auth"):
        await env.poll()
    assert env.up() == [True]  # the old token is valid until t=100
    assert env.sim.stats.token_requests == 6
    assert any("the current token stays in use" in r.getMessage() for r in caplog.records)
    await env.clock.advance(0.9)
    await env.poll()
    assert env.up() == [True]
    assert env.sim.stats.token_requests == 6  # cooling down until t=91
    for wait in (0.1, 2, 4):  # failed rounds at t=91, 93 and 97: cooling down until t=105
        await env.clock.advance(wait)
        await env.poll()
        assert env.up() == [True]
    assert env.sim.stats.token_requests == 21
    await env.clock.advance(3)  # t=100: expired, still cooling down
    await env.poll()
    assert env.up() == [False]
    assert env.error() == "token: Service Unavailable status=503"
    text = await env.scrape()
    assert metric(text, REMAINING) == 0
    env.sim.faults.clear_script()
    await env.clock.advance(5)
    await env.poll()
    assert env.up() == [True]
    assert env.sim.stats.token_requests == 22
    assert env.api(401) == 0


async def test_missing_expires_in_assumes_an_hour(
    make_env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(sims=1, lifetime=100)

    def answer() -> bytes:  # a token the simulator accepts, without expires_in
        return json.dumps({"access_token": env.sim.issue_token()}).encode()

    async with token_endpoint([answer]) as endpoint:
        await env.start(mapping=oauth_mapping(env.sim, env.sids, token_url=endpoint.url))
        with caplog.at_level(logging.WARNING, logger="twilio_wireless_exporter.api.auth"):
            await env.poll()
            assert env.up() == [True]
            assert metric(await env.scrape(), EXPIRY) == START + 3600
            # the token really lived 100 s: the API's 401 renews it, then polling goes on
            await env.clock.advance(100)
            await env.poll()
            await env.poll()
    assert env.up() == [True]
    assert len(endpoint.requests) == 2
    assert env.api(401) == 1
    assert env.api(200) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "the token endpoint sent no expires_in; assuming tokens live 3600s (a 401 renews them earlier)"
    ]


async def test_non_twilio_error_bodies_report_status_and_message(make_env: MakeEnv) -> None:
    env = await make_env(sims=3)
    await env.start(max_retries=0)
    a, b, c = env.sids
    env.sim.faults.script(
        "data_sessions",
        [
            FaultResponse(
                status=403,
                body=b'{"error":"access_denied","error_description":"SIM belongs to another account"}',
            ),
            FaultResponse(
                status=404, body=b'{"status":404,"errorCode":33404,"errorMessage":"Unknown SIM"}'
            ),
            FaultResponse(status=500, body=b"upstream exploded", content_type="text/plain"),
        ],
    )
    for sid in (a, b, c):  # one by one: the script is consumed in order
        await env.exp.poller.poll_sim(sid)
    assert env.error(a) == "data_sessions: SIM belongs to another account status=403"
    assert (
        env.error(b)
        == 'data_sessions: {"status":404,"errorCode":33404,"errorMessage":"Unknown SIM"} status=404'
    )
    assert env.error(c) == "data_sessions: upstream exploded status=500"
    assert env.sim.stats.token_requests == 1


# --------------------------------------------------------------------------------------------
# Secrecy


async def test_secrets_and_tokens_never_appear_in_logs_metrics_or_pages(
    make_env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(sims=2, lifetime=60)
    caplog.set_level(logging.DEBUG)
    await env.start(margin="10s")
    outputs: list[str] = []
    await env.poll()
    await env.clock.advance(50)  # proactive refresh
    await env.poll()
    env.sim.expire_tokens()  # 401 renewal
    await env.poll()
    await env.clock.advance(10)
    env.sim.faults.script("token", [FaultResponse(status=503)] * 5)
    env.sim.expire_tokens()  # renewal fails: errors everywhere
    await env.poll()
    outputs.extend(env.error(sid) or "" for sid in env.sids)
    await env.clock.advance(15)
    env.sim.faults.script("token", [FaultResponse(status=401, body=INVALID_CLIENT)])
    await env.poll()
    outputs.extend(env.error(sid) or "" for sid in env.sids)
    await env.clock.advance(30)
    await env.poll()
    assert env.up() == [True, True]
    assert len(env.tokens) == 4

    client = env.exp.client
    outputs += [
        await env.scrape(),
        await env.get("/"),
        repr(client._transport._auth),
        repr(env.exp.config),
    ]
    outputs += [r.getMessage() for r in caplog.records]
    outputs += [str(r.args) for r in caplog.records]
    assert len(caplog.records) > 10
    everything = "\n".join(outputs)
    assert "rejected the client credentials" in everything  # the logs were captured
    for secret in (SECRET, *env.tokens):
        assert secret not in everything


def test_check_config_output_has_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_file = tmp_path / "kore"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text(
        "twilio:\n"
        "  base_url: https://programmable-wireless.api.korewireless.com\n"
        "  auth:\n"
        "    type: oauth2_client_credentials\n"
        "    client_id: my-client\n"
        f"    client_secret: {SECRET}\n"
        "sims: [DE0123456789abcdef0123456789abcdef]\n"
    )
    assert main(["--config", str(config), "--check-config"]) == 0
    good = capsys.readouterr()
    assert good.out.startswith(f"configuration {config} is valid: 1 SIMs, discovery off\n")
    assert SECRET not in good.out + good.err
    # invalid: a secret in two places, and a basic-auth option next to OAuth2
    config.write_text(
        "twilio:\n"
        f"  auth_token: {SECRET}\n"
        "  auth:\n"
        "    type: oauth2_client_credentials\n"
        "    client_id: my-client\n"
        f"    client_secret: {SECRET}\n"
        f"    client_secret_file: {secret_file}\n"
        "sims: [DE0123456789abcdef0123456789abcdef]\n"
    )
    assert main(["--config", str(config), "--check-config"]) == 2
    bad = capsys.readouterr()
    assert "twilio.auth_token" in bad.err
    for output in (good.out, good.err, bad.out, bad.err):
        assert SECRET not in output


async def test_repr_and_errors_hide_secrets() -> None:
    echo = (400, f'{{"error":"invalid_request","error_description":"bad {SECRET}"}}'.encode())
    async with token_endpoint([echo]) as endpoint, aiohttp.ClientSession() as session:
        auth = OAuth2Authenticator(
            session, token_url=endpoint.url, client_id="cid", client_secret=SECRET
        )
        assert repr(auth) == (
            f"OAuth2Authenticator(token_url={endpoint.url!r}, client_id='cid',"
            " client_secret=<redacted>)"
        )
        with pytest.raises(ApiError) as error:
            await auth.authorization()
        assert str(error.value) == "token: invalid_request: bad <redacted> status=400"
        assert auth.status() is None


# --------------------------------------------------------------------------------------------
# The request itself, against a minimal token endpoint


async def test_token_request_shape() -> None:
    body = b'{"access_token": "opaque-token-value", "expires_in": 120, "token_type": "bearer"}'
    clock = ManualClock()
    async with token_endpoint([body]) as endpoint, aiohttp.ClientSession() as session:
        auth = OAuth2Authenticator(
            session,
            token_url=endpoint.url,
            client_id="cid",
            client_secret="sec ret&=",
            scope="wireless.read",
            settings=TokenSettings(refresh_margin=20),
            clock=clock,
        )
        assert await auth.authorization() == "Bearer opaque-token-value"
        assert auth.status() == TokenStatus(START + 120, 120)
        await clock.advance(99)
        assert await auth.authorization() == "Bearer opaque-token-value"
        assert auth.status() == TokenStatus(START + 120, 21)
        assert len(endpoint.requests) == 1
        await clock.advance(1)
        await auth.authorization()
        assert len(endpoint.requests) == 2
        # renew() for a token that is no longer current fetches nothing
        assert await auth.renew("Bearer some-older-token") is True
        assert len(endpoint.requests) == 2
    form, headers = endpoint.requests[0]
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "cid",
        "client_secret": "sec ret&=",
        "scope": "wireless.read",
    }
    assert headers["User-Agent"] == USER_AGENT
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Accept"] == "application/json"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3600", 3600.0),
        (" 60 ", 60.0),
        ("1.5", 1.5),
        (7200, 7200.0),
        (0.5, 0.5),
        ("", None),
        ("soon", None),
        ("0", None),
        ("-5", None),
        ("nan", None),
        ("inf", None),
        (True, None),
        (None, None),
        ({"seconds": 5}, None),
        ([3600], None),
    ],
)
def test_parse_expires_in(value: object, seconds: float | None) -> None:
    assert parse_expires_in(value) == seconds


def test_token_errors_are_never_retried_by_the_api_client() -> None:
    error = ApiError(ErrorKind.HTTP, "Service Unavailable", endpoint="token", status=503)
    assert error.retry_reason == "5xx"  # retried within the authenticator's round
    copy = error.exhausted()  # what every request that needed the token gets
    assert isinstance(copy, ApiError)
    assert copy.retry_reason is None
    assert copy.endpoint == "token"
    assert (copy.kind, copy.message, copy.status) == ("http", "Service Unavailable", 503)
    assert copy is not error
    assert token_result(copy) is TokenResult.ERROR
    assert token_result(ApiError(ErrorKind.AUTH, "x", endpoint="token")) is TokenResult.UNAUTHORIZED


async def test_basic_auth_exports_no_oauth_metrics(make_env: MakeEnv) -> None:
    env = await make_env(sims=1)
    mapping = {
        "twilio": {"base_url": env.sim.url, "account_sid": "AC" + "0" * 32, "auth_token": "t0ken"},
        "sims": env.sids,
    }
    await env.start(mapping=mapping)
    assert "oauth" not in await env.scrape()


# --------------------------------------------------------------------------------------------
# End to end: many expiries, injected clocks


async def test_many_expiries_one_token_request_each_and_no_failed_poll(make_env: MakeEnv) -> None:
    """5 SIMs polled every simulated second for 100 s; tokens live 5 s and are renewed 1 s early."""
    env = await make_env(sims=5, lifetime=5)
    await env.start(margin="1s")
    for _ in range(100):
        await env.poll()
        assert env.up() == [True] * 5
        await env.clock.advance(1)
    assert [at for at, _ in env.issued] == [4.0 * i for i in range(25)]
    assert env.sim.stats.token_requests == 25
    assert env.api(401) == 0
    assert env.api(200) == 500
    text = await env.scrape()
    assert [metric(text, TOKEN, result=r) for r in ("success", "unauthorized", "error")] == [
        25,
        0,
        0,
    ]
    assert metric(text, "twilio_wireless_poll_errors_total", kind="auth") is None
    assert metric(text, EXPIRY) == START + 96 + 5
    assert env.sleeps == []


async def test_scheduled_polling_over_many_expiries(make_env: MakeEnv) -> None:
    """The real scheduler (poller.run) for 150 simulated seconds; tokens live 3 s."""
    env = await make_env(sims=8, lifetime=3)
    exporter = await env.start(margin="0.5s", interval="1s")
    await exporter.start()

    def settled() -> bool:
        # every poll done; asleep: the scheduler, the SIM refresher and the exposition refresher
        return exporter.poller.in_flight == 0 and env.clock.sleepers == 3

    # the identity of the 8 SIMs: one page of the listing, not 8 reads
    await eventually(lambda: env.api(200, "sims") == 1 and settled())
    for _ in range(600):
        await env.clock.advance(0.25)
        await eventually(settled)
    times = [at for at, _ in env.issued]
    # never a second token for one expiry: each was fetched at or after the previous one's
    # refresh point (2.5 s); and never a request with an expired token (no 401)
    assert min(b - a for a, b in itertools.pairwise(times)) >= 2.5
    assert env.api(401) == 0
    assert 150 / 3.5 <= len(times) <= 150 / 2.5 + 1
    assert env.api(200) >= 8 * 150
    assert env.up() == [True] * 8
    text = await env.scrape()
    assert metric(text, "twilio_wireless_poll_errors_total", kind="auth") is None
    assert metric(text, TOKEN, result="success") == len(times)
    assert metric(text, TOKEN, result="error") == 0


# --------------------------------------------------------------------------------------------
# --demo.auth oauth2


async def test_demo_in_oauth2_mode_polls_with_bearer_tokens() -> None:
    args = build_parser().parse_args(
        ["--demo", "--demo.auth", "oauth2", "--demo.token-lifetime", "2", "--demo.sims", "5"]
    )
    async with _demo_config(args, "127.0.0.1") as config:
        creds = config.twilio.credentials
        assert isinstance(creds, OAuth2Credentials)
        assert (creds.client_id, creds.refresh_margin) == (DEMO_CLIENT_ID, 0.4)
        assert creds.token_url.endswith("/api-services/v1/auth/token")
        exporter = Exporter(config)
        await exporter.open()
        try:
            assert await exporter.poller.refresh_sims()
            await exporter.poller.poll_all()
            assert exporter.state.sims
            assert all(record.up for record in exporter.state.sims.values())
        finally:
            await exporter.stop()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_demo_token_lifetime_must_be_positive(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--demo", "--demo.token-lifetime", value])
    assert exc.value.code == 2
    assert "--demo.token-lifetime" in capsys.readouterr().err


def test_demo_auth_defaults_to_basic() -> None:
    args = build_parser().parse_args(["--demo"])
    assert (args.demo_auth, args.demo_token_lifetime) == ("basic", 60.0)


# --------------------------------------------------------------------------------------------
# KORE: 403 for an expired or revoked token, JWT expiry, cool-downs that follow the backoff

KORE_DENIED = (
    b'{"message": "User is not authorized to access this resource with an explicit deny",'
    b' "error": "Invalid or expired token"}'
)


async def test_kore_403_for_a_revoked_token_renews_it_once(make_env: MakeEnv) -> None:
    """Before: KORE's 403 for a revoked token was an auth failure until the scheduled renewal
    (days away for long-lived tokens); a 401 recovered at once."""
    env = await make_env(sims=2, style="kore")
    await env.start()
    await env.poll()
    assert env.up() == [True, True]
    env.sim.expire_tokens()  # revoked: the simulator answers KORE's 403
    await env.poll()
    assert env.up() == [True, True]
    assert env.api(403) == 2  # both polls were refused once ...
    assert env.sim.stats.token_requests == 2  # ... and one renewal served both
    text = await env.scrape()
    assert not metric(text, "twilio_wireless_poll_errors_total", kind="auth")


async def test_a_repeated_kore_403_is_an_auth_failure(make_env: MakeEnv) -> None:
    env = await make_env(sims=1, style="kore")
    await env.start()
    await env.poll()
    denied = FaultResponse(status=403, body=KORE_DENIED)
    env.sim.faults.script("data_sessions", [denied, denied])
    await env.poll()
    assert env.up() == [False]
    assert env.sim.stats.token_requests == 2  # renewed once, not again for the fresh token
    assert env.error() == (
        "data_sessions: User is not authorized to access this resource with an explicit deny"
        " status=403"
    )
    text = await env.scrape()
    assert metric(text, "twilio_wireless_poll_errors_total", kind="auth") == 1
    await env.poll()  # the API takes the token again
    assert env.up() == [True]


async def test_a_403_that_is_not_about_the_token_is_not_renewed(make_env: MakeEnv) -> None:
    env = await make_env(sims=1)
    await env.start()
    await env.poll()
    forbidden = b'{"code": 20403, "message": "Forbidden", "status": 403}'
    env.sim.faults.script("data_sessions", [FaultResponse(status=403, body=forbidden)])
    await env.poll()
    assert env.up() == [False]
    assert env.sim.stats.token_requests == 1


def _jwt(exp: float) -> str:
    import base64

    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part({'exp': exp})}.c2lnbmF0dXJl"


async def test_a_jwt_is_renewed_before_its_exp_even_if_expires_in_says_later(
    make_env: MakeEnv,
) -> None:
    """KORE's tokens are JWTs: their ``exp`` claim, not only ``expires_in``, bounds their life."""
    env = await make_env(sims=1, lifetime=100.0, style="kore")

    def answer() -> bytes:  # a real simulator token (a JWT, exp 100 s on) claimed to last a day
        token = env.sim.issue_token()
        env.issued.append((env.clock.monotonic(), token))
        return json.dumps({"access_token": token, "expires_in": "86400"}).encode()

    async with token_endpoint([answer]) as endpoint:
        await env.start(
            mapping=oauth_mapping(env.sim, env.sids, token_url=endpoint.url, margin="10s")
        )
        await env.poll()
        auth = env.exp.client._transport._auth
        assert isinstance(auth, OAuth2Authenticator)
        assert auth.status() == TokenStatus(START + 100, 100)
        await env.clock.advance(89)
        await env.poll()
        assert len(endpoint.requests) == 1
        await env.clock.advance(2)  # past exp - refresh_margin
        await env.poll()
        assert len(endpoint.requests) == 2
        assert env.up() == [True]
        assert env.api(403) == 0  # renewed in time: never refused


@pytest.mark.parametrize(
    ("token", "exp"),
    [
        (_jwt(START + 5), START + 5),
        (_jwt(1e400), None),  # json gives inf
        ("a.b.c", None),
        ("opaque-token", None),
        (_jwt(True), None),
        ("x." + "e30" + ".y", None),  # {} has no exp
    ],
)
def test_jwt_expiry(token: str, exp: float | None) -> None:
    from twilio_wireless_exporter.api.auth import jwt_expiry

    assert jwt_expiry(token) == exp


async def test_a_jwt_exp_in_the_past_of_our_clock_falls_back_to_expires_in(
    make_env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env(sims=1)
    body = json.dumps({"access_token": _jwt(START - 600), "expires_in": "3600"}).encode()
    async with token_endpoint([body]) as endpoint:
        await env.start(mapping=oauth_mapping(env.sim, env.sids, token_url=endpoint.url))
        auth = env.exp.client._transport._auth
        assert isinstance(auth, OAuth2Authenticator)
        with caplog.at_level(logging.WARNING, logger="twilio_wireless_exporter.api.auth"):
            await auth.authorization()
        assert auth.status() == TokenStatus(START + 3600, 3600)
        assert "JWT exp lies 600s in the past" in caplog.text


async def test_sims_come_back_within_the_backoff_after_the_token_endpoint_returns(
    make_env: MakeEnv,
) -> None:
    """Before: after 20 s without a token endpoint the SIMs came back 27 s after it returned
    (cool-downs of 15 s, then 30 s, doubling to 5 min). Now the cool-down follows the poll
    backoff (here 1 s doubling to 8 s), so they are back at most backoff_max after it."""
    env = await make_env(sims=2)
    await env.start(max_retries=0)
    env.sim.faults.script("token", [FaultResponse(status=503)] * 1000)
    back_at: float | None = None
    for second in range(60):
        if second == 20:
            env.sim.faults.clear_script()  # the endpoint is back
        await env.poll()
        if second >= 20 and env.up() == [True, True]:
            back_at = float(second)
            break
        await env.clock.advance(1)
    assert back_at is not None
    assert back_at - 20 <= 8  # poll.backoff_max
