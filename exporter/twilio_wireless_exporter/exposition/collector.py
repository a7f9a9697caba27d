"""The exporter's private registry: fleet-wide families and the exporter's own metrics.

:class:`FleetCollector` renders the fleet-wide aggregates of :class:`FleetState` (session
durations, SIMs monitored, poll interval, build info); :class:`ApiMetrics` holds the request,
retry, poll-error, API load and OAuth2 token metrics and is the transport's
:class:`~twilio_wireless_exporter.api.transport.ApiObserver` and
:class:`~twilio_wireless_exporter.api.transport.LoadObserver`. Both live on the
``CollectorRegistry`` built by :func:`build_registry`, which nothing else shares (the global
registry is never touched). The per-SIM families are not in it: they come from
:class:`~twilio_wireless_exporter.exposition.families.SimFamilies`, and the renderers put the two
together.

Names and help texts come from :mod:`twilio_wireless_exporter.metrics_names`.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.api.auth import TokenResult
from twilio_wireless_exporter.api.records import RejectReason
from twilio_wireless_exporter.api.transport import ErrorKind, RetryReason
from twilio_wireless_exporter.fleet.aggregates import GAUGES, FleetAggregates
from twilio_wireless_exporter.fleet.state import FleetState
from twilio_wireless_exporter.sharding import Shard

API_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class FleetCollector(Collector):
    """The fleet-wide families of :class:`FleetState`, rendered on every collect().

    ``poll_interval`` (seconds) is exported as ``twilio_wireless_poll_interval_seconds`` so that
    alerts can scale with it; ``shard`` as ``twilio_wireless_exporter_shards{index}`` (value: the
    shard count), so that an alert can tell when fewer shards answer than the fleet is split
    over. Without them, their families are left out.
    """

    def __init__(
        self,
        state: FleetState,
        *,
        poll_interval: float | None = None,
        shard: Shard | None = None,
        aggregates: FleetAggregates | None = None,
    ) -> None:
        self._state = state
        self._poll_interval = poll_interval
        self._shard = shard
        self._aggregates = aggregates

    def collect(self) -> Iterable[Metric]:
        family = names.SESSION_DURATION
        duration = Metric(family.name, family.help, family.kind)
        for radio_link, hist in sorted(self._state.durations.items()):
            for bound, cumulative in hist.cumulative():
                duration.add_sample(
                    family.bucket,
                    {"radio_link": radio_link, "le": _format_bound(bound)},
                    float(cumulative),
                )
            duration.add_sample(family.name + "_count", {"radio_link": radio_link}, hist.count)
            duration.add_sample(family.name + "_sum", {"radio_link": radio_link}, hist.total)
        yield duration

        yield _single(names.SIMS_MONITORED, float(len(self._state.sims)))
        yield from self._lifecycle()
        if self._poll_interval is not None:
            yield _single(names.POLL_INTERVAL, float(self._poll_interval))
        if self._shard is not None:
            yield _single(names.SHARDS, float(self._shard.count), {"index": str(self._shard.index)})
        yield _single(
            names.BUILD_INFO,
            1.0,
            {"version": __version__, "python_version": platform.python_version()},
        )
        if self._aggregates is not None:
            yield from aggregate_families(self._aggregates, self._state)

    def _lifecycle(self) -> Iterable[Metric]:
        """SIMs by status, the rate plans and the account's usage."""
        state = self._state
        family = names.SIMS_BY_STATUS
        sims = Metric(family.name, family.help, family.kind)
        for (status, plan_sid), count in sorted(state.sims_by_status().items()):
            sims.add_sample(
                family.name, {"status": status, "rate_plan_sid": plan_sid}, float(count)
            )
        yield sims
        family = names.RATE_PLAN_INFO
        info = Metric(family.name, family.help, family.kind)
        family = names.RATE_PLAN_DATA_LIMIT
        limits = Metric(family.name, family.help, family.kind)
        for sid, plan in sorted(state.rate_plans.items()):
            labels = {
                "rate_plan_sid": sid,
                "unique_name": plan.unique_name,
                "friendly_name": plan.friendly_name,
                "data_metering": plan.data_metering,
                "data_enabled": _flag(plan.data_enabled),
                "national_roaming_enabled": _flag(plan.national_roaming_enabled),
            }
            info.add_sample(names.RATE_PLAN_INFO.name, labels, 1.0)
            for network, limit in plan.limits:
                labels = {"rate_plan_sid": sid, "network": network}
                limits.add_sample(family.name, labels, float(limit))
        yield info
        yield limits
        usage = state.account_usage
        ledger = usage.ledger
        if not ledger.baselined:
            return
        family = names.ACCOUNT_DATA_BYTES
        data = Metric(family.name, family.help, family.kind)
        data.add_sample(family.sample, {"direction": "upload"}, float(ledger.upload_total))
        data.add_sample(family.sample, {"direction": "download"}, float(ledger.download_total))
        yield data
        family = names.ACCOUNT_COMMANDS
        commands = Metric(family.name, family.help, family.kind)
        commands.add_sample(
            family.sample, {"direction": "from_sim"}, float(ledger.commands_from_sim_total)
        )
        commands.add_sample(
            family.sample, {"direction": "to_sim"}, float(ledger.commands_to_sim_total)
        )
        yield commands
        if usage.last_success is not None:
            yield _single(names.ACCOUNT_USAGE_LAST_SUCCESS, usage.last_success)


def aggregate_families(aggregates: FleetAggregates, state: FleetState) -> Iterable[Metric]:
    """The ``twilio_wireless_fleet_*`` families of ``aggregates``, brought up to date with
    ``state`` first; a counter family without a source (data bytes before usage is read) is
    left out."""
    aggregates.update(state)
    totals = aggregates.totals()
    metrics: dict[str, Metric] = {}
    for family in names.AGGREGATES:
        metrics[family.name] = Metric(family.name, family.help, family.kind)
    for key, counters, gauges in totals:
        labels = aggregates.labels(key)
        for source, value in zip(aggregates.sources, counters, strict=True):
            family = source.family
            metrics[family.name].add_sample(family.sample, {**labels, **dict(source.labels)}, value)
        for family, count in zip(GAUGES, gauges, strict=True):
            metrics[family.name].add_sample(family.sample, labels, float(count))
    fed = {source.family.name for source in aggregates.sources} | {f.name for f in GAUGES}
    for family in names.AGGREGATES:
        if family.name in fed:
            yield metrics[family.name]


def _flag(value: bool | None) -> str:
    """A boolean as a label value: ``true``, ``false``, or ``""`` when the API left it null."""
    return "" if value is None else "true" if value else "false"


def _single(family: names.Family, value: float, labels: dict[str, str] | None = None) -> Metric:
    """A family of one sample (a gauge's, named like the family)."""
    metric = Metric(family.name, family.help, family.kind)
    metric.add_sample(family.name, labels or {}, value)
    return metric


def _format_bound(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


class ApiMetrics:
    """The exporter's own API health metrics; implements the client's ``ApiObserver``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._request_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.token_requests: Counter | None = None  # created when OAuth2 is in use
        self._token_collector: TokenCollector | None = None
        self.requests = _counter(names.API_REQUESTS, registry)
        self.duration = Histogram(
            names.API_REQUEST_DURATION.name,
            names.API_REQUEST_DURATION.help,
            names.API_REQUEST_DURATION.labels,
            buckets=API_DURATION_BUCKETS,
            registry=registry,
        )
        self.retries = _counter(names.API_RETRIES, registry)
        self.poll_errors = _counter(names.POLL_ERRORS, registry)
        self.records_rejected = _counter(names.RECORDS_REJECTED, registry)
        self.exposition_errors = _counter(names.EXPOSITION_ERRORS, registry)
        self.headers_rejected = _counter(names.API_HEADERS_REJECTED, registry)
        self.load = LoadCollector()
        registry.register(self.load)

    def request_done(self, endpoint: str, code: str, duration: float) -> None:
        # Called for every request: the labelled children are looked up once per label pair.
        children = self._request_children.get((endpoint, code))
        if children is None:
            children = (self.requests.labels(endpoint, code), self.duration.labels(endpoint))
            self._request_children[(endpoint, code)] = children
        children[0].inc()
        children[1].observe(duration)

    def retry(self, endpoint: str, reason: RetryReason) -> None:
        self.retries.labels(endpoint, reason).inc()

    def api_load(self, concurrent: int | None, duration: float | None) -> None:
        # Called for every answer that carries the headers: plain stores, rendered at scrape.
        load = self.load
        if concurrent is not None:
            load.concurrent = concurrent
            if load.concurrent_max is None or concurrent > load.concurrent_max:
                load.concurrent_max = concurrent
        if duration is not None:
            load.duration = duration

    def header_rejected(self, header: str) -> None:
        self.headers_rejected.labels(header).inc()

    def poll_error(self, endpoint: str, kind: ErrorKind) -> None:
        self.poll_errors.labels(endpoint, kind).inc()

    def record_rejected(self, endpoint: str, reason: RejectReason) -> None:
        self.records_rejected.labels(endpoint, reason).inc()

    def exposition_error(self) -> None:
        self.exposition_errors.inc()

    # OAuth2 token metrics (KORE): the auth module's TokenObserver. Registered on first use, so
    # an exporter with basic auth has no oauth families at all.

    def token_request(self, result: TokenResult) -> None:
        self._token_counter().labels(result).inc()

    def watch_token(self, status: Callable[[], tuple[float, float] | None]) -> None:
        self._token_counter()
        if self._token_collector is None:
            self._token_collector = TokenCollector(status)
            self._registry.register(self._token_collector)
        else:
            self._token_collector.status = status

    def _token_counter(self) -> Counter:
        if self.token_requests is None:
            self.token_requests = _counter(names.TOKEN_REQUESTS, self._registry)
            for result in TokenResult:
                self.token_requests.labels(result)
        return self.token_requests


class HttpMetrics:
    """What the exporter's HTTP server cut or refused, and its connections; the web layer's
    ``Rejections`` observer. Registered by the command, which runs the server."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.rejected = _counter(names.HTTP_REJECTED, registry)
        self._children = {
            reason: self.rejected.labels(reason) for reason in names.HTTP_REJECT_REASONS
        }
        self._connections: ConnectionsCollector | None = None

    def reject(self, reason: str) -> None:
        child = self._children.get(reason)
        if child is None:
            raise ValueError(f"undocumented rejection reason {reason!r}")
        child.inc()

    def watch_connections(self, status: Callable[[], tuple[int, int]]) -> None:
        """Export ``status()``, ``(open connections, limit)``, at scrape time."""
        if self._connections is None:
            self._connections = ConnectionsCollector(status)
            self._registry.register(self._connections)
        else:
            self._connections.status = status


class LoadCollector(Collector):
    """The account's load as the API's answers reported it; each gauge is absent until an
    answer carried its header (KORE sends none)."""

    def __init__(self) -> None:
        self.concurrent: int | None = None
        self.concurrent_max: int | None = None
        self.duration: float | None = None

    def collect(self) -> Iterable[Metric]:
        for family, value in (
            (names.API_CONCURRENT_REQUESTS, self.concurrent),
            (names.API_CONCURRENT_REQUESTS_MAX, self.concurrent_max),
            (names.API_REPORTED_DURATION, self.duration),
        ):
            metric = Metric(family.name, family.help, family.kind)
            if value is not None:
                metric.add_sample(family.name, {}, float(value))
            yield metric


class ConnectionsCollector(Collector):
    """Open client connections and their limit, asked for at scrape time."""

    def __init__(self, status: Callable[[], tuple[int, int]]) -> None:
        self.status = status

    def collect(self) -> Iterable[Metric]:
        connections, limit = self.status()
        yield _single(names.HTTP_CONNECTIONS, float(connections))
        yield _single(names.HTTP_CONNECTIONS_MAX, float(limit))


class SeriesCollector(Collector):
    """``twilio_wireless_exposition_series{family}``: ``series()`` (family name to series in
    the latest whole body, as the renderer counted them), asked for at scrape time."""

    def __init__(self, series: Callable[[], Mapping[str, int]]) -> None:
        self.series = series

    def collect(self) -> Iterable[Metric]:
        family = names.EXPOSITION_SERIES
        metric = Metric(family.name, family.help, family.kind)
        for name, count in sorted(self.series().items()):
            metric.add_sample(family.name, {"family": name}, float(count))
        yield metric


def _counter(family: names.Family, registry: CollectorRegistry) -> Counter:
    return Counter(family.name, family.help, family.labels, registry=registry)


class TokenCollector(Collector):
    """The current token's expiry, asked for at scrape time (``(unix expiry, seconds left)``)."""

    def __init__(self, status: Callable[[], tuple[float, float] | None]) -> None:
        self.status = status

    def collect(self) -> Iterable[Metric]:
        status = self.status()
        expiry = Metric(names.TOKEN_EXPIRY.name, names.TOKEN_EXPIRY.help, names.TOKEN_EXPIRY.kind)
        remaining = Metric(
            names.TOKEN_REMAINING.name, names.TOKEN_REMAINING.help, names.TOKEN_REMAINING.kind
        )
        if status is not None:
            expiry.add_sample(names.TOKEN_EXPIRY.name, {}, status[0])
            remaining.add_sample(names.TOKEN_REMAINING.name, {}, status[1])
        yield expiry
        yield remaining


def build_registry(
    state: FleetState,
    *,
    poll_interval: float | None = None,
    shard: Shard | None = None,
    aggregates: FleetAggregates | None = None,
) -> tuple[CollectorRegistry, ApiMetrics]:
    """The exporter's private registry: the fleet collector and the API metrics.

    Pass the configured ``poll_interval`` (seconds) and ``shard`` to export them, and the
    fleet ``aggregates``; the exporter always does.
    Whether counters and histograms carry ``*_created`` samples is a process-wide setting of
    ``prometheus_client``, chosen by the command (``cli.py``), not here.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        FleetCollector(state, poll_interval=poll_interval, shard=shard, aggregates=aggregates)
    )
    return registry, ApiMetrics(registry)
