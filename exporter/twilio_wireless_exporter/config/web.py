"""The web configuration file (``--web.config.file``), in the Prometheus exporter-toolkit's format.

Toolkit options that Python's TLS stack cannot honour are refused, not ignored (the differences
are listed in docs/operations.md). The SSL context is built on loading, so that an unusable
certificate or key is reported like any other problem, before anything starts.
"""

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self, TypeAlias, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictStr,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_core import PydanticCustomError as Problem

from twilio_wireless_exporter.config.errors import fail, problem, shaped
from twilio_wireless_exporter.config.loading import read_yaml_file, validate
from twilio_wireless_exporter.config.models import Settings
from twilio_wireless_exporter.config.types import ExistingFile, readable_by_others, warnings_of

TLSVersion: TypeAlias = Literal["TLS10", "TLS11", "TLS12", "TLS13"]
ClientAuthType: TypeAlias = Literal[
    "NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"
]
_TLS_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH: Final = dict(
    zip(
        get_args(ClientAuthType), (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED), strict=True
    )
)
#: The values the toolkit accepts for the headers it restricts.
_RESTRICTED: Final = {
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-Content-Type-Options": ("nosniff",),
}
#: The security headers the toolkit allows.
HeaderName: TypeAlias = Literal[
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
]


def _verified_client_certs_only(value: object) -> object:
    if value in ("RequestClientCert", "RequireAnyClientCert"):
        raise Problem(
            "client_cert",
            f"{value} (a client certificate that is not verified) is not supported; use "
            "VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
        )
    return value


def _unsupported(reason: str) -> Any:
    """An option of the toolkit refused with ``reason`` (not listed among the valid options)."""
    return Field(None, exclude=True, description=reason)


def _refuse(value: object) -> object:
    raise Problem("tls_unsupported", "")


Unsupported = Annotated[object, AfterValidator(_refuse)]
UserName = Annotated[
    StrictStr,
    Field(min_length=1),
    shaped(r"^[^:]*$", "user names must not contain ':' (HTTP basic auth)"),
]
# The value is never shown: it might be a plain password written by mistake.
BcryptHash = Annotated[
    StrictStr,
    shaped(
        # costs above 16 are refused: each check would take minutes (cost 31: days)
        r"^\$2[aby]\$(0[4-9]|1[0-6])\$[./A-Za-z0-9]{53}$",
        "must be a bcrypt hash of cost 04 to 16 like $2y$10$ followed by 53 characters"
        " (htpasswd -nBC 10 USER); plain passwords are not accepted",
    ),
]
# HTAB is the one control character a header value may hold: any other (C1 and the Unicode line
# separators included, which some parsers split lines at) ends or breaks the header.
HeaderValue = Annotated[
    StrictStr,
    Field(max_length=4096),
    shaped(
        r"^[^\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]+$",
        "must be one line of text without control characters, got {got}",
    ),
]


def _load(name: str, path: Path, message: str, load: Callable[..., object], *args: object) -> None:
    """``load(*args)`` (a certificate or key into an SSL context); a failure is a problem."""
    try:
        load(*args)
    except (ssl.SSLError, ValueError, OSError) as exc:
        if isinstance(exc, ssl.SSLError):
            reason = str(exc.reason or "no usable key")
        else:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__
        raise fail([problem(message, (name,), path=str(path), reason=reason)]) from None


class TLSSettings(Settings):
    """``tls_server_config``: the server's certificate, and optionally mutual TLS."""

    cert_file: ExistingFile | None = None
    key_file: ExistingFile | None = None
    client_auth_type: Annotated[ClientAuthType, BeforeValidator(_verified_client_certs_only)] = (
        "NoClientCert"
    )
    client_ca_file: ExistingFile | None = None
    min_version: TLSVersion = "TLS12"
    max_version: TLSVersion | None = None
    prefer_server_cipher_suites: StrictBool = True
    cert: Unsupported = _unsupported("inline certificates are not supported; use cert_file")
    key: Unsupported = _unsupported("inline keys are not supported; use key_file")
    cipher_suites: Unsupported = _unsupported(
        "is not supported (Go cipher suite names); the exporter uses Python's secure default "
        "ciphers, and TLS 1.3 suites are fixed anyway; remove it"
    )
    curve_preferences: Unsupported = _unsupported(
        "is not supported; the exporter uses Python's default curves; remove it"
    )
    client_allowed_sans: Unsupported = _unsupported("is not supported; remove it")

    _context: ssl.SSLContext | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _client_ca_means_verify(cls, data: object) -> object:
        # like the toolkit: a client CA without client_auth_type means RequireAndVerifyClientCert
        if isinstance(data, dict) and data.get("client_auth_type") is None:
            data = {k: v for k, v in data.items() if k != "client_auth_type"}
            if data.get("client_ca_file") is not None:
                data["client_auth_type"] = "RequireAndVerifyClientCert"
        return data

    @model_validator(mode="after")
    def _consistent_and_loadable(self, info: ValidationInfo) -> Self:
        problems: list[InitErrorDetails] = []
        for name, other in (("cert_file", "key_file"), ("key_file", "cert_file")):
            if getattr(self, name) is None and getattr(self, other) is not None:
                problems.append(problem(f"is required with {other}", (name,)))
        if self.client_auth_type != "NoClientCert" and self.client_ca_file is None:
            wrong = f"is required with client_auth_type {self.client_auth_type}"
            problems.append(problem(wrong, ("client_ca_file",)))
        versions = list(_TLS_VERSIONS)
        if self.max_version and versions.index(self.min_version) > versions.index(self.max_version):
            wrong = f"must not be lower than min_version {self.min_version}"
            problems.append(problem(wrong, ("max_version",)))
        if problems:
            raise fail(problems)
        if self.cert_file is not None and self.key_file is not None:
            where = "tls_server_config.key_file"
            mode = self.key_file.stat().st_mode
            warnings_of(info).extend(readable_by_others(where, self.key_file, mode))
            self._context = self._server_context(self.cert_file, self.key_file)
        return self

    def _server_context(self, cert_file: Path, key_file: Path) -> ssl.SSLContext:
        no_pem = "{path} holds no PEM certificate: {reason}"
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the certificate alone, before the key
        _load("cert_file", cert_file, no_pem, check.load_verify_locations, cert_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _TLS_VERSIONS[self.min_version]
        context.maximum_version = _TLS_VERSIONS[self.max_version or "TLS13"]
        unusable = "cannot use {path} with cert_file: {reason} (the key must be the certificate's, "
        # An encrypted key gets an empty passphrase (and fails) instead of a prompt on the tty.
        chain = (context.load_cert_chain, cert_file, key_file, b"")
        _load("key_file", key_file, unusable + "unencrypted, in PEM)", *chain)
        if self.client_ca_file is not None:
            ca = self.client_ca_file
            _load("client_ca_file", ca, no_pem, context.load_verify_locations, ca)
        context.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.prefer_server_cipher_suites:
            context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        return context


class HTTPSettings(Settings):
    """``http_server_config``: response headers (``http2`` is accepted and has no effect)."""

    http2: StrictBool = True
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _allowed_header_values(self) -> Self:
        problems = [
            problem(f"must be one of {', '.join(allowed)}, got {{got}}", ("headers", name), value)
            for name, value in self.headers.items()
            if value.lower() not in (allowed := _RESTRICTED.get(name, (value.lower(),)))
        ]
        if problems:
            raise fail(problems)
        return self


class WebConfig(Settings):
    """A validated web configuration; its SSL context is built (and so checked) on loading."""

    tls_server_config: TLSSettings = Field(default_factory=TLSSettings)
    basic_auth_users: dict[UserName, BcryptHash] = Field(default_factory=dict, repr=False)
    http_server_config: HTTPSettings = Field(default_factory=HTTPSettings)

    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _collect_warnings(self, info: ValidationInfo) -> Self:
        warnings = warnings_of(info)
        if self.basic_auth_users and self.tls is None:
            warnings.append(
                "basic_auth_users: without tls_server_config, passwords cross the network in "
                "clear text"
            )
        self._warnings = tuple(warnings)
        return self

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._warnings

    @property
    def tls(self) -> TLSSettings | None:
        """The TLS settings, or None when the server speaks plain HTTP."""
        return self.tls_server_config if self.tls_server_config.cert_file is not None else None

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls_server_config._context

    @property
    def users(self) -> dict[str, bytes]:
        """User name -> bcrypt hash."""
        return {user: hashed.encode("ascii") for user, hashed in self.basic_auth_users.items()}

    @property
    def headers(self) -> dict[str, str]:
        return {str(name): value for name, value in self.http_server_config.headers.items()}

    def summary(self) -> str:
        tls = f"TLS on (min {self.tls.min_version})" if self.tls is not None else "TLS off"
        users = self.basic_auth_users
        return f"{tls}, {f'basic auth for {len(users)} users' if users else 'no basic auth'}"


def web_config_from_mapping(
    data: object, source: str = "<web config>", *, base_dir: Path | None = None
) -> WebConfig:
    """Validate parsed web configuration data. Raises :class:`ConfigError`."""
    context = {"base_dir": Path.cwd() if base_dir is None else base_dir, "warnings": []}
    return WebConfig() if data is None else validate(WebConfig, data, source, context)


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web configuration file. Raises :class:`ConfigError`."""
    data = read_yaml_file(Path(path), "web config file")
    return web_config_from_mapping(data, str(path), base_dir=Path(path).absolute().parent)
