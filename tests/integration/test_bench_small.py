"""The benchmark harness end to end on the tiny `small` image (busybox, built in about a second): the
registry in its own network namespace, unlimited bandwidth, one repeat. The overlayfs mode runs for real
(full pull, the workload's READY line); the lazy modes are asserted when lazysnap serve claims layers and
skipped with the harness's reason otherwise. Also: the link is really shaped, the delay proxy really adds
latency, and the network is removed even when the body raises KeyboardInterrupt. Nothing is left behind:
no namespace, veth, process, mount or temp dir (checked here and by the session check)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import harness, realistic
from bench import network as bn
from tests.harness.procs import mounts_under, pids_with_cmdline, running_services

TOOLS = ("ip", "tc", "docker-registry", "containerd", "ctr", "ctr-remote", "runc")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and containerd need root"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)} (make system-deps)"
    ),
]


def _ours() -> list[str]:
    """Namespaces and veths named by this test process."""
    mine = f"{bn.NETNS_PREFIX}{os.getpid()}-"
    tokens = {ns[len(mine) :] for ns in bn.namespaces() if ns.startswith(mine)}
    return [ns for ns in bn.namespaces() if ns.startswith(mine)] + [
        v for v in bn.host_veths() if v[len(bn.VETH_HOST_PREFIX) :] in tokens
    ]


def _leftovers(directory: Path) -> list[str]:
    problems = [f"network left: {x}" for x in _ours()]
    problems += [f"process left: {s.name} (pid {s.pid})" for s in running_services()]
    problems += [f"process left: pid {p}" for p in pids_with_cmdline(str(directory))]
    problems += [f"mount left: {m}" for m in mounts_under(directory)]
    problems += [f"temp dir left: {p}" for p in (directory / "tmp").iterdir()]
    return problems


@pytest.fixture(scope="module")
def small_run() -> Iterator[harness.Results]:
    """The small scenario, run once for the module's tests, in a temp dir removed afterwards; every run
    directory is made in <dir>/tmp, so the check at the end sees anything left."""
    directory = Path(tempfile.mkdtemp(prefix="lzs-test-bench-"))
    (directory / "tmp").mkdir()
    try:
        settings = harness.Settings(
            images=["small"],
            modes=harness.parse_modes("overlayfs,lazysnap,lazysnap-optimized"),
            rate=None,
            repeat=1,
            cache_dir=directory / "cache",
            out=directory / "out" / "startup",
            drop_caches=False,  # other work on this machine keeps its page cache; the CLI drops it
            temp_dir=directory / "tmp",
        )
        started = time.monotonic()
        results = harness.run_benchmark(settings, log=lambda _text: None)
        results.settings["seconds"] = time.monotonic() - started
        yield results
        left = _leftovers(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert not left, "the benchmark left things behind:\n" + "\n".join(left)


def _row(results: harness.Results, mode: str) -> dict:
    return next(r for r in results.summary if r["mode"] == mode)


def test_overlayfs_full_pull_runs_for_real(small_run: harness.Results):
    [run] = [r for r in small_run.runs if r.mode == "overlayfs"]
    assert run.ok, run.error
    assert run.ready_line.startswith("READY small mode=bench")
    image = small_run.images["small"]
    assert image["layers"] == 2 and image["whiteouts"] == 1
    assert run.pull_s > 0 and run.run_s > 0 and run.total_s == pytest.approx(run.pull_s + run.run_s)
    # a full pull: the registry sent every layer byte (and the manifest and config)
    assert image["bytes"] <= run.ready_bytes < image["bytes"] + 100_000
    assert run.wire_bytes >= run.ready_bytes
    assert run.containerd_cpu_s is not None and run.containerd_cpu_s > 0
    assert run.snapshotter_peak_rss is not None and run.snapshotter_peak_rss > 10 << 20
    assert small_run.settings["seconds"] < 60


@pytest.mark.parametrize("mode", ["lazysnap", "lazysnap-optimized"])
def test_lazy_modes(small_run: harness.Results, mode: str):
    [run] = [r for r in small_run.runs if r.mode == mode]
    if run.skipped:
        assert "does not claim layers" in run.error
        pytest.skip(run.error)
    assert run.ok, run.error
    assert run.ready_line.startswith("READY small")
    assert run.snapshotter_cpu_s is not None and run.snapshotter_peak_rss
    assert _row(small_run, mode)["speedup"] is not None


def test_outputs(small_run: harness.Results):
    paths = {p.suffix: p for p in small_run.files}
    doc = json.loads(paths[".json"].read_text())
    assert [r["mode"] for r in doc["summary"]] == ["overlayfs", "lazysnap", "lazysnap-optimized"]
    assert len(doc["runs"]) == 3 and doc["settings"]["rate"] is None
    table = paths[".md"].read_text()
    assert "| small | overlayfs |" in table and "1.00x" in table
    if ".png" in paths:
        assert paths[".png"].read_bytes()[:4] == b"\x89PNG"


def _fetch(url: str) -> tuple[float, int]:
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=30) as r:
        size = len(r.read())
    return time.monotonic() - start, size


def test_link_is_shaped_and_delayed_and_always_removed(tmp_path: Path):
    image = realistic.build("small", tmp_path / "cache", log=lambda _text: None)
    blob = next(layer for layer in image.layers if layer.size > 4 << 20)
    with pytest.raises(KeyboardInterrupt):
        with bn.ShapedRegistry(tmp_path / "net", tmp_path / "storage", rate="40mbit", delay_ms=60) as net:
            pids = [net.registry.pid, net.proxy.pid]
            assert "rate 40Mbit" in net.qdisc()
            realistic.push(image, net.push_host, "bench/small")
            mark = net.mark()
            seconds, size = _fetch(f"http://{net.push_host}/v2/bench/small/blobs/{blob.digest}")
            assert size == blob.size
            assert 25 <= size * 8 / seconds / 1e6 <= 42  # Mbit/s through tbf rate 40mbit
            traffic = net.traffic(mark)
            assert traffic.blob_bytes == blob.size and traffic.wire_bytes >= blob.size
            direct, _ = _fetch(f"http://{net.push_host}/v2/")
            delayed, _ = _fetch(f"http://{net.host}/v2/")  # through the proxy: +60 ms per round trip
            assert delayed >= direct + 0.06
            net.shape(None)
            assert "tbf" not in net.qdisc()
            raise KeyboardInterrupt
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} still runs"
    assert not _ours()


@pytest.mark.skipif(shutil.which("umoci") is None, reason="needs umoci (make system-deps)")
def test_umoci_repack_keeps_the_tree_and_writes_a_root_entry(tmp_path: Path):
    """small-umoci: the `small` image's layers repacked by umoci. Its layers start with umoci's root
    entry (what made lazysnap refuse real layers, issue 13), the whiteout is umoci's, and applying its
    layers gives the same tree as applying small's."""
    from tests.harness import trees

    cache = tmp_path / "cache"
    source = realistic.build("small", cache, log=lambda _t: None)
    repacked = realistic.build("small-umoci", cache, log=lambda _t: None)
    assert realistic.cached("small-umoci", cache) == repacked  # found again, not rebuilt
    assert [x.digest for x in repacked.layers] != [x.digest for x in source.layers]
    for layer in repacked.layers:
        with gzip.open(layer.path) as f:
            assert f.read(100).split(b"\0", 1)[0] in (b".", b"./"), f"{layer.path}: no root entry first"
    assert repacked.layers[1].whiteouts == 1
    trees_of = {}
    for image in (source, repacked):
        root = tmp_path / image.name
        realistic.extract_layers([x.path for x in image.layers], root)
        trees_of[image.name] = trees.scan(root)
    trees.assert_same(trees_of["small"], trees_of["small-umoci"])
    config = repacked.config()
    assert config["rootfs"]["diff_ids"] == [x.diff_id for x in repacked.layers]
    assert config["config"]["Cmd"] == list(source.command)
