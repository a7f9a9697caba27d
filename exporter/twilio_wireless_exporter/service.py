"""Wiring: validated config in, a running exporter (client, poller, state, web app) out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from twilio_wireless_exporter.api.auth import OAuth2Authenticator, TokenObserver, TokenSettings
from twilio_wireless_exporter.api.client import (
    Authenticator,
    BasicAuthenticator,
    ClientSettings,
    TwilioClient,
)
from twilio_wireless_exporter.clock import Clock, SystemClock
from twilio_wireless_exporter.config.models import BasicCredentials, Config
from twilio_wireless_exporter.exposition.collector import build_registry
from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.persist import StateStore, state_identity
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.polling.poller import Poller, PollerSettings, SimTarget
from twilio_wireless_exporter.sharding import Shard
from twilio_wireless_exporter.web.app import WebContext, make_app

log = logging.getLogger(__name__)

#: How often the cached ``/metrics`` text catches up with the state between scrapes (seconds):
#: a scrape then renders at most this long's changes (at 10,000 SIMs polled every 15 s, some
#: 170 SIMs, ~12 ms). Idle until the first scrape; about 1 ms of CPU per refresh otherwise.
EXPOSITION_REFRESH_INTERVAL = 0.25


def client_settings(config: Config) -> ClientSettings:
    poll = config.poll
    return ClientSettings(
        base_url=config.twilio.base_url,
        timeout=config.twilio.timeout,
        concurrency=poll.concurrency,
        requests_per_second=poll.requests_per_second,
        max_retries=poll.max_retries,
        backoff_initial=poll.backoff_initial,
        backoff_max=poll.backoff_max,
        max_pages=poll.max_pages,
        max_response_bytes=poll.max_response_bytes,
    )


def poller_settings(config: Config) -> PollerSettings:
    return PollerSettings(
        interval=config.poll.interval,
        page_size=config.poll.page_size,
        discovery=config.discovery.enabled,
        discovery_statuses=tuple(config.discovery.status),
        discovery_interval=config.discovery.refresh_interval,
        shard=Shard(config.shard.index, config.shard.count),
    )


def sim_targets(config: Config) -> list[SimTarget]:
    return [SimTarget(sid=s.sid, name=s.name or "", labels=dict(s.labels)) for s in config.sims]


def make_authenticator(
    config: Config,
    session: aiohttp.ClientSession,
    *,
    clock: Clock | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    observer: TokenObserver | None = None,
) -> Authenticator:
    creds = config.twilio.credentials
    if isinstance(creds, BasicCredentials):
        return BasicAuthenticator(creds.username, creds.password.get_secret_value())
    poll = config.poll
    return OAuth2Authenticator(
        session,
        token_url=creds.token_url,
        client_id=creds.client_id,
        client_secret=creds.client_secret.get_secret_value(),
        scope=creds.scope,
        settings=TokenSettings(
            refresh_margin=creds.refresh_margin,
            timeout=config.twilio.timeout,
            max_retries=poll.max_retries,
            backoff_initial=poll.backoff_initial,
            backoff_max=poll.backoff_max,
        ),
        clock=clock,
        observer=observer,
        sleep=sleep,
    )


class Exporter:
    """One exporter instance: owns the HTTP session, the poller task and the state."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        retry_sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._retry_sleep = retry_sleep or asyncio.sleep
        self.state = FleetState()
        self.sims = SimFamilies(self.state, imei_label=config.metrics.imei_label)
        self.registry, self.api_metrics = build_registry(
            self.state, poll_interval=config.poll.interval
        )
        self.exposition = Exposition(self.sims, self.registry)
        self._session: aiohttp.ClientSession | None = None
        self._client: TwilioClient | None = None
        self._poller: Poller | None = None
        self._task: asyncio.Task[None] | None = None
        self._store: StateStore | None = None
        self._saver: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    @property
    def poller(self) -> Poller:
        if self._poller is None:
            raise RuntimeError("exporter not started")
        return self._poller

    @property
    def client(self) -> TwilioClient:
        if self._client is None:
            raise RuntimeError("exporter not started")
        return self._client

    def is_ready(self) -> bool:
        return self._poller is not None and self._poller.ready

    async def open(self) -> None:
        """Create the HTTP session, client and poller without starting to poll."""
        settings = client_settings(self.config)
        connector = aiohttp.TCPConnector(limit=settings.concurrency + 4, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        self._client = TwilioClient(
            self._session,
            make_authenticator(
                self.config,
                self._session,
                clock=self.clock,
                sleep=self._retry_sleep,
                observer=self.api_metrics,
            ),
            settings,
            observer=self.api_metrics,
            sleep=self._retry_sleep,
        )
        self._poller = Poller(
            self._client,
            self.state,
            sim_targets(self.config),
            poller_settings(self.config),
            clock=self.clock,
            observer=self.api_metrics,
        )
        path = self.config.state.path
        if path is not None and self._store is None:
            self._store = StateStore(path, state_identity(self.config), registry=self.registry)
            shard = Shard(self.config.shard.index, self.config.shard.count)
            discovery = self.config.discovery.enabled
            self._store.load(
                self.state, lambda sid: sid in self.state.sims or (discovery and shard.owns(sid))
            )

    async def start(self) -> None:
        """Open (if needed) and start the background poller."""
        if self._poller is None:
            await self.open()
        self._task = asyncio.create_task(self.poller.run(), name="poller")
        self._task.add_done_callback(_log_crash)
        if self._store is not None:
            saver = self._store.run(self.state, self.config.state.save_interval, self.clock.sleep)
            self._saver = asyncio.create_task(saver, name="state-saver")
        refresher = self.exposition.keep_fresh(EXPOSITION_REFRESH_INTERVAL, self.clock.sleep)
        self._refresher = asyncio.create_task(refresher, name="exposition-refresher")
        self._refresher.add_done_callback(_log_crash)
        log.info(
            "polling %d configured SIMs%s every %gs from %s",
            len(self.config.sims),
            " plus discovered SIMs" if self.config.discovery.enabled else "",
            self.config.poll.interval,
            self.config.twilio.base_url,
        )
        shard = self.config.shard
        if shard.count > 1:
            owned = sum(Shard(shard.index, shard.count).owns(sim.sid) for sim in self.config.sims)
            log.info(
                "shard %d/%d: this replica polls %d of the %d configured SIMs%s",
                shard.index,
                shard.count,
                owned,
                len(self.config.sims),
                " and its share of the discovered SIMs" if self.config.discovery.enabled else "",
            )

    async def stop(self) -> None:
        """Cancel in-flight polls and close the HTTP session."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in (self._saver, self._refresher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._saver = self._refresher = None
        if self._store is not None:
            await self._store.save(self.state)  # polling has stopped: the final state
        if self._session is not None:
            await self._session.close()
            self._session = None

    def web_context(self) -> WebContext:
        return WebContext(
            state=self.state,
            is_ready=self.is_ready,
            api_base_url=self.config.twilio.base_url,
            exposition=self.exposition,
        )

    def web_app(self, *, middlewares: Sequence[Middleware] = ()) -> web.Application:
        """The aiohttp app; polling starts and stops with it."""
        app = make_app(self.web_context(), middlewares=middlewares)

        async def lifecycle(_: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.stop()

        app.cleanup_ctx.append(lifecycle)
        return app


def _log_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.critical("the %s stopped unexpectedly", task.get_name(), exc_info=exc)
