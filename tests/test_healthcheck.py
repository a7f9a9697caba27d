"""The container health check against real servers on port 0: plain, basic auth, TLS, mutual TLS,
and the ways a port can look alive without the exporter answering."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.test_security import serve_https
from tests.test_webconfig import hashed, make_cert
from twilio_wireless_exporter.config import web_config_from_mapping
from twilio_wireless_exporter.web.healthcheck import Result, check, main, parse_address

TLS = {"cert_file": "server.crt", "key_file": "server.key"}
# The server's own certificate doubles as the client CA: the check has no client certificate.
MUTUAL = {**TLS, "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "server.crt"}
AUTH = {"prometheus": hashed("web-pass")}


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("healthcheck-tls")
    make_cert(directory)
    return directory


@contextlib.asynccontextmanager
async def exporter(web_config: dict[str, Any], cert_dir: Path) -> AsyncIterator[int]:
    """The exporter's web app behind ``web_config`` (as ``--web.config.file``) on a real port."""
    async with serve_https(web_config_from_mapping(web_config, base_dir=cert_dir)) as port:
        yield port


async def run_check(port: int) -> Result:
    # The check blocks: it runs in a thread while this loop serves it.
    return await asyncio.to_thread(check, f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("web_config", "detail"),
    [
        ({}, "http://127.0.0.1:{port}/-/healthy: HTTP 200"),
        ({"basic_auth_users": AUTH}, "http://127.0.0.1:{port}/-/healthy: HTTP 401"),
        ({"tls_server_config": TLS}, "https://127.0.0.1:{port}/-/healthy: HTTP 200"),
        (
            {"tls_server_config": TLS, "basic_auth_users": AUTH},
            "https://127.0.0.1:{port}/-/healthy: HTTP 401",
        ),
    ],
    ids=["plain", "basic-auth", "tls", "tls-and-basic-auth"],
)
async def test_alive_whatever_the_web_config(
    cert_dir: Path, web_config: dict[str, Any], detail: str
) -> None:
    async with exporter(web_config, cert_dir) as port:
        assert await run_check(port) == Result(True, detail.format(port=port))


@pytest.mark.parametrize("max_version", ["TLS12", "TLS13"])
async def test_alive_with_mutual_tls_from_the_handshake(cert_dir: Path, max_version: str) -> None:
    web_config = {"tls_server_config": {**MUTUAL, "max_version": max_version}}
    async with exporter(web_config, cert_dir) as port:
        result = await run_check(port)
    assert result.alive, result
    assert result.detail.startswith(f"https://127.0.0.1:{port}/-/healthy: ")
    assert result.detail.endswith(", but the TLS handshake was answered (mutual TLS?)")


async def test_another_http_answer_is_unhealthy() -> None:
    """Something else on the port: 404 for /-/healthy is no proof of the exporter."""
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        result = await run_check(port)
    finally:
        await runner.cleanup()
    assert result == Result(False, f"http://127.0.0.1:{port}/-/healthy: HTTP 404")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_nothing_listening_is_unhealthy_without_trying_tls() -> None:
    port = closed_port()
    result = check(f"127.0.0.1:{port}")
    assert not result.alive
    assert result.detail.startswith(f"http://127.0.0.1:{port}/-/healthy: ConnectionRefusedError")
    assert "https" not in result.detail


@contextlib.contextmanager
def listening_only() -> Iterator[int]:
    """A socket that listens and never accepts: the kernel completes the TCP handshake, like for
    a process whose event loop is stuck."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_an_accepted_but_unanswered_connection_is_unhealthy() -> None:
    with listening_only() as port:
        result = check(f"127.0.0.1:{port}", timeout=0.2)
    assert result == Result(False, f"http://127.0.0.1:{port}/-/healthy: no answer within 0.2s")


async def test_a_port_that_hangs_up_at_once_is_unhealthy() -> None:
    """No HTTP and no TLS handshake either: closing every connection proves nothing."""

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await run_check(port)
    assert not result.alive
    assert result.detail.startswith(f"http://127.0.0.1:{port}/-/healthy: ")
    assert f"; https://127.0.0.1:{port}/-/healthy: " in result.detail
    assert "handshake was answered" not in result.detail


def test_main_exit_codes_and_output(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    assert main([f"127.0.0.1:{port}"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"unhealthy: http://127.0.0.1:{port}/-/healthy: ConnectionRefusedError")
    with pytest.raises(SystemExit) as exit_info:
        main(["no-port-here"])
    assert exit_info.value.code == 2
    assert "expected HOST:PORT, got 'no-port-here'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:10311", ("127.0.0.1", 10311)),
        (":10311", ("127.0.0.1", 10311)),
        ("0.0.0.0:9000", ("127.0.0.1", 9000)),
        ("[::]:9000", ("::1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("exporter.local:10311", ("exporter.local", 10311)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["10311", "host:", "host:port", "host:0", "host:65536"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_address(address)
