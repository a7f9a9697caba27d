"""The value types of the configuration files, each stating its rule once.

YAML gives real booleans and numbers, so the types are strict: a quoted ``"10"`` where a number
belongs is reported, not coerced. Only durations are parsed by hand (pydantic has no unit syntax
like ``1h30m``); sizes use :class:`pydantic.ByteSize`, guarded against its silent rounding.
"""

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path, PurePath
from typing import Annotated, Final
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ByteSize, PlainValidator, SecretStr, StrictStr
from pydantic import ValidationInfo as Info
from pydantic_core import PydanticCustomError

from twilio_wireless_exporter.config.errors import Shown, describe, shaped

MAX_DURATION: Final = 365 * 86400.0

# --------------------------------------------------------------------------------------------------
# Durations

_UNITS: Final[dict[str, Decimal]] = {
    "w": Decimal(604800),
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_ORDER: Final = tuple(_UNITS)
_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|[wdhms])")
_NUMBER_RE: Final = re.compile(r"\+?\d+(?:\.\d+)?|\+?\.\d+")


def _parse_duration_text(text: str) -> Decimal | None:
    if _NUMBER_RE.fullmatch(text):
        return Decimal(text.lstrip("+"))
    total, position, last_rank = Decimal(0), 0, -1
    while position < len(text):
        match = _PART_RE.match(text, position)
        if match is None:
            return None
        rank = _ORDER.index(match.group(2))
        if rank <= last_rank:  # units go from the largest to the smallest, each at most once
            return None
        last_rank = rank
        total += Decimal(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return total if position > 0 else None


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a duration string (``500ms``, ``5m``, ``1h30m``, ``2d``).

    Units (``w``, ``d``, ``h``, ``m``, ``s``, ``ms``) go from the largest to the smallest, each at
    most once; components may have decimals (``1.5h``). Raises :class:`ValueError` (whose message is
    meant for users) for anything else, including negative, infinite and NaN values.
    """
    hint = f"must be a duration like 30s, 5m or a number of seconds, got {describe(value)}"
    negative = f"must not be negative, got {describe(value)}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(hint) from None
        if math.isnan(seconds) or math.isinf(seconds):
            raise ValueError(hint)
        if seconds < 0:
            raise ValueError(negative)
        return seconds
    if not isinstance(value, str):
        raise ValueError(hint)  # noqa: TRY004 - one exception type for every bad value
    text = value.strip()
    if text.startswith("-") and _parse_duration_text(text[1:]) is not None:
        raise ValueError(negative)
    parsed = _parse_duration_text(text)
    if parsed is None or math.isinf(float(parsed)):
        raise ValueError(hint)
    return float(parsed)


def format_duration(seconds: float) -> str:
    """A duration string (e.g. ``1h30m``) that :func:`parse_duration` reads back as ``seconds``."""
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    millis = round(seconds * 1000)
    if millis / 1000 != seconds:
        return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most {format_duration(MAX_DURATION)}, got {describe(value)}")
    return seconds


#: Seconds, written as a number or a duration string; bounds come with each field.
Duration = Annotated[float, BeforeValidator(_duration), Shown(format_duration, "longer than")]

# --------------------------------------------------------------------------------------------------
# Sizes

_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")


def format_size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def _exact_size(value: object) -> object:
    """Refuse what ByteSize would take silently: ``true`` (1 byte), ``1.5`` and ``"1.5B"`` (both
    rounded down to 1), negative numbers, and text after the unit."""
    if isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        factor = ByteSize.byte_sizes.get(match.group(2).lower() or "b", 1)
        if Decimal(match.group(1)) * Decimal(factor) % 1:
            raise PydanticCustomError("size_fraction", "")
    elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PydanticCustomError("byte_size", "")
    return value


#: Bytes, written as an integer or with a unit (``16MiB``, ``512KiB``, ``1MB``).
Size = Annotated[ByteSize, BeforeValidator(_exact_size), Shown(format_size)]

# --------------------------------------------------------------------------------------------------
# Text, secrets, identifiers, URLs and paths

Text = Annotated[StrictStr, shaped(r"\S", "must not be empty")]


def _not_blank(secret: SecretStr) -> SecretStr:
    if not secret.get_secret_value().strip():
        raise PydanticCustomError("string_too_short", "")
    return secret


Secret = Annotated[SecretStr, AfterValidator(_not_blank)]


def _sid(prefix: str) -> object:
    return shaped(
        rf"^{prefix}[0-9a-fA-F]{{32}}$",
        f"must look like {prefix} followed by 32 hex digits, got {{got}}",
    )


AccountSid = Annotated[StrictStr, _sid("AC")]
ApiKey = Annotated[StrictStr, _sid("SK")]
SimSid = Annotated[StrictStr, _sid("DE")]


def _http_url(value: object) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("url", "")
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for an invalid port
    except ValueError:
        raise PydanticCustomError("url", "") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PydanticCustomError("url", "")
    if parts.username is not None or parts.password is not None:
        raise PydanticCustomError("url_userinfo", "")
    if parts.query or parts.fragment:
        raise PydanticCustomError("url_query", "")
    return value.strip().rstrip("/")


#: An http(s) URL without credentials, query or fragment, kept as text without a trailing slash.
HttpUrl = Annotated[str, PlainValidator(_http_url)]


def base_dir(info: Info) -> Path:
    """The directory relative paths start from (the config file's; passed in the context)."""
    base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
    return Path(base) if isinstance(base, str | PurePath) else Path.cwd()


def warnings_of(info: Info) -> list[str]:
    """The list non-fatal problems are collected in (passed in the context)."""
    if not isinstance(info.context, dict):
        return []
    found: list[str] = info.context.setdefault("warnings", [])
    return found


def _absolute(path: Path, info: Info) -> Path:
    if "\x00" in str(path):
        raise PydanticCustomError("path_nul", "")
    try:
        path = path.expanduser()
    except RuntimeError:  # "~" with no home directory to expand it to
        raise PydanticCustomError("path_home", "") from None
    return path if path.is_absolute() else base_dir(info) / path


#: A file path; relative paths are relative to the configuration file.
ConfigPath = Annotated[Path, AfterValidator(_absolute)]
