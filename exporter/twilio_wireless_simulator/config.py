"""Simulator settings and the demo credentials.

The settings are checked once, here, when a :class:`SimulatorConfig` is made: each rule is in
the type of its field (pydantic), the one cross-field rule in a model validator. What builds
the simulator from a config (the clock, the fleet, the app) trusts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Annotated, Final, Literal

from pydantic import ConfigDict, Field, InstanceOf, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from .faults import FaultConfig
from .rules import NonNegative, Positive
from .usage import Unit

__all__ = [
    "DEMO_ACCOUNT_SID",
    "DEMO_AUTH_TOKEN",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "DEMO_USAGE_FINAL_AFTER",
    "DEMO_USAGE_LAG",
    "AuthMode",
    "SimulatorConfig",
    "TokenStyle",
    "describe_errors",
]

#: Demo credentials: not secrets, they only open the simulator.
DEMO_ACCOUNT_SID: Final = "AC" + "de300000000000000000000000000001"
DEMO_AUTH_TOKEN: Final = "demo-auth-token"  # noqa: S105 (a published demo value)
DEMO_CLIENT_ID: Final = "demo-client-id"
DEMO_CLIENT_SECRET: Final = "demo-client-secret"  # noqa: S105 (a published demo value)

#: Usage lag of the exporter's ``--demo``, in simulated seconds: a closed hour shows at once,
#: is revised half a simulated hour later, so usage and its revisions show within a minute.
DEMO_USAGE_LAG: Final = 10.0
DEMO_USAGE_FINAL_AFTER: Final = 1800.0

AuthMode = Literal["basic", "bearer"]
#: ``opaque``: random bearer tokens, a bad one gets 401 ``invalid_token``. ``kore``: as KORE
#: answers: tokens are JWTs whose ``exp`` claim (on ``token_wall_clock``) is their expiry, and
#: an expired or revoked token gets the API gateway's 403 ("explicit deny").
TokenStyle = Literal["opaque", "kore"]

AccountSid = Annotated[str, Field(pattern=r"^AC[0-9a-fA-F]{32}$")]
ApiKeySid = Annotated[str, Field(pattern=r"^SK[0-9a-fA-F]{32}$")]
#: ``http(s)://host[:port]``, nothing after the authority but slashes.
PublicUrl = Annotated[str, Field(pattern=r"^https?://[^/]+/*$")]


@dataclass(frozen=True, config=ConfigDict(arbitrary_types_allowed=True))
class SimulatorConfig:
    """Everything a simulator instance needs.

    * ``sims``/``seed``: the generated fleet (``sims=0`` for an empty, script-only fleet).
    * Basic auth with (``account_sid``, ``auth_token``) or any (``SK…`` key, secret) of
      ``api_keys``. ``auth_mode="bearer"`` switches to KORE-style OAuth2: tokens from
      ``POST /api-services/v1/auth/token`` for (``client_id``, ``client_secret``), valid for
      ``token_lifetime`` seconds measured on ``token_clock``; ``token_style`` picks opaque
      tokens and 401s, or KORE's JWTs (``exp`` on ``token_wall_clock``) and 403s.
    * ``speed=None``: manual simulated clock starting at ``start_time`` (default
      2026-01-01T00:00:00Z); a number: accelerated real time (``speed`` simulated seconds per
      wall second) starting at ``start_time`` (default: now).
    * ``wall_timestamps`` (needs ``speed``; an error with a manual clock, which has no wall
      time): the API reports its times (session ``start``/``end``/``last_updated``, SIM
      ``date_created``/``date_updated``) mapped from simulated to real time,
      ``wall_start + (t - start_time) / speed``, so nothing lies in the real future and
      ``time() - timestamp`` stays meaningful: a fast-forward demo on a real clock. Simulated
      durations shrink by ``speed`` in what is reported; the model itself (and ``fleet.history``)
      stays in simulated time.
    * ``retention``: sessions ended longer ago than this are no longer listed. ``backfill``:
      simulated past before the start time (default: ``retention``).
    * ``max_concurrent``: API requests beyond this many in flight get 429 (code 20429) with
      ``Retry-After: concurrency_retry_after``.
    * ``load_headers``: API answers carry ``Twilio-Concurrent-Requests`` and
      ``Twilio-Request-Duration`` (turn off to answer as an API without them, like KORE's).
    * ``faults``: the live fault settings (the same object becomes ``sim.faults``).
    * ``public_url``: base of the absolute URLs in responses (default: from the request's Host).
    * ``keep_history``: keep every session for ``fleet.history`` (turn off for long runs).
    * Usage records: an hour's usage is reported ``usage_lag`` simulated seconds after the hour
      ends, first in part, revised upward half-way to ``usage_final_after`` and complete from
      then on; records go back ``usage_retention``; every SIM's records are in ``usage_unit``
      unless a test sets another (``fleet.set_sim_unit``).
    * ``status_changes``: generated ``active`` SIMs are suspended and reactivated, reset and
      moved to another plan now and then (seeded); off: statuses change only when a test says.
    """

    sims: Annotated[int, Field(ge=0)] = 20
    seed: int = 1
    account_sid: AccountSid = DEMO_ACCOUNT_SID
    auth_token: str = DEMO_AUTH_TOKEN
    api_keys: Mapping[ApiKeySid, str] = field(default_factory=dict)
    auth_mode: AuthMode = "basic"
    client_id: str = DEMO_CLIENT_ID
    client_secret: str = DEMO_CLIENT_SECRET
    token_lifetime: Positive = 3600.0
    token_clock: Callable[[], float] = time.monotonic
    token_style: TokenStyle = "opaque"  # noqa: S105 (a style name)
    token_wall_clock: Callable[[], float] = time.time
    token_scope: str = "programmable-wireless"  # noqa: S105 (an OAuth scope)
    retention: Positive = 30 * 86400.0
    backfill: NonNegative | None = None
    speed: Positive | None = None
    start_time: float | None = None
    update_granularity: Positive = 60.0
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    concurrency_retry_after: NonNegative = 1.0
    load_headers: bool = True
    # InstanceOf: the caller's own object (it becomes the live ``sim.faults``), not a copy.
    faults: InstanceOf[FaultConfig] = field(default_factory=FaultConfig)
    public_url: PublicUrl | None = None
    keep_history: bool = True
    wall_timestamps: bool = False
    usage_lag: NonNegative = 86400.0
    usage_final_after: NonNegative = 2 * 86400.0
    usage_retention: Positive = 62 * 86400.0
    usage_unit: Unit = "bytes"
    status_changes: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> SimulatorConfig:
        if self.wall_timestamps and self.speed is None:
            raise ValueError("wall_timestamps needs speed (a manual clock has no wall time)")
        if self.usage_final_after < self.usage_lag:
            raise ValueError("usage_final_after must be at least usage_lag")
        return self


def describe_errors(exc: ValidationError) -> str:
    """The problems of a rejected config on one line: ``sims: ... (got -1); ...``."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if part != "[key]")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":
            message += f" (got {error['input']!r})"
        problems.append(f"{where}: {message}" if where else message)
    return f"invalid {exc.title}: " + "; ".join(problems)
