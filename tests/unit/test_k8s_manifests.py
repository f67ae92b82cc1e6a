"""deploy/k8s: every object validates against its schema (Kubernetes' own, from
kubernetes-validate; KEDA's CRDs, vendored from KEDA v2.20.2 under tests/k8s_schemas), the
overlays patch objects that exist, and the worker's settings fit the cluster's bounds."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from completion_queue import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "tests" / "k8s_schemas"
#: The oldest Kubernetes the manifests target (KEDA 2.20 supports 1.32 on).
KUBE_VERSION = "1.32.0"
KEDA_CRDS = {
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
}
LAYERS = [K8S / "base", K8S / "overlays" / "example", K8S / "overlays" / "production"]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(layer: Path) -> dict[str, Any]:
    (doc,) = documents(layer / "kustomization.yaml")
    return doc


def resources(layer: Path) -> list[dict[str, Any]]:
    """The objects ``layer`` lists, those of the layers it builds on included."""
    found = []
    for entry in kustomization(layer).get("resources", []):
        path = (layer / entry).resolve()
        found += resources(path) if path.is_dir() else documents(path)
    return found


def own_files(layer: Path) -> list[Path]:
    return [layer / e for e in kustomization(layer).get("resources", []) if (layer / e).is_file()]


@cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    (crd,) = documents(SCHEMAS / KEDA_CRDS[kind])
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields of ``value`` its schema does not name (a CRD schema leaves typos unchecked)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, list):
        return [
            f
            for i, item in enumerate(value)
            for f in unknown_fields(item, schema.get("items", {}), f"{where}[{i}]")
        ]
    if not isinstance(value, dict) or "properties" not in schema:
        return []
    found = []
    for key, item in value.items():
        if key in schema["properties"]:
            found += unknown_fields(item, schema["properties"][key], f"{where}.{key}")
        elif "additionalProperties" not in schema:
            found.append(f"{where}.{key}")
    return found


def validate(obj: dict[str, Any]) -> None:
    group, _, version = obj["apiVersion"].rpartition("/")
    if group == "keda.sh":
        schema = crd_schema(obj["kind"], version)
        jsonschema.validate(obj, schema)
        assert not unknown_fields(obj, schema), f"{obj['kind']}: unknown fields"
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("layer", LAYERS, ids=lambda p: p.name)
def test_every_object_validates_against_its_schema(layer: Path) -> None:
    for obj in [doc for path in own_files(layer) for doc in documents(path)]:
        validate(obj)


def test_a_misspelt_field_fails_either_validator() -> None:
    objects = resources(K8S / "base")
    deployment = named(objects, "Deployment", "cq-worker")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 630
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = named(objects, "ScaledObject", "cq-worker")
    scaled["spec"]["cooldown"] = 1200
    with pytest.raises(AssertionError, match="unknown fields"):
        validate(scaled)
    scaled["spec"].pop("cooldown")
    scaled["spec"]["minReplicaCount"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


@pytest.mark.parametrize("layer", LAYERS[1:], ids=lambda p: p.name)
def test_overlay_patches_target_objects_they_build_on(layer: Path) -> None:
    built = {(o["kind"], o["metadata"]["name"]) for o in resources(layer)}
    patches = kustomization(layer).get("patches", [])
    for patch in patches:
        for doc in documents(layer / patch["path"]):
            assert (doc["kind"], doc["metadata"]["name"]) in built, patch["path"]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (its kustomize) not installed")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda p: p.name)
def test_built_kustomizations_validate(layer: Path) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(layer)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    for obj in objects:
        validate(obj)
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "completion-queue"
    }


def worker_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = named(objects, "Deployment", "cq-worker")["spec"]["template"]["spec"][
        "containers"
    ]
    return container


def test_worker_grace_period_covers_the_drain_bound() -> None:
    objects = resources(K8S / "base")
    pod = named(objects, "Deployment", "cq-worker")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in worker_container(objects)["env"]}
    default_drain_s = getattr(Settings(), "drain_s", 600)
    # The worker is told the default drain bound, and the pod waits for it and a margin
    assert float(env["CQ_DRAIN_S"]) == default_drain_s
    assert pod["terminationGracePeriodSeconds"] >= default_drain_s + 30


def test_worker_readiness_waits_out_a_model_load() -> None:
    container = worker_container(resources(K8S / "base"))
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/metrics"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert startup["httpGet"]["port"] == "metrics"
    assert container["ports"] == [{"name": "metrics", "containerPort": int(env["CQ_METRICS_PORT"])}]
    assert env["CQ_METRICS_ADDRESS"] == "0.0.0.0"
    load_s = Settings.model_fields["model_load_timeout_s"].default
    assert startup["periodSeconds"] * startup["failureThreshold"] >= load_s
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_keda_scales_the_workers_from_zero_on_the_models_backlog() -> None:
    objects = resources(K8S / "base")
    scaled = named(objects, "ScaledObject", "cq-worker")["spec"]
    model = named(objects, "ConfigMap", "cq-config")["data"]["CQ_MODEL"]
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "metrics-api"
    assert meta["url"].endswith(f":8000/backlog/{model}")
    assert meta["url"].startswith("http://cq-api.")
    assert (meta["valueLocation"], meta["targetValue"], meta["activationTargetValue"]) == (
        "desired_workers",
        "1",
        "0",
    )
    assert named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    # From zero, with a cooldown longer than a model load, and down one pod at a time
    assert scaled["minReplicaCount"] == 0
    load_s = Settings.model_fields["model_load_timeout_s"].default
    assert scaled["cooldownPeriod"] > load_s
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert [(p["type"], p["value"]) for p in down["policies"]] == [("Pods", 1)]
