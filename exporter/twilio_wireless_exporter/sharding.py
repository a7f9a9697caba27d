"""Splitting the fleet over N exporter replicas by a stable hash of the SIM SID.

Replica ``index`` of ``count`` polls exactly the SIMs with ``shard_of(sid, count) == index``: the
shards are disjoint and together cover every SIM, whatever order or subset of SIMs each replica
happens to see. The hash is

* **stable**: the same SID lands on the same shard in every process, on every machine and across
  restarts (BLAKE2b of the case-folded SID, not Python's salted ``hash()``);
* **independent of the poll phase**: the poller spreads SIMs over the interval with another hash
  of the SID (:func:`~twilio_wireless_exporter.polling.poller.sim_offset`); this one is personalised
  differently, so each shard still spreads its SIMs evenly over the whole interval;
* **consistent** (jump consistent hash, Lamping and Veach 2014): going from N to N+1 replicas moves
  only about 1/(N+1) of the SIMs, each to the new replica, instead of reshuffling nearly all of
  them. A SIM that moves starts a new baseline on its new replica.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_SHARDS", "Shard", "jump_hash", "parse_shard", "shard_of", "sid_key"]

_PERSON: Final = b"twx-shard"  # BLAKE2b personalisation: unrelated to the poll-offset hash
_MASK64: Final = (1 << 64) - 1
_SHARD_RE: Final = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
MAX_SHARDS: Final = 10_000


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: a bucket in ``[0, buckets)`` for a 64-bit ``key``."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & _MASK64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def sid_key(sid: str) -> int:
    """A stable 64-bit number derived from the SID (case-insensitive)."""
    digest = hashlib.blake2b(sid.casefold().encode(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big")


def shard_of(sid: str, count: int) -> int:
    """The shard (``0 <= shard < count``) that owns the SIM ``sid``."""
    return jump_hash(sid_key(sid), count)


@dataclass(frozen=True, slots=True)
class Shard:
    """This replica's part of the fleet: shard ``index`` of ``count`` (``0/1``: everything)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ValueError(
                f"the shard count must be between 1 and {MAX_SHARDS}, got {self.count}"
            )
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"the shard index must be between 0 and {self.count - 1} (count {self.count}),"
                f" got {self.index}"
            )

    def owns(self, sid: str) -> bool:
        return self.count == 1 or shard_of(sid, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"INDEX/COUNT"`` (e.g. ``"2/5"``) as a :class:`Shard`. Raises ``ValueError``."""
    match = _SHARD_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"must look like INDEX/COUNT, e.g. 0/3, got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))
