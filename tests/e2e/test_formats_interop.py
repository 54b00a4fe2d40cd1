"""lazysnap's reader reads layers made by other tools exactly: ctr-remote's eStargz (default and 64 KiB
chunks), its zstd variant and its optimizer (landmark), and skopeo's zstd:chunked. Every file's
content and metadata, read lazily through range requests and verified, equals the source layer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fuse.formats import ESTARGZ, ESTARGZ_ZSTD, ZSTD_CHUNKED, RegistrySource, open_layer
from fuse.formats.annotations import expected_toc_digest
from fuse.registry import CredentialStore, HostsConfig, RegistryClient
from tests.harness import images as im
from tests.harness import trees
from tests.harness.containerd import Containerd
from tests.harness.layers import tree_of
from tests.harness.registry import Registry

BUSYBOX = Path("/bin/busybox").read_bytes()


def interop_image() -> im.Image:
    base = im.Layer(
        [
            im.Dir("bin"),
            im.File("bin/busybox", BUSYBOX, mode=0o755),
            im.Symlink("bin/sh", "busybox"),
            im.Dir("etc"),
            im.File("etc/motd", b"hello\n"),
            im.File("etc/secret", b"s3cret\n", mode=0o600, uid=0, gid=42),
            im.File("etc/attrs", b"x", xattrs={"user.lazysnap": b"value"}),
            im.Hardlink("etc/motd.link", "etc/motd"),
            im.Symlink("etc/abs", "/etc/motd"),
            im.Dir("data", mode=0o1777),
            im.File("data/empty", b""),
            im.File("data/big", im.pseudo_random(5 << 20, seed=11), mode=0o640),
            im.File("data/zeros", bytes(3 << 20)),
            im.File("data/ünïcödé", b"unicode", uid=1000, gid=1000),
            im.File("data/" + "long-" * 30, b"long name"),
            im.Dir("dev-nodes"),
            im.CharDev("dev-nodes/null", 1, 3),
            im.Fifo("dev-nodes/fifo"),
            im.Dir("old"),
            im.File("old/gone", b"x"),
            im.Dir("opq"),
            im.File("opq/hidden", b"x"),
        ]
    )
    top = im.Layer(
        [
            im.Dir("old"),
            im.Whiteout("old/gone"),
            im.Dir("opq"),
            im.Opaque("opq"),
            im.File("opq/new", b"new"),
            im.Dir("usr"),
            im.Dir("usr/bin"),
            im.File("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
        ]
    )
    return im.Image([base, top], cmd=["/bin/sh"])


@pytest.fixture
def source_image(registry: Registry, containerd: Containerd) -> tuple[im.Image, str]:
    image = interop_image()
    im.push_image(registry.url, "interop/src", "v1", image)
    ref = f"{registry.host}/interop/src:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)
    return image, ref


async def check_layers(
    registry: Registry, ref: str, image: im.Image, fmt: str | tuple[str, ...], workdir: Path
) -> list:
    """Open every layer of `ref` lazily and compare it with the source layer; returns the layers."""
    client = RegistryClient(hosts=HostsConfig(None), credentials=CredentialStore(workdir / "none.json"))
    opened = []
    async with client:
        resolved = await client.resolve(ref)
        assert len(resolved.layers) == len(image.layers)
        for desc, src in zip(resolved.layers, image.layers, strict=True):
            expected = expected_toc_digest(desc.get("annotations"))
            assert expected, f"no TOC digest annotation in {desc}"
            layer = await open_layer(
                RegistrySource(client, resolved.reference, desc["digest"], desc["size"]), expected
            )
            assert layer.format in ((fmt,) if isinstance(fmt, str) else fmt)
            trees.assert_same(src.overlay_tree(), await tree_of(layer), ignore_mtime_of=("dir", "char"))
            opened.append(layer)
    return opened


@pytest.mark.parametrize(
    ("args", "fmt"),
    [
        (["--estargz"], ESTARGZ),
        (["--estargz", "--estargz-chunk-size", "65536"], ESTARGZ),
        (["--zstdchunked"], ESTARGZ_ZSTD),
    ],
)
async def test_ctr_remote_convert(
    registry: Registry, containerd: Containerd, source_image, workdir: Path, args: list[str], fmt: str
) -> None:
    image, ref = source_image
    dst = f"{registry.host}/interop/conv:{fmt}-{len(args)}"
    containerd.ctr_remote("image", "convert", *args, "--oci", ref, dst)
    containerd.ctr_remote("image", "push", "--plain-http", dst)
    layers = await check_layers(registry, dst, image, fmt, workdir)
    if "65536" in args:  # the 5 MiB file is split into 64 KiB chunks
        big = layers[0].index.find("data/big")
        assert len(layers[0].index.chunks_of(big)) == 80
    assert all(layer.index.no_prefetch for layer in layers)


async def test_ctr_remote_optimize_landmark(
    registry: Registry, containerd: Containerd, source_image, workdir: Path
) -> None:
    image, ref = source_image
    dst = f"{registry.host}/interop/opt:v1"
    containerd.ctr_remote(
        "image",
        "optimize",
        "--oci",
        "--period",
        "1",
        "--args",
        json.dumps(["/bin/sh", "-c", "cat /etc/motd /data/big > /dev/null"]),
        ref,
        dst,
    )
    containerd.ctr_remote("image", "push", "--plain-http", dst)
    layers = await check_layers(registry, dst, image, ESTARGZ, workdir)
    base = layers[0]
    span = base.prefetch_span()
    assert span is not None, "the optimizer's .prefetch.landmark was not found"
    # the files the workload read lie in the prioritized region, the others after it
    ix = base.index
    for path, inside in [("etc/motd", True), ("data/big", True), ("data/zeros", False)]:
        first = ix.chunk(ix.chunks_of(ix.find(path))[0])
        assert (first.start < span[1]) == inside, path


async def test_skopeo_zstd_chunked(registry: Registry, workdir: Path) -> None:
    image = interop_image()
    await im.push_image_async(registry.url, "interop/src", "v1", image)
    src_dir, dst_dir = workdir / "oci-src", workdir / "oci-dst"
    skopeo = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]
    subprocess.run([*skopeo, f"docker://{registry.host}/interop/src:v1", f"oci:{src_dir}:v1"], check=True)
    subprocess.run(
        [*skopeo, "--dest-compress-format", "zstd:chunked", f"oci:{src_dir}:v1", f"oci:{dst_dir}:v1"],
        check=True,
    )
    subprocess.run([*skopeo, f"oci:{dst_dir}:v1", f"docker://{registry.host}/interop/chunked:v1"], check=True)
    # skopeo 1.9 (containers/storage of its time) writes the 40-byte "GnUlInUx" footer that stargz's
    # zstd variant also uses; newer ones the 64-byte "GNUlInUx" footer: both are read.
    layers = await check_layers(
        registry, f"{registry.host}/interop/chunked:v1", image, (ESTARGZ_ZSTD, ZSTD_CHUNKED), workdir
    )
    assert all(layer.toc.compressed_digest for layer in layers)
