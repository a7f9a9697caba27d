"""A large fleet's configuration loads fast, and the fast ways give what the full ways give.

Two shortcuts serve a file of 100,000 ``sims`` entries (docs/performance.md has the figures):

* YAML: the lean construction of plain documents (``loading._construct_plain``) instead of
  PyYAML's constructor; anything it does not handle goes to the constructor.
* Validation: the ``sims`` list is normalised once (``- DE…`` short form, ``labels: null``)
  instead of by a validator pydantic runs per entry.

Each is checked here against the full way on generated input, valid and invalid.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field, TypeAdapter, ValidationError

from twilio_wireless_exporter import cli
from twilio_wireless_exporter.config import ConfigError, config_from_mapping, load_config, loading
from twilio_wireless_exporter.config.errors import dotted, explain
from twilio_wireless_exporter.config.models import (
    LabelName,
    LabelValue,
    PeriodStartDay,
    Settings,
    SimSettings,
)
from twilio_wireless_exporter.config.types import SimSid, Text

ENV = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "token"}

# --------------------------------------------------------------------------------------------
# YAML: the lean construction against PyYAML's constructor

#: Scalars as YAML 1.1 resolves them: strings that read as numbers, booleans, null or dates,
#: and characters that need quoting.
yaml_text = st.text(
    alphabet=st.sampled_from([*"aZ09 _-:#.,'\"*&!%@`|>[]{}~\\\t\né", "\u00a0", "\x85"]),
    max_size=12,
)
yaml_scalar = st.one_of(
    yaml_text,
    st.sampled_from(
        [
            *("yes", "No", "on", "~", "null", "0x1F", "0o17", "1_000", "1e3", ".inf", "-.nan"),
            *("2026-12-01", "2026-12-01 10:00:00", "12:30:45", "=", "<<", "", "DE" + "a" * 32),
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
yaml_value = st.recursive(
    yaml_scalar,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(yaml_text, st.integers(), st.booleans()), inner, max_size=4)
    ),
    max_leaves=20,
)

#: Lines the lean construction hands to the constructor, or that no loader accepts.
TWISTS = [
    "anchor: &a {k: v}\nalias: *a\n",
    "base: &b {x: 1}\nmerged:\n  <<: *b\n  y: 2\n",
    "inline:\n  <<: {x: 1}\n",
    "dup: 1\ndup: 2\n",
    "tagged: !!str 12\n",
    "binary: !!binary aGVsbG8=\n",
    "set: !!set {a, b}\n",
    "python: !!python/object:os.system ls\n",
    "? [a, b]\n: complex key\n",
    "? {a: b}\n: mapping key\n",
    "star: 'a * b'\n",
    "value_key: {=: x}\n",
    "date: 2026-02-30\n",
    "broken: [\n",
    "---\nsecond: document\n",
    "tab:\n\tindented: x\n",
    "self: &s [*s]\n",
]


def dump(value: object, flow: bool | None) -> str:
    return yaml.safe_dump({"root": value}, default_flow_style=flow, allow_unicode=True)


def full_parse(text: str) -> tuple[str, object]:
    """PyYAML's pure-Python constructor, duplicate keys refused: ``("ok", value)`` or
    ``("error", message)``; the value as ``repr``, so 1, 1.0 and True stay apart."""
    try:
        return "ok", repr(yaml.load(text, Loader=loading._UniqueKeyLoader))
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        return "error", type(exc).__name__


def problems_reading(path: Path) -> list[str]:
    try:
        loading.read_yaml_file(path)
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML was built without libyaml")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=yaml_value,
    flow=st.sampled_from([None, True, False]),
    twists=st.lists(st.sampled_from(TWISTS), max_size=2),
)
def test_the_lean_yaml_construction_gives_what_the_constructor_gives(
    value: object, flow: bool | None, twists: list[str]
) -> None:
    text = dump(value, flow) + "".join(twists)
    expected = full_parse(text)
    try:
        found: tuple[str, object] = "ok", repr(loading._parse_yaml(text))
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        found = "error", type(exc).__name__
    assert found == expected, text


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML was built without libyaml")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=yaml_value, twists=st.lists(st.sampled_from(TWISTS), min_size=1, max_size=2))
def test_yaml_errors_read_the_same_with_and_without_the_lean_construction(
    tmp_path_factory: pytest.TempPathFactory, value: object, twists: list[str]
) -> None:
    path = tmp_path_factory.mktemp("lean") / "config.yaml"
    path.write_text(dump(value, None) + "".join(twists), encoding="utf-8")
    lean = problems_reading(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "_FastLoader", loading._UniqueKeyLoader)  # no lean path at all
        assert problems_reading(path) == lean


@pytest.mark.parametrize(
    ("date", "why"),
    [("2026-02-30", "day is out of range for month"), ("2026-13-01", "month must be in 1..12")],
)
def test_a_date_that_does_not_exist_is_a_config_error(tmp_path: Path, date: str, why: str) -> None:
    """PyYAML reads ``2026-02-30`` as a date and fails with a ValueError: one problem line,
    not a traceback."""
    path = tmp_path / "config.yaml"
    path.write_text(f"sims: [DE{'a' * 32}]\nx-when: {date}\n")
    assert problems_reading(path) == [f"{path}: invalid YAML: {why}"]


def test_plain_documents_take_the_lean_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut is taken for a fleet's file (else the tests above compare nothing)."""
    if not yaml.__with_libyaml__:
        pytest.skip("PyYAML was built without libyaml")
    built: list[object] = []
    real = loading._load_plain

    def spy(text: str) -> object:
        built.append(real(text))  # not reached when the lean path gives up
        return built[-1]

    monkeypatch.setattr(loading, "_load_plain", spy)
    text = "sims:\n  - sid: DE" + "a" * 32 + "\n    labels: {site: berlin, n: 1, on: yes}\n"
    data = loading._parse_yaml(text)
    assert built == [data]
    assert data == {
        "sims": [{"sid": "DE" + "a" * 32, "labels": {"site": "berlin", "n": 1, True: True}}]
    }


def test_the_lean_construction_keeps_no_string_of_the_node_tree() -> None:
    """The strings that stay alive with the configuration are copies, so the node tree's memory
    is freed whole (the reason is in ``loading._detached``)."""
    loader = loading._FastLoader("sims:\n  - sid: DE" + "a" * 32 + "\n    labels: {k: v}\n")
    try:
        root = loader.get_single_node()
        data = loading._construct_plain(loader, root, aliases=False)
    finally:
        loader.dispose()
    assert data == {"sims": [{"sid": "DE" + "a" * 32, "labels": {"k": "v"}}]}
    in_tree = {id(node.value) for node in _scalars(root)}
    built = {id(text) for text in _strings(data)}
    assert len(built) == 6  # sims, sid, labels, k, v and the SID
    assert not in_tree & built


def _scalars(node: yaml.Node) -> list[yaml.ScalarNode]:
    if isinstance(node, yaml.ScalarNode):
        return [node]
    items = (
        node.value if isinstance(node, yaml.SequenceNode) else [n for p in node.value for n in p]
    )
    return [scalar for item in items for scalar in _scalars(item)]


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for k, v in value.items() for text in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


def test_aliases_go_the_constructors_way() -> None:
    """A node reached twice (an alias) is left to PyYAML's constructor, which shares the one
    object between both places; a "*" that is no alias (in a quoted string) stays lean."""
    aliased = "a: &x {k: v}\nb: *x\n"
    with pytest.raises(loading._NotPlainError):
        loading._load_plain(aliased)
    data = loading._parse_yaml(aliased)
    assert isinstance(data, dict)
    assert data["a"] is data["b"]
    assert loading._load_plain("a: 'x * y'\nb: [1, '*']\n") == {"a": "x * y", "b": [1, "*"]}


# --------------------------------------------------------------------------------------------
# Validation: the sims list normalised once against the per-entry rule of every section


class PerEntrySim(Settings):
    """A ``sims`` entry as a section: ``labels: null`` dropped by the per-entry validator that
    every :class:`Settings` runs; the fields are :class:`SimSettings`' own."""

    sid: SimSid
    name: Text | None = None
    labels: dict[LabelName, LabelValue] = Field(default_factory=dict)
    usage_period_start_day: PeriodStartDay | None = None


def test_the_reference_has_the_fields_of_sim_settings() -> None:
    assert PerEntrySim.model_fields.keys() == SimSettings.model_fields.keys()
    for name, field in SimSettings.model_fields.items():
        assert repr(PerEntrySim.model_fields[name]) == repr(field), name


PER_ENTRY = TypeAdapter(PerEntrySim)

sid_text = st.one_of(
    st.builds(
        lambda h: "DE" + h, st.text(alphabet="0123456789abcdefABCDEF", min_size=32, max_size=32)
    ),
    st.sampled_from(
        ["DE" + "a" * 31, "de" + "a" * 32, "DE" + "g" * 32, "DE" + "a" * 32 + "\n", ""]
    ),
)
label_name = st.one_of(
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,6}", fullmatch=True),
    st.sampled_from(["__x", "sim_sid", "status", "job", "9lives", "a-b", "", "ä"]),
)
odd = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.just([]), st.just({})
)
label_value = st.one_of(st.text(max_size=4), odd)
sim_entry = st.one_of(
    sid_text,
    odd,
    st.fixed_dictionaries(
        {"sid": sid_text | odd},
        optional={
            "name": st.one_of(st.text(max_size=4), st.sampled_from([" ", "\t\n", "\x1c"]), odd),
            "labels": st.one_of(
                st.dictionaries(st.one_of(label_name, st.integers()), label_value, max_size=3),
                odd,
            ),
            "extra": odd,
        },
    ),
    st.fixed_dictionaries({"name": st.text(max_size=3)}),  # no sid
)


def per_entry(index: int, entry: object) -> tuple[Any, list[str]]:
    """What the per-entry rule makes of ``entry`` at ``sims[index]``: the model or its lines."""
    data = {"sid": entry} if isinstance(entry, str) else entry
    try:
        return PER_ENTRY.validate_python(data), []
    except ValidationError as exc:
        return None, [
            f"{dotted(('sims', index, *e['loc']))}: {explain(e, PerEntrySim)}"
            for e in exc.errors(include_url=False)
        ]


def same_sim(found: SimSettings, expected: PerEntrySim) -> bool:
    return (
        found.model_dump() == expected.model_dump()
        and found.model_fields_set == expected.model_fields_set
        and type(found.sid) is type(expected.sid)
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(sim_entry, min_size=1, max_size=6))
def test_sims_entries_read_as_each_would_alone(entries: list[object]) -> None:
    """Every entry is accepted, with the same fields (and the same fields set), or refused with
    the same lines, as the per-entry rule would; only the duplicate rule spans entries."""
    expected = [per_entry(i, entry) for i, entry in enumerate(entries)]
    wanted = [line for _, lines in expected for line in lines]
    try:
        config = config_from_mapping({"sims": entries}, ENV)
    except ConfigError as exc:
        found = [line for line in exc.problems if "duplicate of sims[" not in line]
        assert found == list(dict.fromkeys(wanted))
        return
    assert wanted == []
    assert len(config.sims) == len(entries)
    for sim, (model, _) in zip(config.sims, expected, strict=True):
        assert same_sim(sim, model)


def test_null_labels_and_mapping_entries() -> None:
    sid = "DE" + "a" * 32
    entries: list[object] = [
        {"sid": sid, "labels": None},
        _ReadOnly({"sid": "DE" + "b" * 32, "labels": None, "name": "b"}),
        "DE" + "c" * 32,
    ]
    config = config_from_mapping({"sims": entries}, ENV)
    assert [(s.sid, s.name, s.labels, s.model_fields_set) for s in config.sims] == [
        (sid, None, {}, {"sid"}),
        ("DE" + "b" * 32, "b", {}, {"sid", "name"}),
        ("DE" + "c" * 32, None, {}, {"sid"}),
    ]


class _ReadOnly(Mapping[str, object]):
    """A mapping that is not a dict (config_from_mapping's callers may pass one)."""

    def __init__(self, data: dict[str, object]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> object:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------------------------
# The collector during start-up


def test_loading_a_config_leaves_the_collector_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("sims: [DE" + "a" * 32 + "]\n")
    assert gc.isenabled()
    load_config(path, ENV)
    assert gc.isenabled()
    gc.disable()
    try:
        load_config(path, ENV)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.yaml", ENV)
    assert gc.isenabled()


def test_the_command_resumes_the_collector_whatever_it_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "twilio: {account_sid: AC" + "0" * 32 + ", auth_token: t}\nsims: [DE" + "a" * 32 + "]\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("sims: 3\n")
    assert cli.main(["--config", str(good), "--check-config"]) == 0
    assert gc.isenabled()
    assert cli.main(["--config", str(bad), "--check-config"]) == cli.EXIT_CONFIG
    assert gc.isenabled()
    assert "1 SIMs" in capsys.readouterr().out


def test_a_paused_start_up_is_frozen_without_a_second_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collections: list[tuple[int, ...]] = []

    def collect(*generation: int) -> int:
        collections.append(generation)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(gc, "freeze", lambda: None)
    cli.pause_collector()
    try:
        assert not gc.isenabled()
        assert collections == [()]  # the small heap of the imported modules, once
        cli.freeze_startup_heap()
        assert collections == [()]
    finally:
        cli.resume_collector()
    assert gc.isenabled()
    cli.freeze_startup_heap()
    assert collections == [(), ()]  # not paused: collected before freezing


def test_a_large_fleet_file_loads(tmp_path: Path) -> None:
    """10,000 entries in the shapes a fleet's file uses, through the lean paths, read back
    exactly (a smoke check of the shortcuts at size; timing is docs/performance.md's)."""
    sids = [f"DE{i:032x}" for i in range(10_000)]
    lines = ["twilio: {account_sid: AC" + "0" * 32 + ", auth_token: t}", "sims:"]
    for i, sid in enumerate(sids):
        if i % 3 == 0:
            lines.append(f"  - {sid}")
        elif i % 3 == 1:
            lines.append(f"  - sid: {sid}\n    name: 'unit {i}'")
        else:
            lines.append(f"  - {{sid: {sid}, labels: {{site: s{i % 7}, floor: '{i % 4}'}}}}")
    path = tmp_path / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    config = load_config(path, {})
    assert [s.sid for s in config.sims] == sids
    assert config.sims[1].name == "unit 1"
    assert config.sims[2].labels == {"site": "s2", "floor": "2"}
    assert config.sims[0].model_fields_set == {"sid"}
