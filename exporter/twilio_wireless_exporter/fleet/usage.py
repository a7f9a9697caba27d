"""Usage accounting: the pure core of the data and command counters, and the metering period.

The API reports usage per time bucket (a day per SIM, an hour for the account), late (24 to 48
hours) and revised upward while it is processed. A :class:`UsageLedger` folds successive reads
of a window of buckets into counters that never count anything twice and never go down:

* The first successful read is the *baseline*: its buckets are remembered, not counted.
* Afterwards a bucket seen for the first time counts whole; a known bucket counts by how much it
  grew since it was last seen (its remembered value is the largest seen). A bucket reported
  lower than before (an upstream glitch) contributes nothing and is not counted again later.
* The counters follow the buckets the API still revises (today and ``revision_days`` days
  before, :func:`counting_start`). Older buckets are forgotten, and the ledger's :attr:`floor`
  (the start of the oldest bucket it answers for) only moves forward: a bucket older than the
  floor is ignored, so it is never counted twice. Memory per SIM is a few buckets.
* Counters saturate at ``2**63 - 1`` (the state file's integers).

The metering period (:func:`period_start`) starts at 00:00 UTC on the configured day of the
month: the API does not say on which day a SIM was activated.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from twilio_wireless_exporter.api.records import INT64_MAX
from twilio_wireless_exporter.api.usage import Usage
from twilio_wireless_exporter.fleet.accounting import add_saturating

DAY = 86400


class Bucket(msgspec.Struct, gc=False, array_like=True):
    """The largest values seen of one time bucket, in bytes and commands."""

    upload: int = 0
    download: int = 0
    commands_from_sim: int = 0
    commands_to_sim: int = 0


class UsageLedger(msgspec.Struct, gc=False):
    """Counters of one SIM's (or the account's) usage. Counters only ever grow."""

    baselined: bool = False
    floor: int = 0
    """Buckets starting before this unix time are ignored (see the module docstring)."""
    buckets: dict[int, Bucket] = msgspec.field(default_factory=dict)
    upload_total: int = 0
    download_total: int = 0
    commands_from_sim_total: int = 0
    commands_to_sim_total: int = 0


class PeriodUsage(msgspec.Struct, frozen=True, gc=False):
    """A SIM's usage in its current metering period, as the API reports it now."""

    start: float
    upload: int = 0
    download: int = 0
    total: int = 0
    home: int | None = None
    national_roaming: int | None = None
    international_roaming: int | None = None
    billed: float | None = None
    billing_units: str = ""


@dataclass(slots=True)
class UsageOutcome:
    """What one read changed (for logs and tests)."""

    upload: int = 0
    download: int = 0
    commands_from_sim: int = 0
    commands_to_sim: int = 0
    new_buckets: int = 0
    ignored: int = 0
    """Records before the ledger's floor, left out."""


#: One object per bucket start (and floor) for every ledger: the same few days recur in
#: every SIM's ledger, and each read would otherwise keep an int of its own per bucket.
_INSTANTS: dict[int, int] = {}
_INSTANTS_MAX = 4096


def _instant(value: int) -> int:
    if type(value) is not int:  # a float or bool would find an equal int of another type
        return value
    found = _INSTANTS.get(value)
    if found is None:
        if len(_INSTANTS) >= _INSTANTS_MAX:  # odd starts from a misbehaving API: start over
            _INSTANTS.clear()
        found = _INSTANTS[value] = value
    return found


def _latest(records: Iterable[Usage], floor: int) -> tuple[dict[int, Bucket], int]:
    """The records as buckets by start (repeats keep their largest values) and the count of
    records before ``floor``."""
    buckets: dict[int, Bucket] = {}
    ignored = 0
    for record in records:
        key = _instant(int(record.start))
        if key < floor:
            ignored += 1
            continue
        seen = buckets.get(key)
        if seen is None:
            buckets[key] = Bucket(
                record.upload, record.download, record.commands_from_sim, record.commands_to_sim
            )
        else:
            seen.upload = max(seen.upload, record.upload)
            seen.download = max(seen.download, record.download)
            seen.commands_from_sim = max(seen.commands_from_sim, record.commands_from_sim)
            seen.commands_to_sim = max(seen.commands_to_sim, record.commands_to_sim)
    return buckets, ignored


def apply_usage(ledger: UsageLedger, records: Iterable[Usage], window_start: int) -> UsageOutcome:
    """Fold one successful read of the buckets from ``window_start`` on into ``ledger``."""
    window_start = _instant(window_start)
    if not ledger.baselined:
        ledger.floor = max(ledger.floor, window_start)
    fresh, ignored = _latest(records, ledger.floor)
    outcome = UsageOutcome(ignored=ignored)
    known = ledger.buckets
    counting = ledger.baselined
    for key, new in fresh.items():
        old = known.get(key)
        if old is None:
            known[key] = new
            outcome.new_buckets += 1
            if counting:
                outcome.upload += new.upload
                outcome.download += new.download
                outcome.commands_from_sim += new.commands_from_sim
                outcome.commands_to_sim += new.commands_to_sim
            continue
        if new.upload > old.upload:
            outcome.upload += new.upload - old.upload
            old.upload = new.upload
        if new.download > old.download:
            outcome.download += new.download - old.download
            old.download = new.download
        if new.commands_from_sim > old.commands_from_sim:
            outcome.commands_from_sim += new.commands_from_sim - old.commands_from_sim
            old.commands_from_sim = new.commands_from_sim
        if new.commands_to_sim > old.commands_to_sim:
            outcome.commands_to_sim += new.commands_to_sim - old.commands_to_sim
            old.commands_to_sim = new.commands_to_sim
    # Forget what left the window; the floor follows, so it is never counted again.
    if window_start > ledger.floor:
        ledger.floor = window_start
        for key in [key for key in known if key < window_start]:
            del known[key]
    ledger.baselined = True
    ledger.upload_total = add_saturating(ledger.upload_total, outcome.upload)
    ledger.download_total = add_saturating(ledger.download_total, outcome.download)
    ledger.commands_from_sim_total = add_saturating(
        ledger.commands_from_sim_total, outcome.commands_from_sim
    )
    ledger.commands_to_sim_total = add_saturating(
        ledger.commands_to_sim_total, outcome.commands_to_sim
    )
    return outcome


def _sum(values: Iterable[int | None]) -> int | None:
    total: int | None = None
    for value in values:
        if value is not None:
            total = value if total is None else min(INT64_MAX, total + value)
    return total


def period_usage(records: Iterable[Usage], start: float) -> PeriodUsage:
    """The usage of the period beginning at ``start``: the sum of the records from then on."""
    inside = [record for record in records if record.start >= start]
    billed = [record.billed for record in inside if record.billed is not None]
    units = next((record.billing_units for record in inside if record.billing_units), "")
    return PeriodUsage(
        start=start,
        upload=min(INT64_MAX, sum(record.upload for record in inside)),
        download=min(INT64_MAX, sum(record.download for record in inside)),
        total=min(INT64_MAX, sum(record.total for record in inside)),
        home=_sum(record.home for record in inside),
        national_roaming=_sum(record.national_roaming for record in inside),
        international_roaming=_sum(record.international_roaming for record in inside),
        billed=sum(billed) if billed else None,
        billing_units=units,
    )


def period_start(now: float, day: int) -> float:
    """Unix time of 00:00 UTC on the latest ``day`` of a month (1..28) not after ``now``."""
    moment = datetime.fromtimestamp(now, UTC)
    year, month = moment.year, moment.month
    if moment.day < day:
        month -= 1
        if month == 0:
            year, month = year - 1, 12
    day = min(day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC).timestamp()


def counting_start(now: float, revision_days: int) -> int:
    """Start of the buckets the counters follow: today and the ``revision_days`` whole days
    before it, the ones the API still revises. Older days are final: the ledger forgets them,
    which keeps a SIM's ledger to a few buckets."""
    today = int(now) - int(now) % DAY
    return today - revision_days * DAY


def window_start(now: float, period: float, revision_days: int) -> int:
    """Start of the buckets to read: the period's start (for the period's usage), or earlier
    so that the days the counters follow are read too (see :func:`counting_start`)."""
    return int(min(period, counting_start(now, revision_days)))
