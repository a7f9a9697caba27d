"""The one piece of code that sends HTTP requests: API pages, SIM reads and token requests.

A :class:`Transport` owns what every request shares: the ``User-Agent``, the per-request
timeout, the response size cap, the timing reported to an :class:`ApiObserver`, the mapping of
statuses and transport failures to one :class:`ApiError` with a closed set of kinds, and one
retry policy. What differs between endpoints is passed in, not re-implemented:

* a :class:`Route` says how a 200 body decodes and how an error body reads;
* a :class:`Gate` admits each attempt (the API client's concurrency, rate limit and 429-storm
  pause; the token endpoint's gate admits at once);
* an optional :class:`Authenticator` supplies the ``Authorization`` header and may renew it after
  a 401, which earns the request one more try within the same attempt.

Every answer's ``Twilio-Concurrent-Requests`` (the account's requests in flight as Twilio
counted them) and ``Twilio-Request-Duration`` (seconds Twilio spent on the request) go to a
:class:`LoadObserver`, and the concurrency to the gate's ticket (adaptive.py stops growing its
limit near the level at which 429s began). A value that is no plausible number is ignored and
counted (:meth:`LoadObserver.header_rejected`); it never fails the request.

Retries: 429, 5xx, timeouts, connection errors and garbled or cut-short 200 bodies are retried,
at most ``max_retries`` times, after a jittered exponential backoff that never waits less than
the answer's ``Retry-After``. The first attempt runs without any retry machinery: nearly every
request succeeds at once, and only a retryable failure enters the loop in :meth:`_retry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

import aiohttp
import msgspec

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.api.records import TwilioErrorBody

log = logging.getLogger(__name__)

USER_AGENT: Final = f"twilio-wireless-exporter/{__version__} (+aiohttp/{aiohttp.__version__})"

#: The ``code`` label of requests that got no HTTP status (timeouts, connection failures).
CODE_TRANSPORT_ERROR: Final = "error"

#: Response headers with the account's load, as Twilio sees it.
CONCURRENT_REQUESTS_HEADER: Final = "Twilio-Concurrent-Requests"
REQUEST_DURATION_HEADER: Final = "Twilio-Request-Duration"

_ERROR_SNIPPET_CHARS: Final = 200
_MAX_RETRY_AFTER: Final = 600.0
# Beyond these a value is no account's load but garbage (or a hostile answer).
_MAX_CONCURRENT_REQUESTS: Final = 1_000_000
_MAX_REQUEST_DURATION: Final = 3600.0


class ErrorKind(enum.StrEnum):
    """What went wrong; the values are the ``kind`` label of the poll error counter."""

    HTTP = "http"  # a non-2xx status other than 401/403
    AUTH = "auth"  # 401/403, or credentials the token endpoint rejected
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    DECODE = "decode"  # malformed JSON or a body of the wrong shape
    TOO_LARGE = "too_large"  # a response over the size cap
    TOO_MANY_PAGES = "too_many_pages"  # the page cap was reached
    BAD_NEXT_PAGE = "bad_next_page"  # a next_page_url pointing away from the configured host
    INTERNAL = "internal"  # a bug while polling: counted by the poller, never a request's error


class RetryReason(enum.StrEnum):
    """Why a request is retried; the values are the ``reason`` label of the retry counter."""

    THROTTLED = "429"
    SERVER = "5xx"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    DECODE = "decode"


class ApiError(Exception):
    """A failed request, after retries: what went wrong (``kind``), where, and the answer.

    ``final`` marks an error whose retries are spent elsewhere (a token failure handed to every
    API request that needed the token): :attr:`retry_reason` is then ``None`` whatever the kind.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        code: int | None = None,
        retry_after: float | None = None,
        final: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.final = final

    @property
    def retry_reason(self) -> RetryReason | None:
        """The retry reason when this error is worth retrying, else ``None``."""
        if self.final:
            return None
        kind = self.kind
        if kind is ErrorKind.TIMEOUT:
            return RetryReason.TIMEOUT
        if kind is ErrorKind.CONNECTION:
            return RetryReason.CONNECTION
        if kind is ErrorKind.DECODE:
            # A 200 whose body is cut short or garbled (a proxy or connection hiccup) is as
            # transient as a 5xx.
            return RetryReason.DECODE
        if self.status == 429:
            return RetryReason.THROTTLED
        if self.status is not None and 500 <= self.status <= 599:
            return RetryReason.SERVER
        return None

    def exhausted(self) -> ApiError:
        """A fresh copy (no shared traceback) to raise in another request, never retried."""
        return ApiError(
            self.kind,
            self.message,
            endpoint=self.endpoint,
            status=self.status,
            code=self.code,
            retry_after=self.retry_after,
            final=True,
        )

    def __str__(self) -> str:
        parts = [f"{self.endpoint}: {self.message}"]
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.code is not None:
            parts.append(f"twilio_code={self.code}")
        return " ".join(parts)


class MalformedBodyError(ValueError):
    """Raised by a route's decoder: a 200 body that is not what the endpoint promises.

    It becomes a ``decode`` :class:`ApiError` with this message (retried like a garbled body).
    """


class Problem(NamedTuple):
    """What an error body says: a Twilio code, a message, and whether it rejects credentials."""

    code: int | None
    message: str
    rejected: bool = False


_ERROR_DECODER: Final = msgspec.json.Decoder(TwilioErrorBody)


def describe_error_body(body: bytes) -> tuple[int | None, str]:
    """Twilio code and a human message from an error body of any shape (Twilio, KORE, HTML)."""
    try:
        err = _ERROR_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        err = None
    if err is not None and err.message:
        return err.code, err.message
    try:
        generic = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply
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


def token_rejected(status: int, body: bytes) -> bool:
    """Whether an answer rejects the credentials sent, so renewing them may help: a 401, or
    KORE's API gateway's 403 for an expired or revoked token
    (``{"message": "... explicit deny", "error": "Invalid or expired token"}``)."""
    if status == 401:
        return True
    if status != 403 or len(body) > _ERROR_SNIPPET_CHARS * 10:
        return False
    try:
        answer = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return False
    if not isinstance(answer, dict):
        return False
    error, message = answer.get("error"), answer.get("message")
    return (isinstance(error, str) and "token" in error.lower()) or (
        isinstance(message, str) and "explicit deny" in message.lower()
    )


def describe_api_error(body: bytes) -> Problem:
    """An API error body; its status alone says whether credentials were rejected."""
    code, message = describe_error_body(body)
    return Problem(code, message)


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


def parse_concurrent_requests(value: str) -> int | None:
    """``Twilio-Concurrent-Requests``: a count of requests; ``None`` for anything else."""
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 7:
        return None
    count = int(value)
    return count if count <= _MAX_CONCURRENT_REQUESTS else None


def parse_request_duration(value: str) -> float | None:
    """``Twilio-Request-Duration``: seconds (a decimal number); ``None`` for anything else."""
    value = value.strip()
    if not value.isascii() or len(value) > 32 or not value.replace(".", "", 1).isdigit():
        return None  # no sign, exponent, inf or nan: only plain decimals are plausible
    seconds = float(value)
    return seconds if seconds <= _MAX_REQUEST_DURATION else None


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Route(Generic[_T]):
    """One endpoint: its metric label, its method, how its 200 bodies and error bodies read.

    ``decode`` raises :class:`MalformedBodyError` or msgspec's errors for a body it cannot use.
    """

    endpoint: str
    decode: Callable[[bytes], _T]
    method: str = "GET"
    describe: Callable[[bytes], Problem] = describe_api_error


class ApiObserver(Protocol):
    """Receives one call per HTTP attempt and per retry (metrics live elsewhere)."""

    def request_done(self, endpoint: str, code: str, duration: float) -> None: ...

    def retry(self, endpoint: str, reason: RetryReason) -> None: ...


class NullObserver:
    def request_done(self, endpoint: str, code: str, duration: float) -> None:
        return None

    def retry(self, endpoint: str, reason: RetryReason) -> None:
        return None


class LoadObserver(Protocol):
    """Receives what the API's answers say about the account's load (metrics live elsewhere)."""

    def api_load(self, concurrent: int | None, duration: float | None) -> None:
        """One answer's plausible load headers (at least one of them is not ``None``)."""

    def header_rejected(self, header: str) -> None:
        """An answer carried ``header`` with a value that is no plausible number."""


class NullLoadObserver:
    def api_load(self, concurrent: int | None, duration: float | None) -> None:
        return None

    def header_rejected(self, header: str) -> None:
        return None


class Authenticator(Protocol):
    """Supplies the ``Authorization`` header; may renew credentials after a 401."""

    async def authorization(self) -> str:
        """The header value for the next request."""
        ...

    async def renew(self, rejected: str) -> bool:
        """Called after a 401 (or KORE's 403 for a bad token, see :func:`token_rejected`) for a
        request sent with ``rejected``.

        Returns True when fresh credentials are available and the request is worth one more try.
        """
        ...


class Ticket(Protocol):
    """One admitted attempt; the transport sets the HTTP status once it has one, and the
    account's concurrency when the answer reported a plausible one."""

    status: int | None
    concurrency: int | None


class Gate(Protocol):
    """Admits attempts, and may hold every request while one retry sleeps (a 429 storm)."""

    def admit(self, order: int) -> AbstractAsyncContextManager[Ticket]:
        """``async with gate.admit(order) as ticket``: the attempt runs inside the block."""
        ...

    def pausing(self, seconds: float, status: int | None) -> AbstractContextManager[None]:
        """Wraps the ``seconds`` a retry sleeps after an answer of ``status``."""
        ...


class _Admitted:
    __slots__ = ("concurrency", "status")

    def __init__(self) -> None:
        self.status: int | None = None
        self.concurrency: int | None = None

    async def __aenter__(self) -> _Admitted:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None


class OpenGate:
    """The gate of a transport without limits (the token endpoint): admits at once."""

    def admit(self, order: int) -> _Admitted:
        return _Admitted()

    def pausing(self, seconds: float, status: int | None) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """Per-request timeout and size cap, and the retry policy.

    A retry waits a random time in the upper half of ``backoff_initial * 2**(n - 1)`` (capped
    at ``backoff_max``) before retry ``n``, and never less than the answer's ``Retry-After``.
    """

    timeout: float = 10.0
    max_response_bytes: int = 16 * 1024 * 1024
    max_retries: int = 4
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    cap_setting: str | None = None
    """The option that sets the size cap, named in the error (``None``: a fixed cap)."""

    @classmethod
    def of(cls, settings: RetryOptions, cap_setting: str | None = None) -> TransportSettings:
        """The transport part of a client's or authenticator's settings."""
        return cls(
            timeout=settings.timeout,
            max_response_bytes=settings.max_response_bytes,
            max_retries=settings.max_retries,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
            cap_setting=cap_setting,
        )


class RetryOptions(Protocol):
    """What a client's settings say about each request and its retries."""

    @property
    def timeout(self) -> float: ...
    @property
    def max_response_bytes(self) -> int: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def backoff_initial(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...


class Transport:
    """Sends requests of any :class:`Route` with one timeout, cap, error mapping and retry."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: TransportSettings,
        *,
        observer: ApiObserver | None = None,
        load: LoadObserver | None = None,
        gate: Gate | None = None,
        auth: Authenticator | None = None,
        redact: Callable[[str], str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        retry_log_level: int = logging.DEBUG,
    ) -> None:
        self._session = session
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._observer: ApiObserver = observer or NullObserver()
        self._load: LoadObserver = load or NullLoadObserver()
        self._gate: Gate = gate or OpenGate()
        self._auth = auth
        self._redact = redact
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._retry_log_level = retry_log_level

    async def send(
        self,
        route: Route[_T],
        url: str,
        *,
        order: int = 0,
        form: Mapping[str, str] | None = None,
    ) -> _T:
        """The decoded answer of ``route`` at ``url``, after retries; else an :class:`ApiError`.

        ``order`` queues the attempts at the gate (see adaptive.py); ``form`` is a POST body.
        """
        try:
            return await self._attempt(route, url, order, form)
        except ApiError as exc:
            if exc.retry_reason is None or self._settings.max_retries < 1:
                raise
            failure = exc
        return await self._retry(route, url, order, form, failure)

    # ----------------------------------------------------------------- retries

    async def _retry(
        self,
        route: Route[_T],
        url: str,
        order: int,
        form: Mapping[str, str] | None,
        failure: ApiError,
    ) -> _T:
        """Retries 1 .. ``max_retries`` after a retryable first failure; the last error wins."""
        for attempt in range(1, self._settings.max_retries + 1):
            reason = failure.retry_reason
            if reason is None:
                break
            delay = self._backoff(attempt, failure.retry_after)
            self._observer.retry(route.endpoint, reason)
            log.log(
                self._retry_log_level,
                "retrying %s after %s in %.2fs (attempt %d): %s",
                route.endpoint,
                reason,
                delay,
                attempt,
                failure,
            )
            with self._gate.pausing(delay, failure.status):
                await self._sleep(delay)
            try:
                return await self._attempt(route, url, order, form)
            except ApiError as exc:
                failure = exc
        raise failure

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Jittered exponential backoff before retry ``attempt``, never below ``Retry-After``."""
        settings = self._settings
        ceiling = min(settings.backoff_max, settings.backoff_initial * 2 ** (attempt - 1))
        delay = self._rng.uniform(ceiling / 2, ceiling)
        return delay if retry_after is None else max(delay, retry_after)

    # ----------------------------------------------------------------- one attempt

    async def _attempt(
        self, route: Route[_T], url: str, order: int, form: Mapping[str, str] | None
    ) -> _T:
        status, body, retry_after, sent = await self._exchange(route, url, order, form)
        if sent is not None and token_rejected(status, body) and await self._renew(sent):
            # Credentials were renewed (e.g. an expired OAuth2 token): one more try.
            status, body, retry_after, sent = await self._exchange(route, url, order, form)
        if status == 200:
            try:
                return route.decode(body)
            except MalformedBodyError as exc:
                message = self._clean(str(exc))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                message = self._clean(f"malformed response: {exc}")
            except RecursionError:
                message = "malformed response: JSON nested too deeply"
            raise ApiError(ErrorKind.DECODE, message, endpoint=route.endpoint, status=status)
        problem = route.describe(body)
        rejected = status in (401, 403) or problem.rejected
        raise ApiError(
            ErrorKind.AUTH if rejected else ErrorKind.HTTP,
            self._clean(problem.message),
            endpoint=route.endpoint,
            status=status,
            code=problem.code,
            retry_after=retry_after,
        )

    async def _renew(self, sent: str) -> bool:
        return self._auth is not None and await self._auth.renew(sent)

    async def _exchange(
        self, route: Route[_T], url: str, order: int, form: Mapping[str, str] | None
    ) -> tuple[int, bytes, float | None, str | None]:
        """One HTTP request once the gate admits it.

        Returns status, body, Retry-After and the Authorization header that was sent (taken
        only once the request may go, so a long wait in the queue cannot send a stale token).
        """
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        endpoint = route.endpoint
        async with self._gate.admit(order) as ticket:
            sent: str | None = None
            if self._auth is not None:
                sent = headers["Authorization"] = await self._auth.authorization()
            started = time.perf_counter()
            code_label = CODE_TRANSPORT_ERROR
            try:
                async with self._session.request(
                    route.method,
                    url,
                    data=form,
                    headers=headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as resp:
                    status = ticket.status = resp.status
                    code_label = str(status)
                    headers_in = resp.headers
                    if (
                        CONCURRENT_REQUESTS_HEADER in headers_in
                        or REQUEST_DURATION_HEADER in headers_in
                    ):
                        ticket.concurrency = self._read_load(headers_in)
                    body = await self._read_body(resp, endpoint)
                    return status, body, parse_retry_after(resp.headers.get("Retry-After")), sent
            except TimeoutError:
                code_label = CODE_TRANSPORT_ERROR
                message = f"no response within {self._settings.timeout:g}s"
                raise ApiError(ErrorKind.TIMEOUT, message, endpoint=endpoint) from None
            except aiohttp.ClientError as exc:
                code_label = CODE_TRANSPORT_ERROR
                message = self._clean(f"{type(exc).__name__}: {exc}")
                raise ApiError(ErrorKind.CONNECTION, message, endpoint=endpoint) from None
            finally:
                self._observer.request_done(endpoint, code_label, time.perf_counter() - started)

    def _read_load(self, headers: Mapping[str, str]) -> int | None:
        """Report the answer's load headers; returns its plausible concurrency, if any."""
        concurrent = duration = None
        raw = headers.get(CONCURRENT_REQUESTS_HEADER)
        if raw is not None:
            concurrent = parse_concurrent_requests(raw)
            if concurrent is None:
                self._load.header_rejected(CONCURRENT_REQUESTS_HEADER)
        raw = headers.get(REQUEST_DURATION_HEADER)
        if raw is not None:
            duration = parse_request_duration(raw)
            if duration is None:
                self._load.header_rejected(REQUEST_DURATION_HEADER)
        if concurrent is not None or duration is not None:
            self._load.api_load(concurrent, duration)
        return concurrent

    async def _read_body(self, resp: aiohttp.ClientResponse, endpoint: str) -> bytes:
        limit = self._settings.max_response_bytes
        body = await read_capped(resp, limit)
        if body is None:
            length = resp.content_length
            size = f"of {length} bytes " if length is not None and length > limit else ""
            setting = self._settings.cap_setting
            hint = f" ({setting})" if setting else ""
            raise ApiError(
                ErrorKind.TOO_LARGE,
                f"response {size}exceeds the {limit}-byte cap{hint}",
                endpoint=endpoint,
                status=resp.status,
            )
        return body

    def _clean(self, text: str) -> str:
        return text if self._redact is None else self._redact(text)


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
