"""Usage records of the simulated fleet: bytes per hour from the sessions, commands, the lag.

The model (``docs/simulator.md`` describes it for users):

* **Resolution: the simulated UTC hour.** Every amount belongs to one hour ``[h, h + 3600)``;
  daily and ``all`` records are sums of hours.
* **Bytes follow the packets.** A session's packets times its SIM's bytes per packet, spread
  over the time the packets moved: a generated session evenly over its whole life (its end and
  rates are drawn when it starts), a scripted one evenly between its checkpoints (each update
  or close adds one). The split over hours is integral and exact (:meth:`HourSeries.add`), so
  the hours of a session add up to exactly its bytes, whichever way they are summed.
* **Network.** Home when the session's operator country is the SIM's home country (or the
  network is unknown), international roaming in that operator's country otherwise. National
  roaming stays zero: the simulated operators carry no home-network identity.
* **Lag and revision** (:class:`Revision`): an hour is reported ``lag`` after it ends, first at
  a seeded fraction, revised upward once half-way to ``final_after`` and in full from then on.
  A reported value is ``floor(fraction * final)``, so it never goes down as time passes.

Only :mod:`.model` feeds this module; nothing here knows sessions or SIMs, just numbers.
"""

from __future__ import annotations

import calendar
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "BILLING_UNITS",
    "DAY",
    "GRANULARITIES",
    "HOUR",
    "UNITS",
    "UNIT_FACTORS",
    "Granularity",
    "HourSeries",
    "Revision",
    "Unit",
    "UsageTotals",
    "UsageView",
    "build_records",
    "floor_hour",
    "month_before",
]

HOUR: Final = 3600
DAY: Final = 86400

Unit = Literal["bytes", "kilobytes", "megabytes"]
#: The ``units`` a SIM's records can be in, and what one of each is in bytes (binary multiples,
#: the convention the exporter uses for the plans' megabyte limits too).
UNIT_FACTORS: Final[Mapping[str, int]] = {"bytes": 1, "kilobytes": 1024, "megabytes": 1024 * 1024}
UNITS: Final = tuple(UNIT_FACTORS)

Granularity = Literal["hourly", "daily", "all"]
GRANULARITIES: Final = ("hourly", "daily", "all")

BILLING_UNITS: Final = "USD"
#: Prices of the simulated account: per megabyte at home and roaming, per command.
PRICE_HOME_MB: Final = 0.10
PRICE_ROAMING_MB: Final = 0.50
PRICE_COMMAND: Final = 0.01

#: Series keys: home upload/download, commands from/to the SIM; roaming ones are
#: ``("up" | "down", country)``.
HOME_UP: Final = "home_up"
HOME_DOWN: Final = "home_down"
FROM_SIM: Final = "from_sim"
TO_SIM: Final = "to_sim"
SeriesKey = str | tuple[str, str]


def floor_hour(t: int) -> int:
    return t - t % HOUR


def month_before(t: int) -> int:
    """The same UTC day and time one calendar month before ``t`` (the day clamped to the month's
    length): the API's default ``Start``."""
    tm = time.gmtime(t)
    year, month = (tm.tm_year, tm.tm_mon - 1) if tm.tm_mon > 1 else (tm.tm_year - 1, 12)
    day = min(tm.tm_mday, calendar.monthrange(year, month)[1])
    return calendar.timegm((year, month, day, tm.tm_hour, tm.tm_min, tm.tm_sec, 0, 0, 0))


def _unit_floats(*parts: object) -> tuple[float, float]:
    raw = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    value = int.from_bytes(raw, "big")
    return (value >> 32) / 2**32, (value & 0xFFFFFFFF) / 2**32


# --------------------------------------------------------------------------------------------
# Amounts per hour
# --------------------------------------------------------------------------------------------


class HourSeries:
    """Integer amounts per hour, each segment added in O(1) whatever its length.

    A segment ``[ta, tb)`` carrying ``total`` is split evenly over the hours it touches, with
    integer arithmetic: the first hour gets ``total * covered // duration``, each full hour
    ``total * 3600 // duration``, the last hour the rest. The first and last hours go to
    ``_point``, the run of full hours to ``_slope`` as a difference (``+q`` where it starts,
    ``-q`` after it ends), so a segment of three days costs what one of a minute does. Adding
    the same segment with ``sign=-1`` takes it out again exactly.
    """

    __slots__ = ("_point", "_slope")

    def __init__(self) -> None:
        self._point: dict[int, int] = {}
        self._slope: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self._point) or bool(self._slope)

    def add(self, ta: int, tb: int, total: int, sign: int = 1) -> None:
        if total <= 0:
            return
        point = self._point
        h0 = floor_hour(ta)
        if tb <= ta:
            point[h0] = point.get(h0, 0) + sign * total
            return
        hl = floor_hour(tb - 1)
        if hl == h0:
            point[h0] = point.get(h0, 0) + sign * total
            return
        duration = tb - ta
        first = total * (h0 + HOUR - ta) // duration
        full = (hl - h0) // HOUR - 1
        each = total * HOUR // duration
        point[h0] = point.get(h0, 0) + sign * first
        point[hl] = point.get(hl, 0) + sign * (total - first - each * full)
        if full and each:
            slope = self._slope
            a, b = h0 + HOUR, hl
            slope[a] = slope.get(a, 0) + sign * each
            slope[b] = slope.get(b, 0) - sign * each

    def merge(self, other: HourSeries) -> None:
        for mine, theirs in ((self._point, other._point), (self._slope, other._slope)):
            for hour, value in theirs.items():
                mine[hour] = mine.get(hour, 0) + value

    def values(self, lo: int, hi: int) -> list[int]:
        """The amount of every hour ``lo, lo + 3600, ...`` below ``hi`` (``lo`` on an hour)."""
        n = max(0, -(-(hi - lo) // HOUR))
        out = [0] * n
        if not n:
            return out
        running = 0
        slope = self._slope
        starts: list[tuple[int, int]] = []
        for hour, delta in slope.items():
            if hour <= lo:
                running += delta
            elif hour < hi:
                starts.append((hour, delta))
        starts.sort()
        nxt = 0
        for i in range(n):
            hour = lo + i * HOUR
            while nxt < len(starts) and starts[nxt][0] <= hour:
                running += starts[nxt][1]
                nxt += 1
            out[i] = running
        for hour, value in self._point.items():
            if lo <= hour < hi:
                out[(hour - lo) // HOUR] += value
        return out

    def drop_before(self, t: int) -> None:
        """Forget the hours before ``t`` (folding the slope into one entry at ``t``)."""
        point = self._point
        for hour in [h for h in point if h < t]:
            del point[hour]
        slope = self._slope
        old = [h for h in slope if h <= t]
        if old:
            carried = sum(slope.pop(h) for h in old)
            if carried:
                slope[t] = carried


class Series:
    """The :class:`HourSeries` of one SIM (or the account) by key."""

    __slots__ = ("by_key",)

    def __init__(self) -> None:
        self.by_key: dict[SeriesKey, HourSeries] = {}

    def add(self, key: SeriesKey, ta: int, tb: int, total: int, sign: int = 1) -> None:
        if total <= 0:
            return
        series = self.by_key.get(key)
        if series is None:
            series = self.by_key[key] = HourSeries()
        series.add(ta, tb, total, sign)

    def add_data(
        self, country: str | None, ta: int, tb: int, up: int, down: int, sign: int = 1
    ) -> None:
        """Bytes of one segment, at home (``country`` None) or roaming in ``country``."""
        if country is None:
            self.add(HOME_UP, ta, tb, up, sign)
            self.add(HOME_DOWN, ta, tb, down, sign)
        else:
            self.add(("up", country), ta, tb, up, sign)
            self.add(("down", country), ta, tb, down, sign)

    def merge(self, other: Series) -> None:
        for key, theirs in other.by_key.items():
            mine = self.by_key.get(key)
            if mine is None:
                mine = self.by_key[key] = HourSeries()
            mine.merge(theirs)

    def drop_before(self, t: int) -> None:
        for series in self.by_key.values():
            series.drop_before(t)


# --------------------------------------------------------------------------------------------
# Lag and revision
# --------------------------------------------------------------------------------------------


class Revision:
    """How much of an hour's final usage the API reports at a given moment.

    Nothing until ``lag`` after the hour ends; then a seeded fraction of it (0.55 to 0.85, the
    same for every SIM of the hour); from half-way to ``final_after`` a larger one; from
    ``final_after`` on, all of it. Three steps rather than a continuous curve: every poll in a
    step sees the same numbers, as with a billing system that reprocesses in batches.
    """

    __slots__ = ("_cache", "final_after", "lag", "midway", "seed")

    def __init__(self, seed: int, lag: float, final_after: float) -> None:
        self.seed = seed
        self.lag = float(lag)
        self.final_after = max(float(lag), float(final_after))
        self.midway = self.lag + (self.final_after - self.lag) / 2
        self._cache: dict[int, tuple[float, float]] = {}

    def _steps(self, hour: int) -> tuple[float, float]:
        steps = self._cache.get(hour)
        if steps is None:
            u1, u2 = _unit_floats("revision", self.seed, hour)
            first = 0.55 + 0.30 * u1
            steps = (first, first + (1.0 - first) * (0.4 + 0.4 * u2))
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[hour] = steps
        return steps

    def fraction(self, hour: int, now: float) -> float:
        age = now - (hour + HOUR)
        if age >= self.final_after:
            return 1.0
        if age < self.lag:
            return 0.0
        first, second = self._steps(hour)
        return first if age < self.midway else second


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Usage in bytes and commands over a range (ground truth for tests)."""

    upload: int
    download: int
    home_upload: int
    home_download: int
    #: ``country -> (upload, download)``
    international_roaming: Mapping[str, tuple[int, int]]
    commands_from_sim: int
    commands_to_sim: int

    @property
    def total(self) -> int:
        return self.upload + self.download

    @property
    def home(self) -> int:
        return self.home_upload + self.home_download

    @property
    def international(self) -> int:
        return sum(up + down for up, down in self.international_roaming.values())


@dataclass(frozen=True, slots=True)
class UsageView:
    """One usage record exactly as the API serves it (amounts in ``units``, rounded down).

    ``start``/``end`` are simulated unix seconds; ``sim_sid`` is ``None`` for the account's
    records. ``bytes`` is the same record in bytes before the unit's rounding.
    """

    sim_sid: str | None
    account_sid: str
    start: int
    end: int
    units: str
    bytes: UsageTotals

    @property
    def factor(self) -> int:
        return UNIT_FACTORS[self.units]

    def _in_units(self, amount: int) -> int:
        return amount // UNIT_FACTORS[self.units]

    @property
    def upload(self) -> int:
        return self._in_units(self.bytes.upload)

    @property
    def download(self) -> int:
        return self._in_units(self.bytes.download)

    @property
    def total(self) -> int:
        """``upload + download`` in units (each rounded down first)."""
        return self.upload + self.download

    @property
    def commands_from_sim(self) -> int:
        return self.bytes.commands_from_sim

    @property
    def commands_to_sim(self) -> int:
        return self.bytes.commands_to_sim

    def _counts(self, up: int, down: int, price: float) -> dict[str, Any]:
        billed = round((up + down) / UNIT_FACTORS["megabytes"] * price, 4)
        u, d = self._in_units(up), self._in_units(down)
        return {
            "billing_units": BILLING_UNITS,
            "billed": billed,
            "total": u + d,
            "upload": u,
            "download": d,
            "units": self.units,
        }

    def to_api(self, time_format: Callable[[int], str]) -> dict[str, Any]:
        """The JSON object of this record (KORE's ``SIMUsageRecord``/``UsageRecord`` shape)."""
        b = self.bytes
        home = self._counts(b.home_upload, b.home_download, PRICE_HOME_MB)
        roaming = []
        for country in sorted(b.international_roaming):
            up, down = b.international_roaming[country]
            roaming.append({"country_code": country, **self._counts(up, down, PRICE_ROAMING_MB)})
        data = {
            "billing_units": BILLING_UNITS,
            "billed": round(home["billed"] + sum(r["billed"] for r in roaming), 4),
            "total": self.total,
            "upload": self.upload,
            "download": self.download,
            "units": self.units,
            "home": home,
            "national_roaming": self._counts(0, 0, PRICE_ROAMING_MB),
            "international_roaming": roaming,
        }
        from_sim, to_sim = b.commands_from_sim, b.commands_to_sim
        commands_billed = round((from_sim + to_sim) * PRICE_COMMAND, 4)
        commands = {
            "billing_units": BILLING_UNITS,
            "billed": commands_billed,
            "total": from_sim + to_sim,
            "from_sim": from_sim,
            "to_sim": to_sim,
            "home": {
                "billing_units": BILLING_UNITS,
                "billed": commands_billed,
                "total": from_sim + to_sim,
                "from_sim": from_sim,
                "to_sim": to_sim,
            },
            "national_roaming": {
                "billing_units": BILLING_UNITS,
                "billed": 0.0,
                "total": 0,
                "from_sim": 0,
                "to_sim": 0,
            },
            "international_roaming": [],
        }
        record: dict[str, Any] = {}
        if self.sim_sid is not None:
            record["sim_sid"] = self.sim_sid
        record["account_sid"] = self.account_sid
        record["period"] = {"start": time_format(self.start), "end": time_format(self.end)}
        record["commands"] = commands
        record["data"] = data
        return record


def _buckets(
    granularity: str, lo: int, hi: int, start: int, end: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """(key, period start, period end, first hour index, hours) of each record.

    Hours ``lo .. hi`` are the ones listed; periods are clipped to ``[start, end]``.
    """
    n = max(0, -(-(hi - lo) // HOUR))
    if granularity == "all":
        yield 0, start, end, 0, n
        return
    step = HOUR if granularity == "hourly" else DAY
    i = 0
    while i < n:
        b0 = lo + i * HOUR
        b0 -= b0 % step
        b1 = b0 + step
        j = min(n, (b1 - lo) // HOUR)
        yield b0, max(b0, start), min(b1, end), i, j - i
        i = j


def build_records(
    series: Series,
    *,
    sim_sid: str | None,
    account_sid: str,
    units: str,
    granularity: str,
    start: int,
    end: int,
    lo: int,
    hi: int,
    fraction: Callable[[int], float] | None,
) -> tuple[list[int], list[UsageView]]:
    """The records of ``series`` over hours ``[lo, hi)`` at granularity, with periods clipped
    to ``[start, end]``; ``fraction(hour)`` says how much of each hour is reported (``None``:
    all of it). Returns (paging keys, records)."""
    hours = [lo + i * HOUR for i in range(max(0, -(-(hi - lo) // HOUR)))]
    factors = [1.0] * len(hours) if fraction is None else [fraction(h) for h in hours]
    reported: dict[SeriesKey, list[int]] = {}
    for key, hs in series.by_key.items():
        values = hs.values(lo, hi)
        reported[key] = [int(v * f) if f < 1.0 else v for v, f in zip(values, factors, strict=True)]
    zero = [0] * len(hours)
    home_up = reported.get(HOME_UP, zero)
    home_down = reported.get(HOME_DOWN, zero)
    from_sim = reported.get(FROM_SIM, zero)
    to_sim = reported.get(TO_SIM, zero)
    roaming = sorted({key[1] for key in reported if isinstance(key, tuple)})
    keys: list[int] = []
    records: list[UsageView] = []
    for bucket, p0, p1, i, n in _buckets(granularity, lo, hi, start, end):
        j = i + n
        intl: dict[str, tuple[int, int]] = {}
        for country in roaming:
            up = sum(reported.get(("up", country), zero)[i:j])
            down = sum(reported.get(("down", country), zero)[i:j])
            if up or down:
                intl[country] = (up, down)
        hu, hd = sum(home_up[i:j]), sum(home_down[i:j])
        totals = UsageTotals(
            upload=hu + sum(u for u, _ in intl.values()),
            download=hd + sum(d for _, d in intl.values()),
            home_upload=hu,
            home_download=hd,
            international_roaming=intl,
            commands_from_sim=sum(from_sim[i:j]),
            commands_to_sim=sum(to_sim[i:j]),
        )
        keys.append(bucket)
        records.append(UsageView(sim_sid, account_sid, p0, p1, units, totals))
    return keys, records


def totals_of(records: Iterable[UsageView]) -> UsageTotals:
    """The sum of records (in bytes)."""
    up = down = hu = hd = cf = ct = 0
    intl: dict[str, tuple[int, int]] = {}
    for r in records:
        b = r.bytes
        up += b.upload
        down += b.download
        hu += b.home_upload
        hd += b.home_download
        cf += b.commands_from_sim
        ct += b.commands_to_sim
        for country, (u, d) in b.international_roaming.items():
            pu, pd = intl.get(country, (0, 0))
            intl[country] = (pu + u, pd + d)
    return UsageTotals(up, down, hu, hd, intl, cf, ct)
