"""The runtime side of the web config: HTTP basic auth and response headers for our endpoints.

The web config itself (:class:`~twilio_wireless_exporter.config.WebConfig`: TLS, users, headers)
is validated, and its SSL context built, by the config layer on loading.

Every endpoint, ``/-/healthy`` and ``/-/ready`` included, requires the credentials, as with the
exporter-toolkit; probes then send an ``Authorization`` header (or use a TCP check).

Passwords are checked with ``bcrypt.checkpw`` in a worker thread (bcrypt is slow by design and must
not stall the event loop; at most two checks run at once, so a flood of wrong passwords cannot
take every worker thread). An unknown user name still costs one bcrypt check against a dummy hash,
so response times do not reveal which users exist. A successful check is remembered as an HMAC of
the password under a per-process random key and compared with :func:`hmac.compare_digest`, so that
the scrapes after the first one do not pay bcrypt's cost again (the toolkit caches the same way).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Final

import aiohttp
import bcrypt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from twilio_wireless_exporter.config import WebConfig

__all__ = ["REALM", "BasicAuth", "middlewares", "parse_basic_authorization", "security_middleware"]

log = logging.getLogger(__name__)

REALM: Final = "twilio-wireless-exporter"
WWW_AUTHENTICATE: Final = f'Basic realm="{REALM}"'
_BCRYPT_MAX_PASSWORD: Final = 72  # bcrypt uses the first 72 bytes (like htpasswd and Go)
_DEFAULT_COST: Final = 10
_MAX_CONCURRENT_CHECKS: Final = 2


def middlewares(config: WebConfig) -> list[Middleware]:
    """The aiohttp middlewares enforcing the config's basic auth and adding its headers."""
    users, headers = config.users, config.headers
    if not users and not headers:
        return []
    return [security_middleware(BasicAuth(users) if users else None, headers)]


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
    """Checks basic-auth credentials against bcrypt hashes, timing-safe, with a verified cache."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        costs = [int(hashed[4:6]) for hashed in self._users.values()]
        cost = max(costs, default=_DEFAULT_COST)
        # Unknown users are checked against this, at the highest configured cost.
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        self._key = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        self._checks = asyncio.Semaphore(_MAX_CONCURRENT_CHECKS)
        self.bcrypt_checks = 0
        """How many bcrypt checks ran (the cache keeps this at one per user and password)."""

    def __repr__(self) -> str:
        return f"BasicAuth(<{len(self._users)} users>)"

    def _mac(self, user: str, password: bytes) -> bytes:
        message = hashlib.sha256(user.encode()).digest() + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def check(self, header: str | None) -> str | None:
        """The authenticated user name, or ``None`` for missing or wrong credentials."""
        credentials = parse_basic_authorization(header)
        if credentials is None:
            return None
        user, password = credentials
        password = password[:_BCRYPT_MAX_PASSWORD]
        hashed = self._users.get(user)
        mac = self._mac(user, password)
        if hashed is not None:
            known = self._verified.get(user)
            if known is not None and hmac.compare_digest(known, mac):
                return user
        ok = await self._checkpw(password, hashed if hashed is not None else self._dummy)
        if ok and hashed is not None:
            self._verified[user] = mac
            return user
        return None

    async def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        async with self._checks:
            self.bcrypt_checks += 1
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, bcrypt.checkpw, password, hashed)


def security_middleware(auth: BasicAuth | None, headers: Mapping[str, str]) -> Middleware:
    """Require basic auth on every route (when ``auth``) and add ``headers`` to every response."""
    extra = dict(headers)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is not None and await auth.check(request.headers.get("Authorization")) is None:
            log.debug("unauthorised request for %s from %s", request.path, request.remote)
            response: web.StreamResponse = web.Response(
                status=401,
                text="Unauthorized\n",
                headers={"WWW-Authenticate": WWW_AUTHENTICATE, **extra},
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
