"""Abusive HTTP clients: slow request heads, connection floods, malformed requests, floods of
wrong passwords. Each must cost the exporter a bounded amount, be counted, and leave the
endpoints answering everyone else.

Real sockets on port 0 throughout; the open-files case runs the real command in a child process
with a lowered ``RLIMIT_NOFILE``. No test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from tests.harness_support import eventually
from tests.process_support import PipeLog
from tests.tls_support import TLS
from twilio_wireless_exporter.cli import build_parser
from twilio_wireless_exporter.config import web_config_from_mapping
from twilio_wireless_exporter.web.connections import (
    ConnectionLimiter,
    ConnectionSettings,
    GuardedSite,
    accept_backlog,
    connection_limit,
)
from twilio_wireless_exporter.web.ratelog import RateLimitedLog
from twilio_wireless_exporter.web.security import (
    AuthLimits,
    BasicAuth,
    client_key,
    security_middleware,
)
from twilio_wireless_exporter.web.serverlog import quiet_bad_requests

PARTIAL_HEAD = b"GET /-/healthy HTTP/1.1\r\nHost: exporter\r\nX-Slow: "


class Recorded:
    """A ``Rejections`` that remembers every reason."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def reject(self, reason: str) -> None:
        self.reasons[reason] += 1


async def _healthy(_: web.Request) -> web.Response:
    return web.Response(text="Healthy\n")


@asynccontextmanager
async def guarded_server(
    settings: ConnectionSettings,
    rejections: Recorded,
    *,
    middlewares: tuple[object, ...] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[int, ConnectionLimiter]]:
    app = web.Application(middlewares=middlewares)  # type: ignore[arg-type]
    app.router.add_get("/-/healthy", _healthy)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=settings.idle_timeout)
    await runner.setup()
    limiter = ConnectionLimiter(settings, rejections)
    site = GuardedSite(runner, "127.0.0.1", 0, limiter, ssl_context=ssl_context)
    await site.start()
    try:
        yield site.port, limiter
    finally:
        await runner.cleanup()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server ends the connection (reading everything it still sends)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout=20):
            pass
    except ConnectionResetError:
        pass
    return True


async def get_healthy(port: int, **kwargs: object) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/-/healthy", **kwargs) as resp,  # type: ignore[arg-type]
    ):
        return resp.status, await resp.text()


# ------------------------------------------------------------------ slow heads and floods


async def test_a_request_head_that_never_ends_is_cut_after_the_header_timeout() -> None:
    rejections = Recorded()
    settings = ConnectionSettings(max_connections=10, header_timeout=0.2, idle_timeout=60)
    async with guarded_server(settings, rejections) as (port, limiter):
        slow_reader, slow = await asyncio.open_connection("127.0.0.1", port)
        slow.write(PARTIAL_HEAD)
        # a client that finished its head in time stays connected past the timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: exporter\r\n\r\n")
        assert b"200 OK" in await reader.readuntil(b"Healthy\n")
        assert await closed_by_server(slow_reader)
        assert rejections.reasons == {"header_timeout": 1}
        writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: exporter\r\n\r\n")
        assert b"200 OK" in await reader.readuntil(b"Healthy\n")
        assert limiter.open == 1
        writer.close()
        slow.close()


async def test_beyond_the_connection_limit_the_oldest_silent_connection_makes_room() -> None:
    rejections = Recorded()
    settings = ConnectionSettings(max_connections=5, header_timeout=600, idle_timeout=600)
    async with guarded_server(settings, rejections) as (port, limiter):
        held = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PARTIAL_HEAD)
            held.append((reader, writer))
        await eventually(lambda: rejections.reasons["connection_limit"] >= 15)
        assert limiter.open <= 5
        # the health check gets in although every slot was taken by clients sending nothing
        assert await get_healthy(port) == (200, "Healthy\n")
        # the oldest were cut, and the server still holds no more than its limit
        assert await closed_by_server(held[0][0])
        assert limiter.status() == (min(limiter.open, 5), 5)
        for _, writer in held:
            writer.close()


async def test_with_tls_the_handshake_and_then_the_head_are_timed(cert_dir: Path) -> None:
    rejections = Recorded()
    settings = ConnectionSettings(max_connections=10, header_timeout=0.3, idle_timeout=60)
    server_tls = web_config_from_mapping({"tls_server_config": TLS}, base_dir=cert_dir)
    client_tls = ssl.create_default_context(cafile=cert_dir / "server.crt")
    async with guarded_server(settings, rejections, ssl_context=server_tls.ssl_context) as (
        port,
        limiter,
    ):
        no_hello, silent = await asyncio.open_connection("127.0.0.1", port)  # no TLS at all
        slow_reader, slow = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_tls, server_hostname="localhost"
        )
        slow.write(PARTIAL_HEAD)
        connector = aiohttp.TCPConnector(ssl=client_tls)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(f"https://localhost:{port}/-/healthy") as resp,
        ):
            assert (resp.status, await resp.text()) == (200, "Healthy\n")
        assert await closed_by_server(no_hello)
        assert await closed_by_server(slow_reader)
        assert rejections.reasons == {"header_timeout": 1}  # the handshake's is asyncio's
        await eventually(lambda: limiter.open == 0)
        silent.close()
        slow.close()


async def test_with_tls_connections_still_in_their_handshake_count_and_make_room(
    cert_dir: Path,
) -> None:
    rejections = Recorded()
    settings = ConnectionSettings(max_connections=3, header_timeout=600, idle_timeout=600)
    server_tls = web_config_from_mapping({"tls_server_config": TLS}, base_dir=cert_dir)
    client_tls = ssl.create_default_context(cafile=cert_dir / "server.crt")
    async with guarded_server(settings, rejections, ssl_context=server_tls.ssl_context) as (
        port,
        limiter,
    ):
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        await eventually(lambda: rejections.reasons["connection_limit"] == 7)
        assert limiter.open == 3
        assert await closed_by_server(silent[0][0])
        connector = aiohttp.TCPConnector(ssl=client_tls)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(f"https://localhost:{port}/-/healthy") as resp,
        ):
            assert (resp.status, await resp.text()) == (200, "Healthy\n")
        for _, writer in silent:
            writer.close()


def test_the_connection_limit_stays_below_the_open_files_limit() -> None:
    assert connection_limit(0, 1024) == 512
    assert connection_limit(0, 256) == 128
    assert connection_limit(0, None) == 512
    assert connection_limit(5000, 1024) == 1024 - 64 - 16
    assert accept_backlog(512, 1024) == 112
    assert accept_backlog(128, 256) == 16  # what asyncio accepts at once fits beside them
    assert accept_backlog(944, 1024) == 4
    assert accept_backlog(512, None) == 128
    assert connection_limit(100, 1024) == 100
    assert connection_limit(0, 10) == 1  # absurdly low: one connection, never none
    assert connection_limit(50, 10) == 1


@contextmanager
def exporter_with_open_files(limit: int, *flags: str) -> Iterator[tuple[str, PipeLog]]:
    """The real command (demo fleet) on port 0 with ``RLIMIT_NOFILE`` lowered to ``limit``."""

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twilio_wireless_exporter",
            "--demo",
            "--demo.sims",
            "5",
            "--web.listen-address",
            "127.0.0.1:0",
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lower_limit,  # only setrlimit, before exec
    )
    try:
        log = PipeLog(proc)
        yield log.wait_for_url(), log
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=20) as resp:
        return resp.status, resp.read().decode()


def sample(body: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", body, re.MULTILINE)
    assert match, series
    return float(match[1])


@pytest.mark.e2e
def test_a_flood_of_silent_connections_beyond_the_open_files_limit() -> None:
    """Twice as many never-finished request heads as the process has file descriptors: the
    exporter keeps answering, counts what it cut, and logs it in a line or two."""
    with exporter_with_open_files(256) as (base, log):
        port = int(base.rsplit(":", 1)[1])
        for _ in range(3):  # malformed requests: 400, and nothing at the default log level
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n")
                assert b" 400 " in sock.recv(4096).split(b"\r\n", 1)[0]
        flood = []
        try:
            for _ in range(512):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(PARTIAL_HEAD)
                flood.append(sock)
            assert fetch(base + "/-/healthy") == (200, "Healthy\n")
            _, body = fetch(base + "/metrics")
        finally:
            for sock in flood:
                sock.close()
        limit = sample(body, "twilio_wireless_http_connections_max")
        assert limit == 128  # half the open-files limit
        assert sample(body, "twilio_wireless_http_connections") <= limit
        cut = sample(body, 'twilio_wireless_http_rejected_total{reason="connection_limit"}')
        assert cut >= 512 - limit
        assert sample(body, 'twilio_wireless_http_rejected_total{reason="bad_request"}') == 3
        log.wait_for(re.compile(r"connection limit of 128 reached"))
    text = "\n".join(log.lines)
    assert "Too many open files" not in text
    assert "Traceback" not in text
    assert "Error handling request" not in text
    assert len([line for line in log.lines if "connection limit" in line]) <= 2


# ------------------------------------------------------------------ malformed requests


async def test_a_malformed_request_is_one_debug_line_not_an_error_with_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rejections = Recorded()
    quiet_bad_requests(rejections)
    settings = ConnectionSettings(max_connections=10, header_timeout=60, idle_timeout=60)
    bad = b"GET /-/healthy HTTP/1.1\r\nHost: exporter\r\nno colon here\r\n\r\n"
    async with guarded_server(settings, rejections) as (port, _):
        for level in (logging.INFO, logging.DEBUG):
            caplog.clear()
            caplog.set_level(level)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(bad)
            assert b" 400 Bad Request" in await reader.readline()
            assert await closed_by_server(reader)
            writer.close()
            records = [r for r in caplog.records if r.name.startswith("aiohttp")]
            if level == logging.INFO:
                assert records == []
            else:
                assert len(records) == 1
                record = records[0]
                assert record.levelno == logging.DEBUG
                assert record.exc_info is None
                assert "\n" not in record.getMessage()
                assert record.getMessage().startswith("bad HTTP request from 127.0.0.1")
    assert rejections.reasons == {"bad_request": 2}


# ------------------------------------------------------------------ wrong passwords

PASSWORD = "right horse battery"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def alice_hash() -> bytes:
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4))


class GatedCheckpw:
    """``bcrypt.checkpw`` that waits for ``gate`` while it is closed, recording the order in
    which passwords were checked."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.started: list[bytes] = []
        self._checkpw = bcrypt.checkpw

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.started.append(password)
        if not self.gate.wait(timeout=30):
            raise AssertionError("gate never opened")
        return self._checkpw(password, hashed)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedCheckpw]:
    checker = GatedCheckpw()
    monkeypatch.setattr("twilio_wireless_exporter.web.security.bcrypt.checkpw", checker)
    yield checker
    checker.gate.set()


@asynccontextmanager
async def auth_server(
    auth: BasicAuth, rejections: Recorded
) -> AsyncIterator[Callable[[str, str], Awaitable[tuple[int, str | None]]]]:
    """A server behind basic auth; yields ``request(source address, authorization)``."""
    settings = ConnectionSettings(max_connections=100, header_timeout=60, idle_timeout=60)
    middleware = security_middleware(auth, {}, rejections)
    async with guarded_server(settings, rejections, middlewares=(middleware,)) as (port, _):

        async def request(source: str, authorization: str) -> tuple[int, str | None]:
            connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                http.get(
                    f"http://127.0.0.1:{port}/-/healthy",
                    headers={"Authorization": authorization},
                ) as resp,
            ):
                return resp.status, resp.headers.get("Retry-After")

        yield request


async def test_wrong_passwords_from_one_address_buy_three_checks_then_backoff(
    alice_hash: bytes, gated: GatedCheckpw
) -> None:
    rejections = Recorded()
    auth = BasicAuth({"alice": alice_hash})
    async with auth_server(auth, rejections) as request:
        answers = [await request("127.0.0.2", basic("alice", f"guess {n}")) for n in range(50)]
        assert answers[:3] == [(401, None)] * 3
        assert answers[3] == (429, "1")
        assert {status for status, _ in answers[3:]} == {429}
        assert auth.bcrypt_checks == 3
        # the right password from elsewhere is checked at once, and then cached
        assert await request("127.0.0.3", basic("alice", PASSWORD)) == (200, None)
        # from the backing-off address too, once the credentials are known good; that does not
        # lift the address's backoff for anyone else there
        assert await request("127.0.0.2", basic("alice", PASSWORD)) == (200, None)
        assert auth.bcrypt_checks == 4
        assert (await request("127.0.0.2", basic("alice", "guess 99")))[0] == 429
        # a wrong password already refused is refused again without a check
        assert await request("127.0.0.4", basic("alice", "guess 0")) == (401, None)
        assert auth.bcrypt_checks == 4
    assert rejections.reasons == {"unauthorized": 4, "auth_backoff": 48}


async def test_a_flood_of_wrong_passwords_cannot_lock_out_the_right_one(
    alice_hash: bytes, gated: GatedCheckpw
) -> None:
    """Many addresses that failed before fill the queue of bcrypt checks; a login not seen
    failing goes before them (the last of them is refused instead), and the pool never runs
    more checks than its workers."""
    rejections = Recorded()
    limits = AuthLimits(workers=1, max_pending=4, free_failures=10)
    auth = BasicAuth({"alice": alice_hash}, limits)
    async with auth_server(auth, rejections) as request:
        attackers = [f"127.0.1.{n}" for n in range(1, 11)]
        for source in attackers:  # each has failed once
            assert await request(source, basic("alice", f"first {source}")) == (401, None)
        gated.gate.clear()
        flood = [
            asyncio.ensure_future(request(source, basic("alice", f"again {source}")))
            for source in attackers
        ]
        # one check runs, four wait; the other five are refused at once
        await eventually(lambda: sum(task.done() for task in flood) == 5)
        assert {task.result() for task in flood if task.done()} == {(503, "1")}
        assert len(gated.started) == 11
        legit = asyncio.ensure_future(request("127.0.0.9", basic("alice", PASSWORD)))
        await eventually(lambda: sum(task.done() for task in flood) == 6)  # displaced
        gated.gate.set()
        assert await legit == (200, None)
        answers = [await task for task in flood]
        assert answers.count((401, None)) == 4
        assert answers.count((503, "1")) == 6
        # the right password was the first checked after the one already running
        assert gated.started[10].startswith(b"again ")
        assert gated.started[11] == PASSWORD.encode()
    assert rejections.reasons["auth_overloaded"] == 6


def test_failures_count_per_ipv4_address_and_per_ipv6_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert (
        client_key("2001:db8:1:2::7") == client_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    )
    assert client_key("2001:db8:1:3::7") != client_key("2001:db8:1:2::7")
    assert client_key(None) == "?"
    assert client_key("not an address") == "not an address"


def test_a_log_line_per_interval_with_the_count_of_those_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    throttled = RateLimitedLog(logging.getLogger("test.ratelog"), 60.0, lambda: now[0])
    caplog.set_level(logging.INFO, "test.ratelog")
    assert throttled.log("cut", logging.WARNING, "cut %s", "a")
    for n in range(500):
        assert not throttled.log("cut", logging.WARNING, "cut %s", n)
    assert throttled.log("other", logging.WARNING, "another kind")  # kinds are separate
    now[0] = 60.0
    assert throttled.log("cut", logging.WARNING, "cut %s", "b")
    assert [r.getMessage() for r in caplog.records] == [
        "cut a",
        "another kind",
        "cut b (500 more like it in the last 60s not logged)",
    ]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (0, 10.0, 300.0)),
        (
            [
                *("--web.max-connections", "64"),
                *("--web.read-header-timeout", "500ms"),
                *("--web.idle-timeout", "1m"),
            ],
            (64, 0.5, 60.0),
        ),
    ],
)
def test_the_connection_flags(flags: list[str], expected: tuple[int, float, float]) -> None:
    args = build_parser().parse_args(["--demo", *flags])
    assert (args.max_connections, args.header_timeout, args.idle_timeout) == expected


@pytest.mark.parametrize(
    "flags",
    [
        ["--web.max-connections", "-1"],
        ["--web.max-connections", "many"],
        ["--web.read-header-timeout", "0s"],
        ["--web.read-header-timeout", "soon"],
        ["--web.idle-timeout", "-5m"],
    ],
)
def test_bad_connection_flags_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--demo", *flags])
    assert exited.value.code == 2
    assert flags[0] in capsys.readouterr().err
