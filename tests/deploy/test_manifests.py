"""The production deployment files, checked without Docker or a cluster.

- every Kubernetes resource under deploy/k8s validates against the Kubernetes
  OpenAPI schema (kubernetes-validate, strict: unknown fields are errors);
- the Kustomize tree is consistent (resources exist, overlays reach the base,
  patches, replica counts and image overrides name things that exist);
- the workloads keep the platform's conventions (probes, non-root, limits,
  ports, one database per service, one migration Job per service);
- docker-compose.yml wires the same system (a three-node JetStream cluster,
  migrations that finish before services start, no port clashes);
- the Dockerfile builds a non-root image whose entrypoint is `shuangjian`.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, latest_version
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
NATS_CONF = REPO / "deploy" / "nats" / "nats.conf"
INIT_SQL = REPO / "deploy" / "postgres" / "init.sql"

# The platform's conventions (chassis.config.SERVICE_PORTS; checked below).
SERVICE_PORTS = {
    "gateway": 8000,
    "identity": 8001,
    "homework": 8002,
    "afterschool": 8003,
    "institutions": 8004,
    "funds": 8005,
}
SERVICES = tuple(SERVICE_PORTS)
NATS_NODES = ("nats-1", "nats-2", "nats-3")
NATS_CLIENT_PORT = 4222

# The oldest Kubernetes the manifests must work on (the preStop `sleep` action
# needs 1.30+), and the newest the installed kubernetes-validate knows.
MIN_KUBERNETES = "1.31.0"
KUBERNETES_VERSIONS = sorted({MIN_KUBERNETES, latest_version()}, key=Version)

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


# --- loading ---------------------------------------------------------------------


@functools.cache
def _parse_yaml(path: Path) -> tuple[Any, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open(encoding="utf-8") as f:
        return tuple(doc for doc in yaml.load_all(f, Loader=loader) if doc is not None)


def load_yaml_docs(path: Path) -> list[Any]:
    # Parsed once per file; a copy, so no test can leak changes into another.
    return copy.deepcopy(list(_parse_yaml(path.resolve())))


def is_kustomization(path: Path) -> bool:
    return path.name in KUSTOMIZATION_NAMES


def k8s_yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def resource_files() -> list[Path]:
    return [p for p in k8s_yaml_files() if not is_kustomization(p)]


def kustomization_files() -> list[Path]:
    return [p for p in k8s_yaml_files() if is_kustomization(p)]


def kustomization_in(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def load_kustomization(path: Path) -> dict[str, Any]:
    docs = load_yaml_docs(path)
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path}: one mapping expected"
    return docs[0]


def is_resource(doc: Any) -> bool:
    return isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc


def all_resource_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in resource_files():
        for i, doc in enumerate(load_yaml_docs(path)):
            if is_resource(doc):
                name = doc.get("metadata", {}).get("name", "?")
                out.append((f"{path.relative_to(K8S)}#{i}:{doc['kind']}/{name}", doc))
    return out


def build(kustomization_dir: Path, _seen: frozenset[Path] = frozenset()) -> list[dict[str, Any]]:
    """The resources a kustomization pulls in, recursively (patches not applied)."""
    path = kustomization_in(kustomization_dir)
    assert path is not None, f"{kustomization_dir}: no kustomization"
    assert kustomization_dir not in _seen, f"{kustomization_dir}: kustomization cycle"
    docs: list[dict[str, Any]] = []
    for entry in load_kustomization(path).get("resources") or []:
        target = (kustomization_dir / entry).resolve()
        if target.is_dir():
            docs += build(target, _seen | {kustomization_dir})
        elif target.is_file():  # a missing entry fails test_kustomization_resources_exist
            docs += [d for d in load_yaml_docs(target) if is_resource(d)]
    return docs


def base_docs(kind: str) -> list[dict[str, Any]]:
    return [d for d in build(BASE) if d["kind"] == kind]


def base_doc(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in base_docs(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name} in the base, found {len(found)}"
    return found[0]


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in build(BASE):
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def secret_keys() -> dict[str, set[str]]:
    return {
        s["metadata"]["name"]: set(s.get("stringData") or {}) | set(s.get("data") or {})
        for s in base_docs("Secret")
    }


def config_map(name: str) -> dict[str, str]:
    return base_doc("ConfigMap", name).get("data") or {}


# --- Kubernetes schema validation ------------------------------------------------------


def test_kubernetes_versions_are_supported_by_kubernetes_validate() -> None:
    known = {Version(v) for v in all_versions()}
    for version in KUBERNETES_VERSIONS:
        assert Version(version) in known, f"kubernetes-validate has no schemas for {version}"


def test_every_k8s_yaml_document_is_a_resource_or_a_kustomization() -> None:
    files = resource_files()
    assert files, "no manifests under deploy/k8s"
    for path in files:
        docs = load_yaml_docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert is_resource(doc), f"{path}: a document without apiVersion/kind: {doc!r:.80}"
            assert doc["kind"] != "Kustomization", (
                f"{path}: kustomizations must be named {KUSTOMIZATION_NAMES[0]}"
            )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("where", "doc"), [pytest.param(w, d, id=w) for w, d in all_resource_docs()]
)
def test_resource_validates_against_kubernetes_schema(
    version: str, where: str, doc: dict[str, Any]
) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{where} (Kubernetes {e.version}): {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{where}: {e.message}")


# --- Kustomize --------------------------------------------------------------------------


def test_kustomizations_exist_for_base_and_production() -> None:
    assert kustomization_in(BASE) is not None
    assert kustomization_in(OVERLAYS / "production") is not None


@pytest.mark.parametrize("path", kustomization_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_resources_exist(path: Path) -> None:
    k = load_kustomization(path)
    assert k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
    assert k.get("kind") == "Kustomization"
    resources = k.get("resources") or []
    assert resources, f"{path}: no resources"
    assert len(resources) == len(set(resources)), f"{path}: a resource is listed twice"
    for entry in resources:
        target = (path.parent / entry).resolve()
        assert target.exists(), f"{path}: resource {entry} does not exist"
        if target.is_dir():
            assert kustomization_in(target), f"{path}: {entry} is a directory without kustomization"
        else:
            assert target.is_relative_to(K8S), f"{path}: {entry} is outside deploy/k8s"
    # Deprecated fields kustomize 5 warns about; `patches` covers both.
    for legacy in ("patchesStrategicMerge", "patchesJson6902", "bases", "commonLabels"):
        assert legacy not in k, f"{path}: uses deprecated `{legacy}`"


def test_every_manifest_is_listed_in_exactly_one_kustomization() -> None:
    listed: dict[Path, Path] = {}
    for path in kustomization_files():
        for entry in load_kustomization(path).get("resources") or []:
            target = (path.parent / entry).resolve()
            if target.is_file():
                assert target not in listed, f"{entry} listed by {listed[target]} and {path}"
                listed[target] = path
    for manifest in resource_files():
        assert manifest.resolve() in listed, f"{manifest} is in no kustomization (never applied)"


def overlay_dirs() -> list[Path]:
    return sorted(p.parent for p in kustomization_files() if p.parent.is_relative_to(OVERLAYS))


def test_there_is_a_production_overlay() -> None:
    assert OVERLAYS / "production" in overlay_dirs()


@pytest.mark.parametrize("overlay", overlay_dirs(), ids=lambda p: p.name)
def test_overlay_points_to_the_base(overlay: Path) -> None:
    k = load_kustomization(kustomization_in(overlay))  # type: ignore[arg-type]

    def reaches_base(directory: Path) -> bool:
        if directory == BASE.resolve():
            return True
        kz = kustomization_in(directory)
        entries = load_kustomization(kz).get("resources") or [] if kz else []
        return any(
            (directory / e).resolve().is_dir() and reaches_base((directory / e).resolve())
            for e in entries
        )

    assert any(
        (overlay / e).resolve().is_dir() and reaches_base((overlay / e).resolve())
        for e in k.get("resources") or []
    ), f"{overlay} does not build on deploy/k8s/base"


def _group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _matches_target(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, version = _group_version(doc["apiVersion"])
    checks = {
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
        "group": group,
        "version": version,
        "namespace": doc["metadata"].get("namespace"),
    }
    for key, value in target.items():
        if key in ("labelSelector", "annotationSelector"):
            continue
        if key in ("name", "kind") and isinstance(value, str):
            if not re.fullmatch(value, checks[key] or ""):
                return False
        elif checks.get(key) != value:
            return False
    return True


def _json_pointer(doc: Any, pointer: str, *, parent_only: bool) -> bool:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if parent_only:
        parts = parts[:-1]
    node = doc
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _strategic_merge_fits(patch: Any, target: Any, where: str) -> None:
    """A list item merged by `name` that is not in the target would be added
    silently (e.g. a second container); that is never what a patch here means."""
    if isinstance(patch, dict) and isinstance(target, dict):
        for key, value in patch.items():
            if key in target:
                _strategic_merge_fits(value, target[key], f"{where}.{key}")
    elif isinstance(patch, list) and isinstance(target, list):
        by_name = {t.get("name"): t for t in target if isinstance(t, dict)}
        for item in patch:
            if isinstance(item, dict) and "name" in item:
                assert item["name"] in by_name, f"{where}: no item named {item['name']!r} to patch"
                _strategic_merge_fits(item, by_name[item["name"]], f"{where}[{item['name']}]")


@pytest.mark.parametrize("path", kustomization_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_patches_target_existing_resources(path: Path) -> None:
    k = load_kustomization(path)
    docs = build(path.parent)
    for i, spec in enumerate(k.get("patches") or []):
        where = f"{path.relative_to(K8S)} patches[{i}]"
        if "path" in spec:
            patch_file = path.parent / spec["path"]
            assert patch_file.is_file(), f"{where}: {spec['path']} does not exist"
            text = patch_file.read_text(encoding="utf-8")
        else:
            text = spec.get("patch", "")
        assert text.strip(), f"{where}: empty patch"
        body = yaml.safe_load(text)
        target = spec.get("target")
        if target is None:
            assert is_resource(body), f"{where}: a patch without target must name its resource"
            target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        targets = [d for d in docs if _matches_target(d, target)]
        assert targets, (
            f"{where}: target {target} matches nothing in {path.parent.name}'s resources"
        )
        for doc in targets:
            if isinstance(body, list):  # JSON 6902
                for op in body:
                    pointer = op["path"]
                    exists = _json_pointer(doc, pointer, parent_only=op["op"] == "add")
                    resource = f"{doc['kind']}/{doc['metadata']['name']}"
                    assert exists, f"{where}: {op['op']} {pointer} not in {resource}"
            else:  # strategic merge
                assert (
                    body["kind"] == doc["kind"]
                    and body["metadata"]["name"] == doc["metadata"]["name"]
                )
                _strategic_merge_fits(body, doc, where)


@pytest.mark.parametrize("path", kustomization_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_replicas_and_images_name_existing_things(path: Path) -> None:
    k = load_kustomization(path)
    docs = build(path.parent)
    scalable = {d["metadata"]["name"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for entry in k.get("replicas") or []:
        assert entry["name"] in scalable, f"{path}: replicas for unknown workload {entry['name']}"
        assert entry["count"] >= 2, f"{path}: {entry['name']} below two replicas"
    images = {
        c["image"].rsplit(":", 1)[0]
        for d in docs
        if "template" in d.get("spec", {})
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    for entry in k.get("images") or []:
        assert entry["name"] in images, (
            f"{path}: image override {entry['name']} matches no container"
        )
        assert str(entry.get("newTag", "")).strip() not in ("", "latest"), (
            f"{path}: image {entry['name']} must be pinned to a release tag"
        )


def test_production_pins_the_application_image_and_sets_every_replica_count() -> None:
    k = load_kustomization(OVERLAYS / "production" / "kustomization.yaml")
    assert any(i["name"] == "shuangjian" and i.get("newTag") for i in k.get("images") or [])
    counts = {r["name"]: r["count"] for r in k.get("replicas") or []}
    assert set(counts) == set(SERVICES)


# --- workloads ----------------------------------------------------------------------------


def test_service_ports_match_the_application_settings() -> None:
    from chassis.config import SERVICE_PORTS as APP_PORTS

    assert APP_PORTS == SERVICE_PORTS


def test_base_has_a_deployment_per_service() -> None:
    assert sorted(d["metadata"]["name"] for d in base_docs("Deployment")) == sorted(SERVICES)


def _deployment(service: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    deployment = base_doc("Deployment", service)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == service]
    return deployment, pod, container


def _probe_port_ok(probe: dict[str, Any], container: dict[str, Any]) -> bool:
    port = probe["httpGet"]["port"]
    ports = container.get("ports") or []
    return any(port in (p.get("name"), p["containerPort"]) for p in ports)


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_probes(service: str) -> None:
    _, _, container = _deployment(service)
    for kind, path in (
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ):
        probe = container.get(kind)
        assert probe and "httpGet" in probe, f"{service}: no HTTP {kind}"
        assert probe["httpGet"]["path"] == path, f"{service}: {kind} must probe {path}"
        assert _probe_port_ok(probe, container), f"{service}: {kind} probes a port not served"


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_runs_as_non_root_on_a_read_only_filesystem(service: str) -> None:
    _, pod, container = _deployment(service)
    pod_sc = pod.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (0, None)
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    assert "/tmp" in mounts, f"{service}: /tmp must be writable"
    assert "emptyDir" in volumes[mounts["/tmp"]], f"{service}: /tmp must be an emptyDir"


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEM_UNITS = {
    None: 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def _quantity(resource: str, value: Any) -> float:
    text = str(value)
    if resource == "cpu":
        m = _CPU.match(text)
        assert m, f"bad cpu quantity {value!r}"
        return float(m[1]) / (1000 if m[2] else 1)
    m = _MEM.match(text)
    assert m, f"bad memory quantity {value!r}"
    return float(m[1]) * _MEM_UNITS[m[2]]


@pytest.mark.parametrize("where", [w for w, _ in pod_templates()])
def test_every_container_has_requests_within_limits(where: str) -> None:
    template = dict(pod_templates())[where]
    for container in template["spec"]["containers"]:
        resources = container.get("resources") or {}
        for resource in ("cpu", "memory"):
            request = (resources.get("requests") or {}).get(resource)
            limit = (resources.get("limits") or {}).get(resource)
            assert request is not None and limit is not None, (
                f"{where}/{container['name']}: {resource} request and limit required"
            )
            assert _quantity(resource, request) <= _quantity(resource, limit)


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_replicas_and_disruption_budget(service: str) -> None:
    deployment, _, _ = _deployment(service)
    assert deployment["spec"].get("replicas", 1) >= 2, (
        f"{service}: one replica is an outage per rollout"
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], labels)
    budgets = [
        p
        for p in base_docs("PodDisruptionBudget")
        if selector_matches(p["spec"]["selector"].get("matchLabels", {}), labels)
    ]
    assert len(budgets) == 1, f"{service}: expected one PodDisruptionBudget, found {len(budgets)}"


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_serves_its_port_with_its_own_database(service: str) -> None:
    _, pod, container = _deployment(service)
    port = SERVICE_PORTS[service]
    up = service.upper()
    args = container.get("command", []) + container.get("args", [])
    assert args[:2] == ["serve", service], f"{service}: runs {args}"
    assert args[args.index("--port") + 1] == str(port)
    assert [p["containerPort"] for p in container["ports"]] == [port]

    env = env_of(container)
    assert env[f"{up}_PORT"]["value"] == str(port)
    assert env[f"{up}_RUN_MIGRATIONS"]["value"] == "false", "a Job migrates, not the replicas"
    ref = env[f"{up}_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secret_keys().get(ref["name"], set()), (
        f"{service}: missing Secret key {ref}"
    )
    other_dbs = {f"{s.upper()}_DATABASE_URL" for s in SERVICES} - {f"{up}_DATABASE_URL"}
    assert not other_dbs & set(env), f"{service}: sees another service's database"

    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            assert config_map(source["configMapRef"]["name"]), "envFrom an empty/missing ConfigMap"
    shared = {
        k
        for s in container.get("envFrom") or []
        if "configMapRef" in s
        for k in config_map(s["configMapRef"]["name"])
    }
    assert {"NATS_URL", "AUTH_JWKS_URL", "AUTH_ISSUER", "AUTH_AUDIENCE"} <= shared | set(env)
    # Service links would set e.g. HOMEWORK_PORT=tcp://... in every pod.
    assert pod.get("enableServiceLinks") is False


@pytest.mark.parametrize("service", SERVICES)
def test_service_fronts_only_the_deployment(service: str) -> None:
    svc = base_doc("Service", service)
    pod_labels = base_doc("Deployment", service)["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(svc["spec"]["selector"], pod_labels)
    assert [p["port"] for p in svc["spec"]["ports"]] == [SERVICE_PORTS[service]]
    for job in base_docs("Job"):
        job_labels = job["spec"]["template"]["metadata"]["labels"]
        assert not selector_matches(svc["spec"]["selector"], job_labels), (
            f"Service {service} would send traffic to {job['metadata']['name']}"
        )


@pytest.mark.parametrize("service", SERVICES)
def test_migration_job_per_service(service: str) -> None:
    job = base_doc("Job", f"migrate-{service}")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container.get("command", []) + container.get("args", []) == ["migrate", service]
    _, _, app = _deployment(service)
    assert container["image"] == app["image"], (
        "the Job must migrate to the schema the release expects"
    )
    key = f"{service.upper()}_DATABASE_URL"
    assert env_of(container)[key]["valueFrom"] == env_of(app)[key]["valueFrom"]


@pytest.mark.parametrize("where", [w for w, _ in pod_templates()])
def test_pods_meet_the_restricted_pod_security_profile(where: str) -> None:
    spec = dict(pod_templates())[where]["spec"]
    pod_sc = spec.get("securityContext") or {}
    for container in spec.get("initContainers", []) + spec["containers"]:
        sc = container.get("securityContext") or {}
        name = f"{where}/{container['name']}"
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), name


def test_namespace_enforces_restricted_pod_security() -> None:
    (namespace,) = base_docs("Namespace")
    assert namespace["metadata"]["name"] == "shuangjian"
    assert load_kustomization(BASE / "kustomization.yaml").get("namespace") == "shuangjian"
    labels = namespace["metadata"]["labels"]
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"


def test_secrets_hold_placeholders_only() -> None:
    for secret in base_docs("Secret"):
        assert "data" not in secret, "base64 data hides whether a value is a placeholder"
        for key, value in (secret.get("stringData") or {}).items():
            assert re.search(r"CHANGE-ME|PLACEHOLDER", value), (
                f"Secret {secret['metadata']['name']}/{key} looks like a real value"
            )


def test_identity_mounts_its_signing_key_from_a_secret() -> None:
    _, pod, container = _deployment("identity")
    key_file = Path(env_of(container)["IDENTITY_SIGNING_KEY_FILE"]["value"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts.get(str(key_file.parent))
    assert mount and mount.get("readOnly") is True, "the key directory must be a read-only mount"
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    secret_name = volume["secret"]["secretName"]
    assert key_file.name in secret_keys()[secret_name]


def test_gateway_upstreams_and_ingress() -> None:
    _, _, container = _deployment("gateway")
    env = env_of(container)
    for service in SERVICES[1:]:
        url = urlsplit(env[f"GATEWAY_UPSTREAM_{service.upper()}"]["value"])
        assert (url.scheme, url.hostname, url.port) == ("http", service, SERVICE_PORTS[service])
    assert "secretKeyRef" in env["REDIS_URL"]["valueFrom"]
    # Behind the ingress, per-address rate limits need the forwarded address.
    proxies = json.loads(env["GATEWAY_TRUSTED_PROXIES"]["value"])
    assert proxies and all(ipaddress.ip_network(p) for p in proxies)

    (ingress,) = base_docs("Ingress")
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends and all(b["name"] == "gateway" for b in backends)
    gateway_ports = {p["name"] for p in base_doc("Service", "gateway")["spec"]["ports"]}
    assert all(b["port"].get("name") in gateway_ports for b in backends)


# --- NATS (shared by Kubernetes and compose) ---------------------------------------------


def _strip_conf_comments(text: str) -> str:
    return "\n".join(re.split(r"\s(?:#|//)|^(?:#|//)", line)[0] for line in text.splitlines())


def _conf_block(text: str, key: str) -> str | None:
    m = re.search(rf"(?m)^\s*{key}\s*[:=]?\s*\{{", text)
    if not m:
        return None
    depth, start = 1, m.end()
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise AssertionError(f"unbalanced block {key}")


def _conf_value(text: str, key: str) -> str | None:
    m = re.search(rf"(?m)^\s*{key}\s*[:=\s]\s*([^\n;]+?)\s*;?\s*$", text)
    return m[1].strip().strip("\"'") if m else None


def parse_nats_conf(text: str) -> dict[str, Any]:
    text = _strip_conf_comments(text)
    jetstream = _conf_block(text, "jetstream")
    cluster = _conf_block(text, "cluster")
    top = text
    for block in (jetstream, cluster):
        if block is not None:
            top = top.replace(block, "")
    routes: list[tuple[str, int]] = []
    if cluster is not None:
        m = re.search(r"routes\s*[:=]?\s*\[(.*?)\]", cluster, re.S)
        for url in re.findall(r"nats(?:-route)?://[^\s,\]\"']+", m[1] if m else ""):
            parts = urlsplit(url)
            routes.append((parts.hostname or "", parts.port or 0))
    return {
        "server_name": _conf_value(top, "server_name"),
        "port": int(_conf_value(top, "port") or 4222),
        "jetstream": jetstream is not None,
        "store_dir": _conf_value(jetstream or "", "store_dir"),
        "cluster_name": _conf_value(cluster or "", "name"),
        "cluster_listen": _conf_value(cluster or "", "listen"),
        "routes": routes,
    }


def test_nats_conf_parser_reads_what_it_should() -> None:
    conf = parse_nats_conf(
        'server_name: $X # the node\nport 4333\njetstream {\n store_dir: "/d"\n}\n'
        "cluster { name: c\n routes: [\n nats-route://a:6222 // first\n nats://b:6222 ]\n}\n"
    )
    assert conf == {
        "server_name": "$X",
        "port": 4333,
        "jetstream": True,
        "store_dir": "/d",
        "cluster_name": "c",
        "cluster_listen": None,
        "routes": [("a", 6222), ("b", 6222)],
    }


def test_k8s_nats_cluster() -> None:
    sts = base_doc("StatefulSet", "nats")
    replicas = sts["spec"]["replicas"]
    assert replicas == 3
    headless = base_doc("Service", sts["spec"]["serviceName"])
    assert headless["spec"].get("clusterIP") == "None"
    assert headless["spec"].get("publishNotReadyAddresses") is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(headless["spec"]["selector"], labels)

    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    conf_mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    args = container.get("command", []) + container.get("args", [])
    conf_path = Path(args[args.index("--config") + 1])
    assert conf_path.parent == Path(conf_mount["mountPath"])
    conf = parse_nats_conf(config_map(config_volume["configMap"]["name"])[conf_path.name])

    # Unique server names: the pod name, through the environment.
    assert conf["server_name"] == "$SERVER_NAME"
    assert env_of(container)["SERVER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    pods = {
        f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}" for i in range(replicas)
    }
    cluster_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "cluster")
    assert conf["cluster_name"] and conf["jetstream"]
    assert {h for h, _ in conf["routes"]} == pods
    assert {p for _, p in conf["routes"]} == {cluster_port}

    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    store_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == conf["store_dir"])
    assert store_mount["name"] in claims, "JetStream must store on the pod's PersistentVolume"

    nats_url = config_map("shuangjian-config")["NATS_URL"]
    assert {urlsplit(u).hostname for u in nats_url.split(",")} == pods
    assert {urlsplit(u).port for u in nats_url.split(",")} == {conf["port"]}

    budget = base_doc("PodDisruptionBudget", "nats")
    assert selector_matches(budget["spec"]["selector"]["matchLabels"], labels)
    assert budget["spec"].get("maxUnavailable") == 1, "two nodes down would lose the quorum"


# --- docker-compose ---------------------------------------------------------------------------


def _interpolate(value: Any) -> Any:
    """Compose `${VAR:-default}` / `${VAR}` with an empty environment."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m[1] or "", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"compose has no service {name}"
    return compose["services"][name]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(_interpolate(v)) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """target -> source."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            parts = v.split(":")
            out[parts[1] if len(parts) > 1 else parts[0]] = parts[0] if len(parts) > 1 else ""
    return out


def _published_ports(service: dict[str, Any]) -> list[int]:
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            if p.get("published"):
                out.append(int(p["published"]))
        else:
            parts = str(p).split("/")[0].split(":")
            if len(parts) >= 2:
                out.append(int(parts[-2]))
    return out


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    return " ".join(test) if isinstance(test, list) else str(test or "")


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    expected = {"postgres", *NATS_NODES, *SERVICES, *(f"migrate-{s}" for s in SERVICES)}
    missing = expected - set(compose["services"])
    assert not missing, f"missing from docker-compose.yml: {sorted(missing)}"


def test_compose_nats_nodes_form_one_jetstream_cluster(compose: dict[str, Any]) -> None:
    names = set()
    cluster_names = set()
    declared_volumes = set(compose.get("volumes") or {})
    data_volumes = set()
    for node in NATS_NODES:
        svc = _service(compose, node)
        command = _command(svc)
        conf_path = command[command.index("--config") + 1]
        source = _volumes(svc).get(conf_path)
        assert source, f"{node}: {conf_path} is not mounted"
        conf_file = (REPO / source).resolve()
        assert conf_file == NATS_CONF.resolve(), (
            f"{node}: mounts {source}, not deploy/nats/nats.conf"
        )
        conf = parse_nats_conf(conf_file.read_text(encoding="utf-8"))

        server_name = conf["server_name"]
        if server_name and server_name.startswith("$"):
            server_name = _env(svc).get(server_name[1:])
        if "--server_name" in command:
            server_name = command[command.index("--server_name") + 1]
        assert server_name == node, f"{node}: server name {server_name!r}"
        names.add(server_name)

        routes = conf["routes"]
        if "--routes" in command:
            urls = command[command.index("--routes") + 1].split(",")
            routes = [(urlsplit(u).hostname, urlsplit(u).port) for u in urls]
        route_hosts = {h for h, _ in routes}
        others = set(NATS_NODES) - {node}
        assert others <= route_hosts, (
            f"{node}: routes {sorted(route_hosts)} miss {others - route_hosts}"
        )
        assert route_hosts <= set(NATS_NODES), f"{node}: routes to unknown hosts {route_hosts}"
        listen_port = int((conf["cluster_listen"] or ":6222").rsplit(":", 1)[1])
        assert {p for _, p in routes} == {listen_port}
        cluster_names.add(conf["cluster_name"])

        assert conf["jetstream"] or "--jetstream" in command or "-js" in command, (
            f"{node}: no JetStream"
        )
        store = _volumes(svc).get(conf["store_dir"] or "")
        assert store in declared_volumes, f"{node}: JetStream store_dir is not on a named volume"
        data_volumes.add(store)
        assert svc.get("healthcheck"), f"{node}: no healthcheck"
    assert names == set(NATS_NODES)
    assert len(cluster_names) == 1 and None not in cluster_names
    assert len(data_volumes) == len(NATS_NODES), "each node needs its own JetStream volume"


def test_compose_postgres_creates_one_database_per_service(compose: dict[str, Any]) -> None:
    postgres = _service(compose, "postgres")
    assert "pg_isready" in _healthcheck_text(postgres)
    mounts = _volumes(postgres)
    init = [
        src for target, src in mounts.items() if target.startswith("/docker-entrypoint-initdb.d")
    ]
    assert [(REPO / s).resolve() for s in init] == [INIT_SQL.resolve()]
    sql = re.sub(r"--[^\n]*", "", INIT_SQL.read_text(encoding="utf-8"))
    created = re.findall(r"(?i)\bcreate\s+database\s+\"?(\w+)\"?", sql)
    assert sorted(created) == sorted(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_migration_job(compose: dict[str, Any], service: str) -> None:
    job = _service(compose, f"migrate-{service}")
    assert _command(job) == ["migrate", service]
    assert _depends(job).get("postgres") == "service_healthy"
    assert str(job.get("restart", "no")) == "no", "a restarting job never completes"
    app = _service(compose, service)
    key = f"{service.upper()}_DATABASE_URL"
    assert _env(job)[key] == _env(app)[key], "the job must migrate the service's own database"
    assert job.get("image") == app.get("image"), (
        "the job must migrate to the schema the service expects"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_compose_app_service(compose: dict[str, Any], service: str) -> None:
    svc = _service(compose, service)
    port = SERVICE_PORTS[service]
    command = _command(svc)
    assert command[:2] == ["serve", service]
    assert command[command.index("--port") + 1] == str(port)
    assert command[command.index("--host") + 1] == "0.0.0.0"

    deps = _depends(svc)
    assert deps.get("postgres") == "service_healthy"
    assert deps.get(f"migrate-{service}") == "service_completed_successfully"
    assert set(NATS_NODES) <= set(deps), f"{service}: must start after the NATS nodes"

    env = _env(svc)
    up = service.upper()
    nats = [urlsplit(u.strip()) for u in env["NATS_URL"].split(",")]
    assert sorted(u.hostname or "" for u in nats) == sorted(NATS_NODES)
    assert {u.scheme for u in nats} == {"nats"}
    assert {u.port for u in nats} == {NATS_CLIENT_PORT}

    db = urlsplit(env[f"{up}_DATABASE_URL"])
    assert db.scheme == "postgresql+asyncpg"
    assert db.hostname == "postgres"
    assert db.path == f"/{service}", f"{service} must use its own database, not {db.path}"
    others = {f"{s.upper()}_DATABASE_URL" for s in SERVICES} - {f"{up}_DATABASE_URL"}
    assert not others & set(env), f"{service}: sees another service's database"

    assert env[f"{up}_PORT"] == str(port)
    assert env[f"{up}_RUN_MIGRATIONS"].lower() == "false"
    assert urlsplit(env["AUTH_JWKS_URL"]).netloc == f"identity:{SERVICE_PORTS['identity']}"

    health = _healthcheck_text(svc)
    assert "/healthz" in health and f":{port}/" in health, f"{service}: healthcheck {health!r}"


def test_compose_ports_do_not_clash(compose: dict[str, Any]) -> None:
    published = [p for svc in compose["services"].values() for p in _published_ports(svc)]
    assert len(published) == len(set(published)), f"host port published twice: {published}"
    assert _published_ports(_service(compose, "gateway")) == [SERVICE_PORTS["gateway"]]
    listening = [
        _command(_service(compose, s))[_command(_service(compose, s)).index("--port") + 1]
        for s in SERVICES
    ]
    assert len(listening) == len(set(listening))


def test_compose_gateway_wiring(compose: dict[str, Any]) -> None:
    gateway = _service(compose, "gateway")
    env = _env(gateway)
    for service in SERVICES[1:]:
        url = urlsplit(env[f"GATEWAY_UPSTREAM_{service.upper()}"])
        assert (url.hostname, url.port) == (service, SERVICE_PORTS[service])
    redis = urlsplit(env["REDIS_URL"]).hostname
    assert redis in compose["services"] and redis in _depends(gateway)


def test_compose_identity_signing_key_is_on_a_volume(compose: dict[str, Any]) -> None:
    identity = _service(compose, "identity")
    key_file = Path(_env(identity)["IDENTITY_SIGNING_KEY_FILE"])
    mounted = {Path(t) for t in _volumes(identity)}
    for secret in identity.get("secrets") or []:  # either a volume or a compose secret
        target = secret if isinstance(secret, str) else secret.get("target", secret["source"])
        mounted.add(Path("/run/secrets") / target)  # an absolute target replaces the prefix
    assert key_file in mounted or key_file.parent in mounted, "the key must survive a restart"


# --- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_dockerfile_is_multi_stage_on_python_3_11_slim() -> None:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), image)
        assert image == "python:3.11-slim", image
    final = stages[-1]
    assert any(k == "COPY" and "--from=" in rest for k, rest in final), (
        "runtime copies from the build"
    )


def test_dockerfile_runs_as_non_root_with_the_shuangjian_entrypoint() -> None:
    final = dockerfile_stages()[-1]
    users = [rest for k, rest in final if k == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert user.isdigit(), "runAsNonRoot can only verify a numeric USER"
    assert user == str(
        base_doc("Deployment", "gateway")["spec"]["template"]["spec"]["securityContext"][
            "runAsUser"
        ]
    )

    entrypoints = [rest for k, rest in final if k == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["shuangjian"]


def test_docker_build_context_has_what_the_dockerfile_copies() -> None:
    ignored = [
        ln.strip().rstrip("/")
        for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for required in (".venv", ".git", "var"):
        assert required in ignored, f".dockerignore must exclude {required}"

    copied = set()
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in rest:
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                top = Path(source).parts[0]
                assert top not in ignored, f"COPY {source}: excluded by .dockerignore"
                copied.add(top)
    # chassis reads policy/ from next to its package; it is not in the wheel.
    assert "policy" in copied, "the image needs policy/ (region profiles, calendar)"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "pyproject.toml" in copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"package {package} is installed by pip but not copied"
    assert "shuangjian" in pyproject["project"]["scripts"]
