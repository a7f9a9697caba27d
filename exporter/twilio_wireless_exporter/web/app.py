"""The HTTP face of the exporter: ``/metrics``, the landing page and health endpoints.

Scrapes never wait on the Twilio API: they render what the poller last stored.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from aiohttp.typedefs import Middleware

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.exposition.formats import Encoding
from twilio_wireless_exporter.exposition.selection import EVERY_SECTION, Sections
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.web.connections import Rejections
from twilio_wireless_exporter.web.negotiation import (
    COLLECT_PARAM,
    UnknownSectionError,
    negotiate,
    sections,
)


class MetricsRenderer(Protocol):
    """Writes the ``/metrics`` body in a negotiated encoding, as parts to send in order: the
    incremental :class:`~twilio_wireless_exporter.exposition.renderer.Exposition`, or the
    :class:`~twilio_wireless_exporter.exposition.reference.ReferenceExposition`."""

    async def render(
        self, encoding: Encoding, *, compress: bool, sections: Sections = EVERY_SECTION
    ) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class WebContext:
    state: FleetState
    is_ready: Callable[[], bool]
    api_base_url: str
    exposition: MetricsRenderer
    """Renderer of ``/metrics``."""
    rejections: Rejections | None = None
    """Counts refused requests (a bad ``collect[]`` is a ``bad_request``)."""


CONTEXT_KEY: web.AppKey[WebContext] = web.AppKey("context", WebContext)


async def metrics(request: web.Request) -> web.Response:
    """The exposition, or the ``collect[]`` sections of it (``fleet``, ``sims``,
    ``exporter``); an unknown section is a 400 saying which exist."""
    ctx = request.app[CONTEXT_KEY]
    try:
        chosen_sections = sections(request.query.getall(COLLECT_PARAM, []))
    except UnknownSectionError as exc:
        if ctx.rejections is not None:
            ctx.rejections.reject("bad_request")
        return web.Response(status=400, text=f"{exc}\n", headers={"Cache-Control": "no-store"})
    chosen = negotiate(
        request.headers.get("Accept", ""), request.headers.get("Accept-Encoding", "")
    )
    headers = {"Content-Type": chosen.content_type, "Cache-Control": "no-store"}
    if chosen.gzip:
        headers["Content-Encoding"] = "gzip"
    parts = await ctx.exposition.render(
        chosen.encoding, compress=chosen.gzip, sections=chosen_sections
    )
    return web.Response(body=PartsPayload(parts, chosen.content_type), headers=headers)


#: Bytes handed to the transport at a time when a body is sent in parts: big enough that the
#: per-write overhead vanishes, small enough that no single step of the event loop copies
#: megabytes while polls and other scrapes wait.
SEND_CHUNK = 256 * 1024


def coalesce(parts: Sequence[bytes], size: int) -> Iterator[bytes]:
    """``parts`` regrouped into chunks of at least ``size`` bytes (the last may be shorter);
    a part already that big goes out as it is, uncopied."""
    batch: list[bytes] = []
    batched = 0
    for part in parts:
        if len(part) >= size:
            if batch:
                yield b"".join(batch)
                batch, batched = [], 0
            yield part
            continue
        batch.append(part)
        batched += len(part)
        if batched >= size:
            yield b"".join(batch)
            batch, batched = [], 0
    if batch:
        yield b"".join(batch)


class PartsPayload(Payload):
    """A response body given as parts (the exposition's cached blocks), with its length known
    up front, written a chunk at a time once the handler and every middleware are done: the
    body is never joined into one large string, and the event loop runs other work whenever
    the socket is full."""

    _value: Sequence[bytes]

    def __init__(self, parts: Sequence[bytes], content_type: str) -> None:
        super().__init__(parts, content_type=content_type)
        self._size = sum(len(part) for part in parts)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for chunk in coalesce(self._value, SEND_CHUNK):
            await writer.write(chunk)


async def healthy(_: web.Request) -> web.Response:
    return web.Response(text="Healthy\n")


async def ready(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    if ctx.is_ready():
        return web.Response(text="Ready\n")
    monitored, _, _, pending = ctx.state.counts()
    return web.Response(
        status=503,
        text=f"Not ready: {monitored - pending} of {monitored} SIMs polled at least once\n",
    )


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "never"
    return f"{max(0.0, now - then):.0f}s ago"


async def landing(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    monitored, up, down, pending = ctx.state.counts()
    successes = [r.last_success for r in ctx.state.sims.values() if r.last_success is not None]
    now = time.time()
    newest = max(successes) if successes else None
    oldest = min(successes) if successes else None
    rows = [
        ("SIMs monitored", str(monitored)),
        ("SIMs up (latest poll succeeded)", str(up)),
        ("SIMs down (latest poll failed)", str(down)),
        ("SIMs not polled yet", str(pending)),
        ("Newest successful poll", _ago(now, newest)),
        ("Oldest latest successful poll", _ago(now, oldest)),
        ("Ready", "yes" if ctx.is_ready() else "no"),
        ("Twilio API", ctx.api_base_url),
    ]
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Twilio Wireless Exporter</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; }}
</style></head>
<body>
<h1>Twilio Wireless Exporter</h1>
<p>Version {html.escape(__version__)}.
Prometheus exporter for Programmable Wireless data sessions.</p>
<ul>
<li><a href="metrics">Metrics</a></li>
<li><a href="-/healthy">Health</a> &middot; <a href="-/ready">Readiness</a></li>
</ul>
<h2>Fleet status</h2>
<table>
{table}
</table>
</body>
</html>
"""
    return web.Response(text=page, content_type="text/html")


def make_app(ctx: WebContext, *, middlewares: Sequence[Middleware] = ()) -> web.Application:
    """The app; ``middlewares`` (e.g. basic auth from the web config) wrap every route."""
    app = web.Application(middlewares=middlewares)
    app[CONTEXT_KEY] = ctx
    app.router.add_get("/", landing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    return app
