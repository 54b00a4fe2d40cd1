"""Benchmark: lazysnap's snapshots service under load, and a full pull through it against containerd's
built-in overlayfs snapshotter, same image, same run.

1. RPC latency. A `lazysnap serve` holds 1,000 committed snapshots (100 chains of 10, with the labels a
   pull leaves) and 50 active ones (a container upper dir of 1,000 files each). 50 callers share one
   gRPC channel, as containerd's proxy plugin does, and issue Stat, List (all, and containerd's
   remote-snapshot filter), Usage of committed and of active snapshots; p50/p99 per call and calls/s.
2. Full pull. A ~100 MB image of pseudo-random data in several layers (tests/harness/images.py), in the
   local registry; `ctr image pull` into a fresh containerd with `--snapshotter lazysnap`, and with its
   own overlayfs snapshotter, alternating, the median of each; the ratio is lazysnap / overlayfs.

    python -m bench.snapshotter_rpc [--callers 50] [--calls 4000] [--runs 3] [--json FILE]

Needs root (containerd). Both sides share the 2 cores with the callers and with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from tests.harness import images as im
from tests.harness.containerd import Containerd
from tests.harness.procs import unmount_all
from tests.harness.registry import Registry
from tests.harness.snapshotter import PLUGIN, Lazysnap

CHAINS, DEPTH = 100, 10
ACTIVE, ACTIVE_FILES = 50, 1000
REF_LABEL = "containerd.io/snapshot.ref"


def populate(snap: Lazysnap) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """1,000 committed snapshots and 50 active ones; (committed names, (ref, parent) pairs, actives)."""
    committed: list[str] = []
    refs: list[tuple[str, str]] = []
    actives: list[str] = []
    lock = threading.Lock()
    c = snap.client()  # one channel for all, as containerd's proxy plugin has

    def chain(n: int) -> None:
        parent = ""
        for i in range(DEPTH):
            chain_id = f"sha256:{n:032x}{i:032x}"
            key = f"default/{n * 100 + i}/extract-{n}-{i} {chain_id}"
            labels = {REF_LABEL: chain_id, "containerd.io/snapshot/cri.layer-digest": f"sha256:{i:064x}"}
            c.prepare(key, parent, labels)
            name = f"default/{n * 100 + i}/{chain_id}"
            c.commit(name, key, labels)
            with lock:
                committed.append(name)
                refs.append((chain_id, parent))
            parent = name
        if n < ACTIVE:
            key = f"default/{n}/container-{n}"
            (m,) = c.prepare(key, parent)
            upper = Path(next(o for o in m.options if o.startswith("upperdir=")).split("=", 1)[1])
            for f in range(ACTIVE_FILES):
                (upper / f"f{f}").write_bytes(b"x" * 100)
            with lock:
                actives.append(key)

    threads = [threading.Thread(target=chain, args=(n,)) for n in range(CHAINS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(committed) == CHAINS * DEPTH
    return committed, refs, actives


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(callers: int, calls: int, call: Callable[[random.Random], object], server_pid: int) -> dict:
    """`calls` calls spread over `callers` threads; latency percentiles, throughput, and the server's
    CPU time per call (what the daemon costs, whatever the Python callers cost on the same cores)."""
    latencies: list[float] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(callers + 1)

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        start_gate.wait()
        for _ in range(calls // callers):
            t = time.perf_counter()
            call(rng)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    cpu0 = cpu_seconds(server_pid)
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(server_pid) - cpu0
    lat = sorted(latencies)
    return {
        "calls": len(lat),
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        "calls_per_s": len(lat) / elapsed,
        "server_cpu_ms_per_call": cpu / len(lat) * 1e3,
    }


def rpc_latency(tmp: Path, callers: int, calls: int) -> dict:
    snap = Lazysnap(tmp, name="lazysnap-rpc", log_level="info").start()
    try:
        t0 = time.perf_counter()
        committed, refs, actives = populate(snap)
        populate_s = time.perf_counter() - t0
        channel = grpc.insecure_channel(f"unix:{snap.address}")
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)

        def stat(rng: random.Random) -> None:
            stub.Stat(pb.StatSnapshotRequest(snapshotter=PLUGIN, key=rng.choice(committed)))

        def list_all(rng: random.Random) -> None:
            n = sum(len(r.info) for r in stub.List(pb.ListSnapshotsRequest(snapshotter=PLUGIN)))
            assert n == len(committed) + len(actives)

        def list_filtered(rng: random.Random) -> None:
            ref, parent = rng.choice(refs)
            f = f'labels."{REF_LABEL}"=={ref},parent=="{parent}"'
            n = sum(len(r.info) for r in stub.List(pb.ListSnapshotsRequest(snapshotter=PLUGIN, filters=[f])))
            assert n == 1

        def usage_committed(rng: random.Random) -> None:
            stub.Usage(pb.UsageRequest(snapshotter=PLUGIN, key=rng.choice(committed)))

        def usage_active(rng: random.Random) -> None:
            assert (
                stub.Usage(pb.UsageRequest(snapshotter=PLUGIN, key=rng.choice(actives))).inodes
                == 1 + ACTIVE_FILES
            )

        rows = {}
        for name, fn, n in [
            ("Stat", stat, calls),
            ("List (all 1,050)", list_all, max(callers, calls // 20)),
            ("List (ref+parent filter)", list_filtered, calls),
            ("Usage (committed)", usage_committed, calls),
            ("Usage (active, 1,000 files)", usage_active, max(callers, calls // 4)),
        ]:
            load(callers, callers, fn, snap.pid)  # warm-up: threads, connections, caches
            rows[name] = load(callers, n, fn, snap.pid)
            r = rows[name]
            print(
                f"  {name:<28} {r['calls']:>6} calls  p50 {r['p50_ms']:>8.2f} ms  p99 {r['p99_ms']:>8.2f} ms"
                f"  {r['calls_per_s']:>8.0f}/s  server {r['server_cpu_ms_per_call']:.3f} ms CPU/call",
                flush=True,
            )
        channel.close()
        return {"snapshots": len(committed), "active": len(actives), "populate_s": populate_s, "rpcs": rows}
    finally:
        snap.stop()


def pull_image() -> im.Image:
    """~100 MB of incompressible data in 5 layers of files from 4 KiB to 8 MiB."""
    sizes_mb = [40, 25, 15, 12, 8]
    layers = []
    for n, mb in enumerate(sizes_mb):
        entries: list = []
        remaining, i = mb << 20, 0
        while remaining > 0:
            size = min(remaining, random.Random(n * 1000 + i).choice([4 << 10, 64 << 10, 1 << 20, 8 << 20]))
            entries.append(im.File(f"layer{n}/dir{i % 7}/file{i}", im.pseudo_random(size, seed=n * 1000 + i)))
            remaining -= size
            i += 1
        layers.append(im.Layer(entries))
    return im.Image(layers)


def timed_pull(workdir: Path, ref: str, lazysnap: bool) -> float:
    snap = Lazysnap(workdir, name="lazysnap", log_level="info").start() if lazysnap else None
    containerd = Containerd(workdir / "containerd", snapshotter_socket=workdir / "lazysnap.sock").start()
    try:
        subprocess.run(["sync"], check=True)
        args = ["image", "pull", "--plain-http", *(["--snapshotter", PLUGIN] if lazysnap else []), ref]
        t0 = time.perf_counter()
        containerd.ctr(*args)
        elapsed = time.perf_counter() - t0
        if snap is not None:
            assert len(snap.client().list("kind==committed")) == 5
        return elapsed
    finally:
        containerd.stop()
        if snap is not None:
            snap.stop()
        unmount_all(workdir)
        shutil.rmtree(workdir)


def full_pull(tmp: Path, runs: int) -> dict:
    image = pull_image()
    size = sum(len(layer.blob("gzip")) for layer in image.layers)
    reg = Registry(tmp / "registry", record=False).start()
    try:
        im.push_image(reg.url, "bench/pull", "v1", image)
        ref = f"{reg.host}/bench/pull:v1"
        times: dict[str, list[float]] = {"lazysnap": [], "overlayfs": []}
        for r in range(runs):
            order = ["lazysnap", "overlayfs"] if r % 2 == 0 else ["overlayfs", "lazysnap"]
            for which in order:
                t = timed_pull(tmp / f"pull-{r}-{which}", ref, which == "lazysnap")
                times[which].append(t)
                print(f"  run {r + 1}: {which:<9} {t:6.2f} s", flush=True)
    finally:
        reg.stop()
    lz, ov = statistics.median(times["lazysnap"]), statistics.median(times["overlayfs"])
    return {
        "image_bytes": size,
        "layers": len(image.layers),
        "runs": runs,
        "lazysnap_s": times["lazysnap"],
        "overlayfs_s": times["overlayfs"],
        "lazysnap_median_s": lz,
        "overlayfs_median_s": ov,
        "ratio": lz / ov,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--calls", type=int, default=4000, help="Stat calls (the other RPCs scale from it)")
    parser.add_argument("--runs", type=int, default=3, help="pulls per snapshotter")
    parser.add_argument("--json", type=Path, default=Path("bench/results/snapshotter_rpc.json"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lzs-bench-"))
    try:
        print(f"RPC latency: {CHAINS * DEPTH} committed + {ACTIVE} active snapshots, {args.callers} callers")
        rpc = rpc_latency(tmp / "rpc", args.callers, args.calls)
        print(f"full pull: ~100 MB image, {args.runs} runs each, fresh containerd per pull")
        pull = full_pull(tmp, args.runs)
    finally:
        unmount_all(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    title = f"RPC ({args.callers} concurrent callers)"
    print(f"{title:<30} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8} {'srv CPU ms':>10}")
    for name, r in rpc["rpcs"].items():
        print(
            f"{name:<30} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['calls_per_s']:>8.0f} "
            f"{r['server_cpu_ms_per_call']:>10.3f}"
        )
    print()
    print(f"{'full pull':<30} {'median s':>8}   runs")
    for which in ("lazysnap", "overlayfs"):
        runs = " ".join(f"{t:.2f}" for t in pull[f"{which}_s"])
        print(f"{which:<30} {pull[f'{which}_median_s']:>8.2f}   {runs}")
    print(f"{'ratio lazysnap / overlayfs':<30} {pull['ratio']:>8.2f}   (target <= 1.2)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"callers": args.callers, "rpc": rpc, "pull": pull}, indent=2) + "\n")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
