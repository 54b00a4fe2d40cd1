"""Test images made by real tools, not by our own tar writer: umoci (layers with a `./` root entry,
whiteouts umoci computes itself), GNU tar (`tar -C rootfs -c .`: `./` entries, GNU long names and long
link targets), and their accelerated copies made by `lazysnap convert`, ctr-remote and skopeo.

The rootfs is small: busybox-static and a handful of entries that real layers carry and that our own
writer once let through unnoticed (see :func:`populate_rootfs`). A second layer deletes and adds files
(a whiteout) and, in the GNU tar image, holds a symlink whose tar header mode is not 0777.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness import images as im
from tests.harness.accelerate import ctr_remote_convert, skopeo_zstd_chunked
from tests.harness.containerd import Containerd
from tests.harness.registry import Registry

BUSYBOX = Path("/bin/busybox")
LONG_DIR = "usr/share/" + "a-rather-long-directory-name-" * 3  # with a file below: a path over 100 bytes
LONG_FILE = "data/" + "long-file-name-" * 8  # 125 bytes: a GNU LongLink ('L') header
LONG_TARGET = "../" + LONG_FILE  # a symlink target over 100 bytes: a GNU LongLink ('K') header
# the second layer deletes these (a whiteout each) and adds NEW_FILE
DELETED = ("etc/motd", "data/gone")
NEW_FILE = "etc/version"
# GNU tar's --mode for the second layer: its symlink gets header mode 0755, not the 0777 of lstat
ODD_SYMLINK = "etc/odd-link"


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run(argv, capture_output=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{what}: `{' '.join(argv)}` exited {p.returncode}:\n{p.stdout!r}{p.stderr!r}")
    return p


def _write(root: Path, rel: str, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    path.chmod(mode)


def populate_rootfs(root: Path) -> None:
    """The first layer's tree: busybox and its shell, a GNU long name and a long symlink target, a hard
    link, a setuid file, a 0700 directory, files and a directory owned by uid 1000, an xattr."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    os.symlink("busybox", root / "bin/sh")
    _write(root, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    _write(root, "etc/group", b"root:x:0:\nuser:x:1000:\n")
    _write(root, "etc/motd", b"deleted by the second layer\n")
    _write(root, "etc/shadow", b"root:*:19000::::::\n", mode=0o600, owner=(0, 42))
    _write(root, LONG_FILE, b"a name over 100 bytes\n")
    _write(root, f"{LONG_DIR}/file", b"below a long directory\n")
    os.symlink(LONG_TARGET, root / "data/long-target-link")
    _write(root, "data/gone", b"deleted by the second layer\n")
    _write(root, "data/linked", b"two names, one inode\n", mode=0o640)
    os.link(root / "data/linked", root / "data/linked-too")
    _write(root, "data/attrs", b"x")
    os.setxattr(root / "data/attrs", "user.lazysnap", b"value")
    _write(root, "usr/local/bin/setuid-tool", b"#!/bin/sh\necho tool\n", mode=0o4755)
    (root / "root").mkdir(mode=0o700)
    (root / "root").chmod(0o700)
    _write(root, "root/.profile", b"# root's\n", mode=0o600)
    home = root / "home/user"
    home.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    home.chmod(0o750)
    _write(root, "home/user/notes.txt", b"owned by uid 1000\n", owner=(1000, 1000))
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)


def change_rootfs(root: Path) -> None:
    """The second layer's changes, made to the unpacked tree (umoci computes the whiteouts)."""
    for rel in DELETED:
        (root / rel).unlink()
    _write(root, NEW_FILE, b"2\n")


@dataclass(frozen=True)
class Source:
    """A pushed source image: its repository:tag in the test registry and the tool that made it."""

    name: str
    repo_tag: str

    def ref(self, registry: Registry) -> str:
        return f"{registry.host}/{self.repo_tag}"


def umoci_image(workdir: Path, registry: Registry, repo_tag: str) -> Source:
    """Two layers packed by `umoci repack` (the first with --refresh-bundle, or the second repack
    would replace it), copied to the registry with skopeo."""
    layout, bundle = workdir / "umoci-layout", workdir / "umoci-bundle"
    image = f"{layout}:img"
    _run(["umoci", "init", "--layout", str(layout)], "umoci init")
    _run(["umoci", "new", "--image", image], "umoci new")
    _run(["umoci", "unpack", "--image", image, str(bundle)], "umoci unpack")
    populate_rootfs(bundle / "rootfs")
    _run(["umoci", "repack", "--refresh-bundle", "--image", image, str(bundle)], "umoci repack (layer 1)")
    change_rootfs(bundle / "rootfs")
    _run(["umoci", "repack", "--image", image, str(bundle)], "umoci repack (layer 2)")
    _run(["umoci", "config", "--image", image, "--config.cmd", "/bin/sh"], "umoci config")
    skopeo = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    _run([*skopeo, f"oci:{image}", f"docker://{registry.host}/{repo_tag}"], "skopeo copy (umoci image)")
    shutil.rmtree(bundle)
    return Source("umoci", repo_tag)


def gnu_tar(root: Path, *options: str) -> bytes:
    """`tar -C ROOT [OPTIONS] -c .`: GNU format (Debian's default), `./` entries, readdir order."""
    return _run(["tar", "-C", str(root), *options, "-c", "."], f"tar -c {root}").stdout


def gnu_tar_image(workdir: Path, registry: Registry, repo: str, tag: str) -> Source:
    """Two gzip layers made by GNU tar: the populated tree, then a tree of changes holding whiteout
    files (`.wh.NAME`, as an image builder writes them), a new file and a symlink packed with
    `--mode=go-w` (header mode 0755)."""
    base, top = workdir / "tar-base", workdir / "tar-top"
    base.mkdir()
    populate_rootfs(base)
    for rel in (*DELETED, NEW_FILE, ODD_SYMLINK):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
    for rel in DELETED:
        parent, _, name = rel.rpartition("/")
        (top / parent / f".wh.{name}").write_bytes(b"")
    _write(top, NEW_FILE, b"2\n")
    os.symlink("version", top / ODD_SYMLINK)
    layers = [im.TarLayer(gnu_tar(base)), im.TarLayer(gnu_tar(top, "--mode=go-w"))]
    im.push_image(registry.url, repo, tag, im.Image(layers, cmd=["/bin/sh"]))
    shutil.rmtree(base)
    shutil.rmtree(top)
    return Source("gnu-tar", f"{repo}:{tag}")


# --- accelerated copies ---------------------------------------------------------------------------


def lazysnap_convert(registry: Registry, hosts_dir: Path, src: str, dst: str) -> str:
    """`lazysnap convert` (the command) registry to registry; returns the destination reference."""
    from tests.harness.mount import LAZYSNAP

    src_ref, dst_ref = f"{registry.host}/{src}", f"{registry.host}/{dst}"
    _run([LAZYSNAP, "convert", "--hosts-dir", str(hosts_dir), src_ref, dst_ref], "lazysnap convert")
    return dst_ref


def hosts_dir_for(registry: Registry, directory: Path) -> Path:
    """containerd's certs.d layout marking the test registry as plain HTTP."""
    d = directory / registry.host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(f'server = "http://{registry.host}"\n')
    return directory


CONVERTERS = ("lazysnap", "ctr-remote", "skopeo")


def accelerated(
    converter: str, source: Source, registry: Registry, containerd: Containerd, workdir: Path
) -> str:
    """An accelerated copy of `source` made by `converter` (one of CONVERTERS); its reference.
    ctr-remote converts from containerd's content store: the source must have been pulled into it."""
    dst = f"{source.repo_tag.split(':')[0]}:{converter}"
    if converter == "lazysnap":
        return lazysnap_convert(registry, hosts_dir_for(registry, workdir / "certs.d"), source.repo_tag, dst)
    if converter == "ctr-remote":
        return ctr_remote_convert(containerd, source.ref(registry), f"{registry.host}/{dst}", "--estargz")
    if converter == "skopeo":
        scratch = workdir / f"skopeo-{source.name}"
        scratch.mkdir()
        try:
            return skopeo_zstd_chunked(registry, scratch, source.repo_tag, dst)
        finally:
            shutil.rmtree(scratch)
    raise ValueError(f"unknown converter {converter!r}: one of {', '.join(CONVERTERS)}")
