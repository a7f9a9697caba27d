"""The Twilio (or KORE) Wireless v1 endpoints the exporter reads, as typed records.

Paging by ``meta.next_page_url`` (only on the configured host, at most ``max_pages`` pages) and
decoding into the records of records.py happen here; every request goes through one
:class:`~twilio_wireless_exporter.api.transport.Transport`, admitted by the client's
:class:`~twilio_wireless_exporter.api.limits.RequestLimits`. Every failure surfaces as one
:class:`~twilio_wireless_exporter.api.transport.ApiError`.

It knows nothing of Prometheus: counts and latencies go to an ``ApiObserver``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import urlencode, urlsplit

import aiohttp
import msgspec

from twilio_wireless_exporter.api.limits import RequestLimits
from twilio_wireless_exporter.api.records import DataSession, DataSessionPage, Sim, SimPage
from twilio_wireless_exporter.api.transport import (
    ApiError,
    ApiObserver,
    Authenticator,
    ErrorKind,
    Route,
    Transport,
    TransportSettings,
)

# Endpoint templates used as metric label values.
ENDPOINT_SIMS: Final = "sims"
ENDPOINT_SIM: Final = "sim"
ENDPOINT_DATA_SESSIONS: Final = "data_sessions"

_SIMS: Final = Route(ENDPOINT_SIMS, msgspec.json.Decoder(SimPage).decode)
_SIM: Final = Route(ENDPOINT_SIM, msgspec.json.Decoder(Sim).decode)
_DATA_SESSIONS: Final = Route(ENDPOINT_DATA_SESSIONS, msgspec.json.Decoder(DataSessionPage).decode)

_P = TypeVar("_P", DataSessionPage, SimPage)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    base_url: str
    timeout: float = 10.0
    concurrency: int = 8
    requests_per_second: float = 20.0
    max_retries: int = 4
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_pages: int = 50
    max_response_bytes: int = 16 * 1024 * 1024


class TwilioClient:
    """Async client for the Wireless v1 list endpoints the exporter needs."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: Authenticator,
        settings: ClientSettings,
        *,
        observer: ApiObserver | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._base = settings.base_url.rstrip("/")
        base_parts = urlsplit(self._base)
        self._origin = (base_parts.scheme, base_parts.netloc)
        self._limits = RequestLimits(settings.concurrency, settings.requests_per_second)
        self._transport = Transport(
            session,
            TransportSettings(
                timeout=settings.timeout,
                max_response_bytes=settings.max_response_bytes,
                max_retries=settings.max_retries,
                backoff_initial=settings.backoff_initial,
                backoff_max=settings.backoff_max,
                cap_setting="poll.max_response_bytes",
            ),
            observer=observer,
            gate=self._limits,
            auth=auth,
            sleep=sleep,
            rng=rng,
        )

    @property
    def settings(self) -> ClientSettings:
        return self._settings

    async def list_data_sessions(self, sim_sid: str, page_size: int) -> list[DataSession]:
        """Every DataSession the API lists for the SIM, following ``next_page_url``.

        Pages may overlap or be unordered: de-duplication is the caller's job.
        """
        url = f"{self._base}/v1/Sims/{sim_sid}/DataSessions?PageSize={int(page_size)}"
        sessions: list[DataSession] = []
        order = self._limits.new_order()
        async for page in self._pages(url, _DATA_SESSIONS, order):
            sessions.extend(page.data_sessions)
        return sessions

    async def list_sims(self, statuses: Sequence[str], page_size: int) -> list[Sim]:
        """Every SIM of the account with one of ``statuses`` (all SIMs when empty)."""
        sims: dict[str, Sim] = {}
        status_filters: list[str | None] = list(statuses) or [None]
        order = self._limits.new_order()
        for status in status_filters:
            query: dict[str, str | int] = {"PageSize": page_size}
            if status is not None:
                query["Status"] = status
            url = f"{self._base}/v1/Sims?" + urlencode(query)
            async for page in self._pages(url, _SIMS, order):
                for sim in page.sims:
                    sims[sim.sid] = sim
        return list(sims.values())

    async def fetch_sim(self, sim_sid: str) -> Sim:
        url = f"{self._base}/v1/Sims/{sim_sid}"
        return await self._transport.send(_SIM, url, order=self._limits.new_order())

    async def _pages(self, url: str, route: Route[_P], order: int) -> AsyncIterator[_P]:
        """Pages of one listing, following ``next_page_url``, at most ``max_pages`` of them.

        Every request of a listing carries the ``order`` the listing drew when it began, so its
        next pages and retries wait behind older listings only (see adaptive.py)."""
        next_url: str | None = url
        count = 0
        while next_url is not None:
            if count >= self._settings.max_pages:
                raise ApiError(
                    ErrorKind.TOO_MANY_PAGES,
                    f"listing has more than {self._settings.max_pages} pages (poll.max_pages)",
                    endpoint=route.endpoint,
                )
            page = await self._transport.send(route, next_url, order=order)
            count += 1
            yield page
            nxt = page.meta.next_page_url
            next_url = self._check_next_url(nxt, route.endpoint) if nxt else None

    def _check_next_url(self, url: str, endpoint: str) -> str:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != self._origin:
            # Never send credentials to a host we were not configured for.
            raise ApiError(
                ErrorKind.BAD_NEXT_PAGE,
                f"next_page_url points to another origin ({parts.scheme}://{parts.netloc})",
                endpoint=endpoint,
            )
        return url
