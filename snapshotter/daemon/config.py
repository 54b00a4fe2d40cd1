"""`lazysnap serve` configuration: one TOML file (default /etc/lazysnap/config.toml), overridden by
command-line flags. Every key is optional; the defaults:

    root = "/var/lib/lazysnap"                # state root (0700): metadata.db, snapshots/, layers/, mnt/
    address = "/run/lazysnap/lazysnap.sock"   # the gRPC unix socket containerd's proxy plugin dials
    log_level = "info"                        # debug | info | warning | error
    log_format = "logfmt"                     # logfmt | json
    cache_dir = ""                            # chunk cache; "" = <root>/cache
    cache_limit = "20GiB"                     # least recently used chunks go first beyond this
    hosts_dir = "/etc/containerd/certs.d"     # registry mirrors, CAs, plain HTTP: containerd's layout
    docker_config = ""                        # credentials; "" = $DOCKER_CONFIG or ~/.docker/config.json
    fetch_concurrency = 8                     # concurrent range requests per registry host
    read_timeout = 30.0                       # seconds before a lazy read fails with EIO
    open_timeout = 30.0                       # seconds to open a layer (TOC) before a full pull instead
    merge_cap = "1MiB"                        # one on-demand request also fetches neighbours up to this
    read_ahead = "8MiB"                       # a file read sequentially: fetch this much ahead
    prefetch = true                           # fetch the prioritized region of each layer at mount
    background = true                         # then fetch the rest of each layer in the background
    prefetch_program = true                   # fetch the image's entrypoint and its libraries at pull
    background_rate = "0"                     # bytes/s for the background fetch; "0" = unlimited
    metrics_address = ""                      # host:port for Prometheus /metrics (loopback); "" = off
    cri_address = ""                          # CRI image service proxy socket for kubelet; "" = off
    cri_backend = "/run/containerd/containerd.sock"  # containerd's CRI socket the proxy forwards to
    cri_credentials_ttl = "12h"               # pull credentials are kept this long after each pull

Sizes and durations follow `snapshotter.settings` (the grammar of every command: "4M" is 4,000,000
bytes, "4MiB" 4,194,304; timeouts may also be written "500ms", "1m"). An unknown key, a wrong type or a
bad value stops the start with the file, line and key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from snapshotter.errors import ConfigError
from snapshotter.logs import FORMATS, LEVELS
from snapshotter.settings import DEFAULT_CACHE_LIMIT, line_of, parse_duration, parse_size, read_toml

DEFAULT_ROOT = "/var/lib/lazysnap"
DEFAULT_ADDRESS = "/run/lazysnap/lazysnap.sock"
DEFAULT_CONFIG = Path("/etc/lazysnap/config.toml")
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL
SIZE_KEYS = {"cache_limit", "merge_cap", "read_ahead", "background_rate"}
DURATION_KEYS = {"read_timeout", "open_timeout", "cri_credentials_ttl"}


@dataclass(frozen=True)
class Config:
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    log_level: str = "info"
    log_format: str = "logfmt"
    cache_dir: str = ""
    cache_limit: str = DEFAULT_CACHE_LIMIT
    hosts_dir: str = "/etc/containerd/certs.d"
    docker_config: str = ""
    fetch_concurrency: int = 8
    read_timeout: float = 30.0
    open_timeout: float = 30.0
    merge_cap: str = "1MiB"
    read_ahead: str = "8MiB"
    prefetch: bool = True
    background: bool = True
    prefetch_program: bool = True
    background_rate: str = "0"
    metrics_address: str = ""
    cri_address: str = ""
    cri_backend: str = "/run/containerd/containerd.sock"
    cri_credentials_ttl: float = 12 * 3600.0

    def with_overrides(self, **values: str | None) -> Config:
        """This config with the values given (not None) replaced, then validated."""
        cfg = replace(self, **{k: v for k, v in values.items() if v is not None})
        cfg.validate("command line")
        return cfg

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.root) / "cache"

    def size(self, key: str) -> int:
        return parse_size(getattr(self, key), key)

    def validate(self, where: str = "configuration") -> None:
        for name in ("root", "address"):
            value = getattr(self, name)
            if not value.startswith("/"):
                raise ConfigError(f"{where}: {name} must be an absolute path, not {value!r}")
        for name in ("cache_dir", "hosts_dir", "docker_config"):
            value = getattr(self, name)
            if value and not value.startswith("/"):
                raise ConfigError(f"{where}: {name} must be an absolute path (or empty), not {value!r}")
        for name in ("address", "cri_address", "cri_backend"):
            value = getattr(self, name)
            if name != "address" and value and not value.startswith("/"):
                raise ConfigError(f"{where}: {name} must be an absolute socket path, not {value!r}")
            if len(value.encode()) > MAX_SOCKET_PATH:
                raise ConfigError(
                    f"{where}: {name} {value!r} is {len(value.encode())} bytes, over the "
                    f"{MAX_SOCKET_PATH}-byte limit of unix socket paths; choose a shorter path"
                )
        if self.cri_address and self.cri_address in (self.address, self.cri_backend):
            raise ConfigError(
                f"{where}: cri_address {self.cri_address!r} must differ from address and cri_backend"
            )
        if not self.cri_backend:
            raise ConfigError(f"{where}: cri_backend must name containerd's socket")
        if self.log_level not in LEVELS:
            raise ConfigError(
                f"{where}: log_level must be one of {', '.join(LEVELS)}, not {self.log_level!r}"
            )
        if self.log_format not in FORMATS:
            raise ConfigError(
                f"{where}: log_format must be one of {', '.join(FORMATS)}, not {self.log_format!r}"
            )
        for key in SIZE_KEYS:
            try:
                self.size(key)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if self.fetch_concurrency < 1:
            raise ConfigError(f"{where}: fetch_concurrency must be at least 1")
        for key in ("read_timeout", "open_timeout", "cri_credentials_ttl"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be a positive number of seconds")
        if self.metrics_address:
            host, sep, port = self.metrics_address.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ConfigError(f"{where}: metrics_address must be host:port, not {self.metrics_address!r}")


def _type_ok(kind: type, value: object) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def load(path: Path) -> Config:
    """Read and validate a config file (keys not set keep their defaults)."""
    text, data = read_toml(path)
    types = {f.name: f.type for f in fields(Config)}
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    values: dict[str, object] = {}
    for key, value in data.items():
        line = line_of(text, None, None, key) or line_of(text, key, None, None)
        where = f"config file {path}" + (f", line {line}" if line else "")
        if key not in types:
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(types))})")
        kind = kinds[types[key]]
        if key in SIZE_KEYS and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if key in DURATION_KEYS and isinstance(value, str):
            try:
                value = parse_duration(value, key)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if not _type_ok(kind, value):
            expected = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}
            raise ConfigError(
                f"{where}: {key} must be {expected[types[key]]}, not {type(value).__name__} {value!r}"
            )
        values[key] = float(value) if kind is float else value
        replace(Config(), **{key: values[key]}).validate(where)
    return Config(**values)
