"""Authentication of the simulator: Twilio Basic auth, API keys, and KORE-style OAuth2 bearer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.simulator_support import (
    OAUTH_ERROR_SCHEMA,
    TOKEN_SCHEMA,
    TWILIO_ERROR_SCHEMA,
    basic,
    bearer,
    get_json,
    running,
    validate,
)
from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    RunningSimulator,
    SimulatorConfig,
)

API_KEY = "SK" + "0123456789abcdef" * 2
API_SECRET = "key-secret"

Pair = tuple[RunningSimulator, aiohttp.ClientSession]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def basic_sim() -> AsyncIterator[Pair]:
    async with running(SimulatorConfig(sims=2, api_keys={API_KEY: API_SECRET})) as pair:
        yield pair


@pytest.fixture
def token_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def bearer_sim(token_clock: FakeClock) -> AsyncIterator[Pair]:
    config = SimulatorConfig(
        sims=2, auth_mode="bearer", token_lifetime=3.0, token_clock=token_clock
    )
    async with running(config) as pair:
        yield pair


async def _token(
    sim: RunningSimulator, http: aiohttp.ClientSession, **form: str
) -> tuple[int, Any]:
    data = {
        "grant_type": "client_credentials",
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
        **form,
    }
    async with http.post(sim.token_url, data=data) as resp:
        return resp.status, await resp.json()


def _assert_401_twilio(status: int, body: Any, resp: aiohttp.ClientResponse) -> None:
    assert status == 401
    assert body == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="Twilio API"'


# ------------------------------------------------------------------------------------------
# Basic
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(DEMO_ACCOUNT_SID, "wrong"),
        basic("AC" + "1" * 32, "demo-auth-token"),
        basic(API_KEY, "wrong"),
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Bearer something"},
    ],
    ids=["none", "wrong-token", "wrong-account", "wrong-key-secret", "garbage", "bearer"],
)
async def test_bad_basic_credentials_get_401_20003(
    basic_sim: Pair, headers: dict[str, str]
) -> None:
    sim, http = basic_sim
    sid = sim.fleet.sim_sids()[0]
    for url in (
        f"{sim.url}/v1/Sims",
        f"{sim.url}/v1/Sims/{sid}",
        f"{sim.url}/v1/Sims/{sid}/DataSessions",
    ):
        status, body, resp = await get_json(http, url, headers)
        _assert_401_twilio(status, body, resp)
        validate(TWILIO_ERROR_SCHEMA, body)
    assert sim.stats.count(status=401) == 3
    assert sim.stats.count(status=200) == 0


async def test_account_token_and_api_key_both_work(basic_sim: Pair) -> None:
    sim, http = basic_sim
    sid = sim.fleet.sim_sids()[0]
    for headers in (basic(), basic(API_KEY, API_SECRET)):
        status, body, _ = await get_json(http, f"{sim.url}/v1/Sims/{sid}/DataSessions", headers)
        assert status == 200, body


async def test_token_endpoint_does_not_exist_in_basic_mode(basic_sim: Pair) -> None:
    sim, http = basic_sim
    status, body = await _token(sim, http)
    assert status == 404
    validate(TWILIO_ERROR_SCHEMA, body)


async def test_health_needs_no_auth(basic_sim: Pair) -> None:
    sim, http = basic_sim
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"


# ------------------------------------------------------------------------------------------
# Bearer (KORE)
# ------------------------------------------------------------------------------------------


async def test_token_is_issued_and_used(bearer_sim: Pair) -> None:
    sim, http = bearer_sim
    status, body = await _token(sim, http)
    assert status == 200
    validate(TOKEN_SCHEMA, body)
    assert body["expires_in"] == "3"
    assert body["token_type"] == "Bearer"
    status2, body2 = await _token(sim, http)
    assert status2 == 200
    assert body2["access_token"] != body["access_token"]
    assert sim.stats.token_requests == 2
    sid = sim.fleet.sim_sids()[0]
    status, page, _ = await get_json(
        http, f"{sim.url}/v1/Sims/{sid}/DataSessions", bearer(body["access_token"])
    )
    assert status == 200, page
    assert page["meta"]["key"] == "data_sessions"


async def test_token_expires_on_the_token_clock(bearer_sim: Pair, token_clock: FakeClock) -> None:
    sim, http = bearer_sim
    _, body = await _token(sim, http)
    headers = bearer(body["access_token"])
    url = f"{sim.url}/v1/Sims"
    token_clock.t += 2.9
    status, _, _ = await get_json(http, url, headers)
    assert status == 200
    token_clock.t += 0.2
    status, err, resp = await get_json(http, url, headers)
    assert status == 401
    validate(OAUTH_ERROR_SCHEMA, err)
    assert err["error"] == "invalid_token"
    assert "code" not in err  # KORE bodies are not Twilio-shaped
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # A fresh token works again.
    _, body = await _token(sim, http)
    status, _, _ = await get_json(http, url, bearer(body["access_token"]))
    assert status == 200


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("not-a-token"), basic(), {"Authorization": "Bearer "}],
    ids=["none", "unknown", "basic", "empty"],
)
async def test_bearer_mode_rejects_missing_or_unknown_tokens(
    bearer_sim: Pair, headers: dict[str, str]
) -> None:
    sim, http = bearer_sim
    status, body, _ = await get_json(http, f"{sim.url}/v1/Sims", headers)
    assert status == 401
    validate(OAUTH_ERROR_SCHEMA, body)
    assert body["error"] == "invalid_token"


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "unauthorized_client"),
        ({"client_id": "someone-else"}, 401, "unauthorized_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": ""}, 400, "unsupported_grant_type"),
    ],
)
async def test_bad_token_requests(
    bearer_sim: Pair, form: dict[str, str], status: int, error: str
) -> None:
    sim, http = bearer_sim
    got_status, body = await _token(sim, http, **form)
    assert got_status == status
    validate(OAUTH_ERROR_SCHEMA, body)
    assert body["error"] == error
    assert sim.stats.token_requests == 1


async def test_token_request_needs_a_form(bearer_sim: Pair) -> None:
    sim, http = bearer_sim
    async with http.post(sim.token_url, json={"grant_type": "client_credentials"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    async with http.post(sim.token_url, data={"grant_type": "client_credentials"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"


async def test_tokens_can_be_expired_from_the_test(bearer_sim: Pair) -> None:
    sim, http = bearer_sim
    token = sim.issue_token()
    status, _, _ = await get_json(http, f"{sim.url}/v1/Sims", bearer(token))
    assert status == 200
    sim.expire_tokens()
    status, _, _ = await get_json(http, f"{sim.url}/v1/Sims", bearer(token))
    assert status == 401
