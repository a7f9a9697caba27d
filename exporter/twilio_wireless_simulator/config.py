"""Simulator settings and the demo credentials."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from .faults import FaultConfig

__all__ = [
    "DEMO_ACCOUNT_SID",
    "DEMO_AUTH_TOKEN",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "AuthMode",
    "SimulatorConfig",
]

#: Demo credentials: not secrets, they only open the simulator.
DEMO_ACCOUNT_SID: Final = "AC" + "de300000000000000000000000000001"
DEMO_AUTH_TOKEN: Final = "demo-auth-token"  # noqa: S105 (a published demo value)
DEMO_CLIENT_ID: Final = "demo-client-id"
DEMO_CLIENT_SECRET: Final = "demo-client-secret"  # noqa: S105 (a published demo value)

AuthMode = Literal["basic", "bearer"]

_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_API_KEY_SID = re.compile(r"^SK[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything a simulator instance needs.

    * ``sims``/``seed``: the generated fleet (``sims=0`` for an empty, script-only fleet).
    * Basic auth with (``account_sid``, ``auth_token``) or any (``SK…`` key, secret) of
      ``api_keys``. ``auth_mode="bearer"`` switches to KORE-style OAuth2: tokens from
      ``POST /api-services/v1/auth/token`` for (``client_id``, ``client_secret``), valid for
      ``token_lifetime`` seconds measured on ``token_clock``.
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
    * ``faults``: the live fault settings (the same object becomes ``sim.faults``).
    * ``public_url``: base of the absolute URLs in responses (default: from the request's Host).
    * ``keep_history``: keep every session for ``fleet.history`` (turn off for long runs).
    """

    sims: int = 20
    seed: int = 1
    account_sid: str = DEMO_ACCOUNT_SID
    auth_token: str = DEMO_AUTH_TOKEN
    api_keys: Mapping[str, str] = field(default_factory=dict)
    auth_mode: AuthMode = "basic"
    client_id: str = DEMO_CLIENT_ID
    client_secret: str = DEMO_CLIENT_SECRET
    token_lifetime: float = 3600.0
    token_clock: Callable[[], float] = time.monotonic
    token_scope: str = "programmable-wireless"  # noqa: S105 (an OAuth scope)
    retention: float = 30 * 86400.0
    backfill: float | None = None
    speed: float | None = None
    start_time: float | None = None
    update_granularity: float = 60.0
    max_concurrent: int | None = None
    concurrency_retry_after: float = 1.0
    faults: FaultConfig = field(default_factory=FaultConfig)
    public_url: str | None = None
    keep_history: bool = True
    wall_timestamps: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.sims < 0:
            problems.append(f"sims must be >= 0, got {self.sims}")
        if not _ACCOUNT_SID.match(self.account_sid):
            problems.append(f"account_sid must be AC + 32 hex digits, got {self.account_sid!r}")
        problems.extend(
            f"api key {key!r} must be SK + 32 hex digits"
            for key in self.api_keys
            if not _API_KEY_SID.match(key)
        )
        if self.auth_mode not in ("basic", "bearer"):
            problems.append(f"auth_mode must be 'basic' or 'bearer', got {self.auth_mode!r}")
        if not self.token_lifetime > 0:
            problems.append("token_lifetime must be > 0")
        if not self.retention > 0:
            problems.append("retention must be > 0")
        if self.backfill is not None and self.backfill < 0:
            problems.append("backfill must be >= 0")
        if self.speed is not None and not self.speed > 0:
            problems.append("speed must be > 0 (or None for a manual clock)")
        if self.wall_timestamps and self.speed is None:
            problems.append("wall_timestamps needs speed (a manual clock has no wall time)")
        if not self.update_granularity > 0:
            problems.append("update_granularity must be > 0")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            problems.append("max_concurrent must be >= 1 (or None)")
        if self.concurrency_retry_after < 0:
            problems.append("concurrency_retry_after must be >= 0")
        if self.public_url is not None and not re.match(
            r"^https?://[^/]+$", self.public_url.rstrip("/")
        ):
            problems.append(
                f"public_url must look like http(s)://host[:port], got {self.public_url!r}"
            )
        if problems:
            raise ValueError("invalid SimulatorConfig: " + "; ".join(problems))
