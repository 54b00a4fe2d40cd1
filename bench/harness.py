"""Benchmark: how much sooner containers are ready with lazy pulls (issue 8).

For each image (bench/realistic.py) and mode, `--repeat` times, on a clean node:

1. a fresh containerd (own temp root) and, for snapshotter modes, the snapshotter started before it;
   the page cache is dropped first (`echo 3 > /proc/sys/vm/drop_caches`);
2. **pull**: `ctr image pull --plain-http REF` (overlayfs: download and unpack everything) or
   `ctr-remote image rpull --plain-http --snapshotter NAME REF` (lazy modes);
3. **run**: `ctr run --rm` the workload, its output streamed, until it prints its ready line;
4. measured: pull seconds, run seconds until ready (create + start + workload), their total, bytes the
   registry sent until ready (its access log, and the veth's counter), CPU seconds and peak RSS of the
   snapshotter (and of containerd, where the built-in overlayfs snapshotter works), from
   /proc/<pid>/stat and /proc/<pid>/status sampled while the run goes;
5. everything is stopped by PID and its directories removed (content store, snapshots, snapshotter
   root and chunk cache).

The registry runs in a network namespace behind a veth shaped by tc tbf (bench/network.py), with an
optional delay proxy. Preparation (pushing, converting, recording) runs unshaped; runs are interleaved
(image by image, each repeat runs every mode) so drift hits all modes alike.

Modes:
- `overlayfs`: containerd's built-in snapshotter, full pull (the baseline every ratio is against);
- `lazysnap`: `lazysnap serve --config` (root, socket, hosts_dir for the plain-HTTP registry) as proxy
  plugin "lazysnap"; the image converted by `snapshotter.convert.convert_image` (eStargz) and lazily
  pulled. If the pull was not lazy (a layer of the image landed in containerd's content store: containerd
  downloaded it because the snapshotter did not claim it) the run is skipped with "lazysnap serve does not
  claim layers yet" and the bytes the registry sent;
- `lazysnap-optimized`: the same, converted with `prioritize=` the files the workload read in one
  recording run (no strace): overlayfs opens lower files with O_NOATIME, so the layers are extracted into
  a plain directory instead (atime = mtime, newer ctime: the first read moves the atime, even under
  relatime), the workload runs once on it with `ctr run --rootfs`, and the files whose atime moved are
  listed by atime, i.e. in the order of their first read (cached in <cache-dir>/recorded/);
- `lazysnap-index`: lazysnap pulling the plain image itself, lazily through the SOCI index `lazysnap
  index` publishes beside it (every layer indexed; no conversion);
- `other:NAME=CMD`: CMD (split like a shell; `{socket}`, `{root}` and `{hosts_dir}` are replaced) is a
  snapshotter serving on a socket, used as proxy plugin NAME; it pulls the eStargz image with rpull.
  `--peer auto` adds the peer (stargz-snapshotter's containerd-stargz-grpc at ../shared/peer/run-peer
  from the repository) as mode `stargz` when it is there, and prints a note and skips it when not.

`--converters lazysnap,ctr-remote`: lazy modes (not the optimized one) run once per converter of their
eStargz image, `lazysnap convert` (mode NAME) or `ctr-remote image convert --estargz --oci` in a scratch
containerd (mode NAME+ctr-remote); conversions are cached in the registry by tag.

Every run's results are written (JSON and Markdown) as soon as it ends, so an interrupt, a later failure
or a failed network teardown loses nothing measured; the per-start snapshotter CPU seconds are user+sys
of its process (/proc/PID/stat) from the pull's start until the ready line.

Outputs: `<out>.json` (every run and the summary), `<out>.md` (a table: medians with min-max), and
`<out>.png` (time to ready per image and mode, split into pull and run; needs matplotlib, the `bench`
extra).

    python -m bench.harness [--images a,b] [--rate 100mbit|unlimited|...] [--delay-ms N] [--repeat 3]
                            [--modes overlayfs,lazysnap,lazysnap-optimized,other:NAME=CMD]
                            [--converters lazysnap,ctr-remote] [--peer auto|none|RUN_PEER]
                            [--cache-dir DIR] [--registry-dir DIR] [--out bench/results/startup]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench import realistic
from bench.network import DEFAULT_RATE, NetworkError, ShapedRegistry, Traffic, parse_rate
from fuse.registry import NotFound, Reference
from snapshotter.convert.converter import convert_image
from snapshotter.convert.index import index_image
from snapshotter.convert.writer import DEFAULT_CHUNK_SIZE
from tests.harness.containerd import Containerd
from tests.harness.procs import Service, kill_pids, pids_with_cmdline, unmount_all

DEFAULT_OUT = Path("bench/results/startup")
DEFAULT_IMAGES = ("python-numpy",)
BUILTIN = "overlayfs"
LAZY_MODES = ("lazysnap", "lazysnap-optimized", "lazysnap-index")
REPO_PREFIX = "bench"
SAMPLE_INTERVAL = 0.1
PULL_TIMEOUT = 3600.0
READY_TIMEOUT = 600.0
EXIT_TIMEOUT = 60.0
TEMP_PREFIX = "lzs-bench-"

Log = Callable[[str], None]


class BenchError(RuntimeError):
    """A run failed; the message says which image, mode and step."""


class NotLazyError(BenchError):
    """A lazy mode's pull was a full pull: the snapshotter did not claim the layers."""


# --- modes ----------------------------------------------------------------------------------------


CONVERTERS = ("lazysnap", "ctr-remote")  # who makes the accelerated (eStargz) image lazy modes pull
DEFAULT_CONVERTER = "lazysnap"
PEER_NAME = "stargz"
# the peer snapshotter (reference/peer: containerd-stargz-grpc), relative to the repository's root
PEER_RUN = Path("../shared/peer/run-peer")
PEER_ARGS = "{socket} {root} {hosts_dir}"


@dataclass(frozen=True)
class Mode:
    name: str  # what tables show: overlayfs, lazysnap, lazysnap-optimized, or other's NAME (+converter)
    kind: str  # "builtin", "lazysnap", "other"
    optimized: bool = False
    indexed: bool = False  # pulls the plain image, lazily through the SOCI index beside it
    command: str = ""  # other: the command that starts the snapshotter
    converter: str = DEFAULT_CONVERTER  # lazy modes: who converted the image they pull

    @property
    def plugin(self) -> str | None:
        """The proxy plugin name containerd knows the snapshotter by (None: built-in)."""
        if self.kind == "builtin":
            return None
        return "lazysnap" if self.kind == "lazysnap" else self.name.partition("+")[0]  # without +CONVERTER

    @property
    def lazy(self) -> bool:
        return self.kind != "builtin"

    @property
    def variant(self) -> str:
        """Which image it pulls: "plain", "indexed" (the plain one, with its SOCI index), "accelerated"
        or "optimized"."""
        if self.kind == "builtin":
            return "plain"
        if self.indexed:
            return "indexed"
        if self.optimized:
            return "optimized"
        return "accelerated" if self.converter == DEFAULT_CONVERTER else f"accelerated-{self.converter}"


_MODE_START = re.compile(
    r",(?=\s*(?:other:|(?:overlayfs|lazysnap-optimized|lazysnap-index|lazysnap)\s*(?:,|$)))"
)


def parse_modes(text: str) -> list[Mode]:
    """`overlayfs,lazysnap,lazysnap-optimized,other:NAME=CMD`; a CMD may hold commas, except right before
    another mode's name."""
    modes: list[Mode] = []
    for raw in _MODE_START.split(text):
        item = raw.strip()
        if not item:
            continue
        if item == BUILTIN:
            mode = Mode(BUILTIN, "builtin")
        elif item == "lazysnap":
            mode = Mode("lazysnap", "lazysnap")
        elif item == "lazysnap-optimized":
            mode = Mode("lazysnap-optimized", "lazysnap", optimized=True)
        elif item == "lazysnap-index":
            mode = Mode("lazysnap-index", "lazysnap", indexed=True)
        elif item.startswith("other:"):
            name, eq, command = item[len("other:") :].partition("=")
            name = name.strip()
            if not eq or not command.strip() or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"mode {item!r}: write other:NAME=COMMAND (NAME: letters, digits, . _ -)")
            if name in (BUILTIN, *LAZY_MODES):
                raise ValueError(f"mode {item!r}: {name!r} is a built-in mode name")
            mode = Mode(name, "other", command=command.strip())
        else:
            raise ValueError(
                f"unknown mode {item!r}: overlayfs, lazysnap, lazysnap-optimized or other:NAME=COMMAND"
            )
        if any(m.name == mode.name for m in modes):
            raise ValueError(f"mode {mode.name!r} given twice")
        modes.append(mode)
    if not modes:
        raise ValueError("no modes given")
    return modes


def parse_converters(text: str) -> list[str]:
    """`lazysnap,ctr-remote`: who converts the images the lazy modes pull (`lazysnap convert`, or
    `ctr-remote image convert --estargz --oci`)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item not in CONVERTERS:
            raise ValueError(f"unknown converter {item!r}: one of {', '.join(CONVERTERS)}")
        if item in out:
            raise ValueError(f"converter {item!r} given twice")
        out.append(item)
    if not out:
        raise ValueError("no converters given")
    return out


def with_converters(modes: Sequence[Mode], converters: Sequence[str]) -> list[Mode]:
    """Each lazy mode once per converter; a mode pulling another converter's image is named
    `MODE+CONVERTER`. The optimized mode pulls lazysnap's prioritized conversion only, overlayfs the
    plain image."""
    out = []
    for mode in modes:
        if mode.kind == "builtin" or mode.optimized or mode.indexed:
            out.append(mode)
            continue
        for converter in converters:
            name = mode.name if converter == DEFAULT_CONVERTER else f"{mode.name}+{converter}"
            out.append(dataclasses.replace(mode, name=name, converter=converter))
    return out


def peer_mode(spec: str, repo_root: Path) -> tuple[Mode | None, str]:
    """The peer snapshotter as an `other:` mode, and a note for the log. `spec`: "none"; "auto" (the
    peer at <repo>/../shared/peer/run-peer when it is there, else none, with a note saying so); or the
    path of a run-peer script, which must exist."""
    if spec == "none":
        return None, ""
    path = (repo_root / PEER_RUN) if spec == "auto" else Path(spec)
    if not path.is_file():
        if spec == "auto":
            return None, f"note: no peer snapshotter at {path.resolve()}: the {PEER_NAME} mode is skipped"
        raise ValueError(f"--peer {spec}: no such file (give the peer's run-peer script, auto or none)")
    command = f"{shlex.quote(str(path.resolve()))} {PEER_ARGS}"
    return Mode(PEER_NAME, "other", command=command), f"peer snapshotter: {path.resolve()}"


def _repo_root() -> Path:
    """The repository this module is in (where `make` runs)."""
    return Path(__file__).resolve().parents[1]


def schedule(images: int, repeat: int, modes: Sequence[Mode]) -> list[tuple[int, int, Mode]]:
    """The order of the runs: image by image, and within an image repeat by repeat, each repeat
    running every mode, so drift (page cache, thermal, other load) hits all modes alike; the medians
    are over the `repeat` runs of each mode."""
    return [(i, r, m) for i in range(images) for r in range(repeat) for m in modes]


# --- statistics and reports (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    n: int

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        if self.n == 0:
            return "-"
        med, lo, hi = self.median / scale, self.min / scale, self.max / scale
        if self.n == 1 or lo == hi:
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def spread(values: Sequence[float | None]) -> Spread:
    """Median, min and max of the values that are not None (n = how many)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return Spread(float("nan"), float("nan"), float("nan"), 0)
    return Spread(statistics.median(xs), min(xs), max(xs), len(xs))


@dataclass
class RunResult:
    image: str
    mode: str
    repeat: int
    ok: bool = False
    error: str = ""
    skipped: bool = False  # the mode could not run (e.g. the snapshotter does not claim layers)
    pull_s: float | None = None
    run_s: float | None = None
    total_s: float | None = None
    pull_bytes: int | None = None  # registry response bytes during the pull
    ready_bytes: int | None = None  # ... from the start of the pull until the ready line
    wire_bytes: int | None = None  # bytes on the veth until ready
    requests: int | None = None
    range_requests: int | None = None
    containerd_cpu_s: float | None = None
    containerd_peak_rss: int | None = None
    snapshotter_cpu_s: float | None = None
    snapshotter_peak_rss: int | None = None
    ready_line: str = ""


METRICS = (
    "pull_s",
    "run_s",
    "total_s",
    "ready_bytes",
    "wire_bytes",
    "containerd_cpu_s",
    "snapshotter_cpu_s",
    "snapshotter_peak_rss",
)


def summarize(runs: Sequence[RunResult], modes: Sequence[str], images: Sequence[str]) -> list[dict]:
    """One row per (image, mode): every metric's Spread over the successful runs, the errors, and the
    speedup of the median time to ready against overlayfs in the same session."""
    rows = []
    for image in images:
        baseline = spread([r.total_s for r in runs if r.image == image and r.mode == BUILTIN and r.ok])
        for mode in modes:
            mine = [r for r in runs if r.image == image and r.mode == mode]
            if not mine:
                continue
            ok = [r for r in mine if r.ok]
            row: dict = {"image": image, "mode": mode, "runs": len(mine), "ok": len(ok)}
            for metric in METRICS:
                row[metric] = dataclasses.asdict(spread([getattr(r, metric) for r in ok]))
            total = row["total_s"]["median"]
            row["speedup"] = (
                baseline.median / total if ok and baseline.n and mode != BUILTIN and total > 0 else None
            )
            row["errors"] = sorted({r.error for r in mine if r.error})
            row["skipped"] = bool(mine) and all(r.skipped for r in mine)
            rows.append(row)
    return rows


def _sp(row: dict, metric: str) -> Spread:
    return Spread(**row[metric])


def markdown_table(rows: Sequence[dict], header: str = "") -> str:
    """The summary as Markdown: medians with (min-max) over the repeats."""
    lines = [header, ""] if header else []
    lines += [
        "| image | mode | pull s | run s (to ready) | time to ready s | vs overlayfs | registry MB to ready "
        "| snapshotter CPU s | snapshotter peak RSS MiB | containerd CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row["ok"]:
            why = "; ".join(row["errors"]) or "no successful run"
            kind = "skipped" if row["skipped"] else "failed"
            lines.append(f"| {row['image']} | {row['mode']} | {kind}: {_md_escape(why)} |" + " |" * 7)
            continue
        speedup = (
            f"{row['speedup']:.2f}x" if row.get("speedup") else ("1.00x" if row["mode"] == BUILTIN else "-")
        )
        lines.append(
            f"| {row['image']} | {row['mode']} | {_sp(row, 'pull_s').fmt(2)} | {_sp(row, 'run_s').fmt(2)} "
            f"| {_sp(row, 'total_s').fmt(2)} | {speedup} | {_sp(row, 'ready_bytes').fmt(1, 1e6)} "
            f"| {_sp(row, 'snapshotter_cpu_s').fmt(2)} | {_sp(row, 'snapshotter_peak_rss').fmt(0, 1 << 20)} "
            f"| {_sp(row, 'containerd_cpu_s').fmt(2)} |"
        )
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


MODE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")


def render_chart(rows: Sequence[dict], path: Path, title: str = "") -> bool:
    """A PNG of time to ready per image and mode: each bar is the median pull time with the median run
    time stacked on it (hatched), labelled with the median total; the whisker spans the total's min-max.
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    images = list(dict.fromkeys(r["image"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    width = 0.8 / max(len(modes), 1)
    highest = 0.0
    bars = len(images) * max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.5, 3.5 + 0.45 * bars)), 5.0))
    for j, mode in enumerate(modes):
        color = MODE_COLORS[j % len(MODE_COLORS)]
        for i, image in enumerate(images):
            row = next((r for r in rows if r["image"] == image and r["mode"] == mode), None)
            x = i - 0.4 + width * (j + 0.5)
            if row is None or not row["ok"]:
                if row is not None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            pull, run, total = _sp(row, "pull_s"), _sp(row, "run_s"), _sp(row, "total_s")
            ax.bar(x, pull.median, width, color=color, edgecolor="black", linewidth=0.5)
            run_style = {"color": color, "alpha": 0.55, "hatch": "//", "edgecolor": "black", "linewidth": 0.5}
            ax.bar(x, run.median, width, bottom=pull.median, **run_style)
            top = pull.median + run.median
            label_at = top
            if total.n > 1:
                whisker = [[max(top - total.min, 0)], [max(total.max - top, 0)]]
                ax.errorbar(x, top, yerr=whisker, color="black", capsize=2, linewidth=0.8)
                label_at = max(top, total.max)
            ax.text(x, label_at, f"{total.median:.1f} s", ha="center", va="bottom", fontsize=7)
            highest = max(highest, label_at)
    ax.set_xticks(range(len(images)), images)
    ax.set_ylabel("seconds until the ready line")
    ax.set_title(
        title or "time to ready: pull (solid) + run (hatched), median, whiskers min-max", fontsize=10
    )
    handles = [Patch(color=MODE_COLORS[j % len(MODE_COLORS)], label=m) for j, m in enumerate(modes)]
    handles += [
        Patch(facecolor="white", edgecolor="black", label="pull"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="run until ready"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_ylim(0, max(highest, 0.1) * 1.12)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- processes: CPU and memory from /proc ---------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_stat_cpu(text: str, ticks: int = CLOCK_TICKS) -> float:
    """utime + stime in seconds from the text of /proc/<pid>/stat (the command may hold spaces)."""
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks  # fields 14 and 15 of the whole line


def parse_status_kib(text: str, key: str) -> int | None:
    """A `Key:  N kB` line of /proc/<pid>/status, in bytes."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


@dataclass
class _Usage:
    cpu0: float | None = None
    cpu: float | None = None
    peak_rss: int | None = None


class ProcSampler:
    """Samples CPU time and RSS of some processes every SAMPLE_INTERVAL in a thread; CPU is counted from
    start() (the last sample before a process exits stays), peak RSS is the larger of the sampled RSS
    and the kernel's high-water mark (VmHWM)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.usage = {name: _Usage() for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            u = self.usage[name]
            try:
                cpu = parse_stat_cpu(Path(f"/proc/{pid}/stat").read_text())
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, ValueError, IndexError):
                continue
            if u.cpu0 is None:
                u.cpu0 = cpu
            u.cpu = cpu
            rss = max(parse_status_kib(status, "VmRSS") or 0, parse_status_kib(status, "VmHWM") or 0)
            u.peak_rss = max(u.peak_rss or 0, rss)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._sample()

    def start(self) -> ProcSampler:
        self._sample()
        self._thread.start()
        return self

    def read(self) -> dict[str, tuple[float | None, int | None]]:
        """{name: (CPU seconds since start, peak RSS bytes)}, sampled now."""
        self._sample()
        return {
            n: ((u.cpu - u.cpu0) if u.cpu is not None and u.cpu0 is not None else None, u.peak_rss)
            for n, u in self.usage.items()
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- one node: containerd (+ snapshotter) in a temp dir -------------------------------------------


def lazysnap_command() -> list[str]:
    """The `lazysnap` console script of this interpreter's venv, else the module."""
    script = Path(sys.executable).with_name("lazysnap")
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapshotter.cli"]


def write_hosts_dir(directory: Path, hosts: Sequence[str]) -> Path:
    """containerd's certs.d layout marking `hosts` as plain HTTP (the lazy snapshotter's registry config)."""
    for host in hosts:
        d = directory / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(f'server = "http://{host}"\n')
    return directory


class Node:
    """A clean node for one run: containerd with its own root, and the mode's snapshotter started first.
    `close()` stops everything by PID, unmounts what is left and removes the directory."""

    def __init__(self, mode: Mode, registry_hosts: Sequence[str], log: Log, parent: Path | None = None):
        self.mode = mode
        self.dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))
        self.log = log
        self.snapshotter: Service | None = None
        self.socket = self.dir / "snap.sock"
        self.snap_root = self.dir / "snap"
        self.hosts_dir = write_hosts_dir(self.dir / "certs.d", registry_hosts)
        self.containerd = Containerd(
            self.dir / "containerd", snapshotter_socket=self.socket, plugin_name=mode.plugin or "lazysnap"
        )

    def start(self) -> Node:
        if self.mode.kind == "lazysnap":
            config = self.dir / "lazysnap.toml"
            config.write_text(
                f'root = "{self.snap_root}"\naddress = "{self.socket}"\nlog_level = "info"\n'
                f'hosts_dir = "{self.hosts_dir}"\n'
            )
            argv = [*lazysnap_command(), "serve", "--config", str(config)]
        elif self.mode.kind == "other":
            text = self.mode.command.format(socket=self.socket, root=self.snap_root, hosts_dir=self.hosts_dir)
            argv = shlex.split(text)
        else:
            argv = []
        if argv:
            self.snap_root.mkdir(parents=True, exist_ok=True)
            self.snapshotter = Service(self.mode.name, argv, self.dir / "snapshotter.log")
            self.snapshotter.start()
            self.snapshotter.wait_ready(self._socket_answers, timeout=30, what=f"serving on {self.socket}")
        self.containerd.start()
        return self

    def _socket_answers(self) -> bool:
        if not self.socket.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
        return True

    def pids(self) -> dict[str, int]:
        out = {"containerd": self.containerd.service.pid}
        if self.snapshotter is not None:
            out["snapshotter"] = self.snapshotter.pid
        return out

    def fallback_reasons(self) -> list[str]:
        """lazysnap's "full pull for ..." log messages: why it did not claim a layer."""
        if self.snapshotter is None or not self.snapshotter.log_path.exists():
            return []
        text = self.snapshotter.log_path.read_text(errors="replace")
        return [m[1] for m in re.finditer(r'msg="(full pull for [^"]*)"', text)]

    def snapshotter_log_tail(self) -> str:
        return self.snapshotter.log_tail(15) if self.snapshotter else ""

    def close(self) -> None:
        try:
            self.containerd.stop()
        finally:
            try:
                if self.snapshotter is not None:
                    self.snapshotter.stop(grace=20)
            finally:
                kill_pids(pids_with_cmdline(str(self.dir)))  # anything else naming the dir (shims)
                unmount_all(self.dir)
                shutil.rmtree(self.dir, ignore_errors=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _ctr_argv(ctd: Containerd, *args: str, tool: str = "ctr") -> list[str]:
    return [tool, "-a", str(ctd.address), "-n", ctd.namespace, *args]


def run_command(
    argv: Sequence[str], timeout: float, what: str, ticker: Callable[[float], None] | None = None
) -> str:
    """Run to completion (output captured), calling ticker(elapsed) about every second; raise BenchError
    with the output when it fails or times out."""
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        start = time.monotonic()
        # a pidfd wakes us when it exits (Popen.wait(timeout) polls in sleeps of up to 50 ms: pull times
        # came out in 50 ms steps)
        exited = select.poll()
        exited.register(pidfd := os.pidfd_open(p.pid), select.POLLIN)
        try:
            while not exited.poll(1000):
                elapsed = time.monotonic() - start
                if elapsed > timeout:
                    raise BenchError(f"{what}: no result after {timeout:.0f} s") from None
                if ticker:
                    ticker(elapsed)
            p.wait()
        finally:
            os.close(pidfd)
            if p.poll() is None:
                p.kill()
                p.wait()
        out.seek(0)
        text = out.read().decode(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"{what}: `{' '.join(argv)}` exited {p.returncode}:\n{text[-2000:]}")
    return text


@dataclass
class Ready:
    seconds: float  # from starting `ctr run` to the ready line
    line: str
    output: str


def run_until_ready(
    ctd: Containerd,
    ref: str,
    command: Sequence[str],
    ready: str,
    *,
    snapshotter: str | None = None,
    rootfs: realistic.BuiltImage | None = None,
    on_ready: Callable[[], None] | None = None,
    timeout: float = READY_TIMEOUT,
) -> Ready:
    """`ctr run --rm` the workload, reading its output as it comes; the time is taken when a line starts
    with `ready`. Then the container is given EXIT_TIMEOUT to exit with 0 (or it is killed: an error).
    With `rootfs`, `ref` is a directory run with `ctr run --rootfs` and that image's env and working dir.
    `on_ready` is called as soon as the ready line arrived (to take measurements at that moment)."""
    name = f"bench-{os.urandom(4).hex()}"
    args = ["run", "--rm", "--runc-root", str(ctd.workdir / "runc"), "--fifo-dir", str(ctd.workdir / "fifo")]
    if snapshotter:
        args += ["--snapshotter", snapshotter]
    if rootfs is not None:
        args += ["--rootfs", "--cwd", "/app", *(x for env in rootfs.env for x in ("--env", env))]
    argv = _ctr_argv(ctd, *args, ref, name, *command)
    lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
    start = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def pump() -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            lines.put((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
        lines.put(None)

    threading.Thread(target=pump, name="ctr-run-output", daemon=True).start()
    output: list[str] = []
    found: tuple[float, str] | None = None
    try:
        deadline = start + timeout
        while found is None:
            try:
                item = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise BenchError(
                    f"no {ready!r} line within {timeout:.0f} s:\n" + "\n".join(output[-20:])
                ) from None
            if item is None:
                p.wait(EXIT_TIMEOUT)
                raise BenchError(
                    f"the container exited ({p.returncode}) without a {ready!r} line:\n"
                    + "\n".join(output[-20:])
                )
            output.append(item[1])
            if item[1].startswith(ready):
                found = item
                if on_ready:
                    on_ready()
        try:
            p.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"the workload printed {ready!r} but did not exit within {EXIT_TIMEOUT:.0f} s"
            ) from None
        if p.returncode != 0:
            raise BenchError(
                f"the workload exited {p.returncode} after {ready!r}:\n" + "\n".join(output[-20:])
            )
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
            ctd.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
    return Ready(found[0] - start, found[1], "\n".join(output))


def content_digests(ctd: Containerd) -> set[str]:
    return set(ctd.ctr("content", "ls", "-q").stdout.split())


# --- preparing images: push, convert, record ------------------------------------------------------


@dataclass
class Prepared:
    built: realistic.BuiltImage
    repo: str
    tags: dict[str, str] = field(default_factory=dict)  # variant -> tag
    layers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # variant -> [(digest, size)]
    errors: dict[str, str] = field(default_factory=dict)  # variant -> why it is missing
    recorded: list[str] = field(default_factory=list)

    def ref(self, host: str, variant: str) -> str:
        return f"{host}/{self.repo}:{self.tags[variant]}"


async def _manifest_layers(host: str, repo: str, tag: str) -> list[tuple[str, int]] | None:
    async with realistic.registry_client() as client:
        try:
            resolved = await client.resolve(Reference.parse(f"{host}/{repo}:{tag}"))
        except NotFound:
            return None
        return [(layer["digest"], layer["size"]) for layer in resolved.layers]


async def _convert(host: str, src: str, dst: str, prioritize: list[str] | None, tmpdir: Path) -> None:
    async with realistic.registry_client() as client:
        await convert_image(
            client, f"{host}/{src}", f"{host}/{dst}", prioritize=prioritize or None, tmpdir=tmpdir
        )


INDEX_SPAN = 1 << 20  # checkpoints every 1 MiB of output: a miss fetches and inflates about that much


async def _index(host: str, image: str) -> None:
    """`lazysnap index` of the plain image, every layer (the eStargz modes make every layer lazy too)."""
    async with realistic.registry_client() as client:
        await index_image(client, f"{host}/{image}", min_layer_size=0, span_out=INDEX_SPAN)


CHUNKS = f"c{DEFAULT_CHUNK_SIZE >> 10}k"  # in the tags of converted images: another chunk size, another image


def convert_cached(
    host: str, repo: str, src_tag: str, dst_tag: str, prioritize: list[str] | None, tmp: Path, log: Log
) -> list[tuple[str, int]]:
    """Convert repo:src_tag to eStargz as repo:dst_tag unless the registry already has it; its layers."""
    found = trio.run(_manifest_layers, host, repo, dst_tag)
    if found is not None:
        return found
    started = time.monotonic()
    trio.run(_convert, host, f"{repo}:{src_tag}", f"{repo}:{dst_tag}", prioritize, tmp)
    layers = trio.run(_manifest_layers, host, repo, dst_tag)
    assert layers is not None
    size = sum(s for _, s in layers)
    log(f"  converted {repo}:{dst_tag} ({size / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
    return layers


def ctr_remote_convert_cached(
    host: str, repo: str, src_tag: str, dst_tag: str, parent: Path, log: Log
) -> list[tuple[str, int]]:
    """Convert repo:src_tag to eStargz with stargz-snapshotter's converter (`ctr-remote image convert
    --estargz --oci`, in a scratch containerd that pulls the source) and push it as repo:dst_tag,
    unless the registry already has it; its layers."""
    found = trio.run(_manifest_layers, host, repo, dst_tag)
    if found is not None:
        return found
    started = time.monotonic()
    node = Node(Mode(BUILTIN, "builtin"), [host], log, parent)
    src, dst = f"{host}/{repo}:{src_tag}", f"{host}/{repo}:{dst_tag}"
    try:
        node.start()
        ctd = node.containerd
        run_command(_ctr_argv(ctd, "image", "pull", "--plain-http", src), PULL_TIMEOUT, f"pulling {src}")
        convert = ("image", "convert", "--estargz", "--oci", src, dst)
        run_command(_ctr_argv(ctd, *convert, tool="ctr-remote"), PULL_TIMEOUT, f"ctr-remote converting {src}")
        push = ("image", "push", "--plain-http", dst)
        run_command(_ctr_argv(ctd, *push, tool="ctr-remote"), PULL_TIMEOUT, f"pushing {dst}")
    finally:
        node.close()
    layers = trio.run(_manifest_layers, host, repo, dst_tag)
    if layers is None:
        raise BenchError(f"ctr-remote pushed {dst}, but the registry does not have it")
    size = sum(s for _, s in layers)
    took = time.monotonic() - started
    log(f"  converted {repo}:{dst_tag} with ctr-remote ({size / 1e6:.0f} MB, {took:.0f} s)")
    return layers


def record_accessed(built: realistic.BuiltImage, log: Log, parent: Path | None = None) -> list[str]:
    """The files the workload reads, in the order of their first read.

    overlayfs opens lower files with O_NOATIME, so access times cannot be read through an ordinary
    container; instead the image's layers are extracted into a plain directory (every file's atime =
    its mtime, ctime newer: the first read moves the atime, even under relatime), the workload runs once
    on it with `ctr run --rootfs`, and the regular files whose atime moved are listed by atime.
    """
    node = Node(Mode(BUILTIN, "builtin"), [], log, parent)
    rootfs = node.dir / "rootfs"
    try:
        realistic.extract_layers([layer.path for layer in built.layers], rootfs)
        before = _atimes(rootfs)
        node.start()
        run_until_ready(node.containerd, str(rootfs), built.command, built.ready, rootfs=built)
        after = _atimes(rootfs)
    finally:
        node.close()
    touched = sorted((t, path) for path, t in after.items() if path in before and t > before[path])
    return [path for _, path in touched]


def _atimes(root: Path) -> dict[str, int]:
    """{relative path: atime ns} of the regular files below root (lstat does not move atimes)."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(full, root)] = st.st_atime_ns
    return out


def prepare(
    built: realistic.BuiltImage,
    net: ShapedRegistry,
    modes: Sequence[Mode],
    cache_dir: Path,
    tmp: Path,
    log: Log,
) -> Prepared:
    """Push the image; convert it (and record + convert for the optimized variant) when a mode needs it.
    Runs while the link is unshaped; results are cached in the registry (by tag) and cache_dir."""
    host = net.push_host
    prep = Prepared(built, f"{REPO_PREFIX}/{built.name}")
    started = time.monotonic()
    realistic.push(built, host, prep.repo, built.tag)
    prep.tags["plain"] = built.tag
    prep.layers["plain"] = [(x.digest, x.size) for x in built.layers]
    log(f"  pushed {prep.repo}:{built.tag} ({built.size / 1e6:.0f} MB, {time.monotonic() - started:.1f} s)")
    variants = {m.variant for m in modes}
    if "accelerated" in variants:
        tag = f"{built.tag}_accelerated-{CHUNKS}"
        try:
            prep.layers["accelerated"] = convert_cached(host, prep.repo, built.tag, tag, None, tmp, log)
            prep.tags["accelerated"] = tag
        except Exception as e:  # the mode reports it; other modes go on
            prep.errors["accelerated"] = f"converting {prep.repo}:{built.tag}: {e}"
    if "indexed" in variants:
        try:
            started = time.monotonic()
            trio.run(_index, host, f"{prep.repo}:{built.tag}")
            prep.tags["indexed"] = built.tag
            prep.layers["indexed"] = prep.layers["plain"]
            log(f"  indexed {prep.repo}:{built.tag} ({time.monotonic() - started:.1f} s)")
        except Exception as e:
            prep.errors["indexed"] = f"indexing {prep.repo}:{built.tag}: {e}"
    if "accelerated-ctr-remote" in variants:
        tag = f"{built.tag}_ctr-remote-estargz"
        try:
            prep.layers["accelerated-ctr-remote"] = ctr_remote_convert_cached(
                host, prep.repo, built.tag, tag, tmp, log
            )
            prep.tags["accelerated-ctr-remote"] = tag
        except Exception as e:
            prep.errors["accelerated-ctr-remote"] = f"converting {prep.repo}:{built.tag} with ctr-remote: {e}"
    if "optimized" in variants:
        try:
            record = cache_dir / "recorded" / f"{built.name}-{built.tag}.txt"
            if record.exists():
                prep.recorded = record.read_text().splitlines()
            else:
                t = time.monotonic()
                prep.recorded = record_accessed(built, log, tmp)
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text("".join(p + "\n" for p in prep.recorded))
                took = time.monotonic() - t
                log(f"  recorded {len(prep.recorded)} files read by the workload ({took:.0f} s)")
            digest = hashlib.sha256("\n".join(prep.recorded).encode()).hexdigest()[:8]
            tag = f"{built.tag}_optimized-{digest}-{CHUNKS}"
            prep.layers["optimized"] = convert_cached(
                host, prep.repo, built.tag, tag, prep.recorded, tmp, log
            )
            prep.tags["optimized"] = tag
        except Exception as e:
            prep.errors["optimized"] = f"recording and converting {prep.repo}:{built.tag}: {e}"
    return prep


# --- one run --------------------------------------------------------------------------------------


def _ticker(log: Log, what: str, net: ShapedRegistry, mark) -> Callable[[float], None]:
    interactive = sys.stdout.isatty()
    last = [0.0]

    def tick(elapsed: float) -> None:
        if interactive or elapsed - last[0] >= 15:
            last[0] = elapsed
            mb = net.traffic(mark).wire_bytes / 1e6
            text = f"    {what}: {elapsed:.0f} s, {mb:.0f} MB received"
            if interactive:
                print("\r" + text, end="", flush=True)
            else:
                log(text)

    return tick


def run_once(
    prep: Prepared,
    mode: Mode,
    repeat: int,
    net: ShapedRegistry,
    *,
    drop: bool = True,
    log: Log = print,
    parent: Path | None = None,
) -> RunResult:
    """One clean run of one image in one mode (errors are recorded in the result, not raised)."""
    result = RunResult(prep.built.name, mode.name, repeat)
    if mode.variant not in prep.tags:
        result.error = prep.errors.get(mode.variant, f"no {mode.variant} image")
        return result
    ref = prep.ref(net.host, mode.variant)
    if drop:
        drop_caches()
    node = Node(mode, [net.host, net.push_host], log, parent)
    sampler: ProcSampler | None = None
    try:
        node.start()
        ctd = node.containerd
        sampler = ProcSampler(node.pids()).start()
        mark = net.mark()
        tick = _ticker(log, f"{prep.built.name} {mode.name} pull", net, mark)
        started = time.monotonic()
        if mode.lazy:
            rpull = ("image", "rpull", "--plain-http", "--snapshotter", mode.plugin or "", ref)
            argv = _ctr_argv(ctd, *rpull, tool="ctr-remote")
        else:
            argv = _ctr_argv(ctd, "image", "pull", "--plain-http", ref)
        run_command(argv, PULL_TIMEOUT, f"pulling {ref} ({mode.name})", tick)
        result.pull_s = time.monotonic() - started
        if sys.stdout.isatty():
            print("\r", end="")
        pulled = net.traffic(mark)
        result.pull_bytes = pulled.registry_bytes
        if mode.lazy:
            _check_lazy(mode, ref, prep.layers[mode.variant], content_digests(ctd), pulled)
        at_ready: dict = {}

        def measure(sampler: ProcSampler = sampler) -> None:
            at_ready["traffic"] = net.traffic(mark)
            at_ready["usage"] = sampler.read()

        ready = run_until_ready(
            ctd, ref, prep.built.command, prep.built.ready, snapshotter=mode.plugin, on_ready=measure
        )
        result.run_s = ready.seconds
        result.total_s = result.pull_s + result.run_s
        result.ready_line = ready.line
        to_ready: Traffic = at_ready["traffic"]
        result.ready_bytes = to_ready.registry_bytes
        result.wire_bytes = to_ready.wire_bytes
        result.requests = to_ready.requests
        result.range_requests = to_ready.range_requests
        usage = at_ready["usage"]
        result.containerd_cpu_s, result.containerd_peak_rss = usage["containerd"]
        # the built-in snapshotter works inside containerd
        snapshotter = usage.get("snapshotter", usage["containerd"])
        result.snapshotter_cpu_s, result.snapshotter_peak_rss = snapshotter
        result.ok = True
    except NotLazyError as e:
        why = node.fallback_reasons()
        result.error, result.skipped = str(e) + (f" (the snapshotter said: {why[0]})" if why else ""), True
    except Exception as e:
        tail = node.snapshotter_log_tail()
        result.error = f"{type(e).__name__}: {e}" + (f"\nsnapshotter log:\n{tail}" if tail else "")
    finally:
        if sampler is not None:
            sampler.stop()
        node.close()
    return result


def _check_lazy(
    mode: Mode, ref: str, layers: list[tuple[str, int]], content: set[str], pulled: Traffic
) -> None:
    total = sum(size for _, size in layers)
    in_store = [digest for digest, _ in layers if digest in content]
    if in_store:
        if mode.kind == "lazysnap":
            who = "lazysnap serve does not claim layers yet"
        else:
            who = f"the {mode.name} snapshotter did not claim the layers"
        raise NotLazyError(
            f"{who}: `ctr-remote image rpull` of {ref} was a full pull ({pulled.blob_bytes / 1e6:.1f} of "
            f"{total / 1e6:.1f} MB of layers sent by the registry, {len(in_store)} of {len(layers)} layers "
            "in containerd's content store), so its time to ready would not measure lazy loading"
        )


# --- the whole benchmark --------------------------------------------------------------------------


@dataclass
class Settings:
    images: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGES))
    modes: list[Mode] = field(default_factory=lambda: parse_modes("overlayfs,lazysnap,lazysnap-optimized"))
    rate: str | None = DEFAULT_RATE
    delay_ms: float = 0.0
    repeat: int = 3
    cache_dir: Path = realistic.DEFAULT_CACHE
    registry_dir: Path | None = None  # default: <cache_dir>/registry
    out: Path | None = DEFAULT_OUT  # <out>.json/.md/.png; None: no files
    drop_caches: bool = True
    temp_dir: Path | None = None  # where run directories are made (default: the system's temp dir)


@dataclass
class Results:
    settings: dict
    machine: dict
    images: dict
    runs: list[RunResult]
    summary: list[dict]
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "machine": self.machine,
            "images": self.images,
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "summary": self.summary,
        }

    def header(self) -> str:
        s = self.settings
        delay = f", +{s['delay_ms']:g} ms round trip" if s["delay_ms"] else ""
        return (
            f"Time to ready, {s['repeat']} repeat(s), link {s['rate'] or 'unlimited'}{delay}; "
            f"{self.machine['cores']} cores, kernel {self.machine['kernel']}, {self.machine['date']}. "
            "Medians (min-max); registry MB = bytes the registry sent from the pull's start until the ready "
            "line; snapshotter CPU s = user+sys seconds of the snapshotter process (/proc/PID/stat) from the "
            "pull's start until the ready line, per start; overlayfs's snapshotter CPU/RSS are containerd's."
        )


def machine_info() -> dict:
    return {
        "cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run_benchmark(settings: Settings, log: Log = print) -> Results:
    """Build, push, prepare and run everything. Unless settings.out is None the outputs are written
    after every run (a later failure, an interrupt or a failed teardown keeps what was measured) and
    once more at the end."""
    mode_names = [m.name for m in settings.modes]
    log(f"images: {', '.join(settings.images)}; modes: {', '.join(mode_names)}; repeat {settings.repeat}")
    built = [realistic.build(name, settings.cache_dir, log=log) for name in settings.images]
    results = Results(
        settings={
            "images": settings.images,
            "modes": mode_names,
            "converters": {m.name: m.converter for m in settings.modes if m.lazy and not m.optimized},
            "rate": settings.rate,
            "delay_ms": settings.delay_ms,
            "repeat": settings.repeat,
        },
        machine=machine_info(),
        images={b.name: _image_info(b) for b in built},
        runs=[],
        summary=[],
    )

    def save() -> None:
        results.summary = summarize(results.runs, mode_names, settings.images)
        if settings.out is not None:
            results.files = write_outputs(results, settings.out)

    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=settings.temp_dir))
    registry_dir = settings.registry_dir or settings.cache_dir / "registry"
    net = ShapedRegistry(tmp / "net", registry_dir, rate=None, delay_ms=settings.delay_ms, log=log)
    try:
        net.start()
        log(f"network: {net.describe()} (unshaped while preparing)")
        prepared = []
        for image in built:
            log(f"preparing {image.name}")
            prepared.append(prepare(image, net, settings.modes, settings.cache_dir, tmp, log))
        net.shape(settings.rate)
        log(f"link shaped: {net.qdisc() or 'no qdisc (unlimited)'}")
        runs = schedule(len(prepared), settings.repeat, settings.modes)
        for n, (i, repeat, mode) in enumerate(runs, 1):
            r = run_once(
                prepared[i], mode, repeat, net, drop=settings.drop_caches, log=log, parent=settings.temp_dir
            )
            results.runs.append(r)
            save()  # before anything else can fail
            log(f"[{n}/{len(runs)}] {_progress_line(r)}")
    finally:
        try:
            net.close()
        except NetworkError as e:  # what was measured is written already, and is kept
            log(f"warning: {e}; remove what is left with `python -m bench.network cleanup`")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    save()
    return results


def _image_info(b: realistic.BuiltImage) -> dict:
    return {
        "tag": b.tag,
        "layers": len(b.layers),
        "bytes": b.size,
        "uncompressed_bytes": b.uncompressed_size,
        "entries": sum(x.entries for x in b.layers),
        "whiteouts": sum(x.whiteouts for x in b.layers),
        "command": list(b.command),
        "description": b.description,
    }


def _progress_line(r: RunResult) -> str:
    head = f"{r.image} {r.mode} #{r.repeat + 1}:"
    if not r.ok:
        first = r.error.splitlines()[0] if r.error else "failed"
        return f"{head} {'SKIPPED' if r.skipped else 'FAILED'}: {first}"
    return (
        f"{head} pull {r.pull_s:.2f} s + run {r.run_s:.2f} s = {r.total_s:.2f} s to ready, "
        f"{(r.ready_bytes or 0) / 1e6:.1f} MB from the registry"
    )


def write_outputs(results: Results, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".json"), out.with_suffix(".md")]
    paths[0].write_text(json.dumps(results.to_json(), indent=2) + "\n")
    paths[1].write_text(markdown_table(results.summary, results.header()))
    png = out.with_suffix(".png")
    if render_chart(results.summary, png, results.header().split(";")[0]):
        paths.append(png)
    return paths


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every cleanup (network, nodes) runs."""

    def handler(_signo, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", default=",".join(DEFAULT_IMAGES), help=f"of {', '.join(realistic.RECIPES)}"
    )
    parser.add_argument("--rate", default=DEFAULT_RATE, help="tc rate of the registry's link, or 'unlimited'")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="round trip added by a proxy (ms)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="overlayfs,lazysnap,lazysnap-optimized")
    parser.add_argument(
        "--converters",
        default=DEFAULT_CONVERTER,
        help=f"who converts the images lazy modes pull, of {', '.join(CONVERTERS)}: each lazy mode runs "
        "once per converter (MODE+ctr-remote for ctr-remote's)",
    )
    parser.add_argument(
        "--peer",
        default="none",
        help=f"add the peer snapshotter as mode {PEER_NAME!r}: 'auto' (../shared/peer/run-peer from the "
        "repository, skipped with a note when absent), a run-peer path, or 'none'",
    )
    parser.add_argument("--cache-dir", type=Path, default=realistic.DEFAULT_CACHE)
    parser.add_argument("--registry-dir", type=Path, help="registry storage (default <cache-dir>/registry)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json, OUT.md, OUT.png")
    parser.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs")
    args = parser.parse_args(argv)
    try:
        images = [x.strip() for x in args.images.split(",") if x.strip()]
        for name in images:
            if name not in realistic.RECIPES:
                raise ValueError(f"unknown image {name!r}: one of {', '.join(realistic.RECIPES)}")
        modes = parse_modes(args.modes)
        peer, note = peer_mode(args.peer, _repo_root())
        if note:
            print(note, flush=True)
        if peer is not None and not any(m.name == peer.name for m in modes):
            modes.append(peer)
        settings = Settings(
            images=images,
            modes=with_converters(modes, parse_converters(args.converters)),
            rate=parse_rate(args.rate),
            delay_ms=args.delay_ms,
            repeat=args.repeat,
            cache_dir=args.cache_dir,
            registry_dir=args.registry_dir,
            out=args.out,
            drop_caches=not args.no_drop_caches,
        )
        if settings.repeat < 1:
            raise ValueError("--repeat must be at least 1")
    except ValueError as e:
        parser.error(str(e))
    if os.geteuid() != 0:
        print("error: the benchmark needs root (network namespace, containerd, drop_caches)", file=sys.stderr)
        return 1

    def log(text: str) -> None:
        print(text, flush=True)

    try:
        with _sigterm_as_interrupt():
            results = run_benchmark(settings, log)
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped and removed", file=sys.stderr)
        return 130
    except (realistic.BuildError, BenchError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(markdown_table(results.summary, results.header()))
    for path in results.files:
        print(f"wrote {path}")
    return 0 if all(r["ok"] or r["skipped"] for r in results.summary) else 1


if __name__ == "__main__":
    sys.exit(main())
