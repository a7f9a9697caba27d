"""Wiring and lifecycle: validated config in, a running exporter (client, poller, state, web
app) out, and the one place that starts and stops its long-lived tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.api.auth import (
    BasicAuthenticator,
    OAuth2Authenticator,
    TokenObserver,
    TokenSettings,
)
from twilio_wireless_exporter.api.client import ClientSettings, TwilioClient
from twilio_wireless_exporter.api.transport import Authenticator
from twilio_wireless_exporter.clock import Clock, SystemClock
from twilio_wireless_exporter.config import BasicCredentials, Config
from twilio_wireless_exporter.exposition.collector import SeriesCollector, build_registry
from twilio_wireless_exporter.exposition.families import SimFamilies
from twilio_wireless_exporter.exposition.renderer import Exposition
from twilio_wireless_exporter.fleet.aggregates import FleetAggregates
from twilio_wireless_exporter.fleet.persist import StateLock, StateStore, state_identity
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.polling.poller import Poller, PollerSettings, SimTarget
from twilio_wireless_exporter.polling.usage import UsagePoller, UsageSettings
from twilio_wireless_exporter.web.app import WebContext, make_app
from twilio_wireless_exporter.web.connections import Rejections

log = logging.getLogger(__name__)

#: How often the cached ``/metrics`` text catches up with the state between scrapes (seconds):
#: a scrape then renders at most this long's changes. Idle until the first scrape.
EXPOSITION_REFRESH_INTERVAL = 0.25

#: A long-lived loop of the exporter: called once, runs until cancelled.
Loop = Callable[[], Coroutine[Any, Any, None]]


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
        shard=config.shard.shard,
    )


def usage_settings(config: Config) -> UsageSettings:
    usage = config.usage
    return UsageSettings(
        interval=usage.interval,
        period_start_day=usage.period_start_day,
        period_start_days={
            sim.sid: sim.usage_period_start_day
            for sim in config.sims
            if sim.usage_period_start_day is not None
        },
        revision_days=usage.revision_days,
        # the account's usage and its plans once per fleet, not once per shard
        account=usage.account and config.shard.index == 0,
        rate_plans=usage.rate_plans and config.shard.index == 0,
        rate_plans_interval=config.discovery.refresh_interval,
    )


def kept_families(config: Config) -> frozenset[str] | None:
    """The names of the families to expose; ``None`` when that is every family."""
    kept = config.metrics.families
    return None if kept >= {family.name for family in names.ALL} else kept


def sim_families(
    config: Config, state: FleetState, *, on_error: Callable[[], None] | None = None
) -> SimFamilies:
    """The per-SIM families of ``state`` as ``config.metrics`` shapes them."""
    metrics = config.metrics
    return SimFamilies(
        state,
        imei_label=metrics.imei_label,
        roaming_split=config.usage.roaming_split,
        billed=config.usage.billed,
        on_error=on_error,
        keep=kept_families(config),
        sim_labels=metrics.sim_labels,
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
            # After a failed round, wait no longer than a retry would (nor than a poll
            # interval), so SIMs come back within a poll or two of the token endpoint.
            failure_cooldown=poll.backoff_initial,
            failure_cooldown_max=min(poll.backoff_max, poll.interval),
        ),
        clock=clock,
        observer=observer,
        sleep=sleep,
    )


class Exporter:
    """One exporter instance: owns the HTTP session, the state and the background loops."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        retry_sleep: Callable[[float], Awaitable[None]] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        """``on_failure`` is called once if a background loop crashes (see :class:`Loops`)."""
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._retry_sleep = retry_sleep or asyncio.sleep
        self.state = FleetState()
        self.aggregates = FleetAggregates(
            config.metrics.aggregate_by, max_groups=config.metrics.max_groups
        )
        self.registry, self.api_metrics = build_registry(
            self.state,
            poll_interval=config.poll.interval,
            shard=config.shard.shard,
            aggregates=self.aggregates,
        )
        self.sims = sim_families(config, self.state, on_error=self.api_metrics.exposition_error)
        self.exposition = Exposition(
            self.sims,
            self.registry,
            max_series=config.metrics.max_series,
            companions=[lambda: self.aggregates.steps(self.state)],
        )
        self.registry.register(SeriesCollector(lambda: self.exposition.series))
        self._session: aiohttp.ClientSession | None = None
        self._client: TwilioClient | None = None
        self._poller: Poller | None = None
        self._usage: UsagePoller | None = None
        self._store: StateStore | None = None
        self._state_lock: StateLock | None = None
        self._loops = Loops(on_failure)

    @property
    def poller(self) -> Poller:
        if self._poller is None:
            raise RuntimeError("exporter not started")
        return self._poller

    @property
    def usage_poller(self) -> UsagePoller:
        if self._usage is None:
            raise RuntimeError("exporter not started, or usage.enabled is false")
        return self._usage

    @property
    def client(self) -> TwilioClient:
        if self._client is None:
            raise RuntimeError("exporter not started")
        return self._client

    @property
    def failed(self) -> bool:
        """Whether a background loop crashed (the exporter then no longer polls)."""
        return self._loops.failed

    @property
    def running(self) -> bool:
        """Whether the background loops run (started, not stopped, none crashed)."""
        return self._loops.running

    def is_ready(self) -> bool:
        return self._poller is not None and self._poller.ready and not self.failed

    async def open(self) -> None:
        """Create the HTTP session, client and poller without starting to poll.

        With a state file, its lock is taken first: a ``StateUnavailableError`` (from
        ``fleet.persist``) if another exporter uses the same ``state.path`` or the file exists
        but cannot be read. Whatever fails here, nothing opened is left behind.
        """
        try:
            await self._open()
        except BaseException:
            await self._close()
            raise

    async def _open(self) -> None:
        path = self.config.state.path
        if path is not None and self._state_lock is None:
            lock = StateLock(path)
            lock.acquire()
            self._state_lock = lock
        settings = client_settings(self.config)
        connector = aiohttp.TCPConnector(limit=settings.concurrency + 4, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        auth = make_authenticator(
            self.config,
            self._session,
            clock=self.clock,
            sleep=self._retry_sleep,
            observer=self.api_metrics,
        )
        if isinstance(auth, OAuth2Authenticator):
            self.api_metrics.watch_token(auth.status)  # the token's expiry, read at scrape time
        self._client = TwilioClient(
            self._session,
            auth,
            settings,
            observer=self.api_metrics,
            load=self.api_metrics,
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
        if self.config.usage.enabled:
            self._usage = UsagePoller(
                self._client,
                self.state,
                usage_settings(self.config),
                clock=self.clock,
                observer=self.api_metrics,
            )
        if path is not None and self._store is None:
            self._store = StateStore(
                path,
                state_identity(self.config),
                registry=self.registry,
                aggregates=self.aggregates,
            )
            shard = self.config.shard.shard
            discovery = self.config.discovery.enabled
            self._store.load(
                self.state, lambda sid: sid in self.state.sims or (discovery and shard.owns(sid))
            )

    async def start(self) -> None:
        """Open (if needed) and start the background loops: polling, state saves and the
        exposition's catch-up."""
        if self._poller is None:
            await self.open()
        loops: dict[str, Loop] = {"poller": self.poller.run}
        if self._usage is not None:
            loops["usage poller"] = self._usage.run
        store = self._store
        if store is not None:
            interval = self.config.state.save_interval
            loops["state saver"] = lambda: store.run(self.state, interval, self.clock.sleep)
        loops["exposition refresher"] = lambda: self.exposition.keep_fresh(
            EXPOSITION_REFRESH_INTERVAL, self.clock.sleep
        )
        self._loops.start(loops)
        log.info(
            "polling %d configured SIMs%s every %gs from %s",
            len(self.config.sims),
            " plus discovered SIMs" if self.config.discovery.enabled else "",
            self.config.poll.interval,
            self.config.twilio.base_url,
        )
        shard = self.config.shard
        if shard.count > 1:
            owned = sum(shard.shard.owns(sim.sid) for sim in self.config.sims)
            log.info(
                "shard %d/%d: this replica polls %d of the %d configured SIMs%s",
                shard.index,
                shard.count,
                owned,
                len(self.config.sims),
                " and its share of the discovered SIMs" if self.config.discovery.enabled else "",
            )

    async def stop(self) -> None:
        """Stop the background loops (cancelling in-flight polls), save the state a last time
        and close the HTTP session."""
        await self._loops.stop()
        try:
            if self._store is not None:
                await self._store.save(self.state)  # polling has stopped: the final state
        finally:
            await self._close()

    async def _close(self) -> None:
        """Release the state file's lock and close the HTTP session (each at most once)."""
        if self._state_lock is not None:
            self._state_lock.release()
            self._state_lock = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def web_context(self, rejections: Rejections | None = None) -> WebContext:
        return WebContext(
            state=self.state,
            is_ready=self.is_ready,
            api_base_url=self.config.twilio.base_url,
            exposition=self.exposition,
            rejections=rejections,
        )

    def web_app(
        self, *, middlewares: Sequence[Middleware] = (), rejections: Rejections | None = None
    ) -> web.Application:
        """The aiohttp app; polling starts and stops with it. ``rejections`` counts the
        requests it refuses."""
        app = make_app(self.web_context(rejections), middlewares=middlewares)

        async def lifecycle(_: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.stop()

        app.cleanup_ctx.append(lifecycle)
        return app


class Loops:
    """The exporter's long-lived loops, run in one :class:`asyncio.TaskGroup` and stopped
    together.

    Every loop runs until cancelled and handles the failures it expects (API errors, a failed
    save). One that ends any other way is a bug: its name and traceback are logged, the other
    loops are stopped with it (the group's rule), and ``on_failure`` is called, so the command
    exits with an error status for whatever supervises the process to restart it, instead of
    serving numbers that no longer move while its health endpoint says all is well.
    """

    def __init__(self, on_failure: Callable[[], None] | None = None) -> None:
        self._on_failure = on_failure
        self._group: asyncio.Task[None] | None = None
        self.failed = False

    @property
    def running(self) -> bool:
        return self._group is not None and not self._group.done()

    def start(self, loops: Mapping[str, Loop]) -> None:
        if self._group is not None:
            raise RuntimeError("the exporter's loops are already running")
        self._group = asyncio.create_task(self._run(dict(loops)), name="exporter")
        self._group.add_done_callback(_retrieve)  # logged already; not again by asyncio

    async def stop(self) -> None:
        """Cancel every loop and wait until all of them have ended."""
        group, self._group = self._group, None
        if group is None:
            return
        group.cancel()
        # A crash was logged when it happened; what the group re-raises is that crash.
        await asyncio.gather(group, return_exceptions=True)

    async def _run(self, loops: dict[str, Loop]) -> None:
        async with asyncio.TaskGroup() as group:
            for name, loop in loops.items():
                group.create_task(self._guard(name, loop), name=name)

    async def _guard(self, name: str, loop: Loop) -> None:
        try:
            await loop()
        except Exception:
            log.critical("the %s stopped unexpectedly; stopping the exporter", name, exc_info=True)
            self._failed()
            raise
        log.critical("the %s returned unexpectedly; stopping the exporter", name)
        self._failed()
        raise LoopReturnedError(name)

    def _failed(self) -> None:
        if self.failed:
            return
        self.failed = True
        if self._on_failure is not None:
            self._on_failure()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class LoopReturnedError(Exception):
    """A loop that should run until cancelled returned (ends the group like a crash)."""
