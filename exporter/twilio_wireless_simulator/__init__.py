"""A Twilio Programmable Wireless API simulator (and KORE-style OAuth2), for tests and demos.

It never imports the exporter, so it cannot agree with the exporter's bugs::

    async with start_simulator(SimulatorConfig(sims=20, seed=1)) as sim:
        sim.url, sim.fleet, sim.clock, sim.faults, sim.stats
"""

from .app import STATE_KEY, TOKEN_PATH, RunningSimulator, SimulatorState, build_app, start_simulator
from .cli import main
from .config import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_USAGE_FINAL_AFTER,
    DEMO_USAGE_LAG,
    AuthMode,
    SimulatorConfig,
)
from .faults import FaultConfig, FaultResponse, PathKind
from .model import (
    COUNTRIES,
    DEFAULT,
    DEFAULT_START_TIME,
    EMPTY_LOCATION,
    RADIO_LINKS,
    SIM_STATUSES,
    UNKNOWN_OPERATOR,
    Episode,
    Fleet,
    Operator,
    RatePlanView,
    SessionView,
    SimClock,
    SimView,
    UsageTotals,
    UsageView,
    format_time,
    luhn_check_digit,
)
from .stats import RequestLogEntry, SimulatorStats
from .usage import GRANULARITIES, UNIT_FACTORS, UNITS

__all__ = [
    "COUNTRIES",
    "DEFAULT",
    "DEFAULT_START_TIME",
    "DEMO_ACCOUNT_SID",
    "DEMO_AUTH_TOKEN",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "DEMO_USAGE_FINAL_AFTER",
    "DEMO_USAGE_LAG",
    "EMPTY_LOCATION",
    "GRANULARITIES",
    "RADIO_LINKS",
    "SIM_STATUSES",
    "STATE_KEY",
    "TOKEN_PATH",
    "UNITS",
    "UNIT_FACTORS",
    "UNKNOWN_OPERATOR",
    "AuthMode",
    "Episode",
    "FaultConfig",
    "FaultResponse",
    "Fleet",
    "Operator",
    "PathKind",
    "RatePlanView",
    "RequestLogEntry",
    "RunningSimulator",
    "SessionView",
    "SimClock",
    "SimView",
    "SimulatorConfig",
    "SimulatorState",
    "SimulatorStats",
    "UsageTotals",
    "UsageView",
    "build_app",
    "format_time",
    "luhn_check_digit",
    "main",
    "start_simulator",
]
