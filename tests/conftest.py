"""Fixtures shared by every test tier: real services started per test, stopped by PID, and a
session-wide check that nothing (process, mount, temp dir) is left behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.auth import TestPKI, TokenIssuer
from tests.harness.containerd import Containerd
from tests.harness.procs import mounts_under, pids_with_cmdline, running_services, unmount_all
from tests.harness.registry import Registry
from tests.harness.snapshotter import Lazysnap, Mounts

TMP_PREFIX = "lzs-test-"
_workdirs: list[Path] = []  # every temp dir this test process made


def _needs_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (run the suite as root, as `make test` does)")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temp dir under /tmp (unix socket paths must stay under 108 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    _workdirs.append(path)
    yield path
    unmount_all(path)
    shutil.rmtree(path)


@pytest.fixture
def registry_factory(workdir: Path) -> Iterator[Callable[..., Registry]]:
    """make(config=..., record=...) -> a started registry; all are stopped after the test."""
    started: list[Registry] = []

    def make(**kw) -> Registry:
        reg = Registry(workdir / f"registry{len(started)}", **kw)
        started.append(reg)
        return reg.start()

    yield make
    for reg in started:
        reg.stop()


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    return registry_factory()


@pytest.fixture
def pki(workdir: Path) -> TestPKI:
    """A throwaway CA issuing server, client and token-signing certificates."""
    return TestPKI(workdir / "pki")


@pytest.fixture
def issuer_factory(workdir: Path, pki: TestPKI) -> Iterator[Callable[..., TokenIssuer]]:
    """make(**TokenIssuer kwargs) -> a started registry token issuer; all are stopped after the test."""
    started: list[TokenIssuer] = []

    def make(**kw) -> TokenIssuer:
        kw.setdefault("pki", pki)
        issuer = TokenIssuer(workdir / f"issuer{len(started)}", **kw)
        started.append(issuer)
        return issuer.start()

    yield make
    for issuer in started:
        issuer.stop()


@pytest.fixture
def containerd_factory(workdir: Path) -> Iterator[Callable[..., Containerd]]:
    """make(cri=..., snapshotter_socket=...) -> a started containerd; all are stopped after the test."""
    _needs_root("containerd")
    started: list[Containerd] = []

    def make(**kw) -> Containerd:
        c = Containerd(workdir / f"containerd{len(started)}", **kw)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def containerd(containerd_factory: Callable[..., Containerd]) -> Containerd:
    return containerd_factory()


@pytest.fixture
def snapshotter_factory(workdir: Path) -> Iterator[Callable[..., Lazysnap]]:
    """make(**Lazysnap kwargs) -> a started `lazysnap serve`; all are stopped after the test."""
    started: list[Lazysnap] = []

    def make(**kw) -> Lazysnap:
        kw.setdefault("name", f"lazysnap{len(started)}" if started else "lazysnap")
        snap = Lazysnap(workdir, **kw)
        started.append(snap)
        return snap.start()

    yield make
    for snap in started:
        snap.stop()


@pytest.fixture
def snapshotter(snapshotter_factory: Callable[..., Lazysnap]) -> Lazysnap:
    """`lazysnap serve` on <workdir>/lazysnap.sock with its state root in <workdir>/lazysnap."""
    return snapshotter_factory()


@pytest.fixture
def lazysnap_containerd(snapshotter: Lazysnap, containerd_factory: Callable[..., Containerd]) -> Containerd:
    """containerd whose proxy plugin `lazysnap` dials the `snapshotter` fixture (started first)."""
    return containerd_factory(snapshotter_socket=snapshotter.address)


@pytest.fixture
def mounter(workdir: Path) -> Iterator[Mounts]:
    """Mounts snapshots for the test (`mounter.mount(mounts, target)`); unmounts them afterwards."""
    _needs_root("mounting snapshots")
    tracker = Mounts(workdir)
    yield tracker
    tracker.unmount_all()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Fail the session if a test left a service running, a mount, or one of our temp dirs."""
    yield
    problems = [f"process still running: {s.name} (pid {s.pid})" for s in running_services()]
    for d in _workdirs:
        # anything whose command line names the dir: containerd shims, daemons started by a daemon
        problems += [f"process still running: pid {pid} ({d})" for pid in pids_with_cmdline(str(d))]
        problems += [f"still mounted: {m}" for m in mounts_under(d)]
        if d.exists():
            problems.append(f"temp dir left behind: {d}")
    assert not problems, "tests left things behind:\n" + "\n".join(problems)
