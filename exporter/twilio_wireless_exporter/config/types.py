"""The value types of the configuration files, each stating its rule once.

YAML gives real booleans and numbers, so the types are strict: a quoted ``"10"`` where a number
belongs is reported, not coerced. Durations and sizes are parsed by hand, exactly (pydantic has no
unit syntax like ``1h30m``, and its ``ByteSize`` rounds ``1.5B`` down silently).
"""

import errno
import math
import os
import re
import stat
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path, PurePath
from typing import Annotated, Final
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ByteSize,
    PlainValidator,
    SecretStr,
    StrictStr,
)
from pydantic import ValidationInfo as Info
from pydantic_core import PydanticCustomError as Problem

from twilio_wireless_exporter.config.errors import Shown, describe, shaped

MAX_DURATION: Final = 365 * 86400.0
_NUMBER: Final = r"(\d+(?:\.\d+)?)"
_DURATION_RE: Final = re.compile(
    "".join(rf"(?:{_NUMBER}{unit})?" for unit in ("w", "d", "h", "m(?!s)", "s", "ms"))
)
_UNITS: Final = tuple(map(Decimal, ("604800", "86400", "3600", "60", "1", "0.001")))
_PLAIN_NUMBER_RE: Final = re.compile(r"\+?(\d+(?:\.\d+)?|\.\d+)")


def _parse_duration_text(text: str) -> Decimal | None:
    if plain := _PLAIN_NUMBER_RE.fullmatch(text):
        return Decimal(plain.group(1))
    match = _DURATION_RE.fullmatch(text)
    if not text or match is None:
        return None
    return sum(
        (Decimal(n) * u for n, u in zip(match.groups(), _UNITS, strict=True) if n), Decimal()
    )


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a duration string (``500ms``, ``5m``, ``1h30m``, ``2d``).

    Units (``w``, ``d``, ``h``, ``m``, ``s``, ``ms``) go from the largest to the smallest, each at
    most once; components may have decimals (``1.5h``). Raises :class:`ValueError` (whose message is
    meant for users) for anything else, including negative, infinite and NaN values.
    """
    hint = f"must be a duration like 30s, 5m or a number of seconds, got {describe(value)}"
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-") and _parse_duration_text(text[1:]) is not None:
            raise ValueError(f"must not be negative, got {describe(value)}")
        parsed = _parse_duration_text(text)
        value = float(parsed) if parsed is not None else math.nan
    elif not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(hint)  # noqa: TRY004 - one exception type for every bad value
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond the range of a float
        seconds = math.inf if value > 0 else -math.inf
    if seconds < 0:
        raise ValueError(f"must not be negative, got {describe(value)}")
    if not math.isfinite(seconds):
        raise ValueError(hint)
    return seconds


def format_duration(seconds: float) -> str:
    """A duration string (e.g. ``1h30m``) that :func:`parse_duration` reads back as ``seconds``."""
    if not 0 <= seconds < math.inf:
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

_SIZE_RE: Final = re.compile(r"(-?)(\d+(?:\.\d+)?)\s*([a-z]*)")
_SIZE_UNITS: Final = {"": 1, **ByteSize.byte_sizes}  # pydantic's units: b, kb, kib, kbit, ...


def format_size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def _size(value: object) -> int:
    number: Decimal | int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip().lower())):
        sign, digits, unit = match.groups()
        if unit in _SIZE_UNITS:
            number = Decimal(f"{sign}{digits}") * Decimal(_SIZE_UNITS[unit])
    if number is None:
        raise Problem("size", "must be a size like 16MiB, 512KiB or a number of bytes, got {got}")
    if number < 0:
        raise Problem("negative", "must not be negative, got {got}")
    if number != int(number):
        raise Problem("size_fraction", "must be a whole number of bytes, got {got}")
    return int(number)


#: Bytes, written as an integer or with a unit (``16MiB``, ``512KiB``, ``1MB``).
Size = Annotated[int, PlainValidator(_size), Shown(format_size)]

Text = Annotated[StrictStr, shaped(r"\S", "must not be empty")]


def _not_blank(secret: SecretStr) -> SecretStr:
    if not secret.get_secret_value().strip():
        raise Problem("string_too_short", "")
    return secret


Secret = Annotated[SecretStr, AfterValidator(_not_blank)]


def _sid(prefix: str) -> PlainValidator:
    shape = f"{prefix} followed by 32 hex digits"
    matches = re.compile(rf"{prefix}[0-9a-fA-F]{{32}}").fullmatch  # once per entry of sims

    def check(value: object) -> str:
        if not isinstance(value, str):
            raise Problem("sid_type", f"must be a string like {shape}, got {{got}}")
        if not matches(value):
            raise Problem("sid_shape", f"must look like {shape}, got {{got}}")
        return value

    return PlainValidator(check)


AccountSid = Annotated[str, _sid("AC")]
ApiKey = Annotated[str, _sid("SK")]
SimSid = Annotated[str, _sid("DE")]


def _http_url(value: object) -> str:
    bad = Problem("url", "must be an http or https URL like https://host, got {got}")
    if not isinstance(value, str):
        raise bad
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for an invalid port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    if parts.username is not None or parts.password is not None:
        message = "must not contain a user name or password; configure credentials separately"
        raise Problem("url_userinfo", message)
    if parts.query or parts.fragment:
        raise Problem("url_query", "must not have a query string or fragment, got {got}")
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


def _path(value: object, info: Info) -> Path:
    if not isinstance(value, str | PurePath):
        raise Problem("path_type", "must be a file path, got {got}")
    if not str(value).strip():
        raise Problem("string_too_short", "")
    if "\x00" in str(value):
        raise Problem("path_nul", "must not contain a NUL character")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~" with no home directory to expand it to
        raise Problem("path_home", "cannot expand ~ in {got}: no home directory is known") from None
    return path if path.is_absolute() else base_dir(info) / path


#: A file path; relative paths are relative to the configuration file.
ConfigPath = Annotated[Path, PlainValidator(_path)]


def file_status(path: Path) -> os.stat_result | None:
    """``path``'s status, or None if nothing is there; a path the system refuses is a problem."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise Problem(
            "path_unusable", "cannot use {path}: {reason}", {"path": str(path), "reason": reason}
        ) from None


def _existing_file(path: Path) -> Path:
    found = file_status(path)
    if found is None or not stat.S_ISREG(found.st_mode):
        raise Problem("not_a_file", "{path} does not exist or is not a file", {"path": str(path)})
    return path


ExistingFile = Annotated[ConfigPath, AfterValidator(_existing_file)]


def readable_by_others(where: str, path: Path, mode: int) -> list[str]:
    """The warning for a secret file that group or others may read, if it is one."""
    if not mode & 0o077:
        return []
    return [f"{where}: {path} is readable by other users (mode {mode & 0o777:04o}); chmod 600 it"]


class UnreadableFileError(Exception):
    """A file that :func:`read_regular_file` refused; the message is meant for users."""


def read_regular_file(path: Path, limit: int) -> tuple[bytes, int]:
    """At most ``limit + 1`` bytes of a regular file and its mode, never waiting on a FIFO."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with os.fdopen(descriptor, "rb") as handle:
            mode = os.fstat(descriptor).st_mode
            if not stat.S_ISREG(mode):
                reason = os.strerror(errno.EISDIR) if stat.S_ISDIR(mode) else "not a regular file"
                raise UnreadableFileError(reason)
            return handle.read(limit + 1), mode
    except OSError as exc:
        raise UnreadableFileError(exc.strerror or type(exc).__name__) from None
