"""TLS and basic auth on real sockets; no secret in anything the exporter emits; secret file modes."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.harness_support import MakeHarness, eventually
from tests.metrics_support import iter_samples
from tests.process_support import PipeLog
from tests.tls_support import hashed, make_cert, serve_https
from twilio_wireless_exporter.cli import JsonFormatter, main
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import (
    WebConfig,
    load_config,
    web_config_from_mapping,
)
from twilio_wireless_exporter.service import Exporter
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_exporter.web.security import WWW_AUTHENTICATE, middlewares
from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_CLIENT_ID,
    TOKEN_PATH,
    Operator,
    RunningSimulator,
    SimulatorConfig,
    start_simulator,
)

WEB_USER = "prometheus"
WEB_PASSWORD = "web-pass-3e8c1d"

# Distinctive values that must never show up in anything the exporter emits.
AUTH_TOKEN = "tok-5ecret-9f3a71"
WRONG_AUTH_TOKEN = "tok-wrong-41c2b8"
API_KEY = "SK" + "5" * 32
API_SECRET = "api-5ecret-b8d41e"
WRONG_API_SECRET = "api-wrong-0c7d2a"
CLIENT_SECRET = "cli-5ecret-4e9b07"
WRONG_CLIENT_SECRET = "cli-wrong-6a1f3e"
WRONG_WEB_PASSWORD = "web-wrong-77d0aa"


def forms(secret: str, user: str | None = None) -> list[str]:
    """The secret as it could leak: verbatim, URL-encoded, and inside a basic-auth header."""
    out = [secret, quote(secret, safe=""), urlencode({"client_secret": secret})]
    if user is not None:
        out.append(base64.b64encode(f"{user}:{secret}".encode()).decode())
    return out


SECRETS: list[str] = [
    *forms(AUTH_TOKEN, DEMO_ACCOUNT_SID),
    *forms(WRONG_AUTH_TOKEN, DEMO_ACCOUNT_SID),
    *forms(API_SECRET, API_KEY),
    *forms(WRONG_API_SECRET, API_KEY),
    *forms(CLIENT_SECRET, DEMO_CLIENT_ID),
    *forms(WRONG_CLIENT_SECRET, DEMO_CLIENT_ID),
    *forms(WEB_PASSWORD, WEB_USER),
    *forms(WRONG_WEB_PASSWORD, WEB_USER),
]


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [secret for secret in secrets if secret in text]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def secured_config(cert_dir: Path, **tls: str) -> WebConfig:
    return web_config_from_mapping(
        {
            "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", **tls},
            "basic_auth_users": {WEB_USER: hashed(WEB_PASSWORD)},
            "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
        },
        base_dir=cert_dir,
    )


def client_context(cert_dir: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert_dir / "server.crt")


# ------------------------------------------------------------------------------- TLS + basic auth


async def test_https_with_basic_auth_on_every_endpoint(
    cert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        serve_https(secured_config(cert_dir)) as port,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(cert_dir))) as http,
    ):
        base = f"https://localhost:{port}"
        right = {"Authorization": basic(WEB_USER, WEB_PASSWORD)}
        # first: after three wrong passwords in a row this address backs off, and only
        # credentials already known good get in during the backoff (test_hostile_clients.py)
        async with http.get(base + "/-/healthy", headers=right) as resp:
            assert resp.status == 200
        denied = [
            {},
            {"Authorization": basic(WEB_USER, WRONG_WEB_PASSWORD)},
            {"Authorization": basic("mallory", WEB_PASSWORD)},
            {"Authorization": basic(WEB_USER, "")},
            {"Authorization": "Bearer " + WEB_PASSWORD},
        ]
        for path in ("/metrics", "/", "/-/healthy", "/-/ready", "/no-such-page"):
            for headers in denied:
                async with http.get(base + path, headers=headers) as resp:
                    assert resp.status == 401, (path, headers)
                    assert resp.headers["WWW-Authenticate"] == WWW_AUTHENTICATE
                    assert resp.headers["X-Content-Type-Options"] == "nosniff"
                    assert await resp.text() == "Unauthorized\n"
        assert WWW_AUTHENTICATE == 'Basic realm="twilio-wireless-exporter"'

        async with http.get(base + "/metrics", headers=right) as resp:
            assert resp.status == 200
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert "\ntwilio_wireless_sims_monitored 0.0\n" in await resp.text()
        for path, status in (("/", 200), ("/-/healthy", 200), ("/-/ready", 503), ("/nope", 404)):
            async with http.get(base + path, headers=right) as resp:
                assert resp.status == status, path
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert leaks(caplog.text, SECRETS) == []


async def test_plain_http_to_the_tls_port_gets_no_http_answer(cert_dir: Path) -> None:
    async with serve_https(secured_config(cert_dir)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        # the TLS layer rejects the bytes: the connection closes (at most after a TLS alert)
        assert not answer.startswith(b"HTTP/")
        assert answer[:1] in (b"", b"\x15")  # 0x15: TLS alert record
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"http://127.0.0.1:{port}/metrics")


async def test_the_certificate_must_be_trusted(cert_dir: Path) -> None:
    async with serve_https(secured_config(cert_dir)) as port, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(f"https://localhost:{port}/metrics")


async def test_min_version_is_enforced(cert_dir: Path) -> None:
    async with serve_https(secured_config(cert_dir, min_version="TLS13")) as port:
        old = client_context(cert_dir)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=old)) as http:
            with pytest.raises(aiohttp.ClientConnectorError):
                await http.get(f"https://localhost:{port}/metrics")
        current = client_context(cert_dir)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=current)) as http,
            http.get(f"https://localhost:{port}/metrics") as resp,
        ):
            assert resp.status == 401  # the handshake worked; now credentials are needed


def fetch(url: str, context: ssl.SSLContext, auth: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.e2e
def test_the_cli_serves_https_with_basic_auth(cert_dir: Path, tmp_path: Path) -> None:
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        f"tls_server_config:\n  cert_file: {cert_dir}/server.crt\n  key_file: {cert_dir}/server.key\n"
        f"basic_auth_users:\n  {WEB_USER}: '{hashed(WEB_PASSWORD)}'\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twilio_wireless_exporter",
            "--demo",
            "--demo.sims",
            "3",
            "--web.listen-address",
            "127.0.0.1:0",
            "--web.config.file",
            str(web_config),
            "--log.format",
            "json",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        log = PipeLog(proc)
        url = log.wait_for_url()
        assert url.startswith("https://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        context = client_context(cert_dir)
        base = f"https://localhost:{port}"
        assert fetch(base + "/metrics", context) == 401
        assert fetch(base + "/metrics", context, basic(WEB_USER, WRONG_WEB_PASSWORD)) == 401
        assert fetch(base + "/metrics", context, basic(WEB_USER, WEB_PASSWORD)) == 200
        assert fetch(base + "/-/healthy", context, basic(WEB_USER, WEB_PASSWORD)) == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert leaks("\n".join([*log.lines, err.decode()]), SECRETS) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ------------------------------------------------------------------------------- secrets


def run_cli(args: list[str]) -> int:
    """cli.main() with the root log handlers (pytest's capture among them) kept."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return main(args)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def config_yaml(base_url: str, sids: list[str], twilio: str) -> str:
    sims = "".join(f"  - {sid}\n" for sid in sids)
    return (
        f"twilio:\n  base_url: {base_url}\n  timeout: 2s\n{twilio}"
        "poll: {max_retries: 1, backoff_initial: 1s, backoff_max: 1s}\n"
        f"sims:\n{sims}"
    )


def credential_variants(sim_url: str) -> dict[str, str]:
    """Config ``twilio:`` bodies: each auth method with the right and a wrong secret."""
    token_url = sim_url + TOKEN_PATH
    oauth = (
        "  auth:\n    type: oauth2_client_credentials\n"
        f"    token_url: {token_url}\n    client_id: {DEMO_CLIENT_ID}\n"
    )
    return {
        "token": f"  account_sid: {DEMO_ACCOUNT_SID}\n  auth_token: {AUTH_TOKEN}\n",
        "wrong-token": f"  account_sid: {DEMO_ACCOUNT_SID}\n  auth_token: {WRONG_AUTH_TOKEN}\n",
        "api-key": f"  api_key: {API_KEY}\n  api_secret: {API_SECRET}\n",
        "wrong-api-key": f"  api_key: {API_KEY}\n  api_secret: {WRONG_API_SECRET}\n",
        "oauth2": oauth + f"    client_secret: {CLIENT_SECRET}\n",
        "wrong-oauth2": oauth + f"    client_secret: {WRONG_CLIENT_SECRET}\n",
    }


async def no_sleep(_: float) -> None:
    return None


async def run_once(
    config_path: Path, web_config: WebConfig, outputs: list[str], *, expect_up: bool
) -> None:
    """Start an exporter, let it poll every SIM once, scrape every page, stop it."""
    config = load_config(config_path)
    outputs += [repr(config), str(config), config.model_dump_json(), repr(config.twilio)]
    exporter = Exporter(config, clock=ManualClock(), retry_sleep=no_sleep)
    await exporter.start()
    await eventually(exporter.is_ready, within=10)
    app = make_app(exporter.web_context(), middlewares=middlewares(web_config))
    async with TestClient(TestServer(app)) as http:
        right = {"Authorization": basic(WEB_USER, WEB_PASSWORD)}
        wrong = {"Authorization": basic(WEB_USER, WRONG_WEB_PASSWORD)}
        for path in ("/metrics", "/", "/-/ready", "/-/healthy", "/missing"):
            for headers in (right, wrong):
                resp = await http.get(path, headers=headers)
                outputs.append(str(resp.headers) + await resp.text())
        resp = await http.get(
            "/metrics", headers={**right, "Accept": "application/openmetrics-text"}
        )
        outputs.append(await resp.text())
        metrics = await (await http.get("/metrics", headers=right)).text()
    await exporter.stop()
    up = [
        sample.value for sample in iter_samples(metrics) if sample.name == "twilio_wireless_sim_up"
    ]
    assert up == ([1.0, 1.0] if expect_up else [0.0, 0.0])


async def test_no_secret_in_logs_errors_pages_or_repr(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="aiohttp.access")
    web_config = web_config_from_mapping({"basic_auth_users": {WEB_USER: hashed(WEB_PASSWORD)}})
    outputs: list[str] = []
    issued: list[str] = []
    basic_sim = SimulatorConfig(sims=0, auth_token=AUTH_TOKEN, api_keys={API_KEY: API_SECRET})
    bearer_sim = SimulatorConfig(sims=0, auth_mode="bearer", client_secret=CLIENT_SECRET)
    for sim_config, methods in ((basic_sim, ("token", "api-key")), (bearer_sim, ("oauth2",))):
        sim: RunningSimulator
        async with start_simulator(sim_config, host="127.0.0.1", port=0) as sim:
            sids = [sim.fleet.add_sim(unique_name=f"sim-{i}") for i in range(2)]
            for sid in sids:
                sim.fleet.open_session(sid)
            variants = credential_variants(sim.url)
            for method in methods:
                for name in (method, f"wrong-{method}"):
                    path = tmp_path / f"{name}.yml"
                    path.write_text(config_yaml(sim.url, sids, variants[name]))
                    await run_once(path, web_config, outputs, expect_up=name == method)
                    # the CLI's view of the same file, at debug level
                    assert (
                        run_cli(["--config", str(path), "--check-config", "--log.level", "debug"])
                        == 0
                    )
                    captured = capsys.readouterr()
                    outputs += [captured.out, captured.err]
                    # an invalid variant of it: the error output
                    bad = tmp_path / f"{name}-bad.yml"
                    bad.write_text(path.read_text() + "discovery: {status: [lost]}\n")
                    assert run_cli(["--config", str(bad), "--check-config"]) == 2
                    captured = capsys.readouterr()
                    assert "discovery.status[0]: must be one of" in captured.err
                    outputs += [captured.out, captured.err]
            issued += list(sim.state.tokens)

    assert len(issued) == 1  # the bearer token the exporter obtained with the right secret
    log_text = caplog.text + "\n".join(JsonFormatter().format(r) for r in caplog.records)
    # the provoked failures are in the logs (so the test looks where the secrets could be)
    assert "rejected our credentials (HTTP 401" in log_text
    assert "unauthorised request for /metrics" in log_text
    everything = log_text + "\n".join(outputs)
    assert leaks(everything, SECRETS + issued) == []


# ------------------------------------------------------------------------------- secret files


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_secret_file_readable_by_others_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, warned: bool
) -> None:
    secret = tmp_path / "token"
    secret.write_text(AUTH_TOKEN + "\n")
    secret.chmod(mode)
    path = tmp_path / "config.yml"
    path.write_text(
        f"twilio:\n  account_sid: {DEMO_ACCOUNT_SID}\n  auth_token_file: {secret}\n"
        f"sims: [DE{'2' * 32}]\n"
    )
    assert main(["--config", str(path), "--check-config"]) == 0
    captured = capsys.readouterr()
    warning = (
        f"WARNING twilio_wireless_exporter: twilio.auth_token_file: {secret} is readable by other"
        f" users (mode {mode:04o}); chmod 600 it"
    )
    assert (warning in captured.err) is warned
    if not warned:
        assert captured.err == ""
    assert leaks(captured.out + captured.err, SECRETS) == []


def test_tls_key_readable_by_others_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = make_cert(tmp_path)
    key.chmod(0o644)
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config: {{cert_file: {cert}, key_file: {key}}}\n")
    config = tmp_path / "config.yml"
    config.write_text(
        f"twilio: {{account_sid: {DEMO_ACCOUNT_SID}, auth_token: {AUTH_TOKEN}}}\n"
        f"sims: [DE{'2' * 32}]\n"
    )
    assert main(["--config", str(config), "--web.config.file", str(web), "--check-config"]) == 0
    err = capsys.readouterr().err
    assert (
        f"WARNING twilio_wireless_exporter: {web}: tls_server_config.key_file: {key} is readable"
        " by other users (mode 0644); chmod 600 it"
    ) in err


# ------------------------------------------------------------------------------- label injection

HOSTILE = {
    "unique_name": 'u"1\n# HELP twilio_wireless_sim_up fake',
    "friendly_name": 'x\\"} 1\nfake_metric{a="b"} 1',
    "radio_link": 'LTE"} 7\n',
    "operator_mnc": '01"',
    "operator_country": "DE\r\n",
    "operator_name": 'Telekom "📶" \\ } 99\nfake 1',
}


async def test_hostile_api_strings_cannot_break_the_exposition(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    """Label values from the API travel through decode, state and exposition unchanged."""
    sid = sim.fleet.add_sim(
        unique_name=HOSTILE["unique_name"], friendly_name=HOSTILE["friendly_name"]
    )
    operator = Operator(
        "262", HOSTILE["operator_mnc"], HOSTILE["operator_country"], HOSTILE["operator_name"]
    )
    h = await harness([sid])
    assert await h.exporter.poller.refresh_sims()
    await h.poll()  # baseline
    session = sim.fleet.open_session(sid, radio_link=HOSTILE["radio_link"], operator=operator)
    sim.clock.advance(120)
    sim.fleet.close_session(session)
    await h.poll()

    text = await h.scrape()
    resp = await h.http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    openmetrics = await resp.text()
    for families in (
        list(text_string_to_metric_families(text)),
        list(openmetrics_families(openmetrics)),  # type: ignore[no-untyped-call]
    ):
        by_name = {family.name: family for family in families}
        assert not [name for name in by_name if not name.startswith("twilio_wireless_")]
        (info,) = by_name["twilio_wireless_sim_info"].samples
        assert info.labels["unique_name"] == HOSTILE["unique_name"]
        assert info.labels["friendly_name"] == HOSTILE["friendly_name"]
        (latest,) = by_name["twilio_wireless_sim_session_info"].samples
        for label in ("radio_link", "operator_mnc", "operator_country", "operator_name"):
            assert latest.labels[label] == HOSTILE[label]
        (up,) = by_name["twilio_wireless_sim_up"].samples
        assert up.value == 1
        durations = by_name["twilio_wireless_data_session_duration_seconds"].samples
        assert {s.labels["radio_link"] for s in durations} == {HOSTILE["radio_link"]}
    # one sample per line: no raw line feed reached the exposition (a raw CR inside a quoted
    # label value is legal: the formats only escape backslash, double quote and line feed)
    for body in (text, openmetrics):
        assert all(line.startswith(("#", "twilio_wireless_")) for line in body.strip().split("\n"))
