"""What real registries and CDNs do wrong, served by our own misbehaving registry: each is handled as
specified, with the right bytes or a clear error, and never a hang."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from fuse.registry import (
    DigestMismatch,
    ProtocolViolation,
    Reference,
    RegistryClient,
    Unavailable,
)
from tests.harness.badregistry import BadRegistry, Faults
from tests.harness.images import pseudo_random
from tests.harness.registry import anonymous_client

DATA = pseudo_random(1 << 20, seed=3)
SPANS = [(0, 100), (5000, 200), (len(DATA) - 10, 10)]
WANT = [DATA[o : o + n] for o, n in SPANS]


@pytest.fixture
def bad_registry() -> Iterator[Callable[..., BadRegistry]]:
    started: list[BadRegistry] = []

    def make(**faults) -> BadRegistry:
        reg = BadRegistry(faults=Faults(**faults)).start()
        started.append(reg)
        return reg

    yield make
    for reg in started:
        reg.stop()


def client(workdir: Path, **options) -> RegistryClient:
    opts = {"backoff_base": 0.01, "backoff_max": 0.1, "deadline": 20.0} | options
    return anonymous_client(**opts)


def blob_gets(reg: BadRegistry) -> list[tuple]:
    return [r for r in reg.requests("GET") if "/blobs/" in r[1]]


async def test_server_ignoring_range(bad_registry, workdir: Path) -> None:
    reg = bad_registry(ignore_range=True)
    digest = reg.add_blob(DATA)
    ref = Reference.parse(f"{reg.host}/{reg.repo}:x")
    async with client(workdir) as c:
        assert await c.read_ranges(ref, digest, SPANS) == WANT
        assert await c.read_ranges(ref, digest, SPANS) == WANT
    ranges = [r[2] for r in blob_gets(reg)]
    # one multi-range attempt answered 200, then single ranges only, also for the second read
    assert sum("," in (r or "") for r in ranges) == 1
    assert len(ranges) == 1 + 2 * len(SPANS)


@pytest.mark.parametrize("status", [400, 501])
async def test_multi_range_refused(bad_registry, workdir: Path, status: int) -> None:
    reg = bad_registry(multi_range_status=status)
    digest = reg.add_blob(DATA)
    ref = Reference.parse(f"{reg.host}/{reg.repo}:x")
    async with client(workdir) as c:
        assert await c.read_ranges(ref, digest, SPANS) == WANT
        assert await c.read_ranges(ref, digest, SPANS[:2]) == WANT[:2]
    assert [r[3] for r in blob_gets(reg)] == [status, 206, 206, 206, 206, 206]


async def test_multi_range_served(bad_registry, workdir: Path) -> None:
    reg = bad_registry()
    digest = reg.add_blob(DATA)
    async with client(workdir) as c:
        assert await c.read_ranges(Reference.parse(f"{reg.host}/{reg.repo}:x"), digest, SPANS) == WANT
    assert len(blob_gets(reg)) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_transient_errors_are_retried(bad_registry, workdir: Path, status: int) -> None:
    reg = bad_registry(fail_first=2, fail_status=status)
    digest = reg.add_blob(DATA)
    async with client(workdir) as c:
        assert await c.read_range(Reference.parse(f"{reg.host}/{reg.repo}:x"), digest, 10, 20) == DATA[10:30]
    assert [r[3] for r in blob_gets(reg)] == [status, status, 206]


async def test_429_honours_retry_after(bad_registry, workdir: Path) -> None:
    reg = bad_registry(fail_first=1, fail_status=429, retry_after="1")
    digest = reg.add_blob(DATA)
    async with client(workdir) as c:
        start = trio.current_time()
        assert await c.read_range(Reference.parse(f"{reg.host}/{reg.repo}:x"), digest, 0, 5) == DATA[:5]
        assert trio.current_time() - start >= 0.95  # backoff alone would have been <= 0.1 s


async def test_connection_reset_mid_body(bad_registry, workdir: Path) -> None:
    reg = bad_registry(reset_first=1)
    digest = reg.add_blob(DATA)
    async with client(workdir) as c:
        assert (
            await c.read_range(Reference.parse(f"{reg.host}/{reg.repo}:x"), digest, 0, 500_000)
            == DATA[:500_000]
        )
    assert len(blob_gets(reg)) == 2


async def test_stalled_body_times_out_and_retries(bad_registry, workdir: Path) -> None:
    reg = bad_registry(stall_first=1, stall_seconds=5)
    digest = reg.add_blob(DATA)
    async with client(workdir, request_timeout=0.5) as c:
        start = trio.current_time()
        assert (
            await c.read_range(Reference.parse(f"{reg.host}/{reg.repo}:x"), digest, 0, 100_000)
            == DATA[:100_000]
        )
        assert trio.current_time() - start < 3


async def test_wrong_content_range_is_an_error(bad_registry, workdir: Path) -> None:
    reg = bad_registry(wrong_content_range=True)
    digest = reg.add_blob(DATA)
    async with client(workdir) as c:
        with pytest.raises(ProtocolViolation, match="did not contain requested bytes 100-199"):
            await c.read_range(Reference.parse(f"{reg.host}/{reg.repo}:x"), digest, 100, 100)


async def test_redirects_are_cached_and_re_resolved(bad_registry, workdir: Path) -> None:
    reg = bad_registry(redirect=True, redirect_uses=3)
    digest = reg.add_blob(DATA)
    ref = Reference.parse(f"{reg.host}/{reg.repo}:x")
    async with client(workdir) as c:
        for i in range(7):
            assert await c.read_range(ref, digest, i * 100, 50) == DATA[i * 100 : i * 100 + 50]
    registry_gets = [r for r in reg.requests("GET", f"/v2/{reg.repo}/blobs/")]
    storage = [r for r in reg.requests("GET", "/storage/")]
    # 7 reads: 3 per storage URL, each URL used until it answers 403 -> 3 registry round trips
    assert len(registry_gets) == 3
    assert [r[3] for r in storage].count(403) == 2
    assert [r[3] for r in storage].count(206) == 7


async def test_deadline_bounds_an_unavailable_registry(bad_registry, workdir: Path) -> None:
    reg = bad_registry(fail_first=10_000, fail_status=503)
    digest = reg.add_blob(DATA)
    async with client(workdir, deadline=1.5, max_attempts=1000) as c:
        start = trio.current_time()
        with pytest.raises(Unavailable, match="within 2s"):
            await c.read_range(Reference.parse(f"{reg.host}/{reg.repo}:x"), digest, 0, 5)
        assert trio.current_time() - start < 2.5


async def test_unreachable_registry_fails_after_retries(workdir: Path) -> None:
    from tests.harness.procs import free_port

    async with client(workdir, max_attempts=3) as c:
        with pytest.raises(Unavailable, match="failed 3 times.*ConnectError"):
            await c.read_range(Reference.parse(f"127.0.0.1:{free_port()}/a/b:x"), "sha256:" + "0" * 64, 0, 5)


async def test_digest_mismatches(bad_registry, workdir: Path) -> None:
    reg = bad_registry()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": "sha256:" + "1" * 64, "size": 2},
            "layers": [],
        }
    ).encode()
    lying = "sha256:" + "2" * 64
    reg.manifests[lying] = (manifest, "application/vnd.oci.image.manifest.v1+json")
    reg.blobs[lying] = b"not what the digest says"
    async with client(workdir) as c:
        ref = Reference.parse(f"{reg.host}/{reg.repo}@{lying}")
        with pytest.raises(DigestMismatch, match="manifest"):
            await c.resolve(ref)
        with pytest.raises(DigestMismatch, match="blob"):
            await c.get_blob(ref, lying)


# --- size lies: a server claiming or streaming more than was asked ------------------------------------------

GIB3 = 3 << 30
CHILD_MEMORY = 1 << 30  # RLIMIT_AS of the client process: a client that believed the server dies of it
SENT_BOUND = 64 << 20  # what socket buffers can hold on loopback, with margin; 3 GiB is what a drain sends
_CHILD = """
import json, sys, trio
from fuse.registry import Reference
from tests.harness.registry import anonymous_client

async def main(host, repo, digest, offset, length):
    async with anonymous_client() as c:  # the default deadline: failing fast must be the client's doing
        ref = Reference.parse(f"{host}/{repo}:x")
        try:
            data = await c.read_range(ref, digest, int(offset), int(length))
        except Exception as e:
            return {"error": type(e).__name__, "message": str(e)}
        return {"data": data.hex()}

print(json.dumps(trio.run(main, *sys.argv[1:])))
"""


def read_in_child(reg: BadRegistry, digest: str, offset: int, length: int) -> tuple[dict, float]:
    """read_range in a child process whose address space is capped; (its answer, seconds it took)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))

    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, reg.host, reg.repo, digest, str(offset), str(length)],
        capture_output=True,
        text=True,
        timeout=150,
        preexec_fn=limit,
        cwd=Path(__file__).parents[2],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout), time.monotonic() - start


def test_a_content_range_claiming_gigabytes_is_refused_unread(bad_registry) -> None:
    reg = bad_registry(claim_bytes=GIB3)
    digest = reg.add_blob(DATA)
    answer, seconds = read_in_child(reg, digest, 100, 100)
    assert answer["error"] == "ProtocolViolation", answer
    assert reg.host in answer["message"] and f"bytes 100-{100 + GIB3 - 1}/" in answer["message"]
    assert "more than the 100 bytes asked for" in answer["message"]
    assert seconds < 10 and reg.sent < SENT_BOUND


def test_a_200_to_a_range_request_keeps_only_the_asked_bytes(bad_registry) -> None:
    """A server ignoring Range: the client reads up to the last byte it wants (it has to) but keeps
    only the wanted ones, and stops there although the server claims 3 GiB."""
    reg = bad_registry(whole_bytes=GIB3)
    digest = reg.add_blob(DATA)
    offset = CHILD_MEMORY - len(DATA)  # buffering the prefix would not fit in the child
    answer, _ = read_in_child(reg, digest, offset, 16)
    filler = bytes((offset - len(DATA) + i) % 256 for i in range(16))
    assert answer == {"data": filler.hex()}
    assert reg.sent < offset + SENT_BOUND


def test_a_token_service_streaming_gigabytes_is_refused(bad_registry) -> None:
    reg = bad_registry(token_bytes=GIB3)
    digest = reg.add_blob(DATA)
    answer, seconds = read_in_child(reg, digest, 0, 5)
    assert answer["error"] == "Unauthorized", answer
    assert re.search(rf"{reg.host} sent over \d+ bytes, more than the 262144 bytes", answer["message"])
    assert seconds < 10 and reg.sent < SENT_BOUND


async def test_the_head_of_a_range_is_handed_over_before_the_rest(bad_registry, workdir: Path) -> None:
    # the body stalls half way (then the connection resets and the read is retried): the head the
    # caller asked for early is in its hands during the stall, long before the read ends
    reg = bad_registry(stall_first=1, stall_seconds=1)
    digest = reg.add_blob(DATA)
    heads: list[tuple[float, bytes]] = []
    async with client(workdir, request_timeout=5) as c:
        start = trio.current_time()
        got = await c.read_ranges(
            Reference.parse(f"{reg.host}/{reg.repo}:x"),
            digest,
            [(1000, 200_000)],
            (4096, lambda head: heads.append((trio.current_time() - start, head))),
        )
        took = trio.current_time() - start
    assert got == [DATA[1000:201_000]]
    assert heads and all(head == DATA[1000:5096] for _, head in heads)
    assert heads[0][0] < 0.5 <= 1.0 <= took


async def test_suffix_reads_need_no_size_and_check_what_comes_back(bad_registry, workdir: Path) -> None:
    """`read_suffix` (a layer's footer before its manifest says the size): the last n bytes and the size;
    a whole small blob where the server ignores the Range; an error where it sends more or other bytes."""
    reg = bad_registry()
    digest, small = reg.add_blob(DATA), reg.add_blob(DATA[:1000])
    ref = Reference.parse(f"{reg.host}/{reg.repo}:x")
    async with client(workdir) as c:
        assert await c.read_suffix(ref, digest, 4096) == (DATA[-4096:], len(DATA))
        assert await c.read_suffix(ref, small, 4096) == (DATA[:1000], 1000)
    assert [r[2] for r in blob_gets(reg)] == ["bytes=-4096", "bytes=-4096"]
    ignoring = bad_registry(ignore_range=True)
    digest, small = ignoring.add_blob(DATA), ignoring.add_blob(DATA[:1000])
    ref = Reference.parse(f"{ignoring.host}/{ignoring.repo}:x")
    async with client(workdir) as c:
        assert await c.read_suffix(ref, small, 4096) == (DATA[:1000], 1000)
        with pytest.raises(ProtocolViolation, match="more than the 4096 bytes asked for"):
            await c.read_suffix(ref, digest, 4096)
    shifted = bad_registry(wrong_content_range=True)
    digest = shifted.add_blob(DATA)
    async with client(workdir) as c:
        with pytest.raises(ProtocolViolation, match="Content-Range .bytes 1044481-1048576"):
            await c.read_suffix(Reference.parse(f"{shifted.host}/{shifted.repo}:x"), digest, 4096)
