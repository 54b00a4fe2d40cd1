"""convertd's service logic without a registry: what counts as already accelerated or not an image, which
errors are worth a retry, the worker loop, and a stop in the middle of a job giving it back."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import trio

from fuse.formats.spec import CHUNKED_CHECKSUM, TOC_DIGEST
from fuse.registry import ManifestError, NotFound, Reference, Unavailable
from snapshotter.convert.converter import ConvertError
from snapshotter.convert.tar import TarFormatError
from snapshotter.convertd.config import Config, RepositoryRule
from snapshotter.convertd.jobs import Job, JobStore, Push
from snapshotter.convertd.service import Convertd, Skip, _describe, _permanent, inspect

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """Just enough of RegistryClient for inspect(): manifests by digest."""

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}

    def add(self, doc: dict) -> str:
        body = json.dumps(doc).encode()
        self.manifests[digest(body)] = (body, doc["mediaType"])
        return digest(body)

    async def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        if ref.digest not in self.manifests:
            raise NotFound(f"manifest {ref} not found")
        body, media_type = self.manifests[ref.digest]
        return body, media_type, ref.digest


def image(
    config_type: str = "application/vnd.oci.image.config.v1+json", annotations: list | None = None
) -> dict:
    layers = [
        {"mediaType": GZIP, "digest": "sha256:" + f"{i}" * 64, "size": 10, "annotations": a}
        for i, a in enumerate(annotations or [{}, {}])
    ]
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": "sha256:" + "c" * 64, "size": 2},
        "layers": layers,
    }


def index(*digests: str, attestation: str | None = None) -> dict:
    manifests = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": d,
            "size": 1,
            "platform": {"os": "linux", "architecture": f"a{i}"},
        }
        for i, d in enumerate(digests)
    ]
    if attestation:
        platform = {"os": "unknown", "architecture": "unknown"}
        manifests.append({"mediaType": OCI_MANIFEST, "digest": attestation, "size": 1, "platform": platform})
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}


async def verdict(reg: FakeRegistry, top: str) -> str | None:
    try:
        await inspect(reg, Reference("r:5000", "team/app", "v1", top))  # type: ignore[arg-type]
    except Skip as e:
        return str(e)
    return None


async def test_what_needs_no_conversion() -> None:
    reg = FakeRegistry()
    plain = reg.add(image())
    estargz = reg.add(image(annotations=[{TOC_DIGEST: "sha256:1"}, {TOC_DIGEST: "sha256:2"}]))
    chunked = reg.add(image(annotations=[{CHUNKED_CHECKSUM: "sha256:1"}, {CHUNKED_CHECKSUM: "sha256:2"}]))
    half = reg.add(image(annotations=[{TOC_DIGEST: "sha256:1"}, {}]))
    artifact = reg.add(image("application/vnd.example.sbom+json"))
    empty = reg.add(image(annotations=[]) | {"layers": []})
    assert await verdict(reg, plain) is None
    assert await verdict(reg, half) is None  # one layer left to accelerate
    assert "already accelerated" in (await verdict(reg, estargz) or "")
    assert "already accelerated" in (await verdict(reg, chunked) or "")
    assert "not a container image" in (await verdict(reg, artifact) or "")
    assert "no layers" in (await verdict(reg, empty) or "")
    assert "deleted before it was converted" in (await verdict(reg, "sha256:" + "f" * 64) or "")
    # indexes: converted when any manifest needs it; attestations do not count
    assert await verdict(reg, reg.add(index(estargz, plain))) is None
    both = await verdict(reg, reg.add(index(estargz, chunked, attestation=artifact)))
    assert both is not None and "already accelerated" in both
    assert "not a container image" in (await verdict(reg, reg.add(index(artifact))) or "")
    assert "no image manifests" in (await verdict(reg, reg.add(index(attestation=artifact))) or "")
    with pytest.raises(ManifestError, match="nested"):
        await verdict(reg, reg.add(index(reg.add(index(plain)))))


def test_which_errors_are_retried() -> None:
    def wrapped(cause: BaseException) -> ConvertError:
        try:
            raise cause
        except BaseException as e:
            try:
                raise ConvertError(f"converting: {e}") from e
            except ConvertError as outer:
                return outer

    assert _permanent(wrapped(ManifestError("no manifest for platform linux/s390x")))
    assert _permanent(wrapped(TarFormatError("truncated tar")))
    assert not _permanent(wrapped(Unavailable("registry down")))
    assert not _permanent(OSError("disk full"))
    assert _describe(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"
    assert _describe(Unavailable("registry down")) == "registry down"


def app(tmp_path: Path, **config) -> Convertd:
    cfg = Config(state_dir=tmp_path, repositories=(RepositoryRule("**"),), **config)
    return Convertd(cfg, JobStore(tmp_path / "jobs.db"))


def queue(service: Convertd, *tags: str) -> None:
    pushes = [Push("r:5000", "team/app", digest(tag.encode()), OCI_MANIFEST, tag, 1, {}) for tag in tags]
    service.store.enqueue(pushes, time.time())


async def test_a_stop_during_a_job_gives_it_back(tmp_path: Path) -> None:
    service = app(tmp_path)
    queue(service, "v1")
    job = service.store.claim(time.time())
    assert job is not None and job.attempts == 1
    started = trio.Event()

    async def forever(_job: Job) -> str:
        started.set()
        await trio.sleep_forever()
        return "converted"

    service._work = forever  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.attempt, job)
        await started.wait()
        nursery.cancel_scope.cancel()
    back = service.store.get(job.id)
    assert back is not None and (back.state, back.attempts) == ("queued", 0)


async def test_workers_run_every_due_job(tmp_path: Path) -> None:
    service = app(tmp_path, concurrency=2)
    ran: list[str] = []

    async def work(job: Job) -> str:
        ran.append(job.pending_tags[0].tag)
        if job.pending_tags[0].tag == "bad":
            raise ManifestError("unsupported")
        await service.db(service.store.tag_done, job.id, job.pending_tags[0])  # the DB thread's connection
        return "retagged"

    service._work = work  # type: ignore[method-assign]
    queue(service, "a", "b", "bad")

    async def counts() -> dict[str, int]:  # the connection is shared: through the service's DB thread
        return await service.db(service.store.counts)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run_workers)
            while (await counts())["queued"] or (await counts())["running"]:
                await trio.sleep(0.01)
            await service.db(queue, service, "c")  # arrives later: the notify wakes the workers
            service.notify()
            while (await counts())["done"] < 3:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert sorted(ran) == ["a", "b", "bad", "c"]
    assert service.store.counts() == {"queued": 0, "running": 0, "done": 3, "failed": 1, "skipped": 0}
    failed = service.store.list(state="failed")[0]
    assert failed.attempts == 1 and failed.reason == "unsupported"  # permanent: no retry
    sample = service.metrics.registry.get_sample_value
    assert sample("lazysnap_convertd_conversions_total", {"outcome": "retagged"}) == 3
    assert sample("lazysnap_convertd_conversions_total", {"outcome": "failed"}) == 1
