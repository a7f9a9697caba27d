"""What one ``/metrics`` body holds: the sections a scrape asks for and the families kept.

A body is made of three sections, each a set of families declared in ``metrics_names``:
``sims`` (the per-SIM families, rendered incrementally), ``fleet`` (fleet-wide families and
the fleet aggregates) and ``exporter`` (the exporter's own health). The last two come from the
private registry; :class:`Tail` picks from it the families of the sections asked for that the
configuration keeps (``metrics.include``, ``metrics.exclude``), in the registry's order, and
counts their samples as they pass.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, MutableMapping
from typing import TypeAlias

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from twilio_wireless_exporter import metrics_names as names


class Section(enum.StrEnum):
    """A part of the exposition a scrape may ask for (``/metrics?collect[]=fleet``)."""

    FLEET = "fleet"
    SIMS = "sims"
    EXPORTER = "exporter"


Sections: TypeAlias = frozenset[Section]
"""The sections of one body."""

EVERY_SECTION: Sections = frozenset(Section)

_SECTIONS: dict[str, Section] = {family.name: Section.SIMS for family in names.PER_SIM} | {
    family.name: Section.FLEET for family in names.FLEET
}


def section_of(family: str) -> Section:
    """The section of a family (by name); one ``metrics_names`` does not list is the
    exporter's own."""
    return _SECTIONS.get(family, Section.EXPORTER)


class Tail(Collector):
    """The private registry's families of ``sections`` whose names ``keep`` holds (every one
    when ``keep`` is ``None``). With ``counts`` given, each family's number of samples is
    written there as the stock generator takes it."""

    def __init__(
        self,
        registry: CollectorRegistry,
        keep: frozenset[str] | None,
        sections: Sections = EVERY_SECTION,
        counts: MutableMapping[str, int] | None = None,
    ) -> None:
        self._registry = registry
        self._keep = keep
        self._sections = sections
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        keep, sections, counts = self._keep, self._sections, self._counts
        every = sections == EVERY_SECTION
        for metric in self._registry.collect():
            name = metric.name
            if keep is not None and name not in keep:
                continue
            if not every and section_of(name) not in sections:
                continue
            if counts is not None:
                counts[name] = len(metric.samples)
            yield metric
