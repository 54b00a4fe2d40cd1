"""Registry endpoints from containerd's hosts configuration (the `certs.d` layout).

For a registry host, `<config_path>/<host>/hosts.toml` lists mirrors (`[host."https://m"]`, tried in
file order) and the origin (`server`, tried last), each with `capabilities` (pull, resolve, push),
`ca`, `client`, `skip_verify`, `header` and `override_path`, as containerd 1.6 reads them. The host
directory is `host_port_` or `host:port` for a host with a port, then `_default`. A directory without
hosts.toml contributes Docker-style certificate files (`*.crt` CAs, `*.cert`/`*.key` client pairs).
Without any configuration the origin is `https://<host>`, except Docker Hub (registry-1.docker.io) and
loopback hosts (localhost, 127.0.0.0/8, ::1), which are plain HTTP.
"""

from __future__ import annotations

import ipaddress
import logging
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .reference import DOCKER_HUB

log = logging.getLogger("lazysnap.registry")
CAPABILITIES = frozenset({"pull", "resolve", "push"})


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "http" or "https"
    host: str  # host[:port] to connect to
    path: str  # API root: "/v2" unless override_path
    capabilities: frozenset[str] = CAPABILITIES
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()  # (cert, key or None when in the cert file)
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False  # not the origin: containerd adds ?ns=<registry host> to its requests
    registry: str = ""  # the registry host this endpoint serves, as in the image reference

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    def url(self, repository: str, kind: str, obj: str = "") -> str:
        """URL of /<repository>/<kind>/<obj> under this endpoint's API root."""
        tail = f"/{repository}/{kind}/{obj}" if obj else f"/{repository}/{kind}/"
        return self.base_url.rstrip("/") + tail

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass
class HostsConfig:
    """Reads hosts configuration for any registry host; None means defaults only. `plain_http` makes
    unconfigured registries plain HTTP (like `ctr --plain-http`); hosts.toml entries keep their scheme."""

    config_path: Path | None = None
    plain_http: bool = False
    _cache: dict[str, list[Endpoint]] = field(default_factory=dict)

    def endpoints(self, registry_host: str) -> list[Endpoint]:
        if registry_host not in self._cache:
            endpoints = load_endpoints(registry_host, self.config_path)
            if self.plain_http:
                endpoints = [
                    replace(e, scheme="http") if not e.mirror and e == _default_origin(registry_host) else e
                    for e in endpoints
                ]
            self._cache[registry_host] = endpoints
        return self._cache[registry_host]


def load_endpoints(registry_host: str, config_path: Path | None) -> list[Endpoint]:
    """The endpoints to try for a registry host, mirrors first, origin last."""
    directory = _host_directory(config_path, registry_host) if config_path else None
    if directory is None:
        return [_default_origin(registry_host)]
    hosts_file = directory / "hosts.toml"
    if not hosts_file.is_file():
        return [_with_cert_files(_default_origin(registry_host), directory)]
    try:
        doc = tomllib.loads(hosts_file.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{hosts_file}: cannot read hosts configuration: {e}") from e
    mirrors_table = doc.get("host", {})
    if not isinstance(mirrors_table, dict):
        raise ConfigError(f'{hosts_file}: `host` must be a table of [host."URL"] sections')
    endpoints = [
        _parse_endpoint(url, section, directory, hosts_file, registry_host, mirror=True)
        for url, section in mirrors_table.items()
    ]
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise ConfigError(f"{hosts_file}: `server` must be a URL string")
    if not server:
        origin = _default_origin(registry_host)
        server = f"{origin.scheme}://{origin.host}"
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    endpoints.append(_parse_endpoint(server, top, directory, hosts_file, registry_host, mirror=False))
    return endpoints


def is_loopback(host: str) -> bool:
    if host.startswith("["):  # "[::1]" or "[::1]:5000"
        name = host[1 : host.find("]")]
    else:  # "localhost", "127.0.0.1:5000", "::1"
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _default_origin(registry_host: str) -> Endpoint:
    if registry_host == DOCKER_HUB:
        return Endpoint("https", "registry-1.docker.io", "/v2", registry=registry_host)
    scheme = "http" if is_loopback(registry_host) else "https"
    return Endpoint(scheme, registry_host, "/v2", registry=registry_host)


def _host_directory(root: Path, host: str) -> Path | None:
    candidates = []
    idx = host.rfind(":")
    if idx > 0 and not host.endswith("]"):
        candidates.append(root / f"{host[:idx]}_{host[idx + 1 :]}_")
    candidates += [root / host, root / "_default"]
    return next((c for c in candidates if c.is_dir()), None)


def _with_cert_files(origin: Endpoint, directory: Path) -> Endpoint:
    cas = tuple(sorted(directory.glob("*.crt")))
    clients = []
    for cert in sorted(directory.glob("*.cert")):
        key = cert.with_suffix(".key")
        clients.append((cert, key if key.exists() else None))
    return Endpoint(**{**origin.__dict__, "ca": cas, "client": tuple(clients)})


def _parse_endpoint(
    server: str, section: Any, base: Path, source: Path, registry_host: str, *, mirror: bool
) -> Endpoint:
    where = f"{source}: [host.{server!r}]" if mirror else f"{source}: server {server!r}"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(section) - {"capabilities", "ca", "client", "skip_verify", "header", "override_path"}
    if unknown:  # containerd ignores keys it does not know (newer versions add some): so do we
        log.warning("%s: ignoring keys lazysnap does not use: %s", where, ", ".join(sorted(unknown)))
    if not server.startswith(("http://", "https://")):
        server = "https://" + server
    scheme, _, rest = server.partition("://")
    host, slash, path = rest.partition("/")
    if not host:
        raise ConfigError(f"{where}: no host in the URL")
    override = _bool(section.get("override_path", False), f"{where}: override_path")
    path = "/" + path.strip("/") if slash and path.strip("/") else ""
    if not override and not path.endswith("/v2"):
        path += "/v2"
    caps = section.get("capabilities", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ConfigError(f"{where}: capabilities must be a list of strings")
    caps = caps or sorted(CAPABILITIES)  # as containerd: an empty list means all of them
    bad = {c.lower() for c in caps} - CAPABILITIES
    if bad:
        raise ConfigError(f"{where}: unknown capabilities {sorted(bad)} (allowed: pull, resolve, push)")
    return Endpoint(
        scheme=scheme,
        host=host,
        path=path,
        capabilities=frozenset(c.lower() for c in caps),
        ca=tuple(_abs(p, base) for p in _strings(section.get("ca", []), f"{where}: ca")),
        client=_client_pairs(section.get("client", []), base, where),
        skip_verify=_bool(section.get("skip_verify", False), f"{where}: skip_verify"),
        headers=_headers(section.get("header", {}), where),
        mirror=mirror,
        registry=registry_host,
    )


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(f"{where}: must be a string or a list of strings")


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false")
    return value


def _client_pairs(value: Any, base: Path, where: str) -> tuple[tuple[Path, Path | None], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"{where}: client must be a path, a list of paths or a list of [cert, key]")
    pairs: list[tuple[Path, Path | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(item, base), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_abs(item[0], base), _abs(item[1], base)))
        else:
            raise ConfigError(f"{where}: invalid client entry {item!r}: a path or [cert, key]")
    return tuple(pairs)


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: header must be a table")
    out = []
    for name, v in value.items():
        out += [(name, s) for s in _strings(v, f"{where}: header {name!r}")]
    return tuple(out)


def _abs(p: str, base: Path) -> Path:
    path = Path(p)
    return path if path.is_absolute() else base / path
