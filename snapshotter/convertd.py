"""`lazysnap convertd`: convert every image pushed to enabled repositories, driven by the registry's
notifications.

A registry (CNCF distribution and compatible ones) POSTs notification envelopes
(``application/vnd.docker.distribution.events.v1+json``, ``{"events": [...]}``) to ``/events``. For each
``push`` of a *tagged* image manifest or index in a repository that a ``[[repositories]]`` rule enables,
convertd commits a job to its persistent queue (``snapshotter.jobs``, SQLite WAL in the state dir) and
only then answers 200; workers convert in the background with ``snapshotter.convert.convert_image`` and
push ``<tag><suffix>`` (``_accelerated``) to the same repository. The original is never touched.

No loops: tags ending in the suffix are never converted, nor manifests whose layers all carry TOC
annotations already; manifests pushed by digest (the converter's per-platform manifests) have no tag.
Repeated events for the same digest convert once; the same digest pushed under another tag is only
re-tagged. Failed attempts are retried with exponential backoff, then stay visible as failed, with the
reason, in ``/jobs``. Anything that cannot be converted (artifacts, blobs, deleted manifests, other
actions) is answered 200 so the registry does not re-send it forever.

HTTP (a small server on trio and h11; bounded header and body sizes, timeouts, a connection limit):

    POST /events    the registry's notifications; 401 without the shared secret (when configured)
    GET  /healthz   200 "ok" when the queue database answers
    GET  /metrics   Prometheus text format
    GET  /jobs      JSON: recent jobs with state, reason, attempts (?state=failed&limit=N)

Configuration (TOML, ``--config FILE``); every key is optional::

    listen = "127.0.0.1:8089"
    state_dir = "/var/lib/lazysnap/convertd"   # jobs.db, tmp/ (layers while converting); 0700
    registry = "registry.example.com:5000"    # where to convert (default: the host in each event's URL)
    suffix = "_accelerated"
    concurrency = 1                            # conversions at once (each uses every core)
    hosts_dir = "/etc/containerd/certs.d"      # containerd hosts.toml layout
    docker_config = "/root/.docker/config.json"
    secret_file = "/etc/lazysnap/convertd.secret"   # or secret = "..."; the registry sends it
    secret_header = "Authorization"            # "Authorization: Bearer <secret>", else the raw value
    log_level = "info"
    max_body = "1MiB"
    job_timeout = "1h"
    [retry]
    attempts = 5                               # in all, the first included
    backoff = "10s"                            # before the 2nd attempt; doubles each time
    max_backoff = "10m"
    [[repositories]]
    name = "team/*"                            # * within one path component, ** across, ? one char
    format = "estargz"                         # estargz | estargz-zstd | zstd-chunked
    chunk_size = "4MiB"
    level = 6
    all_platforms = false                      # else the host's platform (or `platform`) of an index
    platform = "linux/amd64"
    workload = "nginx -t"                      # optimize: prioritize what `/bin/sh -c` of it opens

Relative paths are relative to the config file. An invalid file stops the start with the line and reason.

Test hooks (``LAZYSNAP_FAILPOINTS``, see ``snapshotter.failpoints``): ``convertd.job-start`` before a job
touches the registry (run in a thread: ``sleep`` does not block the server), ``convertd.layer-done``
after each layer the converter finishes (``kill`` or ``error`` only).
"""

from __future__ import annotations

import argparse
import calendar
import dataclasses
import fcntl
import functools
import hmac
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fuse.formats.annotations import expected_toc_digest
from fuse.formats.write_tar import TarFormatError
from fuse.formats.writer import DEFAULT_CHUNK_SIZE, ESTARGZ, FORMATS, WriteOptions, WriterError
from fuse.registry import (
    CredentialStore,
    HostsConfig,
    ManifestError,
    NotFound,
    Platform,
    Reference,
    RegistryClient,
    RegistryError,
)
from fuse.registry import manifests as mf

from . import failpoints, logs
from .convert import ATTESTATION, FOREIGN, IMAGE_CONFIGS, SUFFIX, ConvertError, convert_image
from .jobs import STATES, Job, JobStore, Push, QueueError, RetryPolicy, Tag
from .optimize import optimize_image

log = logging.getLogger("lazysnap.convertd")
T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:8089"
DEFAULT_STATE_DIR = "/var/lib/lazysnap/convertd"
EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
MANIFEST_TYPES = frozenset((*mf.MANIFESTS, *mf.INDEXES))
MAX_TAG = 128
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_GLOB = re.compile(r"^[a-z0-9._/*?-]+\Z")


# --- configuration ----------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad configuration file or value; the message names the file, the line and the reason."""


@dataclass(frozen=True)
class RepositoryRule:
    """Repositories whose name matches `name` (a glob) are converted with these options."""

    name: str
    format: str = ESTARGZ
    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int | None = None
    all_platforms: bool = False
    platform: str | None = None
    workload: str | None = None  # a command: converted with snapshotter.optimize.optimize_image

    def matches(self, repository: str) -> bool:
        return glob_regex(self.name).match(repository) is not None

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "format": self.format,
            "chunk_size": self.chunk_size,
            "level": self.level,
            "all_platforms": self.all_platforms,
            "platform": self.platform,
        }
        if self.workload is not None:
            options["workload"] = self.workload
        return options


@dataclass(frozen=True)
class Config:
    listen: str = DEFAULT_LISTEN
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    registry: str | None = None
    suffix: str = SUFFIX
    concurrency: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    hosts_dir: Path | None = None
    docker_config: Path | None = None
    secret: str | None = field(default=None, repr=False)
    secret_header: str = "Authorization"
    log_level: str = "info"
    max_body: int = 1 << 20
    job_timeout: float = 3600.0
    repositories: tuple[RepositoryRule, ...] = ()

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def rule_for(self, repository: str) -> RepositoryRule | None:
        """The first rule (in file order) matching the repository."""
        return next((r for r in self.repositories if r.matches(repository)), None)


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches within one path component, `**` across components (`**/` also none), `?` one char."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def parse_listen(text: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); an empty host listens on every interface."""
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d{1,5})\Z", text) or re.match(r"^([^:\[\]\s]*):(\d{1,5})\Z", text)
    if not m or int(m[2]) > 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8089 or [::1]:8089)")
    return m[1], int(m[2])


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)\Z")
_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]i?[bB]?)?\Z")


def parse_duration(value: Any) -> float:
    """Seconds: a number, or "500ms", "10s", "5m", "1h"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError('must be a number of seconds or a string such as "10s"')
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if not m:
            raise ValueError(f'{value!r} is not a duration (e.g. 30, "500ms", "10s", "5m", "1h")')
        value = float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]
    if value < 0:
        raise ValueError("must not be negative")
    return float(value)


def parse_size(value: Any) -> int:
    """Bytes: an integer, or "64k", "4M", "4MiB"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('must be a number of bytes or a string such as "4MiB"')
    if isinstance(value, int):
        return value
    m = _SIZE.match(value.strip())
    if not m:
        raise ValueError(f'{value!r} is not a size (bytes, or with K/M/G, e.g. "4MiB")')
    return int(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[(m[2] or "").upper()[:1]]


def _line_of(text: str, table: str | None, index: int | None, key: str | None) -> int | None:
    """The line of `key` in the top level (table None), in [table], or in the index-th [[table]]; with
    key None, the table's header line."""
    current: tuple[str | None, int | None] = (None, None)
    seen: dict[str, int] = {}
    key_re = (
        re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=") if key else None
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


class _Loader:
    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def error(
        self, reason: str, key: str | None, table: str | None = None, index: int | None = None
    ) -> ConfigError:
        line = _line_of(self.text, table, index, key)
        if line is None and key is not None and table is not None:
            line = _line_of(self.text, table, index, None)
        if line is None and table is not None:
            line = _line_of(self.text, None, None, table)  # an inline table
        where = f"config file {self.path}" + (f", line {line}" if line else "")
        name = ".".join(p for p in (table, f"[{index}]" if index is not None else None, key) if p)
        return ConfigError(f"{where}: {name.replace('.[', '[')}: {reason}")

    def path_value(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()


_TOP_KEYS = {
    "listen",
    "state_dir",
    "registry",
    "suffix",
    "concurrency",
    "hosts_dir",
    "docker_config",
    "secret",
    "secret_file",
    "secret_header",
    "log_level",
    "max_body",
    "job_timeout",
    "retry",
    "repositories",
}
_RETRY_KEYS = {"attempts", "backoff", "max_backoff", "multiplier"}
_REPO_KEYS = {"name", "format", "chunk_size", "level", "all_platforms", "platform", "workload"}


def _check_keys(loader: _Loader, data: dict, known: set[str], table: str | None, index: int | None) -> None:
    for key in data:
        if key not in known:
            raise loader.error(f"unknown key (known: {', '.join(sorted(known))})", key, table, index)


def _typed(
    loader: _Loader, data: dict, key: str, kind: type | tuple, what: str, table=None, index=None
) -> Any:
    value = data[key]
    if isinstance(value, bool) and kind is not bool:
        raise loader.error(f"must be {what}, not {value!r}", key, table, index)
    if not isinstance(value, kind):
        raise loader.error(f"must be {what}, not {value!r}", key, table, index)
    return value


def load_config(path: Path) -> Config:
    """Read and validate a convertd config file; raises ConfigError naming the line and reason."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    return _parse(_Loader(path, text), data)


def _parse(ld: _Loader, data: dict) -> Config:
    _check_keys(ld, data, _TOP_KEYS, None, None)
    values: dict[str, Any] = {}
    for key in ("listen", "state_dir", "registry", "suffix", "hosts_dir", "docker_config", "secret"):
        if key in data:
            values[key] = _typed(ld, data, key, str, "a string")
    for key in ("secret_file", "secret_header", "log_level"):
        if key in data:
            _typed(ld, data, key, str, "a string")
    if "listen" in values:
        try:
            parse_listen(values["listen"])
        except ValueError as e:
            raise ld.error(str(e), "listen") from None
    for key in ("state_dir", "hosts_dir", "docker_config"):
        if key in values:
            values[key] = ld.path_value(values[key])
    if "hosts_dir" in values and not values["hosts_dir"].is_dir():
        raise ld.error(f"{values['hosts_dir']} is not a directory", "hosts_dir")
    if "docker_config" in values:
        _check_docker_config(ld, values["docker_config"])
    if "registry" in values:
        try:
            host = Reference.parse(f"{values['registry']}/x").host
        except RegistryError:
            host = None
        if host is None or values["registry"] not in (host, "index.docker.io") or "/" in values["registry"]:
            raise ld.error(f"{values['registry']!r} is not a registry host[:port]", "registry")
    if "suffix" in values and not _SUFFIX.match(values["suffix"]):
        raise ld.error("must be 1-64 characters of letters, digits, '_', '.', '-' (it ends a tag)", "suffix")
    if "secret" in data and "secret_file" in data:
        raise ld.error("give secret or secret_file, not both", "secret_file")
    if "secret" in values and not values["secret"].strip():
        raise ld.error("must not be empty (leave it out to accept events without a secret)", "secret")
    if "secret_file" in data:
        secret_path = ld.path_value(data["secret_file"])
        try:
            secret = secret_path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ld.error(
                f"cannot read {secret_path}: {getattr(e, 'strerror', None) or e}", "secret_file"
            ) from None
        if not secret:
            raise ld.error(f"{secret_path} is empty", "secret_file")
        values["secret"] = secret
    if "secret_header" in data:
        if not re.match(r"^[A-Za-z0-9-]{1,64}\Z", data["secret_header"]):
            raise ld.error("must be an HTTP header name", "secret_header")
        values["secret_header"] = data["secret_header"]
    if "log_level" in data:
        if data["log_level"] not in logs.LEVELS:
            raise ld.error(f"must be one of {', '.join(logs.LEVELS)}", "log_level")
        values["log_level"] = data["log_level"]
    if "concurrency" in data:
        n = _typed(ld, data, "concurrency", int, "an integer")
        if not 1 <= n <= 64:
            raise ld.error("must be between 1 and 64", "concurrency")
        values["concurrency"] = n
    if "max_body" in data:
        try:
            size = parse_size(data["max_body"])
        except ValueError as e:
            raise ld.error(str(e), "max_body") from None
        if not 1024 <= size <= 64 << 20:
            raise ld.error("must be between 1KiB and 64MiB", "max_body")
        values["max_body"] = size
    if "job_timeout" in data:
        try:
            values["job_timeout"] = parse_duration(data["job_timeout"])
        except ValueError as e:
            raise ld.error(str(e), "job_timeout") from None
        if values["job_timeout"] < 1:
            raise ld.error("must be at least 1s", "job_timeout")
    if "retry" in data:
        values["retry"] = _parse_retry(ld, data["retry"])
    if "repositories" in data:
        repos = data["repositories"]
        if not isinstance(repos, list) or not all(isinstance(r, dict) for r in repos):
            raise ld.error("must be [[repositories]] tables", "repositories")
        values["repositories"] = tuple(_parse_rule(ld, r, i) for i, r in enumerate(repos))
    return Config(**values)


def _check_docker_config(ld: _Loader, path: Path) -> None:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ld.error(f"cannot read {path}: {e.strerror}", "docker_config") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ld.error(f"{path} is not valid JSON: {e}", "docker_config") from None
    if not isinstance(doc, dict):
        raise ld.error(f"{path} must hold a JSON object", "docker_config")


def _parse_retry(ld: _Loader, data: Any) -> RetryPolicy:
    if not isinstance(data, dict):
        raise ld.error("must be a [retry] table", "retry")
    _check_keys(ld, data, _RETRY_KEYS, "retry", None)
    values: dict[str, Any] = {}
    if "attempts" in data:
        n = _typed(ld, data, "attempts", int, "an integer", "retry")
        if not 1 <= n <= 100:
            raise ld.error("must be between 1 and 100", "attempts", "retry")
        values["attempts"] = n
    for key in ("backoff", "max_backoff"):
        if key in data:
            try:
                values[key] = parse_duration(data[key])
            except ValueError as e:
                raise ld.error(str(e), key, "retry") from None
    if "multiplier" in data:
        m = _typed(ld, data, "multiplier", int | float, "a number", "retry")
        if not 1 <= m <= 10:
            raise ld.error("must be between 1 and 10", "multiplier", "retry")
        values["multiplier"] = float(m)
    policy = RetryPolicy(**values)
    if policy.max_backoff < policy.backoff:
        raise ld.error("must not be less than backoff", "max_backoff", "retry")
    return policy


def _parse_rule(ld: _Loader, data: dict, i: int) -> RepositoryRule:
    t = "repositories"
    _check_keys(ld, data, _REPO_KEYS, t, i)
    if "name" not in data:
        raise ld.error("missing: the repository name or glob this entry enables", None, t, i)
    name = _typed(ld, data, "name", str, "a string", t, i)
    if not _GLOB.match(name) or name.startswith("/") or name.endswith("/"):
        raise ld.error(
            f"{name!r} is not a repository name or glob (lowercase letters, digits, '.', '_', '-', '/', "
            "and * ** ?)",
            "name",
            t,
            i,
        )
    values: dict[str, Any] = {"name": name}
    if "format" in data:
        values["format"] = _typed(ld, data, "format", str, "a string", t, i)
        if values["format"] not in FORMATS:
            raise ld.error(f"must be one of {', '.join(FORMATS)}", "format", t, i)
    if "chunk_size" in data:
        try:
            values["chunk_size"] = parse_size(data["chunk_size"])
        except ValueError as e:
            raise ld.error(str(e), "chunk_size", t, i) from None
    if "level" in data:
        values["level"] = _typed(ld, data, "level", int, "an integer", t, i)
    if "all_platforms" in data:
        values["all_platforms"] = _typed(ld, data, "all_platforms", bool, "true or false", t, i)
    if "platform" in data:
        values["platform"] = _typed(ld, data, "platform", str, "a string", t, i)
        try:
            Platform.parse(values["platform"])
        except ManifestError as e:
            raise ld.error(str(e), "platform", t, i) from None
        if values.get("all_platforms"):
            raise ld.error("give platform or all_platforms = true, not both", "platform", t, i)
    if "workload" in data:
        values["workload"] = _typed(ld, data, "workload", str, "a string", t, i)
        if not values["workload"].strip():
            raise ld.error("must not be empty", "workload", t, i)
    rule = RepositoryRule(**values)
    try:
        WriteOptions(format=rule.format, chunk_size=rule.chunk_size, level=rule.level).validated()
    except WriterError as e:
        key = "level" if "level" in str(e) else "chunk_size" if "chunk" in str(e) else "format"
        raise ld.error(str(e), key, t, i) from None
    return rule


# --- events -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ignored:
    """An event that asks for no conversion, and why (logged at `level`)."""

    reason: str
    level: int = logging.DEBUG
    malformed: bool = False


_TIMESTAMP = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:\d\d)\Z")


def parse_timestamp(text: Any) -> int | None:
    """An RFC 3339 timestamp ("2024-05-01T10:00:00.123456789Z") -> nanoseconds since the epoch."""
    if not isinstance(text, str):
        return None
    m = _TIMESTAMP.match(text.strip())
    if not m:
        return None
    try:
        seconds = calendar.timegm(tuple(int(m[i]) for i in range(1, 7)) + (0, 0, 0))  # type: ignore[arg-type]
    except (ValueError, OverflowError):
        return None
    zone = m[8].upper()
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int((m[7] or "0")[:9].ljust(9, "0"))


def classify(event: Any, config: Config, now_ns: int) -> Push | Ignored:
    """What one notification event asks for: a Push to convert, or why it is ignored."""

    def malformed(why: str) -> Ignored:
        return Ignored(f"malformed event: {why}", logging.WARNING, malformed=True)

    if not isinstance(event, dict):
        return malformed("not a JSON object")
    action = event.get("action")
    if not isinstance(action, str):
        return malformed("no action")
    if action != "push":
        known = action in ("pull", "delete", "mount")
        return Ignored(f"{action} event" if known else f"unknown action {action[:40]!r}")
    target = event.get("target")
    if not isinstance(target, dict):
        return malformed("no target")
    media_type = target.get("mediaType")
    repository = target.get("repository")
    digest = target.get("digest")
    tag = target.get("tag") or None
    if not isinstance(repository, str) or not repository:
        return malformed("target without a repository")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        return malformed(f"target digest {str(digest)[:80]!r} is not a sha256 digest")
    if not isinstance(media_type, str) or media_type.split(";")[0].strip() not in MANIFEST_TYPES:
        return Ignored(f"not an image manifest or index ({str(media_type)[:80]})")
    media_type = media_type.split(";")[0].strip()
    if tag is None:
        return Ignored("pushed by digest, without a tag")
    if not isinstance(tag, str) or not _TAG.match(tag):
        return malformed(f"tag {str(tag)[:80]!r} is not a valid tag")
    if tag.endswith(config.suffix):
        return Ignored(f"tag ends in {config.suffix!r}: an accelerated image is never converted again")
    rule = config.rule_for(repository)
    if rule is None:
        return Ignored(f"repository {repository} is not enabled")
    if len(tag) + len(config.suffix) > MAX_TAG:
        return Ignored(
            f"tag {tag!r} plus {config.suffix!r} would be over {MAX_TAG} characters", logging.WARNING
        )
    host = config.registry or _event_host(event)
    if not host:
        return malformed("no registry host in target.url or request.host (or set registry in the config)")
    try:
        ref = Reference.parse(f"{host}/{repository}:{tag}")
    except RegistryError as e:
        return malformed(str(e))
    if ref.repository != repository:
        return malformed(f"{host!r} is not a registry host[:port], or {repository!r} not a repository name")
    event_id = event.get("id") if isinstance(event.get("id"), str) else ""
    pushed_at = parse_timestamp(event.get("timestamp")) or now_ns
    return Push(ref.host, ref.repository, digest, media_type, tag, pushed_at, rule.options(), event_id[:100])


def _event_host(event: dict) -> str | None:
    url = event["target"].get("url")
    if isinstance(url, str) and url:
        netloc = urlsplit(url).netloc
        if netloc:
            return netloc.rpartition("@")[2]
    request = event.get("request")
    if isinstance(request, dict) and isinstance(request.get("host"), str) and request["host"]:
        return request["host"]
    return None


# --- a small HTTP/1.1 server on trio and h11 ----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, value: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(value, indent=1, ensure_ascii=False).encode() + b"\n"
    return Response(status, body, "application/json", headers or [])


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


@dataclass(frozen=True)
class Limits:
    max_header: int = 16 << 10
    max_body: int = 1 << 20
    header_timeout: float = 10.0  # from the first byte of a request to the end of its head
    body_timeout: float = 30.0  # from the end of the head to the end of the body
    idle_timeout: float = 75.0  # a kept-alive connection without a new request is closed
    send_timeout: float = 30.0
    max_connections: int = 64


class _Timeout(Exception):
    def __init__(self, started: bool):
        self.started = started


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """HTTP/1.1 with keep-alive. Each request is read whole (within the limits) before `handler` runs;
    handler errors are answered 500 and logged, never closing the server."""

    def __init__(self, handler: Handler, limits: Limits | None = None):
        self.handler = handler
        self.limits = limits or Limits()
        self.active = 0

    @staticmethod
    async def listen(host: str, port: int) -> list[trio.SocketListener]:
        """Bind (raises OSError); an empty host means every interface."""
        return await trio.open_tcp_listeners(port, host=host or None)

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self.handle_connection, listeners)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        if self.active >= self.limits.max_connections:
            with trio.move_on_after(1):
                await _send_raw_close(stream, 503, "too many connections")
            await trio.aclose_forcefully(stream)
            return
        self.active += 1
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)
            while await self._exchange(conn, stream):
                conn.start_next_cycle()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
            OSError,
        ) as e:
            log.debug("connection closed", extra={"fields": {"error": str(e) or type(e).__name__}})
        except Exception:  # never let one connection stop the server
            log.exception("unexpected error on an HTTP connection")
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _next_event(self, conn: h11.Connection, stream: trio.abc.Stream, deadline: float | None) -> Any:
        """The next h11 event by `deadline`; None (waiting for a request head): the idle timeout until
        its first byte, then the header timeout from that byte on (a slow sender cannot extend it)."""
        if deadline is None and conn.trailing_data[0]:
            deadline = trio.current_time() + self.limits.header_timeout
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            limit = trio.current_time() + self.limits.idle_timeout if deadline is None else deadline
            with trio.move_on_at(limit):
                data = await stream.receive_some(65536)
                if data and deadline is None:
                    deadline = trio.current_time() + self.limits.header_timeout
                conn.receive_data(data)
                continue
            raise _Timeout(started=deadline is not None)

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, *events: Any) -> None:
        data = b"".join(conn.send(e) or b"" for e in events)
        with trio.fail_after(self.limits.send_timeout):
            await stream.send_all(data)

    async def _respond(
        self, conn: h11.Connection, stream: trio.abc.Stream, resp: Response, close: bool, head: bool = False
    ) -> None:
        headers = [
            ("Content-Type", resp.content_type),
            ("Content-Length", str(len(resp.body))),
            ("Server", "lazysnap-convertd"),
            *resp.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        events: list[Any] = [
            h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status))
        ]
        if resp.body and not head:  # a response to HEAD has the headers of GET's, and no body
            events.append(h11.Data(data=resp.body))
        events.append(h11.EndOfMessage())
        await self._send(conn, stream, *events)

    async def _exchange(self, conn: h11.Connection, stream: trio.abc.Stream) -> bool:
        """Read one request, answer it; whether the connection can carry another."""
        try:
            event = await self._next_event(conn, stream, None)
        except _Timeout as t:
            if t.started:
                await self._error(conn, stream, 408, "the request head did not arrive in time")
            return False
        except h11.RemoteProtocolError as e:
            await self._error(conn, stream, e.error_status_hint, f"bad request: {e}")
            return False
        if isinstance(event, h11.ConnectionClosed):
            return False
        if not isinstance(event, h11.Request):
            return False
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii", "replace").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            await self._error(conn, stream, 413, f"the body is over {self.limits.max_body} bytes")
            return False
        if conn.they_are_waiting_for_100_continue:
            await self._send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        deadline = trio.current_time() + self.limits.body_timeout
        try:
            while True:
                event = await self._next_event(conn, stream, deadline)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.limits.max_body:
                        await self._error(conn, stream, 413, f"the body is over {self.limits.max_body} bytes")
                        return False
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # the peer closed mid-body
                    return False
        except _Timeout:
            await self._error(conn, stream, 408, "the request body did not arrive in time")
            return False
        except h11.RemoteProtocolError as e:
            await self._error(conn, stream, e.error_status_hint, f"bad request: {e}")
            return False
        split = urlsplit(target)
        request = Request(method, split.path or "/", parse_qs(split.query), headers, bytes(body))
        try:
            response = await self.handler(request)
        except Exception:
            log.exception(
                "error answering a request", extra={"fields": {"method": method, "path": split.path}}
            )
            response = error_response(500, "internal error (see convertd's log)")
        await self._respond(conn, stream, response, close=False, head=method == "HEAD")
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _error(self, conn: h11.Connection, stream: trio.abc.Stream, status: int, message: str) -> None:
        """Answer an error and close, when a response can still be sent on this connection."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            if conn.our_state is h11.IDLE:  # no complete request head: h11 cannot frame a response
                await _send_raw_close(stream, status, message)
            else:
                await self._respond(conn, stream, error_response(status, message), close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError):
            pass


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _send_raw_close(stream: trio.abc.Stream, status: int, message: str) -> None:
    """A whole response written by hand, for errors before h11 has a request to answer."""
    body = json.dumps({"error": message}).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {_reason(status).decode()}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with trio.move_on_after(5):
        await stream.send_all(head.encode() + body)


# --- metrics ----------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in their own registry (several instances can live in one test process)."""

    OUTCOMES = ("converted", "retagged", "skipped", "failed")

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.conversions = Counter(
            "lazysnap_convertd_conversions",
            "Jobs that ended: converted (accelerated image pushed), retagged (an existing accelerated image "
            "pushed under another tag), skipped (nothing to convert), failed (after its retries)",
            ["outcome"],
            registry=r,
        )
        for outcome in self.OUTCOMES:
            self.conversions.labels(outcome)
        self.attempt_errors = Counter(
            "lazysnap_convertd_attempt_errors", "Conversion attempts that failed, retried or not", registry=r
        )
        self.duration = Histogram(
            "lazysnap_convertd_conversion_duration_seconds",
            "Wall time of successful conversions",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.bytes_in = Counter(
            "lazysnap_convertd_bytes_in", "Bytes of source layer blobs read by conversions", registry=r
        )
        self.bytes_out = Counter(
            "lazysnap_convertd_bytes_out",
            "Bytes of accelerated layer blobs written by conversions",
            registry=r,
        )
        self.queue_length = Gauge(
            "lazysnap_convertd_queue_length", "Jobs waiting to run (queued, including retries)", registry=r
        )
        self.jobs = Gauge(
            "lazysnap_convertd_jobs", "Jobs in the queue database, by state", ["state"], registry=r
        )
        self.events = Counter(
            "lazysnap_convertd_events",
            "Notification events received: accepted (queued), duplicate, ignored, malformed",
            ["result"],
            registry=r,
        )
        for result in ("accepted", "duplicate", "ignored", "malformed"):
            self.events.labels(result)
        self.requests = Counter(
            "lazysnap_convertd_http_requests",
            "HTTP requests answered, by path and status",
            ["path", "code"],
            registry=r,
        )

    def render(self, counts: dict[str, int]) -> bytes:
        for state in STATES:
            self.jobs.labels(state).set(counts.get(state, 0))
        self.queue_length.set(counts.get("queued", 0))
        return generate_latest(self.registry)


# --- the service ------------------------------------------------------------------------------------------


class Skip(Exception):
    """Nothing to convert; the message says why (the job ends as skipped)."""


_PERMANENT = (ManifestError, TarFormatError, WriterError)
_ROUTES = {
    "/events": ("POST",),
    "/healthz": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
    "/jobs": ("GET", "HEAD"),
}


class Convertd:
    """The HTTP handler and the conversion workers around one JobStore."""

    def __init__(self, config: Config, store: JobStore, metrics: Metrics | None = None):
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        self.busy: set[tuple[str, str, str]] = set()
        self._db_limiter = trio.CapacityLimiter(1)
        self._wake = trio.Event()
        self._tmp = config.state_dir / "tmp"

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a JobStore method in a worker thread (one at a time: the connection is shared)."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=self._db_limiter)

    def notify(self) -> None:
        self._wake.set()

    # --- HTTP ---------------------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        methods = _ROUTES.get(req.path)
        if methods is None:
            resp = error_response(
                404, f"no such path {req.path[:100]!r} (try /events, /jobs, /metrics, /healthz)"
            )
        elif req.method not in methods:
            resp = error_response(
                405,
                f"{req.path} takes {' or '.join(methods)}, not {req.method[:20]}",
                [("Allow", ", ".join(methods))],
            )
        elif req.path == "/events":
            resp = await self.events(req)
        elif req.path == "/jobs":
            resp = await self.jobs(req)
        elif req.path == "/metrics":
            counts = await self.db(self.store.counts)
            resp = Response(200, self.metrics.render(counts), CONTENT_TYPE_LATEST)
        else:
            try:
                await self.db(self.store.ping)
                resp = Response(200, b"ok\n", "text/plain; charset=utf-8")
            except sqlite3.Error as e:
                resp = Response(
                    503, f"the job database does not answer: {e}\n".encode(), "text/plain; charset=utf-8"
                )
        self.metrics.requests.labels(req.path if methods else "other", str(resp.status)).inc()
        return resp

    def authorized(self, req: Request) -> bool:
        secret = self.config.secret
        if secret is None:
            return True
        value = req.headers.get(self.config.secret_header.lower(), "")
        if self.config.secret_header.lower() == "authorization":
            scheme, _, token = value.partition(" ")
            value = token.strip() if scheme.lower() == "bearer" else ""
        # constant-time; the header's raw bytes (decoded as latin-1 on the way in) against UTF-8
        return hmac.compare_digest(value.encode("latin-1", "replace"), secret.encode())

    async def events(self, req: Request) -> Response:
        if not self.authorized(req):
            log.warning(
                "events refused: wrong or missing secret",
                extra={"fields": {"header": self.config.secret_header}},
            )
            challenge = [("WWW-Authenticate", 'Bearer realm="lazysnap-convertd"')]
            return error_response(401, "wrong or missing secret", challenge)
        content_type = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and "json" not in content_type and content_type != "text/plain":
            return error_response(
                415, f"expected {EVENTS_MEDIA_TYPE} (or application/json), not {content_type[:80]}"
            )
        try:
            envelope = json.loads(req.body)
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("malformed envelope", extra={"fields": {"error": str(e)[:200]}})
            return error_response(400, f"the body is not JSON: {e}")
        if not isinstance(envelope, dict) or not isinstance(envelope.get("events"), list):
            log.warning("malformed envelope: no events list")
            return error_response(400, 'expected a notification envelope: {"events": [...]}')
        pushes: list[Push] = []
        ignored = malformed = 0
        for event in envelope["events"]:
            verdict = classify(event, self.config, time.time_ns())
            if isinstance(verdict, Ignored):
                fields = _event_fields(event) | {"reason": verdict.reason}
                log.log(verdict.level, "event ignored", extra={"fields": fields})
                malformed += verdict.malformed
                ignored += not verdict.malformed
            else:
                pushes.append(verdict)
        outcomes: list[str] = []
        if pushes:
            try:
                outcomes = await self.db(self.store.enqueue, pushes, time.time())
            except (sqlite3.Error, OSError) as e:
                log.error("cannot commit events to the queue", extra={"fields": {"error": str(e)}})
                return error_response(503, "the job queue is unavailable; send the events again")
            self.notify()
        for push, outcome in zip(pushes, outcomes, strict=True):
            fields = {
                "ref": f"{push.registry}/{push.repository}:{push.tag}",
                "digest": push.digest,
                "event": push.event_id,
            }
            log.info(
                "push queued" if outcome == "accepted" else "push already known", extra={"fields": fields}
            )
        accepted = outcomes.count("accepted")
        duplicates = len(outcomes) - accepted
        for result, n in (
            ("accepted", accepted),
            ("duplicate", duplicates),
            ("ignored", ignored),
            ("malformed", malformed),
        ):
            if n:
                self.metrics.events.labels(result).inc(n)
        return json_response(
            200, {"accepted": accepted, "duplicates": duplicates, "ignored": ignored, "malformed": malformed}
        )

    async def jobs(self, req: Request) -> Response:
        state = (req.query.get("state") or [None])[0]
        if state is not None and state not in STATES:
            return error_response(400, f"state must be one of {', '.join(STATES)}")
        try:
            limit = int((req.query.get("limit") or ["100"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return error_response(400, "limit must be an integer between 1 and 1000")
        jobs = await self.db(self.store.list, state=state, limit=limit)
        counts = await self.db(self.store.counts)
        return json_response(200, {"counts": counts, "jobs": [j.as_json() for j in jobs]})

    # --- workers ------------------------------------------------------------------------------------

    async def run_workers(self) -> None:
        """Claim due jobs and run up to `concurrency` at once, forever."""
        slots = trio.Semaphore(self.config.concurrency)
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                job = await self._next_job()
                keys = {(job.registry, job.repository, t.tag) for t in job.pending_tags}
                self.busy |= keys
                nursery.start_soon(self._run, job, keys, slots)

    async def _next_job(self) -> Job:
        while True:
            self._wake = trio.Event()  # before claiming: a notify() from now on wakes the wait below
            try:
                job = await self.db(self.store.claim, time.time(), frozenset(self.busy))
                due = None if job else await self.db(self.store.next_due)
            except sqlite3.Error as e:
                log.error("cannot read the job queue", extra={"fields": {"error": str(e)}})
                job, due = None, time.time() + 5
            if job is not None:
                return job
            now = time.time()
            wait = due - now if due is not None and due > now else 60.0
            with trio.move_on_after(min(wait, 60.0)):
                await self._wake.wait()

    async def _run(self, job: Job, keys: set[tuple[str, str, str]], slots: trio.Semaphore) -> None:
        try:
            await self.attempt(job)
        except sqlite3.Error as e:  # the job stays running in the database; recovered at the next start
            log.error("cannot record a job's outcome", extra={"fields": {"job": job.id, "error": str(e)}})
        finally:
            self.busy -= keys
            slots.release()
            self.notify()

    async def attempt(self, job: Job) -> None:
        """One attempt at a claimed job; records the outcome in the queue."""
        fields = {
            "job": job.id,
            "image": f"{job.registry}/{job.repository}@{job.digest}",
            "attempt": job.attempts,
        }
        log.info("job started", extra={"fields": fields | {"tags": [t.tag for t in job.pending_tags]}})
        try:
            with trio.fail_after(self.config.job_timeout):
                outcome = await self._work(job)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self.db(self.store.release, job.id, time.time())
            raise
        except Skip as e:
            await self.db(self.store.skip, job.id, str(e), time.time())
            self.metrics.conversions.labels("skipped").inc()
            log.info("job skipped", extra={"fields": fields | {"reason": str(e)}})
            return
        except trio.TooSlowError:
            await self._failed(job, f"timed out after {self.config.job_timeout:.0f}s", False, fields)
            return
        except Exception as e:
            await self._failed(job, _describe(e), _permanent(e), fields)
            return
        state = await self.db(self.store.finish, job.id, time.time())
        self.metrics.conversions.labels(outcome).inc()
        log.info("job done", extra={"fields": fields | {"outcome": outcome, "state": state}})

    async def _failed(self, job: Job, reason: str, permanent: bool, fields: dict) -> None:
        state = await self.db(
            self.store.fail, job.id, reason, time.time(), self.config.retry, permanent=permanent
        )
        self.metrics.attempt_errors.inc()
        if state == "failed":
            self.metrics.conversions.labels("failed").inc()
            log.error("job failed", extra={"fields": fields | {"reason": reason, "permanent": permanent}})
        else:
            log.warning("attempt failed, will retry", extra={"fields": fields | {"reason": reason}})

    def _client(self) -> RegistryClient:
        """A fresh client per job: credentials and hosts.toml changes apply without a restart."""
        credentials = (
            CredentialStore(self.config.docker_config) if self.config.docker_config else CredentialStore()
        )
        return RegistryClient(hosts=HostsConfig(self.config.hosts_dir), credentials=credentials)

    async def _work(self, job: Job) -> str:
        """Convert (or only re-tag) one job; returns the outcome for the metrics."""
        await trio.to_thread.run_sync(failpoints.hit, "convertd.job-start", abandon_on_cancel=True)
        suffix = self.config.suffix
        pending = job.pending_tags
        async with self._client() as client:
            result: tuple[bytes, str] | None = None
            if job.result_digest:
                try:
                    body, _, _ = await client.get_manifest(
                        Reference(job.registry, job.repository, digest=job.result_digest)
                    )
                    result = (body, job.result_media_type or mf.OCI_MANIFEST)
                except NotFound:
                    log.warning(
                        "the accelerated image was deleted: converting again",
                        extra={"fields": {"job": job.id}},
                    )
                    await self.db(self.store.clear_result, job.id)
            outcome = "retagged"
            if result is None:
                first = pending[-1]  # the newest push
                digest, media_type = await self._convert(client, job, first)
                await self.db(self.store.tag_done, job.id, first)
                pending = pending[:-1]
                outcome = "converted"
                if pending:
                    ref = Reference(job.registry, job.repository, digest=digest)
                    result = ((await client.get_manifest(ref))[0], media_type)
            for tag in pending:
                assert result is not None
                dst = Reference(job.registry, job.repository, tag=tag.tag + suffix)
                await client.push_manifest(dst, result[0], result[1])
                await self.db(self.store.tag_done, job.id, tag)
                log.info("re-tagged", extra={"fields": {"job": job.id, "ref": str(dst)}})
        return outcome

    async def _convert(self, client: RegistryClient, job: Job, tag: Tag) -> tuple[str, str]:
        """Convert the job's image, pushed as `tag`+suffix; returns (digest, media type) of the result."""
        src = Reference(job.registry, job.repository, tag=tag.tag, digest=job.digest)
        await inspect(client, src)
        dst = Reference(job.registry, job.repository, tag=tag.tag + self.config.suffix)
        opts = job.options

        def progress(message: str) -> None:
            log.info("convert", extra={"fields": {"job": job.id, "detail": message}})
            if " MB tar -> " in message:  # a layer converted and uploaded
                failpoints.hit("convertd.layer-done")

        self._tmp.mkdir(mode=0o700, exist_ok=True)
        started = time.monotonic()
        convert: Callable[..., Awaitable[Any]] = convert_image
        if opts.get("workload"):  # the files the workload opens go first
            convert = functools.partial(optimize_image, command=opts["workload"])
        result = await convert(
            client,
            src,
            dst,
            format=opts.get("format", ESTARGZ),
            chunk_size=opts.get("chunk_size", DEFAULT_CHUNK_SIZE),
            level=opts.get("level"),
            platform=opts.get("platform"),
            all_platforms=bool(opts.get("all_platforms")),
            tmpdir=self._tmp,
            log=progress,
        )
        seconds = time.monotonic() - started
        converted = [layer for layer in result.layers if layer.action == "converted"]
        bytes_in = sum(layer.source_size for layer in converted)
        bytes_out = sum(layer.size for layer in converted)
        self.metrics.duration.observe(seconds)
        self.metrics.bytes_in.inc(bytes_in)
        self.metrics.bytes_out.inc(bytes_out)
        await self.db(
            self.store.set_result,
            job.id,
            result.digest,
            result.media_type,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            seconds=seconds,
        )
        log.info(
            "converted",
            extra={
                "fields": {
                    "job": job.id,
                    "ref": str(dst),
                    "digest": result.digest,
                    "layers": len(converted),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "seconds": seconds,
                }
            },
        )
        return result.digest, result.media_type


async def inspect(client: RegistryClient, ref: Reference) -> None:
    """Raise Skip when the image needs no conversion: deleted, not a container image, or every layer
    already carries a TOC annotation (our own output, or an image accelerated elsewhere)."""
    try:
        body, media_type, _ = await client.get_manifest(ref)
    except NotFound:
        raise Skip(f"{ref.digest} is no longer in {ref.name} (deleted before it was converted)") from None
    doc, kind = mf.parse(body, media_type, str(ref))
    if kind not in mf.INDEXES:
        _inspect_manifest(doc, str(ref))
        return
    entries = [e for e in doc["manifests"] if not ATTESTATION.matches(e.get("platform") or {})]
    if not entries:
        raise Skip("the index lists no image manifests")
    skips = []
    for entry in entries:
        child = ref.with_digest(entry["digest"])
        body, media_type, _ = await client.get_manifest(child)
        child_doc, child_kind = mf.parse(body, media_type, str(child))
        if child_kind in mf.INDEXES:
            raise ManifestError(f"{child}: nested indexes are not supported")
        try:
            _inspect_manifest(child_doc, str(child))
        except Skip as e:
            skips.append(str(e))
            continue
        return  # at least one manifest to convert
    raise Skip(
        "every manifest of the index: " + "; ".join(dict.fromkeys(s.split(": ", 1)[-1] for s in skips))
    )


def _inspect_manifest(doc: dict, what: str) -> None:
    config_type = doc["config"].get("mediaType")
    if config_type not in IMAGE_CONFIGS or doc.get("artifactType"):
        kind = doc.get("artifactType") or config_type
        raise Skip(f"{what}: not a container image (an artifact of type {str(kind)[:100]!r})")
    layers = [layer for layer in doc["layers"] if layer.get("mediaType") not in FOREIGN]
    if not layers:
        raise Skip(f"{what}: no layers to convert")
    if all(expected_toc_digest(layer.get("annotations")) for layer in layers):
        raise Skip(f"{what}: already accelerated (every layer has a TOC annotation)")


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and current not in out and len(out) < 20:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _permanent(e: BaseException) -> bool:
    """Errors that another attempt cannot fix: a malformed or unsupported manifest, a damaged layer."""
    return any(isinstance(x, _PERMANENT) for x in _chain(e))


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if not isinstance(e, ConvertError | RegistryError):
        text = f"{type(e).__name__}: {text}"
    return text[:2000]


def _event_fields(event: Any) -> dict[str, Any]:
    if not isinstance(event, dict):
        return {}
    target = event.get("target") if isinstance(event.get("target"), dict) else {}
    return {
        k: str(v)[:200]
        for k, v in (
            ("action", event.get("action")),
            ("repository", target.get("repository")),
            ("tag", target.get("tag")),
            ("digest", target.get("digest")),
            ("media_type", target.get("mediaType")),
        )
        if v is not None
    }


# --- process ----------------------------------------------------------------------------------------------


class StartError(RuntimeError):
    """convertd cannot start; the message says why."""


def _prepare_state(config: Config) -> tuple[Any, JobStore]:
    """Create the state dir (0700), take its lock, empty tmp/ (layers of interrupted conversions), open
    the queue."""
    state = config.state_dir
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        lock = open(state / "convertd.lock", "w")  # held (flock) for the life of the process
    except OSError as e:
        raise StartError(f"cannot use the state dir {state}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StartError(f"another convertd is using the state dir {state}") from None
    tmp = state / "tmp"
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700, exist_ok=True)
    try:
        store = JobStore(state / "jobs.db")
    except QueueError as e:
        lock.close()
        raise StartError(str(e)) from None
    return lock, store


async def serve(config: Config) -> int:
    """Run convertd until SIGTERM or SIGINT; running conversions are given back to the queue."""
    lock, store = _prepare_state(config)
    try:
        recovered = store.recover(time.time(), config.retry)
        if recovered:
            log.warning(
                "jobs interrupted by the last stop are queued again", extra={"fields": {"jobs": recovered}}
            )
        app = Convertd(config, store)
        server = HttpServer(app.handle, Limits(max_body=config.max_body))
        host, port = config.address
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                listeners = await server.listen(host, port)
            except OSError as e:
                raise StartError(f"cannot listen on {config.listen}: {e.strerror or e}") from None
            bound = [listener.socket.getsockname() for listener in listeners]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve, listeners)
                nursery.start_soon(app.run_workers)
                log.info(
                    "convertd listening",
                    extra={
                        "fields": {
                            "addresses": [f"{a[0]}:{a[1]}" for a in bound],
                            "state_dir": str(config.state_dir),
                            "registry": config.registry or "(from events)",
                            "repositories": [r.name for r in config.repositories],
                            "secret": "required" if config.secret else "none",
                        }
                    },
                )
                if not config.secret:
                    log.warning(
                        "no secret configured: anyone who can reach the listen address can queue jobs"
                    )
                if not config.repositories:
                    log.warning("no [[repositories]] configured: every event will be ignored")
                async for signum in signals:
                    log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
                    nursery.cancel_scope.cancel()
                    break
    finally:
        store.close()
        lock.close()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `lazysnap convertd`."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration (see the docs)")
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"override listen (default {DEFAULT_LISTEN})")
    parser.add_argument(
        "--state-dir", type=Path, metavar="DIR", help=f"override state_dir ({DEFAULT_STATE_DIR})"
    )
    parser.add_argument("--log-level", choices=list(logs.LEVELS), help="override log_level (default info)")


def run(args: argparse.Namespace) -> int:
    """`lazysnap convertd`: 0 after SIGTERM/SIGINT, 2 for a bad configuration, 1 when it cannot start."""
    try:
        config = load_config(args.config) if args.config else Config()
        overrides: dict[str, Any] = {}
        if args.listen:
            parse_listen(args.listen)
            overrides["listen"] = args.listen
        if args.state_dir:
            overrides["state_dir"] = args.state_dir.absolute()
        if args.log_level:
            overrides["log_level"] = args.log_level
        if overrides:
            config = dataclasses.replace(config, **overrides)
    except (ConfigError, ValueError) as e:
        print(f"lazysnap convertd: {e}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        failpoints.load_from_environment()
        return trio.run(serve, config)
    except (StartError, ValueError) as e:
        print(f"lazysnap convertd: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lazysnap convertd",
        description="Convert images pushed to enabled repositories into accelerated ones, driven by the "
        "registry's notifications.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
