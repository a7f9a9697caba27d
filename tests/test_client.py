"""The API client's edges: timeouts, connection errors, hostile paging, error bodies."""

from __future__ import annotations

import base64

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness_support import MakeHarness
from tests.metrics_support import find_value as metric
from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.api.transport import (
    USER_AGENT,
    ApiError,
    ErrorKind,
    describe_error_body,
    parse_retry_after,
)
from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    FaultResponse,
    RunningSimulator,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("7", 7.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        ("100000", 600.0),  # capped: a broken upstream can't park a SIM for days
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = 1445412480.0  # 2015-10-21T07:28:00Z
    assert parse_retry_after(header, now=now) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"code": 20404, "message": "not found", "more_info": "x", "status": 404}',
            (20404, "not found"),
        ),
        (
            b'{"error": "invalid_token", "error_description": "token expired"}',
            (None, "token expired"),
        ),
        (b'{"error": "unauthorized_client"}', (None, "unauthorized_client")),
        (
            b"<html><body>Bad   Gateway</body></html>",
            (None, "<html><body>Bad Gateway</body></html>"),
        ),
        (b"", (None, "(empty body)")),
        (b"\xff\xfe garbage", (None, "\ufffd\ufffd garbage")),
    ],
)
def test_error_bodies_of_any_shape(body: bytes, expected: tuple[int | None, str]) -> None:
    assert describe_error_body(body) == expected


def test_api_error_text_and_retry_reason() -> None:
    err = ApiError(
        ErrorKind.HTTP, "Too Many Requests", endpoint="data_sessions", status=429, code=20429
    )
    assert str(err) == "data_sessions: Too Many Requests status=429 twilio_code=20429"
    assert err.retry_reason == "429"
    assert ApiError(ErrorKind.HTTP, "x", endpoint="e", status=503).retry_reason == "5xx"
    assert ApiError(ErrorKind.HTTP, "x", endpoint="e", status=404).retry_reason is None
    assert ApiError(ErrorKind.TIMEOUT, "x", endpoint="e").retry_reason == "timeout"
    assert ApiError(ErrorKind.DECODE, "x", endpoint="e", status=200).retry_reason == "decode"
    assert ApiError(ErrorKind.BAD_NEXT_PAGE, "x", endpoint="e").retry_reason is None


async def test_timeouts_are_retried_and_reported(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    sid = sim.fleet.add_sim()
    h = await harness([sid], twilio={"timeout": "200ms"}, poll={"max_retries": 1})
    sim.faults.script("data_sessions", [FaultResponse(delay=5), FaultResponse(delay=5)])
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 0
    assert (
        metric(text, "twilio_wireless_api_requests_total", endpoint="data_sessions", code="error")
        == 2
    )
    assert (
        metric(
            text, "twilio_wireless_api_retries_total", endpoint="data_sessions", reason="timeout"
        )
        == 1
    )
    assert metric(text, "twilio_wireless_poll_errors_total", kind="timeout") == 1


async def test_connection_errors_are_retried_and_reported(
    harness: MakeHarness, refused_port: int
) -> None:
    port = refused_port
    sid = "DE" + "2" * 32
    h = await harness(
        [sid], twilio={"base_url": f"http://127.0.0.1:{port}"}, poll={"max_retries": 2}
    )
    await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 0
    assert (
        metric(
            text, "twilio_wireless_api_retries_total", endpoint="data_sessions", reason="connection"
        )
        == 2
    )
    assert metric(text, "twilio_wireless_poll_errors_total", kind="connection") == 1
    assert len(h.sleeps) == 2


async def test_next_page_on_another_host_is_refused(harness: MakeHarness) -> None:
    """A next_page_url pointing elsewhere would leak our credentials: refuse to follow it."""
    hits: list[str] = []

    async def hostile(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        page = {
            "data_sessions": [],
            "meta": {"next_page_url": "https://attacker.invalid/v1/Sims/x/DataSessions?Page=1"},
        }
        return web.json_response(page)

    app = web.Application()
    app.router.add_get("/v1/Sims/{sid}/DataSessions", hostile)
    async with TestServer(app, host="127.0.0.1") as server:
        sid = "DE" + "3" * 32
        h = await harness([sid], twilio={"base_url": str(server.make_url("")).rstrip("/")})
        await h.poll()
    text = await h.scrape()
    assert metric(text, "twilio_wireless_sim_up", sid) == 0
    assert metric(text, "twilio_wireless_poll_errors_total", kind="bad_next_page") == 1
    assert hits == [f"/v1/Sims/{sid}/DataSessions?PageSize=100"]


async def test_requests_carry_user_agent_and_basic_auth(harness: MakeHarness) -> None:
    seen: list[tuple[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.headers["User-Agent"], request.headers["Authorization"]))
        return web.json_response({"data_sessions": [], "meta": {"next_page_url": None}})

    app = web.Application()
    app.router.add_get("/v1/Sims/{sid}/DataSessions", record)
    async with TestServer(app, host="127.0.0.1") as server:
        sid = "DE" + "4" * 32
        h = await harness([sid], twilio={"base_url": str(server.make_url("")).rstrip("/")})
        await h.poll()
    expected_auth = (
        "Basic " + base64.b64encode(f"{DEMO_ACCOUNT_SID}:{DEMO_AUTH_TOKEN}".encode()).decode()
    )
    assert seen == [(USER_AGENT, expected_auth)]
    assert USER_AGENT.startswith(f"twilio-wireless-exporter/{__version__} ")
