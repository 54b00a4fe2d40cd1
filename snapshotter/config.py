"""`lazysnap serve` configuration: a TOML file, overridden by command-line flags.

    root = "/var/lib/lazysnap"               # state root (0700): metadata.db, snapshots/
    address = "/run/lazysnap/lazysnap.sock"  # the gRPC unix socket containerd's proxy plugin dials
    log_level = "info"                       # debug | info | warning | error

An unknown key, a wrong type or a bad value stops the start with the file, line and key at fault.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from .logs import LEVELS

DEFAULT_ROOT = "/var/lib/lazysnap"
DEFAULT_ADDRESS = "/run/lazysnap/lazysnap.sock"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL


class ConfigError(ValueError):
    """A bad configuration file or value; the message names the file, line and key."""


@dataclass(frozen=True)
class Config:
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    log_level: str = "info"

    def with_overrides(self, **values: str | None) -> Config:
        """This config with the values given (not None) replaced, then validated."""
        cfg = replace(self, **{k: v for k, v in values.items() if v is not None})
        cfg.validate("command line")
        return cfg

    def validate(self, where: str = "configuration") -> None:
        for name in ("root", "address"):
            value = getattr(self, name)
            if not value.startswith("/"):
                raise ConfigError(f"{where}: {name} must be an absolute path, not {value!r}")
        if len(self.address.encode()) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"{where}: address {self.address!r} is {len(self.address.encode())} bytes, over the "
                f"{MAX_SOCKET_PATH}-byte limit of unix socket paths; choose a shorter path"
            )
        if self.log_level not in LEVELS:
            raise ConfigError(
                f"{where}: log_level must be one of {', '.join(LEVELS)}, not {self.log_level!r}"
            )


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*[=.\]]")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line) or line.strip() in (f"[{key}]", f"[[{key}]]"):
            return number
    return None


def load(path: Path) -> Config:
    """Read and validate a config file (keys not set keep their defaults)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    known = {"root", "address", "log_level"}
    values = {}
    for key, value in data.items():
        line = _line_of(text, key)
        where = f"config file {path}" + (f", line {line}" if line else "")
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, not {type(value).__name__} {value!r}")
        values[key] = value
        Config(**{key: value}).validate(where)
    return Config(**values)
