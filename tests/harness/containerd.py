"""A real containerd 1.6 with its own root, state and sockets in a temp dir, and lazysnap as a proxy plugin.

It never touches the system instance: every path containerd writes is under `workdir`, except the ones
containerd 1.6 hard-codes (shim sockets under /run/containerd/s, empty cgroup directories named after
the namespace), which `stop()` removes. Tests use their own namespace (`lzs-<random>`), so its cgroup
directories are known. `ctr()` / `ctr_remote()` run the clients against this instance; `run()` runs a
container with its runc state and IO FIFOs inside workdir.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .cri import CriClient
from .procs import Service, kill_pids, pids_with_cmdline, unmount_all

RUN_DIR = Path("/run/containerd")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class CommandError(AssertionError):
    """A ctr/ctr-remote command failed; the message carries its output."""


class Containerd:
    def __init__(
        self,
        workdir: Path,
        *,
        snapshotter_socket: Path | None = None,
        plugin_name: str = "lazysnap",
        cri: bool = False,
        cri_snapshotter: str | None = None,
        hosts_dir: Path | None = None,
    ):
        self.workdir = workdir
        self.address = workdir / "containerd.sock"
        self.snapshotter_socket = snapshotter_socket or workdir / "lazysnap.sock"
        self.plugin_name = plugin_name
        self.cri = cri
        self.cri_snapshotter = cri_snapshotter or plugin_name
        self.hosts_dir = hosts_dir  # CRI's registry config_path (containerd's certs.d layout)
        self.namespace = f"lzs-{secrets.token_hex(4)}"
        self.config_path = workdir / "config.toml"
        self.service = Service(
            "containerd", ["containerd", "--config", str(self.config_path)], workdir / "containerd.log"
        )
        self._namespaces = {self.namespace}
        self._run_dir_before: set[Path] | None = None

    def config_text(self) -> str:
        w = self.workdir
        lines = [
            "version = 2",
            f'root = "{w}/root"',
            f'state = "{w}/state"',
            "disabled_plugins = []" if self.cri else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{w}/opt"',
            f"[proxy_plugins.{self.plugin_name}]",
            '  type = "snapshot"',
            f'  address = "{self.snapshotter_socket}"',
        ]
        if self.cri:
            lines += [
                '[plugins."io.containerd.grpc.v1.cri"]',
                f'  root = "{w}/cri"',
                f'  state = "{w}/cri-state"',
                '[plugins."io.containerd.grpc.v1.cri".containerd]',
                f'  snapshotter = "{self.cri_snapshotter}"',
                "  disable_snapshot_annotations = false",
                '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
                '  runtime_type = "io.containerd.runc.v2"',
                '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
                f'  Root = "{w}/runc"',
                '[plugins."io.containerd.grpc.v1.cri".registry]',
                f'  config_path = "{self.hosts_dir or w / "certs.d"}"',
                '[plugins."io.containerd.grpc.v1.cri".cni]',
                f'  bin_dir = "{w}/cni/bin"',
                f'  conf_dir = "{w}/cni/conf"',
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._run_dir_before = _listing(RUN_DIR)
        self.config_path.write_text(self.config_text())
        self.service.start()
        self.service.wait_ready(self._answers, timeout=30, what="serving on its socket")
        return self

    def _answers(self) -> bool:
        if not self.address.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.address))
        return (
            subprocess.run(["ctr", "-a", str(self.address), "version"], capture_output=True).returncode == 0
        )

    def plain_http(self, registry_host: str) -> None:
        """Let CRI pulls reach a plain-HTTP registry (hosts.toml in the CRI registry config_path)."""
        d = (self.hosts_dir or self.workdir / "certs.d") / registry_host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(f'server = "http://{registry_host}"\n')

    def cri_client(self) -> CriClient:
        """A CRI client on this containerd's socket (CRI must be enabled: cri=True)."""
        return CriClient(str(self.address))

    # --- clients -------------------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 300,
        tool: str = "ctr",
    ) -> subprocess.CompletedProcess[str]:
        ns = namespace or self.namespace
        self._namespaces.add(ns)
        argv = [tool, "-a", str(self.address), "-n", ns, *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise CommandError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def wait_snapshotter(self, name: str, timeout: float = 30) -> None:
        """Wait until containerd reaches snapshotter `name` again: its proxy connection to a restarted
        snapshotter backs off for a few seconds (documented)."""
        deadline = time.monotonic() + timeout
        while self.ctr("snapshots", "--snapshotter", name, "ls", check=False).returncode != 0:
            assert time.monotonic() < deadline, f"containerd did not reconnect to the restarted {name}"
            time.sleep(0.5)

    def ctr_remote(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.ctr(*args, tool="ctr-remote", **kw)

    def run(
        self,
        image: str,
        *command: str,
        snapshotter: str | None = None,
        name: str | None = None,
        extra: Sequence[str] = (),
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm` a container to completion; runc state and FIFOs stay inside workdir."""
        args = [
            "run",
            "--rm",
            "--runc-root",
            str(self.workdir / "runc"),
            "--fifo-dir",
            str(self.workdir / "fifo"),
        ]
        if snapshotter:
            args += ["--snapshotter", snapshotter]
        args += [*extra, image, name or f"c-{secrets.token_hex(4)}", *command]
        return self.ctr(*args, check=check, timeout=timeout)

    # --- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove containers and tasks, stop containerd and its shims, unmount, remove what it left."""
        try:
            if self.service.alive():
                self._remove_containers()
        finally:
            self.service.stop(grace=15)
            kill_pids(pids_with_cmdline(f"-address {self.address}"))  # shims outlive containerd
            unmount_all(self.workdir)
            self._remove_leftovers()

    def _remove_containers(self) -> None:
        for ns in sorted(self._namespaces):
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False)
                self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False)
            for c in self.ctr("containers", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("containers", "delete", c, namespace=ns, check=False)

    def _remove_leftovers(self) -> None:
        if self._run_dir_before is not None:
            for path in sorted(
                _listing(RUN_DIR) - self._run_dir_before, key=lambda p: len(p.parts), reverse=True
            ):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for ns in self._namespaces:
            for d in [*CGROUP_ROOT.glob(f"*/{ns}"), CGROUP_ROOT / ns]:
                _rmdir_empty_tree(d)


def _listing(root: Path) -> set[Path]:
    if not root.exists():
        return set()
    out = {root}
    for dirpath, dirnames, filenames in os.walk(root):
        out.update(Path(dirpath, n) for n in dirnames + filenames)
    return out


def _rmdir_empty_tree(d: Path) -> None:
    """cgroup directories can only be rmdir'ed, children first; busy ones stay (and a test will say so)."""
    if not d.is_dir():
        return
    for dirpath, _dirnames, _ in sorted(os.walk(d), key=lambda t: len(t[0]), reverse=True):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
