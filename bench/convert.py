"""Benchmark: image conversion throughput, lazysnap against `ctr-remote image convert`, same image, same run.

The image is built from this machine's own files (Python's standard library and site-packages in one
layer, programs from /usr/bin in another: many small files and some large ones, as real images have),
gzip-compressed, pushed to a real registry (docker-registry on loopback) and pulled into a real
containerd, which ctr-remote needs. Then, for each setting, each tool converts it `--repeat` times:

- ctr-remote: `ctr-remote image convert --estargz --oci [--estargz-compression-level L]` (or
  `--zstdchunked`), content store to content store;
- lazysnap (writer): the layer writer alone on the same compressed layers, local file to local file, as
  ctr-remote works (decompress, convert, hash; no network);
- lazysnap (convert): `lazysnap convert` registry to registry: download, convert, upload, push.

Printed: median seconds, throughput in MB/s of uncompressed tar, the converted size, and the ratio of
throughputs lazysnap/ctr-remote. Results go to bench/results/convert.json.

    python -m bench.convert [--repeat N] [--size-mb MB] [--json PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from fuse.registry import CredentialStore, HostsConfig, Reference, RegistryClient
from snapshotter.convert.converter import _convert_file, convert_image
from snapshotter.convert.writer import WriteOptions
from tests.harness.containerd import Containerd
from tests.harness.registry import Registry, anonymous_client

PYTHON_DIRS = [
    "/usr/lib/python3.11",
    "/usr/lib/python3",
    str(Path(__file__).resolve().parents[1] / ".venv/lib"),
]
PROGRAM_DIRS = ["/usr/bin"]


def build_layer(dirs: list[str], limit: int, out: Path) -> tuple[int, str]:
    """A gzip layer of the regular files, dirs and symlinks under `dirs` (sorted, up to `limit` bytes
    of file data); returns (uncompressed size, DiffID)."""
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top in dirs:
            for root, dirnames, filenames in os.walk(top):
                if total >= limit:
                    break
                dirnames.sort()
                for name in [root, *(os.path.join(root, f) for f in sorted(filenames))]:
                    if total >= limit:
                        break
                    st = os.lstat(name)
                    if not (os.path.isdir(name) or os.path.islink(name) or os.path.isfile(name)):
                        continue
                    info = tar.gettarinfo(name, arcname=name.lstrip("/"))
                    if info.isreg():
                        total += st.st_size
                        with open(name, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
    data = buf.getvalue()
    out.write_bytes(gzip.compress(data, compresslevel=6, mtime=0))
    return len(data), "sha256:" + hashlib.sha256(data).hexdigest()


async def push_image(ref: Reference, layers: list[tuple[Path, int, str]]) -> None:
    async with anonymous_client() as c:
        descs = []
        for path, _, _ in layers:
            digest = await c.upload_blob_file(ref, path)
            descs.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest,
                    "size": path.stat().st_size,
                }
            )
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/usr/bin/python3"]},
            "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]},
            "history": [{"created_by": f"bench layer {i}"} for i in range(len(layers))],
        }
        body = json.dumps(config).encode()
        config_digest = await c.push_blob(ref, body)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(body),
            },
            "layers": descs,
        }
        await c.push_manifest(ref, json.dumps(manifest).encode(), manifest["mediaType"])


def timed(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    """(median seconds, output bytes of the last run)."""
    times, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and setting (median reported)")
    parser.add_argument("--size-mb", type=int, default=240, help="MB of file data in the image (about)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/convert.json"))
    args = parser.parse_args()
    for tool in ("ctr-remote", "containerd", "docker-registry"):
        if not shutil.which(tool):
            raise SystemExit(
                f"{tool} is needed (Debian packages stargz-snapshotter, containerd, docker-registry)"
            )
    tmp = Path(tempfile.mkdtemp(prefix="lzs-bench-"))
    reg = ctd = None
    rows = []
    try:
        limit = args.size_mb << 20
        layers = []
        for i, (dirs, share) in enumerate([(PYTHON_DIRS, 0.6), (PROGRAM_DIRS, 0.4)]):
            path = tmp / f"layer{i}.tar.gz"
            size, diff_id = build_layer(dirs, int(limit * share), path)
            layers.append((path, size, diff_id))
        tar_bytes = sum(size for _, size, _ in layers)
        print(
            f"image: {len(layers)} layers, {tar_bytes / 1e6:.0f} MB of tar, "
            f"{sum(p.stat().st_size for p, _, _ in layers) / 1e6:.0f} MB gzip"
        )
        reg = Registry(tmp / "registry", record=False).start()
        ctd = Containerd(tmp / "containerd").start()
        src = Reference.parse(f"{reg.host}/bench/app:v1")
        trio.run(push_image, src, layers)
        ctd.ctr("image", "pull", "--plain-http", str(src))

        counter = iter(range(1_000_000))

        def ctr_remote(flags: list[str]) -> Callable[[], int]:
            def run() -> int:
                dst = f"{reg.host}/bench/ctr-remote:{next(counter)}"
                ctd.ctr_remote("image", "convert", "--oci", *flags, str(src), dst, timeout=1800)
                line = next(x for x in ctd.ctr("image", "ls").stdout.splitlines() if x.startswith(dst + " "))
                argv = ["ctr", "-a", str(ctd.address), "-n", ctd.namespace, "content", "get", line.split()[2]]
                manifest = json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)
                return sum(layer["size"] for layer in manifest["layers"])

            return run

        def writer(fmt: str, level: int | None) -> Callable[[], int]:
            def run() -> int:
                total = 0
                for i, (path, _, _) in enumerate(layers):
                    out = tmp / f"out{i}"
                    total += _convert_file(path, "gzip", out, WriteOptions(format=fmt, level=level)).size
                    out.unlink()
                return total

            return run

        def converter(fmt: str, level: int | None) -> Callable[[], int]:
            def run() -> int:
                async def go() -> int:
                    creds = CredentialStore(Path("/nonexistent"))
                    async with RegistryClient(hosts=HostsConfig(None), credentials=creds) as c:
                        dst = f"{reg.host}/bench/lazysnap-{next(counter)}:x"  # a fresh repository each run
                        result = await convert_image(c, src, dst, format=fmt, level=level, tmpdir=tmp)
                        return sum(layer.size for layer in result.layers)

                return trio.run(go)

            return run

        settings = [
            ("estargz (gzip 9)", ["--estargz", "--estargz-compression-level", "9"], "estargz", 9),
            ("estargz (gzip 6)", ["--estargz", "--estargz-compression-level", "6"], "estargz", 6),
            ("estargz (gzip 1)", ["--estargz", "--estargz-compression-level", "1"], "estargz", 1),
            ("eStargz zstd (default)", ["--zstdchunked"], "estargz-zstd", None),
        ]
        header = (
            f"{'setting':<24} | {'ctr-remote s':>12} {'MB/s':>6} {'MB out':>7} | {'lazysnap writer s':>17} "
            f"{'MB/s':>6} {'MB out':>7} {'ratio':>5} | {'lazysnap convert s':>18} {'MB/s':>6} {'ratio':>5}"
        )
        print(header)
        print("-" * len(header))
        for name, flags, fmt, level in settings:
            theirs_s, theirs_out = timed(ctr_remote(flags), args.repeat)
            ours_s, ours_out = timed(writer(fmt, level), args.repeat)
            conv_s, _ = timed(converter(fmt, level), args.repeat)
            row = {
                "setting": name,
                "tar_bytes": tar_bytes,
                "ctr_remote": {
                    "seconds": theirs_s,
                    "mb_per_s": tar_bytes / theirs_s / 1e6,
                    "out_bytes": theirs_out,
                },
                "lazysnap_writer": {
                    "seconds": ours_s,
                    "mb_per_s": tar_bytes / ours_s / 1e6,
                    "out_bytes": ours_out,
                },
                "lazysnap_convert": {"seconds": conv_s, "mb_per_s": tar_bytes / conv_s / 1e6},
                "writer_ratio": theirs_s / ours_s,
                "convert_ratio": theirs_s / conv_s,
            }
            rows.append(row)
            print(
                f"{name:<24} | {theirs_s:>12.2f} {row['ctr_remote']['mb_per_s']:>6.1f} "
                f"{theirs_out / 1e6:>7.1f} | "
                f"{ours_s:>17.2f} {row['lazysnap_writer']['mb_per_s']:>6.1f} {ours_out / 1e6:>7.1f} "
                f"{row['writer_ratio']:>5.2f} | {conv_s:>18.2f} {row['lazysnap_convert']['mb_per_s']:>6.1f} "
                f"{row['convert_ratio']:>5.2f}"
            )
    finally:
        if ctd:
            ctd.stop()
        if reg:
            reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    info = {"cores": len(os.sched_getaffinity(0)), "repeat": args.repeat, "rows": rows}
    args.json.write_text(json.dumps(info, indent=2) + "\n")
    print(f"ratio = lazysnap MB/s / ctr-remote MB/s (> 1: lazysnap faster). results: {args.json}")


if __name__ == "__main__":
    main()
