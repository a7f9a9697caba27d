"""Shared fixtures: a real simulator on port 0, exporters wired to it with a manual clock, and a
directory of self-signed certificates. Helpers that are not fixtures live in ``*_support.py``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from hypothesis import settings

from tests.harness_support import Harness, MakeHarness, exporter_mapping, serving
from tests.tls_support import make_cert
from twilio_wireless_exporter.cli import drop_created_samples
from twilio_wireless_exporter.clock import ManualClock
from twilio_wireless_exporter.config import Config, config_from_mapping
from twilio_wireless_simulator import RunningSimulator, SimulatorConfig, start_simulator

# CI runs the property tests with a fixed seed (reproducible runs); developers get fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``cli.main()`` replaces the root logger's handlers and level; put them back after a test."""
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    handlers, level, access_level = root.handlers[:], root.level, access.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.setLevel(access_level)


@pytest.fixture(scope="session")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``server.crt``/``server.key`` and ``other.crt``/``other.key``: self-signed for localhost
    and 127.0.0.1, made once per run (openssl is slow enough to matter)."""
    directory = tmp_path_factory.mktemp("certs")
    make_cert(directory)
    make_cert(directory, "other")
    return directory


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port where every connection is refused: a socket is bound to it (so no other
    process can take it while the test runs) but never listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """An empty, script-only simulated fleet on a manual clock."""
    async with start_simulator(SimulatorConfig(sims=0, seed=7), host="127.0.0.1", port=0) as s:
        yield s


@pytest.fixture
async def harness(sim: RunningSimulator) -> AsyncIterator[MakeHarness]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(sids: list[str], config: Config | None = None, **sections: Any) -> Harness:
            mapping = exporter_mapping(sim.url, sids, **sections)
            cfg = config or config_from_mapping(mapping, environ={})
            clock = ManualClock()
            sleeps: list[float] = []

            async def record_sleep(seconds: float) -> None:
                sleeps.append(seconds)

            exporter, client = await stack.enter_async_context(
                serving(cfg, clock, retry_sleep=record_sleep)
            )
            h = Harness(exporter, client, clock)
            h.sleeps = sleeps
            return h

        yield make


@pytest.fixture
def created_samples_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``*_created`` samples off as the command switches them off, restored after the test
    (the switch is process-wide: ``prometheus_client`` keeps it in a module global). A test
    that compares two renderings needs it: each registry's ``_created`` is its own moment."""
    metrics = prometheus_client.metrics
    monkeypatch.setattr(metrics, "_use_created", metrics._use_created)
    drop_created_samples()
