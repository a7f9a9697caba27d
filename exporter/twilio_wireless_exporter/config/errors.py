"""One error path: pydantic's validation errors become ``field.path: what is wrong`` lines.

Validators do not write messages. The types declare the rules (bounds, patterns, literals, strict
types) and the few hand-written checks raise errors of a named kind with their parameters; the
one function :func:`error_lines` words every kind, from the table :data:`WORDING`. A value that
might be a secret is never shown, only its kind or length.
"""

import difflib
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from pydantic import BaseModel, Field, ValidationError, ValidatorFunctionWrapHandler
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

Loc: TypeAlias = tuple[str | int, ...]

#: Options whose values are (or could be pasted) secrets: errors show their kind or length only.
HIDDEN_OPTIONS: Final = frozenset(
    {"auth_token", "api_secret", "client_secret", "account_sid", "api_key", "basic_auth_users"}
)


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


def kind(value: object) -> str:
    """The YAML-ish kind of a value, without the value itself."""
    if value is None:
        return "null"
    for types, name in (
        (bool, "a boolean"),
        (int | float, "a number"),
        (str, "a string"),
        (Mapping, "a mapping"),
        (list | tuple, "a list"),
    ):
        if isinstance(value, types):
            return name
    return f"a value of type {type(value).__name__}"


def describe(value: object) -> str:
    """A short rendering of a non-secret value for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return kind(value)


# --------------------------------------------------------------------------------------------------
# Declaring how a type's errors read

#: Wording of ``string_pattern_mismatch`` by pattern, filled by :func:`shaped`.
_PATTERNS: dict[str, str] = {}


def shaped(pattern: str, wording: str) -> Any:
    """``Field(pattern=...)`` whose mismatch reads ``wording`` (``{got}``: the value, if shown)."""
    _PATTERNS[pattern] = wording
    return Field(pattern=pattern)


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True, slots=True)
class Shown:
    """Annotated metadata: how a field's bounds are written (``1s``, ``1KiB``) in errors."""

    render: Callable[[Any], str] = _number
    above: str = "a number greater than"


def problem(kind: str, loc: Loc = (), value: object = None, **context: object) -> InitErrorDetails:
    """One problem of a named kind (worded by :data:`WORDING`) at ``loc``."""
    return {"type": PydanticCustomError(kind, kind, context), "loc": loc, "input": value}


def fail(problems: list[InitErrorDetails]) -> ValidationError:
    """Several problems at paths relative to the model being validated, to raise from it."""
    return ValidationError.from_exception_data("config", problems, hide_input=True)


def also_report(
    handler: ValidatorFunctionWrapHandler, data: object, extra: list[InitErrorDetails]
) -> Any:
    """Run the model's own validation, reporting ``extra`` problems in the same round."""
    try:
        result = handler(data)
    except ValidationError as exc:
        if not extra:
            raise
        found: list[InitErrorDetails] = [
            {
                "type": PydanticCustomError(e["type"], e["msg"], e.get("ctx")),
                "loc": e["loc"],
                "input": e["input"],
            }
            for e in exc.errors()
        ]
        raise fail(found + extra) from None
    if extra:
        raise fail(extra)
    return result


# --------------------------------------------------------------------------------------------------
# The wording

#: Error kind (pydantic's or ours) -> wording; ``{got}`` is the value as it may be shown.
WORDING: Final[dict[str, str]] = {
    "missing": "is required",
    "invalid_key": "option names must be strings, got {got}",
    "model_type": "must be a mapping of options, got {kind}",
    "dict_type": "must be a mapping of names to values, got {kind}",
    "tuple_type": "must be a list, got {got}",
    "int_type": "must be an integer, got {got}",
    "float_type": "must be a number, got {got}",
    "finite_number": "must be a finite number, got {got}",
    "bool_type": "must be true or false, got {got}",
    "string_type": "must be a string, got {got}; put it in quotes",
    "string_too_short": "must not be empty",
    "literal_error": "must be one of {choices}, got {got}",
    "path_type": "must be a file path, got {got}",
    "byte_size": "must be a size like 16MiB, 512KiB or a number of bytes, got {got}",
    "byte_size_unit": "must be a size like 16MiB, 512KiB or a number of bytes, got {got}",
    "size_fraction": "must be a whole number of bytes, got {got}",
    "path_nul": "must not contain a NUL character",
    "path_home": "cannot expand ~ in {got}: no home directory is known",
    "url": "must be an http or https URL like https://host, got {got}",
    "url_userinfo": "must not contain a user name or password; configure credentials separately",
    "url_query": "must not have a query string or fragment, got {got}",
    "no_directory": "directory {directory} does not exist",
    "is_directory": "{path} is a directory; give the path of a file",
    "not_a_file": "{path} does not exist or is not a file",
    "label_prometheus": "label names starting with __ are reserved for Prometheus",
    "label_exporter": "is a label the exporter sets itself; choose another name",
    "duplicate_sid": "duplicate of sims[{first}].sid",
    "backoff_order": "must not be shorter than poll.backoff_initial ({initial}), got {maximum}",
    "shard_index": "must be less than shard.count ({count}), got {index}",
    "nothing_to_poll": "no SIMs to monitor; list SIMs under sims or set discovery.enabled: true",
    "oauth2_only": "is only used with type: oauth2_client_credentials",
    "basic_with_oauth2": "is a Twilio basic-auth option and cannot be used with "
    "twilio.auth.type oauth2_client_credentials; remove it",
    "env_invalid": "environment variable {name} {problem}",
    "secret_twice": "{option} and {file} are both set; use only one",
    "secret_unreadable": "cannot read {path}: {reason}",
    "secret_large": "{path} is larger than 64 KiB; it must contain only the secret",
    "secret_encoding": "{path} is not UTF-8 text",
    "secret_empty": "{path} is empty",
    "token_and_key": "cannot be combined with twilio.{other}: authenticate either with an API "
    "key (api_key + api_secret) or with the account's auth token, not both",
    "no_credentials": "no Twilio credentials configured; set twilio.account_sid with "
    "twilio.auth_token or twilio.auth_token_file, or twilio.api_key with twilio.api_secret or "
    "twilio.api_secret_file, or the environment variables TWILIO_ACCOUNT_SID and "
    "TWILIO_AUTH_TOKEN (or TWILIO_API_KEY and TWILIO_API_SECRET); for KORE Wireless set "
    "twilio.auth.type: oauth2_client_credentials",
    "sid_required": "is required with an auth token; set twilio.account_sid or the environment "
    "variable TWILIO_ACCOUNT_SID",
    "key_required": "is required with an API secret; set twilio.api_key or the environment "
    "variable TWILIO_API_KEY",
    "key_secret_required": "an API key needs its secret; set twilio.api_secret, "
    "twilio.api_secret_file or the environment variable TWILIO_API_SECRET",
    "oauth2_required": "is required for oauth2_client_credentials; set {options} or the "
    "environment variable {name}",
    "tls_unsupported": "{reason}",
    "required_with": "is required with {other}",
    "client_cert_unverified": "{auth} (a client certificate that is not verified) is not "
    "supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
    "client_ca_required": "is required with client_auth_type {auth}",
    "version_order": "must not be lower than min_version {minimum}",
    "no_pem": "{path} holds no PEM certificate: {reason}",
    "key_unusable": "cannot use {path} with cert_file: {reason} (the key must be the "
    "certificate's, unencrypted, in PEM)",
    "header_choice": "must be one of {choices}, got {got}",
}
_ALIASES: Final = {"int_parsing": "int_type", "float_parsing": "float_type"}


def dotted(loc: Sequence[str | int]) -> str:
    """``sims[0].labels.site`` from a pydantic location (dict-key markers dropped)."""
    text = ""
    for part, following in zip(loc, (*loc[1:], None), strict=True):
        if isinstance(part, int) and following != "[key]":
            text += f"[{part}]"
        elif part != "[key]":
            name = repr(part) if part == "" else str(part)
            text += f".{name}" if text else name
    return text


def error_lines(exc: ValidationError, root: type[BaseModel], source: str) -> list[str]:
    """Our lines for a ValidationError of ``root``, in order, without repeats."""
    lines = [
        f"{dotted(error['loc']) or source}: {explain(error, root)}"
        for error in exc.errors(include_url=False)
    ]
    return list(dict.fromkeys(lines))


def explain(error: ErrorDetails, root: type[BaseModel] | None = None, hidden: bool = False) -> str:
    """What is wrong, worded from the error's kind and context (never from its value if hidden)."""
    loc, value, context = error["loc"], error.get("input"), dict(error.get("ctx") or {})
    name = _ALIASES.get(error["type"], error["type"])
    field = _walk(root, loc)[1]
    if name == "extra_forbidden":
        return _unknown_option(root, loc)
    if name == "value_error":
        return str(context["error"])  # the duration parser's own words
    if name in ("greater_than", "greater_than_equal", "less_than_equal"):
        return _bounds(name, field, context, describe(value))
    if name == "too_short":
        choices = _choices(field.annotation) if field is not None else []
        if isinstance(value, list | tuple) and choices:
            return f"must list at least one of {', '.join(choices)}"
        name = "string_too_short"
    got = _shown(value, hidden or any(part in HIDDEN_OPTIONS for part in loc))
    wording = WORDING.get(name)
    if name == "string_pattern_mismatch":
        wording = _PATTERNS.get(str(context["pattern"]))
    elif name == "literal_error":
        context["choices"] = ", ".join(re.findall(r"'([^']*)'", str(context["expected"])))
    elif name == "tls_unsupported" and field is not None:
        context["reason"] = field.description
    if wording is None:  # not expected: pydantic's words, never the value
        return str(error["msg"])
    return wording.format(got=got, kind=kind(value), **context)


def _shown(value: object, hidden: bool) -> str:
    if hidden:
        return f"a {len(value)}-character value" if isinstance(value, str) else kind(value)
    if isinstance(value, str) and "://" in value and "@" in value:
        return "a URL with credentials"
    return describe(value)


def _bounds(name: str, field: FieldInfo | None, context: dict[str, Any], got: str) -> str:
    metadata = field.metadata if field is not None else []
    shown = next((m for m in metadata if isinstance(m, Shown)), Shown())
    low = next((m.ge for m in metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in metadata if hasattr(m, "le")), None)
    if low is not None and high is not None:
        return f"must be between {shown.render(low)} and {shown.render(high)}, got {got}"
    if name == "greater_than":
        return f"must be {shown.above} {shown.render(context['gt'])}, got {got}"
    if name == "greater_than_equal":
        return f"must be at least {shown.render(context['ge'])}, got {got}"
    return f"must be at most {shown.render(context['le'])}, got {got}"


def _walk(
    root: type[BaseModel] | None, loc: Sequence[str | int]
) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model at ``loc`` and the field ``loc`` ends in (None where the path leaves models)."""
    model, field = root, None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None, None
        field = model.model_fields[part]
        model = _find_model(field.annotation)
    return model, field


def _find_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_find_model, typing.get_args(annotation))), None)


def _choices(annotation: object) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(arg) for arg in typing.get_args(annotation)]
    return next(filter(None, map(_choices, typing.get_args(annotation))), [])


def _unknown_option(root: type[BaseModel] | None, loc: Sequence[str | int]) -> str:
    model = _walk(root, loc[:-1])[0]
    if model is None:
        return "unknown option"
    known = [name for name, field in model.model_fields.items() if not field.exclude]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown option (did you mean {close[0]}?)"
    return f"unknown option (valid options: {', '.join(known)})"
