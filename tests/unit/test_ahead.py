"""fuse.ahead: a program's interpreter and libraries are fetched as soon as its head arrives, found as
the loader finds them, across the layers a process sees."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from fuse.ahead import MAX_HOPS, LoaderAhead, resolve
from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions, LayerHandle
from fuse.formats import BytesSource, open_layer
from snapshotter.convert.writer import WriteOptions, convert_bytes
from tests.harness import images as im
from tests.unit.test_elf import program
from tests.unit.test_fetch import frozen_link
from tests.unit.test_pyimports import pyc

MIB = 1 << 20


class Counted(BytesSource):
    def __init__(self, data: bytes, name: str):
        super().__init__(data, name)
        self.requests = 0

    async def read_many(self, spans, early=None, tap=None):
        self.requests += 1
        return await super().read_many(spans, early, tap)


async def handle_of(entries: list, name: str, chunk_size: int = MIB) -> LayerHandle:
    blob, result = convert_bytes(im.Layer(entries).tar(), WriteOptions(chunk_size=chunk_size))
    return LayerHandle(await open_layer(Counted(blob, name), result.toc_digest), name, name)


# a Debian 12 layout: /lib is a symlink into /usr, libraries are versioned files behind soname links
BASE = [
    im.Symlink("lib", "usr/lib"),
    im.Symlink("lib64", "usr/lib64"),
    im.Symlink("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
    im.File("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", program(64 << 10, [], interp=None)),
    im.Symlink("usr/lib/x86_64-linux-gnu/libc.so.6", "libc-2.36.so"),
    im.File("usr/lib/x86_64-linux-gnu/libc-2.36.so", program(2 * MIB, ["ld-linux-x86-64.so.2"])),
    im.File("usr/lib/x86_64-linux-gnu/libunused.so.1", program(64 << 10, ["libc.so.6"], interp=None)),
    im.Symlink("etc/alternatives/libblas.so.3", "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0"),
    im.Symlink("usr/lib/x86_64-linux-gnu/libblas.so.3", "/etc/alternatives/libblas.so.3"),
    im.File("usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0", program(MIB, ["libc.so.6"], interp=None)),
    im.File("etc/ld.so.cache", b"glibc-ld.so.cache1.1" + im.pseudo_random(20_000, seed=5)),
    im.Symlink("loop/a", "b"),
    im.Symlink("loop/b", "a"),
]
ORIGIN = "$ORIGIN/../lib"
APP = [
    im.File(
        "app/bin/tool",
        program(3 * MIB, ["libapp.so.2", "libc.so.6", "libblas.so.3"], runpath="$ORIGIN/../lib"),
    ),
    im.File("app/lib/libapp.so.2", program(MIB, ["libc.so.6", "libnowhere.so.9"], interp=None)),
    im.File("app/notes.txt", b"not a program"),
]


async def test_paths_resolve_as_a_process_sees_them() -> None:
    base, app = await handle_of(BASE, "base"), await handle_of(APP, "app")
    stack = [app, base]

    def found(path: str) -> str | None:
        got = resolve(stack, path)
        return None if got is None else f"{got[0].name}:{got[0].layer.index.path(got[1])}"

    assert found("/lib/x86_64-linux-gnu/libc.so.6") == "base:usr/lib/x86_64-linux-gnu/libc-2.36.so"
    assert found("/lib64/ld-linux-x86-64.so.2") == "base:usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert (
        found("/usr/lib/x86_64-linux-gnu/libblas.so.3")
        == "base:usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0"
    )
    assert found("/app/bin/../lib/libapp.so.2") == "app:app/lib/libapp.so.2"
    assert found("/app/bin/./tool") == "app:app/bin/tool"
    assert found("/usr/lib/x86_64-linux-gnu/missing.so") is None
    assert found("/usr/lib/x86_64-linux-gnu") is None  # a directory is no file to load
    assert found("/loop/a") is None  # a symlink loop ends after MAX_HOPS
    assert MAX_HOPS <= 40
    assert resolve([base], "/app/bin/tool") is None  # not in the layers this process sees


async def test_a_path_of_many_components_resolves_in_linear_time() -> None:
    """resolve runs on the event loop: a hostile image config's 1 MiB program path (340,000 `../`)
    took 9 s when each component was taken off the front of a list."""
    import time

    base, app = await handle_of(BASE, "base"), await handle_of(APP, "app")
    started = time.monotonic()
    got = resolve([app, base], "/" + "../" * 300_000 + "app/bin/tool")
    assert got is not None and got[0] is app
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("read", ["app/bin/tool", "app/notes.txt"])
async def test_the_head_of_a_program_brings_its_loader_and_libraries(
    tmp_path: Path, nursery, read: str
) -> None:
    base, app = await handle_of(BASE, "base"), await handle_of(APP, "app")
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_min=0, merge_cap=0, background=False))
    fetcher.links[app.host] = frozen_link(0.004)  # 100 Mbit/s and near: each chunk on its own
    LoaderAhead(fetcher, lambda handle: [app, base])
    await nursery.start(fetcher.run)

    data = await fetcher.read(app, app.layer.index.find(read), 0, 4096)
    assert data[:4] == (b"\x7fELF" if read.startswith("app/bin") else b"not ")
    await trio.sleep(0.5)

    if read == "app/notes.txt":  # no program: nothing guessed
        assert base.layer.source.requests == 0
        return
    # the head, and the dynamic section's chunk
    assert local(fetcher, app, "app/bin/tool") == [True, False, True]
    assert local(fetcher, app, "app/lib/libapp.so.2") == [True]  # found through RUNPATH $ORIGIN/../lib
    # and libc's dynamic section
    assert local(fetcher, base, "usr/lib/x86_64-linux-gnu/libc-2.36.so") == [True, True]
    assert local(fetcher, base, "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2") == [True]  # the interpreter
    assert local(fetcher, base, "etc/ld.so.cache") == [True]  # which reads its cache first
    # behind two symlinks
    assert local(fetcher, base, "usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0") == [True]
    assert local(fetcher, base, "usr/lib/x86_64-linux-gnu/libunused.so.1") == [False]  # nobody needs it
    requests = base.layer.source.requests + app.layer.source.requests
    # a second program needing the same libraries costs nothing more
    await fetcher.read(app, app.layer.index.find("app/bin/tool"), 0, 4096)
    await trio.sleep(0.2)
    assert base.layer.source.requests + app.layer.source.requests == requests


@pytest.mark.parametrize("far", [False, True])
async def test_the_program_a_container_will_run_is_fetched_before_it_starts(
    tmp_path: Path, nursery, far: bool
) -> None:
    """`program`: the first of the paths found is fetched, and what its loader reads after it, with no
    read at all; a program found nowhere fetches nothing. Where round trips are dear, each file
    guessed comes with its fetch unit."""
    base, app = await handle_of(BASE, "base"), await handle_of(APP, "app")
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_min=0, merge_cap=0, background=False))
    fetcher.links[app.host] = frozen_link(0.025 if far else 0.004)
    ahead = LoaderAhead(fetcher, lambda handle: [app, base])
    await nursery.start(fetcher.run)

    assert ahead.program([app, base], ["/usr/bin/nothing", "/bin/nothing"]) is None
    await trio.sleep(0.2)
    assert base.layer.source.requests == app.layer.source.requests == 0

    assert ahead.program([app, base], ["/usr/bin/tool", "/app/bin/tool"]) == "/app/bin/tool"
    await tool_and_its_libraries_arrive(fetcher, app, base, far)


async def tool_and_its_libraries_arrive(
    fetcher: Fetcher, app: LayerHandle, base: LayerHandle, far: bool = False
) -> None:
    """Wait for what app/bin/tool's loader reads (APP over BASE) to be local, then check nothing else
    is. Where round trips are dear (`far`), each file comes with its 4 MiB fetch unit."""
    tool = [True, True, True] if far else [True, False, True]  # the head and the dynamic section's chunk
    expected = [
        (app, "app/bin/tool", tool),
        (app, "app/lib/libapp.so.2", [True]),
        (base, "usr/lib/x86_64-linux-gnu/libc-2.36.so", [True, True]),
        (base, "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", [True]),
        (base, "etc/ld.so.cache", [True]),
    ]
    with trio.fail_after(5):
        while not all(
            all(got or not wanted for got, wanted in zip(local(fetcher, h, path), want, strict=True))
            for h, path, want in expected
        ):
            await trio.sleep(0.02)
    await trio.sleep(0.2)  # whatever else was started has arrived too
    assert [local(fetcher, h, path) for h, path, _ in expected] == [want for _, _, want in expected]
    assert local(fetcher, base, "usr/lib/x86_64-linux-gnu/libunused.so.1") == [False]


def local(fetcher: Fetcher, handle: LayerHandle, path: str) -> list[bool]:
    """Which chunks of a file are in memory or in the cache now."""
    ix = handle.layer.index
    ino = ix.find(path)
    return [
        (handle.id, c) in fetcher._memory or bool(handle.cached[c])
        for c in range(ix.first_chunk[ino], ix.first_chunk[ino] + ix.chunk_count[ino])
    ]


PY = [
    im.File("app/__pycache__/main.cpython-311.pyc", pyc("import pkg\nfrom pkg import sub\nimport nowhere\n")),
    im.File("app/pkg/__init__.py", b""),
    im.File("app/pkg/__pycache__/__init__.cpython-311.pyc", pyc("from . import helper\n")),
    im.File("app/pkg/__pycache__/helper.cpython-311.pyc", pyc("X = 1\n")),
    im.File("app/pkg/__pycache__/sub.cpython-311.pyc", pyc("Y = 2\n")),
    im.File("app/pkg/__pycache__/unused.cpython-311.pyc", pyc("Z = 3\n")),
    *[im.File(f"app/data/filler{i}", im.pseudo_random(300_000, seed=i)) for i in range(4)],
]


async def guessing_fetcher(tmp_path: Path, nursery, handle: LayerHandle, round_trip: float) -> Fetcher:
    """A running fetcher with LoaderAhead whose link to `handle`'s registry measured `round_trip`."""
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_min=0, merge_cap=0, background=False))
    LoaderAhead(fetcher)
    link = fetcher.link(handle)
    link.latency, link.bandwidth, link.round_trip = round_trip, 1e8, round_trip
    await nursery.start(fetcher.run)
    return fetcher


@pytest.mark.parametrize("round_trip", [0.05, 0.001])
async def test_a_compiled_module_brings_what_it_imports_where_round_trips_are_long(
    tmp_path: Path, nursery, round_trip: float
) -> None:
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the test modules are compiled by this Python; the layout names cpython-311")
    app = await handle_of(PY, "py")
    fetcher = await guessing_fetcher(tmp_path, nursery, app, round_trip)
    ix = app.layer.index

    await fetcher.read(app, ix.find("app/__pycache__/main.cpython-311.pyc"), 0, 4096)
    await trio.sleep(0.5)
    here = {
        name: bool(app.cached[ix.first_chunk[ino]]) or (app.id, ix.first_chunk[ino]) in fetcher._memory
        for name in ("__init__", "helper", "sub", "unused")
        if (ino := ix.find(f"app/pkg/__pycache__/{name}.cpython-311.pyc")) is not None
    }
    long = round_trip > 0.01
    # the package, the submodule imported from it, and what the package imports in turn
    assert here == {"__init__": long, "helper": long, "sub": long, "unused": False}


async def test_an_import_cycle_is_followed_once_per_module(tmp_path: Path, nursery, monkeypatch) -> None:
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the test modules are compiled by this Python; the layout names cpython-311")
    import fuse.ahead

    scans: list[int] = []
    real = fuse.ahead.imports
    monkeypatch.setattr(fuse.ahead, "imports", lambda data: scans.append(1) or real(data))
    cycle = [
        im.File(f"app/__pycache__/{a}.cpython-311.pyc", pyc(f"import {b}\n"))
        for a, b in (("a", "b"), ("b", "c"), ("c", "a"))
    ]
    app = await handle_of(cycle, "cycle")
    fetcher = await guessing_fetcher(tmp_path, nursery, app, 0.05)
    await fetcher.read(app, app.layer.index.find("app/__pycache__/a.cpython-311.pyc"), 0, 4096)
    await trio.sleep(0.5)
    assert len(scans) == 3  # a, b, c: never round again
