"""The registry fixture is a real registry, and its traffic records tell the truth."""

from __future__ import annotations

import hashlib

import httpx

from tests.harness.registry import Registry


def _upload(client: httpx.Client, repo: str, data: bytes, *, chunked_body: bool = False) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    body = iter([data[: len(data) // 2], data[len(data) // 2 :]]) if chunked_body else data
    sep = "&" if "?" in location else "?"
    r = client.put(f"{location}{sep}digest={digest}", content=body)
    assert r.status_code == 201, r.text
    return digest


def test_ranges_and_bytes_are_recorded(registry: Registry) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB
    with httpx.Client(base_url=registry.url) as client:
        digest = _upload(client, "lzs/blob", blob, chunked_body=True)  # chunked request body, same connection
        url = f"/v2/lzs/blob/blobs/{digest}"
        single = client.get(url, headers={"Range": "bytes=100-199"})
        suffix = client.get(url, headers={"Range": "bytes=-51"})
        multi = client.get(url, headers={"Range": "bytes=0-9,1000-1009"})
        whole = client.get(url)

    assert (single.status_code, single.content) == (206, blob[100:200])
    assert single.headers["content-range"] == f"bytes 100-199/{len(blob)}"
    assert (suffix.status_code, suffix.content) == (206, blob[-51:])
    assert multi.status_code == 206 and multi.headers["content-type"].startswith("multipart/byteranges")
    assert whole.content == blob

    assert registry.ranges_requested(digest) == [(100, 199), (-51, None), (0, 9), (1000, 1009), (0, None)]
    gets = registry.blob_gets(digest)
    assert [(g.status, g.bytes) for g in gets[:2]] == [(206, 100), (206, 51)]
    assert gets[-1].status == 200 and gets[-1].bytes == len(blob)
    assert registry.blob_bytes_sent(digest) == sum(g.bytes for g in gets)
    # Nothing else of that blob was fetched: the upload's PUT is not a GET.
    assert len(gets) == 4


def test_unrecorded_variant_and_config_merge(registry_factory) -> None:
    reg = registry_factory(record=False, config={"storage": {"maintenance": {"readonly": {"enabled": True}}}})
    assert reg.host == f"127.0.0.1:{reg.port}"
    with httpx.Client(base_url=reg.url) as client:
        assert client.get("/v2/").status_code == 200
        # the merged read-only setting reached the real registry: uploads are refused
        assert client.post("/v2/lzs/ro/blobs/uploads/").status_code == 405
    assert reg.access_log()[-1].status == 405
