"""deploy/kubernetes/'s manifests as data, for the tests that check them offline (test_kubernetes) and
against the running image (test_container)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
KSERVE_API = "serving.kserve.io/v1beta1"

Doc = dict[str, Any]


def documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def manifest_files() -> list[Path]:
    """Every manifest; prometheus-adapter/values.yaml (Helm values, not a resource) sits in a subfolder."""
    return sorted(DEPLOY.glob("*.yaml"))


def plain_files() -> list[Path]:
    """The manifests of Kubernetes' own kinds (all but KServe's)."""
    return [p for p in manifest_files() if all(d["apiVersion"] != KSERVE_API for d in documents(p))]


def of_kind(kind: str) -> list[Doc]:
    return [d for p in manifest_files() for d in documents(p) if d["kind"] == kind]


def the(kind: str) -> Doc:
    (doc,) = of_kind(kind)
    return doc


def deployments() -> dict[str, Doc]:
    """The Deployments by file: deployment.yaml (CPU) and deployment-gpu.yaml."""
    return {p.name: d for p in manifest_files() for d in documents(p) if d["kind"] == "Deployment"}


def pod_specs() -> dict[str, Doc]:
    """Every pod spec by file: the Deployments' templates and the InferenceService's predictor."""
    pods = {name: d["spec"]["template"]["spec"] for name, d in deployments().items()}
    return pods | {"inferenceservice.yaml": the("InferenceService")["spec"]["predictor"]}


def container(pod: Doc) -> Doc:
    (only,) = pod["containers"]
    return only


def env(c: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def named_ports(c: Doc) -> dict[str, int]:
    """A container's ports by name."""
    return {p["name"]: int(p["containerPort"]) for p in c["ports"]}


def cpu_container() -> Doc:
    """deployment.yaml's container: the settings and ports the running image must honour."""
    return container(deployments()["deployment.yaml"]["spec"]["template"]["spec"])


def hpa_custom_metric() -> str:
    (pods,) = [m["pods"] for m in the("HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"]
    return pods["metric"]["name"]
