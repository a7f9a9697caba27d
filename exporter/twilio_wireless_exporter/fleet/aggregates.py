"""Fleet aggregates: the per-SIM counters and gauges summed by group (``metrics.aggregate_by``).

Why: at 100,000 SIMs the per-SIM families are 1.7 million series; a few hundred groups (by
site, radio link, operator, rate plan ...) answer the fleet-wide questions at a fraction of
that, and keep answering them with ``metrics.per_sim: none``.

A group's counter is the sum of its current members' counters plus a *carried remainder*:
when a SIM leaves the group (its labels changed, or it is no longer monitored) or its own
counter starts again from zero (a fresh baseline), the count it had contributed stays with the
group. So every aggregate counter only grows, and it equals the sum of the per-SIM counters
as long as no SIM moved. The remainders (and which group each SIM was in) are kept in the
state file, so a restart continues them.

A label whose value is not known yet (the SIM's status before its first ``/v1/Sims`` read, its
radio link before its first session) keeps the value of the SIM's previous group, so a restart
does not move every SIM to an unlabelled group and back. At most ``max_groups`` groups are
made; SIMs that would open another go to the group whose every label is ``other``.

The work is incremental: only SIMs whose record changed since the previous update are looked
at again (their version), so an update of an unchanged fleet costs one pass of comparisons.
Pure: no I/O, no clock; the exposition asks for an update before it renders.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.fleet.accounting import SimAccount
from twilio_wireless_exporter.fleet.state import FleetState, SimRecord

GroupKey = tuple[str, ...]
"""The values of the ``aggregate_by`` labels, in their order."""

OTHER: Final = "other"

#: The labels ``aggregate_by`` may name besides the configured SIM labels, and where each is
#: read: the SIM's latest session, or its identity from ``/v1/Sims``.
_ATTRIBUTES: Final[dict[str, Callable[[SimRecord, SimAccount], str]]] = {
    "radio_link": lambda r, a: a.latest.radio_link if a.latest is not None else "",
    "operator_name": lambda r, a: a.latest.operator_name if a.latest is not None else "",
    "operator_country": lambda r, a: a.latest.operator_country if a.latest is not None else "",
    "status": lambda r, a: r.identity.status,
    "rate_plan_sid": lambda r, a: r.identity.rate_plan_sid,
}
ATTRIBUTE_LABELS: Final = tuple(_ATTRIBUTES)


@dataclass(frozen=True, slots=True)
class CounterSource:
    """One aggregated counter: a ``fleet_*`` family (with fixed extra labels, e.g. a
    direction) and how to read the matching per-SIM counter. ``value`` is only asked for SIMs
    with a baseline; a SIM without one counts 0.

    This is the hook for more aggregates: the data bytes of issue 11 are two more sources
    (``FLEET_DATA_BYTES`` with ``direction`` ``upload`` and ``download``) in
    :data:`DEFAULT_SOURCES`, reading the SIM's usage counters.
    """

    family: names.Family
    value: Callable[[SimRecord, SimAccount], float | None]
    """The SIM's counter; ``None`` while it is not known yet (usage held from the state file
    until the SIM's next usage read): the SIM then keeps contributing what it did before."""
    labels: tuple[tuple[str, str], ...] = ()
    needs_baseline: bool = True
    """Whether the counter is the session account's (0 until its baseline); usage counters
    have their own baseline, so a SIM's sessions starting afresh (a state row rejected) does
    not make its usage look restarted."""

    @property
    def key(self) -> str:
        """How the state file names this source: ``family{label=value,…}``."""
        inner = ",".join(f"{k}={v}" for k, v in self.labels)
        return f"{self.family.name}{{{inner}}}"


def _uploaded(record: SimRecord, _: SimAccount) -> float | None:
    return None if record.usage is None else record.usage.ledger.upload_total


def _downloaded(record: SimRecord, _: SimAccount) -> float | None:
    return None if record.usage is None else record.usage.ledger.download_total


DEFAULT_SOURCES: tuple[CounterSource, ...] = (
    CounterSource(names.FLEET_SESSIONS_STARTED, lambda r, a: a.started_total),
    CounterSource(names.FLEET_SESSIONS_ENDED, lambda r, a: a.ended_total),
    CounterSource(names.FLEET_PACKETS_UP, lambda r, a: a.packets_uploaded_total),
    CounterSource(names.FLEET_PACKETS_DOWN, lambda r, a: a.packets_downloaded_total),
    CounterSource(names.FLEET_DATA_BYTES, _uploaded, (("direction", "upload"),), False),
    CounterSource(names.FLEET_DATA_BYTES, _downloaded, (("direction", "download"),), False),
)

GAUGES: Final = (names.FLEET_SESSIONS_OPEN, names.FLEET_SIMS_UP, names.FLEET_SIMS_DOWN)
"""The aggregated gauges, in the order of :attr:`Group.gauges`: plain sums, nothing carried."""


def _contribution(values: Sequence[float] | None = None, width: int = 0) -> array[float]:
    """A member's counters: a flat array of doubles, not a list of float objects (one
    member per monitored SIM)."""
    return array("d", values) if values is not None else array("d", bytes(8 * width))


@dataclass(slots=True)
class Member:
    """What a SIM last contributed, and to which group."""

    key: GroupKey
    counters: array[float]
    gauges: tuple[int, int, int] = (0, 0, 0)
    record: SimRecord | None = None
    """The record seen at the last update (``None``: restored, not seen yet)."""
    version: int = -1


@dataclass(slots=True)
class Group:
    """One group: the carried remainders and the current members' sums, per source."""

    carried: list[float]
    members: list[float]
    gauges: list[int] = field(default_factory=lambda: [0, 0, 0])

    def counters(self) -> list[float]:
        return [c + m for c, m in zip(self.carried, self.members, strict=True)]


class FleetAggregates:
    """The aggregates of one :class:`FleetState` by the labels ``by``."""

    def __init__(
        self,
        by: Sequence[str] = (),
        *,
        max_groups: int = 1000,
        sources: Sequence[CounterSource] = DEFAULT_SOURCES,
    ) -> None:
        if max_groups < 1:
            raise ValueError("max_groups must be >= 1")
        self.by: GroupKey = tuple(by)
        self.max_groups = max_groups
        self.sources = tuple(sources)
        self.groups: dict[GroupKey, Group] = {}
        """Every group made so far (a group stays, so its counters never vanish)."""
        self.members: dict[str, Member] = {}
        self._other: GroupKey = (OTHER,) * len(self.by)
        self._readers = [
            (i, _ATTRIBUTES[name]) if name in _ATTRIBUTES else (i, None)
            for i, name in enumerate(self.by)
        ]
        self._values = [(source.value, source.needs_baseline) for source in self.sources]
        self._seen: tuple[int, int] | None = None  # (state version, held accounts) last update
        self._pending: (
            tuple[dict[GroupKey, Mapping[str, float]], dict[str, AggregateMember], str] | None
        ) = None
        """Restored remainders held until the file's account is confirmed."""

    # ------------------------------------------------------------------ updating

    def update(self, state: FleetState) -> None:
        """Take up what changed in ``state`` since the previous update."""
        for _ in self.steps(state):
            pass

    def steps(self, state: FleetState, every: int = 512) -> Iterator[None]:
        """:meth:`update` in steps: yields after every ``every`` SIMs taken up, so that the
        exposition's refresher can let the event loop run between them (the first update of a
        large fleet looks at every SIM). Each SIM is read whole at its step; what changes
        meanwhile is taken up by the next update."""
        if self._pending is not None:
            if state.unverified_account is not None:
                return  # the file's account is not confirmed yet: nothing is shown
            groups, remembered, account = self._pending
            self._pending = None
            if state.account_sid == account:
                self._apply(groups, remembered)
        held = state.restored
        seen = (state.version, len(held))
        if seen == self._seen:
            return
        # held accounts taken away without a poll (another account's file) change no version
        everything = self._seen is None or self._seen[1] != len(held)
        self._seen = seen
        members = self.members
        sims = state.sims
        touched = state.take_touched()  # what the state says changed since the last update
        if everything or touched is None:
            changed = list(sims)
        else:
            changed = [sid for sid in touched if sid in sims]
        new = False
        for taken, sid in enumerate(changed, 1):
            record = state.sims.get(sid)
            if record is None:
                continue  # dropped while the loop ran
            member = members.get(sid)
            new = new or member is None
            self._take(sid, record, state.restored.get(sid, record.account), member)
            if taken % every == 0:
                yield
        sims = state.sims
        if new or len(members) != len(sims):
            for sid in [sid for sid in members if sid not in sims]:
                self._leave(members.pop(sid))

    def _take(
        self, sid: str, record: SimRecord, account: SimAccount, member: Member | None
    ) -> None:
        key = self._group_of(record, account, member) if self.by else ()
        up = record.up
        # A counter not known yet (usage held until the SIM's next read) keeps what this SIM
        # contributed before, if it is the same SIM: the record seen last time, or the one
        # restored from the state file. A new record (the SIM left and came back) counts 0.
        same = member is not None and (member.record is None or member.record is record)
        prior = member.counters if same and member is not None else None
        baselined = account.baselined
        counters = [
            0.0
            if (needs and not baselined)
            else (0.0 if prior is None else prior[i])
            if (got := value(record, account)) is None
            else float(got)
            for i, (value, needs) in enumerate(self._values)
        ]
        if baselined:
            gauges = (account.open_sessions, int(up is True), int(up is False))
        else:
            gauges = (0, int(up is True), int(up is False))
        group = self.groups.get(key) or self._group(key)
        if member is None:
            member = self.members[sid] = Member(key, _contribution(width=len(counters)))
        elif member.key != key:
            self._leave(member)
            member.counters = _contribution(width=len(counters))
            member.gauges = (0, 0, 0)
            member.key = key
        else:
            self._subtract(group, member)
            for i, (old, now) in enumerate(zip(member.counters, counters, strict=True)):
                if now < old:  # the SIM's counter started again: its old count stays
                    group.carried[i] += old
        member.counters = _contribution(counters)
        member.gauges = gauges
        member.record = record
        member.version = record.version
        for i, value in enumerate(counters):
            group.members[i] += value
        for i, value in enumerate(gauges):
            group.gauges[i] += value

    def _leave(self, member: Member) -> None:
        """A member leaves its group: its count stays there as a carried remainder."""
        group = self.groups[member.key]
        self._subtract(group, member)
        for i, value in enumerate(member.counters):
            group.carried[i] += value

    @staticmethod
    def _subtract(group: Group, member: Member) -> None:
        for i, value in enumerate(member.counters):
            group.members[i] -= value
        for i, value in enumerate(member.gauges):
            group.gauges[i] -= value

    def _group_of(self, record: SimRecord, account: SimAccount, member: Member | None) -> GroupKey:
        if not self.by:
            return ()
        configured = dict(record.labels)
        previous = None if member is None or member.key == self._other else member.key
        values = []
        for i, read in self._readers:
            if read is None:
                values.append(configured.get(self.by[i], ""))
                continue
            value = read(record, account)
            if not value and previous is not None:
                value = previous[i]  # not known (yet): the SIM stays where it was
            values.append(value)
        key = tuple(values)
        if key in self.groups:
            return key
        made = len(self.groups) - (self._other in self.groups)
        return key if made < self.max_groups else self._other

    def _group(self, key: GroupKey) -> Group:
        group = self.groups.get(key)
        if group is None:
            count = len(self.sources)
            group = self.groups[key] = Group([0.0] * count, [0.0] * count)
        return group

    # ------------------------------------------------------------------ reading

    def labels(self, key: GroupKey) -> dict[str, str]:
        return dict(zip(self.by, key, strict=True))

    def totals(self) -> list[tuple[GroupKey, list[float], list[int]]]:
        """``(group, counter per source, gauge per GAUGES)`` for every group, sorted."""
        return [
            (key, group.counters(), list(group.gauges))
            for key, group in sorted(self.groups.items())
        ]

    # ------------------------------------------------------------------ the state file

    def remembered(self) -> tuple[dict[GroupKey, dict[str, float]], dict[str, AggregateMember]]:
        """What a restart needs: each group's carried remainders and each SIM's group and
        contribution, by source key."""
        keys = [source.key for source in self.sources]
        groups = {key: dict(zip(keys, g.carried, strict=True)) for key, g in self.groups.items()}
        members = {
            sid: AggregateMember(m.key, dict(zip(keys, m.counters, strict=True)))
            for sid, m in self.members.items()
        }
        return groups, members

    def restore(
        self,
        groups: Mapping[GroupKey, Mapping[str, float]],
        members: Mapping[str, AggregateMember],
        *,
        account: str | None = None,
    ) -> None:
        """Take up what :meth:`remembered` returned before a restart (keys of other lengths
        than ``by``, and sources this exporter does not have, are left out). Each SIM counts
        as contributing what it did, until its next update.

        ``account`` is the file's account SID when it is still to be checked against the
        API's answers (:meth:`FleetState.learn_account`): until then no aggregate is shown
        (the remainders may be another account's), then they are taken up, or dropped with
        the restored SIMs when the API answers for another account.
        """
        if account is not None:
            self._pending = (dict(groups), dict(members), account)
            return
        self._apply(groups, members)

    def _apply(
        self, groups: Mapping[GroupKey, Mapping[str, float]], members: Mapping[str, AggregateMember]
    ) -> None:
        keys = [source.key for source in self.sources]
        width = len(self.by)
        for key, carried in groups.items():
            if len(key) == width:
                group = self._group(key)
                group.carried = [float(carried.get(k, 0.0)) for k in keys]
        for sid, remembered in members.items():
            if len(remembered.key) != width:
                continue
            group = self._group(remembered.key)
            counters = [float(remembered.counters.get(k, 0.0)) for k in keys]
            self.members[sid] = Member(remembered.key, _contribution(counters))
            for i, value in enumerate(counters):
                group.members[i] += value
        self._seen = None


@dataclass(frozen=True, slots=True)
class AggregateMember:
    """A SIM's group and contribution (by source key), as the state file keeps them."""

    key: GroupKey
    counters: Mapping[str, float]
