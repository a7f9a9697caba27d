"""Sharding: N replicas split the SIMs by a stable hash of the SID, disjoint and complete."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tests.harness_support import Harness, MakeHarness
from tests.metrics_support import iter_samples
from twilio_wireless_exporter.cli import main
from twilio_wireless_exporter.config import ConfigError, config_from_mapping
from twilio_wireless_exporter.polling.poller import sim_offset
from twilio_wireless_exporter.sharding import Shard, jump_hash, parse_shard, shard_of, sid_key
from twilio_wireless_simulator import DEMO_ACCOUNT_SID, RunningSimulator


def random_sids(count: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [f"DE{rng.getrandbits(128):032x}" for _ in range(count)]


# ------------------------------------------------------------------------------- the hash


def test_jump_hash_matches_the_published_algorithm() -> None:
    # reference values of Lamping and Veach's jump consistent hash (as other implementations give)
    cases = [(1, 1), (42, 57), (256, 1024), (3735883980, 1), (3735883980, 666)]
    cases.append((16045690984833335023, 255))
    assert [jump_hash(key, buckets) for key, buckets in cases] == [0, 43, 520, 0, 361, 237]
    with pytest.raises(ValueError, match="buckets must be at least 1"):
        jump_hash(1, 0)


def test_the_shard_of_a_sid_never_changes() -> None:
    # pinned: a change here would move SIMs between running replicas on upgrade
    assert sid_key("DE" + "0" * 32) == 12388358119958897224
    assert shard_of("DE" + "0" * 32, 7) == 3
    assert shard_of("DE" + "f" * 32, 7) == 5
    # case-insensitive, so replicas agree whatever case a config uses
    sid = random_sids(1)[0]
    assert shard_of(sid, 5) == shard_of(sid.upper(), 5) == shard_of(sid.lower(), 5)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 16])
def test_shards_are_disjoint_cover_everything_and_are_balanced(count: int) -> None:
    sids = random_sids(4000)
    owners = {sid: [i for i in range(count) if Shard(i, count).owns(sid)] for sid in sids}
    assert all(len(found) == 1 for found in owners.values())  # exactly one owner each
    sizes = Counter(found[0] for found in owners.values())
    assert sorted(sizes) == list(range(count))
    expected = len(sids) / count
    assert all(abs(size - expected) < 0.2 * expected for size in sizes.values()), sizes


@pytest.mark.parametrize("count", [1, 2, 3, 9])
def test_adding_a_replica_moves_only_its_share_to_it(count: int) -> None:
    sids = random_sids(4000)
    moved = [sid for sid in sids if shard_of(sid, count) != shard_of(sid, count + 1)]
    # every SIM that moves goes to the new replica; about 1/(count+1) of them move
    assert {shard_of(sid, count + 1) for sid in moved} == {count}
    expected = len(sids) / (count + 1)
    assert abs(len(moved) - expected) < 0.2 * expected


def test_each_shard_spreads_its_polls_over_the_whole_interval() -> None:
    """The shard hash is independent of the poll-offset hash: no shard polls in a burst."""
    sids = random_sids(4000)
    for index in range(4):
        offsets = [sim_offset(sid) for sid in sids if shard_of(sid, 4) == index]
        quarters = Counter(int(offset * 4) for offset in offsets)
        assert sorted(quarters) == [0, 1, 2, 3]
        assert all(n > 0.2 * len(offsets) for n in quarters.values()), quarters


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", Shard(0, 1)), ("2/3", Shard(2, 3)), (" 4 / 10 ", Shard(4, 10))]
)
def test_parse_shard(text: str, expected: Shard) -> None:
    assert parse_shard(text) == expected
    assert str(expected) == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "the shard index must be between 0 and 2 (count 3), got 3"),
        ("0/0", "the shard count must be between 1 and 10000, got 0"),
        ("1", "must look like INDEX/COUNT, e.g. 0/3, got '1'"),
        ("-1/2", "must look like INDEX/COUNT, e.g. 0/3, got '-1/2'"),
        ("a/b", "must look like INDEX/COUNT, e.g. 0/3, got 'a/b'"),
    ],
)
def test_parse_shard_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_shard(text)
    assert str(info.value) == message


# ------------------------------------------------------------------------------- configuration


def config_data(**shard: object) -> dict[str, object]:
    return {
        "twilio": {"account_sid": DEMO_ACCOUNT_SID, "auth_token": "shard-test-token"},
        "discovery": {"enabled": True},
        "shard": shard,
    }


@pytest.mark.parametrize(
    ("shard", "problem"),
    [
        ({"index": 3, "count": 3}, "shard.index: must be less than shard.count (3), got 3"),
        ({"index": 1}, "shard.index: must be less than shard.count (1), got 1"),
        ({"count": 0}, "shard.count: must be between 1 and 10000, got 0"),
        ({"index": -1, "count": 2}, "shard.index: must be between 0 and 9999, got -1"),
        ({"index": "1", "count": 2}, "shard.index: must be an integer, got '1'"),
        ({"of": 2}, "shard.of: unknown option (valid options: index, count)"),
    ],
)
def test_shard_config_errors(shard: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(config_data(**shard), environ={})
    assert info.value.problems == [problem]


def test_shard_config_default_is_everything() -> None:
    config = config_from_mapping(config_data(), environ={})
    assert (config.shard.index, config.shard.count) == (0, 1)
    config = config_from_mapping(config_data(index=2, count=5), environ={})
    assert (config.shard.index, config.shard.count) == (2, 5)


def test_shard_flag_overrides_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        f"twilio: {{account_sid: {DEMO_ACCOUNT_SID}, auth_token: shard-test-token}}\n"
        "discovery: {enabled: true}\nshard: {index: 0, count: 2}\n"
    )
    assert main(["--config", str(path), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("discovery on, shard 0/2")
    assert "projected API requests per second of shard 0/2" in out
    assert main(["--config", str(path), "--check-config", "--shard", "2/3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("discovery on, shard 2/3")
    assert "projected API requests per second of shard 2/3" in out
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path), "--check-config", "--shard", "3/3"])
    assert info.value.code == 2
    assert (
        "argument --shard: the shard index must be between 0 and 2 (count 3), got 3"
        in capsys.readouterr().err
    )


# ------------------------------------------------------------------------------- replicas


def polled_sids(text: str) -> set[str]:
    return {
        sample.labels["sim_sid"]
        for sample in iter_samples(text)
        if sample.name == "twilio_wireless_sim_up" and sample.value == 1
    }


def requests(text: str, endpoint: str) -> float:
    return sum(
        sample.value
        for sample in iter_samples(text)
        if sample.name == "twilio_wireless_api_requests_total"
        and sample.labels["endpoint"] == endpoint
    )


async def run_poll(h: Harness) -> str:
    # discovery (when on) and the identity of configured SIMs that discovery does not list
    assert await h.exporter.poller.refresh_sims()
    await h.poll()
    return await h.scrape()


async def check_replicas(
    sim: RunningSimulator,
    harness: MakeHarness,
    sids: list[str],
    static: list[str],
    count: int,
    *,
    discovery: bool = False,
    discovered: frozenset[str] = frozenset(),
) -> None:
    """``count`` shards and one unsharded exporter: same SIMs, same data-session requests."""
    sections = {"discovery": {"enabled": True}} if discovery else {}
    whole = await run_poll(await harness(static, **sections))
    assert polled_sids(whole) == set(sids)
    shards = [
        await run_poll(await harness(static, shard={"index": i, "count": count}, **sections))
        for i in range(count)
    ]
    owned = [polled_sids(text) for text in shards]
    assert set().union(*owned) == set(sids)  # together: every SIM
    assert sum(len(part) for part in owned) == len(sids)  # disjoint
    for index, part in enumerate(owned):
        assert part == {sid for sid in sids if shard_of(sid, count) == index}
    # the data-session calls, one per SIM here, are split exactly
    assert sum(requests(text, "data_sessions") for text in shards) == requests(
        whole, "data_sessions"
    )
    assert requests(whole, "data_sessions") == len(sids)
    # Discovery lists every SIM on every replica: one listing each (documented). The identity
    # of a replica's configured SIMs that discovery does not list comes from one more page of
    # the listing (this account fits in one), or from their own read when only one is left.
    undiscovered = set(static) - set(discovered)
    for text, part in zip([whole, *shards], [set(sids), *owned], strict=True):
        mine = len(undiscovered & part)
        assert requests(text, "sim") == (mine if mine < 2 else 0)
        assert requests(text, "sims") == (1 if discovery else 0) + (mine >= 2)
    assert sim.stats.count("data_sessions") == 2 * len(sids)


@pytest.mark.parametrize("count", [2, 3])
async def test_static_sims_are_split(
    sim: RunningSimulator, harness: MakeHarness, count: int
) -> None:
    sids = [sim.fleet.add_sim() for _ in range(12)]
    await check_replicas(sim, harness, sids, static=sids, count=count)


async def test_discovered_sims_are_split(sim: RunningSimulator, harness: MakeHarness) -> None:
    sids = [sim.fleet.add_sim(status="active") for _ in range(12)]
    await check_replicas(
        sim, harness, sids, static=[], count=3, discovery=True, discovered=frozenset(sids)
    )


async def test_static_and_discovered_sims_are_split(
    sim: RunningSimulator, harness: MakeHarness
) -> None:
    discovered = [sim.fleet.add_sim(status="active") for _ in range(9)]
    # suspended SIMs are not discovered (status filter): only the config names them
    configured = [sim.fleet.add_sim(status="suspended") for _ in range(5)]
    static = configured + discovered[:3]
    await check_replicas(
        sim,
        harness,
        discovered + configured,
        static=static,
        count=3,
        discovery=True,
        discovered=frozenset(discovered),
    )
