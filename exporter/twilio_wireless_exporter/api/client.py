"""The only code that speaks HTTP to the Twilio (or KORE) Wireless API.

Responsibilities: authentication headers, ``User-Agent``, paging by ``meta.next_page_url``,
per-request timeouts, retries with exponential backoff and jitter (honouring ``Retry-After``),
a global cap on in-flight requests and a requests-per-second limit, response size caps, and
decoding pages into typed records. Every failure surfaces as one :class:`ApiError`.

It knows nothing of Prometheus: counts and latencies go to an :class:`ApiObserver`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import urlencode, urlsplit

import aiohttp
import msgspec
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.api.adaptive import AdaptiveLimit
from twilio_wireless_exporter.api.records import (
    DataSession,
    DataSessionPage,
    Sim,
    SimPage,
    TwilioErrorBody,
)

log = logging.getLogger(__name__)

USER_AGENT: Final = f"twilio-wireless-exporter/{__version__} (+aiohttp/{aiohttp.__version__})"

# Endpoint templates used as metric label values.
ENDPOINT_SIMS: Final = "sims"
ENDPOINT_SIM: Final = "sim"
ENDPOINT_DATA_SESSIONS: Final = "data_sessions"

# Values of the ``code`` label for failures that have no HTTP status.
CODE_TRANSPORT_ERROR: Final = "error"

_ERROR_SNIPPET_CHARS: Final = 200
_MAX_RETRY_AFTER: Final = 600.0
#: This many 429 answers in a row (from any requests) mean the account is over its limit: every
#: request pauses until the Retry-After of the latest one has passed. A lone 429 only makes its
#: own request wait.
STORM_429S: Final = 3


class ApiError(Exception):
    """A failed API call, after retries. ``kind`` says what went wrong.

    kinds: ``http`` (non-2xx status), ``auth`` (401/403), ``timeout``, ``connection``,
    ``decode`` (malformed JSON or a page of the wrong shape), ``too_large`` (response over the
    size cap), ``too_many_pages`` (page cap reached), ``bad_next_page`` (a next_page_url that
    points away from the configured API host).
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.retry_after = retry_after

    @property
    def retry_reason(self) -> str | None:
        """The retry reason label when this error is worth retrying, else ``None``."""
        if self.kind in ("timeout", "connection"):
            return self.kind
        if self.kind == "decode":
            # A 200 whose body is cut short or garbled (a proxy or connection hiccup) is as
            # transient as a 5xx; the token endpoint's bad answers are retried alike.
            return "decode"
        if self.status == 429:
            return "429"
        if self.status is not None and 500 <= self.status <= 599:
            return "5xx"
        return None

    def __str__(self) -> str:
        parts = [f"{self.endpoint}: {self.message}"]
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.code is not None:
            parts.append(f"twilio_code={self.code}")
        return " ".join(parts)


class ApiObserver(Protocol):
    """Receives one call per HTTP attempt and per retry (metrics live elsewhere)."""

    def request_done(self, endpoint: str, code: str, duration: float) -> None: ...

    def retry(self, endpoint: str, reason: str) -> None: ...


class NullObserver:
    def request_done(self, endpoint: str, code: str, duration: float) -> None:
        return None

    def retry(self, endpoint: str, reason: str) -> None:
        return None


class Authenticator(Protocol):
    """Supplies the ``Authorization`` header; may renew credentials after a 401."""

    async def authorization(self) -> str:
        """The header value for the next request."""
        ...

    async def renew(self, rejected: str) -> bool:
        """Called after a 401 for a request sent with ``rejected``.

        Returns True when fresh credentials are available and the request is worth one more try.
        """
        ...


class BasicAuthenticator:
    """HTTP Basic with Account SID + Auth Token, or API key SID + secret."""

    def __init__(self, username: str, password: str) -> None:
        # RFC 7617: "Basic " + base64("user:password"), UTF-8 encoded.
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._header = f"Basic {token}"

    def __repr__(self) -> str:
        return "BasicAuthenticator(<redacted>)"

    async def authorization(self) -> str:
        return self._header

    async def renew(self, rejected: str) -> bool:
        return False


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


_T = TypeVar("_T", DataSessionPage, SimPage, Sim)
_P = TypeVar("_P", DataSessionPage, SimPage)

_DECODERS: Final[dict[type, msgspec.json.Decoder[Any]]] = {
    DataSessionPage: msgspec.json.Decoder(DataSessionPage),
    SimPage: msgspec.json.Decoder(SimPage),
    Sim: msgspec.json.Decoder(Sim),
}
_ERROR_DECODER: Final = msgspec.json.Decoder(TwilioErrorBody)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date. Garbage → ``None``."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER)


def describe_error_body(body: bytes) -> tuple[int | None, str]:
    """Twilio code and a human message from an error body of any shape (Twilio, KORE, HTML)."""
    try:
        err = _ERROR_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        err = None
    if err is not None and err.message:
        return err.code, err.message
    try:
        generic = msgspec.json.decode(body)
    except msgspec.DecodeError:
        generic = None
    if isinstance(generic, dict):
        for key in ("error_description", "message", "error", "detail", "title"):
            value = generic.get(key)
            if isinstance(value, str) and value:
                code = generic.get("code")
                return (code if isinstance(code, int) else None), value
    text = body[:_ERROR_SNIPPET_CHARS].decode("utf-8", "replace")
    text = " ".join(text.split())
    return None, text or "(empty body)"


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
        self._session = session
        self._auth = auth
        self._settings = settings
        self._base = settings.base_url.rstrip("/")
        base_parts = urlsplit(self._base)
        self._origin = (base_parts.scheme, base_parts.netloc)
        self._observer: ApiObserver = observer or NullObserver()
        self._sleep = sleep
        self._rng = rng or random.Random()
        # At most `concurrency` in flight, fewer while the API answers 429 (see adaptive.py).
        self._slots = AdaptiveLimit(settings.concurrency)
        # Leaky bucket: bursts of at most a tenth of a second's worth of requests.
        burst = max(1.0, settings.requests_per_second / 10.0)
        self._limiter = AsyncLimiter(burst, burst / settings.requests_per_second)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._consecutive_429 = 0
        self._pause_holders = 0  # retries sleeping out a 429 storm; requests wait while > 0
        self._unpaused = asyncio.Event()
        self._unpaused.set()

    @property
    def settings(self) -> ClientSettings:
        return self._settings

    # ----------------------------------------------------------------- public API

    async def list_data_sessions(self, sim_sid: str, page_size: int) -> list[DataSession]:
        """Every DataSession the API lists for the SIM, following ``next_page_url``.

        Pages may overlap or be unordered: de-duplication is the caller's job.
        """
        url = f"{self._base}/v1/Sims/{sim_sid}/DataSessions?PageSize={int(page_size)}"
        sessions: list[DataSession] = []
        order = self._slots.new_order()
        async for page in self._pages(url, DataSessionPage, ENDPOINT_DATA_SESSIONS, order):
            sessions.extend(page.data_sessions)
        return sessions

    async def list_sims(self, statuses: Sequence[str], page_size: int) -> list[Sim]:
        """Every SIM of the account with one of ``statuses`` (all SIMs when empty)."""
        sims: dict[str, Sim] = {}
        status_filters: list[str | None] = list(statuses) or [None]
        order = self._slots.new_order()
        for status in status_filters:
            query: dict[str, str | int] = {"PageSize": page_size}
            if status is not None:
                query["Status"] = status
            url = f"{self._base}/v1/Sims?" + urlencode(query)
            async for page in self._pages(url, SimPage, ENDPOINT_SIMS, order):
                for sim in page.sims:
                    sims[sim.sid] = sim
        return list(sims.values())

    async def fetch_sim(self, sim_sid: str) -> Sim:
        url = f"{self._base}/v1/Sims/{sim_sid}"
        return await self._get(url, Sim, ENDPOINT_SIM, self._slots.new_order())

    # ----------------------------------------------------------------- internals

    async def _pages(
        self, url: str, kind: type[_P], endpoint: str, order: int
    ) -> AsyncIterator[_P]:
        """Pages of one listing, following ``next_page_url``, at most ``max_pages`` of them.

        Every request of a listing carries the ``order`` the listing drew when it began, so its
        next pages and retries wait behind older listings only (see adaptive.py)."""
        next_url: str | None = url
        count = 0
        while next_url is not None:
            if count >= self._settings.max_pages:
                raise ApiError(
                    "too_many_pages",
                    f"listing has more than {self._settings.max_pages} pages (poll.max_pages)",
                    endpoint=endpoint,
                )
            page = await self._get(next_url, kind, endpoint, order)
            count += 1
            yield page
            nxt = page.meta.next_page_url
            next_url = self._check_next_url(nxt, endpoint) if nxt else None

    def _check_next_url(self, url: str, endpoint: str) -> str:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != self._origin:
            # Never send credentials to a host we were not configured for.
            raise ApiError(
                "bad_next_page",
                f"next_page_url points to another origin ({parts.scheme}://{parts.netloc})",
                endpoint=endpoint,
            )
        return url

    async def _get(self, url: str, kind: type[_T], endpoint: str, order: int) -> _T:
        # Fast path: nearly every request succeeds at once, and setting up tenacity costs about
        # 30 µs even then (a fifth of a request's CPU at fleet scale). A retryable first failure
        # is replayed as tenacity's first attempt, so backoff, Retry-After, retry metrics and
        # logs stay exactly what they were.
        try:
            return await self._attempt(url, kind, endpoint, order)
        except ApiError as exc:
            if not _is_retryable(exc) or self._settings.max_retries < 1:
                raise
            replay = [exc]

        async def attempt() -> _T:
            if replay:
                raise replay.pop()
            return await self._attempt(url, kind, endpoint, order)

        holding = False

        def before_sleep(state: RetryCallState) -> None:
            nonlocal holding
            self._before_sleep(state)
            exc = state.outcome.exception() if state.outcome else None
            storm = self._consecutive_429 >= STORM_429S
            if storm and isinstance(exc, ApiError) and exc.status == 429:
                holding = True  # pause every request while this retry sleeps
                self._hold_pause(state.upcoming_sleep)

        async def sleep(seconds: float) -> None:
            nonlocal holding
            try:
                await self._sleep(seconds)
            finally:
                if holding:
                    holding = False
                    self._release_pause()

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._settings.max_retries + 1),
            retry=retry_if_exception(_is_retryable),
            wait=self._wait,
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        result: _T = await retrying(attempt)
        return result

    def _wait(self, state: RetryCallState) -> float:
        """Full-jitter exponential backoff, never shorter than ``Retry-After``."""
        attempt = state.attempt_number  # 1 after the first failure
        ceiling = min(
            self._settings.backoff_max, self._settings.backoff_initial * 2 ** (attempt - 1)
        )
        delay = self._rng.uniform(ceiling / 2, ceiling)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return delay

    def _hold_pause(self, seconds: float) -> None:
        if self._pause_holders == 0:
            log.info(
                "%d or more 429 Too Many Requests in a row: pausing all API requests for %.1fs",
                STORM_429S,
                seconds,
            )
        self._pause_holders += 1
        self._unpaused.clear()

    def _release_pause(self) -> None:
        self._pause_holders -= 1
        if self._pause_holders == 0:
            self._unpaused.set()

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError):
            reason = exc.retry_reason or "other"
            self._observer.retry(exc.endpoint, reason)
            log.debug(
                "retrying %s after %s (attempt %d, waiting %.2fs)",
                exc.endpoint,
                reason,
                state.attempt_number,
                state.upcoming_sleep,
            )

    async def _attempt(self, url: str, kind: type[_T], endpoint: str, order: int) -> _T:
        status, body, retry_after, header = await self._send(url, endpoint, order)
        if status == 401 and await self._auth.renew(header):
            # Credentials were renewed (e.g. an expired OAuth2 token): one more try.
            status, body, retry_after, header = await self._send(url, endpoint, order)
        if status == 200:
            try:
                decoded: _T = _DECODERS[kind].decode(body)
                return decoded
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ApiError(
                    "decode", f"malformed response: {exc}", endpoint=endpoint, status=status
                ) from None
        code, message = describe_error_body(body)
        kind_name = "auth" if status in (401, 403) else "http"
        raise ApiError(
            kind_name,
            message,
            endpoint=endpoint,
            status=status,
            code=code,
            retry_after=retry_after,
        )

    async def _send(
        self, url: str, endpoint: str, order: int
    ) -> tuple[int, bytes, float | None, str]:
        """One HTTP GET under the concurrency and rate limits, queued by ``order`` for a slot.

        Returns status, body, Retry-After and the Authorization header that was sent (taken
        only once the request may go, so a long wait in the queue cannot send a stale token).
        """
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        async with self._slots.slot(order) as slot:
            await self._unpaused.wait()  # a 429 storm: nothing goes out until it has passed
            await self._limiter.acquire()
            header = headers["Authorization"] = await self._auth.authorization()
            started = time.perf_counter()
            code_label = CODE_TRANSPORT_ERROR
            try:
                async with self._session.get(
                    url, headers=headers, timeout=self._timeout, allow_redirects=False
                ) as resp:
                    code_label = str(resp.status)
                    slot.status = resp.status
                    body = await self._read_body(resp, endpoint)
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    self._consecutive_429 = self._consecutive_429 + 1 if resp.status == 429 else 0
                    return resp.status, body, retry_after, header
            except TimeoutError:
                code_label = CODE_TRANSPORT_ERROR
                raise ApiError(
                    "timeout", f"no response within {self._settings.timeout:g}s", endpoint=endpoint
                ) from None
            except aiohttp.ClientError as exc:
                code_label = CODE_TRANSPORT_ERROR
                raise ApiError(
                    "connection", f"{type(exc).__name__}: {exc}", endpoint=endpoint
                ) from None
            finally:
                self._observer.request_done(endpoint, code_label, time.perf_counter() - started)

    async def _read_body(self, resp: aiohttp.ClientResponse, endpoint: str) -> bytes:
        limit = self._settings.max_response_bytes
        body = await read_capped(resp, limit)
        if body is None:
            length = resp.content_length
            size = f"of {length} bytes " if length is not None and length > limit else ""
            raise ApiError(
                "too_large",
                f"response {size}exceeds the {limit}-byte cap (poll.max_response_bytes)",
                endpoint=endpoint,
                status=resp.status,
            )
        return body


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The response body, or ``None`` as soon as it is known to exceed ``limit`` bytes.

    A hostile or broken upstream cannot make us buffer more than ``limit`` bytes.
    """
    if resp.content_length is not None and resp.content_length > limit:
        return None
    if resp.content_length is not None and "Content-Encoding" not in resp.headers:
        # Framed by a Content-Length within the cap and not decompressed: aiohttp reads exactly
        # that many bytes, so one read() is as safe as counting chunks, and cheaper.
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.retry_reason is not None
