"""The aiohttp application that answers like ``https://wireless.twilio.com`` (and KORE's OAuth2).

Routes:

* ``GET /v1/Sims`` (``Status``, ``Iccid``, ``RatePlan`` filters), ``GET /v1/Sims/{Sid}`` (SID or
  unique name), ``GET /v1/Sims/{SimSid}/DataSessions``: Twilio paging with ``PageSize``, ``Page``,
  ``PageToken`` and absolute ``meta`` URLs.
* ``GET /v1/Sims/{SimSid}/UsageRecords`` and ``GET /v1/UsageRecords`` (``Granularity``,
  ``Start``, ``End``), ``GET /v1/RatePlans``, ``GET /v1/RatePlans/{Sid}`` (SID or unique name).
* ``POST /api-services/v1/auth/token``: OAuth2 client credentials (``auth_mode="bearer"`` only).
* ``GET /health``: always 200, never faulted; ``GET /``: a short description.

Every API answer (429s included) carries ``Twilio-Concurrent-Requests`` (API requests in flight
as ``max_concurrent`` counts them, itself included) and ``Twilio-Request-Duration`` (seconds it
took), as Twilio's do, unless ``load_headers`` is off.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import datetime as dt
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from types import TracebackType
from typing import Any, Final, NamedTuple
from urllib.parse import urlencode

import msgspec
from aiohttp import BasicAuth, web

from .config import SimulatorConfig
from .faults import API_KINDS, LIST_KINDS, FaultConfig, FaultResponse
from .model import SIM_STATUSES, Fleet, SimClock, format_time
from .stats import SimulatorStats
from .usage import GRANULARITIES, month_before

__all__ = [
    "STATE_KEY",
    "TOKEN_PATH",
    "RunningSimulator",
    "SimulatorState",
    "build_app",
    "start_simulator",
]

log = logging.getLogger(__name__)

TOKEN_PATH: Final = "/api-services/v1/auth/token"  # noqa: S105 (a URL path)
_KINDS: Final = frozenset({*API_KINDS, "token", "health"})
_encode = msgspec.json.Encoder().encode
_DEFAULT_PAGE_SIZE: Final = 50
_MAX_PAGE_SIZE: Final = 1000


class _Reply(NamedTuple):
    status: int
    body: bytes
    headers: Mapping[str, str] | None = None
    content_type: str = "application/json"


def _seconds(value: float) -> str:
    """A seconds value for a header: integral values as integers."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _twilio_error(
    status: int, code: int, message: str, headers: Mapping[str, str] | None = None
) -> _Reply:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return _Reply(status, _encode(body), headers)


def _oauth_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> _Reply:
    return _Reply(status, _encode({"error": error, "error_description": description}), headers)


#: KORE's API gateway's answer to an expired or revoked bearer token.
KORE_DENIED: Final = (
    b'{"message": "User is not authorized to access this resource with an explicit deny",'
    b' "error": "Invalid or expired token"}'
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_JWT_HEADER: Final = _b64url(b'{"alg":"RS256","typ":"JWT"}')

_FAULT_CODES: Final = {
    400: (20001, "Bad Request"),
    401: (20003, "Authenticate"),
    403: (20403, "Forbidden"),
    404: (20404, "Not Found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    502: (20502, "Bad Gateway"),
    503: (20503, "Service Unavailable"),
    504: (20504, "Gateway Timeout"),
}


# --------------------------------------------------------------------------------------------
# Page tokens: opaque to clients, "PA"/"PB" + base64url("<scope>|<order key>")
# --------------------------------------------------------------------------------------------


class _PageToken(NamedTuple):
    after: bool  # True: items after key (next page); False: items before key (previous page)
    key: int


def _encode_token(after: bool, scope: str, key: int) -> str:
    raw = f"{scope}|{key}".encode()
    return ("PA" if after else "PB") + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> _PageToken | None:
    if len(token) < 3 or token[:2] not in ("PA", "PB"):
        return None
    payload = token[2:]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    got_scope, sep, key = raw.rpartition("|")
    if not sep or got_scope != scope or not key.isascii() or not key.isdigit():
        return None
    return _PageToken(token[1] == "A", int(key))


class _Paging(NamedTuple):
    page_size: int
    page: int
    token: _PageToken | None
    raw_token: str | None


def _parse_paging(query: Mapping[str, str], scope: str) -> _Paging | _Reply:
    raw_size = query.get("PageSize")
    page_size = _DEFAULT_PAGE_SIZE
    if raw_size is not None:
        if (
            not (raw_size.isascii() and raw_size.isdigit())
            or not 1 <= int(raw_size) <= _MAX_PAGE_SIZE
        ):
            return _twilio_error(
                400, 20001, f"Invalid PageSize {raw_size!r}: must be an integer between 1 and 1000"
            )
        page_size = int(raw_size)
    raw_page = query.get("Page")
    page = 0
    if raw_page is not None:
        if not (raw_page.isascii() and raw_page.isdigit()):
            return _twilio_error(
                400, 20001, f"Invalid Page {raw_page!r}: must be a non-negative integer"
            )
        page = int(raw_page)
    raw_token = query.get("PageToken")
    token: _PageToken | None = None
    if raw_token is not None:
        token = _decode_token(raw_token, scope)
        if token is None:
            return _twilio_error(400, 21481, "Invalid PageToken")
    elif page > 0:
        return _twilio_error(400, 21481, "Paged requests must include a PageToken")
    return _Paging(page_size, page, token, raw_token)


#: ISO 8601 as the usage resources take it: a date, or a date and time with an optional
#: fraction and zone (``Z`` or ``±HH:MM``); without a zone it is UTC (Twilio's times are GMT).
_ISO_TIME: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
)


def _parse_time(text: str) -> int | None:
    """Unix seconds (rounded down) of an ISO 8601 ``Start``/``End``, or ``None`` if it is not
    one."""
    if not _ISO_TIME.fullmatch(text):
        return None
    fixed = text[:-1] + "+00:00" if text.endswith("Z") else text
    head, dot, tail = fixed.partition(".")
    if dot:  # Python takes at most six fraction digits
        digits = len(tail) - len(tail.lstrip("0123456789"))
        fixed = head + "." + tail[: min(digits, 6)] + tail[digits:]
    try:
        moment = dt.datetime.fromisoformat(fixed)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() // 1)


def _select(keys: list[int], paging: _Paging, rewind: int) -> tuple[int, int]:
    """[lo, hi) of the page in ``keys``; ``rewind`` > 0 repeats items of the previous page."""
    token = paging.token
    size = paging.page_size
    if token is None:
        lo = 0
    elif token.after:
        lo = bisect.bisect_right(keys, token.key)
    else:
        lo = max(0, bisect.bisect_left(keys, token.key) - size)
    if rewind and token is not None and token.after:
        lo = max(0, lo - rewind)
    return lo, min(len(keys), lo + size)


# --------------------------------------------------------------------------------------------
# State and handlers
# --------------------------------------------------------------------------------------------


class SimulatorState:
    """Everything one simulator app serves from: config, clock, fleet, faults, stats, tokens."""

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: SimClock | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.config = config
        self.clock = clock if clock is not None else SimClock(config.start_time, speed=config.speed)
        self.fleet = (
            fleet
            if fleet is not None
            else Fleet(
                self.clock,
                sims=config.sims,
                seed=config.seed,
                account_sid=config.account_sid,
                retention=config.retention,
                update_granularity=config.update_granularity,
                keep_history=config.keep_history,
                backfill=config.backfill,
                wall_timestamps=config.wall_timestamps,
                usage_lag=config.usage_lag,
                usage_final_after=config.usage_final_after,
                usage_retention=config.usage_retention,
                usage_unit=config.usage_unit,
                status_changes=config.status_changes,
            )
        )
        self.faults: FaultConfig = config.faults
        self.stats = SimulatorStats()
        #: Bearer token -> expiry on ``config.token_clock``.
        self.tokens: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._closed = False

    # -- helpers -----------------------------------------------------------------------------

    def issue_token(self) -> str:
        """Issue a bearer token (as the token endpoint does) and return it."""
        now = self.config.token_clock()
        if len(self.tokens) > 1000:
            self.tokens = {t: exp for t, exp in self.tokens.items() if exp > now}
        token = secrets.token_urlsafe(32)
        if self.config.token_style == "kore":  # noqa: S105 - a style name
            exp = int(self.config.token_wall_clock() + self.config.token_lifetime)
            claims = {"sub": self.config.client_id, "exp": exp, "jti": token[:16]}
            token = ".".join((_JWT_HEADER, _b64url(_encode(claims)), token))
        self.tokens[token] = now + self.config.token_lifetime
        return token

    def expire_tokens(self) -> None:
        """Forget every issued token (the next API call with one gets 401)."""
        self.tokens.clear()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if :meth:`release_delayed` is called or the app shuts down."""
        if seconds <= 0 or self._closed:
            return
        wake = self._wake
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    def release_delayed(self) -> None:
        """Let every request that is currently delayed (latency, timeout faults) answer now."""
        self._wake.set()
        self._wake = asyncio.Event()

    def closing(self) -> None:
        """Wake delayed requests for good so shutdown does not wait for injected timeouts."""
        self._closed = True
        self._wake.set()

    def base_url(self, request: web.Request) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        return f"{request.scheme}://{request.host}"

    def _basic_ok(self, login: str, password: str) -> bool:
        cfg = self.config
        if hmac.compare_digest(login.encode(), cfg.account_sid.encode()):
            return hmac.compare_digest(password.encode(), cfg.auth_token.encode())
        secret = cfg.api_keys.get(login)
        return secret is not None and hmac.compare_digest(password.encode(), secret.encode())

    def _authenticate(self, request: web.Request) -> _Reply | None:
        header = request.headers.get("Authorization", "")
        if self.config.auth_mode == "basic":
            if header[:6].lower() == "basic ":
                try:
                    creds: BasicAuth | None = BasicAuth.decode(header)
                except ValueError:
                    creds = None
                if creds is not None and self._basic_ok(creds.login, creds.password):
                    return None
            return _twilio_error(
                401, 20003, "Authenticate", {"WWW-Authenticate": 'Basic realm="Twilio API"'}
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            expiry = self.tokens.get(token)
            if expiry is not None and self.config.token_clock() < expiry:
                return None
            description = (
                "The access token expired" if expiry is not None else "Invalid access token"
            )
        else:
            description = "Missing bearer access token"
        if self.config.token_style == "kore":  # noqa: S105 - a style name
            return _Reply(403, KORE_DENIED)
        return _oauth_error(
            401, "invalid_token", description, {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )

    # -- request pipeline --------------------------------------------------------------------

    async def serve(
        self,
        request: web.Request,
        kind: str,
        impl: Callable[[web.Request, FaultResponse | None], Awaitable[_Reply]],
    ) -> web.Response:
        faults = self.faults
        try:
            latency = faults.extra_latency(kind)
        except Exception:  # a bad live setting must not crash the simulator
            log.exception("fault latency failed")
            latency = 0.0
        if latency > 0:
            await self.sleep(latency)
        cap = self.config.max_concurrent
        request[_CONCURRENT_KEY] = self.stats.in_flight  # what the cap is checked against
        if kind in API_KINDS and cap is not None and self.stats.in_flight > cap:
            return self._respond(
                _twilio_error(
                    429,
                    20429,
                    "Too Many Requests",
                    {"Retry-After": _seconds(self.config.concurrency_retry_after)},
                )
            )
        if kind in API_KINDS:
            denied = self._authenticate(request)
            if denied is not None:
                return self._respond(denied)
        try:
            fault = faults.decide(kind)
        except Exception:
            log.exception("fault decision failed")
            fault = None
        if fault is not None:
            if fault.delay > 0:
                await self.sleep(fault.delay)
            if fault.is_error:
                return self._respond(self._fault_reply(kind, fault))
        reply = await impl(request, fault)
        if fault is not None and reply.status == 200:
            if fault.malformed:
                reply = _Reply(200, self._malformed(kind, reply.body), reply.headers)
            if fault.truncated:
                reply = _Reply(200, reply.body[: len(reply.body) // 2], reply.headers)
        return self._respond(reply)

    @staticmethod
    def _respond(reply: _Reply) -> web.Response:
        return web.Response(
            status=reply.status,
            body=reply.body,
            content_type=reply.content_type,
            headers=reply.headers,
        )

    def _fault_reply(self, kind: str, fault: FaultResponse) -> _Reply:
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = _seconds(fault.retry_after)
        if fault.body is not None:
            return _Reply(fault.status, fault.body, headers, fault.content_type)
        if kind == "token" and fault.status < 500 and fault.status != 429:
            return _oauth_error(fault.status, "invalid_request", "Injected fault", headers)
        code, message = _FAULT_CODES.get(fault.status, (20000 + fault.status, "Error"))
        return _twilio_error(fault.status, code, message, headers)

    def _malformed(self, kind: str, body: bytes) -> bytes:
        """Valid JSON of the wrong shape, derived from the good ``body``."""
        doc: Any = json.loads(body)
        if kind in LIST_KINDS:
            key = doc["meta"]["key"]
            variant = self.faults.choice(4)
            if variant == 0:
                del doc[key]
            elif variant == 1:
                doc[key] = {"items": doc[key]}
            elif variant == 2:
                del doc["meta"]
                doc[key] = None
            else:
                doc = [doc]
        elif kind in ("sim", "rate_plan"):
            doc = [doc] if self.faults.choice(2) == 0 else {"sid": 42, "status": ["active"]}
        else:
            doc.pop("access_token", None)
            doc["expires_in"] = {"seconds": doc.get("expires_in")}
        return _encode(doc)

    # -- endpoints ---------------------------------------------------------------------------

    def _page_meta(
        self,
        request: web.Request,
        path: str,
        key: str,
        filters: list[tuple[str, str]],
        paging: _Paging,
        next_token: str | None,
        previous_token: str | None,
    ) -> dict[str, Any]:
        base = self.base_url(request) + path

        def url(page: int, token: str | None) -> str:
            query = [*filters, ("PageSize", str(paging.page_size)), ("Page", str(page))]
            if token is not None:
                query.append(("PageToken", token))
            return base + "?" + urlencode(query)

        return {
            "first_page_url": url(0, None),
            "key": key,
            "next_page_url": None if next_token is None else url(paging.page + 1, next_token),
            "page": paging.page,
            "page_size": paging.page_size,
            "previous_page_url": (
                None
                if previous_token is None or paging.page == 0
                else url(paging.page - 1, previous_token)
            ),
            "url": url(paging.page, paging.raw_token),
        }

    def _page(
        self,
        keys: list[int],
        paging: _Paging,
        fault: FaultResponse | None,
        scope: str,
    ) -> tuple[int, int, str | None, str | None, bool]:
        """(lo, hi, next token, previous token, shuffle) for one list page."""
        rewind = 0
        overlap = fault is not None and fault.overlap
        if overlap and paging.page_size > 1:
            rewind = self.faults.randint(1, paging.page_size - 1)
        lo, hi = _select(keys, paging, rewind)
        next_token = (
            _encode_token(True, scope, keys[hi - 1]) if hi < len(keys) and hi > lo else None
        )
        if lo < len(keys) and hi > lo:
            previous_token: str | None = _encode_token(False, scope, keys[lo])
        elif paging.token is not None:
            previous_token = _encode_token(False, scope, paging.token.key)
        else:
            previous_token = None
        return lo, hi, next_token, previous_token, overlap

    async def sims_list(self, request: web.Request, fault: FaultResponse | None) -> _Reply:
        query = request.query
        status = query.get("Status")
        if status is not None and status not in SIM_STATUSES:
            return _twilio_error(400, 20001, f"Invalid Status {status!r}")
        iccid = query.get("Iccid")
        rate_plan = query.get("RatePlan")
        paging = _parse_paging(query, "sims")
        if isinstance(paging, _Reply):
            return paging
        listing = self.fleet.sims_snapshot(status, iccid, rate_plan)
        lo, hi, next_token, previous_token, shuffle = self._page(
            listing.keys, paging, fault, "sims"
        )
        base = self.base_url(request)
        time_format = self.fleet.time_format
        items = [_encode(sim.to_api(base, time_format)) for sim in listing.views(lo, hi)]
        if shuffle:
            self.faults.shuffle(items)
        filters = [
            (name, value)
            for name, value in (("Status", status), ("Iccid", iccid), ("RatePlan", rate_plan))
            if value is not None
        ]
        meta = self._page_meta(
            request, "/v1/Sims", "sims", filters, paging, next_token, previous_token
        )
        return _Reply(200, b'{"sims":[' + b",".join(items) + b'],"meta":' + _encode(meta) + b"}")

    async def sim_fetch(self, request: web.Request, fault: FaultResponse | None) -> _Reply:
        sid = request.match_info["sid"]
        sim = self.fleet.sim(sid)
        if sim is None:
            return _twilio_error(404, 20404, f"The requested resource /v1/Sims/{sid} was not found")
        return _Reply(200, _encode(sim.to_api(self.base_url(request), self.fleet.time_format)))

    async def data_sessions(self, request: web.Request, fault: FaultResponse | None) -> _Reply:
        sim_sid = request.match_info["sim_sid"]
        paging = _parse_paging(request.query, sim_sid)
        if isinstance(paging, _Reply):
            return paging
        listing = self.fleet.listing_snapshot(sim_sid)
        if listing is None:
            return _twilio_error(
                404, 20404, f"The requested resource /v1/Sims/{sim_sid}/DataSessions was not found"
            )
        lo, hi, next_token, previous_token, shuffle = self._page(
            listing.keys, paging, fault, sim_sid
        )
        items = [listing.fragment(i) for i in range(lo, hi)]
        if shuffle:
            self.faults.shuffle(items)
        meta = self._page_meta(
            request,
            f"/v1/Sims/{sim_sid}/DataSessions",
            "data_sessions",
            [],
            paging,
            next_token,
            previous_token,
        )
        return _Reply(
            200, b'{"data_sessions":[' + b",".join(items) + b'],"meta":' + _encode(meta) + b"}"
        )

    def _usage_query(self, request: web.Request) -> tuple[str, int, int] | _Reply:
        """(granularity, Start, End) of a usage request, in reported unix seconds."""
        query = request.query
        granularity = query.get("Granularity", "all")
        if granularity not in GRANULARITIES:
            return _twilio_error(
                400,
                20001,
                f"Invalid Granularity {granularity!r}: must be one of hourly, daily, all",
            )
        fleet = self.fleet
        bounds: dict[str, int] = {}
        for name in ("Start", "End"):
            raw = query.get(name)
            if raw is None:
                continue
            value = _parse_time(raw)
            if value is None:
                return _twilio_error(
                    400, 20001, f"Invalid {name} {raw!r}: must be an ISO 8601 date and time"
                )
            bounds[name] = value
        end = bounds.get("End", fleet.reported_time(self.clock.now()))
        start = bounds.get("Start", month_before(end))
        if start > end:
            return _twilio_error(400, 20001, "Start must not be after End")
        return granularity, start, end

    async def _usage(
        self, request: web.Request, fault: FaultResponse | None, sim_sid: str | None
    ) -> _Reply:
        fleet = self.fleet
        path = "/v1/UsageRecords" if sim_sid is None else f"/v1/Sims/{sim_sid}/UsageRecords"
        if sim_sid is not None and sim_sid not in fleet:
            return _twilio_error(404, 20404, f"The requested resource {path} was not found")
        parsed = self._usage_query(request)
        if isinstance(parsed, _Reply):
            return parsed
        granularity, start, end = parsed
        sim_start, sim_end = fleet.simulated_time(start), fleet.simulated_time(end)
        scope = f"usage:{sim_sid or 'account'}:{granularity}:{start}:{end}"
        paging = _parse_paging(request.query, scope)
        if isinstance(paging, _Reply):
            return paging
        if sim_sid is None:
            # The first account request sums every SIM: let other requests in between.
            for _ in fleet.account_usage_steps():
                await asyncio.sleep(0)
        keys, records = fleet.usage_listing(
            sim_sid, granularity=granularity, start=sim_start, end=sim_end
        )
        lo, hi, next_token, previous_token, shuffle = self._page(keys, paging, fault, scope)
        start_text, end_text = format_time(start), format_time(end)
        time_format = fleet.time_format

        def period_format(t: int) -> str:
            # The requested bounds read back exactly as given, also on a wall-time fleet.
            if t == sim_start:
                return start_text
            if t == sim_end:
                return end_text
            return time_format(t)

        items = [_encode(record.to_api(period_format)) for record in records[lo:hi]]
        if shuffle:
            self.faults.shuffle(items)
        filters = [("Start", start_text), ("End", end_text), ("Granularity", granularity)]
        meta = self._page_meta(
            request, path, "usage_records", filters, paging, next_token, previous_token
        )
        return _Reply(
            200, b'{"usage_records":[' + b",".join(items) + b'],"meta":' + _encode(meta) + b"}"
        )

    async def sim_usage_records(self, request: web.Request, fault: FaultResponse | None) -> _Reply:
        return await self._usage(request, fault, request.match_info["sim_sid"])

    async def account_usage_records(
        self, request: web.Request, fault: FaultResponse | None
    ) -> _Reply:
        return await self._usage(request, fault, None)

    async def rate_plans_list(self, request: web.Request, fault: FaultResponse | None) -> _Reply:
        paging = _parse_paging(request.query, "rate_plans")
        if isinstance(paging, _Reply):
            return paging
        plans = self.fleet.rate_plans()
        keys = list(range(len(plans)))
        lo, hi, next_token, previous_token, shuffle = self._page(keys, paging, fault, "rate_plans")
        base = self.base_url(request)
        time_format = self.fleet.time_format
        items = [_encode(plan.to_api(base, time_format)) for plan in plans[lo:hi]]
        if shuffle:
            self.faults.shuffle(items)
        meta = self._page_meta(
            request, "/v1/RatePlans", "rate_plans", [], paging, next_token, previous_token
        )
        return _Reply(
            200, b'{"rate_plans":[' + b",".join(items) + b'],"meta":' + _encode(meta) + b"}"
        )

    async def rate_plan_fetch(self, request: web.Request, fault: FaultResponse | None) -> _Reply:
        sid = request.match_info["sid"]
        plan = self.fleet.rate_plan(sid)
        if plan is None:
            return _twilio_error(
                404, 20404, f"The requested resource /v1/RatePlans/{sid} was not found"
            )
        return _Reply(200, _encode(plan.to_api(self.base_url(request), self.fleet.time_format)))

    async def token(self, request: web.Request, fault: FaultResponse | None) -> _Reply:
        form = (
            await request.post()
            if request.content_type == "application/x-www-form-urlencoded"
            else {}
        )
        no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}

        def field(name: str) -> str | None:
            value = form.get(name)
            return value if isinstance(value, str) else None

        grant_type = field("grant_type")
        if grant_type is None:
            return _oauth_error(400, "invalid_request", "grant_type is required", no_store)
        if grant_type != "client_credentials":
            return _oauth_error(
                400,
                "unsupported_grant_type",
                f"grant_type {grant_type!r} is not supported",
                no_store,
            )
        client_id = field("client_id")
        client_secret = field("client_secret")
        if client_id is None or client_secret is None:
            return _oauth_error(
                400, "invalid_request", "client_id and client_secret are required", no_store
            )
        cfg = self.config
        id_ok = hmac.compare_digest(client_id.encode(), cfg.client_id.encode())
        secret_ok = hmac.compare_digest(client_secret.encode(), cfg.client_secret.encode())
        if not (id_ok and secret_ok):
            return _oauth_error(401, "unauthorized_client", "Invalid client credentials", no_store)
        body = {
            "access_token": self.issue_token(),
            "expires_in": str(int(cfg.token_lifetime)),
            "token_type": "Bearer",
            "scope": cfg.token_scope,
        }
        return _Reply(200, _encode(body), no_store)


STATE_KEY: Final = web.AppKey("twilio_wireless_simulator", SimulatorState)


def _route_handler(
    state: SimulatorState,
    kind: str,
    impl: Callable[[web.Request, FaultResponse | None], Awaitable[_Reply]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await state.serve(request, kind, impl)

    return handler


_CONCURRENT_KEY: Final = web.RequestKey("twilio_wireless_simulator.concurrent", int)


def _make_load_middleware(state: SimulatorState) -> Any:
    """Twilio's load headers on every API answer: the requests in flight that ``serve``
    checked ``max_concurrent`` against (after any latency), the request's own time."""

    @web.middleware
    async def load_headers(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.match_info.route.name not in API_KINDS:
            return await handler(request)
        started = time.perf_counter()
        response = await handler(request)
        concurrent = request.get(_CONCURRENT_KEY, state.stats.in_flight)
        response.headers["Twilio-Concurrent-Requests"] = str(concurrent)
        response.headers["Twilio-Request-Duration"] = f"{time.perf_counter() - started:.3f}"
        return response

    return load_headers


def _make_middleware(state: SimulatorState) -> Any:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        name = request.match_info.route.name
        kind = name if name in _KINDS else "other"
        state.stats.started(kind)
        status = 499
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status == 405:
                    reply = _twilio_error(405, 20004, "Method not allowed")
                elif exc.status == 404:
                    reply = _twilio_error(
                        404, 20404, f"The requested resource {request.path} was not found"
                    )
                else:
                    reply = _twilio_error(exc.status, 20000 + exc.status, exc.reason)
                response = state._respond(reply)
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception:
                log.exception("simulator handler failed for %s", request.path)
                response = state._respond(_twilio_error(500, 20500, "Internal Server Error"))
            status = response.status
            return response
        finally:
            state.stats.finished(kind, status)

    return middleware


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response(
        {"status": "ok", "sims": len(state.fleet), "simulated_time": state.clock.now()}
    )


async def _index(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    base = state.base_url(request)
    text = (
        "Twilio Programmable Wireless API simulator\n\n"
        f"  GET  {base}/v1/Sims\n"
        f"  GET  {base}/v1/Sims/{{Sid}}\n"
        f"  GET  {base}/v1/Sims/{{SimSid}}/DataSessions\n"
        f"  GET  {base}/v1/Sims/{{SimSid}}/UsageRecords\n"
        f"  GET  {base}/v1/UsageRecords\n"
        f"  GET  {base}/v1/RatePlans\n"
        f"  GET  {base}/v1/RatePlans/{{Sid}}\n"
        + (f"  POST {base}{TOKEN_PATH}\n" if state.config.auth_mode == "bearer" else "")
        + f"  GET  {base}/health\n"
    )
    return web.Response(text=text)


def build_app(
    config: SimulatorConfig | None = None,
    *,
    clock: SimClock | None = None,
    fleet: Fleet | None = None,
) -> web.Application:
    """The simulator as an aiohttp application; its state is ``app[STATE_KEY]``."""
    state = SimulatorState(
        config if config is not None else SimulatorConfig(), clock=clock, fleet=fleet
    )
    middlewares = [_make_middleware(state)]
    if state.config.load_headers:
        middlewares.append(_make_load_middleware(state))
    app = web.Application(middlewares=middlewares)
    app[STATE_KEY] = state
    app.router.add_get("/v1/Sims", _route_handler(state, "sims", state.sims_list), name="sims")
    app.router.add_get("/v1/Sims/{sid}", _route_handler(state, "sim", state.sim_fetch), name="sim")
    app.router.add_get(
        "/v1/Sims/{sim_sid}/DataSessions",
        _route_handler(state, "data_sessions", state.data_sessions),
        name="data_sessions",
    )
    app.router.add_get(
        "/v1/Sims/{sim_sid}/UsageRecords",
        _route_handler(state, "usage_records", state.sim_usage_records),
        name="usage_records",
    )
    app.router.add_get(
        "/v1/UsageRecords",
        _route_handler(state, "account_usage_records", state.account_usage_records),
        name="account_usage_records",
    )
    app.router.add_get(
        "/v1/RatePlans",
        _route_handler(state, "rate_plans", state.rate_plans_list),
        name="rate_plans",
    )
    app.router.add_get(
        "/v1/RatePlans/{sid}",
        _route_handler(state, "rate_plan", state.rate_plan_fetch),
        name="rate_plan",
    )
    if state.config.auth_mode == "bearer":
        app.router.add_post(TOKEN_PATH, _route_handler(state, "token", state.token), name="token")
    app.router.add_get("/health", _health, name="health")
    app.router.add_get("/", _index)

    async def on_shutdown(_: web.Application) -> None:
        state.closing()

    app.on_shutdown.append(on_shutdown)
    return app


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class RunningSimulator:
    """A simulator served on a real socket; use ``async with`` or ``start()``/``close()``.

    ``clock``: a :class:`SimClock` to use instead of one built from the config (tests inject
    one with a fake wall clock).
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        access_log: bool = False,
        clock: SimClock | None = None,
    ) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.host = host
        self.port = port
        self.app = build_app(self.config, clock=clock)
        self.state = self.app[STATE_KEY]
        self._access_log = access_log
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. ``http://127.0.0.1:PORT`` (no trailing slash)."""
        if self._url is None:
            raise RuntimeError("the simulator is not running")
        return self._url

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def fleet(self) -> Fleet:
        return self.state.fleet

    @property
    def clock(self) -> SimClock:
        return self.state.clock

    @property
    def faults(self) -> FaultConfig:
        return self.state.faults

    @property
    def stats(self) -> SimulatorStats:
        return self.state.stats

    def issue_token(self) -> str:
        """A valid bearer token without going through the token endpoint."""
        return self.state.issue_token()

    def expire_tokens(self) -> None:
        self.state.expire_tokens()

    def release_delayed(self) -> None:
        """Answer every request currently held by latency or a timeout fault now."""
        self.state.release_delayed()

    async def start(self) -> RunningSimulator:
        if self._runner is not None:
            return self
        runner = web.AppRunner(
            self.app,
            access_log=log if self._access_log else None,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break
        self._url = f"http://{_url_host(self.host)}:{self.port}"
        return self

    async def close(self) -> None:
        runner = self._runner
        if runner is None:
            return
        self._runner = None
        self.state.closing()
        await runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Start (if needed) and wait until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()


class _Starter:
    """What :func:`start_simulator` returns: ``await`` it or use it with ``async with``."""

    def __init__(self, sim: RunningSimulator) -> None:
        self._sim = sim

    def __await__(self) -> Generator[Any, None, RunningSimulator]:
        return self._sim.start().__await__()

    async def __aenter__(self) -> RunningSimulator:
        return await self._sim.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._sim.close()


def start_simulator(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    clock: SimClock | None = None,
) -> _Starter:
    """Serve a simulator on ``host:port`` (0: a free port), optionally on an injected ``clock``.

    ``async with start_simulator(cfg) as sim: ...`` or ``sim = await start_simulator(cfg)`` (then
    ``await sim.close()``).
    """
    return _Starter(RunningSimulator(config, host, port, clock=clock))
