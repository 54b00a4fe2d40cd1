"""The shaped network's pure parts: tc rates, the registry's access log and the traffic it adds up to;
and the delay proxy on loopback (it adds the round trip it is asked for, passes data and half-closes
through, and stops when its parent is gone)."""

from __future__ import annotations

import time

import pytest
import trio

from bench import network as net


@pytest.mark.parametrize(
    "text, rate, bits",
    [
        ("100mbit", "100mbit", 100e6),
        ("1Gbit", "1gbit", 1e9),
        ("500kbit", "500kbit", 500e3),
        ("12.5mbps", "12.5mbps", 100e6),
        ("unlimited", None, None),
    ],
)
def test_rates(text, rate, bits):
    assert net.parse_rate(text) == rate
    assert net.rate_bits_per_second(rate) == bits


@pytest.mark.parametrize("text", ["100", "fast", "100 mbit", "-1mbit", "10mb"])
def test_bad_rates(text):
    with pytest.raises(ValueError, match="tc rate"):
        net.parse_rate(text)


LOG = """\
time="2026-01-01T00:00:00Z" level=info msg="listening on 10.213.0.2:5000"
10.213.0.1 - - [01/Jan/2026:00:00:01 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "containerd/1.6.20"
10.213.0.1 - - [01/Jan/2026:00:00:01 +0000] "HEAD /v2/bench/x/manifests/t HTTP/1.1" 200 - "" "ctr"
10.213.0.1 - - [01/Jan/2026:00:00:01 +0000] "GET /v2/bench/x/manifests/sha256:{d} HTTP/1.1" 200 900 "" "ctr"
10.213.0.1 - - [01/Jan/2026:00:00:02 +0000] "GET /v2/bench/x/blobs/sha256:{d} HTTP/1.1" 200 1000000 "" "ctr"
10.213.0.1 - - [01/Jan/2026:00:00:02 +0000] "GET /v2/bench/x/blobs/sha256:{d} HTTP/1.1" 206 4096 "" "lazysnap"
10.213.0.1 - - [01/Jan/2026:00:00:02 +0000] "HEAD /v2/bench/x/blobs/sha256:{d} HTTP/1.1" 200 - "" "lazysnap"
""".replace("{d}", "a" * 64)


def test_access_log_and_traffic():
    lines = net.parse_access_log(LOG)
    assert [(x.method, x.status, x.bytes) for x in lines] == [
        ("GET", 200, 2),
        ("HEAD", 200, 0),
        ("GET", 200, 900),
        ("GET", 200, 1_000_000),
        ("GET", 206, 4096),
        ("HEAD", 200, 0),
    ]
    traffic = net.Traffic.from_lines(lines, wire_bytes=1_100_000)
    assert traffic == net.Traffic(
        registry_bytes=1_004_998,
        blob_bytes=1_004_096,
        requests=6,
        blob_requests=2,
        range_requests=1,
        wire_bytes=1_100_000,
    )


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


async def _round_trip(port: int, payload: bytes) -> tuple[float, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        start = trio.current_time()
        await stream.send_all(payload)
        await stream.send_eof()
        received = bytearray()
        first: float | None = None
        while data := await stream.receive_some(65536):
            first = first or trio.current_time()
            received += data
        assert first is not None
        return first - start, bytes(received)


async def test_delay_proxy_adds_the_round_trip():
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        echo_port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, _echo, listeners)
        direct, _ = await _round_trip(echo_port, b"ping")
        port = await nursery.start(net.serve_delay_proxy, ("127.0.0.1", 0), ("127.0.0.1", echo_port), 80.0)
        delayed, echoed = await _round_trip(port, b"ping")
        assert 0.08 <= delayed < direct + 0.5
        payload = bytes(range(256)) * 8000  # 2 MB: many chunks, in order, and the half-close passes
        _, echoed = await _round_trip(port, payload)
        assert echoed == payload
        nursery.cancel_scope.cancel()


async def test_delay_proxy_stops_by_itself():
    started = time.monotonic()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: net.serve_delay_proxy(
                    ("127.0.0.1", 0), ("127.0.0.1", 9), 10.0, max_seconds=0.2, task_status=task_status
                )
            )
    assert time.monotonic() - started < 5
    with trio.fail_after(10):
        # a parent that is not ours: it returns at the first check
        await net.serve_delay_proxy(("127.0.0.1", 0), ("127.0.0.1", 9), 10.0, parent=1 << 22)


# --- teardown is idempotent (issue 13) ------------------------------------------------------------


class _FakeIp:
    """`ip` for close(): the namespace is gone already, and the host's veth is still listed for a
    moment while the kernel removes it with its peer (`ip link del` then says Cannot find device)."""

    def __init__(self, netns: str, veth: str):
        self.netns, self.veth = netns, veth
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str, check: bool = True):
        import subprocess

        self.calls.append(args)
        if args[:2] == ("netns", "list"):
            return subprocess.CompletedProcess(args, 0, "", "")
        if args[:3] == ("-o", "link", "show"):
            return subprocess.CompletedProcess(args, 0, f"7: {self.veth}@if6: <BROADCAST> mtu 1500\n", "")
        if args[:2] == ("netns", "del"):
            return subprocess.CompletedProcess(
                args,
                1,
                "",
                f'Cannot remove namespace file "/run/netns/{self.netns}": No such file or directory\n',
            )
        if args[:2] == ("link", "del"):
            return subprocess.CompletedProcess(args, 1, "", f'Cannot find device "{self.veth}"\n')
        raise AssertionError(f"unexpected ip {args}")


def test_close_treats_what_is_already_gone_as_removed(tmp_path, monkeypatch):
    reg = net.ShapedRegistry(tmp_path / "w", tmp_path / "s")
    reg._created_netns = reg._created_veth = True
    fake = _FakeIp(reg.netns, reg.host_if)
    monkeypatch.setattr(net, "_ip", fake)
    reg.close()  # no NetworkError: the link and the namespace are gone, as wanted
    assert ("link", "del", reg.host_if) in fake.calls and ("netns", "del", reg.netns) in fake.calls
    reg.close()  # and again: nothing left to do
    assert fake.calls.count(("link", "del", reg.host_if)) == 1


def test_close_still_reports_what_it_could_not_remove(tmp_path, monkeypatch):
    import subprocess

    reg = net.ShapedRegistry(tmp_path / "w", tmp_path / "s")
    reg._created_veth = True
    fake = _FakeIp(reg.netns, reg.host_if)

    def busy(*args: str, check: bool = True):
        if args[:2] == ("link", "del"):
            return subprocess.CompletedProcess(args, 2, "", "RTNETLINK answers: Device or resource busy\n")
        return fake(*args, check=check)

    monkeypatch.setattr(net, "_ip", busy)
    with pytest.raises(
        net.NetworkError, match=f"ip link del {reg.host_if}: RTNETLINK answers: Device or resource busy"
    ):
        reg.close()
