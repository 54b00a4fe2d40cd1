"""Accelerated test images: made by lazysnap's own converter (`accelerate`), and by the reference tools,
ctr-remote (eStargz, its zstd variant, the optimizer) and skopeo (containers' zstd:chunked), from images
built with `images.py`; and a sample image that exercises every kind of entry those formats must carry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import trio

from snapshotter.convert.converter import convert_image
from tests.harness import images as im
from tests.harness.containerd import Containerd
from tests.harness.registry import Registry, anonymous_client

BUSYBOX = Path("/bin/busybox").read_bytes()


def accelerate(registry: Registry, repo: str, image: im.Image, **kw) -> str:
    """Push `image` and convert it with lazysnap; the accelerated reference."""
    im.push_image(registry.url, repo, "v1", image)

    async def convert() -> str:
        client = anonymous_client()
        async with client:
            return (await convert_image(client, f"{registry.host}/{repo}:v1", **kw)).destination

    return trio.run(convert)


def sample_image() -> im.Image:
    """Two layers: every entry kind, a multi-chunk file, zero runs, special modes and names, and a
    whiteout and an opaque directory over the first layer. Parent directories are listed explicitly:
    ctr-remote's optimizer fails without them."""
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


def ctr_remote_convert(containerd: Containerd, src: str, dst: str, *args: str) -> str:
    """`ctr-remote image convert ARGS --oci SRC DST` (SRC already pulled) and push DST; returns DST."""
    containerd.ctr_remote("image", "convert", *args, "--oci", src, dst)
    containerd.ctr_remote("image", "push", "--plain-http", dst)
    return dst


def ctr_remote_optimize(containerd: Containerd, src: str, dst: str, command: str) -> str:
    """`ctr-remote image optimize`: runs `sh -c COMMAND` in the image, prioritizes what it read."""
    containerd.ctr_remote(
        "image",
        "optimize",
        "--oci",
        "--period",
        "1",
        "--args",
        json.dumps(["/bin/sh", "-c", command]),
        src,
        dst,
    )
    containerd.ctr_remote("image", "push", "--plain-http", dst)
    return dst


def skopeo_zstd_chunked(registry: Registry, workdir: Path, src_repo_tag: str, dst_repo_tag: str) -> str:
    """containers' zstd:chunked by skopeo (only into a fresh OCI layout, then pushed); returns the ref."""
    src_dir, dst_dir = workdir / "oci-src", workdir / "oci-dst"
    skopeo = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]
    subprocess.run([*skopeo, f"docker://{registry.host}/{src_repo_tag}", f"oci:{src_dir}:x"], check=True)
    subprocess.run(
        [*skopeo, "--dest-compress-format", "zstd:chunked", f"oci:{src_dir}:x", f"oci:{dst_dir}:x"],
        check=True,
    )
    dst = f"{registry.host}/{dst_repo_tag}"
    subprocess.run([*skopeo, f"oci:{dst_dir}:x", f"docker://{dst}"], check=True)
    return dst
