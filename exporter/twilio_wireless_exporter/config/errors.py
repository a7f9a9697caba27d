"""One error path: pydantic's validation errors become ``field.path: what is wrong`` lines.

The types declare most rules (bounds, patterns, literals, strict types), and :func:`explain`
words pydantic's errors from their kind and context; the few hand-written checks raise errors
that carry their own words, where ``{got}`` stands for the value. A value that might be a secret
is never shown, only its kind or length.
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
    if isinstance(value, int) and len(digits := str(abs(value))) > 20:
        return f"a {len(digits)}-digit number"
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


def problem(
    message: str, loc: Loc = (), value: object = None, **context: object
) -> InitErrorDetails:
    """One problem at ``loc``: ``message`` with ``{name}`` filled in from ``context``."""
    return {"type": PydanticCustomError("config", message, context), "loc": loc, "input": value}


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

#: Pydantic's error kinds -> wording; ``{got}`` is the value as it may be shown. The checks of
#: this package raise errors that carry their own wording.
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
    "string_too_long": "must be at most {max_length} characters",
    "literal_error": "must be one of {choices}, got {got}",
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
    got = _shown(value, hidden or any(part in HIDDEN_OPTIONS for part in loc))
    if name == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        return f"is too large, got {got}"  # an integer beyond the range of a float
    if name == "tls_unsupported" and field is not None:
        return str(field.description)
    if name == "literal_error":
        context["choices"] = ", ".join(re.findall(r"'([^']*)'", str(context["expected"])))
    if name in WORDING:
        return WORDING[name].format_map({"got": got, "kind": kind(value), **context})
    if name == "string_pattern_mismatch":
        return _PATTERNS.get(str(context["pattern"]), str(error["msg"])).replace("{got}", got)
    return str(error["msg"]).replace("{got}", got)  # a check of ours, worded where it is


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


def _unknown_option(root: type[BaseModel] | None, loc: Sequence[str | int]) -> str:
    model = _walk(root, loc[:-1])[0]
    if model is None:
        return "unknown option"
    known = [name for name, field in model.model_fields.items() if not field.exclude]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown option (did you mean {close[0]}?)"
    return f"unknown option (valid options: {', '.join(known)})"
