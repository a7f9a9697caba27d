"""Typed records of the Twilio Wireless v1 API, decoded once from the wire.

The shapes follow Twilio's OpenAPI description (``wireless.v1.sim.data_session`` and
``wireless.v1.sim``): every DataSession field is nullable, unknown fields are ignored, and
timestamps are decoded to timezone-aware ``datetime`` objects by msgspec (ISO 8601, UTC).
A page that does not match these shapes raises ``msgspec.ValidationError`` /
``msgspec.DecodeError``, which the transport turns into one ``ApiError`` for that poll.
"""

from __future__ import annotations

from datetime import datetime

import msgspec


class CellLocation(msgspec.Struct, frozen=True):
    """``cell_location_estimate``: ``{}`` or ``{"lat": ..., "lon": ...}``."""

    lat: float | None = None
    lon: float | None = None


class DataSession(msgspec.Struct, frozen=True):
    sid: str | None = None
    sim_sid: str | None = None
    account_sid: str | None = None
    radio_link: str | None = None
    operator_mcc: str | None = None
    operator_mnc: str | None = None
    operator_country: str | None = None
    operator_name: str | None = None
    cell_id: str | None = None
    cell_location_estimate: CellLocation | None = None
    packets_uploaded: int | None = None
    packets_downloaded: int | None = None
    last_updated: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None
    imei: str | None = None


class PageMeta(msgspec.Struct, frozen=True):
    """``meta`` of a list page. Only ``next_page_url`` drives paging."""

    next_page_url: str | None = None
    key: str | None = None
    page: int | None = None
    page_size: int | None = None
    url: str | None = None


class DataSessionPage(msgspec.Struct, frozen=True):
    data_sessions: list[DataSession]
    meta: PageMeta


class Sim(msgspec.Struct, frozen=True):
    sid: str
    unique_name: str | None = None
    friendly_name: str | None = None
    status: str | None = None
    rate_plan_sid: str | None = None
    account_sid: str | None = None


class SimPage(msgspec.Struct, frozen=True):
    sims: list[Sim]
    meta: PageMeta


class TwilioErrorBody(msgspec.Struct, frozen=True):
    """Twilio's JSON error body; KORE's may differ, so every field is optional."""

    code: int | None = None
    message: str | None = None
    more_info: str | None = None
    status: int | None = None
