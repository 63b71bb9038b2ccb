"""deploy/kubernetes/aggregators: N `fedctl aggregator serve` shards beside the coordinator.
Checked offline as test_manifests.py checks the base: each object against the Kubernetes
schema, the coordinator patch merged over the base as `kubectl apply -k` merges it, and the
pieces fit (the shards' flags are ones `aggregator serve` has, the coordinator's
--aggregator list names every shard in ordinal order at its port, both sides mount the one
shard key, every Secret reference resolves)."""

from __future__ import annotations

import re
from typing import Any

import pydantic
import pytest
import yaml
from kubernetes import client as k8s
from test_manifests import (
    KUBERNETES,
    InvalidManifest,
    _manifests,
    _serve_parser,
    strategic_merge,
    validate,
)

from core.shards import parse_key
from fedctl.main import build_parser

OVERLAY = KUBERNETES.parent / "aggregators"
SHARD_COMMAND = ["fedctl", "aggregator", "serve"]


def _validate(document: dict[str, Any], where: str) -> None:
    """The base's validation, plus StatefulSet (a kind only this overlay holds)."""
    if document.get("kind") != "StatefulSet":
        validate(document, where)
        return
    assert document.get("apiVersion") == "apps/v1", where
    try:
        k8s.V1StatefulSet.model_validate(document)
    except pydantic.ValidationError as exc:
        raise InvalidManifest(f"{where} (StatefulSet): {exc}") from None


def _kustomization() -> dict[str, Any]:
    data = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    """The overlay's objects: the base's, its own resources, the patches merged in."""
    kustomization = _kustomization()
    assert kustomization["resources"][0] == "../base"
    objects = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    for name in kustomization["resources"][1:]:
        for i, document in enumerate(d for d in yaml.safe_load_all((OVERLAY / name).read_text())
                                     if d is not None):
            _validate(document, f"aggregators/{name}[{i}]")
            key = (document["kind"], document["metadata"]["name"])
            assert key not in objects, f"{name} redefines {key}"
            objects[key] = document
    for entry in kustomization["patches"]:
        (patch,) = [d for d in yaml.safe_load_all((OVERLAY / entry["path"]).read_text()) if d]
        key = (patch["kind"], patch["metadata"]["name"])
        assert key in objects, f"{entry['path']} patches {key}, which is not there"
        objects[key] = strategic_merge(objects[key], patch)
    for (kind, name), document in objects.items():
        _validate(document, f"aggregators: {kind} {name}")
    return objects


def _shards() -> dict[str, Any]:
    return _objects()[("StatefulSet", "fedcoord-aggregator")]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in workload["spec"]["template"]["spec"]["containers"]
                    if c["name"] == name]
    return container


def _coordinator() -> dict[str, Any]:
    return _container(_objects()[("Deployment", "fedcoord-coordinator")], "coordinator")


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _mounted_file(workload: dict[str, Any], container: dict[str, Any], path: str
                  ) -> tuple[dict[str, Any], str]:
    """The volume ``path`` is in, and the file's name in it."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return volumes[mount["name"]], path[len(mount["mountPath"].rstrip("/")) + 1:]
    raise InvalidManifest(f"{path} is in no volume of {container['name']}")


def _secret_item(volume: dict[str, Any], file: str) -> tuple[str, str]:
    """(Secret name, key) that ``file`` of a Secret volume holds."""
    secret = volume["secret"]
    (key,) = [i["key"] for i in secret["items"] if i["path"] == file]
    return secret["secretName"], key


def _shard_args(index: int = 0) -> Any:
    args = [a.replace("$(POD_INDEX)", str(index)) for a in _container(_shards(), "aggregator")
            ["args"]]
    return build_parser().parse_args([*SHARD_COMMAND[1:], *args])


def test_the_kustomization_lists_every_manifest_of_the_folder() -> None:
    kustomization = _kustomization()
    listed = {*kustomization["resources"][1:], *(p["path"] for p in kustomization["patches"])}
    present = {p.name for p in OVERLAY.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present


def test_every_object_of_the_overlay_is_valid() -> None:
    kinds = {kind for kind, _ in _objects()}
    assert {"StatefulSet", "Service", "Secret", "Deployment"} <= kinds


def test_the_validator_refuses_a_misspelt_statefulset_field() -> None:
    shards = yaml.safe_load((OVERLAY / "statefulset.yaml").read_text())
    shards["spec"]["servicename"] = shards["spec"].pop("serviceName")
    with pytest.raises(InvalidManifest, match=r"spec\.servicename\n  Extra inputs"):
        _validate(shards, "bad")


def test_each_shard_runs_aggregator_serve_with_its_ordinal_as_index() -> None:
    container = _container(_shards(), "aggregator")
    assert container["command"] == SHARD_COMMAND
    assert _flag(container["args"], "--index") == "$(POD_INDEX)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    parsed = _shard_args(3)
    assert parsed.index == 3 and parsed.func.__name__ == "cmd_aggregator_serve"
    assert parsed.host == "0.0.0.0" and parsed.tls_dir is not None and not parsed.insecure


def test_the_coordinator_names_every_shard_in_ordinal_order_at_its_port() -> None:
    shards, objects = _shards(), _objects()
    service = objects[("Service", shards["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None", "each shard is reached on its own"
    (port,) = service["spec"]["ports"]
    container = _container(shards, "aggregator")
    (container_port,) = container["ports"]
    assert port["targetPort"] == container_port["name"]
    assert container_port["containerPort"] == _shard_args().port == port["port"]
    args = _coordinator()["args"]
    parsed = _serve_parser().parse_args(args)
    expected = [f"{shards['metadata']['name']}-{i}.{service['metadata']['name']}:{port['port']}"
                for i in range(shards["spec"]["replicas"])]
    assert parsed.aggregator == expected
    assert _flag(args, "--http-port") == "8080", "the base's flags are kept"


def test_the_coordinator_mounts_the_master_key_and_each_shard_its_own() -> None:
    deployment = _objects()[("Deployment", "fedcoord-coordinator")]
    coordinator_key = _secret_item(*_mounted_file(
        deployment, _coordinator(), _flag(_coordinator()["args"], "--shard-key-file")))
    assert coordinator_key == ("fedcoord-shard-key", "shard.key")
    shards = _shards()
    for index in range(shards["spec"]["replicas"]):
        shard_key = _secret_item(*_mounted_file(
            shards, _container(shards, "aggregator"), str(_shard_args(index).key_file)))
        assert shard_key == ("fedcoord-shard-keys", f"shard-{index}.key")
    coordinator_volumes = {v["name"]: v for v in
                           deployment["spec"]["template"]["spec"]["volumes"]}
    assert all(v.get("secret", {}).get("secretName") != "fedcoord-shard-keys"
               for v in coordinator_volumes.values()), "the coordinator needs the master only"
    shard_volumes = shards["spec"]["template"]["spec"]["volumes"]
    assert all(v.get("secret", {}).get("secretName") != "fedcoord-shard-key"
               for v in shard_volumes), "no shard holds the master key"


def test_the_coordinator_checks_the_shards_against_the_ca_of_their_certificate() -> None:
    deployment = _objects()[("Deployment", "fedcoord-coordinator")]
    ca = _secret_item(*_mounted_file(deployment, _coordinator(),
                                     _flag(_coordinator()["args"], "--shard-ca")))
    tls_dir = str(_shard_args().tls_dir)
    shards = _shards()
    volume, _ = _mounted_file(shards, _container(shards, "aggregator"), tls_dir + "/server.crt")
    assert {i["path"] for i in volume["secret"]["items"]} == {"server.crt", "server.key"}
    assert ca == (volume["secret"]["secretName"], "ca.crt")


def test_every_secret_reference_resolves_and_every_volume_is_mounted() -> None:
    objects = _objects()
    secrets = {name: d for (kind, name), d in objects.items() if kind == "Secret"}
    for workload in (_shards(), objects[("Deployment", "fedcoord-coordinator")]):
        pod = workload["spec"]["template"]["spec"]
        mounted = {m["name"] for c in [*pod.get("initContainers", []), *pod["containers"]]
                   for m in c.get("volumeMounts", [])}
        for volume in pod["volumes"]:
            assert volume["name"] in mounted, f"volume {volume['name']} is never mounted"
            if "secret" in volume:
                secret = secrets[volume["secret"]["secretName"]]
                keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
                assert {i["key"] for i in volume["secret"]["items"]} <= keys, volume
                assert volume["secret"]["defaultMode"] & 0o007 == 0


def test_the_shards_spool_is_writable_and_nothing_runs_as_root() -> None:
    shards = _shards()
    pod = shards["spec"]["template"]["spec"]
    container = _container(shards, "aggregator")
    volume, _ = _mounted_file(shards, container, str(_shard_args().spool_dir) + "/x.upd")
    assert "emptyDir" in volume
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_the_selectors_pick_the_shards_and_not_the_coordinator() -> None:
    objects, shards = _objects(), _shards()
    labels = shards["spec"]["template"]["metadata"]["labels"]
    assert shards["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects[("Service", shards["spec"]["serviceName"])]
    assert service["spec"]["selector"].items() <= labels.items()
    coordinator_labels = objects[("Deployment", "fedcoord-coordinator")]["spec"]["template"][
        "metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= coordinator_labels.items()
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", shards["metadata"]["name"])


def test_the_placeholders_are_no_keys_so_nothing_starts_with_them() -> None:
    objects = _objects()
    placeholders = [objects[("Secret", "fedcoord-shard-key")]["stringData"]["shard.key"],
                    *objects[("Secret", "fedcoord-shard-keys")]["stringData"].values()]
    for placeholder in placeholders:
        with pytest.raises(ValueError, match="a shard key is 32 bytes or 64 hex characters"):
            parse_key(placeholder.encode())
