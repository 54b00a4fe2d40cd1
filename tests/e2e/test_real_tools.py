"""Images made by real tools, accelerated by real converters, pulled lazily through lazysnap: each equals
a full pull of its source entry by entry.

Sources: umoci (root entry `.`/`./`, whiteouts umoci computes) and GNU `tar -C rootfs -c .` (`./`
entries, GNU long names and long link targets, a symlink whose header mode is 0755). Converters:
`lazysnap convert`, `ctr-remote image convert --estargz` and skopeo's zstd:chunked. Each copy is pulled
with `ctr-remote image rpull`; every layer must be claimed lazily (no fallback to a full pull), and a
container's view must equal a container of the original image pulled in full by containerd (modes,
symlinks 0777, owners, sizes, mtimes, contents, hard links). `lazysnap mount` of a copy is compared with
containerd's full unpack on the host, xattrs included. Every test shares one registry, one plain
containerd, one `lazysnap serve` and the images (module-scoped fixtures).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fuse.layers import layer_name
from fuse.registry import manifests
from snapshotter.convert.index import index_image
from tests.harness import realtools as rt
from tests.harness import trees
from tests.harness.containerd import Containerd
from tests.harness.containers import RUNTIME_PATHS, chain_ids, container_tree
from tests.harness.mount import LazysnapMount
from tests.harness.procs import unmount_all
from tests.harness.registry import Registry, anonymous_client
from tests.harness.snapshotter import Lazysnap, Mounts, mounts_from_ctr

PLUGIN = "lazysnap"
SOURCES = ("umoci", "gnu-tar")
LAZY_CHECK_SIZE = 256 << 10  # layers larger than this must not be fetched whole by a pull


@dataclass
class Env:
    dir: Path
    registry: Registry
    plain: Containerd  # full pulls, ctr-remote conversions
    snapshotter: Lazysnap
    lazy: Containerd  # lazysnap as proxy plugin
    mounts: Mounts


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    directory = Path(tempfile.mkdtemp(prefix="lzs-test-"))
    started: list = []
    mounts = Mounts(directory)
    try:
        # no request recorder: skopeo's HTTPS probe would wait 10 s on it before falling back to HTTP
        registry = Registry(directory / "registry", record=False).start()
        started.append(registry)
        plain = Containerd(directory / "plain").start()
        started.append(plain)
        # no background fetch nor program ahead: what was fetched shows laziness (these images' program,
        # /bin/sh, busybox, is most of their first layer)
        config = directory / "lazysnap.toml"
        config.write_text(
            f'root = "{directory}/lazysnap"\naddress = "{directory}/lazysnap.sock"\nbackground = false\n'
            "prefetch_program = false\n"
        )
        snapshotter = Lazysnap(directory, config=config, log_level="info").start()
        started.append(snapshotter)
        lazy = Containerd(directory / "lazy", snapshotter_socket=snapshotter.address).start()
        started.append(lazy)
        yield Env(directory, registry, plain, snapshotter, lazy, mounts)
    finally:
        mounts.unmount_all()
        for service in reversed(started):
            service.stop()
        unmount_all(directory)
        shutil.rmtree(directory)


@dataclass
class Pulled:
    """A source image, pulled in full by containerd's own snapshotter, and what it looks like."""

    source: rt.Source
    ref: str
    layer_tars: list[bytes]
    container: trees.Tree  # listed inside a container
    unpacked: trees.Tree  # containerd's full unpack, scanned on the host (xattrs included)


def _layers_and_diff_ids(ref: str) -> tuple[list[dict], list[str], list[bytes]]:
    async def get() -> tuple[list[dict], list[str], list[bytes]]:
        async with anonymous_client() as client:
            resolved = await client.resolve(ref)
            config = json.loads(
                await client.get_blob(resolved.reference, resolved.config_descriptor["digest"])
            )
            tars = []
            for desc in resolved.layers:
                blob = await client.get_blob(resolved.reference, desc["digest"], max_size=64 << 20)
                tars.append(gzip.decompress(blob))
            return resolved.layers, config["rootfs"]["diff_ids"], tars

    return trio.run(get)


@pytest.fixture(scope="module")
def sources(env: Env) -> dict[str, Pulled]:
    made = {
        "umoci": rt.umoci_image(env.dir, env.registry, "real/umoci:src"),
        "gnu-tar": rt.gnu_tar_image(env.dir, env.registry, "real/gnu-tar", "src"),
    }
    out = {}
    for name, source in made.items():
        ref = source.ref(env.registry)
        env.plain.ctr("image", "pull", "--plain-http", ref)
        _layers, diff_ids, tars = _layers_and_diff_ids(ref)
        view = json.loads(
            env.plain.ctr("snapshots", "view", "--mounts", f"view-{name}", chain_ids(diff_ids)[-1]).stdout
        )
        target = env.mounts.mount(mounts_from_ctr(view), env.dir / f"full-{name}")
        unpacked = trees.scan(target)
        env.mounts.unmount(target)
        env.plain.ctr("snapshots", "rm", f"view-{name}", check=False)  # containerd may have collected it
        out[name] = Pulled(source, ref, tars, container_tree(env.plain, ref), unpacked)
    return out


_accelerated: dict[tuple[str, str], str] = {}


def accelerated(env: Env, pulled: Pulled, converter: str) -> str:
    key = (pulled.source.name, converter)
    if key not in _accelerated:
        _accelerated[key] = rt.accelerated(converter, pulled.source, env.registry, env.plain, env.dir)
    return _accelerated[key]


def test_sources_carry_what_real_tools_write(sources: dict[str, Pulled]) -> None:
    """The fixtures are what they claim: a root entry, GNU long names, an odd symlink header mode."""
    for name, pulled in sources.items():
        raw_names = [_raw_names(tar) for tar in pulled.layer_tars]
        assert raw_names[0][0] in (".", "./"), f"{name}: first entry {raw_names[0][0]!r}"
        long_names = [n for n in raw_names[0] if len(n.rstrip("/")) > 100]
        assert any(rt.LONG_FILE in n for n in long_names), f"{name}: no long name in {raw_names[0]}"
        assert any(".wh." in n for n in raw_names[1]), f"{name}: no whiteout in {raw_names[1]}"
    gnu = sources["gnu-tar"].layer_tars
    assert b"././@LongLink" in gnu[0]  # GNU long names ('L') and link targets ('K'), not PAX
    odd = [m for m in tarfile.open(fileobj=io.BytesIO(gnu[1])) if m.name.endswith(rt.ODD_SYMLINK)]
    assert odd and odd[0].issym() and odd[0].mode == 0o755
    # the full pull shows what a plain unpack makes of them
    assert sources["gnu-tar"].container.nodes[rt.ODD_SYMLINK].mode == 0o777
    for pulled in sources.values():
        assert rt.NEW_FILE in pulled.container.nodes
        assert not any(path in pulled.container.nodes for path in rt.DELETED)


def test_the_program_of_a_config_umoci_wrote_is_found(sources: dict[str, Pulled]) -> None:
    """Program ahead reads what umoci writes (`umoci config --config.cmd /bin/sh`), not only our configs."""

    async def config() -> bytes:
        async with anonymous_client() as client:
            resolved = await client.resolve(sources["umoci"].ref)
            return await client.get_blob(resolved.reference, resolved.config_descriptor["digest"])

    command = manifests.command(trio.run(config))
    assert command is not None and command.argv == ("/bin/sh",) and command.program() == ["/bin/sh"]


def _raw_names(tar: bytes) -> list[str]:
    """Member names as written (tarfile shows `./` as `.`; the header's name field says more)."""
    names = []
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for member in t:
            header = tar[member.offset : member.offset + 100].split(b"\0", 1)[0].decode()
            names.append(header if header in (".", "./") else member.name)
    return names


def _layers(ref: str) -> list[dict]:
    async def layers() -> list[dict]:
        async with anonymous_client() as client:
            return (await client.resolve(ref)).layers

    return trio.run(layers)


def _assert_claimed_lazily(env: Env, ref: str, sent_before: dict[str, int] | None = None) -> None:
    log = env.snapshotter.log()
    for desc in _layers(ref):
        digest = desc["digest"]
        assert f"full pull for {ref} layer {digest}" not in log, (
            f"{ref}: layer {digest} fell back:\n{log[-3000:]}"
        )
        about = "\n".join(line for line in log.splitlines() if digest[7:19] in line)[-3000:]
        assert f"layer={layer_name(digest)}" in log or f'"layer":"{layer_name(digest)}"' in log, (
            f"{ref}: layer {digest} was not claimed lazily:\n{about}"
        )
        sent = env.registry.blob_bytes_sent(digest) - (sent_before or {}).get(digest, 0)
        if desc["size"] > LAZY_CHECK_SIZE:  # a tiny layer is all TOC: reading it reads all of it
            assert sent < desc["size"] / 2, f"{ref}: layer {digest} was downloaded ({sent} bytes)"


@pytest.mark.parametrize("converter", rt.CONVERTERS)
@pytest.mark.parametrize("source", SOURCES)
def test_lazy_pull_equals_full_pull(
    env: Env, sources: dict[str, Pulled], source: str, converter: str
) -> None:
    pulled = sources[source]
    ref = accelerated(env, pulled, converter)
    env.lazy.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", PLUGIN, ref)
    _assert_claimed_lazily(env, ref)
    lazy_tree = container_tree(env.lazy, ref, snapshotter=PLUGIN)
    trees.assert_same(pulled.container, lazy_tree, ignore=RUNTIME_PATHS)


@pytest.mark.parametrize("source", SOURCES)
def test_an_indexed_plain_image_loads_lazily_as_it_is(
    env: Env, sources: dict[str, Pulled], source: str
) -> None:
    """No conversion: the image umoci or GNU tar made, with the SOCI index `lazysnap index` publishes
    beside it, pulled lazily by its own reference; the container sees what a full pull shows."""
    pulled = sources[source]
    indexed(pulled)
    sent_before = {d["digest"]: env.registry.blob_bytes_sent(d["digest"]) for d in _layers(pulled.ref)}
    # a lazysnap and a containerd of their own: skopeo's copy keeps some of these very layers, which
    # the shared pair already holds as committed snapshots (a snapshot that exists is not prepared)
    name = f"lazysnap-indexed-{source}"
    config = env.dir / f"{name}.toml"
    config.write_text(
        f'root = "{env.dir}/{name}"\naddress = "{env.dir}/{name}.sock"\nbackground = false\n'
        "prefetch_program = false\n"
    )
    snapshotter = Lazysnap(env.dir, name=name, config=config, log_level="info").start()
    lazy = Containerd(env.dir / f"containerd-{name}", snapshotter_socket=snapshotter.address).start()
    try:
        lazy.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", PLUGIN, pulled.ref)
        _assert_claimed_lazily(dataclasses.replace(env, snapshotter=snapshotter), pulled.ref, sent_before)
        assert snapshotter.log().count("(gzip+zran,") == len(sent_before)
        lazy_tree = container_tree(lazy, pulled.ref, snapshotter=PLUGIN)
        trees.assert_same(pulled.container, lazy_tree, ignore=RUNTIME_PATHS)
    finally:
        lazy.stop()
        snapshotter.stop()


_indexed: set[str] = set()


def indexed(pulled: Pulled) -> str:
    """The source image itself, once `lazysnap index` has published its SOCI index (every layer)."""
    if pulled.ref not in _indexed:

        async def index() -> None:
            async with anonymous_client() as client:
                await index_image(client, pulled.ref, span_out=256 << 10, min_layer_size=0)

        trio.run(index)
        _indexed.add(pulled.ref)
    return pulled.ref


@pytest.mark.parametrize("how", ["converted", "indexed"])
@pytest.mark.parametrize("source", SOURCES)
def test_lazysnap_mount_equals_full_unpack(
    env: Env, sources: dict[str, Pulled], source: str, how: str
) -> None:
    """The data path alone, on the host: xattrs are compared too. `indexed`: no conversion, the image
    as the tool made it, through its SOCI index."""
    pulled = sources[source]
    ref = accelerated(env, pulled, "lazysnap") if how == "converted" else indexed(pulled)
    m = LazysnapMount(env.dir, ref, name=f"mnt-{source}-{how}").start()
    try:
        trees.assert_same(pulled.unpacked, trees.scan(m.mountpoint))
    finally:
        assert m.stop() == 0
