"""Reading configuration files: YAML (duplicate keys refused) into validated models.

Errors name only the problem and its position; no exception that could carry file contents or
the raw input (secrets included) is chained onto a :class:`ConfigError`.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from twilio_wireless_exporter.config.errors import ConfigError, describe, error_lines, kind
from twilio_wireless_exporter.config.models import Config
from twilio_wireless_exporter.config.types import (
    UnreadableFileError,
    format_size,
    read_regular_file,
)

M = TypeVar("M", bound=BaseModel)

#: Far above any real configuration; a bound so that a wrong path cannot fill the memory.
MAX_FILE_BYTES: Final = 64 * 1024**2


def _construct_unique_mapping(
    self: yaml.constructor.SafeConstructor, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    """The safe loaders' mappings, refusing duplicate keys (PyYAML would let the last win)."""
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
                None, None, f"duplicate key {describe(key)}", key_node.start_mark
            )
    return yaml.constructor.SafeConstructor.construct_mapping(self, node, deep=deep)


class _UniqueKeyLoader(yaml.SafeLoader):
    """The pure-Python safe loader, duplicate keys refused: the messages of every YAML error."""

    construct_mapping = _construct_unique_mapping


_FastLoader: type[Any] = _UniqueKeyLoader
if yaml.__with_libyaml__:

    class _UniqueKeyCLoader(yaml.CSafeLoader):
        """libyaml's parser with the same safe constructor: several times faster on a large
        fleet's file. A file it refuses is parsed again by :class:`_UniqueKeyLoader`, so every
        error reads the same whatever PyYAML was built with."""

        construct_mapping = _construct_unique_mapping

    _FastLoader = _UniqueKeyCLoader


def _parse_yaml(text: str) -> object:
    try:
        return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a safe loader, safe constructor
    except (yaml.YAMLError, RecursionError):
        if _FastLoader is _UniqueKeyLoader:
            raise
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: Path, what: str = "config file") -> object:
    """Read and parse one YAML file (duplicate keys refused). Raises :class:`ConfigError`.

    Errors name only the problem and its position: the snippet PyYAML adds may show a secret.
    """
    try:
        raw, _ = read_regular_file(path, MAX_FILE_BYTES)
        text = raw.decode("utf-8-sig")
    except UnreadableFileError as exc:
        problem = f"cannot read {what}: {exc}"
    except UnicodeDecodeError as exc:
        problem = f"cannot read {what}: not UTF-8 text (byte {exc.start})"
    else:
        if len(raw) > MAX_FILE_BYTES:
            too_large = f"cannot read {what}: larger than {format_size(MAX_FILE_BYTES)}"
            raise ConfigError([f"{path}: {too_large}"], str(path))
        try:
            return _parse_yaml(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = f"{where}{exc.problem or exc.context or 'invalid YAML'}"
        except yaml.YAMLError as exc:
            problem = f"invalid YAML: {type(exc).__name__}"
        except RecursionError:  # PyYAML builds nested collections recursively
            problem = "invalid YAML: nested too deeply"
    raise ConfigError([f"{path}: {problem}"], str(path))


def validate(model: type[M], data: object, source: str, context: dict[str, Any]) -> M:
    """``data`` validated as ``model``; raises :class:`ConfigError` with one line per problem."""
    if not isinstance(data, Mapping):
        options = ", ".join(model.model_fields)
        raise ConfigError(
            [f"{source}: the top level must be a mapping of options ({options}), got {kind(data)}"],
            source,
        )
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        problems = error_lines(exc, model, source)
    raise ConfigError(problems, source)  # outside the except block: no chained raw input


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
    context = {
        "environ": os.environ if environ is None else environ,
        "base_dir": Path.cwd() if base_dir is None else base_dir,
        "warnings": [],
    }
    return validate(Config, data, source, context)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate a YAML configuration file. Raises :class:`ConfigError`."""
    path = Path(path)
    data = read_yaml_file(path)
    if data is None:
        raise ConfigError([f"{path}: the configuration file is empty"], str(path))
    return config_from_mapping(data, environ, str(path), base_dir=path.absolute().parent)
