"""What the poller has learned: per-SIM records and fleet-wide aggregates.

The poller is the only writer; the exposition layer only reads. Every change bumps a SIM's
``version`` so renderers can cache per-SIM output and redo only what changed.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from twilio_wireless_exporter.api.usage import Usage
from twilio_wireless_exporter.fleet.accounting import (
    ListingOutcome,
    SimAccount,
    add_saturating,
    shared,
)
from twilio_wireless_exporter.fleet.usage import (
    PeriodUsage,
    UsageLedger,
    UsageOutcome,
    apply_usage,
    period_usage,
)

_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")


def is_account_sid(value: object) -> bool:
    """Whether ``value`` has the shape of an Account SID (``AC`` and 32 hex digits)."""
    return isinstance(value, str) and _ACCOUNT_SID.match(value) is not None


SESSION_DURATION_BUCKETS: tuple[float, ...] = (
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    2 * 3600.0,
    6 * 3600.0,
    12 * 3600.0,
    86400.0,
    2 * 86400.0,
    4 * 86400.0,
    7 * 86400.0,
)


class SimIdentity(msgspec.Struct, gc=False):
    """What is known about a SIM besides its sessions (config and ``/v1/Sims``)."""

    name: str = ""
    unique_name: str = ""
    friendly_name: str = ""
    status: str = ""
    rate_plan_sid: str = ""
    resetting: bool = False
    """Whether ``reset_status`` said a connectivity reset is in progress."""

    @property
    def display_name(self) -> str:
        """The configured name, else the friendly name, else the unique name ("" if none)."""
        return self.name or self.friendly_name or self.unique_name


class SimUsage(msgspec.Struct, gc=False):
    """What the usage records told of one SIM (or, without ``period``, of the account)."""

    ledger: UsageLedger = msgspec.field(default_factory=UsageLedger)
    period: PeriodUsage | None = None
    last_success: float | None = None


class PlanInfo(msgspec.Struct, frozen=True, gc=False):
    """A rate plan of the account, as ``/v1/RatePlans`` lists it (limits in bytes)."""

    sid: str
    unique_name: str = ""
    friendly_name: str = ""
    data_metering: str = ""
    data_enabled: bool | None = None
    national_roaming_enabled: bool | None = None
    limits: tuple[tuple[str, int], ...] = ()
    """``(network, bytes per metering period)`` for the networks the plan limits."""


class SimRecord(msgspec.Struct, gc=False):
    """One SIM. Like the accounting records, not tracked by the cyclic garbage collector: it
    refers only to strings, tuples of strings and records that never refer back."""

    sid: str
    labels: tuple[tuple[str, str], ...] = ()
    identity: SimIdentity = msgspec.field(default_factory=SimIdentity)
    account: SimAccount = msgspec.field(default_factory=SimAccount)
    up: bool | None = None
    """``None`` until the first poll finished, then whether the latest poll succeeded."""
    last_success: float | None = None
    last_attempt: float | None = None
    last_error: str | None = None
    usage: SimUsage | None = None
    """``None`` until the SIM's first successful usage read."""
    status_changes: int = 0
    version: int = 0


@dataclass(slots=True)
class Histogram:
    """A cumulative-at-render histogram: per-bucket counts, sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, cumulative count)`` pairs, ending with ``+Inf``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class FleetState:
    """All SIM records plus the fleet-wide session duration histogram."""

    def __init__(self) -> None:
        self.sims: dict[str, SimRecord] = {}
        self.durations: dict[str, Histogram] = {}
        self.version = 0
        self.restored: dict[str, SimAccount] = {}
        """Accounts loaded from the state file, each held until its SIM's next successful poll."""
        self._held_durations: dict[str, Histogram] | None = None
        self._awaiting_poll: set[str] = set()
        self.account_sid: str | None = None
        """The account the API answers for, from the first answer that names it."""
        self.unverified_account: str | None = None
        """The account SID of a restored state file not yet checked against the API."""
        self.restored_usage: dict[str, UsageLedger] = {}
        """Usage ledgers from the state file, each held until its SIM's next usage read."""
        self.restored_status: dict[str, tuple[str, int]] = {}
        """``(status, status changes)`` from the state file, held until the SIM's identity is
        next read (a change while the exporter was down is counted then)."""
        self.account_usage = SimUsage()
        self.restored_account_usage: UsageLedger | None = None
        self.rate_plans: dict[str, PlanInfo] = {}
        self._by_status: dict[tuple[str, str], int] | None = None  # see sims_by_status
        self._touched: set[str] | None = None  # see take_touched

    # ------------------------------------------------------------------ membership

    def ensure(
        self, sid: str, labels: Mapping[str, str] | None = None, name: str = ""
    ) -> SimRecord:
        """The record of ``sid``, created if new; configured labels and name are (re)applied."""
        record = self.sims.get(sid)
        if record is None:
            record = SimRecord(sid=sid)
            self.sims[sid] = record
            self._by_status = None
            self._touch(record)
        new_labels = tuple(sorted((labels or {}).items()))
        if new_labels != record.labels or name != record.identity.name:
            record.labels = new_labels
            record.identity.name = name
            self._touch(record)
        return record

    def arrange(self, key: Callable[[str], float]) -> bool:
        """Order the SIMs by ``key`` of their SID (the order of ``/metrics``); True if moved.

        The poller passes each SIM's place in the poll interval: SIMs polled one after the
        other then sit side by side, so the changes of any second touch a few cached blocks of
        the exposition, not all of them (less to re-render and re-compress per scrape).
        """
        order = sorted(self.sims, key=key)
        if order == list(self.sims):
            return False
        self.sims = {sid: self.sims[sid] for sid in order}
        self.version += 1
        return True

    def retain(self, sids: Iterable[str]) -> list[str]:
        """Drop every SIM not in ``sids`` (e.g. removed from discovery); returns the dropped."""
        keep = set(sids)
        dropped = [sid for sid in self.sims if sid not in keep]
        for sid in dropped:
            del self.sims[sid]
        if dropped:
            self._by_status = None
            self.version += 1
        for held in (self.restored, self.restored_usage, self.restored_status):
            for sid in [sid for sid in held if sid not in keep]:
                del held[sid]
        self._polled(*(sid for sid in list(self._awaiting_poll) if sid not in keep))
        return dropped

    # ------------------------------------------------------------------ restored state

    def restore(self, accounts: Mapping[str, SimAccount], durations: dict[str, Histogram]) -> None:
        """Take up state loaded from the state file, held back until the SIMs are polled again.

        The file may be older than what was shown just before a crash, and Prometheus would read
        older, lower counters as a counter reset. So each SIM keeps its restored account out of
        sight until its next successful poll (:meth:`resume`), which counts on top of it what
        happened since the file was written; and the fleet-wide duration histogram (restored
        plus new observations) stays out of sight until every restored SIM was polled once.
        """
        self.restored = dict(accounts)
        self._held_durations = durations
        self.durations = {}
        self._awaiting_poll = set(accounts)
        self._polled()

    def learn_account(self, account_sid: str | None) -> bool:
        """Note the account an API answer names; True if that shows the restored state to be
        another account's, which is then dropped (those SIMs start a fresh baseline)."""
        if self.account_sid is not None or account_sid is None or not is_account_sid(account_sid):
            return False
        self.account_sid = account_sid
        expected, self.unverified_account = self.unverified_account, None
        if expected is None or expected == account_sid:
            return False
        self.restored = {}
        self.restored_usage = {}
        self.restored_status = {}
        self.restored_account_usage = None
        if self._held_durations is not None:
            self._held_durations = None
            self._awaiting_poll = set()
        self.version += 1
        return True

    def resume(self, record: SimRecord) -> SimAccount:
        """The account to fold a successful listing into: the restored one, if still held."""
        account = self.restored.pop(record.sid, None)
        if account is not None:
            record.account = account
        return record.account

    def duration_histograms(self) -> dict[str, Histogram]:
        """The session duration histograms, including held ones (for saving)."""
        return self.durations if self._held_durations is None else self._held_durations

    def _polled(self, *sids: str) -> None:
        """Note polls of restored SIMs; show the histogram once none is left to poll."""
        if self._held_durations is None:
            return
        self._awaiting_poll.difference_update(sids)
        if not self._awaiting_poll:
            self.durations, self._held_durations = self._held_durations, None
            self.version += 1

    # ------------------------------------------------------------------ updates

    def set_identity(
        self,
        sid: str,
        *,
        unique_name: str | None,
        friendly_name: str | None,
        status: str | None,
        rate_plan_sid: str | None,
        reset_status: str | None = None,
    ) -> None:
        """What ``/v1/Sims`` says of a SIM. A status other than the one known before counts
        as a change (the status restored from the state file included)."""
        record = self.sims.get(sid)
        if record is None:
            return
        ident = record.identity
        previous = ident.status
        if not previous:
            restored = self.restored_status.pop(sid, None)
            if restored is not None:
                previous, record.status_changes = restored
        status = status or ""
        if previous and status and status != previous:
            record.status_changes = add_saturating(record.status_changes, 1)
            self._touch(record)
        new = (unique_name or "", friendly_name or "", shared(status), shared(rate_plan_sid))
        resetting = reset_status == "resetting"
        if (
            new != (ident.unique_name, ident.friendly_name, ident.status, ident.rate_plan_sid)
            or resetting != ident.resetting
        ):
            if (status, new[3]) != (ident.status, ident.rate_plan_sid):
                self._by_status = None
            ident.unique_name, ident.friendly_name, ident.status, ident.rate_plan_sid = new
            ident.resetting = resetting
            self._touch(record)

    def record_usage(
        self, sid: str, records: Sequence[Usage], *, window_start: int, period: float, now: float
    ) -> UsageOutcome | None:
        """Fold a successful read of a SIM's usage records into its ledger (the restored one
        first, if still held); ``period`` is the start of its metering period."""
        record = self.sims.get(sid)
        if record is None:
            return None
        usage = record.usage
        if usage is None:
            held = self.restored_usage.pop(sid, None)
            usage = record.usage = SimUsage(UsageLedger() if held is None else held)
        outcome = apply_usage(usage.ledger, records, window_start)
        usage.period = period_usage(records, period)
        usage.last_success = now
        self._touch(record)
        return outcome

    def record_account_usage(
        self, records: Sequence[Usage], *, window_start: int, now: float
    ) -> UsageOutcome:
        """Fold a successful read of the account's usage records into its ledger."""
        usage = self.account_usage
        held, self.restored_account_usage = self.restored_account_usage, None
        if held is not None and not usage.ledger.baselined:
            usage.ledger = held
        outcome = apply_usage(usage.ledger, records, window_start)
        usage.last_success = now
        self.version += 1
        return outcome

    def set_rate_plans(self, plans: Iterable[PlanInfo]) -> None:
        """The account's rate plans, as listed now (replacing the previous listing)."""
        fresh = {plan.sid: plan for plan in plans}
        if fresh != self.rate_plans:
            self.rate_plans = fresh
            self.version += 1

    def sims_by_status(self) -> dict[tuple[str, str], int]:
        """Monitored SIMs by ``(status, rate_plan_sid)`` (``""`` where unknown); counted again
        only after a SIM came, went or changed status or plan, not on every scrape."""
        counts = self._by_status
        if counts is None:
            counts = {}
            for record in self.sims.values():
                ident = record.identity
                key = (ident.status, ident.rate_plan_sid)
                counts[key] = counts.get(key, 0) + 1
            self._by_status = counts
        return counts

    def record_success(self, sid: str, outcome: ListingOutcome, now: float) -> None:
        record = self.sims.get(sid)
        if record is None:
            return
        record.up = True
        record.last_success = now
        record.last_attempt = now
        record.last_error = None
        durations = self.duration_histograms()
        for radio_link, seconds in outcome.durations:
            hist = durations.get(radio_link)
            if hist is None:
                hist = durations[radio_link] = Histogram(SESSION_DURATION_BUCKETS)
            hist.observe(seconds)
        self._touch(record)
        self._polled(sid)

    def record_failure(self, sid: str, error: str, now: float) -> None:
        record = self.sims.get(sid)
        if record is None:
            return
        changed = record.up is not False
        record.up = False
        record.last_attempt = now
        record.last_error = error
        if changed:
            self._touch(record)
        self._polled(sid)

    def _touch(self, record: SimRecord) -> None:
        record.version += 1
        self.version += 1
        touched = self._touched
        if touched is not None:
            touched.add(record.sid)

    def take_touched(self) -> set[str] | None:
        """The SIDs whose record changed since the previous call, and start over; ``None`` on
        the first call, which starts the tracking (the caller then looks at every SIM). Lets
        the fleet aggregates take up a poll's changes without a pass over the whole fleet."""
        touched, self._touched = self._touched, set()
        return touched

    # ------------------------------------------------------------------ summaries

    def counts(self) -> tuple[int, int, int, int]:
        """(monitored, up, down, never polled)."""
        up = down = pending = 0
        for record in self.sims.values():
            if record.up is None:
                pending += 1
            elif record.up:
                up += 1
            else:
                down += 1
        return len(self.sims), up, down, pending

    def all_polled(self) -> bool:
        return all(record.up is not None for record in self.sims.values())
