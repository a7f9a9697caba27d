"""The Twilio (or KORE) Wireless v1 endpoints the exporter reads, as typed records.

Paging by ``meta.next_page_url`` (only on the configured host, at most ``max_pages`` pages) and
decoding into the records of records.py happen here, record by record: a page whose records
all pass the checks of records.py decodes in one go (the common case); otherwise each record is
decoded on its own, and the ones that fail are returned as :class:`Rejection` beside the rest
(a :class:`Listing`), never failing the page. A body that is not a page at all (malformed,
nested too deeply, a ``next_page_url`` that is not a URL) fails the request. Every request goes
through one :class:`~twilio_wireless_exporter.api.transport.Transport`, admitted by the client's
:class:`~twilio_wireless_exporter.api.limits.RequestLimits`. Every failure surfaces as one
:class:`~twilio_wireless_exporter.api.transport.ApiError`.

Usage records are normalised into bytes as they arrive (usage.py); a record that cannot be is a
:class:`Rejection` like any other. Usage and rate-plan listings run at background priority
(:meth:`~twilio_wireless_exporter.api.limits.RequestLimits.new_order`): when requests queue,
every session poll goes first, as a usage figure that lags a day by nature can wait seconds more.

It knows nothing of Prometheus: counts and latencies go to an ``ApiObserver``.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import msgspec

from twilio_wireless_exporter.api.limits import RequestLimits
from twilio_wireless_exporter.api.records import (
    MAX_SESSION_DURATION,
    SIM_SID_PATTERN,
    DataSession,
    DataSessionPage,
    RatePlan,
    RatePlanPage,
    RawRatePlanPage,
    RawSessionPage,
    RawSimPage,
    RawUsagePage,
    RejectReason,
    SidOnly,
    Sim,
    SimPage,
    UsagePage,
    UsageRecord,
    Window,
    reason_of,
    session_problem,
    usage_reason_of,
)

# Rejection moved to records.py (usage.py returns it too); callers still import it from here.
from twilio_wireless_exporter.api.records import Rejection as Rejection
from twilio_wireless_exporter.api.transport import (
    ApiError,
    ApiObserver,
    Authenticator,
    ErrorKind,
    LoadObserver,
    MalformedBodyError,
    Route,
    Transport,
    TransportSettings,
)
from twilio_wireless_exporter.api.usage import Usage, normalise

# Endpoint templates used as metric label values.
ENDPOINT_SIMS: Final = "sims"
ENDPOINT_SIM: Final = "sim"
ENDPOINT_DATA_SESSIONS: Final = "data_sessions"
ENDPOINT_USAGE_RECORDS: Final = "usage_records"
ENDPOINT_ACCOUNT_USAGE: Final = "account_usage_records"
ENDPOINT_RATE_PLANS: Final = "rate_plans"

#: The ``Granularity`` values of both UsageRecords resources.
GRANULARITIES: Final = frozenset({"hourly", "daily", "all"})

_R = TypeVar("_R", DataSession, Sim, UsageRecord, RatePlan)
_T = TypeVar("_T")

_DETAIL_CHARS: Final = 200


class Listing(list[_T]):
    """The accepted records of a listing, with :attr:`rejected` the records left out."""

    __slots__ = ("rejected",)

    def __init__(self, records: Iterable[_T] = (), rejected: Iterable[Rejection] = ()) -> None:
        super().__init__(records)
        self.rejected: list[Rejection] = list(rejected)


@dataclass(frozen=True, slots=True)
class Page(Generic[_R]):
    """One decoded list page: its accepted records, the rejected ones, the next page's URL."""

    records: list[_R]
    rejected: list[Rejection]
    next_page_url: str | None


_SESSION_PAGE: Final = msgspec.json.Decoder(DataSessionPage)
_RAW_SESSION_PAGE: Final = msgspec.json.Decoder(RawSessionPage)
_SESSION: Final = msgspec.json.Decoder(DataSession)
_SIM_PAGE: Final = msgspec.json.Decoder(SimPage)
_RAW_SIM_PAGE: Final = msgspec.json.Decoder(RawSimPage)
_SIM_RECORD: Final = msgspec.json.Decoder(Sim)
_SID_ONLY: Final = msgspec.json.Decoder(SidOnly)
_USAGE_PAGE: Final = msgspec.json.Decoder(UsagePage)
_RAW_USAGE_PAGE: Final = msgspec.json.Decoder(RawUsagePage)
_USAGE_RECORD: Final = msgspec.json.Decoder(UsageRecord)
_RATE_PLAN_PAGE: Final = msgspec.json.Decoder(RatePlanPage)
_RAW_RATE_PLAN_PAGE: Final = msgspec.json.Decoder(RawRatePlanPage)
_RATE_PLAN: Final = msgspec.json.Decoder(RatePlan)
_SIM_SID: Final = re.compile(SIM_SID_PATTERN)


def _too_deep() -> MalformedBodyError:
    return MalformedBodyError("malformed response: JSON nested too deeply")


Reasons = Callable[[msgspec.ValidationError], RejectReason]
"""Maps msgspec's complaint about a record to the reason it is rejected for."""


def _rejection(raw: msgspec.Raw, error: msgspec.ValidationError, reasons: Reasons) -> Rejection:
    try:
        sid = _SID_ONLY.decode(raw).sid
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        sid = None
    return Rejection(reasons(error), sid, str(error)[:_DETAIL_CHARS])


def _one_by_one(
    raws: list[msgspec.Raw], decoder: msgspec.json.Decoder[_R], reasons: Reasons
) -> tuple[list[_R], list[Rejection]]:
    records: list[_R] = []
    rejected: list[Rejection] = []
    for raw in raws:
        try:
            records.append(decoder.decode(raw))
        except msgspec.ValidationError as exc:
            rejected.append(_rejection(raw, exc, reasons))
        except RecursionError:
            raise _too_deep() from None
    return records, rejected


def _decode_page(
    body: bytes,
    strict: msgspec.json.Decoder[Any],
    loose: msgspec.json.Decoder[Any],
    record: msgspec.json.Decoder[_R],
    reasons: Reasons = reason_of,
) -> Page[_R]:
    """A page (``strict``: its Struct), records msgspec rejects returned as rejections.

    One strict decode first: when every record passes, that is all it costs. Otherwise the page
    is read with its records undecoded (``loose``) and each record decoded alone, ``reasons``
    naming why one fails. A body that is not such a page raises msgspec's errors or
    :class:`MalformedBodyError` (a ``decode`` ApiError).
    """
    try:
        page = strict.decode(body)
        return Page(page.records, [], page.meta.next_page_url)
    except msgspec.ValidationError as exc:
        whole = exc
    except RecursionError:
        raise _too_deep() from None
    try:
        raw = loose.decode(body)
    except msgspec.ValidationError:
        raise whole from None  # the page itself is of the wrong shape
    except RecursionError:
        raise _too_deep() from None
    records, rejected = _one_by_one(raw.records, record, reasons)
    return Page(records, rejected, raw.meta.next_page_url)


def decode_session_page(body: bytes) -> Page[DataSession]:
    """A DataSessions page (see :func:`_decode_page`)."""
    return _decode_page(body, _SESSION_PAGE, _RAW_SESSION_PAGE, _SESSION)


def decode_sim_page(body: bytes) -> Page[Sim]:
    """A ``/v1/Sims`` page (see :func:`_decode_page`)."""
    return _decode_page(body, _SIM_PAGE, _RAW_SIM_PAGE, _SIM_RECORD)


def decode_usage_page(body: bytes) -> Page[UsageRecord]:
    """A page of either UsageRecords resource, as wire records (normalised by usage.py)."""
    return _decode_page(body, _USAGE_PAGE, _RAW_USAGE_PAGE, _USAGE_RECORD, usage_reason_of)


def decode_rate_plan_page(body: bytes) -> Page[RatePlan]:
    """A ``/v1/RatePlans`` page (see :func:`_decode_page`)."""
    return _decode_page(body, _RATE_PLAN_PAGE, _RAW_RATE_PLAN_PAGE, _RATE_PLAN)


def check_usage(
    records: Iterable[UsageRecord], sim_sid: str | None, window: Window, into: Listing[Usage]
) -> None:
    """Append to ``into`` each record normalised into bytes (usage.py); the others go to
    ``into.rejected``. ``sim_sid``: the SIM whose listing they came from (a record of another
    SIM is rejected, as for sessions), ``None`` for the account's listing."""
    accept = into.append
    reject = into.rejected.append
    for record in records:
        owner = record.sim_sid
        if sim_sid is not None and owner is not None and owner.lower() != sim_sid.lower():
            foreign = _SIM_SID.match(owner) is not None
            reason = RejectReason.FOREIGN_SIM if foreign else RejectReason.SID
            reject(Rejection(reason, None, f"a usage record of SIM {owner[:40]}"))
            continue
        usage = normalise(record, window)
        if isinstance(usage, Rejection):
            reject(usage)
        else:
            accept(usage)


def usage_time(moment: datetime) -> str:
    """``Start``/``End`` of a UsageRecords request: ISO 8601 in UTC, whole seconds, as the
    API's own examples write them. ``moment`` must carry its zone: a naive one is ambiguous."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"usage period bound without a time zone: {moment!r}")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decode_sim(body: bytes) -> Sim:
    try:
        return _SIM_RECORD.decode(body)
    except RecursionError:
        raise _too_deep() from None


def check_sessions(
    sessions: Iterable[DataSession], sim_sid: str, window: Window, into: Listing[DataSession]
) -> None:
    """Append to ``into`` the sessions that pass :func:`~.records.session_problem`; the others
    go to ``into.rejected``.

    The common case (every timestamp in the window, a plausible duration, the polled SIM's own
    session with a plain sid) is tested inline; only a session that fails it is looked at by
    :func:`~.records.session_problem`, which says why (or finds nothing wrong after all).
    """
    lo, hi = window.earliest, window.latest
    longest = MAX_SESSION_DURATION
    accept = into.append
    for session in sessions:
        start, end, updated, sid, owner = (
            session.start,
            session.end,
            session.last_updated,
            session.sid,
            session.sim_sid,
        )
        if (
            (start is None or lo <= start <= hi)
            and (
                end is None
                or (lo <= end <= hi and (start is None or start <= end <= start + longest))
            )
            and (updated is None or lo <= updated <= hi)
            and (owner is None or owner == sim_sid)
            and (not sid or sid.encode().isalnum())
        ):
            accept(session)
            continue
        problem = session_problem(session, sim_sid, window)
        if problem is None:
            accept(session)
        else:
            into.rejected.append(Rejection(problem, session.sid, _describe(problem, session)))


def _describe(problem: RejectReason, session: DataSession) -> str:
    if problem is RejectReason.FOREIGN_SIM:
        return f"a session of SIM {session.sim_sid}"
    return f"start={session.start} end={session.end} last_updated={session.last_updated}"


_SIMS: Final = Route(ENDPOINT_SIMS, decode_sim_page)
_SIM: Final = Route(ENDPOINT_SIM, decode_sim)
_DATA_SESSIONS: Final = Route(ENDPOINT_DATA_SESSIONS, decode_session_page)
_USAGE_RECORDS: Final = Route(ENDPOINT_USAGE_RECORDS, decode_usage_page)
_ACCOUNT_USAGE: Final = Route(ENDPOINT_ACCOUNT_USAGE, decode_usage_page)
_RATE_PLANS: Final = Route(ENDPOINT_RATE_PLANS, decode_rate_plan_page)


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
        load: LoadObserver | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``wall`` is the unix time that bounds the timestamps a record may carry; ``load``
        receives the load the API's answers report (see transport.py)."""
        self._settings = settings
        self._wall = wall
        self._base = settings.base_url.rstrip("/")
        base_parts = urlsplit(self._base)
        self._origin = (base_parts.scheme, base_parts.netloc)
        self._limits = RequestLimits(settings.concurrency, settings.requests_per_second)
        self._transport = Transport(
            session,
            TransportSettings.of(settings, cap_setting="poll.max_response_bytes"),
            observer=observer,
            load=load,
            gate=self._limits,
            auth=auth,
            sleep=sleep,
            rng=rng,
        )

    @property
    def settings(self) -> ClientSettings:
        return self._settings

    async def list_data_sessions(self, sim_sid: str, page_size: int) -> Listing[DataSession]:
        """Every DataSession the API lists for the SIM, following ``next_page_url``.

        Pages may overlap or be unordered: de-duplication is the caller's job. Records that fail
        the checks of records.py (including a session of another SIM) are in ``.rejected``.
        """
        path = f"/v1/Sims/{quote(sim_sid, safe='')}/DataSessions"
        url = f"{self._base}{path}?PageSize={int(page_size)}"
        sessions: Listing[DataSession] = Listing()
        window = Window.around(self._wall())
        order = self._limits.new_order()
        async for page in self._pages(url, _DATA_SESSIONS, order):
            sessions.rejected.extend(page.rejected)
            check_sessions(page.records, sim_sid, window, sessions)
        return sessions

    async def list_sims(self, statuses: Sequence[str], page_size: int) -> Listing[Sim]:
        """Every SIM of the account with one of ``statuses`` (all SIMs when empty); records
        that are not SIMs (a ``sid`` that is not a SIM SID, ...) are in ``.rejected``."""
        sims: dict[str, Sim] = {}
        rejected: list[Rejection] = []
        status_filters: list[str | None] = list(statuses) or [None]
        order = self._limits.new_order()
        for status in status_filters:
            query: dict[str, str | int] = {"PageSize": page_size}
            if status is not None:
                query["Status"] = status
            url = f"{self._base}/v1/Sims?" + urlencode(query)
            async for page in self._pages(url, _SIMS, order):
                rejected.extend(page.rejected)
                for sim in page.records:
                    sims[sim.sid] = sim
        return Listing(sims.values(), rejected)

    async def sim_pages(self, page_size: int, budget: int) -> AsyncIterator[Page[Sim]]:
        """The pages of the unfiltered ``/v1/Sims`` listing, at most ``budget`` of them.

        Reaching the budget is not an error (unlike ``max_pages``): the caller asked for at
        most that many requests, and the last page's ``next_page_url`` says whether the
        listing went on. One order for all pages (see :meth:`_pages`)."""
        url = f"{self._base}/v1/Sims?" + urlencode({"PageSize": page_size})
        async for page in self._pages(url, _SIMS, self._limits.new_order(), budget=budget):
            yield page

    async def fetch_sim(self, sim_sid: str) -> Sim:
        url = f"{self._base}/v1/Sims/{quote(sim_sid, safe='')}"
        return await self._transport.send(_SIM, url, order=self._limits.new_order())

    async def list_sim_usage(
        self,
        sim_sid: str,
        start: datetime,
        end: datetime | None = None,
        granularity: str = "daily",
        page_size: int = 1000,
    ) -> Listing[Usage]:
        """The SIM's usage records from ``start`` (to ``end``, else now), in bytes, following
        ``next_page_url``; at background priority. Records that cannot be used (units, counts,
        period, another SIM's) are in ``.rejected``."""
        path = f"/v1/Sims/{quote(sim_sid, safe='')}/UsageRecords"
        return await self._usage(path, _USAGE_RECORDS, sim_sid, start, end, granularity, page_size)

    async def list_account_usage(
        self,
        start: datetime,
        end: datetime | None = None,
        granularity: str = "hourly",
        page_size: int = 1000,
    ) -> Listing[Usage]:
        """The account's usage records (all SIMs together), as :meth:`list_sim_usage`."""
        return await self._usage(
            "/v1/UsageRecords", _ACCOUNT_USAGE, None, start, end, granularity, page_size
        )

    async def list_rate_plans(self, page_size: int = 1000) -> Listing[RatePlan]:
        """Every rate plan of the account, at background priority; records that are not plans
        (a ``sid`` that is not a plan SID, a limit out of range, ...) are in ``.rejected``."""
        plans: dict[str, RatePlan] = {}
        rejected: list[Rejection] = []
        url = f"{self._base}/v1/RatePlans?" + urlencode({"PageSize": int(page_size)})
        order = self._limits.new_order(background=True)
        async for page in self._pages(url, _RATE_PLANS, order):
            rejected.extend(page.rejected)
            for plan in page.records:
                plans[plan.sid] = plan  # pages may overlap: the latest listing of a plan wins
        return Listing(plans.values(), rejected)

    async def _usage(
        self,
        path: str,
        route: Route[Page[UsageRecord]],
        sim_sid: str | None,
        start: datetime,
        end: datetime | None,
        granularity: str,
        page_size: int,
    ) -> Listing[Usage]:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {sorted(GRANULARITIES)}")
        query = {"Granularity": granularity, "Start": usage_time(start)}
        if end is not None:
            query["End"] = usage_time(end)
        query["PageSize"] = str(int(page_size))
        url = f"{self._base}{path}?" + urlencode(query)
        usage: Listing[Usage] = Listing()
        window = Window.around(self._wall())
        order = self._limits.new_order(background=True)
        async for page in self._pages(url, route, order):
            usage.rejected.extend(page.rejected)
            check_usage(page.records, sim_sid, window, usage)
        return usage

    async def _pages(
        self, url: str, route: Route[Page[_R]], order: int, *, budget: int | None = None
    ) -> AsyncIterator[Page[_R]]:
        """Pages of one listing, following ``next_page_url``, at most ``max_pages`` of them
        (a ``TOO_MANY_PAGES`` error beyond), or ``budget`` of them (then it just stops).

        Every request of a listing carries the ``order`` the listing drew when it began, so its
        next pages and retries wait behind older listings only (see adaptive.py)."""
        next_url: str | None = url
        count = 0
        while next_url is not None:
            if budget is not None and count >= budget:
                return
            if budget is None and count >= self._settings.max_pages:
                raise ApiError(
                    ErrorKind.TOO_MANY_PAGES,
                    f"listing has more than {self._settings.max_pages} pages (poll.max_pages)",
                    endpoint=route.endpoint,
                )
            page = await self._transport.send(route, next_url, order=order)
            count += 1
            yield page
            nxt = page.next_page_url
            next_url = self._check_next_url(nxt, route.endpoint) if nxt else None

    def _check_next_url(self, url: str, endpoint: str) -> str:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a port out of range)
        except (ValueError, TypeError):
            raise ApiError(
                ErrorKind.BAD_NEXT_PAGE,
                f"next_page_url is not a valid URL: {url[:_DETAIL_CHARS]!r}",
                endpoint=endpoint,
            ) from None
        if (parts.scheme, parts.netloc) != self._origin:
            # Never send credentials to a host we were not configured for.
            raise ApiError(
                ErrorKind.BAD_NEXT_PAGE,
                f"next_page_url points to another origin ({parts.scheme}://{parts.netloc})",
                endpoint=endpoint,
            )
        return url
