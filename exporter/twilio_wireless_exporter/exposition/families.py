"""The per-SIM metric families: what each SIM record of the fleet state becomes.

:class:`SimFamilies` is the only source of per-SIM samples. The incremental renderer
(``renderer.py``) asks it for one SIM's samples and formats them itself; as a
``prometheus_client`` collector it yields the same samples as stock metric families, which is
how the reference exposition (``reference.py``) renders them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from twilio_wireless_exporter.fleet.state import FleetState, SimRecord, SimUsage
from twilio_wireless_exporter.metrics_names import (
    IMEI_CHANGES,
    LAST_START,
    LAST_SUCCESS,
    LAST_UPDATED,
    LATITUDE,
    LONGITUDE,
    PACKETS_DOWN,
    PACKETS_UP,
    PER_SIM,
    SESSION_INFO,
    SESSION_INFO_IMEI,
    SESSIONS_ENDED,
    SESSIONS_OPEN,
    SESSIONS_STARTED,
    SIM_COMMANDS,
    SIM_DATA_BYTES,
    SIM_DATA_PERIOD_BILLED,
    SIM_DATA_PERIOD_BYTES,
    SIM_DATA_PERIOD_START,
    SIM_INFO,
    SIM_RESETTING,
    SIM_STATUS_CHANGES,
    SIM_UP,
    SIM_USAGE_LAST_SUCCESS,
    Family,
)

log = logging.getLogger(__name__)

Sample = tuple[Family, str, dict[str, str], float]
"""``(family, sample name, labels, value)``."""

# Sample names looked up once: a SIM's samples are made again on every change of the SIM.
_INFO = SIM_INFO.name
_UP = SIM_UP.name
_LAST_SUCCESS = LAST_SUCCESS.name
_OPEN = SESSIONS_OPEN.name
_STARTED = SESSIONS_STARTED.sample
_ENDED = SESSIONS_ENDED.sample
_UPLOADED = PACKETS_UP.sample
_DOWNLOADED = PACKETS_DOWN.sample
_IMEI_CHANGES = IMEI_CHANGES.sample
_SESSION_INFO = SESSION_INFO.name
_LATITUDE = LATITUDE.name
_LONGITUDE = LONGITUDE.name
_LAST_START = LAST_START.name
_LAST_UPDATED = LAST_UPDATED.name
_STATUS_CHANGES = SIM_STATUS_CHANGES.sample
_RESETTING = SIM_RESETTING.name
_DATA_BYTES = SIM_DATA_BYTES.sample
_PERIOD_BYTES = SIM_DATA_PERIOD_BYTES.name
_PERIOD_START = SIM_DATA_PERIOD_START.name
_PERIOD_BILLED = SIM_DATA_PERIOD_BILLED.name
_COMMANDS = SIM_COMMANDS.sample
_USAGE_LAST_SUCCESS = SIM_USAGE_LAST_SUCCESS.name
_NETWORKS = ("home", "national_roaming", "international_roaming")


class SimFamilies(Collector):
    """The per-SIM families of a :class:`FleetState` (``metrics_names.PER_SIM``, in that order).

    ``imei_label`` adds the device's IMEI to ``sim_session_info`` (``metrics.imei_label``);
    ``roaming_split`` splits the period's total by network (``usage.roaming_split``);
    ``billed`` adds the billed amount (``usage.billed``).
    ``on_error`` is called for each SIM whose samples cannot be rendered (see :meth:`failed`).
    ``keep`` holds the names of the families the exposition keeps (``metrics.include``,
    ``exclude`` and ``per_sim``; ``None``: all): the per-SIM ones are this collector's
    :attr:`families`, and the renderers apply the same set to the private registry's.
    ``sim_labels`` names the configured labels every per-SIM sample carries
    (``metrics.sim_labels``; ``None``: all); ``sim_info`` carries them all.
    """

    def __init__(
        self,
        state: FleetState,
        *,
        imei_label: bool = False,
        roaming_split: bool = False,
        billed: bool = False,
        on_error: Callable[[], None] | None = None,
        keep: Iterable[str] | None = None,
        sim_labels: Iterable[str] | None = None,
    ) -> None:
        self.state = state
        self.imei_label = imei_label
        self.roaming_split = roaming_split
        self.billed = billed
        self.on_error = on_error
        self.keep = None if keep is None else frozenset(keep)
        self.families: tuple[Family, ...] = tuple(
            family for family in PER_SIM if self.keep is None or family.name in self.keep
        )
        """The per-SIM families exposed, in ``PER_SIM``'s order."""
        dropped = len(self.families) < len(PER_SIM)
        self._kept = frozenset(f.name for f in self.families) if dropped else None
        self.sim_labels = None if sim_labels is None else frozenset(sim_labels)
        """The configured labels copied onto every per-SIM sample (``None``: all of them);
        ``sim_info`` always carries all of them."""
        self._failed_logged: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        """Every SIM's samples as stock metric families (the reference path); a SIM whose
        samples cannot be made is left out (:meth:`failed`), not the whole collection."""
        families = {
            family: Metric(family.name, family.help, family.kind) for family in self.families
        }
        for record in list(self.state.sims.values()):
            try:
                samples = [
                    (family, name, labels, float(value))
                    for family, name, labels, value in self.samples(record)
                ]
            except Exception:
                self.failed(record)
                continue
            for family, sample_name, labels, value in samples:
                families[family].add_sample(sample_name, labels, value)
        yield from families.values()

    def failed(self, record: SimRecord) -> None:
        """The last line of defence: one SIM's samples could not be rendered (a value the
        records check should have stopped). That SIM is left out and counted; logged once."""
        if self.on_error is not None:
            self.on_error()
        if record.sid not in self._failed_logged:
            self._failed_logged.add(record.sid)
            log.exception("cannot render the samples of SIM %s; it is left out", record.sid)

    def samples(self, record: SimRecord) -> Iterator[Sample]:
        """Every sample of one SIM in the families kept (grouped into families by the caller).

        Absent data yields no sample: a SIM never polled has only its info (no ``sim_up``),
        a SIM without a located session has no coordinates.
        """
        kept = self._kept
        if kept is None:
            return self._every_sample(record)
        if not kept:
            return iter(())
        return (sample for sample in self._every_sample(record) if sample[0].name in kept)

    def _every_sample(self, record: SimRecord) -> Iterator[Sample]:
        copied = self.sim_labels
        if copied is None:
            base = {"sim_sid": record.sid, **dict(record.labels)}
            identified = base
        else:
            base = {"sim_sid": record.sid, **{k: v for k, v in record.labels if k in copied}}
            identified = {"sim_sid": record.sid, **dict(record.labels)}
        ident = record.identity
        info = {
            **identified,
            "sim_name": ident.display_name,
            "unique_name": ident.unique_name,
            "friendly_name": ident.friendly_name,
            "status": ident.status,
            "rate_plan_sid": ident.rate_plan_sid,
        }
        yield SIM_INFO, _INFO, info, 1.0
        if record.up is not None:
            yield SIM_UP, _UP, base, 1.0 if record.up else 0.0
        if record.last_success is not None:
            yield LAST_SUCCESS, _LAST_SUCCESS, base, record.last_success
        if ident.status:
            yield SIM_STATUS_CHANGES, _STATUS_CHANGES, base, float(record.status_changes)
            yield SIM_RESETTING, _RESETTING, base, 1.0 if ident.resetting else 0.0
        if record.usage is not None:
            yield from self._usage_samples(record.usage, base)
        yield from self._session_samples(record, base)

    def _usage_samples(self, usage: SimUsage, base: dict[str, str]) -> Iterator[Sample]:
        ledger = usage.ledger
        yield SIM_DATA_BYTES, _DATA_BYTES, {**base, "direction": "upload"}, ledger.upload_total
        yield SIM_DATA_BYTES, _DATA_BYTES, {**base, "direction": "download"}, ledger.download_total
        period = usage.period
        if period is not None:
            bytes_ = SIM_DATA_PERIOD_BYTES
            yield bytes_, _PERIOD_BYTES, {**base, "direction": "upload"}, period.upload
            yield bytes_, _PERIOD_BYTES, {**base, "direction": "download"}, period.download
            networks = (period.home, period.national_roaming, period.international_roaming)
            if self.roaming_split and any(value is not None for value in networks):
                for network, value in zip(_NETWORKS, networks, strict=True):
                    labels = {**base, "direction": "total", "network": network}
                    yield bytes_, _PERIOD_BYTES, labels, value or 0
            else:  # also when the records break nothing down by network: the total, unsplit
                yield bytes_, _PERIOD_BYTES, {**base, "direction": "total"}, period.total
            yield SIM_DATA_PERIOD_START, _PERIOD_START, base, period.start
            if self.billed and period.billed is not None:
                labels = {**base, "billing_units": period.billing_units}
                yield SIM_DATA_PERIOD_BILLED, _PERIOD_BILLED, labels, period.billed
        commands = SIM_COMMANDS
        yield commands, _COMMANDS, {**base, "direction": "from_sim"}, ledger.commands_from_sim_total
        yield commands, _COMMANDS, {**base, "direction": "to_sim"}, ledger.commands_to_sim_total
        if usage.last_success is not None:
            yield SIM_USAGE_LAST_SUCCESS, _USAGE_LAST_SUCCESS, base, usage.last_success

    def _session_samples(self, record: SimRecord, base: dict[str, str]) -> Iterator[Sample]:
        acct = record.account
        if not acct.baselined:
            return
        yield SESSIONS_OPEN, _OPEN, base, float(acct.open_sessions)
        yield SESSIONS_STARTED, _STARTED, base, float(acct.started_total)
        yield SESSIONS_ENDED, _ENDED, base, float(acct.ended_total)
        yield PACKETS_UP, _UPLOADED, base, float(acct.packets_uploaded_total)
        yield PACKETS_DOWN, _DOWNLOADED, base, float(acct.packets_downloaded_total)
        yield IMEI_CHANGES, _IMEI_CHANGES, base, float(acct.imei_changes_total)
        latest = acct.latest
        if latest is not None:
            attrs = {
                **base,
                "radio_link": latest.radio_link,
                "operator_name": latest.operator_name,
                "operator_country": latest.operator_country,
                "operator_mcc": latest.operator_mcc,
                "operator_mnc": latest.operator_mnc,
            }
            if self.imei_label:
                attrs[SESSION_INFO_IMEI] = latest.imei
            yield SESSION_INFO, _SESSION_INFO, attrs, 1.0
        if acct.location is not None:
            yield LATITUDE, _LATITUDE, base, acct.location[0]
            yield LONGITUDE, _LONGITUDE, base, acct.location[1]
        if acct.latest_start is not None:
            yield LAST_START, _LAST_START, base, acct.latest_start
        if acct.last_updated is not None:
            yield LAST_UPDATED, _LAST_UPDATED, base, acct.last_updated
