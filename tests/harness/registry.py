"""A real registry (Debian's docker-registry, CNCF distribution 2.8) on a free loopback port.

Storage lives in the test's temp dir; the process is stopped by PID. Two records of traffic:
- `access_log()`: what the registry itself answered (method, path, status, bytes sent), parsed from its
  combined-format access log;
- `requests()`: what clients asked for, including the Range header, captured by a transparent relay
  (`HttpRecorder`) that sits in front of the registry when `record=True` (plain HTTP only).
Extra configuration (auth: htpasswd or token, http.tls, notifications, proxy: remoteurl) is deep-merged
into the base config, so variants need no new fixture code.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuse.registry import CredentialStore, HostsConfig, Options, RegistryClient

from .httprecorder import HttpRecorder, RecordedRequest
from .procs import Service, free_port, port_open

_ACCESS = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-)"
)
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class AccessEntry:
    method: str
    path: str
    status: int
    bytes: int

    @property
    def blob(self) -> tuple[str, str] | None:
        """(repository, digest) when this was a blob request."""
        m = _BLOB_PATH.match(self.path.split("?")[0])
        return (m["repo"], m["digest"]) if m else None


class Registry:
    def __init__(self, workdir: Path, *, config: dict[str, Any] | None = None, record: bool = True):
        self.workdir = workdir
        self.port = free_port()
        self.config = _merge(
            {
                "version": 0.1,
                "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
                "storage": {
                    "filesystem": {"rootdirectory": str(workdir / "storage")},
                    "delete": {"enabled": True},
                },
                "http": {"addr": f"127.0.0.1:{self.port}", "secret": "lazysnap-tests"},
            },
            config or {},
        )
        self.tls = "tls" in self.config["http"]
        if record and self.tls:
            raise ValueError("the request recorder relays plain HTTP only: use record=False with TLS")
        self.recorder = HttpRecorder(("127.0.0.1", self.port)) if record else None
        self.service = Service("docker-registry", [], workdir / "registry.log")

    @property
    def host(self) -> str:
        """host:port that clients should use (the recorder's when recording)."""
        return f"127.0.0.1:{self.recorder.port if self.recorder else self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.yml"
        cfg.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        self.service.argv = ["docker-registry", "serve", str(cfg)]
        self.service.start()
        self.service.wait_ready(self._answers, what="answering /v2/")
        if self.recorder:
            self.recorder.start()
        return self

    def stop(self) -> None:
        if self.recorder:
            self.recorder.stop()
        self.service.stop()

    def _answers(self) -> bool:
        if self.tls:
            return port_open(self.port)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=1) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401  # auth configured: answering is what counts
        except OSError:
            return False

    # --- what the registry answered -------------------------------------------------------------

    def access_log(self) -> list[AccessEntry]:
        """What the registry answered. It logs a request just after its response, so with the recorder
        this waits (up to 5 s) until every request the recorder relayed has its line."""
        deadline = time.monotonic() + 5
        while True:
            entries = self._read_access_log()
            if (
                not self.recorder
                or len(entries) >= len(self.recorder.requests)
                or time.monotonic() > deadline
            ):
                return entries
            time.sleep(0.02)

    def _read_access_log(self) -> list[AccessEntry]:
        entries = []
        for line in self.service.log_path.read_text(errors="replace").splitlines():
            if m := _ACCESS.match(line):
                size = 0 if m["bytes"] == "-" else int(m["bytes"])
                entries.append(AccessEntry(m["method"], m["path"], int(m["status"]), size))
        return entries

    def blob_gets(self, digest: str | None = None) -> list[AccessEntry]:
        """GETs of blobs (whole or ranged), optionally of one digest."""
        return [
            e
            for e in self.access_log()
            if e.method == "GET" and e.blob and (digest is None or e.blob[1] == digest)
        ]

    def blob_bytes_sent(self, digest: str | None = None) -> int:
        return sum(e.bytes for e in self.blob_gets(digest))

    # --- what clients asked for (recorder) ------------------------------------------------------

    def requests(self) -> list[RecordedRequest]:
        if not self.recorder:
            raise RuntimeError("this registry was started with record=False")
        return list(self.recorder.requests)

    def ranges_requested(self, digest: str) -> list[tuple[int, int | None]]:
        """Every byte range asked of one blob, in request order (a whole-blob GET is (0, None))."""
        out: list[tuple[int, int | None]] = []
        for r in self.requests():
            m = _BLOB_PATH.match(r.path.split("?")[0])
            if r.method == "GET" and m and m["digest"] == digest:
                out.extend(r.byte_ranges() or [(0, None)])
        return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def anonymous_client(**options: Any) -> RegistryClient:
    """lazysnap's registry client with no credentials and no hosts configuration (test registries are
    plain HTTP on loopback); `options` are `fuse.registry.Options` fields."""
    return RegistryClient(
        hosts=HostsConfig(None),
        credentials=CredentialStore(Path("/nonexistent/config.json")),
        options=Options(**options),
    )
