"""One decoded usage record, normalised into bytes: the :class:`Usage` the rest of the exporter
reads, or the :class:`~.records.Rejection` that says why the record cannot be used.

Usage records state their own unit (``data.units``, and again in each per-network count), and
the API has changed units before, so a count is never read without its unit: ``bytes``,
``kilobytes`` or ``megabytes`` (any case; absent or null means bytes), binary multiples all
(factors 1, 1024, 1024**2). Binary because the plans' megabyte limits are converted with the
same factor (:func:`mb_to_bytes`): "percent of the plan's limit" is then a ratio of like units,
whatever the record's unit. A record in any other unit is rejected (``units``), never guessed.

A count that is out of int64 once in bytes is rejected (``usage``), as the state file and the
exposition keep counts as int64; a period that is missing, reversed or outside the window every
timestamp must lie in is rejected (``timestamp``). Each check applies to its record alone.
"""

from __future__ import annotations

from typing import Final

import msgspec

from twilio_wireless_exporter.api.records import (
    INT64_MAX,
    MEBIBYTE,
    Rejection,
    RejectReason,
    UsageCounts,
    UsageRecord,
    Window,
)

UNIT_FACTORS: Final[dict[str, int]] = {"bytes": 1, "kilobytes": 1024, "megabytes": MEBIBYTE}
"""Bytes per unit of a usage record's ``units`` (lower case)."""


class Usage(msgspec.Struct, frozen=True, gc=False):
    """One usage record, in bytes."""

    start: float  # period.start, unix seconds
    end: float  # period.end, >= start
    upload: int  # bytes (data.upload times its unit's factor); absent: 0
    download: int
    total: int  # data.total, else upload + download
    home: int | None  # data.home's total in bytes; None when the record has no home counts
    national_roaming: int | None
    international_roaming: int | None  # sum over data.international_roaming[]; None: absent
    billed: float | None  # data.billed
    billing_units: str  # data.billing_units, or ""
    commands_from_sim: int  # commands.from_sim; absent: 0
    commands_to_sim: int


def mb_to_bytes(megabytes: int) -> int:
    """A rate plan's data limit (megabytes per month, as the API states it) in bytes.

    1 MB = 1,048,576 bytes: the API does not say which megabyte it means, and the same binary
    factor converts usage records reported in ``megabytes`` (:data:`UNIT_FACTORS`), so a SIM's
    usage and its plan's limit are always compared in like units. The decimal reading would put
    the limit about 4.6 % lower; the binary one errs towards alerting late rather than early,
    and docs/metrics.md says so. Limits are bounded where they are decoded
    (:data:`~.records.MegabyteLimit`), so the result fits in int64.
    """
    return megabytes * MEBIBYTE


class _UnusableError(Exception):
    """Raised inside :func:`normalise` only, turned into its :class:`Rejection`."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _factor(units: str | None) -> int:
    if units is None:
        return 1
    factor = UNIT_FACTORS.get(units.lower())
    if factor is None:
        raise _UnusableError(RejectReason.UNITS, f"unknown units {units[:40]!r}")
    return factor


def _bytes(count: int | None, factor: int, name: str) -> int:
    if count is None:
        return 0
    value = count * factor
    if value > INT64_MAX:
        detail = f"{name} of {count} x {factor} bytes exceeds int64"
        raise _UnusableError(RejectReason.USAGE, detail)
    return value


def _network_total(counts: UsageCounts, name: str) -> int | None:
    """Bytes of one network's counts: its ``total``, else upload + download, else ``None``."""
    factor = _factor(counts.units)
    if counts.total is not None:
        return _bytes(counts.total, factor, name)
    if counts.upload is None and counts.download is None:
        return None
    return _sum(_bytes(counts.upload, factor, name), _bytes(counts.download, factor, name), name)


def _sum(a: int, b: int, name: str) -> int:
    value = a + b
    if value > INT64_MAX:
        raise _UnusableError(RejectReason.USAGE, f"{name} exceeds int64")
    return value


def normalise(record: UsageRecord, window: Window) -> Usage | Rejection:
    """The record in bytes, or why it cannot be used; never raises for a decoded record.

    ``window`` bounds the period's timestamps, as for sessions (records are kept 18 months).
    """
    try:
        return _normalise(record, window)
    except _UnusableError as problem:
        return Rejection(problem.reason, None, problem.detail)


def _normalise(record: UsageRecord, window: Window) -> Usage:
    period = record.period
    start = period.start if period is not None else None
    end = period.end if period is not None else None
    if start is None or end is None:
        raise _UnusableError(RejectReason.TIMESTAMP, "a usage record without period start and end")
    if not window.earliest <= start <= end <= window.latest:
        raise _UnusableError(RejectReason.TIMESTAMP, f"usage period {start} .. {end}")
    data = record.data
    commands = record.commands
    upload = download = total = 0
    home = national = international = None
    billed: float | None = None
    billing_units = ""
    if data is not None:
        factor = _factor(data.units)
        upload = _bytes(data.upload, factor, "upload")
        download = _bytes(data.download, factor, "download")
        if data.total is not None:
            total = _bytes(data.total, factor, "total")
        else:
            total = _sum(upload, download, "upload + download")
        if data.home is not None:
            home = _network_total(data.home, "home")
        if data.national_roaming is not None:
            national = _network_total(data.national_roaming, "national_roaming")
        if data.international_roaming is not None:
            international = 0
            for counts in data.international_roaming:
                part = _network_total(counts, "international_roaming")
                if part is not None:
                    international = _sum(international, part, "international_roaming")
        billed = data.billed
        billing_units = data.billing_units or ""
    return Usage(
        start=start.timestamp(),
        end=end.timestamp(),
        upload=upload,
        download=download,
        total=total,
        home=home,
        national_roaming=national,
        international_roaming=international,
        billed=billed,
        billing_units=billing_units,
        commands_from_sim=(commands.from_sim or 0) if commands is not None else 0,
        commands_to_sim=(commands.to_sim or 0) if commands is not None else 0,
    )
