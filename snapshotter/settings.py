"""Settings shared by every command: the ONE grammar of sizes and durations (config files and flags of
`serve`, `convert`, `convertd` and `mount` alike), the shared defaults, and reading TOML files with the
line of each key, so that every error names the file, the line and the key.

Sizes: a plain number is bytes ("4194304", or a TOML integer). A unit may follow, case-insensitive:
k/K, M, G, T and kB, MB, GB, TB are decimal (powers of 1000); KiB, MiB, GiB, TiB (and Ki, Mi, Gi, Ti)
are binary (powers of 1024); B is bytes. Fractions are allowed and rounded to the nearest byte
("1.5GiB" = 1610612736, "4M" = 4000000, "4MiB" = 4194304). Negative sizes are refused.

Durations: a plain number is seconds ("30", 2.5); or a number with ms, s, m or h ("500ms", "10s", "5m",
"1.5h"). Negative durations are refused.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

from snapshotter.errors import ConfigError

DEFAULT_CACHE_LIMIT = "20GiB"  # the chunk cache's bound for `serve` and `mount`

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS |= {_p: 1000**_i, _p + "b": 1000**_i, _p + "i": 1 << (10 * _i), _p + "ib": 1 << (10 * _i)}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*\Z")
_DURATION_EXAMPLES = '30, "500ms", "10s", "5m", "1h"'
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _refuse(key: str | None, reason: str) -> ConfigError:
    return ConfigError(f"{key}: {reason}" if key else reason)


def parse_size(value: Any, key: str | None = None) -> int:
    """A size (see the module docstring) -> bytes; ConfigError (naming `key`) when it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _refuse(key, f"{value} is negative: a size is 0 or more bytes")
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m or m[2].lower() not in _SIZE_UNITS:
        raise _refuse(
            key,
            f"{value!r} is not a size (bytes, or a number with k/M/G/T for powers of 1000 or "
            "KiB/MiB/GiB/TiB for powers of 1024, e.g. 512MiB or 20GiB)",
        )
    return round(float(m[1]) * _SIZE_UNITS[m[2].lower()])


def parse_duration(value: Any, key: str | None = None) -> float:
    """A duration (see the module docstring) -> seconds; ConfigError (naming `key`) when it is not one."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise _refuse(key, f"{value} is negative: a duration is 0 or more seconds")
        return float(value)
    m = _DURATION.match(value) if isinstance(value, str) else None
    if not m:
        raise _refuse(
            key, f"{value!r} is not a duration (seconds, or with ms, s, m or h: {_DURATION_EXAMPLES})"
        )
    return float(m[1]) * _DURATION_UNITS[m[2]]


def size_arg(text: str) -> int:
    """`parse_size` for argparse flags (the message is the error argparse prints)."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def duration_arg(text: str) -> float:
    """`parse_duration` for argparse flags."""
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_toml(path: Path) -> tuple[str, dict]:
    """The text and the parsed document of a TOML file; ConfigError saying which file and why."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None


def line_of(text: str, table: str | None, index: int | None, key: str | None) -> int | None:
    """The line of `key` in the top level (table None), in [table], or in the index-th [[table]]; with
    key None, the table's header line."""
    current: tuple[str | None, int | None] = (None, None)
    seen: dict[str, int] = {}
    key_re = (
        re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*[=.]")
        if key
        else None
    )
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if m := re.match(r"^\[\[\s*([^\]]+?)\s*\]\]", stripped):
            name = m[1].strip("\"'")
            current = (name, seen.get(name, 0))
            seen[name] = seen.get(name, 0) + 1
            if key is None and current == (table, index):
                return number
        elif m := re.match(r"^\[\s*([^\]]+?)\s*\]", stripped):
            current = (m[1].strip("\"'"), None)
            if key is None and current == (table, index):
                return number
        elif key_re and current == (table, index) and key_re.match(line):
            return number
    return None
