"""Fleet-state builders shared by the accounting, exposition and persistence tests: data
sessions at times relative to ``T0``, a polled two-SIM fleet, and random listing histories with
the counters a reference model expects from them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime

from hypothesis import strategies as st

from twilio_wireless_exporter.api.records import CellLocation, DataSession
from twilio_wireless_exporter.api.usage import Usage
from twilio_wireless_exporter.fleet.accounting import apply_listing
from twilio_wireless_exporter.fleet.state import FleetState, PlanInfo
from twilio_wireless_exporter.fleet.usage import DAY

T0 = 1_700_000_000


def ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, tz=UTC)


def session(
    sid: str,
    *,
    start: float | None = 0,
    end: float | None = None,
    up: int | None = 0,
    down: int | None = 0,
    updated: float | None = None,
    radio: str | None = "LTE",
    imei: str | None = None,
    loc: CellLocation | None = None,
    operator: str | None = "Telekom",
) -> DataSession:
    return DataSession(
        sid=sid,
        start=None if start is None else ts(start),
        end=None if end is None else ts(end),
        packets_uploaded=up,
        packets_downloaded=down,
        last_updated=None if updated is None else ts(updated),
        radio_link=radio,
        imei=imei,
        cell_location_estimate=loc,
        operator_name=operator,
        operator_country="DEU",
        operator_mcc="262",
        operator_mnc="01",
    )


def usage(start: float, **values: object) -> Usage:
    """A usage record of one day from unix time ``start``; values not given are 0 or absent."""
    fields: dict[str, object] = {
        "upload": 0,
        "download": 0,
        "total": 0,
        "home": None,
        "national_roaming": None,
        "international_roaming": None,
        "billed": None,
        "billing_units": "",
        "commands_from_sim": 0,
        "commands_to_sim": 0,
    }
    fields.update(values)
    return Usage(start, start + DAY, **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- a polled fleet

#: The metering period of the polled fleet's SIM A, and its rate plan.
PERIOD = T0 - T0 % DAY - 10 * DAY
PLAN = PlanInfo(
    "WP" + "1" * 32,
    unique_name="iot-10mb",
    friendly_name="IoT 10 MB",
    data_metering="payg",
    data_enabled=True,
    national_roaming_enabled=False,
    limits=(("home", 10 * 1024 * 1024),),
)

SID_A = "DE" + "a" * 32
SID_B = "DE" + "b" * 32


def polled_state() -> FleetState:
    state = FleetState()
    rec = state.ensure(SID_A, {"site": "berlin"}, "pump-17")
    state.set_identity(
        SID_A, unique_name="sim-a", friendly_name=None, status="active", rate_plan_sid="WP1"
    )
    apply_listing(rec.account, [session("WN1", up=10, down=5, imei="490154203237518")])
    out = apply_listing(
        rec.account,
        [
            session("WN1", up=12, down=9, end=3600, imei="490154203237518"),
            session(
                "WN2",
                start=4000,
                up=3,
                down=1,
                updated=4100,
                loc=CellLocation(lat=52.52, lon=13.405),
                imei="356938035643809",
                radio="LTE-M",
            ),
        ],
    )
    state.record_success(SID_A, out, now=T0 + 5000)
    # usage: a baseline read, then day 9 revised upward and today's first record
    first = [usage(PERIOD + 9 * DAY, upload=100, download=300, total=400, commands_to_sim=1)]
    state.record_usage(SID_A, first, window_start=PERIOD, period=PERIOD, now=T0 + 5000)
    later = [
        usage(PERIOD + 9 * DAY, upload=150, download=350, total=500, commands_to_sim=2),
        usage(
            PERIOD + 10 * DAY,
            upload=10,
            download=20,
            total=30,
            home=30,
            billed=0.25,
            billing_units="USD",
            commands_from_sim=3,
        ),
    ]
    state.record_usage(SID_A, later, window_start=PERIOD, period=PERIOD, now=T0 + 5100)
    state.ensure(SID_B)  # never polled
    return state


# --------------------------------------------------------------- random histories


@dataclass
class Planned:
    """One session's life across listings, for the generator."""

    sid: str
    appear: int
    end_at: int | None
    vanish: int | None
    up_steps: list[int | None]


@dataclass
class Model:
    """The reference: what the counters must be, computed the simplest way."""

    started: int = 0
    ended: int = 0
    up: int = 0


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[list[DataSession]], Model]:
    n_listings = draw(st.integers(min_value=1, max_value=8))
    n_sessions = draw(st.integers(min_value=0, max_value=8))
    plans = []
    for i in range(n_sessions):
        appear = draw(st.integers(min_value=0, max_value=n_listings - 1))
        end_at = draw(st.one_of(st.none(), st.integers(min_value=appear, max_value=n_listings)))
        vanish = draw(
            st.one_of(
                st.none(),
                st.integers(min_value=max(appear + 1, end_at or 0), max_value=n_listings),
            )
        )
        steps = draw(
            st.lists(
                st.one_of(st.none(), st.integers(min_value=0, max_value=50)),
                min_size=n_listings,
                max_size=n_listings,
            )
        )
        plans.append(Planned(f"WN{i:032x}", appear, end_at, vanish, steps))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    rng = random.Random(seed)

    listings: list[list[DataSession]] = []
    model = Model()
    first_value: dict[str, int] = {}
    max_value: dict[str, int] = {}
    cumulative = {p.sid: 0 for p in plans}
    for k in range(n_listings):
        listing: list[DataSession] = []
        for p in plans:
            step = p.up_steps[k]
            if step is not None:
                cumulative[p.sid] += step
            if k < p.appear or (p.vanish is not None and k >= p.vanish):
                continue
            ended = p.end_at is not None and k >= p.end_at
            value = None if step is None else cumulative[p.sid]
            copy = session(p.sid, start=p.appear, end=p.end_at if ended else None, up=value)
            listing.append(copy)
            if rng.random() < 0.3:  # the same session again on another page
                listing.append(copy)
            # reference model
            if p.sid not in first_value:
                first_value[p.sid] = (value or 0) if k == 0 else 0
                if k > 0:
                    model.started += 1
                    if ended:
                        model.ended += 1
            elif ended and not (p.end_at is not None and k - 1 >= p.end_at):
                model.ended += 1
            if value is not None:
                max_value[p.sid] = max(max_value.get(p.sid, 0), value)
        rng.shuffle(listing)
        listings.append(listing)
    model.up = sum(max(0, max_value.get(sid, 0) - base) for sid, base in first_value.items())
    return listings, model
