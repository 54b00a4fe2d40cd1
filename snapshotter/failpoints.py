"""Named points where tests inject a crash, an error or a delay, to prove crash safety step by step.

Code calls ``failpoints.hit("create.before-commit")`` between the steps of an operation; normally that
does nothing. A test enables a point in-process with :func:`enable`, or in a `lazysnap serve` process
through the environment::

    LAZYSNAP_FAILPOINTS="create.before-commit=kill@3,rpc.Stat=sleep:1.5"

Actions: ``kill`` (SIGKILL this process, as a crash would), ``error`` (raise :class:`InjectedFault`),
``sleep:<seconds>``. ``@N`` fires only on the N-th hit of that point (the others pass).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

ENV = "LAZYSNAP_FAILPOINTS"
log = logging.getLogger("lazysnap.failpoints")


class InjectedFault(RuntimeError):
    """Raised by a failpoint whose action is "error"."""


@dataclass
class _Point:
    action: str
    on_hit: int | None = None
    hits: int = 0


_points: dict[str, _Point] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, _Point]:
    """``name=action[@N],...`` -> points; raises ValueError naming the bad entry."""
    points = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, action = entry.partition("=")
        on_hit = None
        if "@" in action:
            action, _, n = action.rpartition("@")
            on_hit = int(n)
        if not sep or not name or not (action in ("kill", "error") or action.startswith("sleep:")):
            raise ValueError(f"bad failpoint {entry!r}: use name=kill|error|sleep:SECONDS[@N]")
        if action.startswith("sleep:"):
            float(action.removeprefix("sleep:"))
        points[name] = _Point(action, on_hit)
    return points


def enable(name: str, action: str, on_hit: int | None = None) -> None:
    with _lock:
        _points[name] = _Point(action, on_hit)


def disable_all() -> None:
    with _lock:
        _points.clear()


def load_from_environment() -> None:
    spec = os.environ.get(ENV, "")
    if spec:
        with _lock:
            _points.update(parse(spec))


def hit(name: str) -> None:
    """Run the action enabled for `name`, if any."""
    if not _points:  # the common case: one dict check
        return
    with _lock:
        point = _points.get(name)
        if point is None:
            return
        point.hits += 1
        if point.on_hit is not None and point.hits != point.on_hit:
            return
        action = point.action
    log.warning("failpoint %s: %s", name, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # SIGKILL is delivered before this returns
    elif action == "error":
        raise InjectedFault(f"injected fault at {name}")
    else:
        time.sleep(float(action.removeprefix("sleep:")))
