"""The webhook's configuration: the ``Config`` dataclass and loading its TOML file (every error names the
file, the line and the key; sizes and durations are `snapshotter.settings`'s grammar).

Every key is optional except the certificate and key::

    listen = "0.0.0.0:8443"
    cert_file = "/etc/lazysnap/webhook/tls.crt"     # reloaded when it changes (as is key_file)
    key_file = "/etc/lazysnap/webhook/tls.key"
    docker_config = "/etc/lazysnap/webhook/.dockerconfigjson"   # a kubernetes.io/dockerconfigjson secret
    hosts_dir = "/etc/containerd/certs.d"           # containerd hosts.toml layout (mirrors, CAs)
    suffix = "_accelerated"                         # convertd's suffix
    budget = "2s"                                   # every registry lookup of one review, in all
    cache_ttl = "5m"                                # how long an answer "exists" is reused
    negative_ttl = "30s"                            # ... and "does not exist"
    max_body = "1MiB"                               # larger reviews are answered 400
    reload_interval = "10s"                         # how often cert_file and key_file are checked
    log_level = "info"
    [labels]
    mode_key = "lazysnap.io/image-accelerate-mode"  # the pod / namespace label the webhook entries'
    mode_value = "on-demand"                        #   objectSelector / namespaceSelector match
    node_key = "lazysnap.io/image-accelerate-enabled"   # the node selector added to swapped pods
    node_value = "true"

Relative paths are relative to the config file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter import logs
from snapshotter.errors import ConfigError
from snapshotter.settings import line_of, parse_duration, parse_size, read_toml
from snapshotter.webhook.review import SUFFIX, Settings

DEFAULT_LISTEN = "0.0.0.0:8443"


@dataclass(frozen=True)
class Config:
    cert_file: Path | None = None  # required to serve: the webhook serves HTTPS only
    key_file: Path | None = None
    listen: str = DEFAULT_LISTEN
    docker_config: Path | None = None
    hosts_dir: Path | None = None
    suffix: str = SUFFIX
    budget: float = 2.0
    cache_ttl: float = 300.0
    negative_ttl: float = 30.0
    max_body: int = 1 << 20
    reload_interval: float = 10.0
    log_level: str = "info"
    mode_key: str = "lazysnap.io/image-accelerate-mode"
    mode_value: str = "on-demand"
    node_key: str = Settings.node_label_key
    node_value: str = Settings.node_label_value

    @property
    def settings(self) -> Settings:
        return Settings(suffix=self.suffix, node_label_key=self.node_key, node_label_value=self.node_value)


_PATHS = {"cert_file", "key_file", "docker_config", "hosts_dir"}
_DURATIONS = {"budget", "cache_ttl", "negative_ttl", "reload_interval"}
_STRINGS = {"listen", "suffix", "log_level"}
_LABELS = {"mode_key", "mode_value", "node_key", "node_value"}


def load_config(path: Path) -> Config:
    """Read and check the TOML file at `path`; ConfigError naming the file, line and key."""
    text, doc = read_toml(path)

    def error(key: str, reason: str, table: str | None = None) -> ConfigError:
        line = line_of(text, table, None, key)
        where = f"config file {path}" + (f", line {line}" if line else "")
        return ConfigError(f"{where}: {f'{table}.' if table else ''}{key}: {reason}")

    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "labels":
            if not isinstance(value, dict):
                raise error(key, "must be a table ([labels])")
            for label, text_value in value.items():
                if label not in _LABELS:
                    raise error(label, f"unknown key (known: {', '.join(sorted(_LABELS))})", "labels")
                if not isinstance(text_value, str) or not text_value:
                    raise error(label, 'must be a non-empty string (quote "true")', "labels")
                values[label] = text_value
        elif key in _PATHS:
            if not isinstance(value, str) or not value:
                raise error(key, "must be a path (a string)")
            p = Path(value).expanduser()
            values[key] = p if p.is_absolute() else (path.parent / p).resolve()
        elif key in _DURATIONS:
            try:
                values[key] = parse_duration(value)
            except ConfigError as e:
                raise error(key, str(e)) from None
        elif key == "max_body":
            try:
                values[key] = parse_size(value)
            except ConfigError as e:
                raise error(key, str(e)) from None
        elif key in _STRINGS:
            if not isinstance(value, str) or not value:
                raise error(key, "must be a non-empty string")
            values[key] = value
        else:
            known = sorted(_PATHS | _DURATIONS | _STRINGS | {"max_body", "labels"})
            raise error(key, f"unknown key (known: {', '.join(known)})")
    if values.get("log_level", "info") not in logs.LEVELS:
        raise error("log_level", f"must be one of {', '.join(logs.LEVELS)}")
    if values.get("budget", 1.0) <= 0:
        raise error("budget", "must be more than 0")
    return Config(**values)
