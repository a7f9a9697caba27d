"""Incremental exposition of the fleet: ``/metrics`` for a large fleet without re-rendering it.

The stock ``prometheus_client`` generators rebuild every sample line on every scrape, which at
thousands of SIMs takes longer than a scrape should. :class:`Exposition` keeps the rendered text
of every per-SIM family and re-renders a SIM only when its
:attr:`~twilio_wireless_exporter.fleet.state.SimRecord.version` changed since the previous
scrape. The samples themselves come from
:class:`~twilio_wireless_exporter.exposition.families.SimFamilies`, the one source of per-SIM
samples; only the formatting is done here (same rules as ``prometheus_client``: labels sorted
by name, values as Go floats, label values escaped for backslash, double quote and newline).
The rest of the body (the fleet-wide families and the exporter's own metrics) is the stock
generator's output for the exporter's private registry, which holds no per-SIM family: the two
parts are put side by side, neither knows of the other.

Layout: the text of each per-SIM family is cut into *blocks* of ``block_size`` consecutive SIMs
(one ``bytes`` object per block plus the end offset of each SIM's fragment). A changed SIM
splices its new fragment into the blocks of the families whose text really changed, so a poll
that only moves ``last_poll_success`` touches one block of one family.

gzip: every block is deflated on its own into a byte-aligned piece (a fresh compressor ended by
a sync flush, so pieces can be concatenated) and the piece is cached until the block changes.
A response is one ordinary gzip member: header, the cached pieces, the freshly compressed tail
(the fleet-wide families and the exporter's own metrics, from the registry's stock generator)
ending the deflate stream, then the CRC-32 and length of the whole text. Compression of changed
blocks runs in a worker thread (zlib releases the GIL); the rendering of SIM records stays on
the event loop, where the poller mutates them, and yields to the loop every ``_YIELD_EVERY`` SIMs.

Formats: the Prometheus text format and OpenMetrics share the sample lines; only the family
headers and the tail differ. The caller says which :class:`~.formats.Encoding` it wants (the web
layer negotiates it). The ``dots`` and ``values`` escaping schemes rewrite metric and label names
(``dots`` doubles every underscore, ``values`` prefixes OpenMetrics sample names with ``U__``,
as ``prometheus_client`` writes them): their blocks are derived from the cached ones, name by
name, when first asked for and again only when a block changes, on the event loop in small
steps; their gzip bodies are compressed whole in a worker thread. No encoding is rendered from
scratch on a scrape: only label names outside the legacy character set (which the configuration
does not accept) send the schemes other than underscores to the
:class:`~.reference.ReferenceExposition` (see :meth:`Exposition.render`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import struct
import zlib
from array import array
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.registry import Collector

from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.formats import TEXT, Encoding, Escaping, Format, generate
from twilio_wireless_exporter.exposition.reference import ReferenceExposition
from twilio_wireless_exporter.exposition.selection import EVERY_SECTION, Section, Sections, Tail
from twilio_wireless_exporter.fleet.state import SimRecord
from twilio_wireless_exporter.metrics_names import EXPOSITION_SERIES, Family

log = logging.getLogger(__name__)

_SERIES_GAUGE = EXPOSITION_SERIES.name

_INF = float("inf")
_EMPTY = b""
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, OS unknown
_YIELD_EVERY = 64  # SIMs rendered between two yields to the event loop
_SPLICE_YIELD_EVERY = 8  # blocks (of every family) spliced between two yields
#: Escaping schemes the cached lines are written in: underscores always, allow-utf-8 while every
#: label name is a legacy one (then both schemes write the same bytes).
_CACHED_ESCAPINGS = frozenset({Escaping.UNDERSCORES, Escaping.ALLOW_UTF8})
#: In a sample line: the sample name (at the start of a line), or one label's name and the rest
#: of the pair (the quoted value, matched whole so that nothing inside it is taken for a name).
_NAMES = re.compile(
    rb'^([a-zA-Z_:][a-zA-Z0-9_:]*)|([a-zA-Z_][a-zA-Z0-9_]*)(="(?:[^"\\\n]|\\.)*")', re.MULTILINE
)


def format_value(value: float) -> str:
    """A sample value exactly as ``prometheus_client.utils.floatToGoString`` writes it."""
    d = float(value)
    if d == _INF:
        return "+Inf"
    if d == -_INF:
        return "-Inf"
    if d != d:
        return "NaN"
    s = repr(d)
    if d > 0:
        dot = s.find(".")
        if dot > 6:  # Go switches to exponents sooner than Python
            mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
            return f"{mantissa}e+{dot - 1:02d}"
    return s


def escape_label_value(value: str) -> str:
    """Backslash, newline and double quote escaped, as both text formats require."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@functools.lru_cache(maxsize=1024)
def _label_name(name: str) -> tuple[str, bool]:
    """The label name as the stock generators write it (underscore escaping), and whether it
    is a legacy name (the same in every escaping scheme)."""
    escaped = om_format.escape_label_name(name, om_format.UNDERSCORES)
    return escaped, escaped == name  # underscore escaping changes exactly the non-legacy names


def label_string(labels: Mapping[str, str]) -> tuple[str, bool]:
    """``k="v",…`` sorted by name (without braces) and whether every name is a legacy name."""
    parts = []
    legacy = True
    for key, val in sorted(labels.items()):
        name, ok = _label_name(key)
        legacy = legacy and ok
        parts.append(f'{name}="{escape_label_value(val)}"')
    return ",".join(parts), legacy


class _Headers(Collector):
    """The per-SIM families without samples: their headers, written by the stock generators."""

    def __init__(self, families: tuple[Family, ...]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        for family in self._families:
            yield Metric(family.name, family.help, family.kind)


def _headers(encoding: Encoding, families: tuple[Family, ...]) -> list[bytes]:
    """``# HELP``/``# TYPE`` lines of each per-SIM family, byte for byte as the stock output."""
    count = len(families)
    if not count:
        return []
    text = generate(encoding, _Headers(families)).decode()
    if encoding.format is Format.OPENMETRICS:
        text = text.removesuffix("# EOF\n")
    lines = text.splitlines(keepends=True)
    per_family = len(lines) // count
    if per_family * count != len(lines):
        raise RuntimeError("unexpected header layout from prometheus_client")
    return ["".join(lines[i * per_family : (i + 1) * per_family]).encode() for i in range(count)]


@functools.lru_cache(maxsize=4096)
def _escaped_sample_name(name: bytes, encoding: Encoding) -> bytes:
    """A legacy sample name as ``prometheus_client`` writes it in ``encoding``."""
    text, scheme = name.decode(), encoding.escaping.value
    if encoding.format is Format.OPENMETRICS:
        escaped = om_format._escape(text, scheme, om_format._is_legacy_labelname_rune)
    else:
        escaped = om_format.escape_metric_name(text, scheme)
    return escaped.encode()


@functools.lru_cache(maxsize=4096)
def _escaped_label_name(name: bytes, escaping: Escaping) -> bytes:
    return om_format.escape_label_name(name.decode(), escaping.value).encode()


def escape_block(data: bytes, encoding: Encoding) -> bytes:
    """Sample lines written with legacy names (underscore escaping), rewritten in
    ``encoding``'s escaping scheme; label values are left as they are."""

    def rename(match: re.Match[bytes]) -> bytes:
        sample = match[1]
        if sample is not None:
            return _escaped_sample_name(sample, encoding)
        return _escaped_label_name(match[2], encoding.escaping) + match[3]

    return _NAMES.sub(rename, data)


def _identical_escaping(encoding: Encoding) -> bool:
    """Whether legacy names are written the same as with underscore escaping."""
    if encoding.escaping in _CACHED_ESCAPINGS:
        return True
    # values: legacy names stay in the text format; OpenMetrics sample names get U__
    return encoding.escaping is Escaping.VALUES and encoding.format is Format.TEXT


def _deflate_piece(data: bytes, level: int) -> bytes:
    """Raw deflate of ``data`` ending byte-aligned and not final: pieces concatenate."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def _deflate_last(data: bytes, level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH)


class _Block:
    """The text of one family for up to ``block_size`` consecutive SIMs."""

    __slots__ = ("data", "ends", "gz", "lines", "variants")

    def __init__(self, fragments: list[bytes]) -> None:
        self.data = b"".join(fragments)
        self.ends = array("I", accumulate(len(f) for f in fragments))
        self.lines = self.data.count(b"\n")
        """Sample lines (series) in the block, counted once per change."""
        self.gz: bytes | None = None
        self.variants: dict[Encoding, bytes] | None = None
        """``data`` in other escaping schemes, made when asked for."""

    def fragment(self, j: int) -> bytes:
        start = self.ends[j - 1] if j else 0
        return self.data[start : self.ends[j]]

    def splice(self, replacements: Mapping[int, bytes]) -> None:
        """Replace the fragments at the given in-block positions.

        Copies the unchanged runs between replacements as a few slices (usually one SIM of a
        block changed: three pieces), then shifts the end offsets after the first change.
        """
        if not replacements:
            return
        ends = self.ends
        view = memoryview(self.data)
        order = sorted(replacements)
        pieces: list[bytes | memoryview] = []
        previous = 0
        for j in order:
            pieces.append(view[previous : ends[j - 1] if j else 0])
            pieces.append(replacements[j])
            previous = ends[j]
        pieces.append(view[previous:])
        first = order[0]
        new_ends = ends[:first]
        shift = 0
        for k in range(first, len(ends)):
            new = replacements.get(k)
            if new is not None:
                shift += len(new) - (ends[k] - (ends[k - 1] if k else 0))
            new_ends.append(ends[k] + shift)
        self.data = b"".join(pieces)
        self.ends = new_ends
        self.lines = self.data.count(b"\n")
        self.gz = None
        self.variants = None


@dataclass(slots=True)
class RefreshStats:
    rendered: int = 0
    """SIMs whose lines were rendered again."""
    blocks_changed: int = 0
    relayout: bool = False
    """Membership changed: blocks were rebuilt from scratch (from cached fragments where valid)."""


class Exposition:
    """The per-SIM families of ``sims``, cached per SIM, followed by ``registry``'s families.

    ``registry`` is the exporter's private registry (fleet-wide and self metrics; see
    :func:`~twilio_wireless_exporter.exposition.collector.build_registry`), written by the stock
    generator on every scrape. Call it from one thread: the event loop that owns the state.
    """

    def __init__(
        self,
        sims: SimFamilies,
        registry: CollectorRegistry,
        *,
        block_size: int = 128,
        gzip_level: int = 1,
        max_series: int | None = None,
        companions: Sequence[Callable[[], Iterable[None]]] = (),
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self._sims = sims
        self._state = sims.state
        self._registry = registry
        self._reference = ReferenceExposition(sims, registry, gzip_level=gzip_level)
        self._block_size = block_size
        self._gzip_level = gzip_level
        self._order: list[str] = []
        self._records: list[SimRecord] = []
        self._versions = array("q")
        self._families = sims.families
        self._family_index = {family.name: i for i, family in enumerate(self._families)}
        self._blocks: list[list[_Block]] = [[_Block([])] for _ in self._families]
        self._legacy_names = True
        self._generation = 0
        self._headers = {fmt: _headers(Encoding(fmt), self._families) for fmt in Format}
        self._escaped_headers: dict[Encoding, list[bytes]] = {}
        self._header_gz: dict[Format, list[bytes]] = {}
        self._crc: dict[Format, tuple[int, int, int]] = {}  # fmt -> (generation, crc, size)
        self._lock = asyncio.Lock()
        self._scraped = False
        self._sims_scraped = False
        self._queued: dict[_Key, asyncio.Future[list[bytes]]] = {}
        self._max_series = max_series
        self._companions = tuple(companions)
        """Work that the refresher also brings up to date between scrapes, in steps (the
        fleet aggregates): a scrape then only does what changed since."""
        self._over_max = False
        self._sim_series: tuple[int, list[int]] = (-1, [])  # (generation, per family)
        self.series: dict[str, int] = {}
        """Series per family in the latest whole body (every section), counted as it was
        made: the lines of the cached blocks and the samples of the registry's families."""

    # ------------------------------------------------------------------ public API

    async def render(
        self, encoding: Encoding, *, compress: bool, sections: Sections = EVERY_SECTION
    ) -> list[bytes]:
        """The response body in ``encoding``, gzipped if asked, as parts to send one after the
        other (their concatenation is the body). ``sections`` are the parts of the exposition
        the scrape asked for (``collect[]``), each served from the same cache.

        The parts are the cached blocks themselves, not a copy: blocks are immutable ``bytes``
        replaced on change, so the list is a consistent snapshot however long sending takes,
        and a large body costs no join on the event loop.
        The other escaping schemes are derived from the cached blocks (see the module's
        docstring); only with label names outside the legacy set does the reference exposition
        serve them.
        Concurrent scrapes share work: a request that finds a render of the same body queued
        (not yet started) waits for that one, so every response still reflects the state at or
        after its request's arrival, and many scrapers at once cost about one render.
        """
        key = (encoding, compress, sections)
        queued = self._queued.get(key)
        if queued is None:
            queued = asyncio.ensure_future(self._render_next(key))
            queued.add_done_callback(_retrieve)
            self._queued[key] = queued
        # shielded: a scraper that goes away does not cancel the render others wait for
        return await asyncio.shield(queued)

    async def _render_next(self, key: _Key) -> list[bytes]:
        encoding, compress, sections = key
        async with self._lock:
            # Started: requests arriving from now on queue the next render.
            self._queued.pop(key, None)
            self._scraped = True
            if Section.SIMS not in sections:  # the registry's families only: no SIM is touched
                return await self._tail_only(encoding, sections, compress)
            self._sims_scraped = True
            await self._refresh_locked()
            if not self._reproducible(encoding):
                return await self._reference.render(encoding, compress=compress, sections=sections)
            if not _identical_escaping(encoding):
                await self._escape_stale(encoding)
                parts = self._escaped_parts(encoding, sections)
                if not compress:
                    return parts
                # rare encodings: no cached pieces, the whole body is compressed off the loop
                return [await asyncio.to_thread(_gzip_whole, parts, self._gzip_level)]
            if not compress:
                return self._text_parts(encoding, sections)
            fmt = encoding.format
            cached = self._crc.get(fmt)
            middle = None if cached and cached[0] == self._generation else self._middle(fmt)
            crc = await self._deflate_stale(middle)
            if crc is not None:
                self._crc[fmt] = (self._generation, *crc)
            return self._gzip_parts(encoding, sections)

    async def _tail_only(
        self, encoding: Encoding, sections: Sections, compress: bool
    ) -> list[bytes]:
        """A body without the per-SIM section: the registry's stock output (the stock
        generator writes every escaping), gzipped in a worker thread if asked for."""
        tail = self._tail(encoding, sections)
        if not compress:
            return [tail]
        return [await asyncio.to_thread(_gzip_whole, [tail], self._gzip_level)]

    async def keep_fresh(
        self, interval: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        """Bring the cache up to date every ``interval`` seconds, until cancelled.

        Without it a scrape renders everything that changed since the previous scrape: with
        SIMs polled as often as they are scraped, that is every SIM, in the scrape. With it a
        scrape renders only what changed since the latest refresh.
        Starts working once ``/metrics`` has been asked for (no one scrapes: no cost), and
        keeps the gzip pieces fresh as well once a gzip body has been asked for; the per-SIM
        cache only once a body with the ``sims`` section has been.
        """
        while True:
            await sleep(interval)
            if not self._scraped:
                continue
            async with self._lock:
                if self._sims_scraped:
                    await self._refresh_locked()
                for companion in self._companions:
                    for _ in companion():
                        await asyncio.sleep(0)
                if self._header_gz:
                    await self._deflate_stale(None)

    async def _refresh_locked(self) -> None:
        for _ in self._refresh_steps(RefreshStats()):
            await asyncio.sleep(0)

    async def _deflate_stale(self, middle: list[bytes] | None) -> tuple[int, int] | None:
        """Compress the blocks changed since their last compression, and take the CRC and
        size of ``middle`` if given (under the lock: no block changes meanwhile)."""
        stale = self._stale_blocks()
        if not stale and middle is None:
            return None
        # zlib releases the GIL: compression and the CRC run beside the event loop.
        datas = [b.data for b in stale]
        pieces, crc = await asyncio.to_thread(self._deflate_and_crc, datas, middle)
        for block, piece in zip(stale, pieces, strict=True):
            block.gz = piece
        return crc

    def refresh(self) -> RefreshStats:
        """Bring the cached text up to date with the state (synchronously)."""
        stats = RefreshStats()
        for _ in self._refresh_steps(stats):
            pass
        return stats

    def text(self, encoding: Encoding = TEXT, sections: Sections = EVERY_SECTION) -> bytes:
        """The whole body (or ``sections`` of it), synchronously (tests and benchmarks)."""
        self.refresh()
        if not self._reproducible(encoding):
            return self._reference.text(encoding, sections)
        if not _identical_escaping(encoding):
            for _ in self._escape_steps(encoding):
                pass
            return b"".join(self._escaped_parts(encoding, sections))
        return b"".join(self._text_parts(encoding, sections))

    def gzip(self, encoding: Encoding = TEXT, sections: Sections = EVERY_SECTION) -> bytes:
        """The whole body (or ``sections`` of it) gzipped, synchronously (tests and
        benchmarks)."""
        self.refresh()
        if not self._reproducible(encoding):
            return self._reference.gzip(encoding, sections)
        if not _identical_escaping(encoding):
            return _gzip_whole([self.text(encoding, sections)], self._gzip_level)
        return b"".join(self._gzip_parts(encoding, sections))

    def _reproducible(self, encoding: Encoding) -> bool:
        """Label names outside the legacy charset are written differently per escaping scheme
        and the cache keeps only their underscore form; so for them only the default
        (underscores) scheme is reproduced."""
        return encoding.escaping is Escaping.UNDERSCORES or self._legacy_names

    # ------------------------------------------------------------------ other escapings

    async def _escape_stale(self, encoding: Encoding) -> None:
        for _ in self._escape_steps(encoding):
            await asyncio.sleep(0)

    def _escape_steps(self, encoding: Encoding) -> Generator[None, None, None]:
        """Give every block its text in ``encoding`` (the ones that lack it); yields between
        steps so the caller can let the loop run."""
        for family_blocks in self._blocks:
            for block in family_blocks:
                variants = block.variants
                if variants is None:
                    variants = block.variants = {}
                if encoding not in variants:
                    variants[encoding] = escape_block(block.data, encoding)
                    yield  # a block at a time: the loop never waits for more than one

    def _escaped_parts(self, encoding: Encoding, sections: Sections) -> list[bytes]:
        parts: list[bytes] = []
        if Section.SIMS in sections:
            headers = self._escaped_headers.get(encoding)
            if headers is None:
                headers = self._escaped_headers[encoding] = _headers(encoding, self._families)
            for header, family_blocks in zip(headers, self._blocks, strict=True):
                parts.append(header)
                parts.extend((block.variants or {})[encoding] for block in family_blocks)
        parts.append(self._tail(encoding, sections))
        return parts

    # ------------------------------------------------------------------ rendering

    def render_sim(self, record: SimRecord) -> list[bytes]:
        """One SIM's text in each per-SIM family (``b""`` where it has no sample).

        A SIM whose samples cannot be rendered is left out whole and counted
        (:meth:`SimFamilies.failed`): one value never fails a scrape. Cached by version like
        any fragment, it is tried again when the SIM's record changes.
        """
        try:
            return self._render_sim(record)
        except Exception:
            self._sims.failed(record)
            return [_EMPTY] * len(self._family_index)

    def _render_sim(self, record: SimRecord) -> list[bytes]:
        index = self._family_index
        out = [_EMPTY] * len(index)
        strings: dict[int, tuple[Mapping[str, str], str]] = {}
        for family, name, labels, value in self._sims.samples(record):
            known = strings.get(id(labels))
            if known is None or known[0] is not labels:
                text, legacy = label_string(labels)
                if not legacy:
                    self._legacy_names = False
                known = strings[id(labels)] = (labels, text)
            if known[1]:
                line = f"{name}{{{known[1]}}} {format_value(value)}\n".encode()
            else:
                line = f"{name} {format_value(value)}\n".encode()
            i = index[family.name]
            out[i] = out[i] + line if out[i] else line
        return out

    def _refresh_steps(self, stats: RefreshStats) -> Generator[None, None, None]:
        """Re-render changed SIMs; yields now and then so the caller can let the loop run."""
        if not self._families:
            return  # metrics.per_sim: none (or every per-SIM family excluded): nothing to render
        sims = self._state.sims
        order = list(sims)
        records = list(sims.values())
        if order != self._order:
            yield from self._relayout(order, records, stats)
            return
        versions = self._versions
        known = self._records
        size = self._block_size
        changed: dict[int, dict[int, list[bytes]]] = {}  # block -> {position in block: frags}
        for i, record in enumerate(records):
            if known[i] is record and versions[i] == record.version:
                continue
            version = record.version
            frags = self.render_sim(record)
            known[i] = record
            versions[i] = version
            changed.setdefault(i // size, {})[i % size] = frags
            stats.rendered += 1
            if stats.rendered % _YIELD_EVERY == 0:
                yield
        for n, (b, members) in enumerate(changed.items(), 1):
            for f, family_blocks in enumerate(self._blocks):
                block = family_blocks[b]
                replacements = {
                    j: frags[f] for j, frags in members.items() if frags[f] != block.fragment(j)
                }
                if replacements:
                    block.splice(replacements)
                    stats.blocks_changed += 1
            if n % _SPLICE_YIELD_EVERY == 0:
                yield
        if stats.blocks_changed:
            self._generation += 1

    def _relayout(
        self, order: list[str], records: list[SimRecord], stats: RefreshStats
    ) -> Generator[None, None, None]:
        """Membership changed: rebuild every block, re-rendering only SIMs that changed.

        Each block is joined as soon as its SIMs are in, so the fragments waiting to be joined
        are one block's worth, not a second copy of the whole body in small objects (whose
        freed memory, interleaved with what polling allocates meanwhile, would stay with the
        process).
        """
        stats.relayout = True
        size = self._block_size
        old = {sid: i for i, sid in enumerate(self._order)}
        columns: list[list[bytes]] = [[] for _ in self._families]
        built: list[list[_Block]] = [[] for _ in self._families]
        versions = array("q")
        for record in records:
            i = old.get(record.sid)
            if i is not None and self._records[i] is record and self._versions[i] == record.version:
                b, j = divmod(i, size)
                frags = [family_blocks[b].fragment(j) for family_blocks in self._blocks]
            else:
                frags = self.render_sim(record)
                stats.rendered += 1
                if stats.rendered % _YIELD_EVERY == 0:
                    yield
            versions.append(record.version)
            for column, frag in zip(columns, frags, strict=True):
                column.append(frag)
            if len(versions) % size == 0:
                for family_blocks, column in zip(built, columns, strict=True):
                    family_blocks.append(_Block(column))
                columns = [[] for _ in self._families]
        if len(versions) % size:
            for family_blocks, column in zip(built, columns, strict=True):
                family_blocks.append(_Block(column))
        self._blocks = [family_blocks or [_Block([])] for family_blocks in built]
        self._order = order
        self._records = list(records)
        self._versions = versions
        self._generation += 1
        stats.blocks_changed = sum(len(b) for b in self._blocks)

    # ------------------------------------------------------------------ assembly

    def _tail(self, encoding: Encoding, sections: Sections) -> bytes:
        """Everything but the per-SIM families: the private registry's stock output (its
        families of ``sections`` that are kept). A whole body also counts its series."""
        if sections != EVERY_SECTION:
            return generate(encoding, Tail(self._registry, self._sims.keep, sections))
        counts: dict[str, int] = {}
        tail = generate(encoding, Tail(self._registry, self._sims.keep, sections, counts))
        self._count_series(counts)
        return tail

    def _count_series(self, tail: dict[str, int]) -> None:
        """Take the series of a whole body: the per-SIM families' (summed over their blocks
        once per change of the blocks) and ``tail``'s; warn once when the total crosses
        ``max_series``."""
        generation, per_family = self._sim_series
        if generation != self._generation:
            per_family = [sum(block.lines for block in blocks) for blocks in self._blocks]
            self._sim_series = (self._generation, per_family)
        series = {family.name: n for family, n in zip(self._families, per_family, strict=True)}
        series.update(tail)
        if _SERIES_GAUGE in series:
            # the gauge has one series per family of the body: itself counted as the next
            # body will show it, so that an unchanged fleet gives the same body every time
            series[_SERIES_GAUGE] = len(series)
        self.series = series
        limit = self._max_series
        if limit is None:
            return
        total = sum(series.values())
        if total > limit and not self._over_max:
            log.warning(
                "/metrics holds %d series, more than metrics.max_series (%d); see"
                " twilio_wireless_exposition_series for the families, and metrics.per_sim,"
                " metrics.exclude or collect[] to hold fewer",
                total,
                limit,
            )
        elif total <= limit and self._over_max:
            log.info("/metrics holds %d series, within metrics.max_series (%d)", total, limit)
        self._over_max = total > limit

    def _middle(self, fmt: Format) -> list[bytes]:
        parts: list[bytes] = []
        for header, family_blocks in zip(self._headers[fmt], self._blocks, strict=True):
            parts.append(header)
            parts.extend(block.data for block in family_blocks)
        return parts

    def _text_parts(self, encoding: Encoding, sections: Sections) -> list[bytes]:
        parts = self._middle(encoding.format) if Section.SIMS in sections else []
        parts.append(self._tail(encoding, sections))
        return parts

    def _stale_blocks(self) -> list[_Block]:
        return [b for family_blocks in self._blocks for b in family_blocks if b.gz is None]

    def _deflate_and_crc(
        self, datas: list[bytes], middle: list[bytes] | None
    ) -> tuple[list[bytes], tuple[int, int] | None]:
        pieces = [_deflate_piece(data, self._gzip_level) for data in datas]
        return pieces, None if middle is None else _crc_and_size(middle)

    def _gzip_parts(self, encoding: Encoding, sections: Sections) -> list[bytes]:
        fmt = encoding.format
        level = self._gzip_level
        tail = self._tail(encoding, sections)
        if Section.SIMS not in sections:
            crc = zlib.crc32(tail)
            return [
                _GZIP_HEADER,
                _deflate_last(tail, level),
                struct.pack("<II", crc & 0xFFFFFFFF, len(tail) & 0xFFFFFFFF),
            ]
        for block in self._stale_blocks():
            block.gz = _deflate_piece(block.data, level)
        header_gz = self._header_gz.get(fmt)
        if header_gz is None:
            header_gz = self._header_gz[fmt] = [
                _deflate_piece(h, level) for h in self._headers[fmt]
            ]
        cached = self._crc.get(fmt)
        if cached is None or cached[0] != self._generation:
            cached = self._crc[fmt] = (self._generation, *_crc_and_size(self._middle(fmt)))
        _, crc, size = cached
        crc = zlib.crc32(tail, crc)
        size += len(tail)
        parts = [_GZIP_HEADER]
        for piece, family_blocks in zip(header_gz, self._blocks, strict=True):
            parts.append(piece)
            parts.extend(block.gz or _EMPTY for block in family_blocks)
        parts.append(_deflate_last(tail, level))
        parts.append(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
        return parts


_Key = tuple[Encoding, bool, Sections]
"""What a render is asked for: encoding, gzip or not, the sections."""


def _gzip_whole(parts: list[bytes], level: int) -> bytes:
    """One gzip member of the concatenated ``parts`` (run in a worker thread: zlib releases the
    GIL, and the parts are immutable)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [compressor.compress(part) for part in parts]
    out.append(compressor.flush())
    return b"".join(out)


def _crc_and_size(parts: list[bytes]) -> tuple[int, int]:
    crc = size = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        size += len(part)
    return crc, size


def _retrieve(future: asyncio.Future[list[bytes]]) -> None:
    """Mark a failed shared render's exception as seen (its scrapers may all be gone)."""
    if not future.cancelled():
        future.exception()
