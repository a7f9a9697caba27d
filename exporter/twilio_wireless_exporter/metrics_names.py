"""Every metric the exporter exposes: its name, type, help text and the labels it always has.

The one place these are written. The collectors, the incremental renderer and the state store
build their families from here; ``grafana/generate.py`` writes its queries with these names, and
the tests check that every metric the dashboards and the alert rules read is listed here. So a
renamed metric is renamed everywhere, or the tests say where it is still used.

Standard library only, and nothing of the package: every layer (and the dashboard generator,
which runs without the exporter's dependencies) may import it.

Names follow ``prometheus_client``'s convention: a counter's family name has no ``_total``; its
sample (and the series Prometheus stores) does. ``Family.series`` lists the stored series names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NAMESPACE = "twilio_wireless"

Kind = Literal["gauge", "counter", "histogram"]

_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family.

    ``labels`` are the labels every sample carries (a histogram's ``le`` aside); per-SIM
    families also carry the user's constant labels from the config, which are not listed.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """The names of the series Prometheus stores for this family."""
        if self.kind == "counter":
            return (self.name + "_total",)
        if self.kind == "histogram":
            return tuple(self.name + suffix for suffix in _HISTOGRAM_SUFFIXES)
        return (self.name,)

    @property
    def sample(self) -> str:
        """The name of the single series of a gauge or counter (``x`` or ``x_total``)."""
        if self.kind == "histogram":
            raise ValueError(f"{self.name} is a histogram: use bucket, or one of series")
        return self.series[0]

    @property
    def bucket(self) -> str:
        """The ``_bucket`` series of a histogram."""
        if self.kind != "histogram":
            raise ValueError(f"{self.name} is a {self.kind}, not a histogram")
        return self.name + "_bucket"


def _family(name: str, kind: Kind, help_text: str, *labels: str) -> Family:
    return Family(f"{NAMESPACE}_{name}", kind, help_text, labels)


CACHED = " Cached from the exporter's latest poll of the Twilio API."

# -------------------------------------------------------------------------- per SIM

SIM = ("sim_sid",)
"""The label of every per-SIM sample (with the user's constant labels)."""

SIM_INFO = _family(
    "sim_info",
    "gauge",
    "Identity of a monitored SIM (value is always 1): configured name and the SIM's"
    " unique_name, friendly_name, status and rate plan from /v1/Sims." + CACHED,
    *SIM,
    "sim_name",
    "unique_name",
    "friendly_name",
    "status",
    "rate_plan_sid",
)
SESSIONS_OPEN = _family(
    "sim_data_sessions_open",
    "gauge",
    "Data sessions of the SIM that are open (end is null) in the latest listing." + CACHED,
    *SIM,
)
SESSIONS_STARTED = _family(
    "sim_data_sessions_started",
    "counter",
    "Data sessions first seen after the SIM's first successful poll (each session sid"
    " counts once)." + CACHED,
    *SIM,
)
SESSIONS_ENDED = _family(
    "sim_data_sessions_ended",
    "counter",
    "Data sessions seen to end after the SIM's first successful poll (each session sid"
    " counts once)." + CACHED,
    *SIM,
)
PACKETS_UP = _family(
    "sim_packets_uploaded",
    "counter",
    "Packets uploaded by the SIM's device since the exporter started, summed over its data"
    " sessions." + CACHED,
    *SIM,
)
PACKETS_DOWN = _family(
    "sim_packets_downloaded",
    "counter",
    "Packets downloaded by the SIM's device since the exporter started, summed over its data"
    " sessions." + CACHED,
    *SIM,
)
SESSION_INFO = _family(
    "sim_session_info",
    "gauge",
    "Radio link and operator of the SIM's most recent data session (value is always 1)." + CACHED,
    *SIM,
    "radio_link",
    "operator_name",
    "operator_country",
    "operator_mcc",
    "operator_mnc",
)
SESSION_INFO_IMEI = "imei"
"""The extra label of ``sim_session_info`` with ``metrics.imei_label`` on."""
LATITUDE = _family(
    "sim_cell_latitude_degrees",
    "gauge",
    "Estimated latitude of the cell tower of the SIM's most recent data session that has a"
    " cell location estimate." + CACHED,
    *SIM,
)
LONGITUDE = _family(
    "sim_cell_longitude_degrees",
    "gauge",
    "Estimated longitude of the cell tower of the SIM's most recent data session that has a"
    " cell location estimate." + CACHED,
    *SIM,
)
LAST_START = _family(
    "sim_last_session_start_timestamp_seconds",
    "gauge",
    "Unix time at which the SIM's most recent data session started." + CACHED,
    *SIM,
)
LAST_UPDATED = _family(
    "sim_last_updated_timestamp_seconds",
    "gauge",
    "Newest last_updated time among the SIM's listed data sessions (unix time)." + CACHED,
    *SIM,
)
IMEI_CHANGES = _family(
    "sim_imei_changes",
    "counter",
    "Times the IMEI of the SIM's most recent data session differed from the previously"
    " known IMEI (device swap)." + CACHED,
    *SIM,
)
SIM_UP = _family(
    "sim_up",
    "gauge",
    "1 when the latest poll of the SIM's data sessions succeeded, else 0.",
    *SIM,
)
LAST_SUCCESS = _family(
    "sim_last_poll_success_timestamp_seconds",
    "gauge",
    "Unix time of the latest successful poll of the SIM's data sessions.",
    *SIM,
)

USAGE = (
    " Cached from the exporter's latest read of the usage records, which lag the traffic by"
    " 24 to 48 hours."
)

SIM_DATA_BYTES = _family(
    "sim_data_bytes",
    "counter",
    "Bytes the API reported for the SIM after its first successful usage read, by direction"
    " (upload, download); late revisions of a past day count when they arrive." + USAGE,
    *SIM,
    "direction",
)
SIM_DATA_PERIOD_BYTES = _family(
    "sim_data_period_bytes",
    "gauge",
    "Bytes the SIM used in its current metering period, as the API reports them now, by"
    " direction (upload, download, total); with usage.roaming_split also by network (home,"
    " national_roaming, international_roaming)." + USAGE,
    *SIM,
    "direction",
)
SIM_DATA_PERIOD_START = _family(
    "sim_data_period_start_timestamp_seconds",
    "gauge",
    "Unix time at which the SIM's current metering period began (usage.period_start_day).",
    *SIM,
)
SIM_DATA_PERIOD_BILLED = _family(
    "sim_data_period_billed",
    "gauge",
    "Amount billed for the SIM's data in its current metering period, in billing_units"
    " (usage.billed)." + USAGE,
    *SIM,
    "billing_units",
)
SIM_COMMANDS = _family(
    "sim_commands",
    "counter",
    "SMS and IP commands the API reported for the SIM after its first successful usage read,"
    " by direction (from_sim, to_sim)." + USAGE,
    *SIM,
    "direction",
)
SIM_USAGE_LAST_SUCCESS = _family(
    "sim_usage_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the latest successful read of the SIM's usage records.",
    *SIM,
)
SIM_STATUS_CHANGES = _family(
    "sim_status_changes",
    "counter",
    "Changes of the SIM's status seen in /v1/Sims since the exporter started monitoring it."
    + CACHED,
    *SIM,
)
SIM_RESETTING = _family(
    "sim_connectivity_reset_in_progress",
    "gauge",
    "1 while a connectivity reset of the SIM is in progress (reset_status is resetting), else"
    " 0." + CACHED,
    *SIM,
)

PER_SIM: tuple[Family, ...] = (
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
    SIM_STATUS_CHANGES,
    SIM_RESETTING,
    SIM_DATA_BYTES,
    SIM_DATA_PERIOD_BYTES,
    SIM_DATA_PERIOD_START,
    SIM_DATA_PERIOD_BILLED,
    SIM_COMMANDS,
    SIM_USAGE_LAST_SUCCESS,
)
"""The per-SIM families, in the order they are exposed."""

ESSENTIAL: tuple[Family, ...] = (
    SIM_INFO,
    SIM_UP,
    LAST_SUCCESS,
    SESSIONS_OPEN,
    SESSIONS_STARTED,
    SESSIONS_ENDED,
    IMEI_CHANGES,
    LAST_START,
    SIM_STATUS_CHANGES,
    SIM_DATA_BYTES,
    SIM_DATA_PERIOD_BYTES,
    SIM_USAGE_LAST_SUCCESS,
)
"""The per-SIM families ``metrics.per_sim: essential`` keeps: what the shipped alert rules and
recording rules query per SIM (a test checks that every per-SIM family they read is here), the
SIM's identity for naming it, and whether its polls succeed. A per-SIM family added for a new
rule is added here too, or that test names it."""

# -------------------------------------------------------------------------- fleet-wide

SESSION_DURATION = _family(
    "data_session_duration_seconds",
    "histogram",
    "Duration (end - start) of data sessions seen to end after the baseline, observed once"
    " per session, by radio link." + CACHED,
    "radio_link",
)
SIMS_MONITORED = _family("sims_monitored", "gauge", "SIMs currently polled by this exporter.")
POLL_INTERVAL = _family(
    "poll_interval_seconds",
    "gauge",
    "Configured interval between two polls of each SIM's data sessions (poll.interval).",
)
SHARDS = _family(
    "exporter_shards",
    "gauge",
    "Number of shards the fleet is split over, as this exporter was started (shard.count, 1"
    " when unsharded); the index label is this exporter's own 0-based shard (shard.index).",
    "index",
)
BUILD_INFO = _family(
    "exporter_build_info",
    "gauge",
    "Build information of twilio-wireless-exporter (value is always 1).",
    "version",
    "python_version",
)

# -------------------------------------------------------------------------- the exporter itself

API_REQUESTS = _family(
    "api_requests",
    "counter",
    "HTTP requests to the Twilio API by endpoint template and status code"
    ' (code="error" for timeouts and connection failures).',
    "endpoint",
    "code",
)
API_REQUEST_DURATION = _family(
    "api_request_duration_seconds",
    "histogram",
    "Latency of HTTP requests to the Twilio API by endpoint template.",
    "endpoint",
)
API_RETRIES = _family(
    "api_retries",
    "counter",
    "Retried Twilio API requests by endpoint and reason (429, 5xx, timeout, connection).",
    "endpoint",
    "reason",
)
API_CONCURRENT_REQUESTS = _family(
    "api_concurrent_requests",
    "gauge",
    "The account's requests in flight as the latest Twilio answer reported them"
    " (Twilio-Concurrent-Requests; absent until an answer carries it).",
)
API_CONCURRENT_REQUESTS_MAX = _family(
    "api_concurrent_requests_max",
    "gauge",
    "The most requests in flight any Twilio answer reported since the exporter started"
    " (Twilio-Concurrent-Requests; absent until an answer carries it).",
)
API_REPORTED_DURATION = _family(
    "api_reported_request_duration_seconds",
    "gauge",
    "Seconds Twilio reported spending on the latest answered request"
    " (Twilio-Request-Duration; absent until an answer carries it).",
)
API_HEADERS_REJECTED = _family(
    "api_headers_rejected",
    "counter",
    "Twilio-Concurrent-Requests or Twilio-Request-Duration response headers whose value was no"
    " plausible number, by header; the value was ignored, the answer used.",
    "header",
)
POLL_ERRORS = _family(
    "poll_errors",
    "counter",
    "Failed reads of the API by endpoint (data_sessions, sims, sim, usage_records,"
    " account_usage_records, rate_plans) and kind of failure (http, auth, timeout,"
    " connection, decode, too_large, too_many_pages, bad_next_page, internal).",
    "endpoint",
    "kind",
)
RECORDS_REJECTED = _family(
    "api_records_rejected",
    "counter",
    "Records of an API listing left out because a value failed the exporter's plausibility"
    " checks, by endpoint and reason (packets, timestamp, duration, location, sid,"
    " foreign_sim, units, usage, malformed); the rest of the listing is used.",
    "endpoint",
    "reason",
)
EXPOSITION_SERIES = _family(
    "exposition_series",
    "gauge",
    "Series (sample lines) per family in the latest whole /metrics body; their sum is what one"
    " scrape of every section stores (metrics.max_series warns above a total).",
    "family",
)
EXPOSITION_ERRORS = _family(
    "exposition_errors",
    "counter",
    "Renderings of one SIM's samples that failed; that SIM is left out of /metrics until its"
    " record changes, the other SIMs are served.",
)
TOKEN_REQUESTS = _family(
    "oauth_token_requests",
    "counter",
    "Requests to the OAuth2 token endpoint by result (success, unauthorized: the"
    " client credentials were rejected, error: anything else).",
    "result",
)
TOKEN_EXPIRY = _family(
    "oauth_token_expiry_timestamp_seconds",
    "gauge",
    "Unix time at which the current OAuth2 access token expires (absent while there is none).",
)
TOKEN_REMAINING = _family(
    "oauth_token_remaining_lifetime_seconds",
    "gauge",
    "Seconds until the current OAuth2 access token expires, at scrape time (absent while there"
    " is none).",
)
STATE_SAVE_ERRORS = _family(
    "state_save_errors",
    "counter",
    "Failed saves of the state file (state.path); see the exporter's log.",
)
STATE_LAST_SAVE = _family(
    "state_last_save_timestamp_seconds",
    "gauge",
    "Unix time of the latest successful save of the state file.",
)
STATE_SAVE_DURATION = _family(
    "state_save_duration_seconds",
    "gauge",
    "Time the latest save of the state file took (snapshot and write).",
)
STATE_ROWS_REJECTED = _family(
    "state_rows_rejected",
    "counter",
    "Rows of the state file rejected at start by table (sims, sessions: that SIM starts a fresh"
    " baseline; durations: that histogram starts afresh; aggregate_groups: that group's"
    " counters start from its SIMs' counts; aggregate_members: that SIM joins its group"
    " afresh); see the exporter's log.",
    "table",
)
STATE_UNSAVED_SIMS = _family(
    "state_unsaved_sims",
    "gauge",
    "SIMs whose state the latest save could not write (a value no state file may hold); their"
    " previously saved state was kept.",
)

HTTP_REJECT_REASONS = (
    "header_timeout",
    "connection_limit",
    "bad_request",
    "unauthorized",
    "auth_backoff",
    "auth_overloaded",
)
"""The values of ``http_rejected``'s ``reason`` label (docs/metrics.md says what each means)."""
HTTP_REJECTED = _family(
    "http_rejected",
    "counter",
    "Connections and requests the exporter's HTTP server cut or refused, by reason"
    " (header_timeout, connection_limit, bad_request, unauthorized, auth_backoff,"
    " auth_overloaded).",
    "reason",
)
HTTP_CONNECTIONS = _family(
    "http_connections",
    "gauge",
    "Client connections open to the exporter's HTTP server.",
)
HTTP_CONNECTIONS_MAX = _family(
    "http_connections_max",
    "gauge",
    "Most client connections the exporter's HTTP server keeps open (--web.max-connections).",
)

ACCOUNT_DATA_BYTES = _family(
    "account_data_bytes",
    "counter",
    "Bytes the API reported for the whole account (/v1/UsageRecords) after the exporter's first"
    " successful account usage read, by direction (upload, download)." + USAGE,
    "direction",
)
ACCOUNT_COMMANDS = _family(
    "account_commands",
    "counter",
    "Commands the API reported for the whole account after the exporter's first successful"
    " account usage read, by direction (from_sim, to_sim)." + USAGE,
    "direction",
)
ACCOUNT_USAGE_LAST_SUCCESS = _family(
    "account_usage_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the latest successful read of the account's usage records.",
)
RATE_PLAN_INFO = _family(
    "rate_plan_info",
    "gauge",
    "Identity of a rate plan of the account (value is always 1), from /v1/RatePlans.",
    "rate_plan_sid",
    "unique_name",
    "friendly_name",
    "data_metering",
    "data_enabled",
    "national_roaming_enabled",
)
RATE_PLAN_DATA_LIMIT = _family(
    "rate_plan_data_limit_bytes",
    "gauge",
    "Data limit of a rate plan per metering period (a month), by network (home,"
    " national_roaming, international_roaming), converted from the API's megabytes at"
    " 1 MB = 1,048,576 bytes; absent when the plan sets no limit.",
    "rate_plan_sid",
    "network",
)
SIMS_BY_STATUS = _family(
    "sims",
    "gauge",
    "Monitored SIMs by status and rate plan, from the latest /v1/Sims listing or read.",
    "status",
    "rate_plan_sid",
)

# -------------------------------------------------------------------------- fleet aggregates

GROUPED = (
    " Summed over the monitored SIMs of each group of metrics.aggregate_by (the group's labels;"
    " one group without labels when aggregate_by is empty, other for SIMs beyond"
    " metrics.max_groups)."
)
CARRIED = (
    " A SIM that leaves the group (moved, or no longer monitored) leaves its count behind, so"
    " the counter never goes down."
)

FLEET_SESSIONS_OPEN = _family(
    "fleet_data_sessions_open",
    "gauge",
    "Data sessions open (end is null) in the latest listings." + GROUPED + CACHED,
)
FLEET_SESSIONS_STARTED = _family(
    "fleet_data_sessions_started",
    "counter",
    "Data sessions first seen after each SIM's baseline." + GROUPED + CARRIED + CACHED,
)
FLEET_SESSIONS_ENDED = _family(
    "fleet_data_sessions_ended",
    "counter",
    "Data sessions seen to end after each SIM's baseline." + GROUPED + CARRIED + CACHED,
)
FLEET_PACKETS_UP = _family(
    "fleet_packets_uploaded",
    "counter",
    "Packets uploaded by the SIMs' devices since their baselines." + GROUPED + CARRIED + CACHED,
)
FLEET_PACKETS_DOWN = _family(
    "fleet_packets_downloaded",
    "counter",
    "Packets downloaded by the SIMs' devices since their baselines." + GROUPED + CARRIED + CACHED,
)
FLEET_DATA_BYTES = _family(
    "fleet_data_bytes",
    "counter",
    "Bytes the API reported for the SIMs after their first usage reads, by direction (upload,"
    " download)." + GROUPED + CARRIED + USAGE,
    "direction",
)
FLEET_SIMS_UP = _family(
    "fleet_sims_up",
    "gauge",
    "SIMs whose latest poll succeeded." + GROUPED,
)
FLEET_SIMS_DOWN = _family(
    "fleet_sims_down",
    "gauge",
    "SIMs whose latest poll failed." + GROUPED,
)

AGGREGATES: tuple[Family, ...] = (
    FLEET_SESSIONS_OPEN,
    FLEET_SESSIONS_STARTED,
    FLEET_SESSIONS_ENDED,
    FLEET_PACKETS_UP,
    FLEET_PACKETS_DOWN,
    FLEET_DATA_BYTES,
    FLEET_SIMS_UP,
    FLEET_SIMS_DOWN,
)
"""The fleet aggregates (``metrics.aggregate_by``): fleet-wide families whose samples also
carry the group's labels, which are not listed in ``labels``."""

FLEET: tuple[Family, ...] = (
    SESSION_DURATION,
    SIMS_MONITORED,
    POLL_INTERVAL,
    SHARDS,
    BUILD_INFO,
    SIMS_BY_STATUS,
    RATE_PLAN_INFO,
    RATE_PLAN_DATA_LIMIT,
    ACCOUNT_DATA_BYTES,
    ACCOUNT_COMMANDS,
    ACCOUNT_USAGE_LAST_SUCCESS,
    *AGGREGATES,
)
"""Fleet-wide families of the exporter's private registry."""

SELF: tuple[Family, ...] = (
    API_REQUESTS,
    API_REQUEST_DURATION,
    API_RETRIES,
    API_CONCURRENT_REQUESTS,
    API_CONCURRENT_REQUESTS_MAX,
    API_REPORTED_DURATION,
    API_HEADERS_REJECTED,
    POLL_ERRORS,
    RECORDS_REJECTED,
    EXPOSITION_ERRORS,
    EXPOSITION_SERIES,
    TOKEN_REQUESTS,
    TOKEN_EXPIRY,
    TOKEN_REMAINING,
    STATE_SAVE_ERRORS,
    STATE_LAST_SAVE,
    STATE_SAVE_DURATION,
    STATE_ROWS_REJECTED,
    STATE_UNSAVED_SIMS,
    HTTP_REJECTED,
    HTTP_CONNECTIONS,
    HTTP_CONNECTIONS_MAX,
)
"""The exporter's own health: API requests, polls, OAuth2 tokens, the state file, its HTTP
server."""

ALL: tuple[Family, ...] = PER_SIM + FLEET + SELF
"""Every family the exporter may expose."""


def family_of(series: str) -> Family | None:
    """The family a stored series name belongs to (``x_total`` -> ``x``), else ``None``."""
    return _BY_SERIES.get(series)


_BY_SERIES = {series: family for family in ALL for series in family.series}
