"""The runtime side of the web config: HTTP basic auth and response headers for our endpoints.

The web config itself (:class:`~twilio_wireless_exporter.config.WebConfig`: TLS, users, headers)
is validated, and its SSL context built, by the config layer on loading.

Every endpoint, ``/-/healthy`` and ``/-/ready`` included, requires the credentials, as with the
exporter-toolkit; probes then send an ``Authorization`` header (or use a TCP check).

Passwords are checked with ``bcrypt.checkpw``, which is slow by design; so that wrong passwords
cannot buy the exporter's CPU (or keep the right password waiting), that work is bounded:

* **A small pool.** Checks run in a dedicated pool of :data:`AuthLimits.workers` threads (one on
  a machine of two cores or fewer, else two), never on the event loop and never in the shared
  default executor.
* **A queue limit, newcomers first.** At most :data:`AuthLimits.max_pending` checks wait for a
  worker, in order of how often their client has failed or been turned away already (then of
  arrival); when the queue is full, the check that would go last is answered 503 with
  ``Retry-After`` (``reason="auth_overloaded"``). So under a flood of wrong passwords from many
  addresses, a login not seen before displaces the addresses that keep trying. A client is an
  IPv4 address or an IPv6 /64.
* **Per-client backoff.** After its third failed check in a row, a client (its address) gets
  429 with ``Retry-After`` (``reason="auth_backoff"``) without a check until its backoff has
  passed: 1s, doubling with every further failure to 60s; a successful check clears it. A
  client has at most one check in flight.
* **Caches.** A successful check is remembered as an HMAC of user and password under a
  per-process random key, compared with :func:`hmac.compare_digest`, so Prometheus' scrapes after
  the first one pay no bcrypt (the toolkit caches the same way), and a client whose credentials
  are cached gets in even while its address is backing off (behind NAT, say). Recently failed
  credentials are remembered the same way and refused (401) without a check.

An unknown user name still costs one bcrypt check against a dummy hash, so response times do not
reveal which users exist.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import heapq
import hmac
import ipaddress
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import bcrypt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from twilio_wireless_exporter.config import WebConfig
from twilio_wireless_exporter.web.connections import Rejections
from twilio_wireless_exporter.web.ratelog import RateLimitedLog

__all__ = [
    "REALM",
    "AuthLimits",
    "BasicAuth",
    "Verdict",
    "middlewares",
    "parse_basic_authorization",
    "security_middleware",
]

log = logging.getLogger(__name__)

REALM: Final = "twilio-wireless-exporter"
WWW_AUTHENTICATE: Final = f'Basic realm="{REALM}"'
_BCRYPT_MAX_PASSWORD: Final = 72  # bcrypt uses the first 72 bytes (like htpasswd and Go)
_DEFAULT_COST: Final = 10


def _default_workers() -> int:
    """One bcrypt thread on two cores or fewer (a core stays free for the event loop), else 2."""
    return 1 if (os.cpu_count() or 1) <= 2 else 2


@dataclass(frozen=True, slots=True)
class AuthLimits:
    """The bounds on bcrypt work (docs/operations.md lists them)."""

    workers: int = field(default_factory=_default_workers)
    max_pending: int = 8
    """Checks waiting for a worker; beyond that, 503 (for the one that would go last)."""
    free_failures: int = 3
    """Failed checks in a row after which a client's backoff starts (typos happen)."""
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    clients: int = 4096
    """Client addresses whose failures are remembered (least recently seen forgotten first)."""
    failed_cache: int = 1024
    """Recently failed credentials refused without a check."""


class Verdict(enum.Enum):
    OK = "ok"
    DENIED = "unauthorized"
    BACKOFF = "auth_backoff"
    BUSY = "auth_overloaded"


@dataclass(slots=True)
class _Client:
    failures: int = 0
    """Failed checks in a row."""
    refused: int = 0
    """Requests answered 429 or 503 since the latest success."""
    until: float = 0.0
    checking: bool = False


def client_key(remote: str | None) -> str:
    """Whose failures a request counts to: its IPv4 address, or its IPv6 /64 (one host can
    have a whole /64 to pick addresses from)."""
    if remote is None:
        return "?"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def middlewares(config: WebConfig, rejections: Rejections | None = None) -> list[Middleware]:
    """The aiohttp middlewares enforcing the config's basic auth and adding its headers."""
    users, headers = config.users, config.headers
    if not users and not headers:
        return []
    return [security_middleware(BasicAuth(users) if users else None, headers, rejections)]


# --------------------------------------------------------------------------------------------------
# Basic auth


def parse_basic_authorization(header: str | None) -> tuple[str, bytes] | None:
    """User name and password bytes from an ``Authorization: Basic`` header, else ``None``."""
    if header is None:
        return None
    try:
        # latin-1 maps bytes to characters one to one: the password's bytes come back unchanged
        auth = aiohttp.BasicAuth.decode(header.strip(), encoding="latin-1")
        return auth.login.encode("latin-1").decode("utf-8"), auth.password.encode("latin-1")
    except ValueError:  # not Basic, bad base64, no colon, or a user name that is not UTF-8
        return None


class BasicAuth:
    """Checks basic-auth credentials against bcrypt hashes: timing-safe, cached, bounded."""

    def __init__(
        self,
        users: Mapping[str, bytes],
        limits: AuthLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users = dict(users)
        self.limits = limits or AuthLimits()
        self._clock = clock
        costs = [int(hashed[4:6]) for hashed in self._users.values()]
        # Unknown users are checked against a dummy hash at the highest configured cost, made
        # on first use in the bcrypt pool (see _unknown_user_hash), never at start-up.
        self._dummy_cost = max(costs, default=_DEFAULT_COST)
        self._dummy: bytes | None = None
        self._key = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        self._failed: OrderedDict[bytes, None] = OrderedDict()
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._running = 0
        self._waiting: list[tuple[int, int, asyncio.Future[bool]]] = []  # a heap
        self._arrivals = 0
        self._pool: ThreadPoolExecutor | None = None
        self.bcrypt_checks = 0
        """How many bcrypt checks ran (the cache keeps this at one per user and password)."""

    def __repr__(self) -> str:
        return f"BasicAuth(<{len(self._users)} users>)"

    def _mac(self, user: str, password: bytes) -> bytes:
        message = hashlib.sha256(user.encode()).digest() + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def check(self, header: str | None) -> str | None:
        """The authenticated user name, or ``None`` for missing or wrong credentials (without
        per-client backoff or queue limit: :meth:`authenticate` is what requests go through)."""
        verdict, user, _ = await self.authenticate(header, None)
        return user if verdict is Verdict.OK else None

    async def authenticate(
        self, header: str | None, client: str | None
    ) -> tuple[Verdict, str | None, float]:
        """``(verdict, user, retry after seconds)`` for the credentials ``client`` (an address;
        ``None``: no backoff and no queue limit) presents in ``header``."""
        credentials = parse_basic_authorization(header)
        if credentials is None:
            return Verdict.DENIED, None, 0.0  # costs nothing, and is no failed attempt either
        user, password = credentials
        password = password[:_BCRYPT_MAX_PASSWORD]
        hashed = self._users.get(user)
        mac = self._mac(user, password)
        if hashed is not None:
            known = self._verified.get(user)
            if known is not None and hmac.compare_digest(known, mac):
                # not forgiven: whoever shares the address keeps backing off while a scraper
                # with known-good credentials gets in
                return Verdict.OK, user, 0.0
        if mac in self._failed:
            self._failed.move_to_end(mac)
            return Verdict.DENIED, None, 0.0
        state = self._client(client)
        now = self._clock()
        if state is not None and (state.checking or now < state.until):
            state.refused += 1
            return Verdict.BACKOFF, None, max(1.0, math.ceil(state.until - now))
        # Clients go in order of how often they failed or were turned away already: a flood of
        # wrong passwords from addresses that keep trying waits behind a login it has not seen.
        priority = 0 if state is None else state.failures + state.refused
        if state is not None:
            state.checking = True
        try:
            if not await self._slot(priority, bounded=client is not None):
                if state is not None:
                    state.refused += 1
                return Verdict.BUSY, None, 1.0
            try:
                against = hashed if hashed is not None else await self._unknown_user_hash()
                ok = await self._checkpw(password, against)
            finally:
                self._release()
        finally:
            if state is not None:
                state.checking = False
        if ok and hashed is not None:
            self._verified[user] = mac
            self._forgive(client)
            return Verdict.OK, user, 0.0
        self._remember_failure(mac)
        if state is not None:
            state.failures += 1
            over = state.failures - self.limits.free_failures
            if over >= 0:
                delay = self.limits.backoff_initial * 2.0 ** min(over, 30)
                state.until = self._clock() + min(delay, self.limits.backoff_max)
        return Verdict.DENIED, None, 0.0

    def _client(self, client: str | None) -> _Client | None:
        if client is None:
            return None
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client()
            while len(self._clients) > self.limits.clients:
                oldest = next(iter(self._clients))
                if self._clients[oldest].checking:
                    break  # the table may overshoot by the checks in flight, never forget them
                del self._clients[oldest]
        else:
            self._clients.move_to_end(client)
        return state

    def _forgive(self, client: str | None) -> None:
        if client is not None:
            self._clients.pop(client, None)

    def _remember_failure(self, mac: bytes) -> None:
        self._failed[mac] = None
        self._failed.move_to_end(mac)
        while len(self._failed) > self.limits.failed_cache:
            self._failed.popitem(last=False)

    async def _slot(self, priority: int, *, bounded: bool) -> bool:
        """Wait for one of the pool's workers, in order of ``priority`` (lower first) then of
        arrival; ``False`` when the queue is full of checks that go first (or this one is
        displaced by one that goes before it). Unbounded for direct calls of :meth:`check`."""
        if self._running < self.limits.workers:
            self._running += 1
            return True
        if bounded and len(self._waiting) >= self.limits.max_pending:
            last = max(self._waiting)
            if last[0] <= priority:
                return False
            self._waiting.remove(last)
            heapq.heapify(self._waiting)
            last[2].set_result(False)
        self._arrivals += 1
        granted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (priority, self._arrivals, granted)
        heapq.heappush(self._waiting, entry)
        try:
            return await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled() and granted.result():
                self._release()  # the worker handed over: pass it on
            elif entry in self._waiting:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def _release(self) -> None:
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(True)  # the worker goes to the next in line
                return
        self._running -= 1

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="bcrypt")
        return self._pool

    async def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        self.bcrypt_checks += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), bcrypt.checkpw, password, hashed)

    async def _unknown_user_hash(self) -> bytes:
        """The dummy hash an unknown user name is checked against, so that response times do
        not tell which users exist. Made once, in the pool, inside the caller's check slot: a
        high cost costs the first unknown-user login, never the start-up or the loop."""
        if self._dummy is None:
            salt = bcrypt.gensalt(self._dummy_cost)
            loop = asyncio.get_running_loop()
            dummy = await loop.run_in_executor(
                self._executor(), bcrypt.hashpw, secrets.token_bytes(16), salt
            )
            self._dummy = self._dummy or dummy
        return self._dummy


_STATUS: Final = {Verdict.DENIED: 401, Verdict.BACKOFF: 429, Verdict.BUSY: 503}
_TEXT: Final = {
    Verdict.DENIED: "Unauthorized\n",
    Verdict.BACKOFF: "Too many failed logins from this address; retry later\n",
    Verdict.BUSY: "Too many logins being checked; retry later\n",
}


def security_middleware(
    auth: BasicAuth | None,
    headers: Mapping[str, str],
    rejections: Rejections | None = None,
) -> Middleware:
    """Require basic auth on every route (when ``auth``) and add ``headers`` to every response;
    refusals are counted in ``rejections``."""
    extra = dict(headers)
    throttled = RateLimitedLog(log)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is not None:
            verdict, _, retry_after = await auth.authenticate(
                request.headers.get("Authorization"), client_key(request.remote)
            )
            if verdict is not Verdict.OK:
                if rejections is not None:
                    rejections.reject(verdict.value)
                refusal = {**extra}
                if verdict is Verdict.DENIED:
                    refusal["WWW-Authenticate"] = WWW_AUTHENTICATE
                    log.debug("unauthorised request for %s from %s", request.path, request.remote)
                else:
                    refusal["Retry-After"] = str(int(retry_after))
                    throttled.log(
                        verdict.value,
                        logging.WARNING,
                        "refused a login from %s: %s",
                        request.remote,
                        _TEXT[verdict].strip(),
                    )
                response: web.StreamResponse = web.Response(
                    status=_STATUS[verdict], text=_TEXT[verdict], headers=refusal
                )
                return response
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(extra)
            raise
        response.headers.update(extra)
        return response

    return middleware
