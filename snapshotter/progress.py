"""Progress of long commands: a live display (rich) on a terminal, throttled plain lines otherwise.

One `Progress` per command, used as a context manager. Each piece of work (a layer being converted, a
blob being downloaded) is a task, named by any hashable key the caller chooses:

    with Progress() as progress:
        progress.start(digest, total_bytes, f"layer {i}/{n} {digest[:19]}")
        progress.advance(digest, read=len(block))        # from trio code or from any thread
        progress.advance(digest, written=len(out_block))
        progress.finish(digest)                          # one line that stays, in both modes
        progress.print("a message")                      # shown above the live display

On a terminal (rich decides, so `FORCE_COLOR`/`TTY_COMPATIBLE` are honoured and `TERM=dumb` is not
live) every running task is a line that rich redraws in place: label, bar, bytes read of the total, the
read rate, bytes written, elapsed time. Elsewhere (CI, a log file, a pipe) nothing is redrawn: every
`interval` seconds one line per task that moved since the last report, and one line per finished task.
`mode="off"` shows nothing (library callers that have no terminal of their own).

Every method is cheap, takes a lock and never blocks on I/O other than writing its own lines, so it may
be called from the trio loop and from worker threads alike (the converter's writers run in threads).
`reader(task, f)` and `writer(task, f)` wrap file objects so that their reads and writes are counted.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import IO, Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

PLAIN_INTERVAL = 5.0  # seconds between two reports of a running task when the output is not a terminal
Mode = Literal["auto", "live", "plain", "off"]


def megabytes(n: float) -> str:
    """Bytes as decimal megabytes, as every progress line of lazysnap's commands shows them."""
    return f"{n / 1e6:.1f} MB"


def human_size(n: float) -> str:
    """Bytes in decimal units (kB, MB, GB, TB) with one decimal, for summaries such as `lazysnap status`."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class _Task:
    label: str
    total: int | None
    started: float
    read: int = 0
    written: int = 0
    reported_read: int = -1  # what the last plain line showed (-1: nothing yet)
    reported_at: float = 0.0
    live_id: TaskID | None = None


class Progress:
    """See the module's docstring. `stream` defaults to stderr, so that a command's results on stdout
    stay clean."""

    def __init__(
        self, stream: IO[str] | None = None, *, mode: Mode = "auto", interval: float = PLAIN_INTERVAL
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._lock = threading.Lock()
        self._tasks: dict[Hashable, _Task] = {}
        self._last_report = time.monotonic()
        self._live: RichProgress | None = None
        if mode == "auto":
            console = Console(file=self.stream)
            mode = "live" if console.is_terminal and not console.is_dumb_terminal else "plain"
        self.mode: Mode = mode
        if mode == "live":
            self._live = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("wrote {task.fields[written]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream, force_terminal=True),
                refresh_per_second=4,
                # text printed to stdout goes above the display, when stdout is the same terminal
                redirect_stdout=_isatty(sys.stdout),
                redirect_stderr=_isatty(sys.stderr),
            )

    def __enter__(self) -> Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.stop()

    # --- tasks -------------------------------------------------------------------------------------

    def start(self, task: Hashable, total: int | None, label: str) -> None:
        """A new piece of work of `total` bytes to read (None: unknown), shown as `label`."""
        with self._lock:
            t = self._tasks[task] = _Task(label, total, time.monotonic())
            if self._live is not None:
                t.live_id = self._live.add_task(label, total=total, written=megabytes(0))

    def advance(self, task: Hashable, read: int = 0, written: int = 0) -> None:
        """`read` more bytes consumed and `written` more bytes produced by the task."""
        with self._lock:
            t = self._tasks.get(task)
            if t is None:  # finished already (or never started): nothing to show
                return
            t.read += read
            t.written += written
            if self._live is not None and t.live_id is not None:
                self._live.update(t.live_id, completed=t.read, written=megabytes(t.written))
            elif self.mode == "plain":
                now = time.monotonic()
                if now - self._last_report >= self.interval:
                    self._last_report = now
                    self._report(now)

    def finish(self, task: Hashable, note: str = "") -> None:
        """The task is done: one line that stays (with `note` appended), and it leaves the display."""
        with self._lock:
            t = self._tasks.pop(task, None)
            if t is None:
                return
            seconds = time.monotonic() - t.started
            rate = f" ({megabytes(t.read / seconds)}/s)" if seconds > 0 else ""
            line = (
                f"{t.label}: done: read {megabytes(t.read)}, wrote {megabytes(t.written)} "
                f"in {seconds:.1f}s{rate}{': ' + note if note else ''}"
            )
            if self._live is not None and t.live_id is not None:
                self._live.remove_task(t.live_id)
            self._write(line)

    def print(self, line: str) -> None:
        """A message of the command's own, shown above the live display (or as a plain line)."""
        with self._lock:
            self._write(line)

    # --- counting file objects -----------------------------------------------------------------------

    def reader(self, task: Hashable, f: IO[bytes]) -> CountingReader:
        """`f`, its reads counted as the task's bytes read."""
        return CountingReader(f, lambda n: self.advance(task, read=n))

    def writer(self, task: Hashable, f: IO[bytes]) -> CountingWriter:
        """`f`, its writes counted as the task's bytes written."""
        return CountingWriter(f, lambda n: self.advance(task, written=n))

    # --- output ----------------------------------------------------------------------------------------

    def _report(self, now: float) -> None:
        """One plain line for each task that moved since its last line (the lock is held)."""
        for t in self._tasks.values():
            if t.read == t.reported_read:
                continue
            since = now - (t.reported_at or t.started)
            moved = t.read - max(t.reported_read, 0)
            of = ""
            if t.total:
                of = f" of {megabytes(t.total)} ({100 * t.read // t.total}%)"
            rate = f", {megabytes(moved / since)}/s" if since > 0 else ""
            self._write(f"{t.label}: read {megabytes(t.read)}{of}, wrote {megabytes(t.written)}{rate}")
            t.reported_read, t.reported_at = t.read, now

    def _write(self, line: str) -> None:
        if self.mode == "off":
            return
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # the reader went away (a closed pipe): progress is not worth failing
            pass


class CountingReader:
    """A binary file whose read()/readinto() report how many bytes they returned."""

    def __init__(self, f: IO[bytes], count):
        self._f, self._count = f, count

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._count(len(data))
        return data

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._count(n)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class CountingWriter:
    """A binary file whose write() reports how many bytes it took."""

    def __init__(self, f: IO[bytes], count):
        self._f, self._count = f, count

    def write(self, data) -> int:
        n = self._f.write(data)
        self._count(n if n is not None else len(data))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False
