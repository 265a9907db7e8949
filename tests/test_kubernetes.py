"""deploy/kubernetes/ checked without a cluster: against the schemas Kubernetes and KServe validate with,
against the code the manifests name (paths, ports, settings, drain time, metrics), and against a real
server answering their probes.

kubernetes-validate bundles Kubernetes' JSON schemas; KServe's InferenceService schema is vendored
(deploy/kubernetes/schemas/SOURCE.md). Both refuse unknown fields, as `kubectl apply` does by default, so
a misspelt field fails here instead of being dropped by the API server.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from imgclf.cli.serve import serve
from imgclf.devserver import running_server
from service.http.routes import table
from service.http.v2.grpc_server import GrpcFront
from service.http.v2.route import Route, match
from service.settings import Settings, env_name
from tests.support import ROOT
from tests.support.manifests import (
    DEPLOY,
    Doc,
    container,
    deployments,
    documents,
    env,
    hpa_custom_metric,
    plain_files,
    pod_specs,
    the,
)
from tests.support.servers import classify

KUBE_VERSION = "1.31.0"  # pinned: a newer kubernetes-validate (it bundles 1.x schemas up to its own version)
# cannot change the verdict, and clusters this old must still take the manifests
KSERVE_SCHEMA = DEPLOY / "schemas" / "inferenceservice-v1beta1.json"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
READINESS = "/readyz"  # the route table's ReadyRoute: 200 once every model is loaded and warmed up
LIVENESS = "/livez"  # BentoML's own
KSERVE_READY, KSERVE_LIVE = "/v2/health/ready", "/v2/health/live"  # the Open Inference Protocol's
KSERVE_MODELS = "/mnt/models"  # where KServe puts what STORAGE_URI names
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def cores(quantity: str | int) -> float:
    """A Kubernetes CPU quantity in cores: ``2`` or ``"500m"``."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def serve_port() -> int:
    """`imgclf serve`'s port, BentoML's default too: what the image listens on."""
    return inspect.signature(serve).parameters["port"].default


def closed(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server does under `kubectl apply`'s default
    strict field validation (a CRD's structural schema only prunes them, which jsonschema would accept)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@cache
def kserve_validator() -> jsonschema.Draft4Validator:
    """OpenAPI 3.0 schemas are JSON Schema draft 4 in what a CRD uses (boolean exclusiveMinimum and all)."""
    schema = closed(json.loads(KSERVE_SCHEMA.read_text(encoding="utf-8")))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def kserve_errors(doc: Doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in kserve_validator().iter_errors(doc)]


def kubernetes_validate_cli() -> Path:
    """The console script of this environment (the command deploy/kubernetes/README.md shows)."""
    return Path(sys.executable).with_name("kubernetes-validate")


# --- schemas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", plain_files(), ids=lambda p: p.name)
def test_plain_manifests_validate_against_kubernetes_schemas(path: Path) -> None:
    """Strict: an unknown field is an error, and a kind without a schema raises SchemaNotFoundError."""
    for doc in documents(path):
        assert kubernetes_validate.validate(doc, KUBE_VERSION, strict=True) == "1.31"


def test_the_inference_service_validates_against_kserves_crd_schema() -> None:
    assert kserve_errors(the("InferenceService")) == []


def test_broken_manifests_are_refused() -> None:
    """Each validator refuses a misspelt field and a wrong type: the checks above cannot pass silently."""
    deployment = copy.deepcopy(deployments()["deployment.yaml"])
    probe = container(deployment["spec"]["template"]["spec"])["readinessProbe"]["httpGet"]
    probe["paht"] = probe.pop("path")
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    service = copy.deepcopy(the("Service"))
    service["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError, match="'http' is not of type 'integer'"):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)

    isvc = copy.deepcopy(the("InferenceService"))
    predictor = isvc["spec"]["predictor"]
    predictor["containres"] = predictor.pop("containers")
    assert kserve_errors(isvc) == [
        "spec.predictor: Additional properties are not allowed ('containres' was unexpected)"]
    isvc = copy.deepcopy(the("InferenceService"))
    container(isvc["spec"]["predictor"])["ports"][0]["containerPort"] = "3000"
    assert kserve_errors(isvc) == ["spec.predictor.containers.0.ports.0.containerPort: '3000' is not of type 'integer'"]


def test_the_cli_passes_the_manifests_and_fails_a_broken_copy(tmp_path: Path) -> None:
    """The command in deploy/kubernetes/README.md, as a user runs it."""
    command = [str(kubernetes_validate_cli()), "--strict", "-k", KUBE_VERSION]
    files = plain_files()
    good = subprocess.run([*command, *map(str, files)], check=False, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count(" passed for resource ") == sum(len(documents(p)) for p in files), good.stdout

    broken = tmp_path / "deployment.yaml"
    text = (DEPLOY / "deployment.yaml").read_text(encoding="utf-8")
    broken.write_text(text.replace("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true"), encoding="utf-8")
    bad = subprocess.run([*command, str(broken)], check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "did not validate" in bad.stdout and "'readOnlyRootFileSystem' was unexpected" in bad.stdout, bad.stdout


# --- the manifests against the code --------------------------------------------------------------------


def test_every_imgclf_variable_is_a_setting_and_its_value_parses() -> None:
    """IMGCLF_FOO must be Settings' field ``foo`` (the service refuses to start on an unknown or bad one)."""
    for name, pod in pod_specs().items():
        variables = env(container(pod))
        unknown = [v for v in variables if v.startswith("IMGCLF_")
                   and not (v.removeprefix("IMGCLF_").lower() in Settings.model_fields
                            and env_name(v.removeprefix("IMGCLF_").lower()) == v)]
        assert unknown == [], name
        Settings.from_env(variables)  # a bad value raises, naming the variable


def test_probes_name_the_services_health_paths() -> None:
    """Deployments: BentoML's /livez and imgclf's /readyz; KServe: the V2 health paths imgclf answers."""
    assert 'Endpoint("/readyz", ReadyRoute(' in inspect.getsource(table)
    assert match(KSERVE_READY) == Route("ready") and match(KSERVE_LIVE) == Route("live")
    plain = {"startupProbe": LIVENESS, "readinessProbe": READINESS, "livenessProbe": LIVENESS}
    kserve = {"startupProbe": KSERVE_LIVE, "readinessProbe": KSERVE_READY, "livenessProbe": KSERVE_LIVE}
    for name, pod in pod_specs().items():
        c = container(pod)
        expected = kserve if name == "inferenceservice.yaml" else plain
        assert {probe: c[probe]["httpGet"]["path"] for probe in PROBES} == expected, name
        http = next(p for p in c["ports"] if p["containerPort"] == serve_port())
        assert {c[probe]["httpGet"]["port"] for probe in PROBES} <= {http.get("name"), http["containerPort"]}, name


def test_ports_agree_with_the_service_and_the_settings() -> None:
    """HTTP on the serving port; gRPC on IMGCLF_GRPC_PORT (off by default, so set where a port is open)."""
    for name, deployment in deployments().items():
        pod = deployment["spec"]["template"]
        c = container(pod["spec"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": serve_port(), "grpc": int(env(c)["IMGCLF_GRPC_PORT"])}, name
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"]), name
        service = {p["targetPort"]: p["port"] for p in the("Service")["spec"]["ports"]}
        assert service == ports, name  # the same numbers inside and outside: port-forward and docs agree
    isvc = container(the("InferenceService")["spec"]["predictor"])
    assert isvc["name"] == "kserve-container"  # KServe finds the predictor's container by this name
    assert isvc["ports"] == [{"containerPort": serve_port(), "protocol": "TCP"}]
    assert "IMGCLF_GRPC_PORT" not in env(isvc)  # KServe routes one port; gRPC would listen unreachable


def test_the_service_pdb_and_hpa_select_the_deployments_pods() -> None:
    for name, deployment in deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert the("Service")["spec"]["selector"].items() <= labels.items(), name
        assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        target = the("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
        assert "replicas" not in deployment["spec"], name  # the HPA owns it; apply would reset it


def test_the_pods_run_as_the_compose_file_runs_them() -> None:
    """The image and user of docker-compose.yml, read-only root, no capabilities, no escalation."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    cpu, gpu = compose["classifier"]["image"], compose["classifier-gpu"]["image"]
    images = {"deployment.yaml": cpu, "deployment-gpu.yaml": gpu, "inferenceservice.yaml": cpu}
    uid = int(compose["classifier"]["user"].split(":")[0])
    for name, pod in pod_specs().items():
        c = container(pod)
        assert c["image"] == images[name], name
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid, name
        assert c["securityContext"] == {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid,
                                        "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}}, name


def test_models_are_read_only_and_scratch_space_is_writable() -> None:
    """The repository where IMGCLF_MODEL_REPO says, read-only; BENTOML_HOME, TMPDIR and /tmp on emptyDirs."""
    claim = the("PersistentVolumeClaim")["metadata"]["name"]
    for name, pod in pod_specs().items():
        c = container(pod)
        variables = env(c)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in (variables["BENTOML_HOME"], variables["TMPDIR"], "/tmp"):
            assert "emptyDir" in volumes[mounts[path]["name"]] and not mounts[path].get("readOnly"), (name, path)
        if name == "inferenceservice.yaml":  # KServe mounts the claim itself (read-only by default)
            assert variables["IMGCLF_MODEL_REPO"] == KSERVE_MODELS
            assert variables["STORAGE_URI"] == f"pvc://{claim}"
            continue
        models = mounts[variables["IMGCLF_MODEL_REPO"]]
        assert models["readOnly"] is True, name
        assert volumes[models["name"]]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}, name


def test_workers_match_the_cpu_limit() -> None:
    """IMGCLF_WORKERS=0 would start one worker per core of the node: a CPU limit does not shrink affinity."""
    for name, pod in pod_specs().items():
        c = container(pod)
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert requests == limits, name  # Guaranteed QoS
        assert Settings.from_env(env(c)).workers == cores(limits["cpu"]), name
        assert "memory" in limits, name


def test_the_gpu_variant_asks_for_one_gpu_and_cuda() -> None:
    gpu, cpu = deployments()["deployment-gpu.yaml"], deployments()["deployment.yaml"]
    pod = gpu["spec"]["template"]["spec"]
    c = container(pod)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert Settings.from_env(env(c)).device == "cuda"  # a missing CUDA provider is a start-up error
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert Settings.from_env(env(container(cpu["spec"]["template"]["spec"]))).device == "cpu"
    assert gpu["metadata"]["name"] == cpu["metadata"]["name"]  # a replacement: the Service, PDB and HPA apply


def test_the_drain_outlasts_the_services_shutdown() -> None:
    """terminationGracePeriodSeconds covers preStop, the requests in flight (each ends within
    IMGCLF_TIMEOUT_S) and the gRPC server's grace, with a margin of at most 10 s."""
    grpc_grace_s = inspect.signature(GrpcFront.stop).parameters["grace_s"].default
    for name, pod in pod_specs().items():
        c = container(pod)
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", name
        settings = Settings.from_env(env(c))
        needed = float(command[1]) + settings.timeout_s + (grpc_grace_s if settings.grpc_port else 0.0)
        assert needed < pod["terminationGracePeriodSeconds"] <= needed + 10, name


def bentoml_in_progress_gauge() -> str:
    """The name of BentoML's requests-in-progress gauge for a service like ours (its metrics namespace, from
    BentoML's default configuration, + the gauge's name in its HTTP metrics middleware)."""
    config = resources.files("bentoml._internal.configuration.v2").joinpath("default_configuration.yaml")
    namespace = yaml.safe_load(config.read_text(encoding="utf-8"))["services"]["metrics"]["namespace"]
    return f"{namespace}_request_in_progress"


def test_the_hpa_scales_on_a_metric_the_adapter_serves_from_the_service() -> None:
    """HPA metric == the adapter rule's name == a series the service exports; CPU is the fallback."""
    metrics = the("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                      "averageUtilization": 70}}} in metrics
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))["rules"]["custom"]
    series = re.match(r"\w+", rule["seriesQuery"]).group()
    assert rule["name"]["as"] == hpa_custom_metric() == series == bentoml_in_progress_gauge()
    assert re.fullmatch(rule["name"]["matches"], series)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a Pods metric needs both


# --- a real server -------------------------------------------------------------------------------------


def probe_paths() -> set[str]:
    return {container(pod)[probe]["httpGet"]["path"] for pod in pod_specs().values() for probe in PROBES}


@pytest.mark.slow
def test_a_real_server_answers_every_probe_and_exports_the_hpa_metric(imagenet_repo: Path, tmp_path: Path) -> None:
    """Once ready, every probe path in the manifests answers 200, and after one request /metrics carries
    the HPA's series (BentoML makes a labelled series on an endpoint's first request)."""
    paths = sorted(probe_paths())
    with running_server(imagenet_repo, tmp_path / "home", {"IMGCLF_WORKERS": "1"}) as server:
        answers = {path: server.client.get(path).status_code for path in paths}
        assert classify(server.client).status_code == 200
        exported = server.client.get("/metrics").text
    assert answers == dict.fromkeys(paths, 200)
    assert re.search(rf'^{hpa_custom_metric()}\{{[^}}]*endpoint="/classify"', exported, re.MULTILINE), exported[:3000]
