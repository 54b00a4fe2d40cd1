"""The converter against the real registry: each format, multi-platform indexes, Docker/uncompressed/zstd
sources, DST defaults, cross-repository mounts, idempotence, clear errors, and the `convert` command."""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import tarfile
import termios
from collections.abc import Callable
from pathlib import Path

import pytest

from fuse.registry import Reference, RegistryClient
from snapshotter.convert import cli as convert
from snapshotter.convert.converter import ConvertError, convert_image, read_prioritized
from tests.harness import images as im
from tests.harness.auth import htpasswd_config
from tests.harness.registry import Registry, anonymous_client
from tests.harness.snapshotter import lazysnap_command
from tests.unit.test_writer import read_toc

GZIP, ZSTD = "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+zstd"


def image(tag: str = "a") -> im.Image:
    return im.Image(
        [
            im.Layer(
                [
                    im.Dir("etc"),
                    im.File("etc/name", tag.encode()),
                    im.File("data/big", im.pseudo_random(5 << 20, seed=3)),  # two chunks
                    im.Symlink("etc/link", "name"),
                    im.Hardlink("etc/hard", "etc/name"),
                    im.File("usr/lib/deep/file", b"no parents\n", xattrs={"user.k": b"v"}),
                ]
            ),
            im.Layer([im.Whiteout("etc/link"), im.File("etc/new", b"new\n", mode=0o600)]),
        ],
        cmd=["/bin/sh"],
    )


def client() -> RegistryClient:
    return anonymous_client()


def decompress(blob: bytes, media_type: str) -> bytes:
    """What a runtime unpacks: every gzip member, or every zstd frame (skippable ones skipped)."""
    if media_type.endswith("gzip"):
        return gzip.GzipFile(fileobj=io.BytesIO(blob)).read()
    return subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True).stdout


async def fetch(c: RegistryClient, ref: str) -> tuple[dict, list[tuple[dict, bytes]], dict]:
    """(manifest, [(layer descriptor, blob)], config) of an image manifest."""
    r = Reference.parse(ref)
    body, _, _ = await c.get_manifest(r)
    manifest = json.loads(body)
    config = json.loads(await c.get_blob(r, manifest["config"]["digest"]))
    layers = [(d, await c.get_blob(r, d["digest"], max_size=1 << 30)) for d in manifest["layers"]]
    return manifest, layers, config


def files_of(tar: bytes) -> dict[str, tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return {
            m.name: (m.type.decode(), t.extractfile(m).read() if m.isreg() else m.linkname.encode())
            for m in t.getmembers()
            if m.name not in (".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json")
        }


@pytest.mark.parametrize("fmt", ["estargz", "estargz-zstd", "zstd-chunked"])
async def test_convert_each_format(registry: Registry, fmt: str) -> None:
    src = image()
    await im.push_image_async(registry.url, "conv/app", "v1", src)
    async with client() as c:
        result = await convert_image(c, f"{registry.host}/conv/app:v1", format=fmt, chunk_size=1 << 20)
        assert result.destination == f"{registry.host}/conv/app:v1_accelerated"
        manifest, layers, config = await fetch(c, result.destination)
        _, _, src_config = await fetch(c, f"{registry.host}/conv/app:v1")
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    # the original config, history included, with the new DiffIDs
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in src_config.items() if k != "rootfs"
    }
    assert config["history"] == src_config["history"] and len(config["history"]) == 2
    for (desc, blob), diff_id, src_layer in zip(
        layers, config["rootfs"]["diff_ids"], src.layers, strict=True
    ):
        assert desc["mediaType"] == (GZIP if fmt == "estargz" else ZSTD)
        assert desc["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest() and desc["size"] == len(blob)
        tar = decompress(blob, desc["mediaType"])
        assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert files_of(tar) == files_of(src_layer.tar())
        a = desc["annotations"]
        toc, raw, _ = read_toc(blob, fmt)
        assert a["io.containers.estargz.uncompressed-size"] == str(len(tar))
        if fmt == "zstd-chunked":
            off, length, ulen, kind = a["io.github.containers.zstd-chunked.manifest-position"].split(":")
            compressed = blob[int(off) : int(off) + int(length)]
            assert a["io.github.containers.zstd-chunked.manifest-checksum"] == (
                "sha256:" + hashlib.sha256(compressed).hexdigest()
            )
            assert (int(ulen), kind) == (len(raw), "1")
            assert "io.github.containers.zstd-chunked.tarsplit-position" in a
            assert "containerd.io/snapshot/stargz/toc.digest" not in a
        else:
            assert (
                a["containerd.io/snapshot/stargz/toc.digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
            )
        assert toc["entries"][0]["name"] == ".no.prefetch.landmark"
    assert [layer.action for layer in result.layers] == ["converted", "converted"]


async def test_multi_platform_index(registry: Registry) -> None:
    platforms = {"linux/amd64": image("amd"), "linux/arm64/v8": image("arm")}
    await im.push_index_async(registry.url, "conv/multi", "v2", platforms, manifest_format="docker")
    async with client() as c:
        result = await convert_image(c, f"{registry.host}/conv/multi:v2", all_platforms=True)
        body, media_type, _ = await c.get_manifest(Reference.parse(result.destination))
        index = json.loads(body)
        assert index["mediaType"] == media_type == "application/vnd.oci.image.index.v1+json"
        assert [m["platform"] for m in index["manifests"]] == [
            {"architecture": "amd64", "os": "linux"},
            {"architecture": "arm64", "os": "linux", "variant": "v8"},
        ]
        for entry, name in zip(index["manifests"], ["amd", "arm"], strict=True):
            ref = f"{registry.host}/conv/multi@{entry['digest']}"
            _, layers, config = await fetch(c, ref)
            assert config["architecture"] == entry["platform"]["architecture"]
            tar = decompress(layers[0][1], layers[0][0]["mediaType"])
            assert files_of(tar)["etc/name"] == ("0", name.encode())

        # one platform only: an index with that platform
        one = await convert_image(
            c, f"{registry.host}/conv/multi:v2", f"{registry.host}/conv/multi:arm", platform="linux/arm64"
        )
        body, _, _ = await c.get_manifest(Reference.parse(one.destination))
        assert [m["platform"]["architecture"] for m in json.loads(body)["manifests"]] == ["arm64"]
        with pytest.raises(ConvertError, match=r"no manifest for platform linux/s390x.*--all-platforms"):
            await convert_image(c, f"{registry.host}/conv/multi:v2", platform="linux/s390x")


@pytest.mark.parametrize(("compression", "manifest_format"), [("none", "docker"), ("zstd", "oci")])
async def test_docker_uncompressed_and_zstd_sources(
    registry: Registry, compression: str, manifest_format: str
) -> None:
    src = image()
    await im.push_image_async(
        registry.url, "conv/src", "t", src, compression=compression, manifest_format=manifest_format
    )
    async with client() as c:
        result = await convert_image(c, f"{registry.host}/conv/src:t", format="zstd-chunked")
        _, layers, config = await fetch(c, result.destination)
    for (desc, blob), src_layer in zip(layers, src.layers, strict=True):
        assert files_of(decompress(blob, desc["mediaType"])) == files_of(src_layer.tar())
    assert len(config["rootfs"]["diff_ids"]) == 2


async def test_reconversion_is_idempotent_and_mounts_across_repositories(registry: Registry) -> None:
    await im.push_image_async(registry.url, "conv/one", "v1", image())
    async with client() as c:
        first = await convert_image(c, f"{registry.host}/conv/one:v1")
        puts_before = len([r for r in registry.requests() if r.method in ("PUT", "PATCH")])
        again = await convert_image(c, f"{registry.host}/conv/one:v1")
        assert again.digest == first.digest  # deterministic, end to end
        new_puts = [r for r in registry.requests() if r.method in ("PUT", "PATCH")][puts_before:]
        assert [r.path.split("/")[-2] for r in new_puts] == ["manifests"]  # no blob uploaded again
        # already converted: kept, and mounted from the source repository into another one
        other = await convert_image(
            c, f"{registry.host}/conv/one:v1_accelerated", f"{registry.host}/conv/two:x"
        )
        assert [layer.action for layer in other.layers] == ["kept", "kept"]
        mounts = [r for r in registry.requests() if r.method == "POST" and "mount=" in r.path]
        assert len(mounts) == 2 and all("from=conv/one" in r.path for r in mounts)
        manifest, layers, _ = await fetch(c, other.destination)
        assert [d["digest"] for d, _ in layers] == [layer.digest for layer in first.layers]


async def test_clear_errors(
    registry: Registry, registry_factory: Callable[..., Registry], workdir: Path
) -> None:
    async with client() as c:
        with pytest.raises(ConvertError, match=r"image .*conv/none:v1 not found"):
            await convert_image(c, f"{registry.host}/conv/none:v1")
        # an artifact, not an image
        ref = Reference.parse(f"{registry.host}/conv/art:v1")
        cfg = await c.push_blob(ref, b"{}")
        layer = await c.push_blob(ref, b"chart")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": cfg, "size": 2},
            "layers": [
                {
                    "mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                    "digest": layer,
                    "size": 5,
                }
            ],
        }
        await c.push_manifest(ref, json.dumps(manifest).encode(), manifest["mediaType"])
        with pytest.raises(ConvertError, match="is not a container image"):
            await convert_image(c, str(ref))
        # a config whose DiffID does not match the layer
        good = image()
        bad_config = good.config(["sha256:" + "0" * 64, good.layers[1].diff_id])
        ref = Reference.parse(f"{registry.host}/conv/bad:v1")
        blobs = [await c.push_blob(ref, layer.blob("gzip")) for layer in good.layers]
        body = json.dumps(bad_config).encode()
        cfg = await c.push_blob(ref, body)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg,
                "size": len(body),
            },
            "layers": [
                {"mediaType": GZIP, "digest": d, "size": len(layer.blob("gzip"))}
                for d, layer in zip(blobs, good.layers, strict=True)
            ],
        }
        await c.push_manifest(ref, json.dumps(manifest).encode(), manifest["mediaType"])
        with pytest.raises(ConvertError, match=r"layer 1/2 \(sha256:[0-9a-f]+\) of .*the image is damaged"):
            await convert_image(c, str(ref))
        with pytest.raises(ConvertError, match="has no tag"):
            await convert_image(c, f"{registry.host}/conv/app@sha256:" + "1" * 64)
    # unauthorized
    locked = registry_factory(config=htpasswd_config(workdir / "auth", {"alice": "wonderland"}))
    async with client() as c:
        with pytest.raises(ConvertError, match="cannot read .*requires credentials"):
            await convert_image(c, f"{locked.host}/conv/app:v1")


async def test_command_line(registry: Registry, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await im.push_image_async(registry.url, "conv/cli", "v1", image())
    prio = workdir / "prio.txt"
    prio.write_text('# recorded\n{"path": "/etc/name"}\n/usr/lib/deep/file\n\n')
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    args = parser.parse_args(
        [
            f"{registry.host}/conv/cli:v1",
            f"{registry.host}/conv/cli:fast",
            "--format",
            "estargz-zstd",
            "--chunk-size",
            "1MiB",
            "--prioritize-from",
            str(prio),
            "--level",
            "5",
        ]
    )
    assert await convert.run(args) == 0
    out = capsys.readouterr().out
    assert f"pushed {registry.host}/conv/cli:fast@sha256:" in out
    async with client() as c:
        _, layers, _ = await fetch(c, f"{registry.host}/conv/cli:fast")
    toc, _, _ = read_toc(layers[0][1], "estargz-zstd")
    names = [e["name"] for e in toc["entries"] if e["type"] != "chunk"]
    assert names[: names.index(".prefetch.landmark")] == ["etc/", "etc/name", "usr/lib/deep/file"]
    assert toc["entries"][names.index("data/big") + 1]["chunkOffset"] == 1 << 20

    bad = parser.parse_args([f"{registry.host}/conv/cli:missing"])
    assert await convert.run(bad) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--prioritize", "a", "--prioritize-from", "f"])


def test_prioritized_list_formats(tmp_path: Path) -> None:
    path = tmp_path / "list"
    path.write_text('{"path": "/a"}\n\n# c\n b \n')
    assert read_prioritized(path) == ["/a", "b"]
    path.write_text('{"nopath": 1}\n')
    with pytest.raises(ConvertError, match='without a "path"'):
        read_prioritized(path)


def test_command_line_progress_on_a_terminal_and_in_a_pipe(registry: Registry, workdir: Path) -> None:
    """`lazysnap convert` shows live progress on a terminal (rich: redrawn rows, the rate) and plain
    lines without escapes when its output is a pipe; the result line is on stdout either way."""
    im.push_image(registry.url, "conv/progress", "v1", image())
    command = [*lazysnap_command(), "convert"]
    piped = subprocess.run(
        [*command, f"{registry.host}/conv/progress:v1", f"{registry.host}/conv/progress:piped"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert f"pushed {registry.host}/conv/progress:piped@sha256:" in piped.stdout
    assert "\x1b" not in piped.stderr and "\r" not in piped.stderr
    assert re.search(r"layer 1/\d+ sha256:\w+: done: read .* MB, wrote .* MB", piped.stderr), piped.stderr

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM", "CI")} | {"TERM": "xterm"}
    proc = subprocess.Popen(
        [*command, f"{registry.host}/conv/progress:v1", f"{registry.host}/conv/progress:tty"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    shown = bytearray()
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(controller)
    assert proc.wait(timeout=120) == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "\x1b[" in text, text  # rich's live display draws with escape sequences
    assert f"pushed {registry.host}/conv/progress:tty@sha256:" in text
    assert "done: read" in text
