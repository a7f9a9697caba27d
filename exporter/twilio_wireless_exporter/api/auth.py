"""The authenticators: which ``Authorization`` header a request carries, and when to renew it.

* :class:`BasicAuthenticator`: HTTP Basic (Twilio) with Account SID + Auth Token or API key.
* :class:`OAuth2Authenticator`: KORE's OAuth 2.0 client credentials, one shared bearer token.

The OAuth2 flow:

* The first request fetches a token (``POST token_url`` with ``grant_type=client_credentials``,
  ``client_id``, ``client_secret`` and optionally ``scope``); every request after it shares that
  token.
* The token is renewed ``refresh_margin`` before ``expires_in`` runs out (at most half-way
  through its lifetime, so a margin longer than the lifetime cannot make every request fetch).
* The token's JWT ``exp`` claim, when the token is a JWT (KORE's are), also bounds its life: it
  is renewed before ``exp`` even if ``expires_in`` promised longer. The claim is read without
  verifying the signature (the API verifies it; we only want to know when it stops working).
* A 401 from the API for the current token, or KORE's 403 for an expired or revoked token
  (``"error": "Invalid or expired token"``), renews it once (single-flight: however many
  requests were rejected at the same time, one token request is made) and the client retries;
  the same answer for the fresh token is an auth failure.
* Token requests go through their own :class:`~twilio_wireless_exporter.api.transport.Transport`
  (the one retry policy: timeouts, connection errors, 5xx, 429, malformed answers); when a
  whole round fails, or the credentials are rejected, the failure is kept and returned to every
  request for a cool-down period that doubles with each failed round, so a broken token endpoint
  never sees a tight loop. The exporter bounds it by the poll backoff (``poll.backoff_initial``
  doubling up to ``poll.backoff_max``, at most ``poll.interval``), so SIMs come back within a
  poll or two of the endpoint's return. A still valid token is used while its renewal fails.

Expiry maths run on an injected :class:`~twilio_wireless_exporter.clock.Clock`. Neither the client
secret nor a token is ever logged, put in an error or shown by ``repr()``. The authenticator
registers no metrics: it reports to a :class:`TokenObserver` and tells its token's expiry through
:meth:`OAuth2Authenticator.status`, and whoever wires the registry exposes both.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

import aiohttp
import msgspec

from twilio_wireless_exporter.api.transport import (
    ApiError,
    ApiObserver,
    ErrorKind,
    MalformedBodyError,
    Problem,
    RetryReason,
    Route,
    Transport,
    TransportSettings,
    describe_error_body,
)
from twilio_wireless_exporter.clock import Clock, SystemClock

log = logging.getLogger(__name__)

#: The ``endpoint`` of token errors and of the token endpoint's request metrics.
ENDPOINT_TOKEN: Final = "token"  # noqa: S105 - a metric label value, not a secret

#: OAuth 2.0 error codes (RFC 6749 section 5.2) that mean "these credentials will not work".
_CREDENTIAL_ERRORS: Final = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})
_REDACTED: Final = "<redacted>"


class BasicAuthenticator:
    """HTTP Basic with Account SID + Auth Token, or API key SID + secret (RFC 7617, UTF-8)."""

    def __init__(self, username: str, password: str) -> None:
        self._header = aiohttp.encode_basic_auth(username, password)

    def __repr__(self) -> str:
        return f"BasicAuthenticator({_REDACTED})"

    async def authorization(self) -> str:
        return self._header

    async def renew(self, rejected: str) -> bool:
        return False


class TokenResult(enum.StrEnum):
    """The ``result`` label of the token request counter: one value per token request."""

    SUCCESS = "success"
    UNAUTHORIZED = "unauthorized"  # the client credentials were rejected
    ERROR = "error"  # anything else


def token_result(error: ApiError) -> TokenResult:
    """The result of a failed token request."""
    return TokenResult.UNAUTHORIZED if error.kind is ErrorKind.AUTH else TokenResult.ERROR


class TokenStatus(NamedTuple):
    """The current token's expiry as unix time, and the seconds it has left (at least 0)."""

    expires_at: float
    remaining: float


class TokenObserver(ApiObserver, Protocol):
    """Receives the token endpoint's metrics (implemented by ``ApiMetrics``).

    ``request_done`` and ``retry`` are the transport's calls (endpoint ``token``);
    ``token_request`` counts one token request by result.
    """

    def token_request(self, result: TokenResult) -> None: ...


class NullTokenObserver:
    def request_done(self, endpoint: str, code: str, duration: float) -> None:
        return None

    def retry(self, endpoint: str, reason: RetryReason) -> None:
        return None

    def token_request(self, result: TokenResult) -> None:
        return None


class _RetriedAreErrors:
    """The token transport's observer: every retry follows a failed token request, and only
    ``error`` results are retried (rejected credentials never are), so a retry counts one."""

    __slots__ = ("_observer",)

    def __init__(self, observer: TokenObserver) -> None:
        self._observer = observer

    def request_done(self, endpoint: str, code: str, duration: float) -> None:
        self._observer.request_done(endpoint, code, duration)

    def retry(self, endpoint: str, reason: RetryReason) -> None:
        self._observer.token_request(TokenResult.ERROR)
        self._observer.retry(endpoint, reason)


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """How tokens are fetched and renewed.

    * ``refresh_margin``: renew this long before expiry (capped at half the token's lifetime).
    * ``timeout``, ``max_retries``, ``backoff_initial``, ``backoff_max``: one round of token
      requests, as for API requests (the transport's retry policy).
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
    failure_cooldown: float = 1.0
    failure_cooldown_max: float = 60.0
    renew_min_interval: float = 10.0
    default_lifetime: float = 3600.0
    max_response_bytes: int = 64 * 1024


# ------------------------------------------------------------------------- the token endpoint


class TokenAnswer(msgspec.Struct, frozen=True):
    """A token endpoint's 200 answer (RFC 6749 section 5.1); KORE sends ``expires_in`` as a
    string of digits."""

    access_token: str = ""
    token_type: str | None = None
    expires_in: str | float | None = None


class OAuthErrorBody(msgspec.Struct, frozen=True):
    """An RFC 6749 section 5.2 error body."""

    error: str = ""
    error_description: str = ""


class _Grant(NamedTuple):
    value: str
    lifetime: float | None  # None: the answer had no expires_in


# Anything but an object decodes too, so the error can say what came instead.
_ANSWER_DECODER: Final = msgspec.json.Decoder(
    TokenAnswer | list[object] | str | int | float | bool | None
)
_OAUTH_ERROR_DECODER: Final = msgspec.json.Decoder(OAuthErrorBody)


def _decode_grant(body: bytes) -> _Grant:
    """The token and its lifetime from a 200 answer; a body it cannot use is malformed."""
    try:
        answer = _ANSWER_DECODER.decode(body)
    except msgspec.DecodeError:
        raise MalformedBodyError("the token endpoint answered with invalid JSON") from None
    except msgspec.ValidationError as exc:
        raise MalformedBodyError(f"the token endpoint's answer is malformed: {exc}") from None
    if not isinstance(answer, TokenAnswer):
        raise MalformedBodyError(f"the token endpoint answered with a JSON {type(answer).__name__}")
    value = answer.access_token.strip()
    if not value or not answer.access_token.isprintable():
        raise MalformedBodyError("the token endpoint's answer has no access_token")
    token_type = answer.token_type
    if token_type is not None and token_type.lower() != "bearer":
        raise MalformedBodyError(f"unsupported token_type {_short(token_type)}")
    if answer.expires_in is None:
        return _Grant(value, None)
    lifetime = parse_expires_in(answer.expires_in)
    if lifetime is None:
        raise MalformedBodyError(
            f"expires_in is not a positive number of seconds: {_short(answer.expires_in)}"
        )
    return _Grant(value, lifetime)


def _describe_oauth_error(body: bytes) -> Problem:
    """``error: error_description`` of an RFC 6749 error body, else any error body's message."""
    try:
        oauth = _OAUTH_ERROR_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        oauth = None
    if oauth is not None and oauth.error:
        description = oauth.error_description
        message = f"{oauth.error}: {description}" if description else oauth.error
        return Problem(None, message, rejected=oauth.error in _CREDENTIAL_ERRORS)
    return Problem(None, describe_error_body(body)[1])


_TOKEN_ROUTE: Final = Route(
    ENDPOINT_TOKEN, _decode_grant, method="POST", describe=_describe_oauth_error
)


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


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim (unix seconds) of a JWT, unverified; ``None`` if ``token`` is no JWT
    or has no usable ``exp``."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        seconds = float(exp)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------- OAuth2


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
        self._token_url = token_url
        self._client_id = client_id
        self._secret = client_secret
        self._form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
        }
        if scope:
            self._form["scope"] = scope
        settings = self._settings = settings or TokenSettings()
        self._clock: Clock = clock or SystemClock()
        self._observer: TokenObserver = observer or NullTokenObserver()
        self._transport = Transport(
            session,
            TransportSettings.of(settings),
            observer=_RetriedAreErrors(self._observer),
            redact=self._redact,
            sleep=sleep,
            rng=rng,
            retry_log_level=logging.INFO,
        )
        self._lock = asyncio.Lock()
        self._token: _Token | None = None
        self._generation = 0  # completed token rounds (successful or not)
        self._failure: ApiError | None = None
        self._failed_rounds = 0
        self._next_attempt = -math.inf  # no token request before this (monotonic)
        self._missing_expiry_logged = False
        self._skew_logged = False

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
            failure = self._failure or ApiError(  # a token that expired at once
                ErrorKind.DECODE,
                "the token endpoint issued an expired token",
                endpoint=ENDPOINT_TOKEN,
            )
            # The round already retried what was worth retrying: the API client must not.
            raise failure.exhausted()

    async def _round(self, *, renewal: bool) -> None:
        """One round of token requests with retries; records the token or the failure.

        The token's lifetime counts from the round's start: a round that had to retry renews
        its token early, never late."""
        obtained_at, obtained_at_unix = self._clock.monotonic(), self._clock.time()
        try:
            grant = await self._transport.send(_TOKEN_ROUTE, self._token_url, form=self._form)
        except ApiError as exc:
            self._observer.token_request(token_result(exc))
            self._failed(exc)
        else:
            self._observer.token_request(TokenResult.SUCCESS)
            token = _Token(
                grant.value,
                obtained_at=obtained_at,
                obtained_at_unix=obtained_at_unix,
                lifetime=self._lifetime(grant),
                margin=self._settings.refresh_margin,
                renewal=renewal,
            )
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

    def _lifetime(self, grant: _Grant) -> float:
        lifetime = self._stated_lifetime(grant)
        exp = jwt_expiry(grant.value)
        if exp is None:
            return lifetime
        left = exp - self._clock.time()
        if left <= 0:
            # Our clock is ahead of the issuer's, or the token came expired: expires_in decides
            # (a 401 or 403 renews it earlier if it is indeed dead).
            if not self._skew_logged:
                self._skew_logged = True
                log.warning(
                    "the access token's JWT exp lies %.0fs in the past of this host's clock;"
                    " relying on expires_in (check the clock)",
                    -left,
                )
            return lifetime
        return min(lifetime, left)

    def _stated_lifetime(self, grant: _Grant) -> float:
        if grant.lifetime is not None:
            return grant.lifetime
        if not self._missing_expiry_logged:
            self._missing_expiry_logged = True
            log.warning(
                "the token endpoint sent no expires_in; assuming tokens live %gs"
                " (a 401 renews them earlier)",
                self._settings.default_lifetime,
            )
        return self._settings.default_lifetime

    def _failed(self, exc: ApiError) -> None:
        self._failure = exc
        self._failed_rounds += 1
        settings = self._settings
        cooldown = min(
            settings.failure_cooldown_max,
            # the exponent is capped: unbounded, a few days of failed rounds overflow a float
            settings.failure_cooldown * 2.0 ** min(self._failed_rounds - 1, 30),
        )
        if exc.retry_after is not None:
            cooldown = max(cooldown, exc.retry_after)
        self._next_attempt = self._clock.monotonic() + cooldown
        still_valid = self._token is not None and self._clock.monotonic() < self._token.expires_at
        if exc.kind is ErrorKind.AUTH:
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

    def _redact(self, text: str) -> str:
        """``text`` without the client secret or the current token (defence in depth)."""
        text = text.replace(self._secret, _REDACTED)
        token = self._token
        if token is not None:
            text = text.replace(token.header.removeprefix("Bearer "), _REDACTED)
        return text
