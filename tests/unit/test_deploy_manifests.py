"""Checks of the Kubernetes deployment files under deploy/kubernetes/: every YAML document is validated
field by field against the official `kubernetes` Python client's models (cert-manager's objects against
the part of its v1 API they use), a misspelled field fails, and the files agree with each other and with
the label contract of issue 15 (selectors, node label, /dev/fuse, Bidirectional propagation)."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes.client as k8s_client
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
POD_LABEL = ("lazysnap.io/image-accelerate-mode", "on-demand")
NODE_LABEL = ("lazysnap.io/image-accelerate-enabled", "true")
STATE_ROOT = "/var/lib/lazysnap"
SOCKET_DIR = "/run/lazysnap"

# Objects outside the core API: cert-manager.io/v1 (the fields of its CRDs that these files may use;
# a field missing here fails like a misspelled one) and kustomize's Kustomization.
CERT_MANAGER_SCHEMA: dict[str, Any] = {
    "Issuer": {"selfSigned": {"crlDistributionPoints": [str]}, "ca": {"secretName": str}},
    "Certificate": {
        "secretName": str,
        "commonName": str,
        "dnsNames": [str],
        "ipAddresses": [str],
        "duration": str,
        "renewBefore": str,
        "isCA": bool,
        "usages": [str],
        "privateKey": {"algorithm": str, "size": int, "encoding": str, "rotationPolicy": str},
        "issuerRef": {"name": str, "kind": str, "group": str},
        "secretTemplate": {"labels": {str: str}, "annotations": {str: str}},
    },
}
META_SCHEMA: dict[str, Any] = {"name": str, "namespace": str, "labels": {str: str}, "annotations": {str: str}}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images"}


class ManifestError(AssertionError):
    """A manifest that Kubernetes (or cert-manager) would reject, with the path of the field at fault."""


def _check_model(value: Any, type_name: str, where: str) -> None:
    """Walk `value` against the client's type string, rejecting keys the model does not declare."""
    if type_name == "object":  # IntOrString, RawExtension and the like: anything goes
        return
    if m := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check_model(item, m.group(1), f"{where}[{i}]")
        return
    if m := re.fullmatch(r"dict\((\w+), (.+)\)|Dict\[(\w+), (.+)\]", type_name):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
        for key, item in value.items():
            _check_model(item, m.group(2) or m.group(4), f"{where}.{key}")
        return
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "bytes": str}
    if type_name in scalars:
        # YAML turns an unquoted true or 3 into a bool or int: the API server rejects them for strings.
        if not isinstance(value, scalars[type_name]) or (type_name != "bool" and isinstance(value, bool)):
            raise ManifestError(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    model = getattr(k8s_client, type_name)
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a {type_name} mapping, got {type(value).__name__}")
    json_to_attr = {key: attr for attr, key in model.attribute_map.items()}
    for key, item in value.items():
        if key not in json_to_attr:
            known = ", ".join(sorted(json_to_attr))
            raise ManifestError(f"{where}: unknown field {key!r} of {type_name} (known: {known})")
        _check_model(item, model.openapi_types[json_to_attr[key]], f"{where}.{key}")


def _model_name(doc: dict) -> str:
    """The client's model class for the document's apiVersion and kind, checked against its API group."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, version = api_version.rpartition("/")
    name = f"{version.capitalize()}{kind}"
    if not hasattr(k8s_client, name):
        raise ManifestError(f"{kind} {api_version}: no such object in the kubernetes client's models")
    # The group's API class must be able to create this kind (Deployment is apps/v1, not v1).
    api_name = "".join(p.capitalize() for p in (group.split(".")[0] or "core", version)) + "Api"
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()
    api = getattr(k8s_client, api_name, None)
    if api is None or not (hasattr(api, f"create_{snake}") or hasattr(api, f"create_namespaced_{snake}")):
        raise ManifestError(f"{kind} is not served under apiVersion {api_version}")
    return name


def _check_schema(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
        if list(schema) == [str]:
            for key, item in value.items():
                _check_schema(item, schema[str], f"{where}.{key}")
            return
        for key, item in value.items():
            if key not in schema:
                raise ManifestError(f"{where}: unknown field {key!r} (known: {', '.join(sorted(schema))})")
            _check_schema(item, schema[key], f"{where}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check_schema(item, schema[0], f"{where}[{i}]")
    elif not isinstance(value, schema) or (schema is not bool and isinstance(value, bool)):
        raise ManifestError(f"{where}: expected {schema.__name__}, got {type(value).__name__} {value!r}")


def validate(doc: dict, where: str) -> None:
    """Raise ManifestError when `doc` has a field, type or kind the API would not accept."""
    if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
        raise ManifestError(f"{where}: not a Kubernetes object (apiVersion and kind are required)")
    where = f"{where}: {doc['kind']} {doc.get('metadata', {}).get('name', '?')}"
    if doc["apiVersion"] == "cert-manager.io/v1":
        if doc["kind"] not in CERT_MANAGER_SCHEMA:
            raise ManifestError(f"{where}: not a cert-manager kind this check knows")
        schema = {
            "apiVersion": str,
            "kind": str,
            "metadata": META_SCHEMA,
            "spec": CERT_MANAGER_SCHEMA[doc["kind"]],
        }
        _check_schema(doc, schema, where)
        return
    name = _model_name(doc)
    _check_model(doc, name, where)
    # The client's own deserializer then checks required fields (a container without a name, ...).
    try:
        k8s_client.ApiClient().deserialize(json.dumps(doc), name, "application/json")
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from None


def manifests() -> list[tuple[str, dict]]:
    """(file#index, document) for every YAML document under deploy/kubernetes/, the Kustomization aside."""
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


def find(kind: str, name: str | None = None) -> dict:
    found = [
        d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} under {DEPLOY}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=[w for w, _ in manifests()])
def test_every_manifest_is_valid(where: str, doc: dict) -> None:
    validate(doc, where)


def test_the_kustomization_installs_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZATION_KEYS, set(kustomization) - KUSTOMIZATION_KEYS
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["resources"][0] == "namespace.yaml"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1].update(
                mountPropogation="Bidirectional"
            ),
            "unknown field 'mountPropogation'",
        ),
        (
            lambda d: d["spec"]["template"]["spec"].update(nodeSelecter={"a": "b"}),
            "unknown field 'nodeSelecter'",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["nodeSelector"].update({NODE_LABEL[0]: True}),
            "expected str",
        ),
        (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"), "V1Container"),
        (lambda d: d.update(apiVersion="v1"), "not served under apiVersion v1"),
        (lambda d: d.update(kind="DaemonSett"), "no such object"),
    ],
    ids=[
        "misspelled-nested",
        "misspelled-pod-spec",
        "unquoted-bool",
        "missing-required",
        "wrong-group",
        "kind",
    ],
)
def test_a_wrong_manifest_is_caught(mutate, message: str) -> None:
    daemonset = copy.deepcopy(find("DaemonSet"))
    validate(copy.deepcopy(daemonset), "node.yaml")  # the original passes
    mutate(daemonset)
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate(daemonset, "node.yaml")


def test_a_misspelled_cert_manager_field_is_caught() -> None:
    certificate = copy.deepcopy(find("Certificate"))
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    with pytest.raises(ManifestError, match="unknown field 'dnsName'"):
        validate(certificate, "cert-manager.yaml")


def test_both_webhook_entries_select_the_pod_label_and_never_fail_a_pod() -> None:
    config = find("MutatingWebhookConfiguration")
    by_selector = {}
    for hook in config["webhooks"]:
        assert hook["failurePolicy"] == "Ignore", hook["name"]
        assert hook["sideEffects"] == "None", hook["name"]
        assert hook["admissionReviewVersions"] == ["v1"], hook["name"]
        assert hook["timeoutSeconds"] == 3, hook["name"]
        assert hook["rules"] == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        for kind in ("objectSelector", "namespaceSelector"):
            if hook.get(kind, {}).get("matchLabels") == dict([POD_LABEL]):
                by_selector[kind] = hook
    assert set(by_selector) == {"objectSelector", "namespaceSelector"}, "one entry per selector"
    assert by_selector["objectSelector"] is not by_selector["namespaceSelector"]
    # A labelled pod in a labelled namespace goes through the namespace entry only.
    exclusions = by_selector["objectSelector"]["namespaceSelector"]["matchExpressions"]
    assert {"key": POD_LABEL[0], "operator": "NotIn", "values": [POD_LABEL[1]]} in exclusions


def test_the_webhook_is_served_with_the_certificate_cert_manager_issues() -> None:
    config = find("MutatingWebhookConfiguration")
    service, certificate = find("Service", "lazysnap-webhook"), find("Certificate")
    namespace = service["metadata"]["namespace"]
    cert_ref = f"{certificate['metadata']['namespace']}/{certificate['metadata']['name']}"
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == cert_ref
    assert f"{service['metadata']['name']}.{namespace}.svc" in certificate["spec"]["dnsNames"]
    issuer = find("Issuer")
    assert certificate["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    for hook in config["webhooks"]:
        target = hook["clientConfig"]["service"]
        assert (target["name"], target["namespace"]) == (service["metadata"]["name"], namespace)
        assert target["port"] in [p["port"] for p in service["spec"]["ports"]]
        assert target["path"] == "/mutate"  # snapshotter.webhook.server's route

    deployment = find("Deployment", "lazysnap-webhook")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["ports"][0]["containerPort"] == 8443
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == certificate["spec"]["secretName"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert mount["mountPath"] == "/etc/lazysnap/tls" and "subPath" not in mount  # renewals show up
    assert {i["path"] for i in tls["secret"]["items"]} == {"tls.crt", "tls.key"}


def test_the_webhook_config_is_valid_and_names_the_labels_the_selectors_match(tmp_path: Path) -> None:
    from snapshotter.webhook.config import load_config

    path = tmp_path / "webhook.toml"
    path.write_text(find("ConfigMap", "lazysnap-webhook-config")["data"]["webhook.toml"])
    config = load_config(path)
    assert (config.mode_key, config.mode_value) == POD_LABEL
    assert (config.node_key, config.node_value) == NODE_LABEL
    assert config.listen.endswith(":8443")
    assert (str(config.cert_file), str(config.key_file)) == (
        "/etc/lazysnap/tls/tls.crt",
        "/etc/lazysnap/tls/tls.key",
    )
    assert str(config.docker_config).startswith("/etc/lazysnap/registry/")


def test_the_node_daemonset_runs_on_accelerated_nodes_with_fuse_and_shared_mounts(tmp_path: Path) -> None:
    daemonset = find("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == dict([NODE_LABEL])
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod.get("hostPID") is False
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    # the daemon under `lazysnap supervise`, which keeps its FUSE descriptor across crashes
    assert container["command"] == [
        "lazysnap",
        "supervise",
        "--",
        "lazysnap",
        "serve",
        "--config",
        "/etc/lazysnap/config.toml",
    ]
    assert container["readinessProbe"]["exec"]["command"] == ["lazysnap", "status", "--root", STATE_ROOT]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    fuse = mounts["/dev/fuse"]
    assert volumes[fuse["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    state = mounts[STATE_ROOT]
    assert volumes[state["name"]]["hostPath"]["path"] == STATE_ROOT
    assert state["mountPropagation"] == "Bidirectional"
    assert volumes[mounts[SOCKET_DIR]["name"]]["hostPath"]["path"] == SOCKET_DIR

    # The ConfigMap is a valid `lazysnap serve` configuration whose root and socket are the shared paths.
    from snapshotter.daemon.config import load

    toml_text = find("ConfigMap", "lazysnap-node-config")["data"]["config.toml"]
    path = tmp_path / "config.toml"
    path.write_text(toml_text)
    cfg = load(path)
    assert cfg.root == STATE_ROOT
    assert Path(cfg.address).parent == Path(SOCKET_DIR)
    cfg.validate("node.yaml")


def test_the_containerd_snippet_dials_the_socket_the_daemonset_shares() -> None:
    snippet = (DEPLOY.parents[1] / "systemd" / "containerd-lazysnap.toml").read_text()
    plugin = tomllib.loads(snippet)["proxy_plugins"]["lazysnap"]
    assert Path(plugin["address"]).parent == Path(SOCKET_DIR)
    readme = (DEPLOY / "README.md").read_text()
    assert "systemd/containerd-lazysnap.toml" in readme and "systemctl restart containerd" in readme
