"""`lazysnap convertd` as a test service, and the registry calls its tests need.

:class:`Convertd` writes a TOML config into the test's workdir (state dir there too), starts
``lazysnap convertd --config FILE`` on a free loopback port as a :class:`Service`, waits for
``/healthz``, and stops it by PID (SIGTERM; :meth:`Convertd.kill` for a crash). Its log (logfmt, debug)
is ``<workdir>/<name>.log``. :meth:`Convertd.registry_config` is the ``notifications`` configuration
that makes a registry from ``registry_factory(config=...)`` send its events to it.

The helpers at the bottom talk to the registry directly (tags, manifests, DELETE), plain HTTP.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .procs import Service, free_port

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


def to_toml(config: Mapping[str, Any]) -> str:
    """A small TOML writer for convertd configs: scalars, one level of tables, arrays of tables.
    None values are left out. JSON string escapes are valid TOML basic-string escapes."""
    lines: list[str] = []
    tables: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return json.dumps(value, ensure_ascii=False)

    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables += [f"{k} = {scalar(v)}" for k, v in value.items() if v is not None]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                tables.append(f"\n[[{key}]]")
                tables += [f"{k} = {scalar(v)}" for k, v in item.items() if v is not None]
        else:
            lines.append(f"{key} = {scalar(value)}")
    return "\n".join(lines + tables) + "\n"


class Convertd:
    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "convertd",
        repositories: Sequence[Mapping[str, Any]] = ({"name": "**"},),
        secret: str | None = "convertd-test-secret",
        registry: str | None = None,
        retry: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.workdir = workdir
        self.name = name
        self.port = free_port()
        self.secret = secret
        self.state_dir = workdir / name
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "state_dir": str(self.state_dir),
            "log_level": "debug",
            "registry": registry,
            "secret": secret,
            **(extra or {}),
            "retry": dict(retry or {"attempts": 3, "backoff": "0.2s", "max_backoff": "1s"}),
            "repositories": [dict(r) for r in repositories],
        }
        self.service = Service(
            name,
            [str(Path(sys.executable).parent / "lazysnap"), "convertd", "--config", str(self.config_path)],
            self.log_path,
            env=dict(env or {}),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def registry_config(self, secret: str | None = None) -> dict[str, Any]:
        """The registry configuration (distribution 2.8) that sends notifications here, with the shared
        secret (or `secret`) as `Authorization: Bearer ...`."""
        endpoint: dict[str, Any] = {
            "name": self.name,
            "url": f"{self.url}/events",
            "timeout": "2s",
            "threshold": 5,
            "backoff": "1s",
        }
        token = secret if secret is not None else self.secret
        if token is not None:
            endpoint["headers"] = {"Authorization": [f"Bearer {token}"]}  # http.Header: a map of lists
        return {"notifications": {"endpoints": [endpoint]}}

    def start(self, env: Mapping[str, str] | None = None) -> Convertd:
        """Start (again), with `env` replacing the extra environment of this run; wait for /healthz."""
        self.config_path.write_text(to_toml(self.config))
        if env is not None:
            self.service.env = dict(env)
        self.service.start()
        self.service.wait_ready(self._healthy, timeout=20, what="answering /healthz")
        return self

    def _healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        return self.service.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash; returns once the process is gone."""
        proc = self.service.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def alive(self) -> bool:
        return self.service.alive()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP --------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one request on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post_events(
        self,
        envelope: Any,
        *,
        secret: str | None = None,
        content_type: str = EVENTS_MEDIA_TYPE,
        raw: bytes | None = None,
        timeout: float = 10,
    ) -> tuple[int, Any]:
        """POST an envelope (or `raw` bytes) to /events with the right secret unless another is given;
        (status, decoded JSON answer)."""
        headers = {"Content-Type": content_type}
        token = secret if secret is not None else self.secret
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = raw if raw is not None else json.dumps(envelope).encode()
        status, _, answer = self.request("POST", "/events", body, headers, timeout)
        return status, json.loads(answer) if answer else None

    def auth(self) -> dict[str, str]:
        """The header carrying the shared secret (as the registry sends it), if there is one."""
        return {"Authorization": f"Bearer {self.secret}"} if self.secret else {}

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        query = f"?state={state}" if state else ""
        status, _, body = self.request("GET", "/jobs" + query, headers=self.auth())
        assert status == 200, body
        return json.loads(body)["jobs"]

    def job_for(self, repository: str, digest: str) -> dict[str, Any] | None:
        return next((j for j in self.jobs() if j["repository"] == repository and j["digest"] == digest), None)

    def metrics(self) -> dict[str, float]:
        """Samples by name with labels, e.g. 'lazysnap_convertd_conversions_total{outcome="converted"}'."""
        status, _, body = self.request("GET", "/metrics")
        assert status == 200, body
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out

    def wait_job(
        self, repository: str, digest: str, states: Sequence[str] = ("done",), timeout: float = 30
    ) -> dict[str, Any]:
        """The job of repository@digest once it is in one of `states` (fails with the log tail)."""

        def check() -> dict[str, Any] | None:
            job = self.job_for(repository, digest)
            return job if job and job["state"] in states else None

        return wait_for(check, timeout, f"job {repository}@{digest} {'/'.join(states)}", self)


def wait_for(check: Callable[[], Any], timeout: float, what: str, convertd: Convertd | None = None) -> Any:
    """Poll check() until it returns something true; fail with convertd's log tail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "\n" + convertd.service.log_tail(30) if convertd else ""
            raise AssertionError(f"not {what} after {timeout:.0f}s{tail}")
        time.sleep(0.1)


# --- the registry, directly -------------------------------------------------------------------------


def registry_tags(registry_url: str, repository: str) -> set[str]:
    try:
        with urllib.request.urlopen(f"{registry_url}/v2/{repository}/tags/list", timeout=10) as r:
            return set(json.loads(r.read()).get("tags") or [])
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return set()
        raise


def get_manifest(registry_url: str, repository: str, reference: str) -> tuple[dict, str, str]:
    """(document, media type, digest) of a manifest by tag or digest."""
    req = urllib.request.Request(
        f"{registry_url}/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read()), r.headers["Content-Type"], r.headers["Docker-Content-Digest"]


def delete_manifest(registry_url: str, repository: str, digest: str) -> int:
    req = urllib.request.Request(f"{registry_url}/v2/{repository}/manifests/{digest}", method="DELETE")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def wait_tag(
    registry_url: str, repository: str, tag: str, timeout: float, convertd: Convertd | None = None
) -> None:
    wait_for(
        lambda: tag in registry_tags(registry_url, repository),
        timeout,
        f"{repository}:{tag} pushed",
        convertd,
    )
