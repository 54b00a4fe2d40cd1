"""`lazysnap index` against the real registry (distribution 2.8, which has no referrers API): the SOCI
index is published under the referrers tag `sha256-<hex>`, `referrers()` finds it, each zTOC lists its
layer's tar exactly, every regular file read back through the zTOC (one range request from the
registry, inflated from a checkpoint) equals its content, small layers are skipped and said so, and a
second run does not add a second referrer."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile

import pytest
import trio

from fuse.formats import zran, ztoc
from fuse.formats.spec import ANNOTATION_LAYER_DIGEST, ANNOTATION_SPAN_SIZE, SOCI_INDEX_V1
from fuse.registry import Reference
from fuse.registry.referrers import fallback_tag, referrers
from snapshotter.convert import index as index_cmd
from tests.harness import images as im
from tests.harness.registry import Registry, anonymous_client

KINDS = {
    tarfile.REGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
}


def image() -> im.Image:
    big = im.Layer(
        [
            im.Dir("etc"),
            im.File("etc/name", b"indexed\n", mode=0o600, uid=1000),
            im.File("data/random", im.pseudo_random(3 << 20, seed=7)),
            im.File("data/zeros", bytes(2 << 20)),
            im.File("usr/lib/" + "n" * 150, b"a long name\n", xattrs={"user.k": b"v"}),
            im.Symlink("etc/link", "name"),
            im.Hardlink("etc/hard", "etc/name"),
        ]
    )
    small = im.Layer([im.File("small", b"below the minimum layer size\n")])
    return im.Image([big, small], cmd=["/bin/sh"])


def listing(tar: bytes) -> dict[str, tuple]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return {
            m.name.rstrip("/"): (KINDS[m.type], m.size if m.isreg() else 0, m.mode & 0o7777, m.linkname)
            for m in t.getmembers()
        }


def files(tar: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isreg()}


async def run_index(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    index_cmd.add_arguments(parser)
    return await index_cmd.run(parser.parse_args(list(argv)))


async def test_index_publishes_a_soci_index_that_serves_every_file(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    img = image()
    digest = await im.push_image_async(registry.url, "app", "v1", img)
    ref = f"{registry.host}/app:v1"
    assert await run_index(ref, "--min-layer-size", "1MiB", "--span-out", "512KiB") == 0
    out = capsys.readouterr().out
    big_digest = "sha256:" + hashlib.sha256(img.layers[0].blob("gzip")).hexdigest()
    small_digest = "sha256:" + hashlib.sha256(img.layers[1].blob("gzip")).hexdigest()
    assert f"layer {small_digest}" in out and "skipped, smaller than --min-layer-size" in out
    assert f"layer {big_digest}" in out and "of the layer" in out and "built in" in out

    async with anonymous_client() as c:
        tag_ref = Reference.parse(f"{registry.host}/app:{fallback_tag(digest)}")
        body, _, _ = await c.get_manifest(tag_ref)
        tag_index = json.loads(body)
        assert [d["artifactType"] for d in tag_index["manifests"]] == [SOCI_INDEX_V1]
        found = await referrers(c, ref, digest, SOCI_INDEX_V1)
        assert found == tag_index["manifests"]
        assert await referrers(c, ref, digest, "application/example") == []

        soci_ref = Reference.parse(ref).with_digest(found[0]["digest"])
        soci = json.loads((await c.get_manifest(soci_ref))[0])
        assert soci["subject"]["digest"] == digest
        assert soci["config"]["mediaType"] == SOCI_INDEX_V1
        (layer_desc,) = soci["layers"]  # the small layer was skipped
        annotations = layer_desc["annotations"]
        assert annotations[ANNOTATION_LAYER_DIGEST] == big_digest
        assert annotations[ANNOTATION_SPAN_SIZE] == str(512 << 10)

        z = ztoc.parse_ztoc(await c.get_blob(soci_ref, layer_desc["digest"]), what="pushed zTOC")
        tar = img.layers[0].tar()
        assert {e.name: (e.type, e.size, e.mode, e.linkname) for e in z.entries} == listing(tar)
        assert len(z.index.points) > 3
        layer_ref = Reference.parse(ref)
        for name, content in files(tar).items():
            e = next(e for e in z.entries if e.name == name)
            i, start, end = z.index.plan(e.uncompressed_offset, e.size)
            comp = await c.read_range(layer_ref, big_digest, start, end - start)
            data = await trio.to_thread.run_sync(
                zran.extract, z.index, i, comp, e.uncompressed_offset, e.size
            )
            assert data == content, name

        # a second run publishes the same (deterministic) index: still one referrer
        assert await run_index(ref, "--min-layer-size", "1MiB", "--span-out", "512KiB") == 0
        assert await referrers(c, ref, digest) == found


async def test_multi_platform_index_and_nothing_to_index(registry: Registry, capsys) -> None:
    images = {"linux/amd64": image(), "linux/arm64": image()}
    await im.push_index_async(registry.url, "multi", "v1", images)
    ref = f"{registry.host}/multi:v1"
    assert await run_index(ref, "--min-layer-size", "1MiB") == 0
    out = capsys.readouterr().out
    assert "2 SOCI index(es) published" in out
    assert await run_index(ref, "--min-layer-size", "1GiB") == 0  # every layer too small
    assert "no layer indexed, no SOCI index pushed" in capsys.readouterr().out


async def test_missing_image_is_a_clear_error(registry: Registry, capsys) -> None:
    assert await run_index(f"{registry.host}/nothing:here") == 1
    assert "lazysnap index:" in capsys.readouterr().err
