"""deploy/: the Kubernetes manifests are valid objects that fit together, and they configure
`fedctl coordinator serve` only with what it reads.

Validation is offline. The schema is the `kubernetes` client package's typed models, generated
from the Kubernetes OpenAPI spec: pydantic models with strict types that forbid extra fields,
so validating a document against its kind's model refuses an unknown (misspelt) field, a
value of the wrong type and a missing required field, each with its path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from kubernetes import client as k8s

from fedctl.config import CONFIG_ENV, ENV_PREFIX, load_file, settings_of
from fedctl.main import build_parser

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes" / "base"

#: The kinds deploy/ may hold, each with its one apiVersion and client model.
KINDS = {
    "ConfigMap": ("v1", k8s.V1ConfigMap),
    "Deployment": ("apps/v1", k8s.V1Deployment),
    "PersistentVolumeClaim": ("v1", k8s.V1PersistentVolumeClaim),
    "Secret": ("v1", k8s.V1Secret),
    "Service": ("v1", k8s.V1Service),
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^(?=.{1,15}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class InvalidManifest(AssertionError):
    """A manifest that Kubernetes would refuse, or that does not fit the others."""


# -- the schema -----------------------------------------------------------------------------


def validate(document: Any, where: str) -> None:
    """Raises :class:`InvalidManifest` unless ``document`` is a well-formed object of a kind
    deploy/ may hold."""
    if not isinstance(document, dict):
        raise InvalidManifest(f"{where}: a manifest is a mapping, got {type(document).__name__}")
    kind = document.get("kind")
    if kind not in KINDS:
        raise InvalidManifest(f"{where}: kind {kind!r} is not one deploy/ holds "
                              f"({', '.join(KINDS)}; add it to KINDS)")
    api_version, model = KINDS[kind]
    if document.get("apiVersion") != api_version:
        raise InvalidManifest(f"{where}: a {kind} is apiVersion {api_version}, "
                              f"got {document.get('apiVersion')!r}")
    try:
        # Not model.from_dict: it picks the known keys and so drops a misspelt field.
        model.model_validate(document)
    except pydantic.ValidationError as exc:
        raise InvalidManifest(f"{where} ({kind}): {exc}") from None
    name = document.get("metadata", {}).get("name")
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.match(name):
        raise InvalidManifest(f"{where}: metadata.name {name!r} is not a DNS subdomain")


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The documents of one manifest file, each validated."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for i, document in enumerate(documents):
        validate(document, f"{path.name}[{i}]")
    return documents


# -- the manifests ----------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    data = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _manifests() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in _kustomization()["resources"]:
        out.extend(load_documents(KUBERNETES / name))
    return out


def _objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == kind}


def _deployment() -> dict[str, Any]:
    (deployment,) = _objects("Deployment").values()
    return deployment


def _coordinator() -> dict[str, Any]:
    (container,) = [c for c in _deployment()["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "coordinator"]
    return container


def _pod_containers() -> list[dict[str, Any]]:
    pod = _deployment()["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def _secret_keys(secret: dict[str, Any]) -> set[str]:
    return set(secret.get("data", {})) | set(secret.get("stringData", {}))


def _serve_parser() -> Any:
    return build_parser().settings_parsers["coordinator"]


def _config_toml() -> dict[str, Any]:
    text = _objects("ConfigMap")["fedcoord-config"]["data"]["coordinator.toml"]
    data = tomllib.loads(text)
    assert isinstance(data, dict)
    return data["coordinator"]  # type: ignore[no-any-return]


def _http_port() -> int:
    args = _coordinator()["args"]
    return int(args[args.index("--http-port") + 1])


def _container_port(container: dict[str, Any], port: int | str) -> int:
    """A named or numbered port of ``container`` as its number."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise InvalidManifest(f"container {container['name']} has no port {port!r}")


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    listed = _kustomization()["resources"]
    present = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_every_manifest_is_a_valid_kubernetes_object() -> None:
    kinds = {d["kind"] for d in _manifests()}
    assert kinds == set(KINDS)


def test_the_validator_refuses_an_unknown_field_a_wrong_type_and_a_missing_field(
        tmp_path: Path) -> None:
    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolcy"] = container.pop("imagePullPolicy")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    with pytest.raises(InvalidManifest, match=r"containers\.0\.imagePullPolcy\n  Extra inputs"):
        load_documents(bad)

    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    deployment["spec"]["replicas"] = "1"
    bad.write_text(yaml.safe_dump(deployment))
    with pytest.raises(InvalidManifest, match=r"spec\.replicas\n  Input should be a valid int"):
        load_documents(bad)

    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    del deployment["spec"]["template"]["spec"]["containers"]
    bad.write_text(yaml.safe_dump(deployment))
    with pytest.raises(InvalidManifest, match=r"spec\.template\.spec\.containers\n  Field required"):
        load_documents(bad)

    service = yaml.safe_load((KUBERNETES / "service.yaml").read_text())
    service["apiVersion"] = "apps/v1"
    bad.write_text(yaml.safe_dump(service))
    with pytest.raises(InvalidManifest, match="a Service is apiVersion v1"):
        load_documents(bad)


def test_names_are_dns_labels_and_port_names_are_iana_service_names() -> None:
    for document in _manifests():
        if document["kind"] in ("Service", "Deployment"):
            assert _DNS_LABEL.match(document["metadata"]["name"])
    ports = [*_objects("Service")["fedcoord"]["spec"]["ports"],
             *(p for c in _pod_containers() for p in c.get("ports", []))]
    for port in ports:
        assert _PORT_NAME.match(port["name"]), port


def test_one_coordinator_replaced_by_recreate() -> None:
    spec = _deployment()["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"


def test_selectors_match_the_pod_labels() -> None:
    deployment = _deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _objects("Service")["fedcoord"]["spec"]["selector"].items() <= labels.items()


def test_the_probes_use_the_http_port_given_to_serve() -> None:
    container = _coordinator()
    http_port = _http_port()
    assert _container_port(container, "http") == http_port
    probes = {name: container[name] for name in ("startupProbe", "livenessProbe",
                                                  "readinessProbe") if name in container}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for name, probe in probes.items():
        assert _container_port(container, probe["httpGet"]["port"]) == http_port, name


def test_the_service_exposes_the_grpc_and_http_ports() -> None:
    container = _coordinator()
    by_name = {p["name"]: p for p in _objects("Service")["fedcoord"]["spec"]["ports"]}
    assert set(by_name) == {"grpc", "http"}
    assert _container_port(container, by_name["grpc"]["targetPort"]) == _config_toml()["port"]
    assert _container_port(container, by_name["http"]["targetPort"]) == _http_port()


def test_the_args_are_flags_serve_has() -> None:
    parser = _serve_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    flags = [a.split("=", 1)[0] for a in _coordinator()["args"] if a.startswith("-")]
    assert flags
    unknown = set(flags) - known
    assert not unknown, f"flags `fedctl coordinator serve` does not have: {sorted(unknown)}"
    parser.parse_args(_coordinator()["args"])


def test_the_env_names_settings_serve_reads() -> None:
    readable = {s.env for s in settings_of(_serve_parser()).values()} | {CONFIG_ENV}
    for container in _pod_containers():
        names = {e["name"] for e in container.get("env", []) if e["name"].startswith(ENV_PREFIX)}
        unknown = names - readable
        assert not unknown, f"{container['name']}: serve reads no {sorted(unknown)}"
    env = {e["name"]: e for e in _coordinator()["env"]}
    assert env["FEDCOORD_DB"]["valueFrom"]["secretKeyRef"] == {"name": "fedcoord-database",
                                                               "key": "url"}


def test_the_config_file_loads_as_serve_settings(tmp_path: Path) -> None:
    env = {e["name"]: e.get("value") for e in _coordinator()["env"]}
    mounts = {m["name"]: m["mountPath"] for m in _coordinator()["volumeMounts"]}
    assert env[CONFIG_ENV] == f"{mounts['config']}/coordinator.toml"
    path = tmp_path / "coordinator.toml"
    path.write_text(_objects("ConfigMap")["fedcoord-config"]["data"]["coordinator.toml"])
    loaded = load_file(path, {"coordinator": settings_of(_serve_parser())})["coordinator"]
    assert loaded["host"] == "0.0.0.0"
    assert "db" not in loaded, "the database URL holds a password: it comes from a Secret"


def test_every_reference_names_an_object_in_deploy() -> None:
    secrets, config_maps = _objects("Secret"), _objects("ConfigMap")
    claims = _objects("PersistentVolumeClaim")
    pod = _deployment()["spec"]["template"]["spec"]
    for container in _pod_containers():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] in secrets, ref
                assert ref["key"] in _secret_keys(secrets[ref["name"]]), ref
        volumes = {v["name"] for v in pod["volumes"]}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, mount
    mounted = {m["name"] for c in _pod_containers() for m in c.get("volumeMounts", [])}
    for volume in pod["volumes"]:
        assert volume["name"] in mounted, f"volume {volume['name']} is never mounted"
        if "secret" in volume:
            keys = _secret_keys(secrets[volume["secret"]["secretName"]])
            assert {i["key"] for i in volume["secret"].get("items", [])} <= keys, volume
        if "configMap" in volume:
            data = config_maps[volume["configMap"]["name"]]["data"]
            assert {i["key"] for i in volume["configMap"].get("items", [])} <= set(data), volume
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims, volume


def test_the_paths_serve_reads_and_writes_are_mounted_where_the_config_says() -> None:
    config = _config_toml()
    pod = _deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _coordinator()["volumeMounts"]}
    # --tls DIR reads DIR/server.crt and DIR/server.key.
    tls = volumes[mounts[config["tls"]]["name"]]["secret"]
    assert {i["path"] for i in tls["items"]} == {"server.crt", "server.key"}
    # The store is the claim, writable.
    store = mounts[config["store"]]
    assert "persistentVolumeClaim" in volumes[store["name"]]
    assert not store.get("readOnly", False)
    # The admin token file: written 0600 by the init container into a volume serve reads.
    token = Path(config["admin_token_file"])
    run = mounts[str(token.parent)]
    assert not run.get("readOnly", False)
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["install", "-m", "0600"]
    assert init["command"][-1] == str(token)
    assert run["name"] in {m["name"] for m in init["volumeMounts"]}
    assert "/tmp" in mounts, "Python and matplotlib need a writable /tmp"


def test_nothing_runs_as_root_or_writes_its_root_filesystem() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for container in _pod_containers():
        context = container["securityContext"]
        assert context.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o007 == 0, "Secrets unreadable to others"


# -- the image ------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_installs_the_makefiles_cpu_torch_and_runs_serve_as_non_root() -> None:
    dockerfile = _dockerfile()
    makefile_torch = re.search(r"^TORCH := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_torch is not None
    assert re.search(rf"pip install {re.escape(makefile_torch.group(1))} "
                     r"--index-url https://download\.pytorch\.org/whl/cpu\b", dockerfile)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0] == str(_deployment()["spec"]["template"]["spec"]
                                          ["securityContext"]["runAsUser"])
    entrypoint = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)
    assert json.loads(entrypoint[-1]) == ["fedctl", "coordinator", "serve"]
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)
               for p in line.split()}
    assert exposed == {p["containerPort"] for p in _coordinator()["ports"]}


def test_the_image_env_names_settings_serve_reads() -> None:
    readable = {s.env for s in settings_of(_serve_parser()).values()}
    names = set(re.findall(r"\b(FEDCOORD_[A-Z_]+)=", _dockerfile()))
    assert names and not names - readable


def test_the_build_context_holds_every_package_pyproject_installs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]
                ["include"]}
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", _dockerfile(), re.M))
    assert packages <= allowed and packages == copied
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= allowed


# -- the replicas overlay (deploy/kubernetes/replicas) ----------------------------------------

REPLICAS = DEPLOY / "kubernetes" / "replicas"


def strategic_merge(base: Any, patch: Any) -> Any:
    """What ``kubectl apply -k`` makes of ``patch`` over ``base``, for the shapes deploy/ uses:
    mappings merge key by key, lists of named mappings (containers, env, ports, volumes)
    merge by name, other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in [*base, *patch])):
        merged = {x["name"]: x for x in base}
        for x in patch:
            merged[x["name"]] = strategic_merge(merged[x["name"]], x) if x["name"] in merged \
                else x
        return list(merged.values())
    return patch


def _replicas_objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((REPLICAS / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../base"]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    for entry in kustomization["patches"]:
        (patch,) = [d for d in yaml.safe_load_all((REPLICAS / entry["path"]).read_text()) if d]
        key = (patch["kind"], patch["metadata"]["name"])
        assert key in objects, f"{entry['path']} patches {key}, which the base does not hold"
        objects[key] = strategic_merge(objects[key], patch)
    for (kind, name), document in objects.items():
        validate(document, f"replicas: {kind} {name}")
    return objects


def test_the_replicas_overlay_runs_serve_as_leader_and_standbys() -> None:
    objects = _replicas_objects()
    deployment = objects[("Deployment", "fedcoord-coordinator")]
    assert deployment["spec"]["replicas"] >= 2
    # A new pod starts as a standby; the old leader hands its lease over when stopped.
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "coordinator"]
    args = container["args"]
    parsed = _serve_parser().parse_args(args)
    assert parsed.replica is True
    # The advertised address is the pod's own, from an env var Kubernetes expands.
    advertise = args[args.index("--advertise") + 1]
    assert advertise == "$(POD_IP):7070"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {"FEDCOORD_CONFIG", "FEDCOORD_DB"} <= env.keys()  # the base's env is kept
    # Only the leader is ready (a standby's /readyz is 503): the Service reaches it alone.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert int(args[args.index("--http-port") + 1]) == _container_port(container, "http")
    # Every replica mounts the one model store.
    pvc = objects[("PersistentVolumeClaim", "fedcoord-store")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"] == _objects("PersistentVolumeClaim")["fedcoord-store"][
        "spec"]["resources"]


def test_the_strategic_merge_of_the_test_merges_named_lists_by_name() -> None:
    base = {"containers": [{"name": "a", "args": ["x"], "env": [{"name": "E", "value": "1"}]}]}
    patch = {"containers": [{"name": "a", "args": ["y"], "env": [{"name": "F", "value": "2"}]}]}
    assert strategic_merge(base, patch) == {"containers": [{
        "name": "a", "args": ["y"], "env": [{"name": "E", "value": "1"},
                                             {"name": "F", "value": "2"}]}]}


# -- kustomize itself ----------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["base", "replicas", "aggregators"])
def test_kubectl_renders_every_kustomization(folder: str) -> None:
    """What `kubectl apply -k` reads: kustomize itself must accept the folder (the tests above
    merge the patches as it would, but only kustomize knows its own rules: an overlay inside
    its base's folder was a cycle it refused)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomize's own check is skipped")
    rendered = subprocess.run([kubectl, "kustomize", str(DEPLOY / "kubernetes" / folder)],
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered.stdout) if d]
    assert "Deployment" in kinds and "Service" in kinds
    if folder == "aggregators":
        assert "StatefulSet" in kinds
