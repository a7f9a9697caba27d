"""Reading configuration files: YAML (duplicate keys refused) into validated models.

Errors name only the problem and its position; no exception that could carry file contents or
the raw input (secrets included) is chained onto a :class:`ConfigError`.

A large fleet's file (100,000 ``sims`` entries) must load in a fraction of a second, so the
common case takes a lean path: libyaml composes the nodes, :func:`_construct_plain` turns the
plain ones (strings, mappings, lists) into Python values without PyYAML's per-node machinery,
and the cyclic garbage collector waits until the file is read and checked (it would otherwise
walk every node built so far, again and again, as the tree grows). Whatever the lean path does
not handle (aliases, merge keys, tags, any error) is done again by PyYAML's own constructor, so
results and messages are the same either way.
"""

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
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


_STR_TAG: Final = "tag:yaml.org,2002:str"
_MAP_TAG: Final = "tag:yaml.org,2002:map"
_SEQ_TAG: Final = "tag:yaml.org,2002:seq"


def _detached(text: str) -> str:
    """``text`` as a string object of its own (``"" + text + ""``, one allocation).

    libyaml's strings are made among the nodes and position marks of the document's tree, and
    the SIDs, names and labels stay alive with the configuration: Python's allocator could then
    never give the tree's memory back (about 1 kB per SIM of a large fleet). Their copies are
    made together, while the tree still stands, and the tree is freed whole.
    """
    return text.join(("", ""))


class _NotPlainError(Exception):
    """The document holds something :func:`_construct_plain` leaves to PyYAML's constructor."""


def _construct_plain(
    loader: yaml.constructor.SafeConstructor, root: yaml.Node, aliases: bool = True
) -> object:
    """The value of a composed document built as the safe constructor would build it, for
    documents of plain nodes: strings, mappings and lists, with other scalars (numbers,
    booleans, null, dates) from the constructor's own functions. Raises :class:`_NotPlainError`
    on a node seen twice (an alias; not looked for when ``aliases`` is false), a key that is
    not a scalar, a duplicate key and any other tag: those go the constructor's way."""
    seen: set[int] = set()
    constructors = loader.yaml_constructors
    scalar, mapping_node, sequence_node = yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode

    def build(node: yaml.Node) -> object:
        if aliases:
            if id(node) in seen:
                raise _NotPlainError
            seen.add(id(node))
        kind, tag = type(node), node.tag
        if kind is scalar:
            if tag == _STR_TAG:
                return _detached(node.value)
            if tag not in constructors:  # merge keys, "=", unknown tags
                raise _NotPlainError
            return loader.construct_object(node, deep=True)
        if kind is mapping_node and tag == _MAP_TAG:
            built: dict[object, object] = {}
            for key_node, value_node in node.value:
                if type(key_node) is not scalar:
                    raise _NotPlainError
                key = build(key_node)
                try:
                    duplicate = key in built
                except TypeError:  # unhashable
                    raise _NotPlainError from None
                if duplicate:
                    raise _NotPlainError
                # the common value, a string, without a call of its own
                if not aliases and type(value_node) is scalar and value_node.tag == _STR_TAG:
                    built[key] = _detached(value_node.value)
                else:
                    built[key] = build(value_node)
            return built
        if kind is sequence_node and tag == _SEQ_TAG:
            return [build(item) for item in node.value]
        raise _NotPlainError

    return build(root)


def _load_plain(text: str) -> object:
    """:func:`_construct_plain` on libyaml's nodes; any failure is :class:`_NotPlainError`."""
    loader = _FastLoader(text)
    try:
        root = loader.get_single_node()
        # an alias is written "*name": without a "*" the document has none
        return None if root is None else _construct_plain(loader, root, aliases="*" in text)
    except Exception:  # the full constructor gives the real result or error
        raise _NotPlainError from None
    finally:
        loader.dispose()


def _parse_yaml(text: str) -> object:
    if _FastLoader is not _UniqueKeyLoader:
        with contextlib.suppress(_NotPlainError):
            return _load_plain(text)
    try:
        return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a safe loader, safe constructor
    except (yaml.YAMLError, RecursionError):
        if _FastLoader is _UniqueKeyLoader:
            raise
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: reading a large file builds millions of objects
    that all stay alive, which the collector would walk on every pass (reference counting
    still frees what is dropped). The previous setting is restored."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
        except ValueError as exc:  # a date that does not exist: 2026-02-30, month 13, ...
            problem = f"invalid YAML: {exc}"
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
    with _cyclic_gc_paused():
        data = read_yaml_file(path)
        if data is None:
            raise ConfigError([f"{path}: the configuration file is empty"], str(path))
        return config_from_mapping(data, environ, str(path), base_dir=path.absolute().parent)
