"""TLS and basic-auth material for the web-layer tests: bcrypt hashes, self-signed
certificates, and the exporter's web app served on a real port behind a web config."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web

from twilio_wireless_exporter.config import WebConfig, config_from_mapping, web_config_from_mapping
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_exporter.web.security import middlewares
from twilio_wireless_simulator import DEMO_ACCOUNT_SID

# The web config's TLS section for the certificate ``make_cert`` writes as ``server``.
TLS = {"cert_file": "server.crt", "key_file": "server.key"}


def hashed(password: str) -> str:
    """A bcrypt hash at the lowest cost (fast tests; the cost does not change the logic)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (mode 0600)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    return cert, key


def offline_exporter() -> Exporter:
    """An exporter that is never opened: its web app renders an empty fleet."""
    config = config_from_mapping(
        {
            "twilio": {"account_sid": DEMO_ACCOUNT_SID, "auth_token": "unused-token"},
            "sims": [{"sid": "DE" + "1" * 32}],
        },
        environ={},
    )
    return Exporter(config)


@contextlib.asynccontextmanager
async def serve_https(web_config: WebConfig) -> AsyncIterator[int]:
    """The exporter's web app with the web config's middlewares on a real port (TLS when the web
    config has it)."""
    app = make_app(offline_exporter().web_context(), middlewares=middlewares(web_config))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=web_config.ssl_context)
        await site.start()
        port: int = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve_web_config(web_config: dict[str, Any], cert_dir: Path) -> AsyncIterator[int]:
    """The exporter's web app behind ``web_config`` (as ``--web.config.file`` would hold it,
    paths relative to ``cert_dir``) on a real port."""
    async with serve_https(web_config_from_mapping(web_config, base_dir=cert_dir)) as port:
        yield port
