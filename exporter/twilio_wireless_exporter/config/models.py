"""Configuration: a YAML file turned into validated, immutable settings.

Everything the exporter can be told lives here, so that the rest of the code receives values that
are already checked, typed and normalised (durations in float seconds, sizes in bytes, file paths
absolute, credentials resolved from the file, secret files or the environment).

Every problem is reported as one line ``field.path: what is wrong`` through :class:`ConfigError`;
the values of secrets never appear in an error, a warning, a ``repr()`` or a serialised model.

Public entry points: :func:`load_config` (a file), :func:`config_from_mapping` (already parsed
data, for tests and embedding) and :func:`parse_duration`.
"""

import difflib
import math
import os
import re
import stat
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePath
from typing import Annotated, Any, Final, Literal, Self, TypeAlias, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from twilio_wireless_exporter.sharding import MAX_SHARDS

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TOKEN_URL",
    "KORE_BASE_URL",
    "RESERVED_LABEL_NAMES",
    "SIM_STATUSES",
    "AuthSettings",
    "BasicCredentials",
    "Config",
    "ConfigError",
    "Credentials",
    "DiscoverySettings",
    "MetricsSettings",
    "OAuth2Credentials",
    "PollSettings",
    "ShardSettings",
    "SimSettings",
    "StateSettings",
    "TwilioSettings",
    "config_from_mapping",
    "format_duration",
    "load_config",
    "parse_duration",
    "parse_size",
    "read_yaml_file",
]

DEFAULT_BASE_URL: Final = "https://wireless.twilio.com"
KORE_BASE_URL: Final = "https://programmable-wireless.api.korewireless.com"
DEFAULT_TOKEN_URL: Final = "https://api.korewireless.com/api-services/v1/auth/token"  # noqa: S105

ENV_ACCOUNT_SID: Final = "TWILIO_ACCOUNT_SID"
ENV_AUTH_TOKEN: Final = "TWILIO_AUTH_TOKEN"  # noqa: S105 - the name of a variable, not a secret
ENV_API_KEY: Final = "TWILIO_API_KEY"
ENV_API_SECRET: Final = "TWILIO_API_SECRET"  # noqa: S105
ENV_CLIENT_ID: Final = "KORE_CLIENT_ID"
ENV_CLIENT_SECRET: Final = "KORE_CLIENT_SECRET"  # noqa: S105

SimStatus: TypeAlias = Literal[
    "new", "ready", "active", "suspended", "deactivated", "canceled", "scheduled", "updating"
]
SIM_STATUSES: Final[tuple[str, ...]] = get_args(SimStatus)

AuthType: TypeAlias = Literal["basic", "oauth2_client_credentials"]
AUTH_TYPES: Final[tuple[str, ...]] = get_args(AuthType)

#: Label names the exporter sets itself (or Prometheus reserves); constant SIM labels must not
#: reuse them.
RESERVED_LABEL_NAMES: Final = frozenset(
    {
        "sim_sid",
        "sim_name",
        "unique_name",
        "friendly_name",
        "status",
        "rate_plan_sid",
        "radio_link",
        "operator_name",
        "operator_country",
        "operator_mcc",
        "operator_mnc",
        "imei",
        "endpoint",
        "code",
        "reason",
        "le",
        "quantile",
        "job",
        "instance",
        "display_name",  # added by the shipped dashboards and alert rules
    }
)

#: Option names whose values are secrets: never echoed in any message.
_SECRET_OPTIONS: Final = frozenset({"auth_token", "api_secret", "client_secret"})

_ACCOUNT_SID_RE: Final = re.compile(r"AC[0-9a-fA-F]{32}")
_API_KEY_RE: Final = re.compile(r"SK[0-9a-fA-F]{32}")
_SIM_SID_RE: Final = re.compile(r"DE[0-9a-fA-F]{32}")
_LABEL_NAME_RE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

_MAX_SECRET_FILE_BYTES: Final = 64 * 1024
_MAX_DURATION: Final = 365 * 86400.0
_KIB: Final = 1024
_MIB: Final = 1024 * 1024
_GIB: Final = 1024 * 1024 * 1024

Loc: TypeAlias = tuple[str | int, ...]


# --------------------------------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """A configuration that cannot be used.

    ``problems`` holds one line per problem (``field.path: what is wrong``); ``str()`` joins
    them with newlines.
    """

    def __init__(self, problems: Sequence[str], source: str = "<config>") -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)

    def __reduce__(self) -> tuple[type["ConfigError"], tuple[list[str], str]]:
        return (type(self), (self.problems, self.source))


def _fail(message: str) -> PydanticCustomError:
    """An error for the value being validated, with our own message (kept verbatim)."""
    return PydanticCustomError("config_value", "{message}", {"message": message})


def _fail_many(problems: Sequence[tuple[Loc, str]]) -> PydanticCustomError:
    """Several errors at paths relative to the value being validated."""
    summary = "; ".join(message for _, message in problems)
    return PydanticCustomError(
        "config_problems", "{summary}", {"summary": summary, "problems": tuple(problems)}
    )


def _kind(value: object) -> str:
    """The YAML-ish kind of a value, without the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a value of type {type(value).__name__}"


def _describe(value: object) -> str:
    """A short rendering of a non-secret value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return _kind(value)


# --------------------------------------------------------------------------------------------------
# Durations and sizes

_DURATION_HINT: Final = "must be a duration like 30s, 5m or a number of seconds"
_DURATION_UNITS: Final[dict[str, Decimal]] = {
    "w": Decimal(604800),
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_DURATION_ORDER: Final = tuple(_DURATION_UNITS)
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|[wdhms])")
_PLAIN_NUMBER_RE: Final = re.compile(r"\+?\d+(?:\.\d+)?|\+?\.\d+")


def _parse_duration_text(text: str) -> Decimal | None:
    if _PLAIN_NUMBER_RE.fullmatch(text):
        return Decimal(text.lstrip("+"))
    total = Decimal(0)
    position = 0
    last_rank = -1
    while position < len(text):
        match = _DURATION_PART_RE.match(text, position)
        if match is None:
            return None
        rank = _DURATION_ORDER.index(match.group(2))
        if rank <= last_rank:  # units must go from the largest to the smallest, each at most once
            return None
        last_rank = rank
        total += Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total if position > 0 else None


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a duration string (``500ms``, ``5m``, ``1h30m``, ``2d``).

    Units (``w``, ``d``, ``h``, ``m``, ``s``, ``ms``) go from the largest to the smallest, each at
    most once; components may have decimals (``1.5h``). Raises :class:`ValueError` (whose message is
    meant for users) for anything else, including negative, infinite and NaN values.
    """
    hint = f"{_DURATION_HINT}, got {_describe(value)}"
    if isinstance(value, bool):
        raise ValueError(hint)  # noqa: TRY004 - one exception type for every bad value
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(hint) from None
        if math.isnan(seconds) or math.isinf(seconds):
            raise ValueError(hint)
        if seconds < 0:
            raise ValueError(f"must not be negative, got {_describe(value)}")
        return seconds
    if not isinstance(value, str):
        raise ValueError(hint)  # noqa: TRY004
    text = value.strip()
    if text.startswith("-") and _parse_duration_text(text[1:]) is not None:
        raise ValueError(f"must not be negative, got {_describe(value)}")
    parsed = _parse_duration_text(text)
    if parsed is None:
        raise ValueError(hint)
    seconds = float(parsed)
    if math.isinf(seconds):
        raise ValueError(hint)
    return seconds


def format_duration(seconds: float) -> str:
    """A duration string (e.g. ``1h30m``) that :func:`parse_duration` reads back as ``seconds``."""
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    millis = round(seconds * 1000)
    if millis / 1000 != seconds:
        return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


_SIZE_HINT: Final = "must be a size like 16MiB, 512KiB or a number of bytes"
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")
_SIZE_UNITS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": _KIB,
    "mib": _MIB,
    "gib": _GIB,
}


def parse_size(value: object) -> int:
    """Bytes from an integer or a size string (``16MiB``, ``512KiB``, ``1MB``, ``2048``).

    Unit names ignore case; KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024.
    """
    hint = f"{_SIZE_HINT}, got {_describe(value)}"
    if isinstance(value, bool):
        raise ValueError(hint)  # noqa: TRY004
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(hint)  # noqa: TRY004
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(hint)
    size = Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size != size.to_integral_value():
        raise ValueError(f"must be a whole number of bytes, got {_describe(value)}")
    return int(size)


def _format_size(size: int) -> str:
    for unit, factor in (("GiB", _GIB), ("MiB", _MIB), ("KiB", _KIB)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


# --------------------------------------------------------------------------------------------------
# Field validators. All run in "before" mode so that every message is ours, and types are strict:
# YAML gives real booleans and numbers, so a quoted "10" where a number belongs is worth reporting.


def _int_between(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"must be an integer, got {_describe(value)}")
        if not low <= value <= high:
            raise _fail(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _duration_at_least(minimum: float, *, allow_equal: bool = True) -> Callable[[object], float]:
    def check(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if seconds < minimum or (seconds == minimum and not allow_equal):
            relation = "at least" if allow_equal else "longer than"
            raise _fail(f"must be {relation} {format_duration(minimum)}, got {_describe(value)}")
        if seconds > _MAX_DURATION:
            raise _fail(f"must be at most {format_duration(_MAX_DURATION)}, got {_describe(value)}")
        return seconds

    return check


def _size_between(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if not low <= size <= high:
            bounds = f"{_format_size(low)} and {_format_size(high)}"
            raise _fail(f"must be between {bounds}, got {_describe(value)}")
        return size

    return check


def _positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"must be a number, got {_describe(value)}")
    number = float(value)
    if math.isnan(number) or math.isinf(number) or number <= 0:
        raise _fail(f"must be a number greater than 0, got {_describe(value)}")
    return number


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"must be true or false, got {_describe(value)}")
    return value


def _optional_text(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(f"must be a string, got {_describe(value)}; put it in quotes")
    if not value.strip():
        raise _fail("must not be empty")
    return value


def _sid_checker(
    prefix: str, pattern: re.Pattern[str], *, echo: bool
) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if value is None:
            return None
        wanted = f"must look like {prefix} followed by 32 hex digits"
        if not isinstance(value, str):
            raise _fail(f"{wanted}, got {_describe(value) if echo else _kind(value)}")
        if pattern.fullmatch(value) is None:
            # Credential identifiers are not secret, but a token pasted into the wrong option
            # would be: show only the shape of the value there.
            got = _describe(value) if echo else f"a {len(value)}-character value"
            raise _fail(f"{wanted}, got {got}")
        return value

    return check


_positive_duration = _duration_at_least(0, allow_equal=False)
_account_sid = _sid_checker("AC", _ACCOUNT_SID_RE, echo=False)
_api_key = _sid_checker("SK", _API_KEY_RE, echo=False)
_sim_sid_or_none = _sid_checker("DE", _SIM_SID_RE, echo=True)


def _sim_sid(value: object) -> str:
    if value is None:
        raise _fail("must look like DE followed by 32 hex digits, got null")
    sid = _sim_sid_or_none(value)
    assert sid is not None
    return sid


def _secret(value: object) -> SecretStr | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise _fail(f"must be a string, got {_kind(value)}; put it in quotes")
    if not value.strip():
        raise _fail("must not be empty")
    return SecretStr(value)


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context if isinstance(info.context, Mapping) else {}
    base = context.get("base_dir")
    return Path(base) if isinstance(base, str | PurePath) else Path.cwd()


def _to_path(value: object, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    if isinstance(value, PurePath):
        value = str(value)
    if not isinstance(value, str):
        raise _fail(f"must be a file path, got {_describe(value)}")
    if not value.strip():
        raise _fail("must not be empty")
    if "\x00" in value:
        raise _fail("must not contain a NUL character")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~" with no home directory to expand it to
        raise _fail(f"cannot expand ~ in {value!r}: no home directory is known") from None
    return path if path.is_absolute() else _base_dir(info) / path


def _state_path(value: object, info: ValidationInfo) -> Path | None:
    path = _to_path(value, info)
    if path is None:
        return None
    if not path.parent.is_dir():
        raise _fail(f"directory {path.parent} does not exist")
    if path.is_dir():
        raise _fail(f"{path} is a directory; give the path of a file")
    return path


def _http_url(value: object) -> str:
    if not isinstance(value, str):
        raise _fail(f"must be an http or https URL, got {_describe(value)}")
    # A URL with a user name or password in it must not be echoed.
    shown = "a URL with credentials" if "@" in value else _describe(value)
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for an invalid port
    except ValueError:
        raise _fail(f"must be an http or https URL, got {shown}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(f"must be an http or https URL like https://host, got {shown}")
    if parts.username is not None or parts.password is not None:
        raise _fail("must not contain a user name or password; configure credentials separately")
    if parts.query or parts.fragment:
        raise _fail(f"must not have a query string or fragment, got {shown}")
    return value.strip().rstrip("/")


def _choice(allowed: Sequence[str]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise _fail(f"must be one of {', '.join(allowed)}, got {_describe(value)}")
        return value

    return check


def _labels(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(f"must be a mapping of label names to values, got {_describe(value)}")
    problems: list[tuple[Loc, str]] = []
    labels: dict[str, str] = {}
    for name, label_value in value.items():
        if not isinstance(name, str):
            problems.append(((str(name),), "label names must be strings"))
            continue
        if _LABEL_NAME_RE.fullmatch(name) is None:
            problems.append(
                (
                    (name,),
                    "invalid label name: use letters, digits and _, not starting with a digit",
                )
            )
        elif name.startswith("__"):
            problems.append(((name,), "label names starting with __ are reserved for Prometheus"))
        elif name in RESERVED_LABEL_NAMES:
            problems.append(((name,), "is a label the exporter sets itself; choose another name"))
        if not isinstance(label_value, str):
            problems.append(
                (
                    (name,),
                    f"label values must be strings, got {_describe(label_value)}; "
                    "put the value in quotes",
                )
            )
        elif not label_value:
            problems.append(((name,), "must not be empty (an empty label value means no label)"))
        else:
            labels[name] = label_value
    if problems:
        raise _fail_many(problems)
    return labels


def _statuses(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise _fail(f"must be a list of SIM statuses, got {_describe(value)}")
    if not value:
        raise _fail(f"must list at least one SIM status ({', '.join(SIM_STATUSES)})")
    problems: list[tuple[Loc, str]] = []
    result: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or item not in SIM_STATUSES:
            problems.append(
                ((index,), f"must be one of {', '.join(SIM_STATUSES)}, got {_describe(item)}")
            )
        elif item not in result:
            result.append(item)
    if problems:
        raise _fail_many(problems)
    return tuple(result)


# --------------------------------------------------------------------------------------------------
# Context helpers (the environment and the warnings list travel in the pydantic validation context)


def _environ(info: ValidationInfo) -> Mapping[str, str]:
    context = info.context if isinstance(info.context, Mapping) else {}
    environ = context.get("environ")
    return environ if isinstance(environ, Mapping) else os.environ


def _warnings(info: ValidationInfo) -> list[str]:
    if isinstance(info.context, dict):
        found = info.context.setdefault("warnings", [])
        if isinstance(found, list):
            return found
    return []


def _env_value(environ: Mapping[str, str], name: str) -> str | None:
    """An environment variable, treating an empty value as unset."""
    value = environ.get(name)
    return value if value else None


def _is_set(model: BaseModel, name: str) -> bool:
    return getattr(model, name) is not None


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


# --------------------------------------------------------------------------------------------------
# Credentials


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


def _read_secret_file(
    path: Path, loc: Loc, problems: list[tuple[Loc, str]], warnings: list[str]
) -> SecretStr | None:
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            raw = handle.read(_MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        problems.append((loc, f"cannot read {path}: {exc.strerror or type(exc).__name__}"))
        return None
    if len(raw) > _MAX_SECRET_FILE_BYTES:
        problems.append((loc, f"{path} is larger than 64 KiB; it must contain only the secret"))
        return None
    try:
        text = raw.decode("utf-8").rstrip()
    except UnicodeDecodeError:
        problems.append((loc, f"{path} is not UTF-8 text"))
        return None
    if not text:
        problems.append((loc, f"{path} is empty"))
        return None
    if stat.S_ISREG(mode) and mode & 0o077:
        warnings.append(
            f"{_dotted(('twilio', *loc))}: {path} is readable by other users "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"
        )
    return SecretStr(text)


def _pick_secret(
    *,
    value: SecretStr | None,
    file: Path | None,
    value_loc: Loc,
    file_loc: Loc,
    env_name: str,
    environ: Mapping[str, str],
    problems: list[tuple[Loc, str]],
    warnings: list[str],
) -> tuple[SecretStr | None, bool]:
    """The secret from the option, its file or the environment (in that order).

    Returns the secret (or None when no source is set) and whether reading it failed.
    """
    if value is not None and file is not None:
        problems.append(
            (
                file_loc,
                f"{_dotted(('twilio', *value_loc))} and {_dotted(('twilio', *file_loc))} "
                "are both set; use only one",
            )
        )
        return None, True
    if value is not None:
        return value, False
    if file is not None:
        secret = _read_secret_file(file, file_loc, problems, warnings)
        return secret, secret is None
    from_env = _env_value(environ, env_name)
    return (SecretStr(from_env) if from_env is not None else None), False


_MISSING_CREDENTIALS: Final = (
    "no Twilio credentials configured; set twilio.account_sid with twilio.auth_token or "
    "twilio.auth_token_file, or twilio.api_key with twilio.api_secret or "
    f"twilio.api_secret_file, or the environment variables {ENV_ACCOUNT_SID} and "
    f"{ENV_AUTH_TOKEN} (or {ENV_API_KEY} and {ENV_API_SECRET}); for KORE Wireless set "
    "twilio.auth.type: oauth2_client_credentials"
)

_BASIC_OPTIONS: Final = (
    "account_sid",
    "auth_token",
    "auth_token_file",
    "api_key",
    "api_secret",
    "api_secret_file",
)
_OAUTH2_ONLY_OPTIONS: Final = (
    "token_url",
    "client_id",
    "client_secret",
    "client_secret_file",
    "scope",
    "refresh_margin",
)


# --------------------------------------------------------------------------------------------------
# Models


class _Settings(BaseModel):
    # hide_input_in_errors keeps secrets out of the text of a raw pydantic ValidationError too.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class AuthSettings(_Settings):
    """``twilio.auth``: how requests authenticate (HTTP Basic for Twilio, OAuth 2.0 for KORE)."""

    type: Annotated[AuthType, BeforeValidator(_choice(AUTH_TYPES))] = "basic"
    token_url: Annotated[str, BeforeValidator(_http_url)] = DEFAULT_TOKEN_URL
    client_id: Annotated[str | None, BeforeValidator(_optional_text)] = None
    client_secret: Annotated[SecretStr | None, BeforeValidator(_secret)] = None
    client_secret_file: Annotated[Path | None, BeforeValidator(_to_path)] = None
    scope: Annotated[str | None, BeforeValidator(_optional_text)] = None
    refresh_margin: Annotated[float, BeforeValidator(_duration_at_least(0))] = 60.0

    @model_validator(mode="after")
    def _oauth2_options_need_oauth2(self) -> Self:
        if self.type == "basic":
            misplaced = [name for name in _OAUTH2_ONLY_OPTIONS if name in self.model_fields_set]
            if misplaced:
                raise _fail_many(
                    [
                        ((name,), "is only used with type: oauth2_client_credentials")
                        for name in misplaced
                    ]
                )
        return self


class TwilioSettings(_Settings):
    """``twilio``: where the API is and how to authenticate.

    ``credentials`` holds the result of resolving the options, secret files and environment.
    """

    base_url: Annotated[str, BeforeValidator(_http_url)] = DEFAULT_BASE_URL
    account_sid: Annotated[str | None, BeforeValidator(_account_sid)] = None
    auth_token: Annotated[SecretStr | None, BeforeValidator(_secret)] = None
    auth_token_file: Annotated[Path | None, BeforeValidator(_to_path)] = None
    api_key: Annotated[str | None, BeforeValidator(_api_key)] = None
    api_secret: Annotated[SecretStr | None, BeforeValidator(_secret)] = None
    api_secret_file: Annotated[Path | None, BeforeValidator(_to_path)] = None
    timeout: Annotated[float, BeforeValidator(_positive_duration)] = 10.0
    auth: AuthSettings = Field(default_factory=AuthSettings)

    _credentials: BasicCredentials | OAuth2Credentials | None = PrivateAttr(default=None)

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_null_is_default(cls, value: object) -> object:
        return {} if value is None else value

    @property
    def credentials(self) -> BasicCredentials | OAuth2Credentials:
        """The credentials resolved from this section, secret files and the environment."""
        if self._credentials is None:  # only possible for instances built without validation
            raise RuntimeError("TwilioSettings was not validated; no credentials were resolved")
        return self._credentials

    @model_validator(mode="after")
    def _resolve_credentials(self, info: ValidationInfo) -> Self:
        environ = _environ(info)
        warnings = _warnings(info)
        problems: list[tuple[Loc, str]] = []
        credentials: BasicCredentials | OAuth2Credentials | None
        if self.auth.type == "oauth2_client_credentials":
            credentials = self._oauth2(environ, problems, warnings)
        else:
            credentials = self._basic(environ, problems, warnings)
        if problems or credentials is None:
            raise _fail_many(problems or [(("auth_token",), _MISSING_CREDENTIALS)])
        for url, loc in ((self.base_url, "base_url"), (self.auth.token_url, "auth.token_url")):
            uses_url = loc == "base_url" or isinstance(credentials, OAuth2Credentials)
            if uses_url and url.startswith("http://") and not _is_loopback(url):
                warnings.append(
                    f"twilio.{loc}: uses plain http; credentials would cross the network "
                    "unencrypted"
                )
        if urlsplit(self.base_url).path.rstrip("/").endswith("/v1"):
            warnings.append(
                "twilio.base_url: ends in /v1, but the exporter adds /v1 itself; "
                "give the URL without it"
            )
        self._credentials = credentials
        return self

    def _env_sid(
        self,
        environ: Mapping[str, str],
        name: str,
        loc: str,
        check: Callable[[object], str | None],
        problems: list[tuple[Loc, str]],
    ) -> str | None:
        value = _env_value(environ, name)
        if value is None:
            return None
        try:
            return check(value)
        except PydanticCustomError as exc:
            problems.append(((loc,), f"environment variable {name} {exc.message()}"))
            return None

    def _basic(
        self, environ: Mapping[str, str], problems: list[tuple[Loc, str]], warnings: list[str]
    ) -> BasicCredentials | None:
        token_options = [n for n in ("auth_token", "auth_token_file") if _is_set(self, n)]
        key_options = [n for n in ("api_key", "api_secret", "api_secret_file") if _is_set(self, n)]
        if token_options and key_options:
            problems.append(
                (
                    (key_options[0],),
                    f"cannot be combined with twilio.{token_options[0]}: authenticate either "
                    "with an API key (api_key + api_secret) or with the account's auth token, "
                    "not both",
                )
            )
            return None
        account_sid = self.account_sid or self._env_sid(
            environ, ENV_ACCOUNT_SID, "account_sid", _account_sid, problems
        )
        if key_options or (not token_options and _env_value(environ, ENV_API_KEY) is not None):
            return self._basic_api_key(account_sid, environ, problems, warnings)
        token, failed = _pick_secret(
            value=self.auth_token,
            file=self.auth_token_file,
            value_loc=("auth_token",),
            file_loc=("auth_token_file",),
            env_name=ENV_AUTH_TOKEN,
            environ=environ,
            problems=problems,
            warnings=warnings,
        )
        if token is None:
            if not failed:
                problems.append((("auth_token",), _MISSING_CREDENTIALS))
            return None
        if account_sid is None:
            if not problems:
                problems.append(
                    (
                        ("account_sid",),
                        "is required with an auth token; set twilio.account_sid or the environment "
                        f"variable {ENV_ACCOUNT_SID}",
                    )
                )
            return None
        return BasicCredentials(username=account_sid, password=token, account_sid=account_sid)

    def _basic_api_key(
        self,
        account_sid: str | None,
        environ: Mapping[str, str],
        problems: list[tuple[Loc, str]],
        warnings: list[str],
    ) -> BasicCredentials | None:
        api_key = self.api_key or self._env_sid(environ, ENV_API_KEY, "api_key", _api_key, problems)
        if api_key is None and _env_value(environ, ENV_API_KEY) is None:
            problems.append(
                (
                    ("api_key",),
                    "is required with an API secret; set twilio.api_key or the environment "
                    f"variable {ENV_API_KEY}",
                )
            )
        secret, failed = _pick_secret(
            value=self.api_secret,
            file=self.api_secret_file,
            value_loc=("api_secret",),
            file_loc=("api_secret_file",),
            env_name=ENV_API_SECRET,
            environ=environ,
            problems=problems,
            warnings=warnings,
        )
        if secret is None and not failed:
            problems.append(
                (
                    ("api_secret",),
                    "an API key needs its secret; set twilio.api_secret, "
                    f"twilio.api_secret_file or the environment variable {ENV_API_SECRET}",
                )
            )
        if api_key is None or secret is None or problems:
            return None
        return BasicCredentials(username=api_key, password=secret, account_sid=account_sid)

    def _oauth2(
        self, environ: Mapping[str, str], problems: list[tuple[Loc, str]], warnings: list[str]
    ) -> OAuth2Credentials | None:
        problems.extend(
            (
                (name,),
                "is a Twilio basic-auth option and cannot be used with "
                "twilio.auth.type oauth2_client_credentials; remove it",
            )
            for name in _BASIC_OPTIONS
            if _is_set(self, name)
        )
        client_id = self.auth.client_id or _env_value(environ, ENV_CLIENT_ID)
        if client_id is None:
            problems.append(
                (
                    ("auth", "client_id"),
                    "is required for oauth2_client_credentials; set twilio.auth.client_id or the "
                    f"environment variable {ENV_CLIENT_ID}",
                )
            )
        secret, failed = _pick_secret(
            value=self.auth.client_secret,
            file=self.auth.client_secret_file,
            value_loc=("auth", "client_secret"),
            file_loc=("auth", "client_secret_file"),
            env_name=ENV_CLIENT_SECRET,
            environ=environ,
            problems=problems,
            warnings=warnings,
        )
        if secret is None and not failed:
            problems.append(
                (
                    ("auth", "client_secret"),
                    "is required for oauth2_client_credentials; set twilio.auth.client_secret, "
                    "twilio.auth.client_secret_file or the environment variable "
                    f"{ENV_CLIENT_SECRET}",
                )
            )
        if client_id is None or secret is None or problems:
            return None
        return OAuth2Credentials(
            token_url=self.auth.token_url,
            client_id=client_id,
            client_secret=secret,
            scope=self.auth.scope,
            refresh_margin=self.auth.refresh_margin,
        )


class PollSettings(_Settings):
    """``poll``: how often and how hard to call the API."""

    interval: Annotated[float, BeforeValidator(_duration_at_least(1))] = 60.0
    page_size: Annotated[int, BeforeValidator(_int_between(1, 1000))] = 100
    concurrency: Annotated[int, BeforeValidator(_int_between(1, 256))] = 8
    requests_per_second: Annotated[float, BeforeValidator(_positive_number)] = 20.0
    max_retries: Annotated[int, BeforeValidator(_int_between(0, 10))] = 4
    backoff_initial: Annotated[float, BeforeValidator(_positive_duration)] = 1.0
    backoff_max: Annotated[float, BeforeValidator(_positive_duration)] = 60.0
    max_pages: Annotated[int, BeforeValidator(_int_between(1, 10000))] = 50
    max_response_bytes: Annotated[int, BeforeValidator(_size_between(_KIB, _GIB))] = 16 * _MIB

    @model_validator(mode="after")
    def _backoff_cap_covers_first_backoff(self) -> Self:
        if self.backoff_max < self.backoff_initial:
            raise _fail_many(
                [
                    (
                        ("backoff_max",),
                        "must not be shorter than poll.backoff_initial "
                        f"({format_duration(self.backoff_initial)}), "
                        f"got {format_duration(self.backoff_max)}",
                    )
                ]
            )
        return self


class SimSettings(_Settings):
    """One entry of ``sims``: a SIM to poll, with an optional display name and constant labels."""

    sid: Annotated[str, BeforeValidator(_sim_sid)]
    name: Annotated[str | None, BeforeValidator(_optional_text)] = None
    labels: Annotated[dict[str, str], BeforeValidator(_labels)] = Field(default_factory=dict)


class DiscoverySettings(_Settings):
    """``discovery``: find SIMs through the API (``GET /v1/Sims?Status=…``) besides ``sims``."""

    enabled: Annotated[bool, BeforeValidator(_strict_bool)] = False
    status: Annotated[tuple[SimStatus, ...], BeforeValidator(_statuses)] = ("active",)
    refresh_interval: Annotated[float, BeforeValidator(_duration_at_least(10))] = 600.0


class MetricsSettings(_Settings):
    """``metrics``: optional parts of the exposition."""

    imei_label: Annotated[bool, BeforeValidator(_strict_bool)] = False


class StateSettings(_Settings):
    """``state``: where to keep state across restarts (optional)."""

    path: Annotated[Path | None, BeforeValidator(_state_path)] = None
    save_interval: Annotated[float, BeforeValidator(_duration_at_least(1))] = 60.0


class ShardSettings(_Settings):
    """``shard``: this replica's part of the fleet when N exporters split it by SIM SID."""

    index: Annotated[int, BeforeValidator(_int_between(0, MAX_SHARDS - 1))] = 0
    count: Annotated[int, BeforeValidator(_int_between(1, MAX_SHARDS))] = 1

    @model_validator(mode="after")
    def _index_below_count(self) -> Self:
        if self.index >= self.count:
            raise _fail_many(
                [(("index",), f"must be less than shard.count ({self.count}), got {self.index}")]
            )
        return self


_NOTHING_TO_POLL: Final = "no SIMs to monitor; list SIMs under sims or set discovery.enabled: true"
_SECTIONS: Final = ("twilio", "poll", "discovery", "metrics", "state", "shard")


class Config(_Settings):
    """The whole configuration. Build it with :func:`load_config` or :func:`config_from_mapping`."""

    twilio: TwilioSettings
    poll: PollSettings
    sims: tuple[SimSettings, ...] = ()
    discovery: DiscoverySettings
    metrics: MetricsSettings
    state: StateSettings
    shard: ShardSettings

    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        """Non-fatal problems found during validation (e.g. a secret file others can read)."""
        return self._warnings

    @model_validator(mode="before")
    @classmethod
    def _absent_sections_are_empty(cls, data: object) -> object:
        # Sections are validated even when absent (or written as an empty "poll:"), so that the
        # credentials of an omitted "twilio" section still resolve from the environment.
        if isinstance(data, Mapping):
            filled = dict(data)
            for section in _SECTIONS:
                if filled.get(section) is None:
                    filled[section] = {}
            if "sims" in filled and filled["sims"] is None:
                filled["sims"] = ()
            return filled
        return data

    @field_validator("sims", mode="before")
    @classmethod
    def _sid_shorthand(cls, value: object) -> object:
        # "- DE…" is accepted as a short form of "- sid: DE…".
        if isinstance(value, list | tuple):
            return [{"sid": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("sims", mode="after")
    @classmethod
    def _unique_sids(cls, sims: tuple[SimSettings, ...]) -> tuple[SimSettings, ...]:
        first_seen: dict[str, int] = {}
        problems: list[tuple[Loc, str]] = []
        for index, sim in enumerate(sims):
            key = sim.sid.upper()
            if key in first_seen:
                problems.append(((index, "sid"), f"duplicate of sims[{first_seen[key]}].sid"))
            else:
                first_seen[key] = index
        if problems:
            raise _fail_many(problems)
        return sims

    @model_validator(mode="after")
    def _something_to_poll(self, info: ValidationInfo) -> Self:
        if not self.sims and not self.discovery.enabled:
            raise _fail_many([(("sims",), _NOTHING_TO_POLL)])
        self._warnings = tuple(_warnings(info))
        return self


# --------------------------------------------------------------------------------------------------
# Turning pydantic errors into lines


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _find_model(model.model_fields[part].annotation)
    return model


def _find_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _find_model(argument)
        if found is not None:
            return found
    return None


def _unknown_option(loc: Sequence[str | int]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown option"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown option (did you mean {close[0]}?)"
    return f"unknown option (valid options: {', '.join(known)})"


def _error_lines(exc: ValidationError, source: str) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        kind = error["type"]
        context = error.get("ctx") or {}
        value = error.get("input")
        secret = bool(loc) and loc[-1] in _SECRET_OPTIONS
        got = _kind(value) if secret else _describe(value)
        if kind == "config_problems":
            for sub_loc, message in context["problems"]:
                lines.append(f"{_dotted(loc + tuple(sub_loc)) or source}: {message}")
            continue
        if kind == "config_value":
            message = str(context["message"])
        elif kind == "extra_forbidden":
            message = _unknown_option(loc)
        elif kind == "invalid_key":
            message = "option names must be strings"
        elif kind == "missing":
            message = "is required"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be a mapping of options, got {_kind(value)}"
        elif kind in ("tuple_type", "list_type"):
            message = f"must be a list, got {got}"
        else:  # not expected (every field has its own validator): pydantic's words, not the value
            message = str(error["msg"])
        lines.append(f"{_dotted(loc) or source}: {message}")
    # keep the order, drop exact repeats
    return list(dict.fromkeys(lines))


# --------------------------------------------------------------------------------------------------
# Loading


def _nothing_to_poll(data: Mapping[Any, Any]) -> bool:
    discovery = data.get("discovery")
    enabled = isinstance(discovery, Mapping) and discovery.get("enabled") is True
    return not data.get("sims") and not enabled


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe YAML loader, refusing duplicate keys (PyYAML would let the last one win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_describe(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def config_from_mapping(
    data: object,
    environ: Mapping[str, str] | None = None,
    source: str = "<config>",
    *,
    base_dir: Path | None = None,
) -> Config:
    """Validate already parsed configuration data.

    ``environ`` supplies credentials the data leaves out (default: ``os.environ``); relative file
    paths are taken relative to ``base_dir`` (default: the current directory). Raises
    :class:`ConfigError`.
    """
    if data is None:
        raise ConfigError([f"{source}: the configuration is empty"], source)
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                f"{source}: the top level must be a mapping of options "
                f"(twilio, poll, sims, discovery, metrics, state, shard), got {_kind(data)}"
            ],
            source,
        )
    context: dict[str, object] = {
        "environ": os.environ if environ is None else environ,
        "base_dir": Path.cwd() if base_dir is None else base_dir,
        "warnings": [],
    }
    problems: list[str] = []
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as exc:
        problems = _error_lines(exc, source)
    # The whole-config check only runs once every section is valid; repeat it on the raw data so
    # that a config with other mistakes hears about it in the same round.
    if _nothing_to_poll(data):
        problems = list(dict.fromkeys([*problems, f"sims: {_NOTHING_TO_POLL}"]))
    # raised outside the except block so that the ValidationError (which holds the raw input,
    # secrets included) is not attached as __context__
    raise ConfigError(problems, source)


def read_yaml_file(path: Path, what: str = "config file") -> object:
    """Read and parse one YAML file (duplicate keys refused). Raises :class:`ConfigError`.

    Errors name only the problem and its position: the snippet PyYAML adds may show a secret.
    """
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        problem = f"cannot read {what}: {exc.strerror or type(exc).__name__}"
    except UnicodeDecodeError as exc:
        problem = f"cannot read {what}: not UTF-8 text (byte {exc.start})"
    else:
        try:
            return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = f"{where}{exc.problem or exc.context or 'invalid YAML'}"
        except yaml.YAMLError as exc:
            problem = f"invalid YAML: {type(exc).__name__}"
    # raised outside the except blocks: no exception context that could carry file contents
    raise ConfigError([f"{source}: {problem}"], source)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate a YAML configuration file. Raises :class:`ConfigError`."""
    path = Path(path)
    data = read_yaml_file(path)
    if data is None:
        raise ConfigError([f"{path}: the configuration file is empty"], str(path))
    return config_from_mapping(data, environ, str(path), base_dir=path.absolute().parent)
