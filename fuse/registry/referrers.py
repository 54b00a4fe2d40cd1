"""Artifacts that refer to a manifest through the OCI 1.1 `subject` field: finding them (the referrers
API, or the referrers tag schema where a registry has no such API) and publishing one.

- Finding: `GET /v2/<name>/referrers/<digest>` answers an OCI image index whose `manifests` are the
  referrers. A registry without the API answers 404; then the referrers tag schema applies: the tag
  `<alg>-<hex>` (`sha256-<64 hex>`) of the subject holds an OCI image index listing them, and no tag
  means no referrers. Either way the `artifactType` filter is applied here too (servers may ignore it).
- Publishing: the artifact manifest is pushed by digest. A registry that keeps referrers itself says so
  with an `OCI-Subject` header; otherwise the tag's index is read, the descriptor added (once: entries
  are deduplicated by digest, others kept) and the index pushed back. The registry has no conditional
  PUT, so two writers racing on the tag could drop each other's entry: the tag is read back after the
  write and the update retried (`TAG_UPDATE_ATTEMPTS`) until it lists the new descriptor."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import httpx

from . import manifests
from .bodies import read_capped
from .client import RegistryClient
from .errors import DigestMismatch, ManifestError, NotFound, RegistryError
from .reference import Reference

TAG_UPDATE_ATTEMPTS = 3
SUBJECT_HEADER = "oci-subject"


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag of a subject: "sha256:<hex>" -> "sha256-<hex>"."""
    algorithm, sep, hex_part = digest.partition(":")
    if not sep or not algorithm or not hex_part:
        raise ValueError(f"not a digest: {digest!r}")
    return f"{algorithm}-{hex_part}"[:128]


def _ref(ref: Reference | str) -> Reference:
    return Reference.parse(ref) if isinstance(ref, str) else ref


def _artifact_type(desc: dict) -> str | None:
    return desc.get("artifactType")


async def referrers(
    client: RegistryClient, ref: Reference | str, subject_digest: str, artifact_type: str | None = None
) -> list[dict]:
    """Descriptors of the manifests whose `subject` is `subject_digest` in ref's repository (only those
    of `artifact_type` when given): the referrers API, else the referrers tag schema."""
    ref = _ref(ref)
    found = await _referrers_api(client, ref, subject_digest)
    if found is None:
        found = await _tag_index(client, ref, subject_digest)
    return [d for d in found if artifact_type is None or _artifact_type(d) == artifact_type]


async def _referrers_api(client: RegistryClient, ref: Reference, digest: str) -> list[dict] | None:
    """The referrers API's answer, or None when the registry has no such API (HTTP 404)."""
    what = f"referrers of {ref.name}@{digest}"

    async def handle(resp: httpx.Response) -> list[dict] | None:
        if resp.status_code == 404:
            return None
        client._expect(resp, (200,), what)
        body = await read_capped(resp, manifests.MAX_MANIFEST_SIZE, what)
        doc, kind = manifests.parse(body, resp.headers.get("content-type", manifests.OCI_INDEX), what)
        if kind not in manifests.INDEXES:
            raise ManifestError(f"{what}: the referrers API answered a {kind}, not an image index")
        return doc["manifests"]

    return await client._operation(
        client._call(ref, "GET", "referrers", digest, "pull", handle, headers={"Accept": manifests.OCI_INDEX})
    )


async def _tag_index(client: RegistryClient, ref: Reference, digest: str) -> list[dict]:
    """The manifests listed by the subject's referrers tag; [] when there is no such tag."""
    tagged = ref.with_tag(fallback_tag(digest))
    try:
        body, kind, _ = await client.get_manifest(tagged)
    except NotFound:
        return []
    doc, kind = manifests.parse(body, kind, str(tagged))
    if kind != manifests.OCI_INDEX:
        raise ManifestError(
            f"{tagged}: the referrers tag holds a {kind}, not an OCI image index; remove or fix that tag"
        )
    return doc["manifests"]


async def push_referrer(
    client: RegistryClient,
    ref: Reference | str,
    manifest_bytes: bytes,
    media_type: str,
    subject: dict,
    artifact_type: str,
    replaces: Callable[[dict], bool] | None = None,
) -> dict:
    """Push an artifact manifest (whose `subject` is `subject`) by digest to ref's repository and make it
    findable by `referrers`; returns its descriptor. Its blobs must be pushed already. In the tag
    fallback, referrers for which `replaces(descriptor)` is true are dropped (an earlier run's index)."""
    ref = _ref(ref)
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    manifest = json.loads(manifest_bytes)
    if (manifest.get("subject") or {}).get("digest") != subject["digest"]:
        raise ManifestError(f"artifact {digest} for {ref.name}: its subject is not {subject['digest']}")
    descriptor = {
        "mediaType": media_type,
        "digest": digest,
        "size": len(manifest_bytes),
        "artifactType": artifact_type,
    }
    if manifest.get("annotations"):
        descriptor["annotations"] = manifest["annotations"]
    if await _put_manifest(client, ref.with_digest(digest), manifest_bytes, media_type):
        return descriptor  # the registry keeps the referrers itself
    for _ in range(TAG_UPDATE_ATTEMPTS):
        current = await _tag_index(client, ref, subject["digest"])
        kept = [e for e in current if e.get("digest") == digest or replaces is None or not replaces(e)]
        entries = _dedupe([*kept, descriptor])
        if [e.get("digest") for e in entries] != [e.get("digest") for e in current]:
            index = {"schemaVersion": 2, "mediaType": manifests.OCI_INDEX, "manifests": entries}
            body = json.dumps(index, separators=(",", ":")).encode()
            await client.push_manifest(
                ref.with_tag(fallback_tag(subject["digest"])), body, manifests.OCI_INDEX
            )
        if any(e.get("digest") == digest for e in await _tag_index(client, ref, subject["digest"])):
            return descriptor
    raise RegistryError(
        f"{ref.name}: the referrers tag {fallback_tag(subject['digest'])} kept losing the entry for "
        f"{digest} (another writer updating it at the same time?); run the command again"
    )


def _dedupe(entries: list[dict]) -> list[dict]:
    """Descriptors in order, each digest once (the first kept as it is)."""
    seen: set[str] = set()
    out = []
    for e in entries:
        d = e.get("digest")
        if d in seen:
            continue
        seen.add(d)
        out.append(e)
    return out


async def _put_manifest(client: RegistryClient, ref: Reference, body: bytes, media_type: str) -> bool:
    """PUT a manifest by digest; whether the registry answered with an OCI-Subject header (it then
    maintains the referrers itself). Uses the client's request core, like `push_manifest`, which does
    not return the response's headers."""
    digest = ref.digest

    async def handle(resp: httpx.Response) -> bool:
        client._expect(resp, (201, 200), f"manifest push to {ref}")
        got = resp.headers.get("docker-content-digest")
        if got and got != digest:
            raise DigestMismatch(f"manifest push to {ref}: registry stored it as {got}, sent {digest}")
        return bool(resp.headers.get(SUBJECT_HEADER))

    return await client._operation(
        client._call(
            ref,
            "PUT",
            "manifests",
            digest,
            "push",
            handle,
            content=body,
            headers={"Content-Type": media_type},
            actions="pull,push",
        )
    )
