"""The optimizer's pieces that need neither root nor a registry: LazyFS records the regular files opened
(per layer, once, in first-open order; never directories, whiteouts or refused opens), the record file
round-trips through `read_prioritized` whatever the names, the workload's environment, the scratch tag,
and the command line's checks."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import pyfuse3
import pytest

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, LayerHandle
from fuse.formats import BytesSource, open_layer
from fuse.fs import LazyFS
from fuse.registry import RegistryClient
from snapshotter.convert import cli as convert
from snapshotter.convert.converter import ConvertError, read_prioritized
from snapshotter.convert.optimize import DEFAULT_PATH, optimize_image, scratch_tag, workload_environment
from snapshotter.convert.writer import WriteOptions, convert_bytes
from snapshotter.mount import write_record
from tests.harness import images as im


async def handle(entries: list, name: str) -> LayerHandle:
    blob, result = convert_bytes(im.Layer(entries).tar(), WriteOptions())
    layer = await open_layer(BytesSource(blob, name), result.toc_digest)
    return LayerHandle(layer, name, name)


async def mounted(tmp_path: Path, record: bool) -> LazyFS:
    """Two layers, as `lazysnap mount` shows them: <mount>/0 and <mount>/1."""
    fs = LazyFS(Fetcher(ChunkCache(tmp_path / "cache", 1 << 20, fsync=False)), record=record)
    base = [im.Dir("etc"), im.File("etc/a", b"a"), im.File("etc/b", b"b"), im.Hardlink("etc/c", "etc/a")]
    top = [im.Dir("etc"), im.Whiteout("etc/b"), im.File("etc/d", b"d"), im.Symlink("etc/e", "d")]
    fs.add_layer("0", 1, await handle(base, "base"))
    fs.add_layer("1", 2, await handle(top, "top"))
    return fs


async def inode(fs: LazyFS, layer: str, path: str) -> int:
    ino = (await fs.lookup(pyfuse3.ROOT_INODE, layer.encode())).st_ino
    for part in path.split("/"):
        ino = (await fs.lookup(ino, part.encode())).st_ino
    return ino


async def test_lazyfs_records_regular_files_opened_once_in_first_open_order(tmp_path: Path) -> None:
    fs = await mounted(tmp_path, record=True)
    assert fs.recorded() == []
    for layer, path in [("1", "etc/d"), ("0", "etc/a"), ("1", "etc/d"), ("0", "etc/a"), ("0", "etc/b")]:
        await fs.open(await inode(fs, layer, path), os.O_RDONLY, None)
    # a hardlink is its inode: recorded under the name the TOC gives first
    await fs.open(await inode(fs, "0", "etc/c"), os.O_RDONLY, None)
    assert fs.recorded() == [("1", "etc/d"), ("0", "etc/a"), ("0", "etc/b")]

    # not recorded: directories, whiteouts, symlinks (never opened: EINVAL), opens for writing (EROFS)
    assert await fs.opendir(await inode(fs, "1", "etc"), None)
    refused = [("1", "etc", os.O_RDONLY), ("1", "etc/b", os.O_RDONLY), ("1", "etc/e", os.O_RDONLY)]
    refused += [
        ("0", "etc/a", os.O_WRONLY),
        ("1", "etc/d", os.O_RDWR),
        ("0", "etc/a", os.O_RDONLY | os.O_TRUNC),
    ]
    for layer, path, flags in refused:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.open(await inode(fs, layer, path), flags, None)
        assert e.value.errno in (errno.EINVAL, errno.EROFS)
    assert fs.recorded() == [("1", "etc/d"), ("0", "etc/a"), ("0", "etc/b")]


async def test_lazyfs_records_nothing_unless_asked(tmp_path: Path) -> None:
    fs = await mounted(tmp_path, record=False)
    await fs.open(await inode(fs, "0", "etc/a"), os.O_RDONLY, None)
    assert fs.recorded() == []


def test_the_record_file_round_trips_any_name(tmp_path: Path) -> None:
    names = [
        "etc/a",
        "#not-a-comment",
        "{not json}",
        "new\nline",
        "trailing ",
        " leading",
        "ünï",
        "bad\udcff",
    ]
    names += ["etc/a", "tab\there"]
    record = tmp_path / "record.txt"
    write_record(record, names)
    assert read_prioritized(record) == ["/" + n for n in dict.fromkeys(names)]
    assert record.read_text().splitlines()[:3] == ["/etc/a", "/#not-a-comment", "/{not json}"]
    assert not list(tmp_path.glob(".*.tmp"))
    write_record(record, [])
    assert read_prioritized(record) == []


def test_workload_environment() -> None:
    config = {"config": {"Env": ["PATH=/app/bin", "A=b=c", "junk"], "WorkingDir": "srv/app/"}}
    assert workload_environment(config) == ({"PATH": "/app/bin", "A": "b=c", "HOME": "/root"}, "/srv/app")
    assert workload_environment({}) == ({"PATH": DEFAULT_PATH, "HOME": "/root"}, "/")


def test_scratch_tag() -> None:
    assert scratch_tag("v1_accelerated") == "v1_accelerated-optimize-tmp"
    long = scratch_tag("x" * 128)
    assert len(long) <= 128 and long.startswith("lazysnap-optimize-tmp-") and long != scratch_tag("y" * 128)


async def test_command_line_checks(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    args = parser.parse_args(["r.example/app:v1", "--optimize", "--run", "true", "--optimize-timeout", "5"])
    assert (args.optimize, args.run, args.optimize_timeout) == (True, "true", 5.0)
    assert parser.parse_args(["r.example/app:v1"]).optimize_timeout == 60.0
    for argv in (["--optimize"], ["--run", "true"]):
        assert await convert.run(parser.parse_args(["r.example/app:v1", *argv])) == 2
        assert "--optimize and --run COMMAND go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the prioritized files come from the workload
        parser.parse_args(["x", "--optimize", "--run", "true", "--prioritize", "a"])
    capsys.readouterr()
    async with RegistryClient() as client:
        with pytest.raises(ConvertError, match="give no others"):
            await optimize_image(client, "r.example/app:v1", None, "true", prioritize=["a"])
        with pytest.raises(ConvertError, match="must be a tag other than SRC's"):
            await optimize_image(client, "r.example/app:v1", "r.example/app:v1", "true")
