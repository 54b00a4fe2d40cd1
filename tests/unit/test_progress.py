"""Progress of long commands: live (rich) on a terminal, throttled plain lines on a pipe; counted from the
trio loop and from worker threads alike."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

from snapshotter.progress import Progress

ROOT = Path(__file__).resolve().parents[2]
STEPS = 30  # each task: 30 steps of 1 MB read and 0.5 MB written, 30 ms apart
INTERVAL = 0.3

# Two layers converted at once: one advanced on the trio loop, the other from a worker thread.
CHILD = textwrap.dedent(
    f"""
    import time
    import trio
    from snapshotter.progress import Progress

    async def main():
        with Progress(interval={INTERVAL}) as progress:
            progress.print("converting 2 layers")
            progress.start("a", {STEPS} * 1_000_000, "layer 1/2 sha256:aaaa")
            progress.start("b", {STEPS} * 1_000_000, "layer 2/2 sha256:bbbb")

            def in_thread():
                for _ in range({STEPS}):
                    time.sleep(0.03)
                    progress.advance("b", read=1_000_000, written=500_000)
                progress.finish("b")

            async def in_loop():
                for _ in range({STEPS}):
                    await trio.sleep(0.03)
                    progress.advance("a", read=1_000_000, written=500_000)
                progress.finish("a")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_loop)
                nursery.start_soon(trio.to_thread.run_sync, in_thread)

    trio.run(main)
    """
)
TERMINAL_ENV = ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV}
    env["TERM"] = "xterm-256color"
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_a_pipe_gets_plain_throttled_lines() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env(),
        timeout=60,
        check=True,
    )
    elapsed = time.monotonic() - started
    out = done.stdout.decode()
    assert "\x1b" not in out and "\r" not in out, out
    lines = out.splitlines()
    assert lines[0] == "converting 2 layers"
    finished = [line for line in lines if ": done: " in line]
    assert sorted(line.split(" in ")[0] for line in finished) == [
        "layer 1/2 sha256:aaaa: done: read 30.0 MB, wrote 15.0 MB",
        "layer 2/2 sha256:bbbb: done: read 30.0 MB, wrote 15.0 MB",
    ]
    running = [line for line in lines[1:] if line not in finished]
    assert running, "no line while the layers were running"
    for line in running:
        assert line.startswith(("layer 1/2 sha256:aaaa: read ", "layer 2/2 sha256:bbbb: read ")), line
        assert " of 30.0 MB (" in line and line.endswith(" MB/s"), line
    # 60 advances, but at most one line per task per interval
    assert len(running) <= 2 * (elapsed / INTERVAL + 1), lines


def test_a_terminal_gets_the_live_display() -> None:
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=child_env(),
    )
    os.close(secondary)
    out = bytearray()
    try:
        while True:
            try:
                data = os.read(primary, 1 << 16)
            except OSError:  # EIO: the child has gone and closed the terminal
                break
            if not data:
                break
            out += data
    finally:
        os.close(primary)
        assert child.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    assert "\x1b[" in text and "\r" in text  # drawn with escapes and redrawn in place
    assert text.count("layer 1/2 sha256:aaaa") >= 3  # the same line drawn again and again
    assert " MB/s" in text and "/30.0 MB" in text and "wrote " in text  # rate, read of total, written
    assert "converting 2 layers" in text
    assert "layer 1/2 sha256:aaaa: done: read 30.0 MB, wrote 15.0 MB" in text
    assert "layer 2/2 sha256:bbbb: done: read 30.0 MB, wrote 15.0 MB" in text


def test_counting_files_and_unknown_totals() -> None:
    out = io.StringIO()
    with Progress(out, mode="plain", interval=0.0) as progress:
        progress.start("x", None, "blob")
        src = progress.reader("x", io.BytesIO(b"a" * 3_000_000))
        dst = progress.writer("x", io.BytesIO())
        while block := src.read(1_000_000):
            dst.write(block[:500_000])
        progress.finish("x", note="uploaded")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("blob: read 1.0 MB, wrote 0.0 MB, ")  # no total: no percentage
    assert lines[-1].startswith("blob: done: read 3.0 MB, wrote 1.5 MB in ")
    assert lines[-1].endswith(": uploaded")


def test_off_shows_nothing_and_unknown_tasks_are_ignored() -> None:
    out = io.StringIO()
    with Progress(out, mode="off") as progress:
        progress.start("x", 10, "blob")
        progress.advance("x", read=10)
        progress.finish("x")
        progress.print("hello")
    assert out.getvalue() == ""
    plain = Progress(out, mode="plain")
    plain.advance("never started", read=1)
    plain.finish("never started")
    assert out.getvalue() == ""
