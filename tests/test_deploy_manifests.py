"""The manifests in deploy/: what three replicas on three hosts depend on, checked offline.

Every YAML document in deploy/ is loaded. The checks tie the pieces together the way
Kubernetes and meshca will: probe ports against ``health-listen``, Service ports
against ``listen``, mounts against the paths the settings name, selectors against the
pod labels. The ConfigMap's meshca.yaml is loaded with ``load_settings``, so an
unknown key or a bad value fails here, not in the cluster.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from meshca.cli import build_parser
from meshca.config import load_settings, parse_duration

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NAMESPACE = "meshca"
# Pods reach the API server through these in a cluster; tokenreview mode needs them.
IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}

Doc = dict[str, Any]


def _load() -> list[tuple[str, Doc]]:
    documents = []
    for path in sorted(DEPLOY.glob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path.name, document))
    return documents


DOCUMENTS = _load()


def _only(kind: str, name: str | None = None, file: str | None = None) -> Doc:
    found = [
        doc
        for doc_file, doc in DOCUMENTS
        if doc.get("kind") == kind
        and (name is None or doc["metadata"]["name"] == name)
        and (file is None or doc_file == file)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/, found {len(found)}"
    return found[0]


def _deployment() -> Doc:
    return _only("Deployment", "meshca")


def _pod_spec() -> Doc:
    spec: Doc = _deployment()["spec"]["template"]["spec"]
    return spec


def _container(pod: Doc, name: str) -> Doc:
    found: list[Doc] = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


def _meshca_container() -> Doc:
    return _container(_pod_spec(), "meshca")


def _config_text() -> str:
    text: str = _only("ConfigMap", "meshca-config")["data"]["meshca.yaml"]
    return text


def _config() -> Doc:
    config: Doc = yaml.safe_load(_config_text())
    return config


def _port_of(address: str) -> int:
    host, _, port = address.rpartition(":")
    assert host, f"{address!r} is not HOST:PORT"
    return int(port)


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    # Only matchLabels is used in deploy/; anything else must be checked by hand here.
    assert set(selector) == {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def _mount_holding(container: Doc, file: str) -> tuple[Doc, PurePosixPath]:
    """The volume mount under which ``file`` lies, and the file's path inside it."""
    path = PurePosixPath(file)
    for mount in container["volumeMounts"]:
        base = PurePosixPath(mount["mountPath"])
        if path.is_relative_to(base) and path != base:
            return mount, path.relative_to(base)
    raise AssertionError(f"{file} is on no volume of container {container['name']}")


def _volume(pod: Doc, name: str) -> Doc:
    found: list[Doc] = [v for v in pod["volumes"] if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name!r}"
    return found[0]


def _secret_keys(name: str) -> set[str]:
    secret = _only("Secret", name)
    assert secret["metadata"]["namespace"] == NAMESPACE
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def _secret_env(container: Doc, name: str) -> Doc:
    found = [e for e in container.get("env", []) if e["name"] == name]
    assert len(found) == 1, f"expected one env {name} in {container['name']}"
    env = found[0]
    assert "value" not in env, f"{name} must not be written into the manifest"
    ref: Doc = env["valueFrom"]["secretKeyRef"]
    return ref


def test_every_file_has_documents_and_every_meshca_object_is_in_its_namespace() -> None:
    files = {file for file, _ in DOCUMENTS}
    assert files >= {"meshca.yaml", "meshca-migrate.yaml", "meshca-secrets.example.yaml"}
    cluster_scoped = {"Namespace", "ClusterRoleBinding", "ClusterRole"}
    for file, doc in DOCUMENTS:
        assert doc.get("apiVersion") and doc.get("kind"), f"{file}: {doc}"
        if file.startswith("meshca") and doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{file}: {doc['kind']}"


def test_three_replicas_that_roll_one_at_a_time() -> None:
    spec = _deployment()["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    unavailable = spec["strategy"]["rollingUpdate"]["maxUnavailable"]
    # At least one: with required anti-affinity on as many nodes as replicas, a surge
    # pod has nowhere to go until an old one leaves. At most one: two keep issuing.
    assert unavailable == 1
    assert _selects(spec["selector"], spec["template"]["metadata"]["labels"])


def test_replicas_are_kept_on_different_hosts() -> None:
    pod = _pod_spec()
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    anti = pod["affinity"]["podAntiAffinity"]
    terms = list(anti.get("requiredDuringSchedulingIgnoredDuringExecution", []))
    terms += [
        p["podAffinityTerm"]
        for p in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    ]
    assert any(
        term["topologyKey"] == "kubernetes.io/hostname" and _selects(term["labelSelector"], labels)
        for term in terms
    ), terms


def test_probes_use_the_health_port_the_config_names() -> None:
    config = _config()
    host, _, _ = config["health-listen"].rpartition(":")
    # The kubelet connects to the pod's IP, never to its loopback.
    assert host not in ("127.0.0.1", "localhost", "[::1]", "::1")
    health_port = _port_of(config["health-listen"])
    assert health_port != _port_of(config["listen"])  # the main port is TLS; probes cannot be
    container = _meshca_container()
    readiness = container["readinessProbe"]["grpc"]
    assert readiness["port"] == health_port
    assert readiness["service"] == "meshca.ready"
    liveness = container["livenessProbe"]["grpc"]
    assert liveness["port"] == health_port
    assert liveness.get("service", "") == ""
    if "startupProbe" in container:
        assert container["startupProbe"]["grpc"]["port"] == health_port
        assert container["startupProbe"]["grpc"].get("service", "") == ""


def test_prometheus_scrapes_the_metrics_port_the_config_names() -> None:
    config = _config()
    host, _, _ = config["metrics-listen"].rpartition(":")
    assert host not in ("127.0.0.1", "localhost", "[::1]", "::1")
    metrics_port = _port_of(config["metrics-listen"])
    assert metrics_port not in (_port_of(config["listen"]), _port_of(config["health-listen"]))
    container = _meshca_container()
    assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_kubelet_waits_out_meshcas_drain() -> None:
    grace = parse_duration(_config()["shutdown-grace"]).total_seconds()
    pod = _deployment()["spec"]["template"]["spec"]
    # The supervisor is gone within the grace plus 1 s; the kubelet must not kill earlier.
    assert pod["terminationGracePeriodSeconds"] >= grace + 2


def test_database_url_comes_from_a_secret_and_never_from_the_config() -> None:
    assert "database-url" not in _config()
    assert "database_url" not in _config()
    ref = _secret_env(_meshca_container(), "MESHCA_DATABASE_URL")
    assert not ref.get("optional", False)  # no silent fallback to SQLite per replica
    assert ref["key"] in _secret_keys(ref["name"])


def test_key_encryption_key_file_is_on_a_read_only_secret_volume() -> None:
    pod, container = _pod_spec(), _meshca_container()
    mount, inside = _mount_holding(container, _config()["key-encryption-key-file"])
    assert mount.get("readOnly") is True
    volume = _volume(pod, mount["name"])
    assert "secret" in volume, f"volume {volume['name']} is not a Secret"
    assert volume["secret"]["defaultMode"] == 0o400
    assert "items" not in volume["secret"]  # so the file name is the Secret's key
    assert str(inside) in _secret_keys(volume["secret"]["secretName"])


def test_data_dir_is_per_replica_and_writable() -> None:
    pod, container = _pod_spec(), _meshca_container()
    data_dir = _config()["data-dir"]
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    assert len(mounts) == 1, f"data-dir {data_dir} must be a volume of its own"
    assert not mounts[0].get("readOnly", False)
    assert "emptyDir" in _volume(pod, mounts[0]["name"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_disruption_budget_covers_the_replicas_and_still_allows_one_drain() -> None:
    pdb = _only("PodDisruptionBudget")
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert _selects(pdb["spec"]["selector"], labels)
    replicas = _deployment()["spec"]["replicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert pdb["spec"]["minAvailable"] == replicas - 1


def test_service_selects_the_replicas_and_targets_the_listen_port() -> None:
    service = _only("Service", "meshca-ca")
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    # A Service's selector is a plain map, the same as matchLabels.
    assert _selects({"matchLabels": service["spec"]["selector"]}, labels)
    listen_port = _port_of(_config()["listen"])
    by_name = {p["name"]: p["containerPort"] for p in _meshca_container()["ports"]}
    grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert len(grpc) == 1
    target = grpc[0].get("targetPort", grpc[0]["port"])
    assert (by_name[target] if isinstance(target, str) else target) == listen_port


def test_only_the_deployments_pods_carry_its_labels() -> None:
    # A Job's pod counted by the budget or the Service would be a replica that never serves.
    selector = _deployment()["spec"]["selector"]
    others = [
        doc["spec"]["template"]["metadata"].get("labels", {})
        for _, doc in DOCUMENTS
        if doc["kind"] in ("Job", "StatefulSet", "DaemonSet", "Deployment")
        and doc["metadata"]["name"] != "meshca"
    ]
    assert others, "the migration Job should be among them"
    for labels in others:
        assert not _selects(selector, labels), labels


def test_config_map_loads_with_the_serve_command(tmp_path: Path) -> None:
    container = _meshca_container()
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    mount, inside = _mount_holding(container, args.config)
    volume = _volume(_pod_spec(), mount["name"])
    assert volume["configMap"]["name"] == "meshca-config"
    assert str(inside) == "meshca.yaml"

    config = tmp_path / "meshca.yaml"
    config.write_text(_config_text())
    flags = {**vars(args), "config": str(config)}
    database_url = _only("Secret", "meshca-database")["stringData"]["url"]
    environ = {**IN_CLUSTER, "MESHCA_DATABASE_URL": database_url}
    settings = load_settings(flags, environ=environ)
    settings.check_attestation()
    assert settings.k8s_mode == "tokenreview"
    assert settings.database_url == database_url
    assert settings.key_encryption_key_file is not None
    assert settings.health_listen is not None
    # os.cpu_count() in a container is the node's: the worker count must be explicit.
    assert "workers" in _config()


def test_migration_job_upgrades_the_same_database_with_the_same_image() -> None:
    job = _only("Job", "meshca-migrate", file="meshca-migrate.yaml")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["image"] == _meshca_container()["image"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.db_command) == ("db", "upgrade")
    # The URL reaches `meshca db` as MESHCA_DATABASE_URL from the replicas' Secret, never
    # as an argument (a password there shows in the process list).
    assert args.database_url is None
    assert _secret_env(container, "MESHCA_DATABASE_URL") == _secret_env(
        _meshca_container(), "MESHCA_DATABASE_URL"
    )
    assert container["securityContext"] == _meshca_container()["securityContext"]


def _decodes_to_a_key(text: str) -> bool:
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            if len(decode(text.strip())) == 32:
                return True
        except (binascii.Error, ValueError):
            pass
    return False


def test_example_secrets_hold_only_placeholders() -> None:
    key = _only("Secret", "meshca-key-encryption-key")["stringData"]["key-encryption-key"]
    # Applied by mistake, a real-looking key would seal the CA keys with a published key.
    assert not _decodes_to_a_key(key), "the example key-encryption key must be unusable"
    url = _only("Secret", "meshca-database")["stringData"]["url"]
    assert "REPLACE_ME" in url
    assert ".invalid" in url


@pytest.mark.parametrize("text", ["REPLACE_ME", "", "c2hvcnQ="])
def test_placeholder_check_rejects_non_keys(text: str) -> None:
    assert not _decodes_to_a_key(text)


def test_placeholder_check_sees_a_real_key() -> None:
    assert _decodes_to_a_key(base64.b64encode(bytes(range(32))).decode() + "\n")


def test_proxy_example_calls_the_service_with_an_accepted_audience() -> None:
    service = _only("Service", "meshca-ca")
    pod = _only("Pod", file="proxy-token-example.yaml")
    proxy = _container(pod["spec"], "proxy")
    (ca_addr,) = [e["value"] for e in proxy["env"] if e["name"] == "CA_ADDR"]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert ca_addr == f"{name}.{namespace}.svc:{grpc_port}"
    audiences = [
        source["serviceAccountToken"]["audience"]
        for volume in pod["spec"]["volumes"]
        for source in volume.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in source
    ]
    assert audiences
    assert set(audiences) <= set(_config()["k8s-audience"])
