"""Shared helpers for the simulator's tests: OpenAPI validation, HTTP helpers, fixtures' bodies."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from openapi_schema_validator import OAS30Validator, oas30_format_checker

from twilio_wireless_simulator import (
    DEMO_ACCOUNT_SID,
    DEMO_AUTH_TOKEN,
    RunningSimulator,
    SimulatorConfig,
    start_simulator,
)

OPENAPI_PATH = Path(__file__).parent / "openapi" / "twilio_wireless_v1.json"
KORE_OPENAPI_PATH = Path(__file__).parent / "openapi" / "kore-programmable-wireless-v1.json"
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")

#: Twilio's error body (the OpenAPI file does not describe error responses).
TWILIO_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["code", "message", "more_info", "status"],
    "additionalProperties": False,
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string", "minLength": 1},
        "more_info": {"type": "string", "pattern": r"^https://www\.twilio\.com/docs/errors/\d+$"},
        "status": {"type": "integer"},
    },
}

#: KORE-style OAuth2 error body.
OAUTH_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "error_description"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}

TOKEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["access_token", "expires_in", "token_type", "scope"],
    "properties": {
        "access_token": {"type": "string", "minLength": 16},
        "expires_in": {"type": "string", "pattern": r"^\d+$"},
        "token_type": {"type": "string", "enum": ["Bearer"]},
        "scope": {"type": "string"},
    },
}


@cache
def openapi() -> dict[str, Any]:
    """The vendored OpenAPI document."""
    doc: dict[str, Any] = json.loads(OPENAPI_PATH.read_text())
    return doc


def _inline(node: Any, components: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            prefix = "#/components/schemas/"
            assert ref.startswith(prefix), ref
            target = _inline(copy.deepcopy(components[ref[len(prefix) :]]), components)
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return {**target, **extra}
        return {k: _inline(v, components) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, components) for v in node]
    return node


def _known_spec_fixes(schema: dict[str, Any]) -> dict[str, Any]:
    """Adjust the one known defect of the published descriptions, explicitly.

    ``reset_status`` references ``sim_enum_reset_status`` (``enum: [resetting]``) without
    ``nullable``, yet the description itself says the value "Can be: null or resetting" and its
    own ``fetch`` example has ``"reset_status": null``; the live API returns null. KORE's
    ``SimResourceResetStatus`` says ``nullable`` but leaves null out of its ``enum``, which
    OpenAPI 3.0 validators read as "never null": the same fix serves both.
    """
    props = schema.get("properties", {})
    if "reset_status" in props:
        props["reset_status"] = {**props["reset_status"], "nullable": True}
        props["reset_status"]["enum"] = [*props["reset_status"]["enum"], None]
    items = props.get("sims", {}).get("items")
    if items is not None:
        _known_spec_fixes(items)
    return schema


@cache
def response_schema(path: str, status: int = 200) -> dict[str, Any]:
    """The resolved JSON schema of a GET response of ``path`` (as written in the OpenAPI file)."""
    doc = openapi()
    operation = doc["paths"][path]["get"]
    media = operation["responses"][str(status)]["content"]["application/json"]
    resolved = _inline(copy.deepcopy(media["schema"]), doc["components"]["schemas"])
    return _known_spec_fixes(resolved)


@cache
def kore_openapi() -> dict[str, Any]:
    """KORE's vendored OpenAPI document (it types the usage records Twilio's leaves open)."""
    doc: dict[str, Any] = json.loads(KORE_OPENAPI_PATH.read_text())
    return doc


def _kore_known_spec_fixes(schema: dict[str, Any]) -> dict[str, Any]:
    """Adjust the two known defects of KORE's description that the simulator meets, explicitly.

    ``ListMeta`` (the ``meta`` of both usage lists) requires ``list_key`` and ``direct_token``,
    names that are not among its own properties, and types ``next_page_url`` and
    ``previous_page_url`` as non-null strings, while every other list of the same description
    (DataSessions, Sims, RatePlans, Commands) declares the Twilio meta with ``key`` and nullable
    page URLs, and a last page has no next one. The usage lists are checked against that meta.

    ``reset_status`` is ``nullable`` but its ``enum`` lists only ``resetting``, though its own
    text says "Can be: null or resetting": as for Twilio's description, null joins the enum.
    """
    meta = schema.get("properties", {}).get("meta")
    if meta is not None and "required" in meta:
        meta["required"] = [name for name in meta["required"] if name in meta["properties"]]
        for name in ("next_page_url", "previous_page_url"):
            meta["properties"][name] = {**meta["properties"][name], "nullable": True}
    props = schema.get("properties", {})
    reset = props.get("reset_status")
    if reset is not None and None not in reset.get("enum", [None]):
        props["reset_status"] = {**reset, "enum": [*reset["enum"], None]}
    items = props.get("sims", {}).get("items")
    if items is not None:
        _kore_known_spec_fixes(items)
    return schema


@cache
def kore_response_schema(path: str, status: int = 200) -> dict[str, Any]:
    """The resolved JSON schema of a GET response of ``path`` in KORE's description."""
    doc = kore_openapi()
    media = doc["paths"][path]["get"]["responses"][str(status)]["content"]["application/json"]
    resolved = _inline(copy.deepcopy(media["schema"]), doc["components"]["schemas"])
    return _kore_known_spec_fixes(_known_spec_fixes(resolved))


def validate(schema: Mapping[str, Any], body: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``body`` matches ``schema`` (OAS 3.0 rules)."""
    OAS30Validator(dict(schema), format_checker=oas30_format_checker).validate(body)


def validate_list_page(path: str, body: Any, key: str) -> None:
    """Validate a list page against the OpenAPI schema plus what the schema leaves implicit."""
    validate(response_schema(path), body)
    assert set(body) == {key, "meta"}, set(body)
    meta = body["meta"]
    assert set(meta) == {
        "first_page_url",
        "key",
        "next_page_url",
        "page",
        "page_size",
        "previous_page_url",
        "url",
    }
    assert meta["key"] == key
    for name in ("first_page_url", "url", "next_page_url", "previous_page_url"):
        value = meta[name]
        if value is not None:
            assert_absolute_url(value)


def validate_session(session: Mapping[str, Any]) -> None:
    """What the schema cannot say about one DataSession."""
    expected = set(
        response_schema("/v1/Sims/{SimSid}/DataSessions")["properties"]["data_sessions"]["items"][
            "properties"
        ]
    )
    assert set(session) == expected, set(session) ^ expected
    for name in ("start", "last_updated"):
        assert isinstance(session[name], str), session
        assert ISO_UTC.match(session[name]), session
    assert session["end"] is None or ISO_UTC.match(session["end"]), session
    loc = session["cell_location_estimate"]
    assert (
        loc is None
        or loc == {}
        or (set(loc) == {"lat", "lon"} and all(isinstance(loc[k], float) for k in loc))
    ), loc
    imei = session["imei"]
    assert imei is None or (len(imei) == 15 and imei.isdigit()), imei
    assert session["sid"].startswith("WN")
    assert len(session["sid"]) == 34
    assert isinstance(session["packets_uploaded"], int)
    assert session["packets_uploaded"] >= 0
    assert isinstance(session["packets_downloaded"], int)
    assert session["packets_downloaded"] >= 0
    if session["end"] is not None:
        assert session["start"] <= session["end"]
    assert session["start"] <= session["last_updated"]


def assert_absolute_url(url: str) -> None:
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https"), url
    assert parts.netloc, url


def basic(login: str = DEMO_ACCOUNT_SID, password: str = DEMO_AUTH_TOKEN) -> dict[str, str]:
    """An ``Authorization: Basic`` header."""
    raw = base64.b64encode(f"{login}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def get_json(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """GET ``url`` with demo Basic auth unless ``headers`` are given; (status, JSON, response)."""
    async with session.get(url, headers=basic() if headers is None else headers) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw), resp


async def list_all(
    session: aiohttp.ClientSession,
    first_url: str,
    key: str,
    headers: Mapping[str, str] | None = None,
    path: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Follow ``next_page_url`` from ``first_url``; (all items, number of pages). Validates pages."""
    items: list[dict[str, Any]] = []
    url: str | None = first_url
    pages = 0
    while url is not None:
        status, body, _ = await get_json(session, url, headers)
        assert status == 200, body
        if path is not None:
            validate_list_page(path, body, key)
        items.extend(body[key])
        assert body["meta"]["page"] == pages
        url = body["meta"]["next_page_url"]
        pages += 1
        assert pages < 10_000
    return items, pages


@asynccontextmanager
async def running(
    config: SimulatorConfig | None = None,
) -> AsyncIterator[tuple[RunningSimulator, aiohttp.ClientSession]]:
    """A simulator on a free port and a client session for it."""
    async with start_simulator(config or SimulatorConfig()) as sim, aiohttp.ClientSession() as http:
        yield sim, http


async def until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (fails after ``limit`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)
