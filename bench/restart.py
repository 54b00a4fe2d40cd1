"""Benchmark: how long readers of lazy files pause when the daemon is killed (SIGKILL, as a crash or an
OOM kill), restarted (SIGTERM, `systemctl restart`) or upgraded in place (SIGHUP, `systemctl reload`),
beside the same reads just before each event (the baseline).

A real registry, containerd and `lazysnap supervise -- lazysnap serve` (the descriptor holder, as
systemd would be); an image of 24 files of 256 KiB lazily pulled; a container checksumming them in a
loop and a host reader timing reads of the same files through the FUSE mount, page caches dropped every
0.2 s so that reads reach the daemon (tests/harness/readload.py, shared with the e2e test). For each
event, `--repeat` times: the longest host read that waited across the restart (signal until the new
daemon answers) and the longest read in the 0.3 s before the signal. At the end every read of the
container and of the host must have succeeded with the right bytes, or the benchmark fails.

    python -m bench.restart --repeat 10 --out bench/results/restart    (make bench-restart, root)
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.accelerate import accelerate
from tests.harness.containerd import Containerd
from tests.harness.readload import Load, data_image, restart_pause
from tests.harness.registry import Registry
from tests.harness.snapshotter import PLUGIN, Lazysnap

EVENTS = (
    ("SIGKILL (crash, OOM kill)", signal.SIGKILL),
    ("SIGTERM (systemctl restart)", signal.SIGTERM),
    ("SIGHUP (systemctl reload: upgrade)", signal.SIGHUP),
)


def measure(workdir: Path, repeat: int) -> dict:
    registry = Registry(workdir / "registry").start()
    config = workdir / "lazysnap.toml"
    config.write_text(f'root = "{workdir}/state"\naddress = "{workdir}/lazysnap.sock"\nbackground = false\n')
    snapshotter = Lazysnap(workdir, config=config, supervised=True, log_level="info").start()
    containerd = Containerd(workdir / "containerd", snapshotter_socket=snapshotter.address).start()
    try:
        image, expected = data_image()
        ref = accelerate(registry, "bench/restart", image)
        containerd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", PLUGIN, ref)
        load = Load(containerd, snapshotter, ref, expected, workdir / "out").start()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in EVENTS}
        for _ in range(repeat):
            for name, signum in EVENTS:
                results[name].append(restart_pause(load, snapshotter, signum))
        lines = load.finish()  # raises unless every read succeeded with the right bytes
        return {"results": results, "container_reads": len(lines), "host_reads": len(load.timings)}
    finally:
        containerd.stop()
        snapshotter.stop()
        registry.stop()


def table(doc: dict) -> str:
    rows = [
        "| event | n | pause median s | pause p90 s | pause max s | baseline read median s | failed reads |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, pairs in doc["results"].items():
        pauses = sorted(p for p, _ in pairs)
        p90 = pauses[min(len(pauses) - 1, int(0.9 * len(pauses)))]
        base = statistics.median(b for _, b in pairs)
        rows.append(
            f"| {name} | {len(pairs)} | {statistics.median(pauses):.3f} | {p90:.3f} | {max(pauses):.3f} "
            f"| {base:.3f} | 0 |"
        )
    rows.append(
        f"\n{doc['container_reads']} checksummed reads in the container and {doc['host_reads']} timed "
        "reads on the host, all correct."
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="lzs-bench-restart-"))
    try:
        doc = measure(workdir, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc["when"] = time.strftime("%Y-%m-%d %H:%M")
    text = table(doc)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        args.out.with_suffix(".md").write_text(f"Daemon restarts under load, {doc['when']}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
