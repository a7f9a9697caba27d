"""The simulated fleet: SIMs whose devices open and close data sessions over simulated time.

Everything here is pure and deterministic: no I/O, no reading of the wall clock except through
:class:`SimClock` in accelerated mode. The same seed gives the same SIMs, the same session
timelines and the same listings at the same simulated time, no matter how often or in which
steps the clock was advanced.

Generated SIMs draw an endless timeline of sessions from a per-SIM RNG, lazily, up to the
current simulated time. Scripted SIMs (:meth:`Fleet.add_sim`) only have the sessions a test
creates with :meth:`Fleet.open_session` and friends.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import msgspec

from .fleet_usage import FleetUsage
from .lifecycle import Episode, Lifecycle
from .plans import RatePlanView, make_plans
from .usage import (
    UNIT_FACTORS,
    Revision,
    Series,
    UsageTotals,
    UsageView,
)

__all__ = [
    "COUNTRIES",
    "DEFAULT",
    "DEFAULT_OPERATOR",
    "DEFAULT_START_TIME",
    "EMPTY_LOCATION",
    "RADIO_LINKS",
    "SIM_STATUSES",
    "UNKNOWN_OPERATOR",
    "Country",
    "Episode",
    "Fleet",
    "Operator",
    "OperatorLike",
    "RatePlanView",
    "SessionView",
    "SimClock",
    "SimView",
    "UsageTotals",
    "UsageView",
    "format_time",
    "luhn_check_digit",
]

#: 2026-01-01T00:00:00Z: the start of simulated time for a manual clock.
DEFAULT_START_TIME: Final = 1767225600.0

#: ``sim_enum_status`` from the OpenAPI description.
SIM_STATUSES: Final = (
    "new",
    "ready",
    "active",
    "suspended",
    "deactivated",
    "canceled",
    "scheduled",
    "updating",
)

#: Values of ``radio_link`` that Twilio reports.
RADIO_LINKS: Final = ("2G", "3G", "4G", "LTE", "LTE-M", "NB-IoT")

#: ``cell_location_estimate`` when the location is unknown.
EMPTY_LOCATION: Final[Mapping[str, float]] = MappingProxyType({})


class _Default(enum.Enum):
    TOKEN = 0


#: Sentinel for "use the default" (or "leave unchanged") in the scripting methods.
DEFAULT: Final = _Default.TOKEN


# --------------------------------------------------------------------------------------------
# Clock
# --------------------------------------------------------------------------------------------


class SimClock:
    """Simulated unix time.

    * Manual (``speed=None``): time only moves through :meth:`advance` and :meth:`set`; it starts
      at ``start`` (default :data:`DEFAULT_START_TIME`).
    * Accelerated (``speed=60.0``): ``start + speed * elapsed wall time`` (plus any manual
      adjustments), starting at ``start`` (default: the real time now). ``wall`` is the
      monotonic wall clock (injectable for tests). ``wall_start`` is the real unix time at which
      the clock starts (default: the real time now), the origin of :meth:`wall_time`.
    """

    def __init__(
        self,
        start: float | None = None,
        *,
        speed: float | None = None,
        wall: Callable[[], float] = time.monotonic,
        wall_start: float | None = None,
    ) -> None:
        if speed is not None and not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if speed is None and wall_start is not None:
            raise ValueError("wall_start needs an accelerated clock (speed); a manual one has none")
        self._speed = speed
        self._wall = wall
        self._wall_start: float | None = None
        if speed is not None:
            self._wall_start = time.time() if wall_start is None else float(wall_start)
        if start is None:
            start = DEFAULT_START_TIME if self._wall_start is None else self._wall_start
        self._start = float(start)
        self._wall0 = wall() if speed is not None else 0.0
        self._offset = 0.0

    @property
    def speed(self) -> float | None:
        return self._speed

    @property
    def manual(self) -> bool:
        return self._speed is None

    @property
    def start_time(self) -> float:
        return self._start

    @property
    def wall_start_time(self) -> float | None:
        """The real unix time at which an accelerated clock started (``None`` when manual)."""
        return self._wall_start

    def wall_time(self, t: float) -> float:
        """The real unix time that simulated time ``t`` corresponds to, on an accelerated clock:
        ``wall_start + (t - start) / speed``.

        A fixed mapping (manual adjustments through :meth:`advance` and :meth:`set` do not move
        it): simulated time before the start maps to the recent past, compressed by ``speed``
        like everything else.
        """
        if self._speed is None or self._wall_start is None:
            raise ValueError("a manual SimClock has no wall time")
        return self._wall_start + (t - self._start) / self._speed

    def now(self) -> float:
        """The current simulated unix time in seconds."""
        if self._speed is None:
            return self._start + self._offset
        return self._start + self._offset + (self._wall() - self._wall0) * self._speed

    def time(self) -> float:
        """Alias of :meth:`now`."""
        return self.now()

    def advance(self, seconds: float) -> float:
        """Move simulated time forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError("a SimClock does not go backwards; use set() for that")
        self._offset += seconds
        return self.now()

    def set(self, t: float) -> None:
        """Jump to simulated time ``t`` (going backwards is allowed but sessions that already
        aged out of retention do not come back)."""
        self._offset += t - self.now()


# --------------------------------------------------------------------------------------------
# Static reference data
# --------------------------------------------------------------------------------------------


class Operator(NamedTuple):
    """A mobile network as the DataSession reports it (``None`` fields are JSON null)."""

    mcc: str | None
    mnc: str | None
    country: str | None
    name: str | None


#: The operator fields when Twilio could not identify the network: all empty strings.
UNKNOWN_OPERATOR: Final = Operator("", "", "", "")

#: An :class:`Operator` or a plain (mcc, mnc, country, name) tuple.
OperatorLike = Operator | tuple[str | None, str | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class Country:
    iso3: str
    operators: tuple[Operator, ...]
    #: (lat, lon) of a few cities where devices live.
    cities: tuple[tuple[float, float], ...]


def _country(
    iso3: str, mcc: str, nets: Sequence[tuple[str, str]], cities: Sequence[tuple[float, float]]
) -> Country:
    return Country(iso3, tuple(Operator(mcc, mnc, iso3, name) for mnc, name in nets), tuple(cities))


COUNTRIES: Final[tuple[Country, ...]] = (
    _country(
        "DEU",
        "262",
        [("01", "Telekom"), ("02", "Vodafone"), ("03", "O2")],
        [(52.520, 13.405), (48.137, 11.575), (53.551, 9.994), (50.110, 8.682), (50.938, 6.960)],
    ),
    _country(
        "USA",
        "310",
        [("410", "AT&T"), ("260", "T-Mobile"), ("004", "Verizon")],
        [
            (40.713, -74.006),
            (41.878, -87.630),
            (34.052, -118.244),
            (32.777, -96.797),
            (47.606, -122.332),
        ],
    ),
    _country(
        "GBR",
        "234",
        [("15", "Vodafone"), ("30", "EE"), ("10", "O2")],
        [(51.507, -0.128), (53.480, -2.242), (52.486, -1.890), (55.953, -3.188)],
    ),
    _country(
        "FRA",
        "208",
        [("01", "Orange"), ("10", "SFR"), ("20", "Bouygues Telecom")],
        [(48.857, 2.352), (45.764, 4.836), (43.296, 5.370), (44.838, -0.579)],
    ),
    _country(
        "NLD",
        "204",
        [("08", "KPN"), ("16", "Odido"), ("04", "Vodafone")],
        [(52.370, 4.895), (51.924, 4.478), (52.091, 5.122)],
    ),
    _country(
        "JPN",
        "440",
        [("10", "NTT DOCOMO"), ("20", "SoftBank")],
        [(35.676, 139.650), (34.694, 135.502), (43.062, 141.354)],
    ),
    _country(
        "BRA",
        "724",
        [("05", "Claro"), ("06", "Vivo"), ("02", "TIM")],
        [(-23.551, -46.633), (-22.907, -43.173), (-15.794, -47.882)],
    ),
    _country(
        "AUS",
        "505",
        [("01", "Telstra"), ("02", "Optus"), ("03", "Vodafone")],
        [(-33.869, 151.209), (-37.814, 144.963), (-27.470, 153.026)],
    ),
)


#: Operator of scripted sessions unless given: Telekom, Germany.
DEFAULT_OPERATOR: Final = COUNTRIES[0].operators[0]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1 << 16)
def format_time(t: int) -> str:
    """Unix seconds as Twilio's ISO 8601 UTC form ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _hex(*parts: object, size: int = 16) -> str:
    return hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=size).hexdigest()


def _order_key(sid: str) -> int:
    """The listing position of a session: a hash of its SID (generated SIDs already are one)."""
    try:
        return int(sid[2:18], 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(sid.encode(), digest_size=8).digest(), "big")


def luhn_check_digit(payload: str) -> str:
    """The Luhn check digit to append to the decimal string ``payload``."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = ord(ch) - 48
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def _imei(rng: random.Random) -> str:
    body = "35" + _digits(rng, 12)
    return body + luhn_check_digit(body)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _location(lat: float, lon: float) -> Mapping[str, float]:
    return MappingProxyType({"lat": round(lat, 6), "lon": round(lon, 6)})


# --------------------------------------------------------------------------------------------
# Views (what tests read)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionView:
    """One DataSession as the API shows it at one moment (times are unix seconds)."""

    sid: str
    sim_sid: str
    account_sid: str
    radio_link: str | None
    operator_mcc: str | None
    operator_mnc: str | None
    operator_country: str | None
    operator_name: str | None
    cell_id: str | None
    cell_location_estimate: Mapping[str, float] | None
    packets_uploaded: int
    packets_downloaded: int
    last_updated: int
    start: int
    end: int | None
    imei: str | None

    def to_api(self, time_format: Callable[[int], str] = format_time) -> dict[str, Any]:
        """The JSON object of this session in an API response (times through ``time_format``;
        pass :attr:`Fleet.time_format` for exactly what that fleet's API serves)."""
        loc = self.cell_location_estimate
        return {
            "sid": self.sid,
            "sim_sid": self.sim_sid,
            "account_sid": self.account_sid,
            "radio_link": self.radio_link,
            "operator_mcc": self.operator_mcc,
            "operator_mnc": self.operator_mnc,
            "operator_country": self.operator_country,
            "operator_name": self.operator_name,
            "cell_id": self.cell_id,
            "cell_location_estimate": None if loc is None else dict(loc),
            "packets_uploaded": self.packets_uploaded,
            "packets_downloaded": self.packets_downloaded,
            "last_updated": time_format(self.last_updated),
            "start": time_format(self.start),
            "end": None if self.end is None else time_format(self.end),
            "imei": self.imei,
        }


@dataclass(frozen=True, slots=True)
class SimView:
    """One Sim resource (times are unix seconds)."""

    sid: str
    account_sid: str
    unique_name: str | None
    friendly_name: str | None
    status: str
    rate_plan_sid: str | None
    iccid: str | None
    date_created: int
    date_updated: int
    scripted: bool
    #: ``"resetting"`` while a connectivity reset runs, else ``None``.
    reset_status: str | None = None

    def to_api(
        self, base_url: str, time_format: Callable[[int], str] = format_time
    ) -> dict[str, Any]:
        """The JSON object of this SIM, with absolute URLs under ``base_url`` (times through
        ``time_format``; pass :attr:`Fleet.time_format` for exactly what that fleet serves)."""
        sim_url = f"{base_url}/v1/Sims/{self.sid}"
        return {
            "sid": self.sid,
            "unique_name": self.unique_name,
            "account_sid": self.account_sid,
            "rate_plan_sid": self.rate_plan_sid,
            "friendly_name": self.friendly_name,
            "iccid": self.iccid,
            "e_id": None,
            "status": self.status,
            "reset_status": self.reset_status,
            "commands_callback_url": None,
            "commands_callback_method": "POST",
            "sms_fallback_method": "POST",
            "sms_fallback_url": None,
            "sms_method": "POST",
            "sms_url": None,
            "voice_fallback_method": "POST",
            "voice_fallback_url": None,
            "voice_method": "POST",
            "voice_url": None,
            "date_created": time_format(self.date_created),
            "date_updated": time_format(self.date_updated),
            "url": sim_url,
            "links": {
                "data_sessions": f"{sim_url}/DataSessions",
                "rate_plan": (
                    None
                    if self.rate_plan_sid is None
                    else f"{base_url}/v1/RatePlans/{self.rate_plan_sid}"
                ),
                "usage_records": f"{sim_url}/UsageRecords",
            },
            "ip_address": None,
        }


# --------------------------------------------------------------------------------------------
# Internal state
# --------------------------------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode


class _Session:
    """A session: generated ones derive packets from rates; scripted (``fixed``) ones store them."""

    __slots__ = (
        "cell_id",
        "down",
        "down_rate",
        "end",
        "fixed",
        "frag",
        "frag_key",
        "imei",
        "last_updated",
        "location",
        "marks",
        "operator",
        "order_key",
        "radio_link",
        "rev",
        "sid",
        "sim",
        "start",
        "up",
        "up_rate",
    )

    def __init__(
        self,
        sid: str,
        sim: _Sim,
        start: int,
        end: int | None,
        radio_link: str | None,
        operator: Operator,
        cell_id: str | None,
        location: Mapping[str, float] | None,
        imei: str | None,
        up_rate: float = 0.0,
        down_rate: float = 0.0,
    ) -> None:
        self.sid = sid
        self.sim = sim
        self.start = start
        self.end = end
        self.radio_link = radio_link
        self.operator = operator
        self.cell_id = cell_id
        self.location = location
        self.imei = imei
        self.up_rate = up_rate
        self.down_rate = down_rate
        self.fixed = False
        self.up = 0
        self.down = 0
        self.last_updated = start
        self.rev = 0
        self.order_key = _order_key(sid)
        self.frag_key: tuple[int | None, int, int, int, int] | None = None
        self.frag = b""
        #: Checkpoints ``(time, packets up, packets down)`` of a fixed session, in time order:
        #: its packets moved evenly between two checkpoints (see :meth:`usage_segments`).
        #: ``None`` for a generated one (no list per session on the hot path).
        self.marks: list[tuple[int, int, int]] | None = None

    def mark(self, t: int, up: int, down: int) -> None:
        """A checkpoint of a fixed session: ``up``/``down`` packets by ``t``. A time before the
        previous checkpoint counts as that checkpoint's time (bytes are never moved back)."""
        marks = self.marks
        if marks is None:
            marks = self.marks = [(self.start, 0, 0)]
        marks.append((max(t, marks[-1][0]), up, down))

    def restart(self, start: int) -> None:
        """A fixed session's start moved: its packets so far move evenly from the new start."""
        self.start = start
        self.marks = [(start, 0, 0)]
        self.mark(self.last_updated, self.up, self.down)

    def usage_segments(self) -> list[tuple[int, int, int, int]]:
        """``(from, to, packets up, packets down)`` moved evenly over ``[from, to)`` (a jump at
        ``from`` when ``to == from``). A generated session: one segment over its whole life (its
        end is drawn with it). A fixed one: between its checkpoints; counts that drop count as
        no traffic, and the traffic resumes only above the highest count seen."""
        if not self.fixed:
            end = self.end if self.end is not None else self.start
            elapsed = end - self.start
            return [(self.start, end, int(self.up_rate * elapsed), int(self.down_rate * elapsed))]
        out: list[tuple[int, int, int, int]] = []
        marks = self.marks or [(self.start, 0, 0)]
        t0, u0, d0 = marks[0]
        for t1, u1, d1 in marks[1:]:
            du, dd = max(0, u1 - u0), max(0, d1 - d0)
            if du or dd:
                out.append((t0, t1, du, dd))
            t0, u0, d0 = t1, max(u0, u1), max(d0, d1)
        return out

    def state(self, now: int, granularity: float) -> tuple[int | None, int, int, int]:
        """(visible end or None, last_updated, packets_uploaded, packets_downloaded) at ``now``."""
        end = self.end
        if self.fixed:
            return (end, self.last_updated, self.up, self.down)
        closed = end is not None and end <= now
        if closed:
            assert end is not None
            lu = end
        else:
            lu = max(self.start, int(now // granularity * granularity))
        elapsed = lu - self.start
        return (
            end if closed else None,
            lu,
            int(self.up_rate * elapsed),
            int(self.down_rate * elapsed),
        )

    def view(self, now: int, granularity: float) -> SessionView:
        end, lu, up, down = self.state(now, granularity)
        op = self.operator
        sim = self.sim
        return SessionView(
            sid=self.sid,
            sim_sid=sim.sid,
            account_sid=sim.account_sid,
            radio_link=self.radio_link,
            operator_mcc=op.mcc,
            operator_mnc=op.mnc,
            operator_country=op.country,
            operator_name=op.name,
            cell_id=self.cell_id,
            cell_location_estimate=self.location,
            packets_uploaded=up,
            packets_downloaded=down,
            last_updated=lu,
            start=self.start,
            end=end,
            imei=self.imei,
        )

    def fragment(self, now: int, granularity: float, time_format: Callable[[int], str]) -> bytes:
        """The serialized JSON object of this session at ``now`` (cached per state; a session
        belongs to one fleet, so ``time_format`` is always the same)."""
        end, lu, up, down = self.state(now, granularity)
        key = (end, lu, up, down, self.rev)
        if key != self.frag_key:
            op = self.operator
            sim = self.sim
            loc = self.location
            self.frag = _encode(
                {
                    "sid": self.sid,
                    "sim_sid": sim.sid,
                    "account_sid": sim.account_sid,
                    "radio_link": self.radio_link,
                    "operator_mcc": op.mcc,
                    "operator_mnc": op.mnc,
                    "operator_country": op.country,
                    "operator_name": op.name,
                    "cell_id": self.cell_id,
                    "cell_location_estimate": None if loc is None else dict(loc),
                    "packets_uploaded": up,
                    "packets_downloaded": down,
                    "last_updated": time_format(lu),
                    "start": time_format(self.start),
                    "end": None if end is None else time_format(end),
                    "imei": self.imei,
                }
            )
            self.frag_key = key
        return self.frag


@dataclass(slots=True)
class _Profile:
    kind: str
    duration: tuple[float, float]
    gap: tuple[float, float]
    up_rate: float
    down_ratio: float
    radio: str
    alt_radio: str
    traveller: bool
    #: No session starts at or after this time (dead devices, suspended SIMs).
    stop_at: int | None


class _Generator:
    """The per-SIM session timeline: RNG, behaviour profile and device state."""

    __slots__ = (
        "cells",
        "country",
        "home",
        "imei",
        "n",
        "next_start",
        "operator",
        "profile",
        "rng",
    )

    def __init__(
        self,
        rng: random.Random,
        profile: _Profile,
        first_start: int,
        country: Country,
        home: tuple[float, float],
        imei: str,
    ) -> None:
        self.rng = rng
        self.profile = profile
        self.next_start = first_start
        self.n = 0
        self.country = country
        self.operator = rng.choice(country.operators)
        self.home = home
        self.imei = imei
        self.cells: dict[tuple[str | None, str | None, int], tuple[str, Mapping[str, float]]] = {}


class _Listing:
    """A SIM's listing at one instant: sessions in API order, their keys, and their states."""

    __slots__ = ("granularity", "keys", "now", "sessions", "time_format")

    def __init__(
        self,
        sessions: list[_Session],
        now: int,
        granularity: float,
        time_format: Callable[[int], str],
    ) -> None:
        sessions.sort(key=lambda s: s.order_key)
        self.sessions = sessions
        self.keys = [s.order_key for s in sessions]
        self.now = now
        self.granularity = granularity
        self.time_format = time_format

    def __len__(self) -> int:
        return len(self.sessions)

    def fragment(self, index: int) -> bytes:
        return self.sessions[index].fragment(self.now, self.granularity, self.time_format)

    def views(self) -> list[SessionView]:
        return [s.view(self.now, self.granularity) for s in self.sessions]


class _Sim:
    __slots__ = (
        "account_sid",
        "acct_cmd_day",
        "acct_n",
        "archive",
        "base_status",
        "bpp",
        "cache",
        "cache_key",
        "cmd_rates",
        "date_created",
        "date_updated",
        "friendly_name",
        "gen",
        "gen_made",
        "history",
        "home_country",
        "iccid",
        "index",
        "life",
        "rate_plan_sid",
        "reset_status",
        "script_cmds",
        "scripted",
        "sessions",
        "sid",
        "status",
        "touched",
        "unique_name",
        "unit",
        "version",
    )

    def __init__(
        self,
        index: int,
        sid: str,
        account_sid: str,
        unique_name: str | None,
        friendly_name: str | None,
        status: str,
        rate_plan_sid: str | None,
        iccid: str | None,
        date_created: int,
        date_updated: int,
        scripted: bool,
        keep_history: bool,
    ) -> None:
        self.index = index
        self.sid = sid
        self.account_sid = account_sid
        self.unique_name = unique_name
        self.friendly_name = friendly_name
        self.status = status
        self.base_status = status
        self.rate_plan_sid = rate_plan_sid
        self.iccid = iccid
        self.date_created = date_created
        self.date_updated = date_updated
        self.scripted = scripted
        self.gen: _Generator | None = None
        self.gen_made = scripted
        #: Live sessions (start <= generated-up-to time, not yet aged out), in creation order.
        self.sessions: list[_Session] = []
        self.history: list[_Session] | None = [] if keep_history else None
        self.version = 0
        self.cache_key: tuple[int, int] | None = None
        self.cache: _Listing | None = None
        self.reset_status: str | None = None
        #: Seeded status, reset and plan changes (generated ``active`` SIMs), made on first use.
        self.life: Lifecycle | None = None
        # Usage (made on first use by Fleet._usage_params, except what scripts set).
        self.home_country: str | None = None
        self.bpp = 0
        self.unit = "bytes"
        #: Commands per day (from the SIM, to it).
        self.cmd_rates: tuple[float, float] | None = None
        #: Usage of sessions that aged out of the listing: ``(network, segments in bytes)``.
        self.archive: list[tuple[str | None, tuple[tuple[int, int, int, int], ...]]] = []
        #: Commands recorded by a script.
        self.script_cmds: Series | None = None
        #: Account ledger bookkeeping (Fleet._account_sim): entries of archive + sessions and
        #: days of commands already in it; ``touched``: a script changed this generated SIM, it
        #: is left out of the ledger and summed afresh like a scripted one.
        self.acct_n = 0
        self.acct_cmd_day: int | None = None
        self.touched = False

    def view(self) -> SimView:
        return SimView(
            sid=self.sid,
            account_sid=self.account_sid,
            unique_name=self.unique_name,
            friendly_name=self.friendly_name,
            status=self.status,
            rate_plan_sid=self.rate_plan_sid,
            iccid=self.iccid,
            date_created=self.date_created,
            date_updated=self.date_updated,
            scripted=self.scripted,
            reset_status=self.reset_status,
        )


class _SimsListing:
    """SIMs in API order (by creation) with their paging keys."""

    __slots__ = ("keys", "sims")

    def __init__(self, sims: list[_Sim]) -> None:
        self.sims = sims
        self.keys = [s.index for s in sims]

    def __len__(self) -> int:
        return len(self.sims)

    def views(self, lo: int, hi: int) -> list[SimView]:
        return [s.view() for s in self.sims[lo:hi]]


# --------------------------------------------------------------------------------------------
# Fleet
# --------------------------------------------------------------------------------------------

_FRIENDLY = (
    "Tracker",
    "Meter",
    "Gateway",
    "Sensor",
    "Kiosk",
    "Vending",
    "Scooter",
    "Pump",
    "Camera",
)
_RATE_PLANS = 4


class Fleet(FleetUsage):
    """The simulated fleet: generated SIMs (``sims`` of them, from ``seed``) plus scripted ones.

    ``retention``: sessions whose end is older than ``now - retention`` are no longer listed.
    ``backfill``: how much simulated past exists before the clock's start time (default: the
    retention window, so the fleet looks like it has been running forever).
    ``update_granularity``: open sessions' ``last_updated`` (and packets) move in steps of this
    many seconds of unix time. ``keep_history``: keep every session for :meth:`history` (off for
    long runs and benchmarks to bound memory).

    ``wall_timestamps`` (accelerated clock only): the API reports every time (session ``start``,
    ``end``, ``last_updated``, SIM ``date_created``/``date_updated``) mapped to real time with
    :meth:`SimClock.wall_time`, so a demo's timestamps never lie in the real future: at speed
    60 a session of one simulated hour shows as lasting one minute. Only what is serialised
    changes; the model, the views and :meth:`history` stay in simulated time.

    Usage (``GET .../UsageRecords``, :mod:`.usage`): an hour is reported ``usage_lag`` after it
    ends, first in part and in full from ``usage_final_after`` on; ``usage_retention`` is how
    far back records go; ``usage_unit`` the unit of every SIM's records unless a script sets
    one (:meth:`set_sim_unit`). ``status_changes``: generated ``active`` SIMs get seeded
    suspensions, connectivity resets and plan changes over time (:mod:`.lifecycle`).

    The arguments are trusted: they come from a :class:`~.config.SimulatorConfig`, which
    checked them (``sims >= 0``, ``retention`` and ``update_granularity`` above zero,
    ``wall_timestamps`` only with ``speed``, ``usage_final_after >= usage_lag``).
    """

    def __init__(
        self,
        clock: SimClock,
        *,
        sims: int = 20,
        seed: int = 1,
        account_sid: str = "AC" + "0" * 32,
        retention: float = 30 * 86400.0,
        update_granularity: float = 60.0,
        keep_history: bool = True,
        backfill: float | None = None,
        wall_timestamps: bool = False,
        usage_lag: float = 86400.0,
        usage_final_after: float = 2 * 86400.0,
        usage_retention: float = 62 * 86400.0,
        usage_unit: str = "bytes",
        status_changes: bool = True,
    ) -> None:
        if usage_unit not in UNIT_FACTORS:
            raise ValueError(f"usage_unit must be one of {tuple(UNIT_FACTORS)}, got {usage_unit!r}")
        self.clock = clock
        self.seed = seed
        self.account_sid = account_sid
        self.retention = float(retention)
        self.granularity = float(update_granularity)
        self.keep_history = keep_history
        self.wall_timestamps = wall_timestamps
        #: Formats a simulated unix second as the API reports it (:func:`format_time` itself
        #: unless ``wall_timestamps``).
        self.time_format: Callable[[int], str] = (
            self._format_wall_time if wall_timestamps else format_time
        )
        self.backfill = self.retention if backfill is None else float(backfill)
        self._origin = int(clock.start_time - self.backfill)
        self._sims: list[_Sim] = []
        self._by_sid: dict[str, _Sim] = {}
        self._by_name: dict[str, _Sim] = {}
        self._sessions: dict[str, _Session] = {}
        self._scripted_counter = 0
        self._sims_version = 0
        self._sims_cache: dict[tuple[str | None, str | None, str | None, int], _SimsListing] = {}
        self._rate_plans = tuple("WP" + _hex("plan", seed, k) for k in range(_RATE_PLANS))
        self._plans = make_plans(self._rate_plans, account_sid, self._origin - 400 * 86400)
        self.usage_revision = Revision(seed, usage_lag, usage_final_after)
        self.usage_retention = float(usage_retention)
        self.usage_unit = usage_unit
        self.status_changes = status_changes
        #: Fleet-wide usage of the generated SIMs, fed incrementally (:meth:`_account_sim`).
        self._ledger = Series()
        #: (time, SIM index, transition index) of each SIM's next lifecycle change.
        self._events: list[tuple[int, int, int]] | None = None
        for index in range(sims):
            self._register(self._generated_sim(index))

    # -- reported time ---------------------------------------------------------------------

    def reported_time(self, t: float) -> int:
        """The unix second the API reports for simulated time ``t``."""
        if self.wall_timestamps:
            return math.floor(self.clock.wall_time(t))
        return int(t)

    def simulated_time(self, reported: int) -> int:
        """The simulated unix second that the API reports as ``reported`` (the inverse of
        :meth:`reported_time`, rounded down): how the usage resources read ``Start``/``End``."""
        if self.wall_timestamps:
            clock = self.clock
            wall_start = clock.wall_start_time
            speed = clock.speed
            assert wall_start is not None
            assert speed is not None
            return math.floor(clock.start_time + (reported - wall_start) * speed)
        return reported

    def _format_wall_time(self, t: int) -> str:
        # format_time stays cached on the reported second: the mapping is this fleet's own.
        return format_time(self.reported_time(t))

    # -- construction ----------------------------------------------------------------------

    def _register(self, sim: _Sim) -> None:
        self._sims_version += 1
        self._sims.append(sim)
        self._by_sid[sim.sid] = sim
        if sim.unique_name is not None:
            self._by_name[sim.unique_name] = sim

    def _generated_sim(self, index: int) -> _Sim:
        rng = random.Random(f"{self.seed}:sim:{index}")
        roll = rng.random()
        if roll < 0.90:
            status = "active"
        elif roll < 0.94:
            status = "suspended"
        elif roll < 0.97:
            status = "deactivated"
        else:
            status = "ready"
        friendly = (
            None if rng.random() < 0.25 else f"{rng.choice(_FRIENDLY)} {rng.randrange(1, 1000):03d}"
        )
        iccid_body = "8901260" + _digits(rng, 11)
        start = int(self.clock.start_time)
        created = start - int(self.backfill) - rng.randrange(86400, 400 * 86400)
        updated = created + rng.randrange(0, start - created)
        plan = self._rate_plans[
            min(int(_log_uniform(rng, 1, _RATE_PLANS + 1)) - 1, _RATE_PLANS - 1)
        ]
        return _Sim(
            index=index,
            sid="DE" + _hex("sim", self.seed, index),
            account_sid=self.account_sid,
            unique_name=f"sim-{index:05d}",
            friendly_name=friendly,
            status=status,
            rate_plan_sid=plan,
            iccid=iccid_body + luhn_check_digit(iccid_body),
            date_created=created,
            date_updated=updated,
            scripted=False,
            keep_history=self.keep_history,
        )

    def _make_generator(self, sim: _Sim) -> _Generator | None:
        if sim.base_status in ("ready", "new"):
            return None
        rng = random.Random(f"{self.seed}:timeline:{sim.index}")
        start = int(self.clock.start_time)
        roll = rng.random()
        # Behaviour mix: a few chatty devices (a new session every few minutes), always-on
        # trackers with sessions of days, quiet devices that connect briefly now and then, and
        # the bulk in between.
        if roll < 0.04:
            kind, duration, gap = "chatty", (60.0, 600.0), (60.0, 900.0)
        elif roll < 0.16:
            kind, duration, gap = "steady", (6 * 3600.0, 3 * 86400.0), (30.0, 600.0)
        elif roll < 0.30:
            kind, duration, gap = "quiet", (60.0, 1800.0), (6 * 3600.0, 3 * 86400.0)
        else:
            kind, duration, gap = "normal", (300.0, 2 * 86400.0), (60.0, 8 * 3600.0)
        stop_at: int | None = None
        if sim.base_status != "active":
            stop_at = start - int(_log_uniform(rng, 3600.0, 20 * 86400.0))
        elif rng.random() < 0.05:
            kind = "dead"
            stop_at = start - int(_log_uniform(rng, 86400.0, 12 * 86400.0))
        radio = rng.choices(RADIO_LINKS, weights=(2, 4, 10, 30, 12, 6))[0]
        fallback = {
            "LTE": "3G",
            "4G": "3G",
            "LTE-M": "2G",
            "NB-IoT": "LTE-M",
            "3G": "2G",
            "2G": "3G",
        }
        up_rate = _log_uniform(rng, 0.002, 1.5)
        if kind == "chatty":
            up_rate *= 5
        profile = _Profile(
            kind=kind,
            duration=duration,
            gap=gap,
            up_rate=up_rate,
            down_ratio=rng.uniform(0.6, 4.0),
            radio=radio,
            alt_radio=fallback[radio],
            traveller=rng.random() < 0.10,
            stop_at=stop_at,
        )
        country = COUNTRIES[
            min(int(_log_uniform(rng, 1, len(COUNTRIES) + 1)) - 1, len(COUNTRIES) - 1)
        ]
        city = rng.choice(country.cities)
        home = (city[0] + rng.uniform(-0.15, 0.15), city[1] + rng.uniform(-0.15, 0.15))
        # Start the timeline in the middle of a cycle before the origin, so the state at the
        # origin looks like a steady state rather than every device connecting at once.
        first = self._origin - int(rng.uniform(0.0, duration[1] + gap[1]))
        sim.home_country = country.iso3
        self._life(sim)
        return _Generator(rng, profile, first, country, home, _imei(rng))

    # -- generation ------------------------------------------------------------------------

    def _extend(self, sim: _Sim, now: int) -> None:
        """Generate the sessions of ``sim`` that start at or before ``now``."""
        if sim.scripted:
            return
        gen = sim.gen
        if gen is None:
            if sim.gen_made:
                return
            sim.gen_made = True
            gen = sim.gen = self._make_generator(sim)
            if gen is None:
                return
        stop_at = gen.profile.stop_at
        life = sim.life
        added = False
        while gen.next_start <= now and (stop_at is None or gen.next_start < stop_at):
            if life is not None and gen.next_start >= life.horizon:
                # No session starts while the SIM is suspended (lifecycle).
                resumed = life.resume(gen.next_start)
                if resumed != gen.next_start:
                    gen.next_start = resumed
                    continue
            session = self._draw(sim, gen)
            sim.sessions.append(session)
            if sim.history is not None:
                sim.history.append(session)
            self._sessions[session.sid] = session
            added = True
        if added:
            sim.version += 1

    def _draw(self, sim: _Sim, gen: _Generator) -> _Session:
        rng = gen.rng
        p = gen.profile
        n = gen.n
        gen.n += 1
        start = gen.next_start
        duration = max(60, int(_log_uniform(rng, *p.duration)))
        gap = max(5, int(_log_uniform(rng, *p.gap)))
        end = start + duration
        if p.stop_at is not None and end > p.stop_at:
            end = max(start + 60, p.stop_at)
        life = sim.life
        if life is not None and end > life.horizon:
            end = life.cut(start, end)
        gen.next_start = end + gap

        # Device: occasionally swapped to a new one.
        if rng.random() < 0.004:
            gen.imei = _imei(rng)
        # Travellers move country now and then; everybody roams between local operators a bit.
        if p.traveller and rng.random() < 0.15:
            gen.country = rng.choice(COUNTRIES)
            city = rng.choice(gen.country.cities)
            gen.home = (city[0] + rng.uniform(-0.15, 0.15), city[1] + rng.uniform(-0.15, 0.15))
            gen.operator = rng.choice(gen.country.operators)
        operator = gen.operator
        if rng.random() < 0.12:
            operator = rng.choice(gen.country.operators)
        radio: str | None = p.radio if rng.random() >= 0.07 else p.alt_radio
        cell_no = rng.randrange(6)
        cell: tuple[str, Mapping[str, float]] = self._cell(gen, operator, cell_no)
        cell_id: str | None = cell[0]
        location = cell[1]
        imei: str | None = gen.imei
        quirk = rng.random()
        loc: Mapping[str, float] | None = location
        if quirk < 0.025:
            # Twilio could not identify the network at all.
            operator, cell_id, loc = UNKNOWN_OPERATOR, "", EMPTY_LOCATION
        elif quirk < 0.035:
            operator = Operator(operator.mcc, operator.mnc, operator.country, "")
        elif quirk < 0.045:
            cell_id = None
        elif quirk < 0.05:
            radio = None
        if rng.random() < 0.10:
            loc = EMPTY_LOCATION
        if rng.random() < 0.04:
            imei = None
        up_rate = p.up_rate * rng.uniform(0.3, 1.7)
        down_rate = up_rate * p.down_ratio * rng.uniform(0.7, 1.3)
        return _Session(
            sid="WN" + _hex("session", self.seed, sim.sid, n),
            sim=sim,
            start=start,
            end=end,
            radio_link=radio,
            operator=operator,
            cell_id=cell_id,
            location=loc,
            imei=imei,
            up_rate=up_rate,
            down_rate=down_rate,
        )

    def _cell(
        self, gen: _Generator, operator: Operator, cell_no: int
    ) -> tuple[str, Mapping[str, float]]:
        key = (operator.mcc, operator.mnc, cell_no)
        cell = gen.cells.get(key)
        if cell is None:
            h = int(_hex("cell", operator.mcc, operator.mnc, gen.home, cell_no, size=8), 16)
            cell_id = str(h % (1 << 28))
            dlat = ((h >> 28) % 2001 - 1000) / 10000.0
            dlon = ((h >> 40) % 2001 - 1000) / 10000.0
            cell = (cell_id, _location(gen.home[0] + dlat, gen.home[1] + dlon))
            gen.cells[key] = cell
        return cell

    # -- listing -----------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock.now())

    def _sim(self, sid_or_name: str) -> _Sim:
        sim = self._by_sid.get(sid_or_name) or self._by_name.get(sid_or_name)
        if sim is None:
            raise KeyError(sid_or_name)
        return sim

    def _prune(self, sim: _Sim, now: int) -> None:
        """Forget the SIM's sessions that ended before the retention window."""
        horizon = now - self.retention
        keep: list[_Session] = []
        for s in sim.sessions:
            if s.end is not None and s.end < horizon:
                self._sessions.pop(s.sid, None)
                self._archive(sim, s, now)
            else:
                keep.append(s)
        if len(keep) != len(sim.sessions):
            sim.sessions = keep
            sim.version += 1

    def _listing(self, sim: _Sim) -> _Listing:
        now = self._now()
        self._extend(sim, now)
        key = (now, sim.version)
        cached = sim.cache
        if cached is not None and sim.cache_key == key:
            return cached
        self._prune(sim, now)
        visible = [s for s in sim.sessions if s.start <= now]
        listing = _Listing(visible, now, self.granularity, self.time_format)
        sim.cache = listing
        sim.cache_key = (now, sim.version)
        return listing

    def listing_snapshot(self, sim_sid: str) -> _Listing | None:
        """The SIM's current listing for the app (``None`` for an unknown SIM)."""
        sim = self._by_sid.get(sim_sid)
        if sim is None:
            return None
        return self._listing(sim)

    def listing(self, sim_sid: str) -> list[SessionView]:
        """Exactly what ``GET /v1/Sims/{sim_sid}/DataSessions`` lists now, in API order."""
        return self._listing(self._sim(sim_sid)).views()

    def history(self, sim_sid: str) -> list[SessionView]:
        """Every session ever created for the SIM up to now (ignoring retention), by start.

        Requires ``keep_history=True``.
        """
        sim = self._sim(sim_sid)
        if sim.history is None:
            raise RuntimeError("Fleet was created with keep_history=False")
        now = self._now()
        self._extend(sim, now)
        sessions = sorted(
            (s for s in sim.history if s.start <= now), key=lambda s: (s.start, s.sid)
        )
        return [s.view(now, self.granularity) for s in sessions]

    def session(self, session_sid: str) -> SessionView:
        """One live (not aged out, not removed) session as the API would show it now."""
        session = self._sessions.get(session_sid)
        if session is None:
            raise KeyError(session_sid)
        return session.view(self._now(), self.granularity)

    def live_session_count(self) -> int:
        """Sessions held for listing (generated so far and not aged out or removed)."""
        return len(self._sessions)

    # -- SIMs --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sims)

    def __iter__(self) -> Iterator[SimView]:
        self._apply_events()
        return (sim.view() for sim in self._sims)

    def __contains__(self, sid: object) -> bool:
        return isinstance(sid, str) and sid in self._by_sid

    def sim_sids(self, status: str | None = None) -> list[str]:
        """SIDs of the SIMs (with ``status``, if given), in API order."""
        self._apply_events()
        return [s.sid for s in self._sims if status is None or s.status == status]

    def sims(
        self, status: str | None = None, iccid: str | None = None, rate_plan: str | None = None
    ) -> list[SimView]:
        """The SIMs as ``GET /v1/Sims`` lists them, with its filters."""
        self._apply_events()
        return [sim.view() for sim in self._filtered_sims(status, iccid, rate_plan)]

    def _filtered_sims(
        self, status: str | None = None, iccid: str | None = None, rate_plan: str | None = None
    ) -> list[_Sim]:
        return [
            s
            for s in self._sims
            if (status is None or s.status == status)
            and (iccid is None or s.iccid == iccid)
            and (rate_plan is None or s.rate_plan_sid == rate_plan)
        ]

    def sims_snapshot(
        self, status: str | None = None, iccid: str | None = None, rate_plan: str | None = None
    ) -> _SimsListing:
        """The SIMs ``GET /v1/Sims`` lists with these filters (cached until a SIM changes)."""
        self._apply_events()
        key = (status, iccid, rate_plan, self._sims_version)
        cached = self._sims_cache.get(key)
        if cached is None:
            if len(self._sims_cache) > 32:
                self._sims_cache.clear()
            cached = _SimsListing(self._filtered_sims(status, iccid, rate_plan))
            self._sims_cache[key] = cached
        return cached

    def sim(self, sid_or_unique_name: str) -> SimView | None:
        """One SIM by SID or unique name, or ``None``."""
        self._apply_events()
        sim = self._by_sid.get(sid_or_unique_name) or self._by_name.get(sid_or_unique_name)
        return None if sim is None else sim.view()

    # -- scripting -------------------------------------------------------------------------

    def _next_scripted(self, what: str) -> str:
        self._scripted_counter += 1
        return _hex("scripted", what, self.seed, self._scripted_counter)

    def add_sim(
        self,
        sid: str | None = None,
        *,
        unique_name: str | None = None,
        friendly_name: str | None = None,
        status: str = "active",
        iccid: str | None = None,
        rate_plan_sid: str | None = None,
        home_country: str | None = None,
        unit: str | None = None,
        bytes_per_packet: int | None = None,
    ) -> str:
        """Add a scripted SIM (no random sessions); returns its SID.

        Usage: sessions on an operator of ``home_country`` (default: that of
        :data:`DEFAULT_OPERATOR`) are home traffic, others international roaming; records are in
        ``unit`` (default the fleet's ``usage_unit``); ``bytes_per_packet`` defaults to a seeded
        value (:meth:`bytes_per_packet` tells it).
        """
        if status not in SIM_STATUSES:
            raise ValueError(f"status must be one of {SIM_STATUSES}, got {status!r}")
        if unit is not None and unit not in UNIT_FACTORS:
            raise ValueError(f"unit must be one of {tuple(UNIT_FACTORS)}, got {unit!r}")
        if bytes_per_packet is not None and bytes_per_packet < 1:
            raise ValueError(f"bytes_per_packet must be at least 1, got {bytes_per_packet}")
        if sid is None:
            sid = "DE" + self._next_scripted("sim")
        if len(sid) != 34 or not sid.startswith("DE"):
            raise ValueError(f"a SIM SID is DE + 32 hex digits, got {sid!r}")
        if sid in self._by_sid:
            raise ValueError(f"SIM {sid} already exists")
        if unique_name is not None and unique_name in self._by_name:
            raise ValueError(f"unique_name {unique_name!r} already used")
        index = len(self._sims)
        if iccid is None:
            body = "8901260" + str(int(_hex("iccid", sid, size=8), 16))[:11].rjust(11, "0")
            iccid = body + luhn_check_digit(body)
        now = self._now()
        sim = _Sim(
            index=index,
            sid=sid,
            account_sid=self.account_sid,
            unique_name=unique_name,
            friendly_name=friendly_name,
            status=status,
            rate_plan_sid=rate_plan_sid if rate_plan_sid is not None else self._rate_plans[0],
            iccid=iccid,
            date_created=now,
            date_updated=now,
            scripted=True,
            keep_history=self.keep_history,
        )
        self._usage_params(sim)
        sim.home_country = DEFAULT_OPERATOR.country if home_country is None else home_country
        if unit is not None:
            sim.unit = unit
        if bytes_per_packet is not None:
            sim.bpp = bytes_per_packet
        self._register(sim)
        return sid

    def set_sim_status(self, sim_sid: str, status: str) -> None:
        """Change a SIM's status (listing filter; a generated SIM keeps its timeline)."""
        if status not in SIM_STATUSES:
            raise ValueError(f"status must be one of {SIM_STATUSES}, got {status!r}")
        sim = self._sim(sim_sid)
        sim.status = status
        sim.date_updated = self._now()
        self._sims_version += 1

    def _default_imei(self, sim: _Sim) -> str:
        rng = random.Random(f"{self.seed}:imei:{sim.sid}")
        return _imei(rng)

    def open_session(
        self,
        sim_sid: str,
        *,
        start: float | None = None,
        sid: str | None = None,
        radio_link: str | None = "LTE",
        operator: OperatorLike = DEFAULT_OPERATOR,
        imei: str | _Default | None = DEFAULT,
        cell_id: str | _Default | None = DEFAULT,
        cell_location: Mapping[str, float] | None = EMPTY_LOCATION,
        packets_uploaded: int = 0,
        packets_downloaded: int = 0,
        last_updated: float | None = None,
    ) -> str:
        """Open a scripted session on any SIM; returns its SID.

        ``start`` defaults to now; ``last_updated`` defaults to ``start``. ``imei`` and
        ``cell_id`` default to deterministic values for the SIM; pass ``None`` for JSON null.
        ``cell_location`` is ``{}`` by default, ``None`` for JSON null.
        """
        sim = self._sim(sim_sid)
        now = self._now()
        start_i = now if start is None else int(start)
        if sid is None:
            sid = "WN" + self._next_scripted("session")
        if sid in self._sessions:
            raise ValueError(f"session {sid} already exists")
        session = _Session(
            sid=sid,
            sim=sim,
            start=start_i,
            end=None,
            radio_link=radio_link,
            operator=Operator(*operator),
            cell_id=str(10_000_000 + int(_hex("cell", sid, size=3), 16))
            if cell_id is DEFAULT
            else cell_id,
            location=None if cell_location is None else MappingProxyType(dict(cell_location)),
            imei=self._default_imei(sim) if imei is DEFAULT else imei,
        )
        self._untrack(sim)
        session.fixed = True
        session.up = packets_uploaded
        session.down = packets_downloaded
        session.last_updated = start_i if last_updated is None else int(last_updated)
        session.mark(session.last_updated, packets_uploaded, packets_downloaded)
        sim.sessions.append(session)
        if sim.history is not None:
            sim.history.append(session)
        self._sessions[sid] = session
        sim.version += 1
        return sid

    def _live_session(self, session_sid: str) -> _Session:
        session = self._sessions.get(session_sid)
        if session is None:
            raise KeyError(f"no live session {session_sid}")
        self._untrack(session.sim)
        if not session.fixed:
            # Freeze a generated session at its current state so a script can take over.
            end, lu, up, down = session.state(self._now(), self.granularity)
            session.fixed = True
            session.end = end
            session.last_updated, session.up, session.down = lu, up, down
            session.mark(lu, up, down)
        return session

    def update_session(
        self,
        session_sid: str,
        *,
        packets_uploaded: int | None = None,
        packets_downloaded: int | None = None,
        last_updated: float | None = None,
        radio_link: str | _Default | None = DEFAULT,
        operator: OperatorLike | _Default = DEFAULT,
        imei: str | _Default | None = DEFAULT,
        cell_id: str | _Default | None = DEFAULT,
        cell_location: Mapping[str, float] | _Default | None = DEFAULT,
        start: float | None = None,
    ) -> None:
        """Change a session's reported values; ``last_updated`` defaults to now.

        Fields left at :data:`DEFAULT` (or ``None`` for the packet counts and ``start``) keep
        their value. Updating a generated session freezes it at its current state first.
        """
        session = self._live_session(session_sid)
        if packets_uploaded is not None:
            session.up = packets_uploaded
        if packets_downloaded is not None:
            session.down = packets_downloaded
        session.last_updated = self._now() if last_updated is None else int(last_updated)
        if not isinstance(radio_link, _Default):
            session.radio_link = radio_link
        if not isinstance(operator, _Default):
            session.operator = Operator(*operator)
        if not isinstance(imei, _Default):
            session.imei = imei
        if not isinstance(cell_id, _Default):
            session.cell_id = cell_id
        if not isinstance(cell_location, _Default):
            session.location = (
                None if cell_location is None else MappingProxyType(dict(cell_location))
            )
        if start is not None:
            session.restart(int(start))
        else:
            session.mark(session.last_updated, session.up, session.down)
        self._touch(session)

    def close_session(
        self,
        session_sid: str,
        *,
        end: float | None = None,
        packets_uploaded: int | None = None,
        packets_downloaded: int | None = None,
    ) -> None:
        """End a session at ``end`` (default now); ``last_updated`` becomes ``end``."""
        session = self._live_session(session_sid)
        end_i = self._now() if end is None else int(end)
        session.end = end_i
        session.last_updated = end_i
        if packets_uploaded is not None:
            session.up = packets_uploaded
        if packets_downloaded is not None:
            session.down = packets_downloaded
        session.mark(end_i, session.up, session.down)
        self._touch(session)

    def remove_session(self, session_sid: str) -> None:
        """Drop a session from the listing now (as if it aged out); history and the usage
        records keep it."""
        session = self._sessions.get(session_sid)
        if session is None:
            raise KeyError(f"no live session {session_sid}")
        sim = session.sim
        self._untrack(sim)
        del self._sessions[session_sid]
        self._archive(sim, session, self._now())
        sim.sessions = [s for s in sim.sessions if s is not session]
        sim.version += 1

    def _touch(self, session: _Session) -> None:
        session.rev += 1
        session.sim.version += 1

    # -- rate plans ------------------------------------------------------------------------

    def rate_plans(self) -> list[RatePlanView]:
        """The account's rate plans, in API order."""
        return list(self._plans)

    def rate_plan(self, sid_or_unique_name: str) -> RatePlanView | None:
        """One rate plan by SID or unique name, or ``None``."""
        for plan in self._plans:
            if sid_or_unique_name in (plan.sid, plan.unique_name):
                return plan
        return None

    # -- lifecycle -------------------------------------------------------------------------

    def _life(self, sim: _Sim) -> Lifecycle | None:
        """The seeded lifecycle of a generated ``active`` SIM (made on first use)."""
        eligible = self.status_changes and not sim.scripted and sim.base_status == "active"
        if sim.life is None and eligible:
            plan = (
                self._rate_plans.index(sim.rate_plan_sid)
                if sim.rate_plan_sid in self._rate_plans
                else 0
            )
            sim.life = Lifecycle(
                self.seed, sim.index, int(self.clock.start_time), plan, len(self._rate_plans)
            )
        return sim.life

    def _apply_events(self) -> None:
        """Apply every seeded status, reset and plan change due by now."""
        if not self.status_changes:
            return
        events = self._events
        if events is None:
            events = self._events = []
            for sim in self._sims:
                life = self._life(sim)
                if life is not None:
                    first = life.next_transition(0)
                    events.append((first.at, sim.index, 0))
            heapq.heapify(events)
        now = self._now()
        if not events or events[0][0] > now:
            return
        while events and events[0][0] <= now:
            at, index, k = heapq.heappop(events)
            sim = self._sims[index]
            life = sim.life
            assert life is not None
            change = life.transitions[k]
            if change.what == "status":
                if sim.status in ("active", "suspended") and change.value != sim.status:
                    sim.status = str(change.value)
            elif change.what == "reset":
                sim.reset_status = None if change.value is None else str(change.value)
            else:
                assert isinstance(change.value, int)
                sim.rate_plan_sid = self._rate_plans[change.value]
            sim.date_updated = max(sim.date_updated, at)
            following = life.next_transition(k + 1)
            heapq.heappush(events, (following.at, index, k + 1))
        self._sims_version += 1

    def status_episodes(self, sim_sid: str) -> list[Episode]:
        """The SIM's seeded lifecycle episodes that started by now (ground truth; empty for a
        scripted SIM, one not ``active`` at first, or with ``status_changes`` off)."""
        sim = self._sim(sim_sid)
        life = self._life(sim)
        if life is None:
            return []
        now = self._now()
        life.until(now)
        return [episode for episode in life.episodes if episode.start <= now]

    def set_sim_rate_plan(self, sim_sid: str, rate_plan: str) -> None:
        """Move a SIM to another plan (SID or unique name of one of :meth:`rate_plans`)."""
        plan = self.rate_plan(rate_plan)
        if plan is None:
            raise ValueError(f"no rate plan {rate_plan!r}")
        sim = self._sim(sim_sid)
        sim.rate_plan_sid = plan.sid
        sim.date_updated = self._now()
        self._sims_version += 1

    def set_sim_reset_status(self, sim_sid: str, reset_status: str | None) -> None:
        """Start (``"resetting"``) or end (``None``) a connectivity reset of a SIM."""
        if reset_status not in (None, "resetting"):
            raise ValueError(f"reset_status must be 'resetting' or None, got {reset_status!r}")
        sim = self._sim(sim_sid)
        sim.reset_status = reset_status
        sim.date_updated = self._now()
        self._sims_version += 1
