"""Every family through ``prometheus_client``'s own generators, rebuilt on every scrape.

:class:`ReferenceExposition` is the plain path: the per-SIM families
(:class:`~twilio_wireless_exporter.exposition.families.SimFamilies`) followed by the exporter's
private registry, written by the stock generator. It is what the incremental renderer must
match byte for byte (the tests compare the two), the baseline the benchmark measures against,
and what serves the rare encodings the incremental renderer does not reproduce.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.formats import TEXT, Encoding, generate
from twilio_wireless_exporter.exposition.selection import EVERY_SECTION, Section, Sections, Tail


class ReferenceExposition(Collector):
    """The whole exposition of ``sims`` and ``registry`` as one collector (the families
    ``sims.keep`` holds); :meth:`text` and :meth:`gzip` also write some sections only."""

    def __init__(self, sims: SimFamilies, registry: CollectorRegistry, *, gzip_level: int = 1):
        self._sims = sims
        self._registry = registry
        self._gzip_level = gzip_level

    def collect(self) -> Iterable[Metric]:
        return self._of(EVERY_SECTION).collect()

    def _of(self, sections: Sections) -> Collector:
        return _Sections(self._sims, Tail(self._registry, self._sims.keep, sections), sections)

    def text(self, encoding: Encoding = TEXT, sections: Sections = EVERY_SECTION) -> bytes:
        return generate(encoding, self._of(sections))

    def gzip(self, encoding: Encoding = TEXT, sections: Sections = EVERY_SECTION) -> bytes:
        return gzip.compress(self.text(encoding, sections), compresslevel=self._gzip_level)

    async def render(
        self, encoding: Encoding, *, compress: bool, sections: Sections = EVERY_SECTION
    ) -> list[bytes]:
        """The response body as parts (one here), like the incremental renderer's."""
        return [self.gzip(encoding, sections) if compress else self.text(encoding, sections)]


class _Sections(Collector):
    def __init__(self, sims: SimFamilies, tail: Tail, sections: Sections) -> None:
        self._sims = sims
        self._tail = tail
        self._sections = sections

    def collect(self) -> Iterable[Metric]:
        if Section.SIMS in self._sections:
            yield from self._sims.collect()
        yield from self._tail.collect()
