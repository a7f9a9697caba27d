"""OAuth 2.0 client credentials for KORE Wireless: one shared bearer token, renewed in time.

:class:`OAuth2Authenticator` implements the client's
:class:`~twilio_wireless_exporter.api.client.Authenticator` protocol:

* The first request fetches a token (``POST token_url`` with ``grant_type=client_credentials``,
  ``client_id``, ``client_secret`` and optionally ``scope``); every request after it shares that
  token.
* The token is renewed ``refresh_margin`` before ``expires_in`` runs out (at most half-way
  through its lifetime, so a margin longer than the lifetime cannot make every request fetch).
* A 401 from the API for the current token renews it once (single-flight: however many requests
  were rejected at the same time, one token request is made) and the client retries.
* Token endpoint failures (timeouts, connection errors, 5xx, 429, malformed answers) are retried
  with exponential backoff and jitter; when a whole round fails, or the credentials are rejected,
  the failure is kept and returned to every request for a cool-down period that doubles with each
  failed round, so a broken token endpoint never sees a tight loop. A still valid token is used
  while its renewal fails.

Expiry maths run on an injected :class:`~twilio_wireless_exporter.clock.Clock`. Neither the client
secret nor a token is ever logged, put in an error or shown by ``repr()``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

import aiohttp
import msgspec
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from twilio_wireless_exporter.api.client import (
    CODE_TRANSPORT_ERROR,
    USER_AGENT,
    ApiError,
    describe_error_body,
    parse_retry_after,
    read_capped,
)
from twilio_wireless_exporter.clock import Clock, SystemClock

log = logging.getLogger(__name__)

#: The ``endpoint`` of token errors and of the token endpoint's request metrics.
ENDPOINT_TOKEN: Final = "token"  # noqa: S105 - a metric label value, not a secret

#: Values of the ``result`` label of the token request counter.
RESULT_SUCCESS: Final = "success"
RESULT_UNAUTHORIZED: Final = "unauthorized"
RESULT_ERROR: Final = "error"
TOKEN_RESULTS: Final = (RESULT_SUCCESS, RESULT_UNAUTHORIZED, RESULT_ERROR)

#: OAuth 2.0 error codes (RFC 6749 section 5.2) that mean "these credentials will not work".
_CREDENTIAL_ERRORS: Final = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})
_REDACTED: Final = "<redacted>"


class TokenStatus(NamedTuple):
    """The current token's expiry as unix time, and the seconds it has left (at least 0)."""

    expires_at: float
    remaining: float


class TokenObserver(Protocol):
    """Receives the token endpoint's request metrics (implemented by ``ApiMetrics``).

    ``request_done`` and ``retry`` are the client's ``ApiObserver`` calls (endpoint ``token``);
    ``token_request`` counts one token request by result (``success``, ``unauthorized``,
    ``error``); ``watch_token`` hands over a function that tells the current token's expiry at
    scrape time (``None`` while there is no token).
    """

    def request_done(self, endpoint: str, code: str, duration: float) -> None: ...

    def retry(self, endpoint: str, reason: str) -> None: ...

    def token_request(self, result: str) -> None: ...

    def watch_token(self, status: Callable[[], TokenStatus | None]) -> None: ...


class NullTokenObserver:
    def request_done(self, endpoint: str, code: str, duration: float) -> None:
        return None

    def retry(self, endpoint: str, reason: str) -> None:
        return None

    def token_request(self, result: str) -> None:
        return None

    def watch_token(self, status: Callable[[], TokenStatus | None]) -> None:
        return None


class TokenError(ApiError):
    """No access token could be obtained.

    ``kind`` is ``auth`` when the token endpoint rejected the client credentials, otherwise what
    went wrong (``timeout``, ``connection``, ``http``, ``decode``, ``too_large``). ``reason`` is
    the retry reason when the authenticator itself retries it. The API client never retries a
    ``TokenError`` (``retry_reason`` is always ``None``): the authenticator already did.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(
            kind, message, endpoint=ENDPOINT_TOKEN, status=status, retry_after=retry_after
        )
        self.reason = reason

    @property
    def retry_reason(self) -> None:
        return None

    def copy(self) -> TokenError:
        """A fresh instance to raise in another request (no shared traceback)."""
        return TokenError(
            self.kind,
            self.message,
            status=self.status,
            retry_after=self.retry_after,
            reason=self.reason,
        )

    @property
    def result(self) -> str:
        """The ``result`` label value of this failure."""
        return RESULT_UNAUTHORIZED if self.kind == "auth" else RESULT_ERROR


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """How tokens are fetched and renewed.

    * ``refresh_margin``: renew this long before expiry (capped at half the token's lifetime).
    * ``timeout``, ``max_retries``, ``backoff_initial``, ``backoff_max``: one round of token
      requests, as for API requests (full-jitter exponential backoff; ``Retry-After`` wins).
    * ``failure_cooldown`` .. ``failure_cooldown_max``: after a failed round (or rejected
      credentials) no new token request for this long, doubling with every failed round.
    * ``renew_min_interval``: a 401 for a token that was itself obtained after a 401 less than
      this long ago is reported instead of fetching yet another token.
    * ``default_lifetime``: assumed when the token endpoint sends no ``expires_in``.
    """

    refresh_margin: float = 60.0
    timeout: float = 10.0
    max_retries: int = 4
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    failure_cooldown: float = 15.0
    failure_cooldown_max: float = 300.0
    renew_min_interval: float = 10.0
    default_lifetime: float = 3600.0
    max_response_bytes: int = 64 * 1024


class _Token:
    """One access token and when it must be renewed (monotonic times on the injected clock)."""

    __slots__ = (
        "expires_at",
        "expires_at_unix",
        "header",
        "obtained_at",
        "refresh_at",
        "renewal",
        "warned",
    )

    def __init__(
        self,
        value: str,
        *,
        obtained_at: float,
        obtained_at_unix: float,
        lifetime: float,
        margin: float,
        renewal: bool,
    ) -> None:
        self.header = f"Bearer {value}"
        self.obtained_at = obtained_at
        self.expires_at = obtained_at + lifetime
        self.expires_at_unix = obtained_at_unix + lifetime
        self.refresh_at = self.expires_at - min(margin, lifetime / 2.0)
        self.renewal = renewal  # obtained because the API rejected the previous token
        self.warned = False  # the "rejected again" warning was logged for this token

    def __repr__(self) -> str:
        return f"_Token({_REDACTED}, expires_at={self.expires_at:.3f})"


class OAuth2Authenticator:
    """``Authorization: Bearer`` with a token from an OAuth 2.0 client-credentials grant."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | None = None,
        settings: TokenSettings | None = None,
        clock: Clock | None = None,
        observer: TokenObserver | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not client_secret:
            raise ValueError("client_secret must not be empty")
        self._session = session
        self._token_url = token_url
        self._client_id = client_id
        self._secret = client_secret
        self._scope = scope
        self._settings = settings or TokenSettings()
        self._clock: Clock = clock or SystemClock()
        self._observer: TokenObserver = observer or NullTokenObserver()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._timeout = aiohttp.ClientTimeout(total=self._settings.timeout)
        self._lock = asyncio.Lock()
        self._token: _Token | None = None
        self._generation = 0  # completed token rounds (successful or not)
        self._failure: TokenError | None = None
        self._failed_rounds = 0
        self._next_attempt = -math.inf  # no token request before this (monotonic)
        self._missing_expiry_logged = False
        self._observer.watch_token(self.status)

    def __repr__(self) -> str:
        return (
            f"OAuth2Authenticator(token_url={self._token_url!r}, client_id={self._client_id!r},"
            f" client_secret={_REDACTED})"
        )

    # ----------------------------------------------------------------- Authenticator protocol

    async def authorization(self) -> str:
        token = self._token
        if token is not None:
            now = self._clock.monotonic()
            if now < token.refresh_at:
                return token.header
            if now < token.expires_at and self._lock.locked():
                # Being renewed right now; meanwhile this token is still good.
                return token.header
        return (await self._refresh()).header

    async def renew(self, rejected: str) -> bool:
        token = self._token
        if token is None or token.header != rejected:
            # Renewed (or dropped) by someone else meanwhile: authorization() has the news.
            return True
        now = self._clock.monotonic()
        if token.renewal and now - token.obtained_at < self._settings.renew_min_interval:
            # A brand-new token rejected too: fetching more would not help; report the 401.
            if not token.warned:
                token.warned = True
                log.warning(
                    "the API rejected a freshly obtained access token; not renewing it again"
                    " for %gs",
                    self._settings.renew_min_interval,
                )
            return False
        log.info("the API rejected the access token (expired or revoked); renewing it")
        self._token = None
        await self._refresh(renewal=True)
        return True

    # ----------------------------------------------------------------- status

    def status(self) -> TokenStatus | None:
        """The current token's expiry (for the metrics); ``None`` while there is none."""
        token = self._token
        if token is None:
            return None
        remaining = max(0.0, token.expires_at - self._clock.monotonic())
        return TokenStatus(token.expires_at_unix, remaining)

    # ----------------------------------------------------------------- single-flight renewal

    async def _refresh(self, *, renewal: bool = False) -> _Token:
        """A valid token: fetched now, by a round that finished while we waited, or kept."""
        seen = self._generation
        async with self._lock:
            if self._generation == seen and self._clock.monotonic() >= self._next_attempt:
                # Nobody renewed the token while we waited for the lock: it is our job.
                await self._round(renewal=renewal)
            token = self._token
            if token is not None and self._clock.monotonic() < token.expires_at:
                return token
            failure = self._failure
            if failure is None:  # a token that expired at once (never from the endpoint)
                failure = TokenError("decode", "the token endpoint issued an expired token")
            raise failure.copy()

    async def _round(self, *, renewal: bool) -> None:
        """One round of token requests with retries; records the token or the failure."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._settings.max_retries + 1),
            retry=retry_if_exception(_is_retryable),
            wait=self._wait,
            before_sleep=self._before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            token: _Token = await retrying(self._attempt, renewal)
        except TokenError as exc:
            self._failed(exc)
        else:
            if self._failed_rounds:
                log.info(
                    "obtained an access token after %d failed attempts; expires in %gs",
                    self._failed_rounds,
                    token.expires_at - token.obtained_at,
                )
            else:
                log.debug(
                    "obtained an access token; expires in %gs", token.expires_at - token.obtained_at
                )
            self._token = token
            self._failure = None
            self._failed_rounds = 0
            self._next_attempt = -math.inf
        finally:
            self._generation += 1

    def _failed(self, exc: TokenError) -> None:
        self._failure = exc
        self._failed_rounds += 1
        settings = self._settings
        cooldown = min(
            settings.failure_cooldown_max,
            settings.failure_cooldown * 2.0 ** (self._failed_rounds - 1),
        )
        if exc.retry_after is not None:
            cooldown = max(cooldown, exc.retry_after)
        self._next_attempt = self._clock.monotonic() + cooldown
        still_valid = self._token is not None and self._clock.monotonic() < self._token.expires_at
        if exc.kind == "auth":
            log.error(
                "the token endpoint %s rejected the client credentials (%s); check"
                " twilio.auth.client_id and the client secret; next attempt in %gs",
                self._token_url,
                exc,
                cooldown,
            )
        else:
            log.warning(
                "cannot obtain an access token from %s: %s; %s; next attempt in %gs",
                self._token_url,
                exc,
                "the current token stays in use" if still_valid else "API requests fail meanwhile",
                cooldown,
            )

    def _wait(self, state: RetryCallState) -> float:
        settings = self._settings
        ceiling = min(
            settings.backoff_max, settings.backoff_initial * 2 ** (state.attempt_number - 1)
        )
        delay = self._rng.uniform(ceiling / 2, ceiling)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return delay

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TokenError):
            reason = exc.reason or "other"
            self._observer.retry(ENDPOINT_TOKEN, reason)
            log.info(
                "token request failed (%s); retrying in %.2fs (attempt %d)",
                exc,
                state.upcoming_sleep,
                state.attempt_number,
            )

    # ----------------------------------------------------------------- one token request

    async def _attempt(self, renewal: bool) -> _Token:
        try:
            token = await self._request(renewal)
        except TokenError as exc:
            self._observer.token_request(exc.result)
            raise
        self._observer.token_request(RESULT_SUCCESS)
        return token

    async def _request(self, renewal: bool) -> _Token:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret,
        }
        if self._scope:
            form["scope"] = self._scope
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        obtained_at = self._clock.monotonic()
        obtained_at_unix = self._clock.time()
        started = time.perf_counter()
        code_label = CODE_TRANSPORT_ERROR
        try:
            async with self._session.post(
                self._token_url,
                data=form,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                code_label = str(resp.status)
                status = resp.status
                body = await self._read_body(resp)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise TokenError(
                "timeout",
                f"no response from the token endpoint within {self._settings.timeout:g}s",
                reason="timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise TokenError(
                "connection", self._redact(f"{type(exc).__name__}: {exc}"), reason="connection"
            ) from None
        finally:
            self._observer.request_done(ENDPOINT_TOKEN, code_label, time.perf_counter() - started)
        if status != 200:
            raise self._http_error(status, body, retry_after)
        value, lifetime = self._parse(body)
        return _Token(
            value,
            obtained_at=obtained_at,
            obtained_at_unix=obtained_at_unix,
            lifetime=lifetime,
            margin=self._settings.refresh_margin,
            renewal=renewal,
        )

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self._settings.max_response_bytes
        body = await read_capped(resp, limit)
        if body is None:
            raise TokenError(
                "too_large",
                f"token endpoint response exceeds {limit} bytes",
                status=resp.status,
                reason="too_large",
            )
        return body

    def _http_error(self, status: int, body: bytes, retry_after: float | None) -> TokenError:
        error, description = _oauth_error(body)
        if error is not None:
            message = f"{error}: {description}" if description else error
        else:
            _, message = describe_error_body(body)
        message = self._redact(message)
        if status in (401, 403) or error in _CREDENTIAL_ERRORS:
            return TokenError("auth", message, status=status)
        reason: str | None = None
        if status == 429:
            reason = "429"
        elif 500 <= status <= 599:
            reason = "5xx"
        return TokenError("http", message, status=status, retry_after=retry_after, reason=reason)

    def _parse(self, body: bytes) -> tuple[str, float]:
        """(access token, lifetime in seconds) from a 200 answer; malformed → ``TokenError``."""
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise _malformed("the token endpoint answered with invalid JSON") from None
        if not isinstance(doc, dict):
            raise _malformed(f"the token endpoint answered with a JSON {type(doc).__name__}")
        value = doc.get("access_token")
        if not isinstance(value, str) or not value.strip() or not value.isprintable():
            raise _malformed("the token endpoint's answer has no access_token")
        token_type = doc.get("token_type")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() != "bearer"
        ):
            raise _malformed(f"unsupported token_type {_short(token_type)}")
        raw = doc.get("expires_in")
        if raw is None:
            if not self._missing_expiry_logged:
                self._missing_expiry_logged = True
                log.warning(
                    "the token endpoint sent no expires_in; assuming tokens live %gs"
                    " (a 401 renews them earlier)",
                    self._settings.default_lifetime,
                )
            return value.strip(), self._settings.default_lifetime
        lifetime = parse_expires_in(raw)
        if lifetime is None:
            raise _malformed(f"expires_in is not a positive number of seconds: {_short(raw)}")
        return value.strip(), lifetime

    def _redact(self, text: str) -> str:
        """``text`` without the client secret or the current token (defence in depth)."""
        text = text.replace(self._secret, _REDACTED)
        token = self._token
        if token is not None:
            text = text.replace(token.header.removeprefix("Bearer "), _REDACTED)
        return text


def parse_expires_in(value: object) -> float | None:
    """``expires_in`` as seconds: a string of digits (as KORE sends it) or a number.

    Anything else (booleans, empty or non-numeric strings, NaN, infinities, values <= 0) is
    ``None``.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            return None
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def _oauth_error(body: bytes) -> tuple[str | None, str | None]:
    """``error`` and ``error_description`` of an RFC 6749 error body, if it is one."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    error = doc.get("error")
    description = doc.get("error_description")
    return (
        error if isinstance(error, str) and error else None,
        description if isinstance(description, str) and description else None,
    )


def _malformed(message: str) -> TokenError:
    return TokenError("decode", message, status=200, reason="decode")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TokenError) and exc.reason is not None
