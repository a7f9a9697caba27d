"""Credentials: from the ``twilio`` section, its ``*_file`` options and the environment.

Each secret comes from its option, else its file, else its environment variable; the other
options (the Account SID, the API key, the OAuth2 client id) from the option, else the
environment. Which kind of credentials applies is a rule across options, so this is written by
hand, each problem with its own words.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

from pydantic import SecretStr, TypeAdapter, ValidationError
from pydantic_core import InitErrorDetails

from twilio_wireless_exporter.config.errors import Loc, dotted, explain, fail, problem
from twilio_wireless_exporter.config.types import (
    AccountSid,
    ApiKey,
    UnreadableFileError,
    read_regular_file,
    readable_by_others,
)

if TYPE_CHECKING:
    from twilio_wireless_exporter.config.models import TwilioSettings

#: The environment variable read for each option the configuration leaves unset.
ENVIRONMENT: Final = {
    "account_sid": "TWILIO_ACCOUNT_SID",
    "auth_token": "TWILIO_AUTH_TOKEN",
    "api_key": "TWILIO_API_KEY",
    "api_secret": "TWILIO_API_SECRET",
    "client_id": "KORE_CLIENT_ID",
    "client_secret": "KORE_CLIENT_SECRET",
}
_TOKEN_OPTIONS: Final = ("auth_token", "auth_token_file")
_KEY_OPTIONS: Final = ("api_key", "api_secret", "api_secret_file")
BASIC_OPTIONS: Final = ("account_sid", *_TOKEN_OPTIONS, *_KEY_OPTIONS)
_MAX_SECRET_FILE_BYTES: Final = 64 * 1024
_NO_CREDENTIALS: Final = (
    "no Twilio credentials configured; set twilio.account_sid with twilio.auth_token or "
    "twilio.auth_token_file, or twilio.api_key with twilio.api_secret or twilio.api_secret_file, "
    "or the environment variables TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (or TWILIO_API_KEY "
    "and TWILIO_API_SECRET); for KORE Wireless set twilio.auth.type: oauth2_client_credentials"
)
_REQUIRED_WITH: Final = "is required with an {}; set twilio.{} or the environment variable {}"
_KEY_ALONE: Final = (
    "an API key needs its secret; set twilio.api_secret, twilio.api_secret_file or the "
    "environment variable TWILIO_API_SECRET"
)
_BOTH_KINDS: Final = (
    "cannot be combined with twilio.{}: authenticate either with an API key (api_key + "
    "api_secret) or with the account's auth token, not both"
)
_BASIC_WITH_OAUTH2: Final = (
    "is a Twilio basic-auth option and cannot be used with twilio.auth.type "
    "oauth2_client_credentials; remove it"
)
_OAUTH2_REQUIRED: Final = (
    "is required for oauth2_client_credentials; set {options} or the environment variable {name}"
)
_CHECKS: Final = {"account_sid": TypeAdapter(AccountSid), "api_key": TypeAdapter(ApiKey)}


@dataclass(frozen=True, slots=True)
class BasicCredentials:
    """HTTP Basic credentials: an Account SID + auth token, or an API key SID + secret."""

    username: str
    password: SecretStr
    account_sid: str | None = None


@dataclass(frozen=True, slots=True)
class OAuth2Credentials:
    """OAuth 2.0 client credentials (KORE Wireless)."""

    token_url: str
    client_id: str
    client_secret: SecretStr
    scope: str | None = None
    refresh_margin: float = 60.0


Credentials: TypeAlias = BasicCredentials | OAuth2Credentials


def resolve_credentials(
    twilio: "TwilioSettings", environ: Mapping[str, str], warnings: list[str]
) -> Credentials:
    """The credentials ``twilio`` describes; raises a ValidationError with paths in ``twilio``."""
    resolver = _Resolver(twilio, environ, warnings)
    found = (
        resolver.oauth2() if twilio.auth.type == "oauth2_client_credentials" else resolver.basic()
    )
    if found is None or resolver.problems:
        raise fail(resolver.problems or [problem(_NO_CREDENTIALS, ("auth_token",))])
    return found


class _Resolver:
    def __init__(
        self, twilio: "TwilioSettings", environ: Mapping[str, str], warnings: list[str]
    ) -> None:
        self.twilio, self.environ, self.warnings = twilio, environ, warnings
        self.problems: list[InitErrorDetails] = []

    def add(self, message: str, loc: Loc, **context: object) -> None:
        self.problems.append(problem(message, loc, **context))

    def env(self, option: str) -> str | None:
        """The option's environment variable (empty counts as unset), checked like the option."""
        name = ENVIRONMENT[option]
        value = self.environ.get(name) or None
        if value is None or option not in _CHECKS:
            return value
        try:
            return _CHECKS[option].validate_python(value)
        except ValidationError as exc:
            wrong = explain(exc.errors()[0], hidden=True)
            self.add(f"environment variable {name} {wrong}", (option,))
            return None

    def secret(self, loc: Loc, missing: str, **context: object) -> SecretStr | None:
        """From the option, else its file, else the environment; else the problem ``missing``."""
        section = self.twilio.auth if loc[0] == "auth" else self.twilio
        option, file_loc = str(loc[-1]), (*loc[:-1], f"{loc[-1]}_file")
        value: SecretStr | None = getattr(section, option)
        file: Path | None = getattr(section, f"{option}_file")
        if value is not None and file is not None:
            both = f"{dotted(('twilio', *loc))} and {dotted(('twilio', *file_loc))}"
            self.add(f"{both} are both set; use only one", file_loc)
            return None
        if file is not None:
            return self._read(file, file_loc)
        if value is None and (from_env := self.env(option)) is not None:
            value = SecretStr(from_env)
        if value is None:
            self.add(missing, loc, **context)
        return value

    def _read(self, path: Path, loc: Loc) -> SecretStr | None:
        try:
            raw, mode = read_regular_file(path, _MAX_SECRET_FILE_BYTES)
        except UnreadableFileError as exc:
            self.add("cannot read {path}: {reason}", loc, path=str(path), reason=str(exc))
            return None
        try:
            text: str | None = raw.decode("utf-8").rstrip()
        except UnicodeDecodeError:
            text = None
        wrong = "is not UTF-8 text" if text is None else None if text else "is empty"
        if len(raw) > _MAX_SECRET_FILE_BYTES:
            wrong = "is larger than 64 KiB; it must contain only the secret"
        if wrong is not None or text is None:
            self.add(f"{{path}} {wrong}", loc, path=str(path))
            return None
        self.warnings.extend(readable_by_others(dotted(("twilio", *loc)), path, mode))
        return SecretStr(text)

    def basic(self) -> BasicCredentials | None:
        t = self.twilio
        tokens = [n for n in _TOKEN_OPTIONS if getattr(t, n) is not None]
        keys = [n for n in _KEY_OPTIONS if getattr(t, n) is not None]
        if tokens and keys:
            self.add(_BOTH_KINDS.format(tokens[0]), (keys[0],))
            return None
        account_sid = t.account_sid or self.env("account_sid")
        env_key = self.environ.get(ENVIRONMENT["api_key"])
        if keys or (not tokens and env_key):
            api_key = t.api_key or self.env("api_key")
            if api_key is None and not env_key:
                self.add(
                    _REQUIRED_WITH.format("API secret", "api_key", "TWILIO_API_KEY"), ("api_key",)
                )
            secret = self.secret(("api_secret",), _KEY_ALONE)
            if api_key is None or secret is None:
                return None
            return BasicCredentials(username=api_key, password=secret, account_sid=account_sid)
        token = self.secret(("auth_token",), _NO_CREDENTIALS)
        if token is not None and account_sid is None and not self.problems:
            sid_required = _REQUIRED_WITH.format("auth token", "account_sid", "TWILIO_ACCOUNT_SID")
            self.add(sid_required, ("account_sid",))
        if token is None or account_sid is None:
            return None
        return BasicCredentials(username=account_sid, password=token, account_sid=account_sid)

    def oauth2(self) -> OAuth2Credentials | None:
        t, auth = self.twilio, self.twilio.auth
        for name in BASIC_OPTIONS:
            if getattr(t, name) is not None:
                self.add(_BASIC_WITH_OAUTH2, (name,))
        client_id = auth.client_id or self.env("client_id")
        if client_id is None:
            where = {"options": "twilio.auth.client_id", "name": ENVIRONMENT["client_id"]}
            self.add(_OAUTH2_REQUIRED, ("auth", "client_id"), **where)
        options = "twilio.auth.client_secret, twilio.auth.client_secret_file"
        where = {"options": options, "name": ENVIRONMENT["client_secret"]}
        secret = self.secret(("auth", "client_secret"), _OAUTH2_REQUIRED, **where)
        if client_id is None or secret is None:
            return None
        return OAuth2Credentials(
            token_url=auth.token_url,
            client_id=client_id,
            client_secret=secret,
            scope=auth.scope,
            refresh_margin=auth.refresh_margin,
        )
