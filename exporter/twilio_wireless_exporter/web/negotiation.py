"""Content negotiation of ``/metrics``: ``Accept`` and ``Accept-Encoding`` read once, here.

:func:`negotiate` decides what a scrape gets (text format or OpenMetrics, the escaping scheme,
gzip or not) and the ``Content-Type`` that says so; the renderers are handed the resulting
:class:`~twilio_wireless_exporter.exposition.formats.Encoding` and never see the headers.

The choice is ``prometheus_client``'s ``choose_encoder``, decision for decision (the tests
compare the two): the first ``application/openmetrics-text`` or ``text/plain`` entry that names
a version of at least 1.0.0 wins (OpenMetrics also without a version), weights are ignored, and
everything else gets the text format 0.0.4. One difference: a version whose comparison with 1.0.0
reaches a part that is not a number (``version=abc``) makes ``choose_encoder`` raise, while
here the entry is skipped like an old version.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.utils import parse_version

from twilio_wireless_exporter.exposition.formats import Encoding, Escaping, Format
from twilio_wireless_exporter.exposition.selection import EVERY_SECTION, Section, Sections

OPENMETRICS_TYPE = "application/openmetrics-text"
TEXT_TYPE = "text/plain"
_ESCAPINGS = {scheme.value: scheme for scheme in Escaping}
_SECTIONS = {section.value: section for section in Section}
COLLECT_PARAM = "collect[]"


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What one ``/metrics`` response is: its encoding, content type and compression."""

    encoding: Encoding
    content_type: str
    gzip: bool


def negotiate(accept: str, accept_encoding: str) -> Negotiated:
    """The response to a scrape with these ``Accept`` and ``Accept-Encoding`` headers."""
    encoding, content_type = choose(accept)
    return Negotiated(encoding, content_type, accepts_gzip(accept_encoding))


def choose(accept: str) -> tuple[Encoding, str]:
    """The encoding and ``Content-Type`` for an ``Accept`` header."""
    for entry in accept.split(","):
        media_type, *params = entry.split(";")
        media_type = media_type.strip()
        if media_type == OPENMETRICS_TYPE:
            version = _param(params, "version")
            if not version:
                return Encoding(Format.OPENMETRICS), om_format.CONTENT_TYPE_LATEST
            if _at_least_1(version):
                escaping = _escaping(params)
                return Encoding(Format.OPENMETRICS, escaping), (
                    f"{OPENMETRICS_TYPE}; version={version}; charset=utf-8; escaping={escaping}"
                )
        elif media_type == TEXT_TYPE:
            version = _param(params, "version")
            if version and _at_least_1(version):
                escaping = _escaping(params)
                return Encoding(Format.TEXT, escaping), (
                    f"{text_format.CONTENT_TYPE_LATEST}; escaping={escaping}"
                )
    return Encoding(Format.TEXT), text_format.CONTENT_TYPE_PLAIN_0_0_4


def _param(params: list[str], key: str) -> str:
    """The value of the first ``key=value`` parameter named ``key`` ("" when there is none)."""
    for param in params:
        name, sep, value = param.strip().partition("=")
        if sep and name == key:
            return value
    return ""


def _escaping(params: list[str]) -> Escaping:
    """The named escaping scheme; underscores when none or an unknown one is named."""
    return _ESCAPINGS.get(_param(params, "escaping"), Escaping.UNDERSCORES)


def _at_least_1(version: str) -> bool:
    """Whether a dotted version is 1.0.0 or later, compared as ``choose_encoder`` does (False
    where that comparison would raise: a part that is not a number decides it)."""
    try:
        return parse_version(version) >= (1, 0, 0)
    except TypeError:
        return False


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (a ``q=0`` weight refuses it)."""
    for part in accept_encoding.split(","):
        token, *params = (p.strip() for p in part.split(";"))
        if token.lower() not in ("gzip", "*"):
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        return weight > 0
    return False


class UnknownSectionError(ValueError):
    """A ``collect[]`` value that names no section; the message says which ones exist."""


def sections(collect: list[str]) -> Sections:
    """The sections ``/metrics?collect[]=…`` asks for, as node_exporter reads its
    ``collect[]``: none given means every section, repeated values count once. An unknown (or
    empty) value raises :class:`UnknownSectionError`, so that a typo is a 400, not a body that
    silently lacks what was meant."""
    if not collect:
        return EVERY_SECTION
    chosen = set()
    for value in collect:
        section = _SECTIONS.get(value)
        if section is None:
            shown = repr(value) if len(value) <= 40 else repr(value[:37] + "...")
            known = ", ".join(s.value for s in Section)
            raise UnknownSectionError(f"unknown {COLLECT_PARAM} value {shown}: use one of {known}")
        chosen.add(section)
    return frozenset(chosen)
