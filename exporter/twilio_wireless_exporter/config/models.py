"""The configuration tree: immutable settings whose types state the rules.

The rest of the code receives values that are already checked, typed and normalised (durations
in float seconds, sizes in bytes, file paths absolute, credentials resolved). Only rules across
options are written as validators; everything else is a type.
"""

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal, Self, TypeAlias, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_core import PydanticCustomError as Problem

from twilio_wireless_exporter.config.credentials import Credentials, resolve_credentials
from twilio_wireless_exporter.config.errors import also_report, fail, problem, shaped
from twilio_wireless_exporter.config.metrics import (
    FamilyPattern,
    GroupLabel,
    PerSimMode,
    distinct_labels,
    label_problems,
    selected_families,
)
from twilio_wireless_exporter.config.types import (
    AccountSid,
    ApiKey,
    ConfigPath,
    Duration,
    HttpUrl,
    Secret,
    SimSid,
    Size,
    Text,
    file_status,
    format_duration,
    warnings_of,
)
from twilio_wireless_exporter.sharding import MAX_SHARDS, Shard

DEFAULT_BASE_URL: Final = "https://wireless.twilio.com"
DEFAULT_TOKEN_URL: Final = "https://api.korewireless.com/api-services/v1/auth/token"  # noqa: S105

SimStatus: TypeAlias = Literal[
    "new", "ready", "active", "suspended", "deactivated", "canceled", "scheduled", "updating"
]
SIM_STATUSES: Final[tuple[str, ...]] = get_args(SimStatus)
DiscoveryStatus: TypeAlias = Literal[
    "new",
    "ready",
    "active",
    "suspended",
    "deactivated",
    "canceled",
    "scheduled",
    "updating",
    "all",
]
"""A status discovery lists, or ``all`` for every status (no Status filter)."""

#: Label names the exporter sets itself, or Prometheus reserves, or the shipped dashboards and
#: alert rules add (``display_name``); constant SIM labels must not reuse them.
RESERVED_LABEL_NAMES: Final = frozenset(
    "sim_sid sim_name unique_name friendly_name status rate_plan_sid radio_link"  # noqa: SIM905
    " operator_name operator_country operator_mcc operator_mnc imei endpoint code reason le"
    " quantile job instance display_name".split()
)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _label_name(name: str) -> str:
    if name.startswith("__"):
        raise Problem("label", "label names starting with __ are reserved for Prometheus")
    if name in RESERVED_LABEL_NAMES:
        raise Problem("label", "is a label the exporter sets itself; choose another name")
    return name


def _state_file(path: Path) -> Path:
    parent, found = file_status(path.parent), file_status(path)
    if parent is None or not stat.S_ISDIR(parent.st_mode):
        raise Problem("state", f"directory {path.parent} does not exist")
    if found is not None and not stat.S_ISREG(found.st_mode):
        directory = stat.S_ISDIR(found.st_mode)
        wrong = "is a directory; give the path of a file" if directory else "is not a regular file"
        raise Problem("state", f"{path} {wrong}")
    return path


LabelName = Annotated[
    StrictStr,
    shaped(
        r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        "invalid label name: use letters, digits and _, not starting with a digit",
    ),
    AfterValidator(_label_name),
]
LabelValue = Annotated[StrictStr, Field(min_length=1)]
StatePath = Annotated[ConfigPath, AfterValidator(_state_file)]


class Options(BaseModel):
    """Frozen, no unknown options; hide_input_in_errors keeps secrets out of pydantic's text."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Settings(Options):
    """A section of options."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: object) -> object:
        # "poll:" with nothing under it is null in YAML: for a section, list or mapping of
        # options (the fields with a default factory), that means its defaults, as if absent.
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].default_factory is None
        }


class AuthSettings(Settings):
    """``twilio.auth``: how requests authenticate (HTTP Basic for Twilio, OAuth 2.0 for KORE)."""

    type: Literal["basic", "oauth2_client_credentials"] = "basic"
    token_url: HttpUrl = DEFAULT_TOKEN_URL
    client_id: Text | None = None
    client_secret: Secret | None = None
    client_secret_file: ConfigPath | None = None
    scope: Text | None = None
    refresh_margin: Annotated[Duration, Field(ge=0)] = 60.0

    @model_validator(mode="after")
    def _oauth2_options_need_oauth2(self) -> Self:
        # every option but the type belongs to OAuth 2.0
        misplaced = [n for n in type(self).model_fields if n in self.model_fields_set - {"type"}]
        if self.type == "basic" and misplaced:
            wrong = "is only used with type: oauth2_client_credentials"
            raise fail([problem(wrong, (name,)) for name in misplaced])
        return self


class TwilioSettings(Settings):
    """``twilio``: where the API is and how to authenticate.

    ``credentials`` holds the result of resolving the options, secret files and environment.
    """

    base_url: HttpUrl = DEFAULT_BASE_URL
    account_sid: AccountSid | None = None
    auth_token: Secret | None = None
    auth_token_file: ConfigPath | None = None
    api_key: ApiKey | None = None
    api_secret: Secret | None = None
    api_secret_file: ConfigPath | None = None
    timeout: Annotated[Duration, Field(gt=0)] = 10.0
    auth: AuthSettings = Field(default_factory=AuthSettings)

    _credentials: Credentials | None = PrivateAttr(default=None)

    @property
    def credentials(self) -> Credentials:
        """The credentials resolved from this section, secret files and the environment."""
        if self._credentials is None:  # only possible for instances built without validation
            raise RuntimeError("TwilioSettings was not validated; no credentials were resolved")
        return self._credentials

    @model_validator(mode="after")
    def _resolve_credentials(self, info: ValidationInfo) -> Self:
        environ = info.context.get("environ") if isinstance(info.context, dict) else None
        warnings = warnings_of(info)
        self._credentials = resolve_credentials(
            self, environ if isinstance(environ, Mapping) else os.environ, warnings
        )
        urls = {"base_url": self.base_url}
        if self.auth.type == "oauth2_client_credentials":
            urls["auth.token_url"] = self.auth.token_url
        for loc, url in urls.items():
            if url.startswith("http://") and not _is_loopback(url):
                cleartext = "uses plain http; credentials would cross the network unencrypted"
                warnings.append(f"twilio.{loc}: {cleartext}")
        if urlsplit(self.base_url).path.rstrip("/").endswith("/v1"):
            twice = "ends in /v1, but the exporter adds /v1 itself; give the URL without it"
            warnings.append(f"twilio.base_url: {twice}")
        return self


class PollSettings(Settings):
    """``poll``: how often and how hard to call the API."""

    interval: Annotated[Duration, Field(ge=1)] = 60.0
    page_size: Annotated[StrictInt, Field(ge=1, le=1000)] = 100
    concurrency: Annotated[StrictInt, Field(ge=1, le=256)] = 8
    requests_per_second: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)] = 20.0
    max_retries: Annotated[StrictInt, Field(ge=0, le=10)] = 4
    backoff_initial: Annotated[Duration, Field(gt=0)] = 1.0
    backoff_max: Annotated[Duration, Field(gt=0)] = 60.0
    max_pages: Annotated[StrictInt, Field(ge=1, le=10000)] = 50
    max_response_bytes: Annotated[Size, Field(ge=1024, le=1024**3)] = 16 * 1024**2

    @model_validator(mode="after")
    def _backoff_cap_covers_first_backoff(self) -> Self:
        if self.backoff_max < self.backoff_initial:
            initial, maximum = map(format_duration, (self.backoff_initial, self.backoff_max))
            wrong = f"must not be shorter than poll.backoff_initial ({initial}), got {maximum}"
            raise fail([problem(wrong, ("backoff_max",))])
        return self


PeriodStartDay = Annotated[StrictInt, Field(ge=1, le=28)]


class SimSettings(Options):
    """One entry of ``sims``: a SIM to poll, with an optional display name and constant labels;
    ``usage_period_start_day`` overrides ``usage.period_start_day`` for this SIM.

    Not a :class:`Settings`: a fleet's file has 100,000 entries, so ``labels: null`` (no labels)
    is handled once for the whole list, by :func:`_sim_entry`, instead of by a validator that
    pydantic would call for every entry.
    """

    sid: SimSid
    name: Text | None = None
    labels: dict[LabelName, LabelValue] = Field(default_factory=dict)
    usage_period_start_day: PeriodStartDay | None = None


def _sim_entry(item: object) -> object:
    """One entry of ``sims`` as :class:`SimSettings` reads it: ``- DE…`` is short for
    ``- sid: DE…``, and ``labels: null`` means no labels, as if absent."""
    if isinstance(item, str):
        return {"sid": item}
    if type(item) is dict and item.get("labels", ()) is not None:
        return item  # the common case, unchanged
    if isinstance(item, Mapping):
        return {k: v for k, v in item.items() if v is not None or k != "labels"}
    return item


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _some_statuses(statuses: tuple[str, ...]) -> tuple[str, ...]:
    """The statuses to list, without repeats; ``all`` becomes ``()``: no Status filter, one
    listing of every SIM (so a SIM that leaves ``active`` is seen leaving)."""
    if not statuses:
        raise Problem("status", f"must list at least one of {', '.join(get_args(DiscoveryStatus))}")
    if "all" in statuses:
        if len(set(statuses)) > 1:
            raise Problem("status", "all already lists every status; give it alone")
        return ()
    return tuple(dict.fromkeys(statuses))


class DiscoverySettings(Settings):
    """``discovery``: find SIMs through the API (``GET /v1/Sims?Status=…``) besides ``sims``."""

    enabled: StrictBool = False
    status: Annotated[
        tuple[DiscoveryStatus, ...],
        BeforeValidator(_one_or_many),
        AfterValidator(_some_statuses),
    ] = ("active",)
    refresh_interval: Annotated[Duration, Field(ge=10)] = 600.0


class MetricsSettings(Settings):
    """``metrics``: optional parts of the exposition and the controls of its cardinality
    (``config/metrics.py`` holds their types and checks)."""

    imei_label: StrictBool = False
    include: tuple[FamilyPattern, ...] = ()
    exclude: tuple[FamilyPattern, ...] = ()
    per_sim: PerSimMode = "full"
    sim_labels: tuple[LabelName, ...] | None = None
    max_series: Annotated[StrictInt, Field(ge=1)] = 2_000_000
    aggregate_by: Annotated[tuple[GroupLabel, ...], AfterValidator(distinct_labels)] = ()
    max_groups: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1000

    @property
    def families(self) -> frozenset[str]:
        """The names of the families to expose (include, exclude and per_sim applied)."""
        return selected_families(self.include, self.exclude, self.per_sim)


class UsageSettings(Settings):
    """``usage``: data and command usage from the usage records, and the rate plans."""

    enabled: StrictBool = True
    interval: Annotated[Duration, Field(ge=1)] = 3600.0
    period_start_day: PeriodStartDay = 1
    revision_days: Annotated[StrictInt, Field(ge=0, le=7)] = 2
    account: StrictBool = True
    rate_plans: StrictBool = True
    roaming_split: StrictBool = False
    billed: StrictBool = False


class StateSettings(Settings):
    """``state``: where to keep state across restarts (optional)."""

    path: StatePath | None = None
    save_interval: Annotated[Duration, Field(ge=1)] = 60.0


class ShardSettings(Settings):
    """``shard``: this replica's part of the fleet when N exporters split it by SIM SID."""

    index: Annotated[StrictInt, Field(ge=0, le=MAX_SHARDS - 1)] = 0
    count: Annotated[StrictInt, Field(ge=1, le=MAX_SHARDS)] = 1

    @model_validator(mode="after")
    def _index_below_count(self) -> Self:
        if self.index >= self.count:
            wrong = f"must be less than shard.count ({self.count}), got {self.index}"
            raise fail([problem(wrong, ("index",))])
        return self

    @property
    def shard(self) -> Shard:
        return Shard(self.index, self.count)


class Config(Settings):
    """The whole configuration. Build it with :func:`load_config` or :func:`config_from_mapping`."""

    # validated even when absent, so that the credentials still resolve from the environment
    twilio: TwilioSettings = Field(default_factory=dict, validate_default=True)
    poll: PollSettings = Field(default_factory=PollSettings)
    sims: tuple[SimSettings, ...] = Field(default_factory=tuple)
    discovery: DiscoverySettings = Field(default_factory=DiscoverySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    shard: ShardSettings = Field(default_factory=ShardSettings)

    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        """Non-fatal problems found during validation (e.g. a secret file others can read)."""
        return self._warnings

    @model_validator(mode="wrap")
    @classmethod
    def _something_to_poll(
        cls, data: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Self:
        # The one rule on the whole config is checked on the input, so that it is reported
        # together with the other problems.
        extra: list[InitErrorDetails] = []
        if isinstance(data, Mapping):
            discovery = data.get("discovery")
            enabled = isinstance(discovery, Mapping) and discovery.get("enabled") is True
            if not data.get("sims") and not enabled:
                wrong = "no SIMs to monitor; list SIMs under sims or set discovery.enabled: true"
                extra.append(problem(wrong, ("sims",)))
        config: Self = also_report(handler, data, extra)
        config._warnings = tuple(warnings_of(info))
        return config

    @model_validator(mode="after")
    def _metrics_name_configured_labels(self) -> Self:
        configured = {name for sim in self.sims for name in sim.labels}
        problems = label_problems(configured, self.metrics.sim_labels, self.metrics.aggregate_by)
        if problems:
            raise fail(problems)
        return self

    @field_validator("sims", mode="before")
    @classmethod
    def _sid_shorthand(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return [_sim_entry(item) for item in value]
        return value

    @field_validator("sims", mode="after")
    @classmethod
    def _unique_sids(cls, sims: tuple[SimSettings, ...]) -> tuple[SimSettings, ...]:
        first_seen: dict[str, int] = {}
        problems: list[InitErrorDetails] = []
        for index, sim in enumerate(sims):
            first = first_seen.setdefault(sim.sid.upper(), index)
            if first != index:
                problems.append(problem(f"duplicate of sims[{first}].sid", (index, "sid")))
        if problems:
            raise fail(problems)
        return sims
