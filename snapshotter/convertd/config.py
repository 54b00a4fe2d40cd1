"""convertd's configuration: the ``Config`` and ``RepositoryRule`` dataclasses, loading and checking the
TOML file (every error names the file, the line and the reason), and the small parsers it uses (listen
addresses, repository globs; sizes and durations are `snapshotter.settings`'s, as for every command). The
file's format is described in ``snapshotter.convertd.service``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuse.formats.spec import ESTARGZ, FORMATS
from fuse.registry import ManifestError, Platform, Reference, RegistryError
from snapshotter import logs
from snapshotter.convert.image import SUFFIX
from snapshotter.convert.writer import DEFAULT_CHUNK_SIZE, WriteOptions, WriterError
from snapshotter.convertd.jobs import RetryPolicy
from snapshotter.errors import ConfigError
from snapshotter.settings import line_of, parse_duration, parse_size, read_toml

DEFAULT_LISTEN = "127.0.0.1:8089"
DEFAULT_STATE_DIR = "/var/lib/lazysnap/convertd"
_SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_GLOB = re.compile(r"^[a-z0-9._/*?-]+\Z")


@dataclass(frozen=True)
class RepositoryRule:
    """Repositories whose name matches `name` (a glob) are converted with these options."""

    name: str
    format: str = ESTARGZ
    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int | None = None
    all_platforms: bool = False
    platform: str | None = None
    workload: str | None = None  # a command: converted with snapshotter.convert.optimize.optimize_image
    mode: str = "convert"  # MODES: push <tag>_accelerated, publish a SOCI index beside it, or both

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
        if self.mode != "convert":
            options["mode"] = self.mode
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


class _Loader:
    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def error(
        self, reason: str, key: str | None, table: str | None = None, index: int | None = None
    ) -> ConfigError:
        line = line_of(self.text, table, index, key)
        if line is None and key is not None and table is not None:
            line = line_of(self.text, table, index, None)
        if line is None and table is not None:
            line = line_of(self.text, None, None, table)  # an inline table
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
_REPO_KEYS = {"name", "format", "chunk_size", "level", "all_platforms", "platform", "workload", "mode"}
MODES = ("convert", "index", "both")  # a repository's pushes: converted, indexed (lazysnap index), or both


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
    text, data = read_toml(path)
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
    if "mode" in data:
        values["mode"] = _typed(ld, data, "mode", str, "a string", t, i)
        if values["mode"] not in MODES:
            raise ld.error(f"must be one of {', '.join(MODES)}", "mode", t, i)
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
