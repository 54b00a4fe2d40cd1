"""lazysnap's CRI proxy against containerd's real CRI plugin, the project's CRI client playing kubelet on
the proxy's socket: a private image whose credentials come ONLY with the PullImage request (no docker
config for containerd or lazysnap) is pulled lazily and a container runs from it; wrong credentials fail
exactly as containerd fails them; every other ImageService call is forwarded unchanged; the password
appears in no log and nowhere under the state root; the proxy is off unless configured."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import urllib.request
from pathlib import Path

import grpc
import pytest
import trio

from fuse.registry import Credentials, CredentialStore, HostsConfig, Reference, RegistryClient
from snapshotter.convert.converter import convert_image
from tests.harness import images as im
from tests.harness.auth import htpasswd_config
from tests.harness.containerd import Containerd
from tests.harness.containers import feature_image
from tests.harness.cri import CriClient, message
from tests.harness.procs import free_port
from tests.harness.registry import Registry
from tests.harness.snapshotter import Lazysnap

PLUGIN = "lazysnap"
USER, PASSWORD = "kube", "pod-secret-Zq7"
V1 = "/runtime.v1.ImageService"
V1ALPHA2 = "/runtime.v1alpha2.ImageService"
BIG = im.pseudo_random(8 << 20, seed=15)  # read in a container: fetched on demand, after the pull


def push_private(registry: Registry, repo: str, image: im.Image) -> tuple[str, list[dict]]:
    """Push `image` to the htpasswd registry and convert it; (accelerated ref, its layer descriptors)."""

    async def run() -> tuple[str, list[dict]]:
        client = RegistryClient(
            hosts=HostsConfig(None),
            credentials=CredentialStore(
                Path("/nonexistent/config.json"), static={registry.host: Credentials(USER, PASSWORD)}
            ),
        )
        async with client:
            ref = Reference.parse(f"{registry.host}/{repo}:v1")
            layers = []
            for layer in image.layers:
                blob = layer.blob("gzip")
                digest = await client.push_blob(ref, blob)
                layers.append({"mediaType": im.OCI_LAYER["gzip"], "digest": digest, "size": len(blob)})
            config = json.dumps(image.config()).encode()
            manifest = {
                "schemaVersion": 2,
                "mediaType": im.OCI_MANIFEST,
                "config": {
                    "mediaType": im.OCI_CONFIG,
                    "digest": await client.push_blob(ref, config),
                    "size": len(config),
                },
                "layers": layers,
            }
            await client.push_manifest(ref, json.dumps(manifest).encode(), im.OCI_MANIFEST)
            accelerated = (await convert_image(client, ref)).destination
            return accelerated, (await client.resolve(accelerated)).layers

    return trio.run(run)


def start_pair(
    workdir: Path, snapshotter_factory, containerd_factory, **settings
) -> tuple[Lazysnap, Containerd, Path]:
    """lazysnap with the CRI proxy on (settings added to its config), then containerd with CRI whose
    snapshotter is lazysnap; (lazysnap, containerd, the proxy's socket)."""
    backend = workdir / "containerd0" / "containerd.sock"  # containerd_factory's first instance
    cri_socket = workdir / "cri.sock"
    config = workdir / "lazysnap.toml"
    values = {
        "root": str(workdir / "state"),
        "address": str(workdir / "lazysnap.sock"),
        "docker_config": str(workdir / "no-docker-config.json"),  # no node-wide credentials
        "cri_address": str(cri_socket),
        "cri_backend": str(backend),
        "background": False,
        **settings,
    }
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    snapshotter = snapshotter_factory(config=config)
    containerd = containerd_factory(snapshotter_socket=snapshotter.address, cri=True, cri_snapshotter=PLUGIN)
    assert containerd.address == backend
    return snapshotter, containerd, cri_socket


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_private_image_pulls_lazily_with_the_pull_credentials(
    registry_factory, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    registry = registry_factory(config=htpasswd_config(workdir / "auth", {USER: PASSWORD}))
    image = im.Image([*feature_image().layers, im.Layer([im.File("data/big", BIG)])])
    ref, layers = push_private(registry, "private/app", image)
    snapshotter, containerd, cri_socket = start_pair(workdir, snapshotter_factory, containerd_factory)
    containerd.plain_http(registry.host)
    assert stat.S_IMODE(cri_socket.stat().st_mode) == 0o600
    kubelet, direct = CriClient(str(cri_socket)), containerd.cri_client()
    try:
        # wrong credentials, and none: the proxy answers what containerd answers
        wrong = {"username": USER, "password": "not-the-password"}
        for auth in (wrong, None):
            theirs = rpc_error(lambda a=auth: direct.pull_image(ref, auth=a))
            ours = rpc_error(lambda a=auth: kubelet.pull_image(ref, auth=a))
            assert (ours.code(), ours.details()) == (theirs.code(), theirs.details())
            assert "401 Unauthorized" in ours.details()

        # kubelet's pull, credentials as a pod's imagePullSecret gives them (`auth` = base64 user:pass)
        auth = {
            "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
            "server_address": registry.url,
        }
        assert kubelet.pull_image(ref, auth=auth).startswith("sha256:")
    finally:
        kubelet.close()
        direct.close()

    # lazy: no layer blob in containerd's content store, none sent whole by the registry
    content = containerd.ctr("content", "ls", "-q", namespace="k8s.io").stdout.split()
    for layer in layers:
        assert layer["digest"] not in content
        # 401: a layer's suffix read goes out with the manifest's request, before either has learnt that
        # the registry asks for credentials; each is answered with the challenge once, then with data
        statuses = {g.status for g in registry.blob_gets(layer["digest"])}
        assert 206 in statuses and statuses <= {206, 401}, f"layer {layer['digest']}: {statuses}"
    assert len(list((snapshotter.root / "mnt").iterdir())) == len(layers)
    log = snapshotter.log()
    assert "lazy layer claimed" in log and "pull credentials kept" in log

    # a container runs from it; its big file is read on demand now, with the kept credentials
    out = containerd.ctr(
        "run",
        "--rm",
        "--runc-root",
        str(containerd.workdir / "runc"),
        "--snapshotter",
        PLUGIN,
        ref,
        "cri-proxy-test",
        "/bin/busybox",
        "sha256sum",
        "/data/big",
        namespace="k8s.io",
    ).stdout
    assert out.split()[0] == hashlib.sha256(BIG).hexdigest()

    # the password is nowhere: not in the (debug) log, not under the state root
    secrets = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]
    snapshotter.stop()  # flushes whatever it writes at exit
    assert not [s for s in secrets if s in snapshotter.log_path.read_bytes()]
    for dirpath, dirnames, filenames in os.walk(snapshotter.root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != snapshotter.root / "mnt"]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not [s for s in secrets if s in data], f"a credential is stored in {path}"


def test_other_calls_are_forwarded_unchanged(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    port = free_port()
    snapshotter, containerd, cri_socket = start_pair(
        workdir, snapshotter_factory, containerd_factory, metrics_address=f"127.0.0.1:{port}"
    )
    containerd.plain_http(registry.host)
    im.push_image(registry.url, "public/app", "v1", im.Image([im.Layer([im.File("etc/hello", b"hi\n")])]))
    ref = f"{registry.host}/public/app:v1"
    kubelet, direct = CriClient(str(cri_socket)), containerd.cri_client()
    try:
        assert kubelet.pull_image(ref) == direct.pull_image(ref)  # anonymous pulls: forwarded as they are

        def status_request(name: str, verbose: bool = False) -> bytes:
            spec = message("ImageSpec")(image=name)
            return message("ImageStatusRequest")(image=spec, verbose=verbose).SerializeToString()

        requests = [
            ("ListImages", message("ListImagesRequest")().SerializeToString()),
            (
                "ListImages",
                message("ListImagesRequest")(filter={"image": {"image": ref}}).SerializeToString(),
            ),
            ("ImageStatus", status_request(ref)),
            ("ImageStatus", status_request(ref, verbose=True)),
            ("ImageStatus", status_request(f"{registry.host}/public/absent:v1")),
        ]
        for service in (V1, V1ALPHA2):
            for method, request in requests:
                ours = kubelet.raw(f"{service}/{method}", request)
                assert ours == direct.raw(f"{service}/{method}", request), f"{service}/{method} differs"
            # ImageFsInfo is stamped with the time of the call: the proxy's answer is containerd's, live
            fs_info = [direct.raw(f"{service}/ImageFsInfo", b""), kubelet.raw(f"{service}/ImageFsInfo", b"")]
            fs_info.append(direct.raw(f"{service}/ImageFsInfo", b""))
            decoded = [message("ImageFsInfoResponse").FromString(b) for b in fs_info]
            stamps = [d.image_filesystems[0].timestamp for d in decoded]
            assert stamps == sorted(stamps) and len(set(stamps)) == 3
            for d in decoded:
                d.image_filesystems[0].timestamp = 0
            assert decoded[1] in (decoded[0], decoded[2])
            # errors keep containerd's code and message: a method it lacks, a request it cannot parse
            for method, request in (("NoSuchMethod", b""), ("ImageStatus", b"\xff\xff\xff")):
                path = f"{service}/{method}"
                theirs = rpc_error(lambda p=path, r=request: direct.raw(p, r))
                ours = rpc_error(lambda p=path, r=request: kubelet.raw(p, r))
                assert (ours.code(), ours.details()) == (theirs.code(), theirs.details())

        remove = message("RemoveImageRequest")(image=message("ImageSpec")(image=ref)).SerializeToString()
        assert kubelet.raw(f"{V1}/RemoveImage", remove) == b""  # RemoveImageResponse is empty
        assert not direct.image_status(ref).HasField("image")  # containerd removed it
        assert kubelet.raw(f"{V1}/RemoveImage", remove) == direct.raw(f"{V1}/RemoveImage", remove)
        # RuntimeService is kubelet's business with containerd directly
        refused = rpc_error(lambda: kubelet.raw("/runtime.v1.RuntimeService/Version", b""))
        assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        kubelet.close()
        direct.close()

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert (
        'lazysnap_cri_calls_total{code="OK",method="runtime.v1alpha2.ImageService/ListImages"} 2.0' in metrics
    )
    assert (
        'lazysnap_cri_calls_total{code="UNIMPLEMENTED",method="runtime.v1.ImageService/other"} 1.0' in metrics
    )
    assert "lazysnap_cri_pulls_with_credentials_total 0.0" in metrics


def test_the_proxy_is_off_unless_configured(snapshotter: Lazysnap, workdir: Path) -> None:
    sockets = sorted(p.name for p in workdir.rglob("*") if p.is_socket())
    assert sockets == ["lazysnap.sock", "status.sock"]
    assert "CRI image service proxy" not in snapshotter.log()
