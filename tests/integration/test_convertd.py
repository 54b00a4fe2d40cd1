"""`lazysnap convertd` against the real registry, driven by its real notifications: enabled repositories
are converted once, nothing loops, a crash loses no accepted job, and everything that cannot be converted
is answered correctly and stays visible in /jobs."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from fuse.formats.spec import CHUNKED_CHECKSUM, TOC_DIGEST
from fuse.registry import Credentials, CredentialStore, HostsConfig, Reference, RegistryClient
from tests.harness import images as im
from tests.harness.auth import htpasswd_config
from tests.harness.convertd import (
    Convertd,
    delete_manifest,
    get_manifest,
    registry_tags,
    wait_for,
    wait_tag,
)
from tests.harness.procs import free_port
from tests.harness.registry import Registry, anonymous_client

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
CONVERTED = 'lazysnap_convertd_conversions_total{outcome="converted"}'


def image(name: str, size: int = 64 << 10) -> im.Image:
    return im.Image(
        [
            im.Layer(
                [
                    im.Dir("etc"),
                    im.File("etc/name", name.encode()),
                    im.File("data/a", im.pseudo_random(size, 1)),
                ]
            ),
            im.Layer([im.File("data/b", im.pseudo_random(size, 2)), im.Symlink("etc/link", "name")]),
        ],
        cmd=["/bin/sh"],
    )


@pytest.fixture
def convertd_factory(workdir: Path) -> Iterator[Callable[..., Convertd]]:
    """make(**Convertd kwargs) -> a convertd, not started (its port is known for the registry config)."""
    made: list[Convertd] = []

    def make(**kw) -> Convertd:
        c = Convertd(workdir, name=f"convertd{len(made)}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def push_manifest(registry: Registry, repository: str, tag: str, body: bytes, media_type: str) -> str:
    async def go() -> str:
        client = anonymous_client()
        async with client:
            return await client.push_manifest(
                Reference.parse(f"{registry.host}/{repository}:{tag}"), body, media_type
            )

    return trio.run(go)


def sync(registry: Registry, convertd: Convertd, name: str) -> None:
    """Push a marker image and wait for its conversion: the registry sends each endpoint's events in
    order, so every event before the marker's has been handled by then."""
    digest = im.push_image(registry.url, "team/marker", name, image(name, 1024))
    convertd.wait_job("team/marker", digest)


def test_enabled_repositories_are_converted_once_without_loops(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd]
) -> None:
    c = convertd_factory(
        repositories=[
            {"name": "team/*", "format": "estargz", "chunk_size": "64KiB"},
            {"name": "multi/**", "format": "zstd-chunked", "all_platforms": True},
        ]
    )
    registry = registry_factory(config=c.registry_config())
    c.start()
    img = image("app")
    digest = im.push_image(registry.url, "team/app", "v1", img)
    wait_tag(registry.url, "team/app", "v1_accelerated", 30, c)
    c.wait_job("team/app", digest)  # its last push (the digest tag) follows v1_accelerated's

    doc, media_type, _ = get_manifest(registry.url, "team/app", "v1_accelerated")
    assert [layer["mediaType"] for layer in doc["layers"]] == [GZIP, GZIP]
    assert all(TOC_DIGEST in layer["annotations"] for layer in doc["layers"])
    original, _, original_digest = get_manifest(registry.url, "team/app", "v1")
    assert original_digest == digest and "annotations" not in original["layers"][0]
    job = c.job_for("team/app", digest)
    assert job is not None and job["state"] == "done" and job["attempts"] == 1, job
    assert job["tags"] == [{"tag": "v1", "state": "done"}] and job["bytes_in"] > 0 and job["bytes_out"] > 0

    # The same push again, the same content under another tag, the accelerated copy under an ordinary
    # tag, an image whose tag ends in the suffix, a repository not enabled, a multi-platform index.
    im.push_image(registry.url, "team/app", "v1", img)
    im.push_image(registry.url, "team/app", "latest", img)
    accelerated_body = json.dumps(doc).encode()
    copy = push_manifest(registry, "team/app", "copy", accelerated_body, media_type)
    im.push_image(registry.url, "team/app", "manual_accelerated", image("manual"))
    im.push_image(registry.url, "other/app", "v1", img)
    index = im.push_index(
        registry.url, "multi/deep/img", "v2", {"linux/amd64": image("amd"), "linux/arm64": image("arm")}
    )
    sync(registry, c, "m1")
    c.wait_job("multi/deep/img", index)
    wait_tag(registry.url, "team/app", "latest_accelerated", 10, c)

    assert registry_tags(registry.url, "team/app") == {
        "v1",
        "v1_accelerated",
        "latest",
        "latest_accelerated",
        "copy",
        "manual_accelerated",
        f"sha256-{digest.removeprefix('sha256:')}_accelerated",  # the source digest's tag
    }
    assert registry_tags(registry.url, "other/app") == {"v1"}
    latest = get_manifest(registry.url, "team/app", "latest_accelerated")[2]
    assert latest == get_manifest(registry.url, "team/app", "v1_accelerated")[2]  # re-tagged, same image
    job = c.job_for("team/app", digest)
    assert job is not None and job["state"] == "done", job
    assert sorted(t["tag"] for t in job["tags"]) == ["latest", "v1"]
    skipped = c.job_for("team/app", copy)
    assert skipped is not None and skipped["state"] == "skipped", skipped
    assert "already accelerated" in skipped["reason"]
    jobs = c.jobs()
    assert {(j["repository"], j["state"]) for j in jobs} == {
        ("team/app", "done"),
        ("team/app", "skipped"),
        ("team/marker", "done"),
        ("multi/deep/img", "done"),
    }
    # one conversion of team/app:v1 in all: one PUT of its accelerated tag
    puts = [
        e
        for e in registry.access_log()
        if e.method == "PUT" and e.path == "/v2/team/app/manifests/v1_accelerated"
    ]
    assert len(puts) == 1, puts

    new_index, index_type, _ = get_manifest(registry.url, "multi/deep/img", "v2_accelerated")
    assert index_type == "application/vnd.oci.image.index.v1+json"
    assert sorted(m["platform"]["architecture"] for m in new_index["manifests"]) == ["amd64", "arm64"]
    for entry in new_index["manifests"]:
        child = get_manifest(registry.url, "multi/deep/img", entry["digest"])[0]
        assert all(
            layer["mediaType"] == ZSTD and CHUNKED_CHECKSUM in layer["annotations"]
            for layer in child["layers"]
        )

    metrics = c.metrics()
    assert metrics[CONVERTED] == 3  # team/app, the index, the marker
    assert metrics['lazysnap_convertd_conversions_total{outcome="retagged"}'] == 1
    assert metrics['lazysnap_convertd_conversions_total{outcome="skipped"}'] == 1
    assert metrics['lazysnap_convertd_events_total{result="duplicate"}'] >= 1
    assert metrics['lazysnap_convertd_events_total{result="ignored"}'] > 10  # blobs, by-digest manifests, ...
    assert (
        metrics["lazysnap_convertd_bytes_in_total"] > 0 and metrics["lazysnap_convertd_bytes_out_total"] > 0
    )
    assert metrics["lazysnap_convertd_conversion_duration_seconds_count"] == 3
    assert metrics["lazysnap_convertd_queue_length"] == 0
    assert not list((c.state_dir / "tmp").iterdir())


def test_killed_mid_conversion_finishes_after_restart(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd]
) -> None:
    # The first layer converted and uploaded, then SIGKILL: blobs pushed, no manifest, the job running.
    c = convertd_factory(
        repositories=[{"name": "team/*"}], env={"LAZYSNAP_FAILPOINTS": "convertd.layer-done=kill"}
    )
    registry = registry_factory(config=c.registry_config())
    c.start()
    digest = im.push_image(registry.url, "team/crash", "v1", image("crash", 512 << 10))
    wait_for(lambda: not c.alive(), 30, "convertd killed by its failpoint", c)
    assert "failpoint convertd.layer-done: kill" in c.log_text()
    assert registry_tags(registry.url, "team/crash") == {"v1"}
    assert list((c.state_dir / "tmp").iterdir())  # the interrupted conversion's files

    c.start(env={})
    job = c.wait_job("team/crash", digest)
    assert job["attempts"] == 2 and job["tags"] == [{"tag": "v1", "state": "done"}], job
    assert "v1_accelerated" in registry_tags(registry.url, "team/crash")
    assert "jobs interrupted by the last stop are queued again" in c.log_text()
    assert not list((c.state_dir / "tmp").iterdir())


def test_a_stop_mid_job_gives_it_back(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd]
) -> None:
    c = convertd_factory(
        repositories=[{"name": "team/*"}], env={"LAZYSNAP_FAILPOINTS": "convertd.job-start=sleep:60"}
    )
    registry = registry_factory(config=c.registry_config())
    c.start()
    digest = im.push_image(registry.url, "team/app", "v1", image("stop"))
    wait_for(lambda: (j := c.job_for("team/app", digest)) and j["state"] == "running", 10, "job running", c)
    started = time.monotonic()
    assert c.stop() == 0  # SIGTERM: a clean exit, without waiting for the job
    assert time.monotonic() - started < 5

    c.start(env={})
    job = c.wait_job("team/app", digest)
    assert job["attempts"] == 1, job  # the interrupted attempt was given back, not counted
    assert "jobs interrupted" not in c.log_text()  # nothing was left running


def test_unreachable_registry_fails_after_retries_and_stays_visible(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd]
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # events come from the real registry; conversions go nowhere
    c = convertd_factory(repositories=[{"name": "team/*"}], registry=dead)
    registry = registry_factory(config=c.registry_config())
    c.start()
    digest = im.push_image(registry.url, "team/app", "v1", image("x"))
    job = c.wait_job("team/app", digest, states=("failed",), timeout=40)
    assert job["attempts"] == 3 and job["registry"] == dead, job
    assert "connect" in job["reason"].lower() and dead in job["reason"], job
    assert [j["id"] for j in c.jobs(state="failed")] == [job["id"]]
    metrics = c.metrics()
    assert metrics['lazysnap_convertd_conversions_total{outcome="failed"}'] == 1
    assert metrics["lazysnap_convertd_attempt_errors_total"] == 3
    assert metrics['lazysnap_convertd_jobs{state="failed"}'] == 1
    assert "job failed" in c.log_text()
    assert c.alive()


def test_a_failed_attempt_is_retried(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd]
) -> None:
    c = convertd_factory(
        repositories=[{"name": "team/*"}], env={"LAZYSNAP_FAILPOINTS": "convertd.job-start=error@1"}
    )
    registry = registry_factory(config=c.registry_config())
    c.start()
    digest = im.push_image(registry.url, "team/app", "v1", image("y"))
    job = c.wait_job("team/app", digest)
    assert job["attempts"] == 2 and job["reason"] == "", job
    assert "attempt failed, will retry" in c.log_text() and "injected fault" in c.log_text()
    assert c.metrics()["lazysnap_convertd_attempt_errors_total"] == 1


def test_deleted_manifests_artifacts_and_odd_events_are_handled(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd]
) -> None:
    # The first job waits (in a thread) before it reads the registry: time to delete its manifest.
    c = convertd_factory(
        repositories=[{"name": "team/*"}], env={"LAZYSNAP_FAILPOINTS": "convertd.job-start=sleep:2@1"}
    )
    registry = registry_factory(config=c.registry_config())
    c.start()
    gone = im.push_image(registry.url, "team/gone", "v1", image("gone"))
    wait_for(lambda: (j := c.job_for("team/gone", gone)) and j["state"] == "running", 10, "job running", c)
    assert delete_manifest(registry.url, "team/gone", gone) == 202
    job = c.wait_job("team/gone", gone, states=("skipped",))
    assert "deleted before it was converted" in job["reason"], job

    # An artifact: a manifest whose config is not an image config.
    config = b'{"kind": "not an image"}'
    blob = b"artifact payload"
    artifact = trio.run(_push_artifact, registry, config, blob)
    job = c.wait_job("team/art", artifact, states=("skipped",))
    assert "not a container image" in job["reason"] and "application/vnd.example.thing" in job["reason"], job

    # Envelopes the registry would never send, answered without harm.
    status, answer = c.post_events(
        {
            "events": [
                {"action": "frobnicate", "target": {}},
                {"action": "push", "target": {"repository": "team/x", "digest": "sha256:nothex"}},
                "not an object",
                {"action": "pull", "target": {"mediaType": "application/octet-stream"}},
            ]
        }
    )
    assert (status, answer) == (200, {"accepted": 0, "duplicates": 0, "ignored": 2, "malformed": 2})
    assert c.post_events(None, raw=b'{"events": [')[0] == 400
    assert c.post_events(None, raw=b'{"no": "events"}')[0] == 400
    sync(registry, c, "after")
    assert {(j["repository"], j["state"]) for j in c.jobs()} == {
        ("team/gone", "skipped"),
        ("team/art", "skipped"),
        ("team/marker", "done"),
    }
    assert c.alive()
    log = c.log_text()
    assert "malformed event" in log and "Traceback" not in log


async def _push_artifact(registry: Registry, config: bytes, blob: bytes) -> str:
    client = anonymous_client()
    async with client:
        ref = Reference.parse(f"{registry.host}/team/art:v1")
        config_digest = await client.push_blob(ref, config)
        blob_digest = await client.push_blob(ref, blob)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.example.thing.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.example.data", "digest": blob_digest, "size": len(blob)}
            ],
        }
        body = json.dumps(manifest).encode()
        return await client.push_manifest(ref, body, manifest["mediaType"])


def test_credentials_from_docker_config_and_hosts_toml(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd], workdir: Path
) -> None:
    # The registry wants a password; convertd knows it by an alias that only its hosts.toml resolves.
    alias = "registry.convertd.test"
    hosts_dir, docker_config = workdir / "certs.d", workdir / "docker-config.json"
    (hosts_dir / alias).mkdir(parents=True)
    auth = base64.b64encode(b"alice:wonderland").decode()
    docker_config.write_text(json.dumps({"auths": {alias: {"auth": auth}}}))
    c = convertd_factory(
        repositories=[{"name": "team/*"}],
        registry=alias,
        extra={"hosts_dir": str(hosts_dir), "docker_config": str(docker_config)},
    )
    users = htpasswd_config(workdir / "auth", {"alice": "wonderland"})
    registry = registry_factory(config=users | c.registry_config())
    (hosts_dir / alias / "hosts.toml").write_text(f'server = "http://{registry.host}"\n')
    c.start()
    digest = trio.run(_push_with_password, registry, "team/app:v1", image("auth"))
    job = c.wait_job("team/app", digest)
    assert job["registry"] == alias and job["attempts"] == 1, job
    assert any(
        e.path == "/v2/team/app/manifests/v1_accelerated" and e.status == 201 for e in registry.access_log()
    )
    assert "wonderland" not in c.log_text() and auth not in c.log_text()


async def _push_with_password(registry: Registry, name: str, img: im.Image) -> str:
    credentials = CredentialStore(
        Path("/nonexistent"), static={registry.host: Credentials("alice", "wonderland")}
    )
    async with RegistryClient(hosts=HostsConfig(None), credentials=credentials) as client:
        ref = Reference.parse(f"{registry.host}/{name}")
        layers = []
        for layer in img.layers:
            blob = layer.blob("gzip")
            layers.append({"mediaType": GZIP, "digest": await client.push_blob(ref, blob), "size": len(blob)})
        config = json.dumps(img.config()).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": await client.push_blob(ref, config),
                "size": len(config),
            },
            "layers": layers,
        }
        return await client.push_manifest(ref, json.dumps(manifest).encode(), manifest["mediaType"])


def test_http_answers_and_secret(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd], workdir: Path
) -> None:
    c = convertd_factory(extra={"max_body": "4KiB"}).start()
    assert c.request("GET", "/healthz")[::2] == (200, b"ok\n")
    push = {
        "action": "push",
        "target": {
            "mediaType": "application/octet-stream",
            "digest": "sha256:" + "a" * 64,
            "repository": "r",
        },
    }
    assert c.post_events({"events": [push]}) == (
        200,
        {"accepted": 0, "duplicates": 0, "ignored": 1, "malformed": 0},
    )
    assert c.post_events({"events": []}, secret="wrong")[0] == 401
    status, headers, _ = c.request("POST", "/events", b'{"events": []}')  # no secret at all
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert c.request("POST", "/events", b'{"events": []}', {"Authorization": f"Basic {c.secret}"})[0] == 401
    assert c.post_events({"events": []}, content_type="application/json")[0] == 200
    assert c.post_events({"events": []}, content_type="application/x-www-form-urlencoded")[0] == 415
    assert c.post_events(None, raw=b"x" * 5000)[0] == 413
    assert c.post_events(None, raw=b"\xff\xfe")[0] == 400
    assert c.request("GET", "/nowhere")[0] == 404
    status, headers, _ = c.request("GET", "/events")
    assert status == 405 and headers["allow"] == "POST"
    assert c.request("DELETE", "/jobs")[0] == 405
    status, headers, body = c.request("HEAD", "/jobs", headers=c.auth())
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert c.request("GET", "/jobs?state=bogus", headers=c.auth())[0] == 400
    assert c.request("GET", "/jobs?limit=0", headers=c.auth())[0] == 400
    # /jobs names images and repositories: it takes the secret too
    status, headers, _ = c.request("GET", "/jobs")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert c.request("GET", "/jobs", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, headers, body = c.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert c.metrics()['lazysnap_convertd_http_requests_total{code="401",path="/events"}'] == 3

    # The registry itself with a wrong secret: refused, nothing queued, the registry keeps retrying.
    registry = registry_factory(config=c.registry_config(secret="not-the-secret"))
    im.push_image(registry.url, "team/app", "v1", image("z", 1024))
    refused = 'lazysnap_convertd_http_requests_total{code="401",path="/events"}'
    wait_for(lambda: c.metrics()[refused] > 3, 10, "the registry's events refused", c)
    assert c.jobs() == []

    # A second convertd on the same state dir, and invalid configurations, stop at start.
    second = subprocess.run(
        [sys.executable, "-m", "snapshotter.convertd", "--config", str(c.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1 and "another convertd is using the state dir" in second.stderr
    bad = workdir / "bad.toml"
    bad.write_text('listen = "127.0.0.1:1"\n\n[[repositories]]\nname = "a/*"\nformat = "gzip"\n')
    run = subprocess.run(
        [sys.executable, "-m", "snapshotter.convertd", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert f"config file {bad}, line 5: repositories[0].format: must be one of estargz" in run.stderr


def test_a_flood_of_idle_and_trickling_sockets_does_not_lock_out_the_registry(
    convertd_factory: Callable[..., Convertd],
) -> None:
    """200 sockets that send nothing and a slowloris sending a header byte a second, from the same
    address as the registry (loopback): an authenticated notification is still answered at once."""
    c = convertd_factory().start()
    idle = [socket.create_connection(("127.0.0.1", c.port), timeout=5) for _ in range(200)]
    slow = socket.create_connection(("127.0.0.1", c.port), timeout=5)
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"POST /events HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            if stop.wait(1.0):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return  # cut off: what the listener should do to it

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(2.5)  # the slowloris is a couple of bytes in; the idle ones hold their sockets
        for _ in range(3):
            start = time.monotonic()
            assert c.post_events({"events": []}, timeout=5) == (
                200,
                {"accepted": 0, "duplicates": 0, "ignored": 0, "malformed": 0},
            )
            assert time.monotonic() - start < 2
        assert c.request("GET", "/healthz", timeout=5)[0] == 200
    finally:
        stop.set()
        trickler.join(5)
        for s in [*idle, slow]:
            s.close()


def test_the_accelerated_image_is_also_tagged_by_the_source_digest_for_the_webhook(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd], workdir: Path
) -> None:
    """`repo@sha256:H` pods are mapped by the webhook to `repo:sha256-H_accelerated`: convertd pushes that
    tag beside `<tag>_accelerated`, for a manifest and for an index, converted or only re-tagged."""
    from snapshotter.webhook import review
    from snapshotter.webhook.config import Config
    from snapshotter.webhook.server import Lookups, Metrics

    c = convertd_factory(
        repositories=[
            {"name": "team/*"},
            {"name": "multi/*", "format": "zstd-chunked", "all_platforms": True},
        ]
    )
    registry = registry_factory(config=c.registry_config())
    c.start()
    digest = im.push_image(registry.url, "team/pinned", "v1", image("pinned"))
    index = im.push_index(
        registry.url, "multi/img", "v2", {"linux/amd64": image("amd"), "linux/arm64": image("arm")}
    )
    c.wait_job("team/pinned", digest)
    c.wait_job("multi/img", index)
    by_digest = f"sha256-{digest.removeprefix('sha256:')}_accelerated"
    accelerated = get_manifest(registry.url, "team/pinned", "v1_accelerated")[2]
    assert get_manifest(registry.url, "team/pinned", by_digest)[2] == accelerated
    index_tag = f"sha256-{index.removeprefix('sha256:')}_accelerated"
    assert (
        get_manifest(registry.url, "multi/img", index_tag)[2]
        == (get_manifest(registry.url, "multi/img", "v2_accelerated")[2])
    )
    # the same content under another tag is only re-tagged; the digest tag stays the same image
    im.push_image(registry.url, "team/pinned", "again", image("pinned"))
    wait_tag(registry.url, "team/pinned", "again_accelerated", 30, c)
    assert get_manifest(registry.url, "team/pinned", by_digest)[2] == accelerated

    # the webhook's lookup resolves a pod pinned to the source digest through that tag
    pinned = f"{registry.host}/team/pinned@{digest}"
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": pinned}]}}
    doc = {
        "apiVersion": review.API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": "u1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "object": pod,
        },
    }
    settings = review.Settings()

    async def decide() -> review.Outcome:
        lookups = Lookups(Config(), Metrics())
        try:
            return review.respond(doc, await lookups.all(review.wanted(doc, settings)), settings)
        finally:
            await lookups.aclose()

    outcome = trio.run(decide)
    patch = json.loads(base64.b64decode(outcome.review["response"]["patch"]))
    assert {
        "op": "replace",
        "path": "/spec/containers/0/image",
        "value": f"{registry.host}/team/pinned:{by_digest}",
    } in patch


def test_index_mode_publishes_a_soci_index_instead_of_or_beside_a_copy(
    registry_factory: Callable[..., Registry], convertd_factory: Callable[..., Convertd]
) -> None:
    """`mode = "index"`: a push gets a SOCI index beside it (the image stays as it is, no `_accelerated`
    copy); `mode = "both"`: the index and the copy."""
    from fuse.formats.spec import SOCI_INDEX_V1
    from fuse.registry.referrers import referrers

    c = convertd_factory(
        repositories=[{"name": "plain/*", "mode": "index"}, {"name": "twice/*", "mode": "both"}]
    )
    registry = registry_factory(config=c.registry_config())
    c.start()
    big = image("big", 11 << 20)  # over lazysnap index's default minimum layer size (10 MiB)
    plain = im.push_image(registry.url, "plain/app", "v1", big)
    twice = im.push_image(registry.url, "twice/app", "v1", big)
    assert c.wait_job("plain/app", plain, timeout=60)["state"] == "done"
    c.wait_job("twice/app", twice, timeout=60)

    async def soci_of(repository: str, digest: str) -> list[dict]:
        async with anonymous_client() as client:
            return await referrers(client, f"{registry.host}/{repository}:v1", digest, SOCI_INDEX_V1)

    assert len(trio.run(soci_of, "plain/app", plain)) == 1
    assert len(trio.run(soci_of, "twice/app", twice)) == 1
    with pytest.raises(Exception, match="404|not found|unknown"):
        get_manifest(registry.url, "plain/app", "v1_accelerated")
    assert get_manifest(registry.url, "twice/app", "v1_accelerated")[2]
