"""The web configuration file (``--web.config.file``): TLS and HTTP basic auth for our endpoints.

The format is the one of the Prometheus exporter-toolkit, so one file can serve several exporters::

    tls_server_config:
      cert_file: server.crt          # relative paths: relative to this file's directory
      key_file: server.key
      min_version: TLS12             # TLS10, TLS11, TLS12 (default), TLS13
      # max_version: TLS13
      # client_auth_type: RequireAndVerifyClientCert   # with client_ca_file (mutual TLS)
      # client_ca_file: clients-ca.crt
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hash: htpasswd -nBC 10 prometheus | cut -d: -f2
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}

What differs from the exporter-toolkit, on purpose:

* Options of the toolkit that Python's TLS stack cannot honour (``cipher_suites``,
  ``curve_preferences``, ``client_allowed_sans``, inline ``cert``/``key``, and the client auth types
  that ask for a certificate without verifying it) are rejected with a clear message rather than
  silently ignored: a security setting that does nothing is worse than a refusal.
* ``http_server_config.http2`` is accepted (a boolean) and has no effect: the server speaks
  HTTP/1.1 only, which every client negotiates.
* The file is read once at start (the toolkit re-reads it per request); restart to apply changes.

Every endpoint, ``/-/healthy`` and ``/-/ready`` included, requires the credentials, as with the
toolkit; probes then send an ``Authorization`` header (or use a TCP check).

Passwords are checked with ``bcrypt.checkpw`` in a worker thread (bcrypt is slow by design and must
not stall the event loop; at most two checks run at once, so a flood of wrong passwords cannot
take every worker thread). An unknown user name still costs one bcrypt check against a dummy hash,
so response times do not reveal which users exist. A successful check is remembered as an HMAC of
the password under a per-process random key and compared with :func:`hmac.compare_digest`, so that
the scrapes after the first one do not pay bcrypt's cost again (the toolkit caches the same way).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from twilio_wireless_exporter.config.models import ConfigError, _describe, read_yaml_file

__all__ = [
    "REALM",
    "BasicAuth",
    "TLSSettings",
    "WebConfig",
    "load_web_config",
    "web_config_from_mapping",
]

log = logging.getLogger(__name__)

REALM: Final = "twilio-wireless-exporter"
WWW_AUTHENTICATE: Final = f'Basic realm="{REALM}"'

_TOP_LEVEL: Final = ("tls_server_config", "basic_auth_users", "http_server_config")
_TLS_OPTIONS: Final = (
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
)
_TLS_UNSUPPORTED: Final = {
    "cert": "inline certificates are not supported; use cert_file",
    "key": "inline keys are not supported; use key_file",
    "cipher_suites": "is not supported (Go cipher suite names); the exporter uses Python's "
    "secure default ciphers, and TLS 1.3 suites are fixed anyway; remove it",
    "curve_preferences": "is not supported; the exporter uses Python's default curves; remove it",
    "client_allowed_sans": "is not supported; remove it",
}
_HTTP_OPTIONS: Final = ("headers", "http2")
_TLS_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH: Final = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_CLIENT_AUTH_UNSUPPORTED: Final = ("RequestClientCert", "RequireAnyClientCert")
#: The security headers the toolkit allows, and the values it accepts where it restricts them.
_HEADERS: Final[dict[str, tuple[str, ...] | None]] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-Content-Type-Options": ("nosniff",),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}
_BCRYPT_RE: Final = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_MAX_PASSWORD: Final = 72  # bcrypt uses the first 72 bytes (like htpasswd and Go)
_DEFAULT_COST: Final = 10
_MAX_CONCURRENT_CHECKS: Final = 2

Loc = tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class TLSSettings:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None
    prefer_server_cipher_suites: bool = True

    def ssl_context(self) -> ssl.SSLContext:
        """A server context. Raises ``OSError`` or ``ssl.SSLError`` for unusable files."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _TLS_VERSIONS[self.min_version]
        if self.max_version is not None:
            context.maximum_version = _TLS_VERSIONS[self.max_version]
        # An encrypted key gets an empty passphrase (and fails) instead of a prompt on the tty.
        context.load_cert_chain(self.cert_file, self.key_file, password=b"")
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=self.client_ca_file)
        context.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.prefer_server_cipher_suites:
            context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        return context


@dataclass(frozen=True, slots=True)
class WebConfig:
    """A validated web configuration. ``ssl_context`` is built (and so checked) on loading."""

    source: str = "<web config>"
    tls: TLSSettings | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def middlewares(self) -> list[Middleware]:
        """The aiohttp middlewares enforcing basic auth and adding the configured headers."""
        if not self.users and not self.headers:
            return []
        return [security_middleware(BasicAuth(self.users) if self.users else None, self.headers)]

    def summary(self) -> str:
        tls = f"TLS on (min {self.tls.min_version})" if self.tls is not None else "TLS off"
        auth = f"basic auth for {len(self.users)} users" if self.users else "no basic auth"
        return f"{tls}, {auth}"


# --------------------------------------------------------------------------------------------------
# Validation


def _dotted(loc: Loc) -> str:
    return ".".join(loc)


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, loc: Loc, message: str) -> None:
        self.lines.append(f"{_dotted(loc)}: {message}")


def _mapping(value: object, loc: Loc, problems: _Problems) -> Mapping[Any, Any] | None:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(loc, f"must be a mapping of options, got {_describe(value)}")
        return None
    return value


def _unknown_keys(
    data: Mapping[Any, Any],
    known: Sequence[str],
    loc: Loc,
    problems: _Problems,
    *,
    reported_elsewhere: Collection[str] = (),
) -> None:
    for key in data:
        if not isinstance(key, str):
            problems.add(loc, f"option names must be strings, got {_describe(key)}")
        elif key not in known and key not in reported_elsewhere:
            problems.add((*loc, key), f"unknown option (valid options: {', '.join(known)})")


def _path(value: object, loc: Loc, base_dir: Path, problems: _Problems) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.add(loc, f"must be a file path, got {_describe(value)}")
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        problems.add(loc, f"{path} does not exist or is not a file")
        return None
    return path


def _choice(value: object, allowed: Sequence[str], loc: Loc, problems: _Problems) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in allowed:
        problems.add(loc, f"must be one of {', '.join(allowed)}, got {_describe(value)}")
        return None
    return value


def _tls(
    data: Mapping[Any, Any], base_dir: Path, problems: _Problems, warnings: list[str]
) -> TLSSettings | None:
    loc: Loc = ("tls_server_config",)
    before = len(problems.lines)
    _unknown_keys(data, _TLS_OPTIONS, loc, problems, reported_elsewhere=_TLS_UNSUPPORTED)
    for name, message in _TLS_UNSUPPORTED.items():
        if name in data:
            problems.add((*loc, name), message)
    cert = _path(data.get("cert_file"), (*loc, "cert_file"), base_dir, problems)
    key = _path(data.get("key_file"), (*loc, "key_file"), base_dir, problems)
    for name, other in (("cert_file", "key_file"), ("key_file", "cert_file")):
        if data.get(name) is None and data.get(other) is not None:
            problems.add((*loc, name), f"is required with {other}")
    ca = _path(data.get("client_ca_file"), (*loc, "client_ca_file"), base_dir, problems)
    auth_value = data.get("client_auth_type")
    if auth_value in _CLIENT_AUTH_UNSUPPORTED:
        problems.add(
            (*loc, "client_auth_type"),
            f"{auth_value} (a client certificate that is not verified) is not supported; use "
            "VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
        )
        auth_type = None
    else:
        auth_type = _choice(auth_value, list(_CLIENT_AUTH), (*loc, "client_auth_type"), problems)
    if auth_type is None and ca is not None:
        auth_type = "RequireAndVerifyClientCert"  # the toolkit's default with a client CA
    verifies = auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
    if verifies and data.get("client_ca_file") is None:
        problems.add((*loc, "client_ca_file"), f"is required with client_auth_type {auth_type}")
    versions = list(_TLS_VERSIONS)
    min_version = _choice(data.get("min_version"), versions, (*loc, "min_version"), problems)
    max_version = _choice(data.get("max_version"), versions, (*loc, "max_version"), problems)
    if (
        min_version is not None
        and max_version is not None
        and versions.index(min_version) > versions.index(max_version)
    ):
        problems.add((*loc, "max_version"), f"must not be lower than min_version {min_version}")
    prefer = data.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        problems.add(
            (*loc, "prefer_server_cipher_suites"), f"must be true or false, got {_describe(prefer)}"
        )
    if len(problems.lines) > before or cert is None or key is None:
        return None
    if _others_can_read(key):
        mode = stat.S_IMODE(key.stat().st_mode)
        warnings.append(
            f"tls_server_config.key_file: {key} is readable by other users (mode {mode:04o});"
            " chmod 600 it"
        )
    return TLSSettings(
        cert_file=cert,
        key_file=key,
        client_auth_type=auth_type or "NoClientCert",
        client_ca_file=ca,
        min_version=min_version or "TLS12",
        max_version=max_version,
        prefer_server_cipher_suites=bool(prefer),
    )


def _others_can_read(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and bool(mode & 0o077)


def _build_context(tls: TLSSettings, problems: _Problems) -> ssl.SSLContext | None:
    loc: Loc = ("tls_server_config",)
    for name, path in (("cert_file", tls.cert_file), ("client_ca_file", tls.client_ca_file)):
        if path is None:
            continue
        try:
            ssl.create_default_context(cafile=path)
        except (ssl.SSLError, ValueError, OSError) as exc:
            problems.add((*loc, name), f"{path} holds no PEM certificate: {_why(exc)}")
            return None
    try:
        return tls.ssl_context()
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = _why(exc) if not isinstance(exc, ssl.SSLError) or exc.reason else "no usable key"
        problems.add(
            (*loc, "key_file"),
            f"cannot use {tls.key_file} with cert_file: {reason}"
            " (the key must be the certificate's, unencrypted, in PEM)",
        )
        return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _users(value: object, problems: _Problems) -> dict[str, bytes]:
    loc: Loc = ("basic_auth_users",)
    data = _mapping(value, loc, problems)
    users: dict[str, bytes] = {}
    for user, hashed in (data or {}).items():
        if not isinstance(user, str) or not user:
            problems.add(loc, f"user names must be non-empty strings, got {_describe(user)}")
            continue
        if ":" in user:
            problems.add((*loc, user), "user names must not contain ':' (HTTP basic auth)")
            continue
        match = _BCRYPT_RE.fullmatch(hashed) if isinstance(hashed, str) else None
        if match is None or not 4 <= int(match.group(1)) <= 31:
            # The value is not echoed: it might be a plain password written by mistake.
            problems.add(
                (*loc, user),
                "must be a bcrypt hash like $2y$10$ followed by 53 characters"
                " (htpasswd -nBC 10 USER); plain passwords are not accepted",
            )
            continue
        users[user] = hashed.encode("ascii")
    return users


def _http(value: object, problems: _Problems) -> dict[str, str]:
    loc: Loc = ("http_server_config",)
    data = _mapping(value, loc, problems)
    if data is None:
        return {}
    _unknown_keys(data, _HTTP_OPTIONS, loc, problems)
    http2 = data.get("http2", True)
    if not isinstance(http2, bool):
        problems.add((*loc, "http2"), f"must be true or false, got {_describe(http2)}")
    raw = _mapping(data.get("headers"), (*loc, "headers"), problems)
    headers: dict[str, str] = {}
    for name, header_value in (raw or {}).items():
        hloc: Loc = (*loc, "headers", str(name))
        if name not in _HEADERS:
            problems.add(hloc, f"unsupported header (supported: {', '.join(_HEADERS)})")
            continue
        allowed = _HEADERS[name]
        if not isinstance(header_value, str) or not header_value or "\n" in header_value:
            problems.add(hloc, f"must be a one-line string, got {_describe(header_value)}")
        elif allowed is not None and header_value.lower() not in allowed:
            problems.add(
                hloc, f"must be one of {', '.join(allowed)}, got {_describe(header_value)}"
            )
        else:
            headers[name] = header_value
    return headers


def web_config_from_mapping(
    data: object, source: str = "<web config>", *, base_dir: Path | None = None
) -> WebConfig:
    """Validate parsed web configuration data. Raises :class:`ConfigError`."""
    base = Path.cwd() if base_dir is None else base_dir
    problems = _Problems()
    if data is None:
        return WebConfig(source=source)
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                f"{source}: the top level must be a mapping of options "
                f"({', '.join(_TOP_LEVEL)}), got {_describe(data)}"
            ],
            source,
        )
    _unknown_keys(data, _TOP_LEVEL, (), problems)
    warnings: list[str] = []
    tls_data = _mapping(data.get("tls_server_config"), ("tls_server_config",), problems)
    tls = _tls(tls_data, base, problems, warnings) if tls_data else None
    users = _users(data.get("basic_auth_users"), problems)
    headers = _http(data.get("http_server_config"), problems)
    context = _build_context(tls, problems) if tls is not None and not problems.lines else None
    if problems.lines:
        raise ConfigError(list(dict.fromkeys(problems.lines)), source)
    if users and tls is None:
        warnings.append(
            "basic_auth_users: without tls_server_config, passwords cross the network in clear text"
        )
    return WebConfig(
        source=source,
        tls=tls,
        ssl_context=context,
        users=users,
        headers=headers,
        warnings=tuple(warnings),
    )


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web configuration file. Raises :class:`ConfigError`."""
    source = str(path)
    data = read_yaml_file(Path(path), "web config file")
    return web_config_from_mapping(data, source, base_dir=Path(path).absolute().parent)


# --------------------------------------------------------------------------------------------------
# Basic auth


def parse_basic_authorization(header: str | None) -> tuple[str, bytes] | None:
    """User name and password bytes from an ``Authorization: Basic`` header, else ``None``."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class BasicAuth:
    """Checks basic-auth credentials against bcrypt hashes, timing-safe, with a verified cache."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        costs = [int(hashed[4:6]) for hashed in self._users.values()]
        cost = max(costs, default=_DEFAULT_COST)
        # Unknown users are checked against this, at the highest configured cost.
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        self._key = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        self._checks = asyncio.Semaphore(_MAX_CONCURRENT_CHECKS)
        self.bcrypt_checks = 0
        """How many bcrypt checks ran (the cache keeps this at one per user and password)."""

    def __repr__(self) -> str:
        return f"BasicAuth(<{len(self._users)} users>)"

    def _mac(self, user: str, password: bytes) -> bytes:
        message = hashlib.sha256(user.encode()).digest() + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def check(self, header: str | None) -> str | None:
        """The authenticated user name, or ``None`` for missing or wrong credentials."""
        credentials = parse_basic_authorization(header)
        if credentials is None:
            return None
        user, password = credentials
        password = password[:_BCRYPT_MAX_PASSWORD]
        hashed = self._users.get(user)
        mac = self._mac(user, password)
        if hashed is not None:
            known = self._verified.get(user)
            if known is not None and hmac.compare_digest(known, mac):
                return user
        ok = await self._checkpw(password, hashed if hashed is not None else self._dummy)
        if ok and hashed is not None:
            self._verified[user] = mac
            return user
        return None

    async def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        async with self._checks:
            self.bcrypt_checks += 1
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, bcrypt.checkpw, password, hashed)


def security_middleware(auth: BasicAuth | None, headers: Mapping[str, str]) -> Middleware:
    """Require basic auth on every route (when ``auth``) and add ``headers`` to every response."""
    extra = dict(headers)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is not None and await auth.check(request.headers.get("Authorization")) is None:
            log.debug("unauthorised request for %s from %s", request.path, request.remote)
            response: web.StreamResponse = web.Response(
                status=401,
                text="Unauthorized\n",
                headers={"WWW-Authenticate": WWW_AUTHENTICATE, **extra},
            )
            return response
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(extra)
            raise
        response.headers.update(extra)
        return response

    return middleware
