"""systemd's service protocols as lazysnap speaks them: the notification wire format (`sdnotify.notify`,
checked against a socket reading it as systemd does), LISTEN_FDS handling, and `lazysnap supervise`
driving a real service through crashes: descriptors kept across restarts and deduplicated, dropped on
POLLHUP or FDSTOREREMOVE, MAINPID hand-over to a grandchild, SIGTERM passed on as SIGINT."""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from snapshotter import sdnotify
from tests.harness.snapshotter import lazysnap_command


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    msg, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", data[: len(data) - len(data) % 4])
    return msg, fds


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_systemds_wire_format_with_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"lazysnap-test-{os.getpid()}-{time.monotonic_ns()}"
        server.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        server.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    kept = tmp_path / "kept"
    kept.write_bytes(b"state")
    fd = os.open(kept, os.O_RDONLY)
    try:
        assert sdnotify.notify({"FDSTORE": "1", "FDNAME": "lazysnap-fuse"}, [fd])
        msg, fds = receive(server)
        assert msg == b"FDSTORE=1\nFDNAME=lazysnap-fuse\n"
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
        assert os.pread(fds[0], 5, 0) == b"state"
        os.close(fds[0])
        assert sdnotify.notify({"READY": "1"})
        assert receive(server) == (b"READY=1\n", [])
    finally:
        os.close(fd)
        server.close()
    assert sdnotify.parse_message(b"READY=1\nSTATUS=a=b\ngarbage\n=x\n") == {"READY": "1", "STATUS": "a=b"}
    with pytest.raises(ValueError):
        sdnotify.format_message({"STATUS": "two\nlines"})


def test_notify_without_a_manager_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify({"READY": "1"}) is False


def test_listen_fds_ignores_what_was_meant_for_another_process() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "LISTEN_PID": str(os.getpid() + 1)}
    assert sdnotify.listen_fds(env) == []
    assert env == {}  # consumed: children do not take them for theirs
    env = {"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())}
    assert sdnotify.listen_fds(env) == [] and env == {}
    assert [sdnotify.valid_fdname(n) for n in ("lazysnap-fuse", "a:b", "", "x" * 256, "sp ace")] == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert sdnotify.listen_environment(["a", "b"], 42) == {
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "a:b",
        "LISTEN_PID": "42",
    }


# The service under supervision: logs what it was handed, then acts by generation (its start count).
SERVICE = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    from snapshotter import sdnotify
    log = sys.argv[1]
    handed = sdnotify.listen_fds()
    contents = []
    for name, fd in handed:
        try:
            contents.append(f"{name}={os.pread(fd, 64, 0).decode()}")
        except OSError:
            contents.append(f"{name}=?")
    generation = sum(1 for line in open(log) if line.startswith("start")) + 1 if os.path.exists(log) else 1
    def write(text):
        with open(log, "a") as f:
            f.write(text + "\\n")
    write(f"start gen={generation} pid={os.getpid()} fds={','.join(sorted(contents)) or '-'}")
    signal.signal(signal.SIGINT, lambda *a: (write(f"SIGINT gen={generation}"), os._exit(0)))
    signal.signal(signal.SIGTERM, lambda *a: (write(f"SIGTERM gen={generation}"), os._exit(0)))
    if generation == 1:
        state = os.memfd_create("state")
        os.write(state, b"kept")
        ours, theirs = socket.socketpair()
        sdnotify.notify({"FDSTORE": "1", "FDNAME": "state"}, [state])
        sdnotify.notify({"FDSTORE": "1", "FDNAME": "peer"}, [theirs.fileno()])  # POLLHUP when we die
    elif generation == 2:
        for name, fd in handed:
            sdnotify.notify({"FDSTORE": "1", "FDNAME": name}, [fd])  # the same again: deduplicated
    elif generation == 3:  # hand over to a child, which becomes the main process
        if os.fork() == 0:
            sdnotify.notify({"MAINPID": str(os.getpid())})
            write(f"successor pid={os.getpid()}")
            while True:
                time.sleep(1)
        time.sleep(0.5)
        os._exit(0)
    elif generation == 4:
        sdnotify.notify({"FDSTOREREMOVE": "1", "FDNAME": "state"})
    sdnotify.notify({"READY": "1"})
    while True:
        time.sleep(1)
    """
)


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def wait_for(log: Path, prefix: str, count: int = 1, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in lines(log) if line.startswith(prefix)]
        if len(found) >= count:
            return found[count - 1]
        assert time.monotonic() < deadline, f"no {prefix!r} #{count} in:\n" + "\n".join(lines(log))
        time.sleep(0.05)


def pid_of(line: str) -> int:
    return int(next(p for p in line.split() if p.startswith("pid=")).split("=")[1])


def test_supervise_keeps_descriptors_across_crashes_and_hands_over(tmp_path: Path) -> None:
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    log = tmp_path / "service.log"
    supervisor = subprocess.Popen(
        [*lazysnap_command(), "supervise", "--", sys.executable, str(script), str(log)],
        stderr=open(tmp_path / "supervise.log", "w"),
    )
    try:
        first = wait_for(log, "start", 1)
        assert first.endswith("fds=-")
        time.sleep(0.3)  # its notifications are in
        os.kill(pid_of(first), signal.SIGKILL)
        second = wait_for(log, "start", 2)
        # the memfd came back with its content; the socket's peer died with gen 1: dropped (POLLHUP)
        assert second.endswith("fds=state=kept"), second
        time.sleep(0.3)
        os.kill(pid_of(second), signal.SIGKILL)
        third = wait_for(log, "start", 3)
        assert third.endswith("fds=state=kept"), third  # stored twice by gen 2, kept once
        successor = pid_of(wait_for(log, "successor"))
        time.sleep(1.0)  # gen 3 has exited; its child is the main process now (reparented to us)
        assert supervisor.poll() is None and len([x for x in lines(log) if x.startswith("start")]) == 3
        os.kill(successor, signal.SIGKILL)  # the new main process crashes: a restart
        fourth = wait_for(log, "start", 4)
        assert fourth.endswith("fds=state=kept"), fourth
        time.sleep(0.3)  # FDSTOREREMOVE is in
        os.kill(pid_of(fourth), signal.SIGKILL)
        fifth = wait_for(log, "start", 5)
        assert fifth.endswith("fds=-"), fifth
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 0
        assert lines(log)[-1] == "SIGINT gen=5"  # stop for good: the service is told with SIGINT
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
    text = (tmp_path / "supervise.log").read_text()
    assert "dropped descriptor peer: its connection ended" in text, text
    assert "main process is now pid" in text


def test_supervise_refuses_a_missing_command(tmp_path: Path) -> None:
    p = subprocess.run([*lazysnap_command(), "supervise"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "give the command" in p.stderr
    p = subprocess.run(
        [*lazysnap_command(), "supervise", "--", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert p.returncode == 2 and "command not found" in p.stderr
