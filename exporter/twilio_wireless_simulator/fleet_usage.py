"""The usage side of the simulated fleet: what :class:`~.model.Fleet` answers for the two
``UsageRecords`` resources, and the ground truth tests read (:meth:`FleetUsage.usage_records`,
:meth:`FleetUsage.usage_totals`).

Per SIM, usage is summed afresh from its sessions (the live ones and those that aged out of the
listing, kept in its archive) whenever it is asked for. For the account, summing every SIM on
every request would cost seconds at 10,000 SIMs, so the generated SIMs feed a ledger
incrementally: each SIM's archive and sessions form one sequence in time order, of which the
first ``acct_n`` are in the ledger. A script that changes a generated SIM takes that SIM's part
out of the ledger again (exactly: the hour split is integral) and from then on the SIM is summed
afresh like a scripted one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Generator
from typing import TYPE_CHECKING

from .usage import (
    DAY,
    FROM_SIM,
    GRANULARITIES,
    HOUR,
    TO_SIM,
    UNIT_FACTORS,
    Revision,
    Series,
    UsageTotals,
    UsageView,
    build_records,
    floor_hour,
    month_before,
    totals_of,
)

if TYPE_CHECKING:
    from .model import _Session, _Sim

__all__ = ["FleetUsage"]


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


class FleetUsage:
    """Usage records of a fleet; :class:`~.model.Fleet` supplies the SIMs and the clock."""

    # Provided by Fleet.
    seed: int
    account_sid: str
    usage_unit: str
    usage_retention: float
    usage_revision: Revision
    _sims: list[_Sim]
    _origin: int
    _ledger: Series

    def _now(self) -> int:
        raise NotImplementedError

    def _sim(self, sid_or_name: str) -> _Sim:
        raise NotImplementedError

    def _extend(self, sim: _Sim, now: int) -> None:
        raise NotImplementedError

    def _usage_params(self, sim: _Sim) -> _Sim:
        """The SIM's seeded usage parameters, drawn on first use (from their own hash, so the
        session timelines stay what they were)."""
        if sim.cmd_rates is None:
            rng = random.Random(f"{self.seed}:usage:{sim.sid}")
            sim.bpp = int(_log_uniform(rng, 40.0, 400.0))
            sim.unit = self.usage_unit
            if sim.scripted or sim.base_status != "active" or rng.random() < 0.5:
                sim.cmd_rates = (0.0, 0.0)
            else:
                sim.cmd_rates = (_log_uniform(rng, 0.2, 8.0), _log_uniform(rng, 0.2, 8.0))
        return sim

    def bytes_per_packet(self, sim_sid: str) -> int:
        """How many bytes one packet of this SIM's sessions carries in its usage records."""
        return self._usage_params(self._sim(sim_sid)).bpp

    def sim_unit(self, sim_sid: str) -> str:
        """The ``units`` of the SIM's usage records."""
        return self._usage_params(self._sim(sim_sid)).unit

    def set_sim_unit(self, sim_sid: str, unit: str) -> None:
        """Serve the SIM's usage records in ``unit`` (``bytes``, ``kilobytes``, ``megabytes``)
        from now on; the usage itself does not change, only how it is written (rounded down)."""
        if unit not in UNIT_FACTORS:
            raise ValueError(f"unit must be one of {tuple(UNIT_FACTORS)}, got {unit!r}")
        self._usage_params(self._sim(sim_sid)).unit = unit

    def record_commands(
        self, sim_sid: str, *, from_sim: int = 0, to_sim: int = 0, at: float | None = None
    ) -> None:
        """Add commands the SIM sent (``from_sim``) and received (``to_sim``) at ``at``
        (default now) to its usage."""
        if from_sim < 0 or to_sim < 0:
            raise ValueError("command counts are not negative")
        sim = self._sim(sim_sid)
        self._untrack(sim)
        t = self._now() if at is None else int(at)
        if sim.script_cmds is None:
            sim.script_cmds = Series()
        sim.script_cmds.add(FROM_SIM, t, t, from_sim)
        sim.script_cmds.add(TO_SIM, t, t, to_sim)

    def _network(self, sim: _Sim, session: _Session) -> str | None:
        """``None`` (home) or the roaming country of a session."""
        country = session.operator.country
        return None if not country or country == sim.home_country else country

    def _archive(self, sim: _Sim, session: _Session, now: int) -> None:
        """Keep the usage of a session leaving the listing (the usage records outlive it)."""
        bpp = self._usage_params(sim).bpp
        segments = tuple(
            (ta, tb, up * bpp, down * bpp) for ta, tb, up, down in session.usage_segments()
        )
        archive = sim.archive
        archive.append((self._network(sim, session), segments))
        horizon = now - self.usage_retention
        old = 0
        while old < len(archive) - 1 and all(tb < horizon for _, tb, _, _ in archive[old][1]):
            old += 1
        if old:
            del archive[:old]
            sim.acct_n = max(0, sim.acct_n - old)

    def _commands(self, sim: _Sim, day: int, series: Series, sign: int = 1) -> None:
        """The seeded commands of one UTC day (a day before the fleet's origin has none)."""
        rates = self._usage_params(sim).cmd_rates
        if not rates or rates == (0.0, 0.0) or day < self._origin - DAY:
            return
        rng = random.Random(f"{self.seed}:commands:{sim.sid}:{day}")
        for key, rate in ((FROM_SIM, rates[0]), (TO_SIM, rates[1])):
            for _ in range(int(rng.uniform(0.0, 2.0 * rate))):
                t = day + rng.randrange(24) * HOUR
                series.add(key, t, t, 1, sign)

    def _sim_series(self, sim: _Sim, lo: int, hi: int) -> Series:
        """The SIM's final usage by hour, for hours in ``[lo, hi)`` (and possibly others)."""
        self._extend(sim, self._now())
        self._usage_params(sim)
        series = Series()
        bpp = sim.bpp
        for network, segments in sim.archive:
            for ta, tb, up, down in segments:
                if tb >= lo and ta < hi:
                    series.add_data(network, ta, tb, up, down)
        for session in sim.sessions:
            network = self._network(sim, session)
            for ta, tb, up, down in session.usage_segments():
                if tb >= lo and ta < hi:
                    series.add_data(network, ta, tb, up * bpp, down * bpp)
        day = max(lo - lo % DAY, self._origin - self._origin % DAY)
        while day < hi:
            self._commands(sim, day, series)
            day += DAY
        if sim.script_cmds is not None:
            series.merge(sim.script_cmds)
        return series

    def _account_sim(self, sim: _Sim, now: int, sign: int = 1) -> None:
        """Bring a generated SIM's part of the ledger up to ``now`` (``sign=-1``: take out all
        it put in). Its archive and sessions are one sequence in time order, of which the first
        ``acct_n`` are in the ledger; sessions only ever leave from the front, into the archive."""
        self._usage_params(sim)
        ledger = self._ledger
        bpp = sim.bpp
        archive = sim.archive
        stop = sim.acct_n if sign < 0 else len(archive) + len(sim.sessions)
        first = 0 if sign < 0 else sim.acct_n
        for i in range(first, stop):
            if i < len(archive):
                network, segments = archive[i]
                for ta, tb, up, down in segments:
                    ledger.add_data(network, ta, tb, up, down, sign)
            else:
                session = sim.sessions[i - len(archive)]
                network = self._network(sim, session)
                for ta, tb, up, down in session.usage_segments():
                    ledger.add_data(network, ta, tb, up * bpp, down * bpp, sign)
        sim.acct_n = 0 if sign < 0 else stop
        origin_day = self._origin - self._origin % DAY
        done = origin_day if sim.acct_cmd_day is None else sim.acct_cmd_day
        if sign < 0:
            for day in range(origin_day, done, DAY):
                self._commands(sim, day, ledger, -1)
            sim.acct_cmd_day = None
            return
        today = now - now % DAY
        for day in range(done, today + DAY, DAY):
            self._commands(sim, day, ledger)
        sim.acct_cmd_day = today + DAY

    def _untrack(self, sim: _Sim) -> None:
        """A script is about to change this SIM: from now on its usage is summed afresh."""
        if sim.scripted or sim.touched:
            sim.touched = True
            return
        if sim.acct_n or sim.acct_cmd_day is not None:
            self._account_sim(sim, self._now(), -1)
        sim.touched = True

    def account_usage_steps(self) -> Generator[None, None, None]:
        """Bring the account ledger up to now, yielding now and then so a server can answer
        other requests in between (the first time, every generated SIM is summed)."""
        now = self._now()
        for k, sim in enumerate(self._sims):
            if sim.scripted or sim.touched:
                continue
            self._extend(sim, now)
            self._account_sim(sim, now)
            if k % 50 == 49:
                yield
        self._ledger.drop_before(floor_hour(now - int(self.usage_retention)) - DAY)

    def _account_series(self, lo: int, hi: int) -> Series:
        for _ in self.account_usage_steps():
            pass
        series = Series()
        series.merge(self._ledger)
        for sim in self._sims:
            if sim.scripted or sim.touched:
                series.merge(self._sim_series(sim, lo, hi))
        return series

    def usage_listing(
        self,
        sim_sid: str | None = None,
        *,
        granularity: str = "all",
        start: int | None = None,
        end: int | None = None,
        final: bool = False,
    ) -> tuple[list[int], list[UsageView]]:
        """(paging keys, records) of ``GET /v1/Sims/{sim_sid}/UsageRecords`` (``sim_sid``
        ``None``: ``GET /v1/UsageRecords``) now, for ``[start, end]`` in simulated unix seconds
        (defaults: ``end`` now, ``start`` one calendar month before ``end``).

        Hours that touch the range are listed (up to now, not older than ``usage_retention``);
        periods are clipped to it. ``final``: every hour that has ended in full, as it will be
        once revised.
        The account's records sum the SIMs' bytes per hour before the lag's rounding, so they can
        be up to a byte per SIM and hour above the sum of the SIMs' records.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        now = self._now()
        qe = now if end is None else int(end)
        qs = month_before(qe) if start is None else int(start)
        lo = floor_hour(max(qs, now - int(self.usage_retention)))
        hi = max(lo, min(qe, now))
        if sim_sid is None:
            series = self._account_series(lo, hi)
            sid, units = None, "bytes"
        else:
            sim = self._sim(sim_sid)
            series = self._sim_series(sim, lo, hi)
            sid, units = sim.sid, sim.unit
        revision = self.usage_revision
        return build_records(
            series,
            sim_sid=sid,
            account_sid=self.account_sid,
            units=units,
            granularity=granularity,
            start=qs,
            end=qe,
            lo=lo,
            hi=hi,
            fraction=(
                (lambda hour: 1.0 if hour + HOUR <= now else 0.0)
                if final
                else (lambda hour: revision.fraction(hour, now))
            ),
        )

    def usage_records(
        self,
        sim_sid: str | None = None,
        *,
        granularity: str = "all",
        start: float | None = None,
        end: float | None = None,
        final: bool = False,
    ) -> list[UsageView]:
        """The usage records the API serves now (``final``: once fully revised); see
        :meth:`usage_listing`. ``sim_sid=None``: the account's."""
        return self.usage_listing(
            sim_sid,
            granularity=granularity,
            start=None if start is None else int(start),
            end=None if end is None else int(end),
            final=final,
        )[1]

    def usage_totals(
        self,
        sim_sid: str | None = None,
        *,
        start: float | None = None,
        end: float | None = None,
        final: bool = False,
    ) -> UsageTotals:
        """Bytes and commands over ``[start, end]`` as reported now (``final``: once fully
        revised), before any unit's rounding."""
        return totals_of(
            self.usage_records(sim_sid, granularity="hourly", start=start, end=end, final=final)
        )
