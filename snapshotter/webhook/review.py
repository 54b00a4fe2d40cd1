"""The webhook's decisions, with no I/O: an AdmissionReview in, the images to look up, and the response
(a JSONPatch and warnings) out once the lookups are answered.

Two steps, so that the server can run every registry lookup of a pod at once under one budget:
`parse` checks the review (BadReview -> HTTP 400) and `wanted` lists the accelerated references to look
up; `respond` takes what the lookups found (True: exists, False: does not, None: no answer) and builds
the `admission.k8s.io/v1` response. Admission is always allowed: a pod is never refused, only left alone.

Rewrites keep the pod's own spelling of the image: `nginx:1.25` -> `nginx:1.25_accelerated`, `nginx`
-> `nginx:latest_accelerated`, `repo@sha256:H` (or `repo:tag@sha256:H`) -> `repo:sha256-H_accelerated`,
the tag convertd pushes for the source manifest digest H (`digest_tag`).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from fuse.registry import Reference
from fuse.registry.errors import ReferenceError
from snapshotter.convert.image import MAX_TAG, SUFFIX, digest_tag

API_VERSION = "admission.k8s.io/v1"
DIGEST_TAG_ALGORITHM = "sha256"
# pod spec lists whose images are rewritten (ephemeral containers are added later, by another API)
CONTAINER_LISTS = ("initContainers", "containers")


class BadReview(ValueError):
    """The request body is not an admission.k8s.io/v1 AdmissionReview of a shape we can answer."""


@dataclass(frozen=True)
class Settings:
    suffix: str = SUFFIX
    node_label_key: str = "lazysnap.io/image-accelerate-enabled"
    node_label_value: str = "true"


@dataclass
class Outcome:
    """What `respond` decided: the response body and counts for the metrics."""

    review: dict
    swapped: int = 0
    left: dict[str, int] = field(default_factory=dict)  # reason -> images


def parse(body: bytes) -> dict:
    """The AdmissionReview in `body`; BadReview saying what is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadReview(f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadReview("the body is not a JSON object (expected an AdmissionReview)")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "AdmissionReview":
        raise BadReview(
            f"expected apiVersion {API_VERSION!r} kind 'AdmissionReview', got "
            f"{str(doc.get('apiVersion'))[:60]!r} {str(doc.get('kind'))[:60]!r}"
        )
    request = doc.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("the AdmissionReview has no request with a uid")
    if _is_pod_create(request):
        pod = request.get("object")
        spec = pod.get("spec") if isinstance(pod, dict) else None
        if not isinstance(spec, dict):
            raise BadReview("request.object is not a Pod with a spec")
        for name in CONTAINER_LISTS:
            items = spec.get(name, [])
            if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
                raise BadReview(f"request.object.spec.{name} is not a list of containers")
        if not isinstance(spec.get("nodeSelector", {}), dict | None):
            raise BadReview("request.object.spec.nodeSelector is not an object")
    return doc


def _is_pod_create(request: dict) -> bool:
    kind = request.get("kind") or {}
    return (
        request.get("operation") == "CREATE"
        and isinstance(kind, dict)
        and kind.get("kind") == "Pod"
        and not kind.get("group")
        and not request.get("subResource")
    )


@dataclass(frozen=True)
class _Image:
    path: str  # JSON pointer of the image field
    container: str
    image: str
    accelerated: str | None  # the rewrite to look up; None: left alone for `reason`
    reason: str = ""


def _rewrite(image: str, suffix: str) -> tuple[str | None, str]:
    """(the accelerated reference, "") or (None, why it is left alone)."""
    try:
        ref = Reference.parse(image)
    except ReferenceError as e:
        return None, f"not a valid image reference ({e})"
    name, _, digest = image.partition("@")
    if ref.digest:
        algorithm = ref.digest.partition(":")[0]
        if algorithm != DIGEST_TAG_ALGORITHM:
            return None, f"pinned to a {algorithm} digest (only {DIGEST_TAG_ALGORITHM} ones are mapped)"
        if ref.tag:  # name:tag@digest: the digest decides
            name = name[: name.rfind(":")]
        new = f"{name}:{digest_tag(ref.digest, suffix)}"
    else:
        if ref.tag and ref.tag.endswith(suffix):
            return None, "already accelerated"
        new = image + suffix if name.rfind(":") > name.rfind("/") else f"{image}:latest{suffix}"
    try:
        Reference.parse(new)
    except ReferenceError:
        return None, f"the accelerated tag would be over {MAX_TAG} characters ({new[-140:]})"
    return new, ""


def _images(review: dict, suffix: str) -> list[_Image]:
    request = review["request"]
    if not _is_pod_create(request):
        return []
    spec = request["object"]["spec"]
    out = []
    for list_name in CONTAINER_LISTS:
        for i, container in enumerate(spec.get(list_name) or []):
            image = container.get("image")
            if not isinstance(image, str) or not image:
                continue
            accelerated, reason = _rewrite(image, suffix)
            name = str(container.get("name", i))
            out.append(_Image(f"/spec/{list_name}/{i}/image", name, image, accelerated, reason))
    return out


def wanted(review: dict, settings: Settings) -> list[str]:
    """The accelerated references to look up for a parsed review (none unless it is a Pod CREATE)."""
    return list(dict.fromkeys(i.accelerated for i in _images(review, settings.suffix) if i.accelerated))


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def respond(review: dict, found: dict[str, bool | None], settings: Settings) -> Outcome:
    """The AdmissionReview response for a parsed review, given the lookups' results (`found`)."""
    request = review["request"]
    outcome = Outcome({})
    patch: list[dict] = []
    warnings: list[str] = []

    def leave(image: _Image, reason: str, message: str) -> None:
        outcome.left[reason] = outcome.left.get(reason, 0) + 1
        warnings.append(f"lazysnap: container {image.container}: {image.image} left alone: {message}")

    for image in _images(review, settings.suffix):
        if image.accelerated is None:
            key = "already-accelerated" if image.reason == "already accelerated" else "unsupported"
            leave(image, key, image.reason)
            continue
        result = found.get(image.accelerated)
        if result is None:
            leave(
                image,
                "registry-unavailable",
                f"no answer from the registry for {image.accelerated} (timed out or failed: see the log)",
            )
        elif not result:
            leave(image, "not-accelerated", f"no accelerated copy {image.accelerated} in the registry")
        else:
            patch.append({"op": "replace", "path": image.path, "value": image.accelerated})
            outcome.swapped += 1
    if outcome.swapped:
        key, value = settings.node_label_key, settings.node_label_value
        selector = request["object"]["spec"].get("nodeSelector")
        if not selector:
            patch.append({"op": "add", "path": "/spec/nodeSelector", "value": {key: value}})
        elif key not in selector:
            patch.append({"op": "add", "path": f"/spec/nodeSelector/{_pointer(key)}", "value": value})
        elif selector[key] != value:
            warnings.append(
                f"lazysnap: nodeSelector {key}={selector[key]!r} kept: the pod may run on a node "
                f"without lazy loading (accelerated nodes have {key}={value!r})"
            )
    response: dict = {"uid": request["uid"], "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        response["warnings"] = warnings
    outcome.review = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    return outcome
