"""convertd's per-repository `workload`: parsed and checked with the line, carried in the job's options
(through the queue), and a job with one is converted by `optimize_image` with the workload and the
repository's options; jobs without one still go to `convert_image`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fuse.registry import RegistryClient
from snapshotter.convert.converter import ConvertResult
from snapshotter.convertd import service as convertd
from snapshotter.convertd.config import Config, ConfigError, RepositoryRule, load_config
from snapshotter.convertd.events import classify
from snapshotter.convertd.jobs import JobStore, Push
from snapshotter.convertd.service import Convertd

DIGEST = "sha256:" + "d" * 64
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_workload_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "convertd.toml"
    path.write_text(
        '[[repositories]]\nname = "team/web"\nworkload = "nginx -t"\nformat = "zstd-chunked"\n\n'
        '[[repositories]]\nname = "**"\n'
    )
    cfg = load_config(path)
    assert cfg.repositories == (
        RepositoryRule("team/web", "zstd-chunked", workload="nginx -t"),
        RepositoryRule("**"),
    )
    assert cfg.repositories[0].options()["workload"] == "nginx -t"
    assert "workload" not in cfg.repositories[1].options()  # options as before for everyone else

    for value, message in [("5", "must be a string"), ('" "', "must not be empty")]:
        path.write_text(f'[[repositories]]\nname = "a"\nworkload = {value}\n')
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert f"line 3: repositories[0].workload: {message}" in str(e.value)


def push_event() -> dict:
    return {
        "id": "e1",
        "action": "push",
        "target": {
            "mediaType": OCI_MANIFEST,
            "digest": DIGEST,
            "repository": "team/web",
            "url": f"http://r:5000/v2/team/web/manifests/{DIGEST}",
            "tag": "v1",
        },
    }


async def test_a_job_with_a_workload_is_optimized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = (RepositoryRule("team/web", workload="cat /etc/a", level=9), RepositoryRule("**"))
    service = Convertd(Config(state_dir=tmp_path, repositories=rules), JobStore(tmp_path / "jobs.db"))
    calls: list[tuple[str, tuple, dict[str, Any]]] = []

    def fake(name: str):
        async def convert(client, src, dst, *args: Any, **kwargs: Any) -> ConvertResult:
            calls.append((name, (str(src), str(dst), *args), kwargs))
            return ConvertResult(str(src), str(dst), "sha256:" + "e" * 64, OCI_MANIFEST, [], 0.1)

        return convert

    async def inspect(client, ref) -> None:
        pass

    pushed: list[str] = []  # manifests pushed besides the converter's own (the digest tag)

    async def get_manifest(self, ref) -> tuple[bytes, str, str]:
        return b"{}", OCI_MANIFEST, "sha256:" + "e" * 64

    async def push_manifest(self, ref, body, media_type) -> str:
        pushed.append(str(ref))
        return "sha256:" + "e" * 64

    monkeypatch.setattr(RegistryClient, "get_manifest", get_manifest)
    monkeypatch.setattr(RegistryClient, "push_manifest", push_manifest)
    monkeypatch.setattr(convertd, "optimize_image", fake("optimize"))
    monkeypatch.setattr(convertd, "convert_image", fake("convert"))
    monkeypatch.setattr(convertd, "inspect", inspect)
    push = classify(push_event(), service.config, time.time_ns())
    assert isinstance(push, Push) and push.options["workload"] == "cat /etc/a"
    other = Push("r:5000", "team/api", "sha256:" + "f" * 64, OCI_MANIFEST, "v1", 1, rules[1].options())
    service.store.enqueue([push, other], time.time())
    for _ in range(2):
        job = service.store.claim(time.time())
        assert job is not None
        await service.attempt(job)
    assert service.store.counts()["done"] == 2
    assert sorted(pushed) == [  # pods pinned to the source digest find the accelerated copy too
        "r:5000/team/api:sha256-" + "f" * 64 + "_accelerated",
        "r:5000/team/web:sha256-" + DIGEST.split(":")[1] + "_accelerated",
    ]

    (name, args, kwargs), (other_name, other_args, _) = sorted(calls, key=lambda c: c[0], reverse=True)
    assert name == "optimize" and args == ("r:5000/team/web:v1@" + DIGEST, "r:5000/team/web:v1_accelerated")
    assert kwargs["command"] == "cat /etc/a" and kwargs["level"] == 9 and kwargs["tmpdir"] == tmp_path / "tmp"
    assert other_name == "convert" and other_args[1] == "r:5000/team/api:v1_accelerated"
