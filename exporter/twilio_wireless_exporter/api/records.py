"""Typed records of the Twilio Wireless v1 API, decoded and checked once, where they enter.

The shapes follow Twilio's OpenAPI description (``wireless.v1.sim.data_session`` and
``wireless.v1.sim``): every DataSession field is nullable and unknown fields are ignored. The
usage records and rate plans follow KORE's typed schemas (``SIMUsageRecord``, ``UsageRecord``,
``DataUsageDetails``, ``RatePlan``, ...), which type what Twilio's leave untyped; every field is
optional there too, and what a usage record means in bytes is worked out by ``usage.py``.

Plausibility is part of the types, so msgspec checks it while decoding, in C: packet counts are
integers in ``[0, 2**63 - 1]`` (the state file's SQLite INTEGER), timestamps carry a zone,
coordinates lie on the globe, SIDs have their length (a SIM's SID in ``/v1/Sims`` its pattern),
label-like strings are bounded. What a type cannot say, or only at a high price (a timestamp
far outside the API's retention window, a session that ends before it starts or lasts longer
than any session can, a session sid of other characters than letters and digits, a session
listed under another SIM), is checked per record by :func:`session_problem` (and inline by
``client.check_sessions``). A record that fails either check is rejected alone, with a
:class:`RejectReason`; the rest of its listing is used (see ``client.py``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import msgspec

INT64_MAX: Final = 2**63 - 1

#: The earliest timestamp a record may carry: before Twilio's Programmable Wireless existed.
EARLIEST: Final = datetime(2010, 1, 1, tzinfo=UTC)
#: How far past the exporter's wall clock a timestamp may lie (clock skew, simulated clocks).
FUTURE_MARGIN: Final = timedelta(days=400)
#: The longest a data session may last (start to end).
MAX_SESSION_DURATION: Final = timedelta(days=366)

Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Instant = Annotated[datetime, msgspec.Meta(tz=True)]
Latitude = Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)]
Longitude = Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]
Text = Annotated[str, msgspec.Meta(max_length=256)]
"""A string that may become a label value: bounded, so one record cannot bloat ``/metrics``."""
SIM_SID_PATTERN: Final = "^DE[0-9a-fA-F]{32}$"
SimSid = Annotated[str, msgspec.Meta(pattern=SIM_SID_PATTERN)]
"""A SIM's SID, where it names the SIM (``/v1/Sims``): used in URLs and as the ``sim_sid``."""
Sid34 = Annotated[str, msgspec.Meta(min_length=34, max_length=34)]
"""A SID in a DataSession: its length here; ``sim_sid`` must then equal the polled SIM's (see
:func:`session_problem`), and ``account_sid`` is not read. A pattern is checked only where a
SID names a SIM, not once per session: regular expressions dominate the cost of decoding."""
SessionSid = Annotated[str, msgspec.Meta(max_length=64)]
"""Undocumented format (``WN`` and 32 hex digits in practice): ASCII letters and digits, at most
64 of them (the characters are checked by :func:`session_problem`)."""
_SIM_SID: Final = re.compile(SIM_SID_PATTERN)


class RejectReason(enum.StrEnum):
    """Why one record was rejected; the values are the ``reason`` label of
    ``twilio_wireless_api_records_rejected_total``."""

    PACKETS = "packets"  # a packet count that is negative, not an integer or beyond int64
    TIMESTAMP = "timestamp"  # a timestamp without a zone, unparsable or out of the window
    DURATION = "duration"  # a session that ends before it starts, or lasts over a year
    LOCATION = "location"  # coordinates off the globe
    SID = "sid"  # a SID that is not a SID
    FOREIGN_SIM = "foreign_sim"  # a session or usage record of another SIM, in this SIM's listing
    UNITS = "units"  # a usage record in units other than bytes, kilobytes or megabytes
    USAGE = "usage"  # a usage count or plan limit negative, not an integer or beyond int64
    MALFORMED = "malformed"  # any other field of the wrong type or size


@dataclass(frozen=True, slots=True)
class Rejection:
    """One record left out of a listing: why, its ``sid`` when readable, and what was wrong."""

    reason: RejectReason
    sid: str | None
    detail: str


class CellLocation(msgspec.Struct, frozen=True):
    """``cell_location_estimate``: ``{}`` or ``{"lat": ..., "lon": ...}``."""

    lat: Latitude | None = None
    lon: Longitude | None = None


class DataSession(msgspec.Struct, frozen=True):
    sid: SessionSid | None = None
    sim_sid: Sid34 | None = None
    account_sid: Sid34 | None = None
    radio_link: Text | None = None
    operator_mcc: Text | None = None
    operator_mnc: Text | None = None
    operator_country: Text | None = None
    operator_name: Text | None = None
    cell_id: Text | None = None
    cell_location_estimate: CellLocation | None = None
    packets_uploaded: Count | None = None
    packets_downloaded: Count | None = None
    last_updated: Instant | None = None
    start: Instant | None = None
    end: Instant | None = None
    imei: Text | None = None


class PageMeta(msgspec.Struct, frozen=True):
    """``meta`` of a list page. Only ``next_page_url`` drives paging; the other fields are not
    read, so they are not decoded (a hostile value there cannot matter)."""

    next_page_url: str | None = None


class DataSessionPage(msgspec.Struct, frozen=True):
    records: list[DataSession] = msgspec.field(name="data_sessions")
    meta: PageMeta


class Sim(msgspec.Struct, frozen=True):
    sid: SimSid
    unique_name: Text | None = None
    friendly_name: Text | None = None
    status: Text | None = None
    rate_plan_sid: Text | None = None
    account_sid: Text | None = None
    reset_status: Text | None = None  # "resetting" while a connectivity reset runs, else null


class SimPage(msgspec.Struct, frozen=True):
    records: list[Sim] = msgspec.field(name="sims")
    meta: PageMeta


MEBIBYTE: Final = 1024 * 1024
"""Bytes in the megabyte of the plans' limits and of usage records in ``megabytes`` (usage.py)."""
MegabyteLimit = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX // MEBIBYTE)]
"""A rate plan's data limit in megabytes: at most what fits in int64 once in bytes (the API
documents limits of up to 2 TB)."""
Billed = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)]
"""A billed amount: finite and not negative (JSON's ``1e400`` decodes to no such float)."""


class UsageCounts(msgspec.Struct, frozen=True, gc=False):
    """Data counts of one network (KORE's ``DataUsageCounts`` and, with ``country_code``,
    ``InternationalDataUsageCounts``), in ``units``."""

    upload: Count | None = None
    download: Count | None = None
    total: Count | None = None
    units: Text | None = None


class DataUsage(msgspec.Struct, frozen=True):
    """``data`` of a usage record (KORE's ``DataUsageDetails``; untyped in Twilio's file)."""

    upload: Count | None = None
    download: Count | None = None
    total: Count | None = None
    units: Text | None = None
    billed: Billed | None = None
    billing_units: Text | None = None
    home: UsageCounts | None = None
    national_roaming: UsageCounts | None = None
    international_roaming: list[UsageCounts] | None = None


class CommandsUsage(msgspec.Struct, frozen=True, gc=False):
    """``commands`` of a usage record (KORE's ``CommandsUsageDetails``): counts of commands,
    which have no units. The per-network split is not read."""

    from_sim: Count | None = None
    to_sim: Count | None = None
    total: Count | None = None


class TimePeriod(msgspec.Struct, frozen=True, gc=False):
    """``period``: required by KORE's schema, yet Twilio's own example lists ``{}``; a record
    without both ends is rejected by usage.py, not by the decoder."""

    start: Instant | None = None
    end: Instant | None = None


class UsageRecord(msgspec.Struct, frozen=True):
    """One record of ``/v1/Sims/{Sid}/UsageRecords`` (with ``sim_sid``) or ``/v1/UsageRecords``
    (without). ``account_sid`` is not read."""

    period: TimePeriod | None = None
    data: DataUsage | None = None
    commands: CommandsUsage | None = None
    sim_sid: Text | None = None


class UsagePage(msgspec.Struct, frozen=True):
    records: list[UsageRecord] = msgspec.field(name="usage_records")
    meta: PageMeta


class RawUsagePage(msgspec.Struct, frozen=True):
    records: list[msgspec.Raw] = msgspec.field(name="usage_records")
    meta: PageMeta


RATE_PLAN_SID_PATTERN: Final = "^WP[0-9a-fA-F]{32}$"


class RatePlan(msgspec.Struct, frozen=True):
    """One rate plan of ``/v1/RatePlans``; its data limits are megabytes per month (see
    :func:`~.usage.mb_to_bytes`), ``None`` where the plan sets none."""

    sid: Annotated[str, msgspec.Meta(pattern=RATE_PLAN_SID_PATTERN)]
    unique_name: Text | None = None
    friendly_name: Text | None = None
    data_metering: Text | None = None
    data_enabled: bool | None = None
    national_roaming_enabled: bool | None = None
    data_limit: MegabyteLimit | None = None
    national_roaming_data_limit: MegabyteLimit | None = None
    international_roaming_data_limit: MegabyteLimit | None = None
    international_roaming: list[Text] | None = None
    account_sid: Text | None = None


class RatePlanPage(msgspec.Struct, frozen=True):
    records: list[RatePlan] = msgspec.field(name="rate_plans")
    meta: PageMeta


class RawRatePlanPage(msgspec.Struct, frozen=True):
    records: list[msgspec.Raw] = msgspec.field(name="rate_plans")
    meta: PageMeta


class RawSessionPage(msgspec.Struct, frozen=True):
    """A DataSessions page with its records undecoded, to decode them one by one."""

    records: list[msgspec.Raw] = msgspec.field(name="data_sessions")
    meta: PageMeta


class RawSimPage(msgspec.Struct, frozen=True):
    records: list[msgspec.Raw] = msgspec.field(name="sims")
    meta: PageMeta


class SidOnly(msgspec.Struct, frozen=True):
    """The ``sid`` of a rejected record, when it has a readable one (for logs)."""

    sid: str | None = None


class TwilioErrorBody(msgspec.Struct, frozen=True):
    """Twilio's JSON error body; KORE's may differ, so every field is optional."""

    code: int | None = None
    message: str | None = None
    more_info: str | None = None
    status: int | None = None


_FIELD_REASONS: Final = {
    "packets_uploaded": RejectReason.PACKETS,
    "packets_downloaded": RejectReason.PACKETS,
    "start": RejectReason.TIMESTAMP,
    "end": RejectReason.TIMESTAMP,
    "last_updated": RejectReason.TIMESTAMP,
    "cell_location_estimate": RejectReason.LOCATION,
    "sid": RejectReason.SID,
    "sim_sid": RejectReason.SID,
    "account_sid": RejectReason.SID,
    "data_limit": RejectReason.USAGE,
    "national_roaming_data_limit": RejectReason.USAGE,
    "international_roaming_data_limit": RejectReason.USAGE,
}

_USAGE_FIELD_REASONS: Final = {
    "upload": RejectReason.USAGE,
    "download": RejectReason.USAGE,
    "total": RejectReason.USAGE,
    "from_sim": RejectReason.USAGE,
    "to_sim": RejectReason.USAGE,
    "billed": RejectReason.USAGE,
    "units": RejectReason.UNITS,
    "period": RejectReason.TIMESTAMP,
    "start": RejectReason.TIMESTAMP,
    "end": RejectReason.TIMESTAMP,
    "sim_sid": RejectReason.SID,
}


def reason_of(error: msgspec.ValidationError) -> RejectReason:
    """The reason for a record msgspec rejected, from the field its message names
    (``... - at `$.packets_uploaded```)."""
    text = str(error)
    at = text.rfind("`$.")
    if at < 0:
        return RejectReason.MALFORMED
    field = text[at + 3 :].rstrip("`").split(".", 1)[0].split("[", 1)[0]
    return _FIELD_REASONS.get(field, RejectReason.MALFORMED)


def usage_reason_of(error: msgspec.ValidationError) -> RejectReason:
    """The reason for a usage record msgspec rejected, from the innermost field its message
    names: the same names recur at every level (``$.data.home.units``, ``$.period.start``)."""
    text = str(error)
    at = text.rfind("`$.")
    if at < 0:
        return RejectReason.MALFORMED
    field = text[at + 3 :].rstrip("`").rsplit(".", 1)[-1].split("[", 1)[0]
    return _USAGE_FIELD_REASONS.get(field, RejectReason.MALFORMED)


class Window(msgspec.Struct, frozen=True, gc=False):
    """The timestamps a listing may carry: from :data:`EARLIEST` to ``latest``."""

    earliest: datetime
    latest: datetime

    @classmethod
    def around(cls, now: float) -> Window:
        """The window for a listing read at unix time ``now`` (the exporter's wall clock)."""
        return cls(EARLIEST, datetime.fromtimestamp(now, UTC) + FUTURE_MARGIN)


def session_problem(session: DataSession, sim_sid: str, window: Window) -> RejectReason | None:
    """What no type can say about a decoded session, else ``None``.

    ``sim_sid`` is the SIM whose listing it came from (SIDs compare without case, as the
    configuration accepts either case of their hex digits).
    """
    lo, hi = window.earliest, window.latest
    start, end, updated = session.start, session.end, session.last_updated
    if (
        (start is not None and not lo <= start <= hi)
        or (end is not None and not lo <= end <= hi)
        or (updated is not None and not lo <= updated <= hi)
    ):
        return RejectReason.TIMESTAMP
    if start is not None and end is not None and not start <= end <= start + MAX_SESSION_DURATION:
        return RejectReason.DURATION
    sid = session.sid
    if sid and not sid.encode().isalnum():
        return RejectReason.SID
    owner = session.sim_sid
    if owner is not None and owner != sim_sid and owner.lower() != sim_sid.lower():
        return RejectReason.FOREIGN_SIM if _SIM_SID.match(owner) else RejectReason.SID
    return None
