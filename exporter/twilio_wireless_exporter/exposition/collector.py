"""Turns the poller's state into Prometheus metric families at scrape time.

:class:`FleetCollector` is a custom ``prometheus_client`` collector over :class:`FleetState`;
:class:`ApiMetrics` holds the exporter's own request/retry/poll-error metrics and is the
transport's :class:`~twilio_wireless_exporter.api.transport.ApiObserver`. Both live on a private
``CollectorRegistry`` built by :func:`build_registry`; nothing touches the global registry.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.api.auth import TokenResult
from twilio_wireless_exporter.api.transport import ErrorKind, RetryReason
from twilio_wireless_exporter.fleet.state import FleetState, SimRecord

NAMESPACE = "twilio_wireless"
CACHED = " Cached from the exporter's latest poll of the Twilio API."

API_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class FamilySpec:
    name: str
    kind: str
    help: str


def _spec(name: str, kind: str, help_text: str) -> FamilySpec:
    return FamilySpec(f"{NAMESPACE}_{name}", kind, help_text)


SIM_INFO = _spec(
    "sim_info",
    "gauge",
    "Identity of a monitored SIM (value is always 1): configured name and the SIM's"
    " unique_name, friendly_name, status and rate plan from /v1/Sims." + CACHED,
)
SESSIONS_OPEN = _spec(
    "sim_data_sessions_open",
    "gauge",
    "Data sessions of the SIM that are open (end is null) in the latest listing." + CACHED,
)
SESSIONS_STARTED = _spec(
    "sim_data_sessions_started",
    "counter",
    "Data sessions first seen after the SIM's first successful poll (each session sid"
    " counts once)." + CACHED,
)
SESSIONS_ENDED = _spec(
    "sim_data_sessions_ended",
    "counter",
    "Data sessions seen to end after the SIM's first successful poll (each session sid"
    " counts once)." + CACHED,
)
PACKETS_UP = _spec(
    "sim_packets_uploaded",
    "counter",
    "Packets uploaded by the SIM's device since the exporter started, summed over its data"
    " sessions." + CACHED,
)
PACKETS_DOWN = _spec(
    "sim_packets_downloaded",
    "counter",
    "Packets downloaded by the SIM's device since the exporter started, summed over its data"
    " sessions." + CACHED,
)
SESSION_INFO = _spec(
    "sim_session_info",
    "gauge",
    "Radio link and operator of the SIM's most recent data session (value is always 1)." + CACHED,
)
LATITUDE = _spec(
    "sim_cell_latitude_degrees",
    "gauge",
    "Estimated latitude of the cell tower of the SIM's most recent data session that has a"
    " cell location estimate." + CACHED,
)
LONGITUDE = _spec(
    "sim_cell_longitude_degrees",
    "gauge",
    "Estimated longitude of the cell tower of the SIM's most recent data session that has a"
    " cell location estimate." + CACHED,
)
LAST_START = _spec(
    "sim_last_session_start_timestamp_seconds",
    "gauge",
    "Unix time at which the SIM's most recent data session started." + CACHED,
)
LAST_UPDATED = _spec(
    "sim_last_updated_timestamp_seconds",
    "gauge",
    "Newest last_updated time among the SIM's listed data sessions (unix time)." + CACHED,
)
IMEI_CHANGES = _spec(
    "sim_imei_changes",
    "counter",
    "Times the IMEI of the SIM's most recent data session differed from the previously"
    " known IMEI (device swap)." + CACHED,
)
DURATION = _spec(
    "data_session_duration_seconds",
    "histogram",
    "Duration (end - start) of data sessions seen to end after the baseline, observed once"
    " per session, by radio link." + CACHED,
)
SIM_UP = _spec(
    "sim_up",
    "gauge",
    "1 when the latest poll of the SIM's data sessions succeeded, else 0.",
)
LAST_SUCCESS = _spec(
    "sim_last_poll_success_timestamp_seconds",
    "gauge",
    "Unix time of the latest successful poll of the SIM's data sessions.",
)
SIMS_MONITORED = _spec("sims_monitored", "gauge", "SIMs currently polled by this exporter.")
POLL_INTERVAL = _spec(
    "poll_interval_seconds",
    "gauge",
    "Configured interval between two polls of each SIM's data sessions (poll.interval).",
)
BUILD_INFO = _spec(
    "exporter_build_info",
    "gauge",
    "Build information of twilio-wireless-exporter (value is always 1).",
)

PER_SIM_FAMILIES: tuple[FamilySpec, ...] = (
    SIM_INFO,
    SESSIONS_OPEN,
    SESSIONS_STARTED,
    SESSIONS_ENDED,
    PACKETS_UP,
    PACKETS_DOWN,
    SESSION_INFO,
    LATITUDE,
    LONGITUDE,
    LAST_START,
    LAST_UPDATED,
    IMEI_CHANGES,
    SIM_UP,
    LAST_SUCCESS,
)


def sim_samples(
    record: SimRecord, *, imei_label: bool
) -> Iterator[tuple[FamilySpec, str, dict[str, str], float]]:
    """Every sample of one SIM as ``(family, sample name, labels, value)``.

    Absent data yields no sample: a SIM never polled has only its info and ``sim_up``-less
    identity, a SIM without a located session has no coordinates.
    """
    base = {"sim_sid": record.sid, **dict(record.labels)}
    ident = record.identity
    info = {
        **base,
        "sim_name": ident.display_name,
        "unique_name": ident.unique_name,
        "friendly_name": ident.friendly_name,
        "status": ident.status,
        "rate_plan_sid": ident.rate_plan_sid,
    }
    yield SIM_INFO, SIM_INFO.name, info, 1.0
    if record.up is not None:
        yield SIM_UP, SIM_UP.name, base, 1.0 if record.up else 0.0
    if record.last_success is not None:
        yield LAST_SUCCESS, LAST_SUCCESS.name, base, record.last_success
    acct = record.account
    if not acct.baselined:
        return
    yield SESSIONS_OPEN, SESSIONS_OPEN.name, base, float(acct.open_sessions)
    yield SESSIONS_STARTED, SESSIONS_STARTED.name + "_total", base, float(acct.started_total)
    yield SESSIONS_ENDED, SESSIONS_ENDED.name + "_total", base, float(acct.ended_total)
    yield PACKETS_UP, PACKETS_UP.name + "_total", base, float(acct.packets_uploaded_total)
    yield PACKETS_DOWN, PACKETS_DOWN.name + "_total", base, float(acct.packets_downloaded_total)
    yield IMEI_CHANGES, IMEI_CHANGES.name + "_total", base, float(acct.imei_changes_total)
    latest = acct.latest
    if latest is not None:
        attrs = {
            **base,
            "radio_link": latest.radio_link,
            "operator_name": latest.operator_name,
            "operator_country": latest.operator_country,
            "operator_mcc": latest.operator_mcc,
            "operator_mnc": latest.operator_mnc,
        }
        if imei_label:
            attrs["imei"] = latest.imei
        yield SESSION_INFO, SESSION_INFO.name, attrs, 1.0
    if acct.location is not None:
        yield LATITUDE, LATITUDE.name, base, acct.location[0]
        yield LONGITUDE, LONGITUDE.name, base, acct.location[1]
    if acct.latest_start is not None:
        yield LAST_START, LAST_START.name, base, acct.latest_start
    if acct.last_updated is not None:
        yield LAST_UPDATED, LAST_UPDATED.name, base, acct.last_updated


_PER_SIM_ELSEWHERE: ContextVar[bool] = ContextVar("per_sim_rendered_elsewhere", default=False)


@contextmanager
def per_sim_families_rendered_elsewhere() -> Iterator[None]:
    """While active (in the current context only), :class:`FleetCollector` yields just its
    fleet-wide families: the incremental exposition (``exposition.py``) renders the per-SIM
    ones itself and uses the registry's stock output for everything else."""
    token = _PER_SIM_ELSEWHERE.set(True)
    try:
        yield
    finally:
        _PER_SIM_ELSEWHERE.reset(token)


class FleetCollector(Collector):
    """Renders :class:`FleetState` as metric families on every collect().

    ``poll_interval`` (seconds) is exported as ``twilio_wireless_poll_interval_seconds`` so that
    alerts can scale with it; without it the family is left out.
    """

    def __init__(
        self, state: FleetState, *, imei_label: bool = False, poll_interval: float | None = None
    ) -> None:
        self._state = state
        self._imei_label = imei_label
        self._poll_interval = poll_interval

    def collect(self) -> Iterable[Metric]:
        if not _PER_SIM_ELSEWHERE.get():
            yield from self.per_sim_families()
        yield from self.fleet_families()

    def per_sim_families(self) -> Iterable[Metric]:
        families = {spec: Metric(spec.name, spec.help, spec.kind) for spec in PER_SIM_FAMILIES}
        for record in list(self._state.sims.values()):
            for spec, sample_name, labels, value in sim_samples(
                record, imei_label=self._imei_label
            ):
                families[spec].add_sample(sample_name, labels, value)
        yield from families.values()

    def fleet_families(self) -> Iterable[Metric]:
        duration = Metric(DURATION.name, DURATION.help, DURATION.kind)
        for radio_link, hist in sorted(self._state.durations.items()):
            for bound, cumulative in hist.cumulative():
                duration.add_sample(
                    DURATION.name + "_bucket",
                    {"radio_link": radio_link, "le": _format_bound(bound)},
                    float(cumulative),
                )
            duration.add_sample(DURATION.name + "_count", {"radio_link": radio_link}, hist.count)
            duration.add_sample(DURATION.name + "_sum", {"radio_link": radio_link}, hist.total)
        yield duration

        monitored = Metric(SIMS_MONITORED.name, SIMS_MONITORED.help, SIMS_MONITORED.kind)
        monitored.add_sample(SIMS_MONITORED.name, {}, float(len(self._state.sims)))
        yield monitored

        if self._poll_interval is not None:
            interval = Metric(POLL_INTERVAL.name, POLL_INTERVAL.help, POLL_INTERVAL.kind)
            interval.add_sample(POLL_INTERVAL.name, {}, float(self._poll_interval))
            yield interval

        build = Metric(BUILD_INFO.name, BUILD_INFO.help, BUILD_INFO.kind)
        build.add_sample(
            BUILD_INFO.name,
            {"version": __version__, "python_version": platform.python_version()},
            1.0,
        )
        yield build


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
        self.requests = Counter(
            "requests",
            "HTTP requests to the Twilio API by endpoint template and status code"
            ' (code="error" for timeouts and connection failures).',
            ["endpoint", "code"],
            namespace=NAMESPACE,
            subsystem="api",
            registry=registry,
        )
        self.duration = Histogram(
            "request_duration_seconds",
            "Latency of HTTP requests to the Twilio API by endpoint template.",
            ["endpoint"],
            namespace=NAMESPACE,
            subsystem="api",
            buckets=API_DURATION_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "retries",
            "Retried Twilio API requests by endpoint and reason (429, 5xx, timeout, connection).",
            ["endpoint", "reason"],
            namespace=NAMESPACE,
            subsystem="api",
            registry=registry,
        )
        self.poll_errors = Counter(
            "poll_errors",
            "Failed polls by kind of failure (http, auth, timeout, connection, decode,"
            " too_large, too_many_pages, bad_next_page).",
            ["kind"],
            namespace=NAMESPACE,
            registry=registry,
        )

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

    def poll_error(self, kind: ErrorKind) -> None:
        self.poll_errors.labels(kind).inc()

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
            self.token_requests = Counter(
                "oauth_token_requests",
                "Requests to the OAuth2 token endpoint by result (success, unauthorized: the"
                " client credentials were rejected, error: anything else).",
                ["result"],
                namespace=NAMESPACE,
                registry=self._registry,
            )
            for result in TokenResult:
                self.token_requests.labels(result)
        return self.token_requests


TOKEN_EXPIRY = _spec(
    "oauth_token_expiry_timestamp_seconds",
    "gauge",
    "Unix time at which the current OAuth2 access token expires (absent while there is none).",
)
TOKEN_REMAINING = _spec(
    "oauth_token_remaining_lifetime_seconds",
    "gauge",
    "Seconds until the current OAuth2 access token expires, at scrape time (absent while there"
    " is none).",
)


class TokenCollector(Collector):
    """The current token's expiry, asked for at scrape time (``(unix expiry, seconds left)``)."""

    def __init__(self, status: Callable[[], tuple[float, float] | None]) -> None:
        self.status = status

    def collect(self) -> Iterable[Metric]:
        status = self.status()
        expiry = Metric(TOKEN_EXPIRY.name, TOKEN_EXPIRY.help, TOKEN_EXPIRY.kind)
        remaining = Metric(TOKEN_REMAINING.name, TOKEN_REMAINING.help, TOKEN_REMAINING.kind)
        if status is not None:
            expiry.add_sample(TOKEN_EXPIRY.name, {}, status[0])
            remaining.add_sample(TOKEN_REMAINING.name, {}, status[1])
        yield expiry
        yield remaining


def build_registry(
    state: FleetState, *, imei_label: bool = False, poll_interval: float | None = None
) -> tuple[CollectorRegistry, ApiMetrics]:
    """A private registry with the fleet collector and the API metrics.

    Pass the configured ``poll_interval`` (seconds) to export it; the exporter always does.

    ``*_created`` samples are switched off (process-wide): they double the series of every
    counter and histogram and no dashboard of ours uses them.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(state, imei_label=imei_label, poll_interval=poll_interval))
    return registry, ApiMetrics(registry)
