"""`lazysnap convert --optimize --run`: the workload runs chrooted into the image mounted lazily by
lazysnap's own data path, the files it opens are recorded, and the converted image has them before
`.prefetch.landmark`; a workload that outlives its timeout is killed with everything it started, and a
failure leaves nothing behind either."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from fuse.formats import Layer, RegistrySource, open_layer
from fuse.formats.annotations import expected_toc_digest
from fuse.formats.index import REG
from fuse.registry import RegistryClient
from snapshotter.convert.converter import convert_image
from snapshotter.convert.optimize import OptimizeError, record_accessed_files
from tests.harness import images as im
from tests.harness.accelerate import BUSYBOX
from tests.harness.procs import mounts_under, pids_with_cmdline
from tests.harness.registry import Registry

LAZYSNAP = str(Path(sys.executable).parent / "lazysnap")
READ = {"etc/a", "data/b"}


@pytest.fixture(autouse=True)
def _root() -> None:
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("running a workload on a lazily mounted image needs root")


def app_image() -> im.Image:
    """busybox and some files, in two layers: the workload reads one file of each."""
    base = im.Layer(
        [
            im.Dir("bin"),
            im.File("bin/busybox", BUSYBOX, mode=0o755),
            im.Symlink("bin/sh", "busybox"),
            im.Symlink("bin/cat", "busybox"),
            im.Dir("etc"),
            im.File("etc/unread-1", im.pseudo_random(300_000, seed=1)),
            im.File("etc/a", b"read me\n"),
            im.File("etc/unread-2", b"not read\n"),
        ]
    )
    top = im.Layer(
        [
            im.Dir("data"),
            im.File("data/unread-3", im.pseudo_random(2 << 20, seed=3)),
            im.File("data/b", im.pseudo_random(100_000, seed=4)),
            im.File("data/unread-4", b"not read either\n"),
        ]
    )
    return im.Image([base, top], cmd=["/bin/sh"])


async def open_layers(client: RegistryClient, ref: str) -> list[Layer]:
    resolved = await client.resolve(ref)
    return [
        await open_layer(
            RegistrySource(client, resolved.reference, d["digest"], d["size"]),
            expected_toc_digest(d.get("annotations")),
        )
        for d in resolved.layers
    ]


def first_offsets(layer: Layer) -> dict[str, int]:
    """Where each non-empty regular file's data starts in the blob."""
    ix = layer.index
    return {
        ix.path(ino): ix.c_start[ix.first_chunk[ino]]
        for ino in range(2, ix.inode_count + 1)
        if ix.kind[ino] == REG and ix.chunk_count[ino]
    }


@pytest.fixture
def tmp(workdir: Path) -> Path:
    """The optimizer's temp dirs go here (the registry's files are in workdir, its command line names it)."""
    path = workdir / "tmp"
    path.mkdir()
    return path


def assert_nothing_left(tmp: Path) -> None:
    assert mounts_under(tmp) == []
    assert pids_with_cmdline(str(tmp)) == []
    assert list(tmp.iterdir()) == []


async def test_convert_optimize_prioritizes_what_the_workload_reads(registry: Registry, tmp: Path) -> None:
    await im.push_image_async(registry.url, "opt/app", "v1", app_image())
    src, dst = f"{registry.host}/opt/app:v1", f"{registry.host}/opt/app:fast"
    argv = [LAZYSNAP, "convert", src, dst, "--optimize", "--run", "cat /etc/a /data/b > /dev/null"]
    proc = subprocess.run([*argv, "--tmpdir", str(tmp)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the workload exited with status 0" in proc.stderr  # what it does: stderr, with progress
    recorded = int(proc.stderr.split("recorded ")[1].split()[0])
    assert recorded == 3, proc.stderr  # /bin/busybox (exec'd), /etc/a, /data/b
    assert f"pushed {dst}@sha256:" in proc.stdout  # the result: stdout
    assert_nothing_left(tmp)

    async with RegistryClient() as client:
        layers = await open_layers(client, dst)
    assert len(layers) == 2
    for layer in layers:
        span = layer.prefetch_span()
        assert span is not None
        offsets = first_offsets(layer)
        read = {p for p in offsets if p in READ or p == "bin/busybox"}
        assert read, offsets
        for path, start in offsets.items():
            if path in read:
                assert start < span[1], (path, start, span)
            else:
                assert start >= span[1], (path, start, span)
    # in first-access order: busybox (the shell) before what cat read
    base = first_offsets(layers[0])
    assert base["bin/busybox"] < base["etc/a"]


async def test_timeouts_failures_and_the_sandbox(registry: Registry, tmp: Path) -> None:
    await im.push_image_async(registry.url, "opt/app", "v1", app_image())
    no_shell = im.Image([im.Layer([im.Dir("etc"), im.File("etc/a", b"x")])])
    await im.push_image_async(registry.url, "opt/bare", "v1", no_shell)
    app, bare = f"{registry.host}/opt/app:esgz", f"{registry.host}/opt/bare:esgz"
    async with RegistryClient() as client:
        await convert_image(client, f"{registry.host}/opt/app:v1", app)
        await convert_image(client, f"{registry.host}/opt/bare:v1", bare)

        # a workload that outlives its timeout: it and what it started in the background are killed
        started = time.monotonic()
        command = "cat /etc/a; /bin/busybox sleep 987654 & exec /bin/busybox sleep 987654"
        paths = await record_accessed_files(client, app, command, timeout=2, tmpdir=tmp)
        assert time.monotonic() - started < 30
        assert paths == ["/bin/busybox", "/etc/a"]
        assert pids_with_cmdline("987654") == []
        assert_nothing_left(tmp)

        # the sandbox: a writable root whose new files are not recorded, /proc of its own PID
        # namespace, /dev/null, tmpfs on /tmp, /sys read-only
        command = (
            "set -e; echo new > /etc/new; cat /etc/new /data/b > /tmp/out; test -c /dev/null; "
            "test $$ = 1; test -e /proc/1/stat; ! echo x 2> /dev/null > /sys/kernel/x; "
            "/bin/busybox grep -q ' /tmp tmpfs ' /proc/mounts"
        )
        logs: list[str] = []
        paths = await record_accessed_files(client, app, command, timeout=20, tmpdir=tmp, log=logs.append)
        assert "the workload exited with status 0" in logs, logs
        assert paths == ["/bin/busybox", "/data/b"]
        assert_nothing_left(tmp)

        # cancelled from outside (convertd's job timeout, Ctrl-C): cleaned up all the same
        with trio.move_on_after(3) as scope:
            await record_accessed_files(client, app, "exec /bin/busybox sleep 987655", timeout=60, tmpdir=tmp)
        assert scope.cancelled_caught
        assert pids_with_cmdline("987655") == []
        assert_nothing_left(tmp)

        # failures: an image without /bin/sh, an image that is not lazily loadable
        with pytest.raises(OptimizeError, match="cannot run /bin/sh in the image"):
            await record_accessed_files(client, bare, "true", timeout=10, tmpdir=tmp)
        assert_nothing_left(tmp)
        with pytest.raises(OptimizeError, match="not lazily loadable"):
            await record_accessed_files(client, f"{registry.host}/opt/app:v1", "true", timeout=10, tmpdir=tmp)
        assert_nothing_left(tmp)


def test_a_killed_optimizer_leaves_no_mount_nor_workload(registry: Registry, tmp: Path) -> None:
    """SIGKILL gives no chance to clean up: the kernel stops the mount (SIGTERM: it unmounts) and the
    workload's namespace (SIGKILL) when their parent dies. Only the temp dir stays."""
    im.push_image(registry.url, "opt/app", "v1", app_image())
    argv = [LAZYSNAP, "convert", f"{registry.host}/opt/app:v1", "--optimize", "--tmpdir", str(tmp)]
    argv += ["--run", "n=987656; exec /bin/busybox sleep $n"]  # "sleep 987656": only the workload
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not pids_with_cmdline("sleep 987656") and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.1)
        assert mounts_under(tmp)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while (mounts_under(tmp) or pids_with_cmdline(str(tmp))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mounts_under(tmp) == []
    assert pids_with_cmdline(str(tmp)) == [] and pids_with_cmdline("987656") == []
