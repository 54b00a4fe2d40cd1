"""`lazysnap status`: the document built from the daemon's live objects (a real chunk cache, fetcher,
layer and snapshot store), served on a unix socket and shown by the command as a table or JSON."""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import stat
import sys
from collections import Counter
from itertools import compress
from pathlib import Path
from types import SimpleNamespace

import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions, LayerHandle
from fuse.formats import BytesSource, open_layer
from snapshotter.convert.writer import WriteOptions, convert_bytes
from snapshotter.daemon import status
from snapshotter.daemon.snapshots import Snapshotter
from tests.harness import images as im

FILES = {f"f{i}": im.pseudo_random(200_000, seed=i) for i in range(4)}
IMAGE = "registry.example/app:1"


class Layers:
    """Stand-in for the daemon's RemoteLayers (which needs a registry to mount a layer): its stats()
    rows as the report proposes them (name, image, refs, fetched, bytes, bytes_local), from a real
    LayerHandle, and its fallbacks counter."""

    def __init__(self, handles: dict[str, tuple[str, int, LayerHandle]]):
        self.handles = handles
        self.fallbacks: Counter[str] = Counter()

    def stats(self) -> list[dict]:
        rows = []
        for name, (image, refs, h) in self.handles.items():
            sizes = h.layer.index.c_size
            rows.append(
                {
                    "name": name,
                    "image": image,
                    "refs": refs,
                    "fetched": h.fetched_fraction(),
                    "bytes": sum(sizes),
                    "bytes_local": sum(compress(sizes, h.cached)),
                }
            )
        return rows


async def daemon_objects(tmp_path: Path, nursery: trio.Nursery):
    tar = im.Layer([im.File(n, d) for n, d in FILES.items()]).tar()
    blob, result = convert_bytes(tar, WriteOptions(chunk_size=64 << 10))
    layer = await open_layer(BytesSource(blob, "test layer"), result.toc_digest)
    cache = ChunkCache(tmp_path / "cache", 10_000_000, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_cap=64 << 10, merge_min=0))
    await nursery.start(fetcher.run)
    handle = LayerHandle(layer, "sha256-aaaa", f"{IMAGE} layer sha256-aaaa")
    ix = layer.index
    assert await fetcher.read(handle, ix.find("f0"), 0, 200_000) == FILES["f0"]  # a quarter is local
    with trio.fail_after(10):  # the fetched chunks are stored in the cache (in worker threads)
        while sum(handle.cached) < ix.chunk_count[ix.find("f0")]:
            await trio.sleep(0.01)
    layers = Layers({"sha256-aaaa": (IMAGE, 2, handle)})
    layers.fallbacks["not-lazy"] += 3
    root = tmp_path / "root"
    snapshotter = Snapshotter(root, index_off=False)
    snapshotter.prepare("k1")
    snapshotter.prepare("k2")
    lazy = SimpleNamespace(
        root=root,
        layers=layers,
        fetcher=fetcher,
        cache=cache,
        failure=None,
        adopted=True,
        kept=True,
        lost=None,
        resend=True,
    )
    return lazy, snapshotter


def command(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lazysnap status")
    status.add_arguments(parser)
    return parser.parse_args(argv)


async def test_document_from_live_objects(tmp_path: Path, nursery) -> None:
    lazy, snapshotter = await daemon_objects(tmp_path, nursery)
    doc = status.status_document(lazy, snapshotter)
    assert doc["daemon"] == {
        "root": str(lazy.root),
        "pid": os.getpid(),
        "data_path": "serving",
        "fuse": {"adopted": True, "kept": True, "lost": None, "resend": True},
    }
    assert doc["snapshots"] == {"total": 2, "on_lazy_layers": 0}
    [layer] = doc["layers"]
    assert layer["name"] == "sha256-aaaa" and layer["image"] == IMAGE and layer["refs"] == 2
    assert 0.2 < layer["fetched"] < 0.4  # mid-way: one file of four is local
    assert layer["bytes"] == 800_000 and 200_000 <= layer["bytes_local"] < 400_000
    assert doc["cache"]["bytes_used"] > 0 and doc["cache"]["limit"] == 10_000_000
    assert doc["cache"]["limit_in_force"] == 10_000_000
    assert doc["fetch"]["bytes_on_demand"] > 0 and doc["fetch"]["cache_misses"] > 0
    assert doc["fallbacks"] == {"not-lazy": 3}
    lazy.failure = "the fetcher stopped unexpectedly"
    assert status.status_document(lazy, snapshotter)["daemon"]["data_path"] == (
        "stopped: the fetcher stopped unexpectedly"
    )


async def test_the_command_over_the_socket(tmp_path: Path, nursery, capsys, monkeypatch) -> None:
    lazy, snapshotter = await daemon_objects(tmp_path, nursery)
    path = status.socket_path(lazy.root)
    async with trio.open_nursery() as server:
        await server.start(
            status.serve_status, path, functools.partial(status.status_document, lazy, snapshotter)
        )
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        assert await trio.to_thread.run_sync(status.run, command(["--root", str(lazy.root), "--json"])) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown == json.loads(json.dumps(status.status_document(lazy, snapshotter)))

        assert await trio.to_thread.run_sync(status.run, command(["--socket", str(path)])) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out  # not a terminal: plain text
        lines = out.splitlines()
        assert f"daemon: pid {os.getpid()}, root {lazy.root}, data path serving" in lines
        assert "snapshots: 2 (0 on lazy layers)" in lines
        assert "full-pull fallbacks: not-lazy 3" in lines
        assert any(line.startswith("chunk cache: ") and " of 10.0 MB, " in line for line in lines)
        header = next(i for i, line in enumerate(lines) if line.startswith("LAYER"))
        assert lines[header].split() == ["LAYER", "IMAGE", "REFS", "FETCHED", "LOCAL"]
        row = lines[header + 1].split()
        assert row[:3] == ["sha256-aaaa", IMAGE, "2"] and row[3].endswith("%")
        assert row[-3:] == ["of", "800.0", "kB"]  # of the layer's content, this much is local
        assert lines[header].index("IMAGE") == lines[header + 1].index(IMAGE)  # aligned columns

        # on a terminal: rich's table
        terminal = io.StringIO()
        terminal.isatty = lambda: True  # type: ignore[method-assign]
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setenv("COLUMNS", "160")
        assert await trio.to_thread.run_sync(status.run, command(["--socket", str(path)])) == 0
        monkeypatch.undo()
        table = terminal.getvalue()
        assert "lazy layers" in table and "│" in table and IMAGE in table and "sha256-aaaa" in table
        server.cancel_scope.cancel()
    assert not path.exists()  # removed when the server stops


def test_no_daemon_is_one_line_and_status_1(tmp_path: Path, capsys) -> None:
    assert status.run(command(["--root", str(tmp_path)])) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("lazysnap status: no lazysnap daemon is running (")
    assert str(tmp_path / "status.sock") in line and "does not exist" in line

    # a socket left by a daemon that died
    import socket

    stale = tmp_path / "status.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    assert status.run(command(["--socket", str(stale), "--json"])) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "refuses connections" in line
