"""Structured logs: one ``key=value`` line per event (logfmt), on stderr.

    time=2024-05-01T10:00:00.123Z level=debug logger=lazysnap.rpc msg=rpc rpc=Prepare key=k code=OK ms=1.420

Callers pass fields with ``log.debug("rpc", extra={"fields": {...}})``; values are quoted when needed.
Credentials never reach a log: the snapshotter handles none (labels are logged, they carry no secrets).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("logfmt", "json")


def _value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, str):
        s = v
    elif isinstance(v, Mapping | list | tuple):
        s = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    else:
        s = str(v)
    if s == "" or any(c in s for c in ' ="\\') or not s.isprintable():
        escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"
        parts = [
            f"time={stamp}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_value(record.getMessage())}",
        ]
        fields = getattr(record, "fields", None)
        if fields:
            parts += [f"{k}={_value(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"error={_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """The same fields as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **(getattr(record, "fields", None) or {}),
        }
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    """Send lazysnap's logs to stderr as logfmt (or JSON) at `level` (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger("lazysnap")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
