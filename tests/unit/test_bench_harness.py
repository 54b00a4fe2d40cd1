"""The benchmark runner's pure parts: mode parsing, medians with min-max, the summary with its ratio
against overlayfs, the Markdown table, the PNG chart, and reading CPU and memory from /proc texts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from bench import harness as h
from bench.network import NetworkError


def test_parse_modes():
    modes = h.parse_modes("overlayfs,lazysnap,lazysnap-optimized,lazysnap-index")
    assert [(m.name, m.kind, m.optimized, m.plugin, m.variant) for m in modes] == [
        ("overlayfs", "builtin", False, None, "plain"),
        ("lazysnap", "lazysnap", False, "lazysnap", "accelerated"),
        ("lazysnap-optimized", "lazysnap", True, "lazysnap", "optimized"),
        ("lazysnap-index", "lazysnap", False, "lazysnap", "indexed"),  # the plain image, its SOCI index
    ]
    # the index mode pulls the plain image whoever converts the others
    expanded = h.with_converters(modes, h.parse_converters("lazysnap,ctr-remote"))
    assert [m.name for m in expanded if m.indexed] == ["lazysnap-index"]


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


# --- converters, the peer, the schedule (issue 13) ------------------------------------------------


def test_converters_give_each_lazy_mode_one_run_per_converter():
    modes = h.parse_modes("overlayfs,lazysnap,lazysnap-optimized,other:stargz=peer {socket}")
    expanded = h.with_converters(modes, h.parse_converters("lazysnap,ctr-remote"))
    assert [(m.name, m.plugin, m.variant) for m in expanded] == [
        ("overlayfs", None, "plain"),
        ("lazysnap", "lazysnap", "accelerated"),
        ("lazysnap+ctr-remote", "lazysnap", "accelerated-ctr-remote"),
        ("lazysnap-optimized", "lazysnap", "optimized"),
        ("stargz", "stargz", "accelerated"),
        ("stargz+ctr-remote", "stargz", "accelerated-ctr-remote"),
    ]
    # the default leaves the modes as they were
    assert h.with_converters(modes, h.parse_converters("lazysnap")) == modes
    only = h.with_converters(modes[1:2], ["ctr-remote"])
    assert [(m.name, m.variant) for m in only] == [("lazysnap+ctr-remote", "accelerated-ctr-remote")]


@pytest.mark.parametrize(
    "text, message",
    [("buildkit", "unknown converter"), ("lazysnap,lazysnap", "twice"), (" , ", "no converters")],
)
def test_parse_converters_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        h.parse_converters(text)


def _repo_with_peer(tmp_path: Path, present: bool) -> Path:
    repo = tmp_path / "main"
    repo.mkdir(parents=True)
    if present:
        peer = tmp_path / "shared" / "peer" / "run-peer"
        peer.parent.mkdir(parents=True)
        peer.write_text("#!/bin/sh\n")
    return repo


def test_peer_mode_is_added_when_the_peer_is_beside_the_repository(tmp_path: Path):
    repo = _repo_with_peer(tmp_path, present=True)
    mode, note = h.peer_mode("auto", repo)
    assert mode is not None and mode.name == "stargz" and mode.kind == "other" and mode.plugin == "stargz"
    run_peer = str((tmp_path / "shared/peer/run-peer").resolve())
    assert mode.command == f"{run_peer} {{socket}} {{root}} {{hosts_dir}}"
    assert run_peer in note
    # the command is what parse_modes would have made of the documented other: form
    assert h.parse_modes(f"other:stargz={mode.command}") == [mode]


def test_peer_mode_is_skipped_with_a_note_when_absent(tmp_path: Path):
    repo = _repo_with_peer(tmp_path, present=False)
    mode, note = h.peer_mode("auto", repo)
    assert mode is None and note.startswith("note: no peer snapshotter at") and "skipped" in note
    assert h.peer_mode("none", repo) == (None, "")
    with pytest.raises(ValueError, match="no such file"):
        h.peer_mode(str(tmp_path / "missing"), repo)


def test_main_adds_the_peer_to_the_modes_only_when_present(tmp_path: Path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(h, "run_benchmark", lambda settings, log: seen.append(settings) or _raise_interrupt())
    monkeypatch.setattr(h.os, "geteuid", lambda: 0)
    for present in (True, False):
        repo = _repo_with_peer(tmp_path / str(present), present)
        monkeypatch.setattr(h, "_repo_root", lambda repo=repo: repo)
        assert (
            h.main(["--modes", "overlayfs,lazysnap", "--peer", "auto", "--out", str(tmp_path / "o")]) == 130
        )
    with_peer, without = seen
    assert [m.name for m in with_peer.modes] == ["overlayfs", "lazysnap", "stargz"]
    assert [m.name for m in without.modes] == ["overlayfs", "lazysnap"]
    assert "note: no peer snapshotter" in capsys.readouterr().out


def _raise_interrupt():
    raise KeyboardInterrupt


def test_schedule_interleaves_modes_within_each_repeat():
    modes = h.parse_modes("overlayfs,lazysnap,other:stargz=x")
    order = [(i, r, m.name) for i, r, m in h.schedule(2, 3, modes)]
    assert order[:6] == [
        (0, 0, "overlayfs"),
        (0, 0, "lazysnap"),
        (0, 0, "stargz"),
        (0, 1, "overlayfs"),
        (0, 1, "lazysnap"),
        (0, 1, "stargz"),
    ]
    assert len(order) == 18 and len(set(order)) == 18


# --- results survive a failing teardown (issue 13) ------------------------------------------------


class _TeardownFails:
    """A ShapedRegistry whose removal fails as `ip link del` once did."""

    host = push_host = "10.213.0.2:5000"

    def __init__(self, *args, **kw):
        self.closed = 0

    def start(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self):
        return "fake"

    def shape(self, rate):
        pass

    def qdisc(self):
        return ""

    def close(self):
        self.closed += 1
        raise NetworkError("cleaning up the shaped network: ip link del lzsh1: Cannot find device")


def test_results_are_written_after_each_run_and_kept_when_teardown_fails(tmp_path: Path, monkeypatch):
    built = h.realistic.BuiltImage("img", "k" * 64, tmp_path, (), ("true",), ())
    monkeypatch.setattr(h.realistic, "build", lambda name, cache_dir, log: built)
    monkeypatch.setattr(h, "ShapedRegistry", _TeardownFails)
    monkeypatch.setattr(h, "prepare", lambda *a: h.Prepared(built, "bench/img"))
    out = tmp_path / "out" / "startup"
    written_before_each_run = []

    def run_once(prep, mode, repeat, net, **kw):
        written_before_each_run.append(
            len(json.loads(out.with_suffix(".json").read_text())["runs"])
            if out.with_suffix(".json").exists()
            else 0
        )
        return _run("img", mode.name, repeat, 10.0 if mode.name == "overlayfs" else 2.0, 0.5)

    monkeypatch.setattr(h, "run_once", run_once)
    settings = h.Settings(
        images=["img"], modes=h.parse_modes("overlayfs,lazysnap"), repeat=2, cache_dir=tmp_path, out=out
    )
    logged = []
    results = h.run_benchmark(settings, log=logged.append)
    assert written_before_each_run == [0, 1, 2, 3]  # each run was on disk before the next began
    doc = json.loads(out.with_suffix(".json").read_text())
    assert len(doc["runs"]) == 4 and [r["mode"] for r in doc["summary"]] == ["overlayfs", "lazysnap"]
    assert "| img | lazysnap |" in out.with_suffix(".md").read_text()
    assert len(results.runs) == 4
    assert any("Cannot find device" in line and "bench.network cleanup" in line for line in logged)


def test_results_of_finished_runs_are_on_disk_when_a_later_run_is_interrupted(tmp_path: Path, monkeypatch):
    built = h.realistic.BuiltImage("img", "k" * 64, tmp_path, (), ("true",), ())
    monkeypatch.setattr(h.realistic, "build", lambda name, cache_dir, log: built)
    monkeypatch.setattr(h, "ShapedRegistry", _TeardownFails)
    monkeypatch.setattr(h, "prepare", lambda *a: h.Prepared(built, "bench/img"))
    calls = []

    def run_once(prep, mode, repeat, net, **kw):
        calls.append(mode.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return _run("img", mode.name, repeat, 3.0, 0.5)

    monkeypatch.setattr(h, "run_once", run_once)
    out = tmp_path / "startup"
    settings = h.Settings(
        images=["img"], modes=h.parse_modes("overlayfs,lazysnap"), repeat=2, cache_dir=tmp_path, out=out
    )
    with pytest.raises(KeyboardInterrupt):
        h.run_benchmark(settings, log=lambda _t: None)
    assert len(json.loads(out.with_suffix(".json").read_text())["runs"]) == 2


def test_a_skipped_lazy_run_says_why_the_snapshotter_fell_back(tmp_path: Path):
    log = tmp_path / "snapshotter.log"
    log.write_text(
        'time=t level=info msg="lazy layer claimed" layer=sha256-aa\n'
        'time=t level=warning logger=lazysnap.remote msg="full pull for r/x:1 layer sha256:bb: TOC entry 1 '
        "('.'): name with '..', '.' or an empty component\"\n"
    )
    node = type("N", (), {"snapshotter": type("S", (), {"log_path": log})()})()
    assert h.Node.fallback_reasons(node) == [
        "full pull for r/x:1 layer sha256:bb: TOC entry 1 ('.'): name with '..', '.' or an empty component"
    ]
