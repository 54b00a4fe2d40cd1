"""The webhook's decisions (`snapshotter.webhook.review`) on pods made from real `kubectl create
deployment|job|cronjob --dry-run=client -o json` output: each workload's pod template made into a Pod
as its controller would, wrapped in an AdmissionReview, the response's JSONPatch applied and checked.
The helpers (workloads, reviews, applying a patch) are shared with tests/integration/test_webhook.py."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess

import pytest

from snapshotter.webhook import review

H = "ab" * 32
NODE_KEY = "lazysnap.io/image-accelerate-enabled"


def kubectl_workload(kind: str, name: str, *images: str, extra: tuple[str, ...] = ()) -> dict:
    """`kubectl create <kind> <name> --image ... --dry-run=client -o json` (no cluster needed)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    args = ["kubectl", "create", kind, name, *(f"--image={i}" for i in images), "--dry-run=client"]
    out = subprocess.run([*args, "-o", "json", *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def pod_from(workload: dict) -> dict:
    """The Pod a controller creates from the workload's pod template."""
    spec = workload["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if workload["kind"] == "CronJob" else spec["template"]
    metadata = dict(template.get("metadata") or {})
    metadata["generateName"] = f"{workload['metadata']['name']}-"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": copy.deepcopy(template["spec"])}


def admission_review(pod: dict, uid: str = "7d4c1a2e-0000-4000-8000-000000000001", **request) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "object": pod,
            **request,
        },
    }


def apply_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 through the `jsonpatch` library when installed, else the two ops the webhook emits."""
    try:
        import jsonpatch
    except ImportError:
        doc = copy.deepcopy(doc)
        for op in ops:
            assert op["op"] in ("add", "replace"), op
            *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
            target = doc
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target[part]
            if isinstance(target, list):
                index = int(last)
                if op["op"] == "replace":
                    target[index] = op["value"]
                else:
                    target.insert(index, op["value"])
            else:
                assert op["op"] == "add" or last in target, op
                target[last] = op["value"]
        return doc
    return jsonpatch.apply_patch(doc, ops)


def patch_of(response: dict) -> list[dict]:
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


def mutate(
    pod: dict, found: dict[str, bool | None], settings: review.Settings | None = None
) -> tuple[dict, dict]:
    """(the pod after the response's patch, the response) for a review of `pod`, round-tripped as bytes."""
    settings = settings or review.Settings()
    doc = review.parse(json.dumps(admission_review(pod)).encode())
    asked = review.wanted(doc, settings)
    assert set(asked) <= set(found), f"looked up {asked}, the test knows {sorted(found)}"
    out = review.respond(doc, found, settings).review
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    response = out["response"]
    assert response["uid"] == doc["request"]["uid"] and response["allowed"] is True
    return apply_patch(pod, patch_of(response)), response


def images(pod: dict, field: str = "containers") -> list[str]:
    return [c["image"] for c in pod["spec"].get(field, [])]


def test_deployment_tags_are_swapped_the_node_selector_added_and_a_second_review_changes_nothing() -> None:
    pod = pod_from(kubectl_workload("deployment", "web", "nginx:1.25", "registry.example.com/team/api:v2"))
    found = {"nginx:1.25_accelerated": True, "registry.example.com/team/api:v2_accelerated": True}
    mutated, response = mutate(pod, found)
    assert images(mutated) == ["nginx:1.25_accelerated", "registry.example.com/team/api:v2_accelerated"]
    assert mutated["spec"]["nodeSelector"] == {NODE_KEY: "true"}
    assert mutated["metadata"] == pod["metadata"] and "warnings" not in response

    again, response = mutate(mutated, {})
    assert again == mutated and "patch" not in response
    assert all("already accelerated" in w for w in response["warnings"]), response


def test_digest_pinned_and_untagged_images() -> None:
    pinned = f"registry.example.com/team/api@sha256:{H}"
    both = f"registry.example.com/team/web:v1@sha256:{H}"
    pod = pod_from(kubectl_workload("deployment", "pin", pinned, both, "busybox"))
    found = {
        f"registry.example.com/team/api:sha256-{H}_accelerated": True,
        f"registry.example.com/team/web:sha256-{H}_accelerated": True,
        "busybox:latest_accelerated": True,
    }
    mutated, _ = mutate(pod, found)
    assert images(mutated) == list(found)
    assert review.digest_tag(f"sha256:{H}") == f"sha256-{H}_accelerated"


def test_job_init_containers_are_swapped() -> None:
    pod = pod_from(
        kubectl_workload("job", "migrate", "registry.example.com/team/db:v3", extra=("--", "migrate"))
    )
    # kubectl create makes no init containers: add one as a user's manifest would
    pod["spec"]["initContainers"] = [{"name": "wait", "image": "registry.example.com/team/wait:1"}]
    found = {
        "registry.example.com/team/db:v3_accelerated": True,
        "registry.example.com/team/wait:1_accelerated": True,
    }
    mutated, _ = mutate(pod, found)
    assert images(mutated, "initContainers") == ["registry.example.com/team/wait:1_accelerated"]
    assert images(mutated) == ["registry.example.com/team/db:v3_accelerated"]
    assert mutated["spec"]["restartPolicy"] == "Never"


def test_missing_or_unanswered_lookups_leave_the_pod_alone_with_a_warning() -> None:
    pod = pod_from(
        kubectl_workload(
            "cronjob", "nightly", "registry.example.com/team/batch:v1", extra=("--schedule=0 3 * * *",)
        )
    )
    mutated, response = mutate(pod, {"registry.example.com/team/batch:v1_accelerated": False})
    assert mutated == pod and "patch" not in response
    assert "no accelerated copy registry.example.com/team/batch:v1_accelerated" in response["warnings"][0]

    mutated, response = mutate(pod, {"registry.example.com/team/batch:v1_accelerated": None})
    assert mutated == pod and "patch" not in response
    assert "no answer from the registry" in response["warnings"][0]


def test_one_image_swapped_of_two_still_selects_accelerated_nodes() -> None:
    pod = pod_from(kubectl_workload("deployment", "mix", "nginx:1.25", "redis:7"))
    mutated, response = mutate(pod, {"nginx:1.25_accelerated": True, "redis:7_accelerated": False})
    assert images(mutated) == ["nginx:1.25_accelerated", "redis:7"]
    assert mutated["spec"]["nodeSelector"] == {NODE_KEY: "true"}
    assert len(response["warnings"]) == 1 and "redis:7" in response["warnings"][0]


def test_node_selectors_are_merged_and_a_conflicting_one_is_kept_with_a_warning() -> None:
    pod = pod_from(kubectl_workload("deployment", "sel", "nginx:1.25"))
    pod["spec"]["nodeSelector"] = {"kubernetes.io/arch": "amd64"}
    mutated, _ = mutate(pod, {"nginx:1.25_accelerated": True})
    assert mutated["spec"]["nodeSelector"] == {"kubernetes.io/arch": "amd64", NODE_KEY: "true"}
    assert mutate(mutated, {})[0] == mutated  # idempotent with a merged selector too

    pod["spec"]["nodeSelector"] = {NODE_KEY: "false"}
    mutated, response = mutate(pod, {"nginx:1.25_accelerated": True})
    assert mutated["spec"]["nodeSelector"] == {NODE_KEY: "false"}
    assert images(mutated) == ["nginx:1.25_accelerated"]
    assert any("nodeSelector" in w and "'false' kept" in w for w in response["warnings"]), response


def test_label_keys_are_configuration() -> None:
    settings = review.Settings(node_label_key="alibabacloud.com/image-accelerate-enabled")
    pod = pod_from(kubectl_workload("deployment", "ali", "nginx:1.25"))
    mutated, _ = mutate(pod, {"nginx:1.25_accelerated": True}, settings)
    assert mutated["spec"]["nodeSelector"] == {"alibabacloud.com/image-accelerate-enabled": "true"}


def test_other_operations_and_kinds_are_allowed_unchanged() -> None:
    pod = pod_from(kubectl_workload("deployment", "up", "nginx:1.25"))
    for request in (
        {"operation": "UPDATE"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    ):
        doc = review.parse(json.dumps(admission_review(pod, **request)).encode())
        assert review.wanted(doc, review.Settings()) == []
        response = review.respond(doc, {}, review.Settings()).review["response"]
        assert response == {"uid": doc["request"]["uid"], "allowed": True}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).encode(),
            "expected",
        ),
        (
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}
            ).encode(),
            "uid",
        ),
        (json.dumps(admission_review({"spec": {"containers": "nginx"}})).encode(), "spec.containers"),
        (
            json.dumps(admission_review({"spec": {"containers": [], "nodeSelector": []}})).encode(),
            "nodeSelector",
        ),
        (json.dumps(admission_review("pod")).encode(), "not a Pod"),
    ],
)
def test_malformed_reviews_are_refused_with_the_reason(body: bytes, message: str) -> None:
    with pytest.raises(review.BadReview, match=message):
        review.parse(body)


def test_invalid_references_and_overlong_tags_are_left_alone() -> None:
    pod = {
        "spec": {
            "containers": [{"name": "a", "image": "Not/Valid"}, {"name": "b", "image": "x:" + "t" * 120}]
        }
    }
    mutated, response = mutate(pod, {})
    assert mutated == pod and "patch" not in response
    assert "not a valid image reference" in response["warnings"][0]
    assert "over 128 characters" in response["warnings"][1]
