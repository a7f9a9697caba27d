"""The exposition formats a scrape may ask for, as values the renderers are handed.

The web layer turns ``Accept`` into an :class:`Encoding` once (``web/negotiation.py``); the
renderers only look at its fields. :func:`generate` is the ``prometheus_client`` generator that
writes an encoding, used for what the renderers take from the stock output (the exporter's
own metrics, the family headers, the reference exposition).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.registry import Collector


class Format(enum.Enum):
    """The text formats: Prometheus text (0.0.4, and 1.0.0 with its escaping schemes) and
    OpenMetrics (1.0.0 and later; 2.0.0 differs only in native histograms, which the exporter
    has none of)."""

    TEXT = "text"
    OPENMETRICS = "openmetrics"


class Escaping(enum.StrEnum):
    """How metric and label names outside the legacy character set are written (the values
    are ``prometheus_client``'s names of the schemes)."""

    UNDERSCORES = om_format.UNDERSCORES
    ALLOW_UTF8 = om_format.ALLOWUTF8
    DOTS = om_format.DOTS
    VALUES = om_format.VALUES


@dataclass(frozen=True, slots=True)
class Encoding:
    """What the body of one ``/metrics`` response is written in."""

    format: Format = Format.TEXT
    escaping: Escaping = Escaping.UNDERSCORES


TEXT = Encoding(Format.TEXT)
OPENMETRICS = Encoding(Format.OPENMETRICS)


def generate(encoding: Encoding, collector: Collector) -> bytes:
    """``collector`` written in ``encoding`` by ``prometheus_client``'s own generator."""
    if encoding.format is Format.OPENMETRICS:
        body: bytes = om_format.generate_latest(  # type: ignore[no-untyped-call]
            collector, escaping=encoding.escaping.value
        )
        return body
    return text_format.generate_latest(collector, escaping=encoding.escaping.value)
