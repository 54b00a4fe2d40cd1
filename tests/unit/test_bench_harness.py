"""The benchmark runner's pure parts: mode parsing, medians with min-max, the summary with its ratio
against overlayfs, the Markdown table, the PNG chart, and reading CPU and memory from /proc texts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from bench import harness as h


def test_parse_modes():
    modes = h.parse_modes("overlayfs,lazysnap,lazysnap-optimized")
    assert [(m.name, m.kind, m.optimized, m.plugin, m.variant) for m in modes] == [
        ("overlayfs", "builtin", False, None, "plain"),
        ("lazysnap", "lazysnap", False, "lazysnap", "accelerated"),
        ("lazysnap-optimized", "lazysnap", True, "lazysnap", "optimized"),
    ]


def test_parse_other_modes_keep_commas_and_equals_in_their_command():
    command = "containerd-stargz-grpc --address {socket} --root {root} --opt a=1,b=2"
    modes = h.parse_modes(f"overlayfs,other:stargz={command},lazysnap")
    assert [m.name for m in modes] == ["overlayfs", "stargz", "lazysnap"]
    stargz = modes[1]
    assert stargz.kind == "other" and stargz.plugin == "stargz" and stargz.variant == "accelerated"
    assert stargz.command == command


@pytest.mark.parametrize(
    "text, message",
    [
        ("overlay", "unknown mode"),
        ("overlayfs,overlayfs", "given twice"),
        ("other:x", "other:NAME=COMMAND"),
        ("other:bad name=cmd", "other:NAME=COMMAND"),
        ("other:lazysnap=cmd", "built-in mode name"),
        ("", "no modes"),
    ],
)
def test_parse_modes_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        h.parse_modes(text)


def test_spread():
    s = h.spread([3.0, None, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.fmt(1) == "2.5 (1.0-10.0)"
    assert h.spread([4.0]).fmt(2) == "4.00"
    empty = h.spread([None])
    assert empty.n == 0 and math.isnan(empty.median) and empty.fmt() == "-"
    assert h.spread([2e6, 4e6, 6e6]).fmt(1, 1e6) == "4.0 (2.0-6.0)"


def _run(image: str, mode: str, repeat: int, pull: float, run: float, **kw) -> h.RunResult:
    return h.RunResult(
        image,
        mode,
        repeat,
        ok=True,
        pull_s=pull,
        run_s=run,
        total_s=pull + run,
        ready_bytes=int(pull * 1e7),
        **kw,
    )


RUNS = [
    _run("numpy", "overlayfs", 0, 14.0, 0.3),
    _run("numpy", "overlayfs", 1, 15.0, 0.4),
    _run("numpy", "overlayfs", 2, 13.0, 0.2),
    _run("numpy", "lazysnap", 0, 0.8, 6.0, snapshotter_cpu_s=3.0, snapshotter_peak_rss=80 << 20),
    _run("numpy", "lazysnap", 1, 0.9, 6.4, snapshotter_cpu_s=3.2, snapshotter_peak_rss=90 << 20),
    h.RunResult("numpy", "lazysnap", 2, error="BenchError: pulling failed"),
    h.RunResult("numpy", "stargz", 0, error="the stargz snapshotter did not claim the layers", skipped=True),
]


def test_summarize():
    rows = h.summarize(RUNS, ["overlayfs", "lazysnap", "stargz"], ["numpy"])
    base, lazy, other = rows
    assert base["total_s"]["median"] == pytest.approx(14.3) and base["speedup"] is None
    assert (lazy["runs"], lazy["ok"]) == (3, 2)
    assert lazy["total_s"]["median"] == pytest.approx(7.05)
    assert lazy["speedup"] == pytest.approx(14.3 / 7.05)
    assert lazy["errors"] == ["BenchError: pulling failed"] and not lazy["skipped"]
    assert lazy["snapshotter_peak_rss"]["max"] == 90 << 20
    assert other["ok"] == 0 and other["skipped"] and other["speedup"] is None


def test_markdown_table():
    rows = h.summarize(RUNS, ["overlayfs", "lazysnap", "stargz"], ["numpy"])
    text = h.markdown_table(rows, "header line")
    lines = text.splitlines()
    assert lines[0] == "header line"
    assert lines[2].startswith("| image | mode | pull s |")
    assert (
        "| numpy | overlayfs | 14.00 (13.00-15.00) | 0.30 (0.20-0.40) | 14.30 (13.20-15.40) | 1.00x |" in text
    )
    lazy = next(line for line in lines if "| lazysnap |" in line)
    assert "| 2.03x |" in lazy and "| 3.10 (3.00-3.20) | 85 (80-90) |" in lazy
    assert "| numpy | stargz | skipped: the stargz snapshotter did not claim the layers |" in text
    widths = {line.count("|") - line.count("\\|") for line in lines[2:]}
    assert widths == {11}


def test_markdown_escapes_pipes_in_errors():
    rows = h.summarize([h.RunResult("i", "overlayfs", 0, error="a | b\nc")], ["overlayfs"], ["i"])
    assert "failed: a \\| b c" in h.markdown_table(rows)


def test_render_chart(tmp_path: Path):
    pytest.importorskip("matplotlib")
    rows = h.summarize(RUNS, ["overlayfs", "lazysnap", "stargz"], ["numpy"])
    rows += h.summarize([_run("small", "overlayfs", 0, 0.5, 0.1)], ["overlayfs"], ["small"])
    path = tmp_path / "chart.png"
    assert h.render_chart(rows, path, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_parse_proc_texts():
    stat = "1234 (containerd (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 100 0 0"
    assert h.parse_stat_cpu(stat, ticks=100) == pytest.approx(3.0)
    status = "Name:\tcontainerd\nVmHWM:\t  81920 kB\nVmRSS:\t   40960 kB\n"
    assert h.parse_status_kib(status, "VmHWM") == 80 << 20
    assert h.parse_status_kib(status, "VmRSS") == 40 << 20
    assert h.parse_status_kib(status, "VmSwap") is None


def test_sampler_reads_this_process():
    sampler = h.ProcSampler({"me": os.getpid()}).start()
    sum(i * i for i in range(300_000))
    cpu, rss = sampler.read()["me"]
    sampler.stop()
    assert cpu is not None and cpu >= 0 and rss is not None and rss > 1 << 20


def test_hosts_dir_marks_registries_plain_http(tmp_path: Path):
    h.write_hosts_dir(tmp_path, ["10.213.0.2:5000", "127.0.0.1:4000"])
    text = (tmp_path / "10.213.0.2:5000" / "hosts.toml").read_text()
    assert 'server = "http://10.213.0.2:5000"' in text
    assert (tmp_path / "127.0.0.1:4000" / "hosts.toml").exists()


def test_a_pull_that_filled_the_content_store_was_not_lazy():
    layers = [("sha256:" + "a" * 64, 3_000_000), ("sha256:" + "b" * 64, 1_000_000)]
    traffic = h.Traffic(4_100_000, 4_000_000, 4, 2, 0, 4_200_000)
    lazysnap, other = h.parse_modes("lazysnap,other:stargz=x")
    with pytest.raises(
        h.NotLazyError, match=r"lazysnap serve does not claim layers yet: .*\(4\.0 of 4\.0 MB.* 1 of 2 layers"
    ):
        h._check_lazy(lazysnap, "host/repo:tag", layers, {layers[1][0], "sha256:" + "c" * 64}, traffic)
    with pytest.raises(h.NotLazyError, match="the stargz snapshotter did not claim the layers"):
        h._check_lazy(other, "host/repo:tag", layers, {layers[0][0]}, traffic)
    # claimed layers: containerd downloaded none of them, however much the background fetch sent
    h._check_lazy(lazysnap, "host/repo:tag", layers, {"sha256:" + "c" * 64}, traffic)
