"""The web config file (exporter-toolkit format): validation, error paths, basic-auth checks."""

from __future__ import annotations

import base64
import os
import ssl
import threading
from pathlib import Path

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tls_support import hashed
from twilio_wireless_exporter.cli import main
from twilio_wireless_exporter.config import ConfigError, load_web_config, web_config_from_mapping
from twilio_wireless_exporter.web.security import BasicAuth, middlewares, parse_basic_authorization

CONFIG_YAML = f"""
twilio:
  base_url: http://127.0.0.1:9
  account_sid: AC{"a" * 32}
  auth_token: webconfig-test-token
sims: [DE{"1" * 32}]
"""


def write(directory: Path, text: str, name: str = "web.yml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def problems(data: object, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        web_config_from_mapping(data, "web.yml", base_dir=base_dir)
    return info.value.problems


# ------------------------------------------------------------------------------- valid files


def test_empty_file_means_plain_http_without_auth(tmp_path: Path) -> None:
    config = load_web_config(write(tmp_path, "# nothing configured\n"))
    assert config.ssl_context is None
    assert config.users == {}
    assert middlewares(config) == []
    assert config.summary() == "TLS off, no basic auth"


def test_full_file_relative_paths_and_defaults(cert_dir: Path) -> None:
    hash_a = hashed("pw-a")
    path = write(
        cert_dir,
        "tls_server_config:\n"
        "  cert_file: server.crt\n"
        "  key_file: server.key\n"
        "basic_auth_users:\n"
        f"  alice: {hash_a}\n"
        "http_server_config:\n"
        "  http2: true\n"
        "  headers:\n"
        "    X-Frame-Options: deny\n"
        "    Strict-Transport-Security: max-age=31536000\n",
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == cert_dir / "server.crt"
    assert config.tls.key_file == cert_dir / "server.key"
    assert config.tls.min_version == "TLS12"
    assert config.tls.client_auth_type == "NoClientCert"
    assert config.ssl_context is not None
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert config.ssl_context.verify_mode == ssl.CERT_NONE
    assert config.users == {"alice": hash_a.encode()}
    assert config.headers == {
        "X-Frame-Options": "deny",
        "Strict-Transport-Security": "max-age=31536000",
    }
    assert config.warnings == ()
    assert config.summary() == "TLS on (min TLS12), basic auth for 1 users"
    assert len(middlewares(config)) == 1
    assert hash_a not in repr(config)


def test_mutual_tls_and_versions(cert_dir: Path) -> None:
    config = web_config_from_mapping(
        {
            "tls_server_config": {
                "cert_file": "server.crt",
                "key_file": "server.key",
                "client_ca_file": "other.crt",
                "min_version": "TLS13",
                "max_version": "TLS13",
            }
        },
        base_dir=cert_dir,
    )
    assert config.tls is not None
    # like the toolkit: a client CA without client_auth_type means RequireAndVerifyClientCert
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert config.ssl_context is not None
    assert config.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert config.ssl_context.maximum_version == ssl.TLSVersion.TLSv1_3


def test_warnings_key_readable_by_others_and_auth_without_tls(cert_dir: Path) -> None:
    key = cert_dir / "other.key"
    key.chmod(0o644)
    try:
        config = web_config_from_mapping(
            {"tls_server_config": {"cert_file": "other.crt", "key_file": "other.key"}},
            base_dir=cert_dir,
        )
    finally:
        key.chmod(0o600)
    assert config.warnings == (
        f"tls_server_config.key_file: {key} is readable by other users (mode 0644); chmod 600 it",
    )
    plain = web_config_from_mapping({"basic_auth_users": {"bob": hashed("x")}})
    assert plain.warnings == (
        "basic_auth_users: without tls_server_config, passwords cross the network in clear text",
    )


# ------------------------------------------------------------------------------- invalid files


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "x": 1}},
            [
                "tls_server_config.x: unknown option (valid options: cert_file, key_file, "
                "client_auth_type, client_ca_file, min_version, max_version, "
                "prefer_server_cipher_suites)"
            ],
        ),
        (
            {"basic_auth_user": {}},
            ["basic_auth_user: unknown option (did you mean basic_auth_users?)"],
        ),
        (
            {"tls_server_config": {"cert_file": "server.crt"}},
            ["tls_server_config.key_file: is required with cert_file"],
        ),
        (
            {"tls_server_config": {"key_file": "server.key"}},
            ["tls_server_config.cert_file: is required with key_file"],
        ),
        (
            {"tls_server_config": {"cert_file": "missing.crt", "key_file": "server.key"}},
            ["tls_server_config.cert_file: {dir}/missing.crt does not exist or is not a file"],
        ),
        (
            {"tls_server_config": {"cert_file": "server.key", "key_file": "server.key"}},
            [
                "tls_server_config.cert_file: {dir}/server.key holds no PEM certificate: "
                "NO_CERTIFICATE_OR_CRL_FOUND"
            ],
        ),
        (
            {"tls_server_config": {"cert_file": "server.crt", "key_file": "other.key"}},
            [
                "tls_server_config.key_file: cannot use {dir}/other.key with cert_file: "
                "KEY_VALUES_MISMATCH (the key must be the certificate's, unencrypted, in PEM)"
            ],
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "min_version": "TLS1.2",
                }
            },
            [
                "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13, "
                "got 'TLS1.2'"
            ],
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "min_version": "TLS13",
                    "max_version": "TLS12",
                }
            },
            ["tls_server_config.max_version: must not be lower than min_version TLS13"],
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "cipher_suites": ["TLS_AES_128_GCM_SHA256"],
                }
            },
            [
                "tls_server_config.cipher_suites: is not supported (Go cipher suite names); the "
                "exporter uses Python's secure default ciphers, and TLS 1.3 suites are fixed "
                "anyway; remove it"
            ],
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_auth_type": "RequireAnyClientCert",
                }
            },
            [
                "tls_server_config.client_auth_type: RequireAnyClientCert (a client certificate "
                "that is not verified) is not supported; use VerifyClientCertIfGiven or "
                "RequireAndVerifyClientCert with client_ca_file"
            ],
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_auth_type": "VerifyClientCertIfGiven",
                }
            },
            [
                "tls_server_config.client_ca_file: is required with client_auth_type "
                "VerifyClientCertIfGiven"
            ],
        ),
        (
            {"basic_auth_users": {"alice": "plain-password-1"}},
            [
                "basic_auth_users.alice: must be a bcrypt hash of cost 04 to 16 like $2y$10$"
                " followed by 53 characters (htpasswd -nBC 10 USER); plain passwords are not"
                " accepted"
            ],
        ),
        (
            # cost 31: the start-up dummy hash and every login check would take days
            {"basic_auth_users": {"alice": "$2y$31$" + "a" * 53}},
            [
                "basic_auth_users.alice: must be a bcrypt hash of cost 04 to 16 like $2y$10$"
                " followed by 53 characters (htpasswd -nBC 10 USER); plain passwords are not"
                " accepted"
            ],
        ),
        (
            {"basic_auth_users": {"a:b": "$2y$04$" + "a" * 53}},
            ["basic_auth_users.a:b: user names must not contain ':' (HTTP basic auth)"],
        ),
        (
            {"basic_auth_users": ["alice"]},
            ["basic_auth_users: must be a mapping of names to values, got a list"],
        ),
        (
            {"http_server_config": {"headers": {"X-Powered-By": "me"}, "http2": "no"}},
            [
                "http_server_config.http2: must be true or false, got 'no'",
                "http_server_config.headers.X-Powered-By: must be one of "
                "Content-Security-Policy, X-Frame-Options, X-Content-Type-Options, "
                "X-XSS-Protection, Strict-Transport-Security, got 'X-Powered-By'",
            ],
        ),
        (
            {"http_server_config": {"headers": {"X-Content-Type-Options": "sniff"}}},
            [
                "http_server_config.headers.X-Content-Type-Options: must be one of nosniff, "
                "got 'sniff'"
            ],
        ),
    ],
)
def test_invalid_web_config(cert_dir: Path, data: object, expected: list[str]) -> None:
    assert problems(data, cert_dir) == [line.format(dir=cert_dir) for line in expected]


def test_a_plain_password_is_not_echoed(tmp_path: Path) -> None:
    lines = problems({"basic_auth_users": {"alice": "hunter2-secret"}}, tmp_path)
    assert "hunter2-secret" not in "\n".join(lines)
    # nor one that YAML reads as a number
    assert problems({"basic_auth_users": {"alice": 73914852}}, tmp_path) == [
        "basic_auth_users.alice: must be a string, got a number; put it in quotes"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n", "the top level must be a mapping of options"),
        ("a: [\n", "line 2, column 1: expected the node content, but found '<stream end>'"),
        (
            "basic_auth_users: {}\nbasic_auth_users: {}\n",
            "line 2, column 1: duplicate key 'basic_auth_users'",
        ),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}: ")
    assert expected in line


def test_cli_exit_2_with_the_path_of_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, CONFIG_YAML, "config.yml")
    web = write(tmp_path, "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n")
    for extra in (["--check-config"], ["--web.listen-address", "127.0.0.1:0"]):
        # with or without --check-config: exit 2, nothing started
        assert main(["--config", str(config), "--web.config.file", str(web), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"invalid web configuration {web}:\n")
        assert f"tls_server_config.cert_file: {tmp_path}/nope.crt does not exist" in err
        assert f"tls_server_config.key_file: {tmp_path}/nope.key does not exist" in err
    missing = tmp_path / "absent.yml"
    assert main(["--config", str(config), "--web.config.file", str(missing), "--check-config"]) == 2
    assert f"{missing}: cannot read web config file: No such file or directory" in (
        capsys.readouterr().err
    )


def test_cli_check_config_reports_a_valid_web_config(
    cert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(cert_dir, CONFIG_YAML, "config.yml")
    web = write(
        cert_dir,
        f"tls_server_config: {{cert_file: server.crt, key_file: server.key}}\n"
        f"basic_auth_users: {{alice: '{hashed('x')}'}}\n",
    )
    assert main(["--config", str(config), "--web.config.file", str(web), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        f"web configuration {web} is valid: TLS on (min TLS12), basic auth for 1 users"
    )


# ------------------------------------------------------------------------------- basic auth


def basic(user: str, password: str | bytes) -> str:
    raw = password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + raw).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"no-colon").decode(), None),
        ("basic " + base64.b64encode(b"u:p:q").decode(), ("u", b"p:q")),
        ("Basic " + base64.b64encode("jörg:".encode()).decode(), ("jörg", b"")),
        ("Basic " + base64.b64encode(b"\xff:x").decode(), None),
        # the password is bytes as sent: one that is not UTF-8 still reaches bcrypt unchanged
        ("Basic " + base64.b64encode(b"u:\xff\xfe").decode(), ("u", b"\xff\xfe")),
        ("Basic " + base64.b64encode("ö:ü".encode()).decode(), ("ö", "ü".encode())),
    ],
)
def test_parse_basic_authorization(header: str | None, expected: tuple[str, bytes] | None) -> None:
    assert parse_basic_authorization(header) == expected


class RecordingCheckpw:
    """Wraps bcrypt.checkpw to record which hashes were checked."""

    def __init__(self) -> None:
        self.hashes: list[bytes] = []
        self._checkpw = bcrypt.checkpw

    def __call__(self, password: bytes, hashed_password: bytes) -> bool:
        self.hashes.append(hashed_password)
        return self._checkpw(password, hashed_password)


@pytest.fixture
def checkpw(monkeypatch: pytest.MonkeyPatch) -> RecordingCheckpw:
    recorder = RecordingCheckpw()
    monkeypatch.setattr("twilio_wireless_exporter.web.security.bcrypt.checkpw", recorder)
    return recorder


async def test_right_wrong_and_unknown_credentials(checkpw: RecordingCheckpw) -> None:
    alice = hashed("correct horse")
    auth = BasicAuth({"alice": alice.encode()})
    assert await auth.check(basic("alice", "correct horse")) == "alice"
    assert await auth.check(basic("alice", "wrong")) is None
    assert await auth.check(basic("alice", "")) is None
    assert await auth.check(basic("mallory", "correct horse")) is None
    assert await auth.check(None) is None
    assert await auth.check("Basic garbage") is None
    # a header that does not parse costs nothing; every parsed attempt costs one bcrypt check
    assert len(checkpw.hashes) == 4
    assert checkpw.hashes[:3] == [alice.encode()] * 3
    # the unknown user was checked against a dummy hash of the same cost, not skipped
    dummy = checkpw.hashes[3]
    assert dummy != alice.encode()
    assert dummy[:7] == b"$2b$04$"
    assert "correct horse" not in repr(auth)


async def test_verified_credentials_are_cached(
    checkpw: RecordingCheckpw, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = BasicAuth({"alice": hashed("pw-1").encode(), "bob": hashed("pw-2").encode()})
    compared: list[tuple[bytes, bytes]] = []

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr("twilio_wireless_exporter.web.security.hmac.compare_digest", compare_digest)
    for _ in range(5):
        assert await auth.check(basic("alice", "pw-1")) == "alice"
    assert len(checkpw.hashes) == 1  # bcrypt once, then the cache
    assert len(compared) == 4  # each cached hit went through the constant-time comparison
    assert all(a == b for a, b in compared)
    assert all(b"pw-1" not in a for a, _ in compared)  # the cache holds MACs, not passwords

    # a wrong password neither matches the cache nor replaces it
    assert await auth.check(basic("alice", "pw-2")) is None
    assert await auth.check(basic("alice", "pw-1")) == "alice"
    assert len(checkpw.hashes) == 2
    # another user's password does not open alice's cache entry
    assert await auth.check(basic("bob", "pw-1")) is None
    assert await auth.check(basic("bob", "pw-2")) == "bob"
    assert await auth.check(basic("bob", "pw-2")) == "bob"
    assert len(checkpw.hashes) == 4
    assert auth.bcrypt_checks == 4


async def test_the_unknown_user_dummy_hash_is_made_on_first_use_not_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the dummy hash was made in the constructor, on the event loop, at the highest
    configured cost: cost 16 held start-up (and SIGTERM) for seconds, cost 31 for days."""
    made: list[bytes] = []
    real_hashpw = bcrypt.hashpw

    def hashpw(password: bytes, salt: bytes) -> bytes:
        made.append(salt)
        return real_hashpw(password, salt.replace(b"$16$", b"$04$", 1))  # keep the test fast

    monkeypatch.setattr("twilio_wireless_exporter.web.security.bcrypt.hashpw", hashpw)
    auth = BasicAuth({"alice": b"$2b$16$" + b"a" * 53})
    assert made == []
    assert await auth.check(basic("mallory", "pw")) is None
    assert await auth.check(basic("eve", "pw")) is None
    assert [salt[:7] for salt in made] == [b"$2b$16$"]  # once, at the configured cost


async def test_long_passwords_use_the_first_72_bytes_like_htpasswd() -> None:
    password = b"p" * 72
    auth = BasicAuth({"alice": bcrypt.hashpw(password, bcrypt.gensalt(4))})
    assert await auth.check(basic("alice", password)) == "alice"
    assert await auth.check(basic("alice", password + b"more")) == "alice"
    assert await auth.check(basic("alice", password[:71])) is None


async def test_hashes_in_2y_form_from_htpasswd() -> None:
    alice = hashed("pw").replace("$2b$", "$2y$", 1)
    config = web_config_from_mapping({"basic_auth_users": {"alice": alice}})
    auth = BasicAuth(config.users)
    assert await auth.check(basic("alice", "pw")) == "alice"


# ------------------------------------------------------------------------------- hostile values


@pytest.mark.parametrize(
    "value", ["a\rb", "a\nb", "a\x00b", "a\x7fb", "a\x1bb", "default-src\r", "a\x85b", "a\u2028b"]
)
def test_header_value_with_a_control_character(tmp_path: Path, value: str) -> None:
    data = {"http_server_config": {"headers": {"Content-Security-Policy": value}}}
    assert problems(data, tmp_path) == [
        "http_server_config.headers.Content-Security-Policy: must be one line of text without "
        f"control characters, got {value!r}"
    ]


def test_header_value_too_long(tmp_path: Path) -> None:
    data = {"http_server_config": {"headers": {"Content-Security-Policy": "x" * 5000}}}
    (line,) = problems(data, tmp_path)
    assert line.startswith(
        "http_server_config.headers.Content-Security-Policy: must be at most 4096 characters"
    )


def test_header_value_with_a_tab_is_fine(tmp_path: Path) -> None:
    config = web_config_from_mapping(
        {"http_server_config": {"headers": {"Content-Security-Policy": "default-src\t'self'"}}}
    )
    assert config.headers == {"Content-Security-Policy": "default-src\t'self'"}


@pytest.mark.parametrize("option", ["cert_file", "key_file", "client_ca_file"])
def test_tls_file_with_a_component_too_long(tmp_path: Path, option: str) -> None:
    long = "/tmp/" + "x" * 300
    data = {
        "tls_server_config": {
            "cert_file": "server.crt",
            "key_file": "server.key",
            option: long,
        }
    }
    lines = problems(data, tmp_path)
    assert f"tls_server_config.{option}: cannot use {long}: File name too long" in lines


def test_web_config_file_that_is_a_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "web.yml"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def load() -> None:
        try:
            load_web_config(fifo)
        except ConfigError as exc:
            outcome.append(exc.problems)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "blocked on the FIFO"
    assert outcome == [[f"{fifo}: cannot read web config file: not a regular file"]]


web_options = {
    "tls_server_config": (
        "cert_file",
        "key_file",
        "client_auth_type",
        "client_ca_file",
        "min_version",
        "max_version",
        "cipher_suites",
        "cert",
    ),
    "http_server_config": ("http2", "headers"),
    "basic_auth_users": ("alice", "a:b", ""),
}
odd_web_value = st.sampled_from(
    ["server.crt", "server.key", "/tmp/" + "x" * 300, "", "\x00", "TLS13", "deny", "a\rb", "\x7f"]
)
web_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | odd_web_value,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(["X-Frame-Options"]), inner)
    ),
    max_leaves=6,
)


@st.composite
def hostile_web_configs(draw: st.DrawFn) -> dict[str, object]:
    data: dict[str, object] = {}
    for section, names in web_options.items():
        if draw(st.booleans()):
            keys = st.sampled_from(names) | st.text(max_size=5)
            data[section] = draw(st.dictionaries(keys, web_value, max_size=4) | web_value)
    return data


@settings(max_examples=200, deadline=None)
@given(data=hostile_web_configs())
def test_a_hostile_web_config_is_valid_or_reported_at_its_sections(
    cert_dir: Path, data: dict[str, object]
) -> None:
    try:
        web_config_from_mapping(data, "web.yml", base_dir=cert_dir)
    except ConfigError as exc:
        for line in exc.problems:
            assert line.split(".", 1)[0].split(":", 1)[0] in (*web_options, "web.yml"), line
