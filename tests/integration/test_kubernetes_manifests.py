"""The Kubernetes manifests (deploy/kubernetes): both overlays rendered by the real kustomize, every
object checked offline against the Kubernetes API schemas (kubernetes-validate) or its CRD's own
OpenAPI schema (KEDA's and Prometheus Operator's, from their pinned Go modules), then the behaviour
the deployment relies on asserted on what was rendered: probes, shutdown timing, rollout, device
placement, security, mounted credentials, selectors, network policy, autoscaling on the queue."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from sidecar.config import Settings
from tests.integration.go_tools import GoTool, go_module_dir, go_tool_binary

pytestmark = pytest.mark.integration

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
NAME = "opensearch-rerank-sidecar"
CONTAINER = "sidecar"
QUEUE_METRIC = "sidecar_rerank_queue_depth"
# The oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default from
# 1.30) and the newest whose schemas kubernetes-validate bundles: both must accept every object.
KUBERNETES_VERSIONS = ("1.30", "1.37")
STARTUP_BUDGET_S = 300  # model download and warm-up, before the kubelet gives up on a pod


# --- Pinned Go tools ----------------------------------------------------------------------------

KUSTOMIZE = GoTool(
    "kustomize",
    "sigs.k8s.io/kustomize/kustomize/v5",
    # The newest release that builds with this machine's Go 1.26 (v5.8.3 asks for Go 1.27).
    "v5.8.2",
    binary="kustomize",
    override="KUSTOMIZE_BIN",
)


# --- CRD schemas ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrdSource:
    module: str
    version: str
    path: str


CRDS: dict[tuple[str, str], CrdSource] = {
    ("keda.sh/v1alpha1", "ScaledObject"): CrdSource(
        "github.com/kedacore/keda/v2", "v2.21.0", "config/crd/bases/keda.sh_scaledobjects.yaml"
    ),
    # The newest version of the operator's root module that the Go module proxy serves.
    ("monitoring.coreos.com/v1", "ServiceMonitor"): CrdSource(
        "github.com/prometheus-operator/prometheus-operator",
        "v0.85.0",
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    ),
}
# Semantics of x-kubernetes-* keys that the conversion below carries over or can ignore.
_KNOWN_EXTENSIONS = {
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    # CEL rules; not evaluated here (ScaledObject's one, min <= max replicas, is asserted below).
    "x-kubernetes-validations",
}


def structural_to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, as strict as the API server with
    field validation Strict (kubectl's default): unknown fields are errors, not pruned."""
    unknown = {k for k in node if k.startswith("x-kubernetes-")} - _KNOWN_EXTENSIONS
    if unknown:
        raise ValueError(f"cannot convert a schema using {sorted(unknown)}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural_to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_json_schema(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _object_meta(version: str) -> tuple[dict[str, Any], Registry]:
    """kubernetes-validate's strict ObjectMeta schema for `version`, with its definitions."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    schemas = folder / f"v{version}.0-local-strict"
    meta = json.loads((schemas / "objectmeta-meta-v1.json").read_text())
    definitions = json.loads((schemas / "_definitions.json").read_text())
    registry: Registry = Resource.from_contents(meta) @ Registry()
    return meta, Resource.from_contents(definitions) @ registry


@cache
def crd_validator(api_version: str, kind: str, k8s_version: str) -> jsonschema.Validator:
    """A validator for `kind` objects from its CRD's schema of that served version; metadata is
    checked as ObjectMeta of `k8s_version`."""
    source = CRDS[(api_version, kind)]
    crd = yaml.safe_load((go_module_dir(source.module, source.version) / source.path).read_text())
    served = api_version.rpartition("/")[2]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == served and v["served"]]
    schema = structural_to_json_schema(entry["schema"]["openAPIV3Schema"])
    meta, registry = _object_meta(k8s_version)
    schema["properties"]["metadata"] = {"$ref": meta["$id"]}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --- Rendering and reading the rendered objects ---------------------------------------------------


def kustomize_build(kustomize: Path, directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory`, as objects. Fails the test with kustomize's own words."""
    built = subprocess.run(
        [str(kustomize), "build", str(directory)], capture_output=True, text=True, timeout=120
    )
    if built.returncode != 0:
        raise AssertionError(f"kustomize build {directory} failed:\n{built.stderr}")
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str = NAME) -> dict[str, Any]:
        (found,) = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        return found

    def configmap(self, name: str) -> dict[str, Any]:
        return self.one("ConfigMap", name)

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.deployment["spec"]["template"]["metadata"]["labels"]
        return labels

    @property
    def container(self) -> dict[str, Any]:
        (container,) = [c for c in self.pod["containers"] if c["name"] == CONTAINER]
        return container

    def volume_file(self, path: str) -> tuple[dict[str, Any], dict[str, Any], str]:
        """The mount holding `path` in the container, its volume, and the path inside it."""
        target = PurePosixPath(path)
        mounts = [
            m
            for m in self.container.get("volumeMounts", [])
            if target.is_relative_to(m["mountPath"]) and "subPath" not in m
        ]
        assert mounts, f"{path} is on no volume (the root filesystem is read-only)"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == mount["name"]]
        return mount, volume, str(target.relative_to(mount["mountPath"]))

    def file_source(self, path: str) -> tuple[str, str, str]:
        """(configMap or secret, its name, its key) of a file mounted from one of them."""
        _, volume, inside = self.volume_file(path)
        for kind, name_field in (("configMap", "name"), ("secret", "secretName")):
            if kind in volume:
                source = volume[kind]
                items = source.get("items")
                keys = [i["key"] for i in items if i["path"] == inside] if items else [inside]
                assert keys, f"{path}: no key of {kind} {source[name_field]} is mounted there"
                return kind, source[name_field], keys[0]
        raise AssertionError(f"{path} is on volume {volume['name']}, not a ConfigMap or Secret")

    def environment(self) -> dict[str, str]:
        """The container's variables as the kubelet sets them: envFrom ConfigMaps (which must be
        rendered too), then env; values from Secrets and resource fields as placeholders."""
        values: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            values.update(self.configmap(source["configMapRef"]["name"])["data"])
        for variable in self.container.get("env", []):
            if "value" in variable:
                values[variable["name"]] = variable["value"]
            elif ref := variable["valueFrom"].get("secretKeyRef"):
                values[variable["name"]] = f"secret:{ref['name']}/{ref['key']}"
            else:
                assert "resourceFieldRef" in variable["valueFrom"], variable
                values[variable["name"]] = "1"
        return values

    def settings(self, scratch: Path) -> Settings:
        """What the sidecar in this pod would run with: its environment through the real
        Settings.from_env, with the mounted profile file read from a copy in `scratch`."""
        environ = self.environment()
        kind, name, key = self.file_source(environ["SIDECAR_CONFIG_FILE"])
        assert kind == "configMap"
        copy_path = scratch / key
        copy_path.write_text(self.configmap(name)["data"][key])
        return Settings.from_env({**environ, "SIDECAR_CONFIG_FILE": str(copy_path)})


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions, or a plain map) against labels."""
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    required = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(k) != v for k, v in required.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return bool(required or selector.get("matchExpressions"))


def validate_against_schemas(rendered: Rendered) -> list[str]:
    """Every object against its schema for each of KUBERNETES_VERSIONS: its CRD's when it is a
    custom resource, else the Kubernetes API's (strict: unknown fields are errors). Returns
    the kinds seen; an object with neither schema fails."""
    failures = []
    for obj in rendered.objects:
        key = (obj["apiVersion"], obj["kind"])
        for version in KUBERNETES_VERSIONS:
            where = f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version})"
            try:
                if key in CRDS:
                    crd_validator(*key, version).validate(obj)
                else:
                    kubernetes_validate.validate(obj, version, strict=True)
            except jsonschema.ValidationError as error:
                failures.append(f"{where}: {error.json_path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                failures.append(f"{where}: {error.message}")
    assert not failures, "\n".join(failures)
    return sorted(o["kind"] for o in rendered.objects)


# --- Fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kustomize() -> Path:
    return go_tool_binary(KUSTOMIZE)


@pytest.fixture(scope="module")
def overlays(kustomize: Path) -> dict[str, Rendered]:
    return {
        name: Rendered(kustomize_build(kustomize, MANIFESTS / "overlays" / name))
        for name in OVERLAYS
    }


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, overlays: dict[str, Rendered]) -> Rendered:
    rendered: Rendered = overlays[request.param]
    return rendered


@pytest.fixture
def settings(overlay: Rendered, tmp_path: Path) -> Settings:
    return overlay.settings(tmp_path)


@pytest.fixture(scope="module")
def with_hpa(kustomize: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Both overlays as a user who picks the HPA (and lets pods reach the Hub) renders them: a
    copy of deploy/kubernetes whose overlays name components/hpa and components/hub-egress
    instead of components/keda."""
    tree = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(MANIFESTS, tree)
    rendered = {}
    for name in OVERLAYS:
        path = tree / "overlays" / name / "kustomization.yaml"
        kustomization = yaml.safe_load(path.read_text())
        assert kustomization["components"] == ["../../components/keda"]
        kustomization["components"] = ["../../components/hpa", "../../components/hub-egress"]
        path.write_text(yaml.safe_dump(kustomization))
        rendered[name] = Rendered(kustomize_build(kustomize, path.parent))
    return rendered


# --- Schemas --------------------------------------------------------------------------------------


def test_every_object_matches_its_schema(overlay: Rendered) -> None:
    kinds = validate_against_schemas(overlay)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "ScaledObject",
            "Service",
            "ServiceMonitor",
        ]
    )
    assert {o["metadata"].get("namespace") for o in overlay.objects} == {"opensearch-sidecar"}


def test_the_schemas_refuse_what_the_api_server_refuses(overlays: dict[str, Rendered]) -> None:
    """The validation is not vacuous: a misspelt field or a wrong type fails it."""
    typo = Rendered(copy.deepcopy(overlays["gpu"].objects))
    typo.pod["containers"][0]["livenessProbes"] = typo.container.pop("livenessProbe")
    with pytest.raises(AssertionError, match="livenessProbes"):
        validate_against_schemas(typo)
    unquoted = Rendered(copy.deepcopy(overlays["gpu"].objects))
    unquoted.one("ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"] = 100
    with pytest.raises(AssertionError, match="threshold"):
        validate_against_schemas(unquoted)
    unknown = Rendered(copy.deepcopy(overlays["gpu"].objects))
    unknown.one("ServiceMonitor")["spec"]["endpoints"][0]["pathname"] = "/metrics"
    with pytest.raises(AssertionError, match="pathname"):
        validate_against_schemas(unknown)


# --- The pod -------------------------------------------------------------------------------------


def test_configuration_is_what_the_sidecar_accepts(overlay: Rendered, settings: Settings) -> None:
    """The ConfigMap's variables and the mounted profile file parse with the real
    Settings.from_env (unknown SIDECAR_* names would stop every pod at start)."""
    assert "my-index" in settings.profiles
    assert settings.listen_host in ("0.0.0.0", "::")
    (port,) = overlay.container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", settings.listen_port)
    assert settings.listen_port == 8080
    assert overlay.pod["enableServiceLinks"] is False


def test_probes_readiness_on_readyz_liveness_never_through_to_the_cluster(
    overlay: Rendered,
) -> None:
    container = overlay.container
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/readyz", "port": "http"}, probe
    # /readyz asks the cluster; a liveness probe on it would restart every pod in an outage.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert set(container["livenessProbe"]) - {"httpGet"} <= {
        "periodSeconds",
        "failureThreshold",
        "timeoutSeconds",
        "initialDelaySeconds",
        "successThreshold",
    }
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET_S


def test_shutdown_fits_in_the_grace_period(overlay: Rendered, settings: Settings) -> None:
    pre_stop = overlay.container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        wait_s = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        wait_s = int(command[1])
    assert wait_s >= 3, "endpoints need a few seconds to drain before SIGTERM"
    grace_s = overlay.pod["terminationGracePeriodSeconds"]
    assert grace_s > wait_s + settings.shutdown_grace_s
    assert overlay.environment()["SIDECAR_SHUTDOWN_GRACE_S"] == "30"


def test_rollout_never_removes_a_pod_before_its_replacement_is_ready(overlay: Rendered) -> None:
    strategy = overlay.deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_gpu_overlay_takes_one_gpu_on_a_gpu_node(
    overlays: dict[str, Rendered], tmp_path: Path
) -> None:
    gpu = overlays["gpu"]
    resources_ = gpu.container["resources"]
    assert str(resources_["requests"]["nvidia.com/gpu"]) == "1"
    assert str(resources_["limits"]["nvidia.com/gpu"]) == "1"
    assert gpu.pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu.pod[
        "tolerations"
    ]
    assert gpu.settings(tmp_path).device == "cuda"
    assert gpu.container["image"].endswith("-cuda")


def test_cpu_overlay_has_cpu_limits_and_no_gpu(
    overlays: dict[str, Rendered], tmp_path: Path
) -> None:
    cpu = overlays["cpu"]
    resources_ = cpu.container["resources"]
    assert not any("gpu" in k for part in resources_.values() for k in part)
    assert "nodeSelector" not in cpu.pod
    assert "tolerations" not in cpu.pod
    assert resources_["requests"]["cpu"] == resources_["limits"]["cpu"]
    assert resources_["requests"]["memory"] == resources_["limits"]["memory"]
    assert cpu.settings(tmp_path).device == "cpu"
    threads = [v for v in cpu.container["env"] if v["name"] == "OMP_NUM_THREADS"]
    assert threads[0]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_runs_unprivileged_on_a_read_only_root(overlay: Rendered, settings: Settings) -> None:
    pod, container = overlay.pod, overlay.container
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    environ = overlay.environment()
    # Everything written at run time lands on a writable volume of the pod.
    for path in ("/tmp", environ["HF_HOME"], environ["HOME"]):
        mount, volume, _ = overlay.volume_file(path)
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume, path
        assert not mount.get("readOnly"), path


def test_credentials_and_ca_come_from_secrets(overlay: Rendered, settings: Settings) -> None:
    (username,) = [v for v in overlay.container["env"] if v["name"] == "SIDECAR_SERVICE_USERNAME"]
    assert username["valueFrom"]["secretKeyRef"] == {
        "name": "opensearch-rerank-sidecar-upstream",
        "key": "username",
    }
    assert settings.service_password is None  # a file, never a variable
    assert settings.service_password_file is not None
    assert overlay.file_source(str(settings.service_password_file)) == (
        "secret",
        "opensearch-rerank-sidecar-upstream",
        "password",
    )
    assert settings.upstream_ca_certs is not None
    assert overlay.file_source(str(settings.upstream_ca_certs)) == (
        "secret",
        "opensearch-ca",
        "ca.crt",
    )
    assert settings.opensearch_url.startswith("https://")


# --- The objects around it ------------------------------------------------------------------------


def test_selectors_pick_the_sidecar_pods(overlay: Rendered) -> None:
    labels = overlay.pod_labels
    assert matches(overlay.deployment["spec"]["selector"], labels)
    service = overlay.one("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert matches(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 8080, "http")
    assert matches(overlay.one("PodDisruptionBudget")["spec"]["selector"], labels)
    assert matches(overlay.one("NetworkPolicy")["spec"]["podSelector"], labels)
    for constraint in overlay.pod["topologySpreadConstraints"]:
        assert matches(constraint["labelSelector"], labels)
    assert {c["topologyKey"] for c in overlay.pod["topologySpreadConstraints"]} >= {
        "kubernetes.io/hostname"
    }
    monitor = overlay.one("ServiceMonitor")
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def test_disruption_budget_keeps_one_pod_serving(overlay: Rendered) -> None:
    budget = overlay.one("PodDisruptionBudget")["spec"]
    assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == 1
    # Unready pods (every pod during an upstream outage) must not block node drains.
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_network_policy_lets_in_clients_and_prometheus_and_out_only_opensearch_and_dns(
    overlay: Rendered, settings: Settings
) -> None:
    spec = overlay.one("NetworkPolicy")["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    for rule in spec["ingress"]:
        assert rule["from"], "an ingress rule without peers lets everyone in"
        assert rule["ports"] == [{"port": settings.listen_port, "protocol": "TCP"}]
    peers = [peer for rule in spec["ingress"] for peer in rule["from"]]
    assert {"podSelector": {"matchLabels": {"opensearch-rerank-sidecar/client": "true"}}} in peers
    assert any(
        p.get("namespaceSelector", {}).get("matchLabels")
        == {"kubernetes.io/metadata.name": "monitoring"}
        for p in peers
    )

    upstream = urlsplit(settings.opensearch_urls[0])
    upstream_namespace = (upstream.hostname or "").split(".")[1]
    allowed: set[tuple[str, int, str]] = set()
    for rule in spec["egress"]:
        assert rule.get("to"), "an egress rule without peers lets the pods reach anything"
        assert rule.get("ports"), "an egress rule without ports opens every port"
        for peer in rule["to"]:
            assert "ipBlock" not in peer, peer
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert peer["podSelector"]["matchLabels"], peer
            allowed |= {(namespace, p["port"], p["protocol"]) for p in rule["ports"]}
    assert allowed == {
        (upstream_namespace, upstream.port, "TCP"),
        ("kube-system", 53, "UDP"),
        ("kube-system", 53, "TCP"),
    }


# --- Autoscaling ----------------------------------------------------------------------------------


def _threshold(rendered: Rendered) -> float:
    return float(rendered.one("ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"])


def test_keda_scales_the_deployment_on_the_rerank_queue(
    overlay: Rendered, settings: Settings
) -> None:
    scaled = overlay.one("ScaledObject")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", NAME)
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert spec["minReplicaCount"] == 2
    # The CRD's CEL rule, which the schema check above cannot evaluate.
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    # The Prometheus scaler's own required metadata (checked by KEDA, not by its CRD).
    metadata = trigger["metadata"]
    assert {"serverAddress", "query", "threshold"} <= set(metadata)
    assert urlsplit(metadata["serverAddress"]).scheme in ("http", "https")
    query = metadata["query"]
    assert re.search(rf"\b{QUEUE_METRIC}\{{", query), query
    # kustomize's namespace does not reach into the query string: it must agree by hand.
    assert f'namespace="{scaled["metadata"]["namespace"]}"' in query
    assert f'service="{overlay.one("Service")["metadata"]["name"]}"' in query
    # Pods are added long before the admission bound sheds requests with 429.
    assert 0 < _threshold(overlay) < settings.rerank_max_pending_pairs / 2
    # The autoscaler owns the count: an applied replica count would reset it.
    assert "replicas" not in overlay.deployment["spec"]


def test_gpu_pods_may_hold_a_longer_queue(overlays: dict[str, Rendered]) -> None:
    assert _threshold(overlays["gpu"]) > _threshold(overlays["cpu"])
    gpu_max = overlays["gpu"].one("ScaledObject")["spec"]["maxReplicaCount"]
    assert gpu_max < overlays["cpu"].one("ScaledObject")["spec"]["maxReplicaCount"]


def test_hpa_is_the_alternative_on_the_same_queue(with_hpa: dict[str, Rendered]) -> None:
    rules = yaml.safe_load(
        (MANIFESTS / "components" / "hpa" / "prometheus-adapter-rules.yaml").read_text()
    )
    served = {rule["name"]["as"] for rule in rules["rules"]["custom"]}
    averages = {}
    for name, rendered in with_hpa.items():
        validate_against_schemas(rendered)
        assert not rendered.all("ScaledObject")
        assert "replicas" not in rendered.deployment["spec"]
        hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": NAME,
        }
        assert hpa["minReplicas"] == 2
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
        assert QUEUE_METRIC in served, "prometheus-adapter would not serve the HPA's metric"
        assert metric["pods"]["target"]["type"] == "AverageValue"
        averages[name] = float(metric["pods"]["target"]["averageValue"])
        egress = rendered.one("NetworkPolicy", f"{NAME}-hub-egress")["spec"]
        assert matches(egress["podSelector"], rendered.pod_labels)
        assert egress["egress"][0]["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert averages["gpu"] > averages["cpu"]
