"""Realistic benchmark images, built on this machine from Debian packages and cached by recipe.

Every image has two layers, as images built by a Dockerfile have:

- the **base layer**: a Debian tree made by `debootstrap --variant=minbase bookworm` (or, for the tiny
  test image `small`, a tree with /bin/busybox and a few applet links), packed once and shared by all
  images of that base;
- the **app layer**: what changed after `chroot ROOTFS apt-get install -y --no-install-recommends ...`,
  `apt-get clean` and removing the package lists, plus the workload's files. It is computed here by
  scanning the tree before and after (type, mode, owner, size, mtime, link target, device, and the
  content and xattrs of every file whose inode changed during the build): added and changed entries with
  their parent directories, a whiteout (`.wh.NAME`) for each deleted path whose parent survives, hard
  links kept within the layer.

Layers are PAX tars (entries sorted by path, numeric owners, no user names), gzip level 6, packed by
`write_layer`. The device nodes debootstrap makes under /dev are not packed (runtimes mount their own
/dev); a /dev/null is created for apt when missing and removed before packing. Nothing is mounted into
the chroot on the host; the one exception, `jre` (openjdk's postinst insists on a mounted /proc), runs
apt under `unshare --mount --pid --fork --mount-proc`: a proc seen only inside a private namespace that
disappears with it.

Each image's workload prints a line starting with `READY` and exits. Images (`RECIPES`):
`python-numpy`, `python-scipy`, `jre` (a jar compiled with this machine's javac), `gcc` (compiles and runs
hello.c), `node`, `big-app` (a Flask app beside 1.1 GB of assets it does not read at start) and `small`
(busybox, no debootstrap, built in about a second, for tests).

`python-numpy-umoci` and `small-umoci` are those images as a real tool packs them: the source image's
layers applied one by one to a umoci bundle, each followed by `umoci repack` (`--refresh-bundle` for all
but the last). Their layers start with umoci's root entry, carry umoci's whiteouts and header choices,
and give the same tree as the source image.

The cache (default /var/cache/lazysnap-bench) holds `base/<key>/` (the pristine tree and its layer),
`images/<name>-<key>/` (the app layer, `image.json`) and build logs. A key is a hash of everything the
recipe says (packages, workload files, asset sizes, command, base), so a changed recipe builds anew; a
rebuild of an unchanged recipe is skipped even if the Debian archive moved on in between (delete the
cache directory to pick up new package versions).

    python -m bench.realistic [--cache-dir DIR] [NAME ...]      build (or find in the cache) and describe
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import json
import os
import queue
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from fuse.registry import CredentialStore, HostsConfig, Reference, RegistryClient

RECIPE_VERSION = 1
DEFAULT_CACHE = Path("/var/cache/lazysnap-bench")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
READY = "READY"
GZIP_LEVEL = 6
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
FIXED_MTIME = 1_700_000_000  # files this module writes (workloads, assets, the busybox tree)
CREATED = "2023-11-14T22:13:20Z"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_ENV = (f"PATH={CHROOT_PATH}", "LANG=C.UTF-8")
# Top-level directories whose contents are never packed: the runtime mounts its own.
NOT_PACKED = ("dev", "proc", "sys")
_CHUNK = 1 << 20

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """An image could not be built; the message says which step failed and shows its output."""


# --- recipes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    """Deterministic data files the workload does not read at start: `count` files of `size` bytes under
    `directory`, incompressible (`random`, like media or model weights) or text (`text`, like JSON)."""

    directory: str
    count: int
    size: int
    kind: str = "random"
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    base: str  # "debootstrap" or "busybox"
    command: tuple[str, ...]
    packages: tuple[str, ...] = ()
    files: tuple[tuple[str, bytes, int], ...] = ()  # (path, content, mode)
    java: tuple[tuple[str, bytes], ...] = ()  # Java sources compiled on this machine into app/app.jar
    assets: tuple[Assets, ...] = ()
    removes: tuple[str, ...] = ()  # base paths the build deletes (whiteouts in the app layer)
    env: tuple[str, ...] = ()
    # apt's maintainer scripts need a mounted /proc (openjdk's postinst checks `mountpoint /proc`): run
    # the chroot in a private mount and PID namespace with its own proc, which no host mount table ever
    # sees and which vanishes with the namespace (nothing to unmount, even after a kill)
    needs_proc: bool = False
    # "umoci": the image of recipe `source` (built first, by our writer) unpacked layer by layer and
    # repacked by `umoci repack`, as an image built with umoci is: its layers start with a root entry
    # and carry umoci's own whiteouts and header choices
    packer: str = ""
    source: str = ""

    def key(self) -> str:
        """A hash of everything that decides the image's content."""
        doc = {
            "version": RECIPE_VERSION,
            "base": base_key(self.base),
            "command": self.command,
            "packages": self.packages,
            "files": [(p, hashlib.sha256(c).hexdigest(), m) for p, c, m in self.files],
            "java": [(p, hashlib.sha256(c).hexdigest()) for p, c in self.java],
            "assets": [dataclasses.astuple(a) for a in self.assets],
            "removes": self.removes,
            "env": self.env,
        }
        if self.needs_proc:
            doc["needs_proc"] = True
        if self.packer:
            doc["packer"] = self.packer
            doc["source"] = _recipe(self.source).key()
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


NUMPY_MAIN = b"""\
import sys
import time

start = time.perf_counter()
import numpy as np

rng = np.random.default_rng(42)
a = rng.random((400, 400))
eig = np.linalg.eigvalsh(a @ a.T)
fft = np.fft.rfft(rng.random(1 << 16))
print(f"READY numpy {np.__version__} eig={eig[-1]:.3f} fft={abs(fft[1]):.3f} "
      f"in {time.perf_counter() - start:.2f}s", flush=True)
sys.exit(0)
"""

SCIPY_MAIN = b"""\
import time

start = time.perf_counter()
import numpy as np
from scipy import integrate, interpolate, linalg, optimize, signal, sparse, stats

rng = np.random.default_rng(7)
m = rng.random((200, 200))
lu = linalg.lu_factor(m @ m.T + np.eye(200))
best = optimize.minimize(lambda x: ((x - 3.0) ** 2).sum(), np.zeros(4)).x
area = integrate.quad(np.sin, 0, np.pi)[0]
spline = interpolate.CubicSpline(np.arange(10), np.arange(10) ** 2)(4.5)
filt = signal.butter(4, 0.2)
mat = sparse.random(500, 500, density=0.01, random_state=1).tocsr()
t = stats.ttest_ind(rng.normal(size=100), rng.normal(0.5, size=100))
print(f"READY scipy lu={lu[0][0, 0]:.2f} x={best[0]:.2f} area={area:.2f} spline={spline:.1f} "
      f"nnz={mat.nnz} p={t.pvalue:.3f} in {time.perf_counter() - start:.2f}s", flush=True)
"""

JAVA_MAIN = b"""\
import java.security.MessageDigest;
import java.time.LocalDate;
import java.util.HexFormat;
import java.util.concurrent.ConcurrentHashMap;
import java.util.regex.Pattern;
import java.util.stream.IntStream;

public class Main {
    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        byte[] digest = MessageDigest.getInstance("SHA-256").digest("lazysnap".getBytes("UTF-8"));
        ConcurrentHashMap<String, Integer> sums = new ConcurrentHashMap<>();
        IntStream.range(0, 100000).parallel().forEach(i -> sums.merge("k" + (i % 100), i, Integer::sum));
        boolean found = Pattern.compile("[a-z]+\\\\d").matcher("abc1 def").find();
        String summary = String.format("%s keys=%d sha=%s regex=%b", LocalDate.of(2024, 1, 1), sums.size(),
            HexFormat.of().formatHex(digest).substring(0, 8), found);
        System.out.println("READY java " + summary + " in " + (System.nanoTime() - start) / 1000000 + "ms");
    }
}
"""

HELLO_C = b"""\
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    char buf[64];
    double x = 0;
    for (int i = 1; i <= 1000; i++) x += sqrt((double)i);
    snprintf(buf, sizeof buf, "%.2f", x);
    printf("READY gcc hello sum=%s len=%zu\\n", buf, strlen(buf));
    return EXIT_SUCCESS;
}
"""

NODE_MAIN = b"""\
const start = process.hrtime.bigint();
const crypto = require('crypto');
const http = require('http');
const zlib = require('zlib');
const path = require('path');
const { EventEmitter } = require('events');
const { Readable } = require('stream');

const digest = crypto.createHash('sha256').update('lazysnap').digest('hex');
const packed = zlib.gzipSync(Buffer.alloc(1 << 16, 'a'));
const server = http.createServer((req, res) => res.end('ok'));
const bus = new EventEmitter();
bus.on('tick', () => {});
bus.emit('tick');
const chunks = Readable.from(['a', 'b']);
const ms = Number(process.hrtime.bigint() - start) / 1e6;
console.log(`READY node ${process.version} sha=${digest.slice(0, 8)} gz=${packed.length} ` +
            `dir=${path.basename(__dirname)} server=${typeof server.listen} stream=${typeof chunks.pipe} ` +
            `in ${ms.toFixed(1)}ms`);
"""

BIG_APP_MAIN = b"""\
import json
import time

start = time.perf_counter()
from flask import Flask, jsonify, render_template_string

app = Flask(__name__)
with open("/app/assets/index.json") as f:
    INDEX = json.load(f)

PAGE = "<h1>{{ title }}</h1><ul>{% for a in assets %}<li>{{ a.name }} ({{ a.size }})</li>{% endfor %}</ul>"


@app.route("/")
def home():
    return render_template_string(PAGE, title="assets", assets=INDEX["assets"][:20])


@app.route("/health")
def health():
    return jsonify(status="ok", assets=len(INDEX["assets"]))


client = app.test_client()
assert client.get("/health").status_code == 200
assert b"<h1>assets</h1>" in client.get("/").data
print(f"READY big-app assets={len(INDEX['assets'])} in {time.perf_counter() - start:.2f}s", flush=True)
"""

SMALL_RUN = b"""\
#!/bin/sh
set -e
cat /app/data/config.txt > /dev/null
wc -l /app/data/words.txt > /dev/null
sha256sum /app/data/blob.bin > /dev/null
if [ -e /etc/motd ]; then echo "the app layer's whiteout of /etc/motd was not applied" >&2; exit 1; fi
echo "READY small $(cat /app/data/config.txt)"
"""


def _words(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(500)
    ]
    out = bytearray()
    while len(out) < n:
        out += (" ".join(rng.choice(vocabulary) for _ in range(12)) + "\n").encode()
    return bytes(out[:n])


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "python-numpy",
            "python3 + python3-numpy; imports numpy, an eigendecomposition and an FFT",
            "debootstrap",
            ("python3", "/app/main.py"),
            packages=("python3", "python3-numpy"),
            files=(("app/main.py", NUMPY_MAIN, 0o644),),
        ),
        Recipe(
            "python-numpy-umoci",
            "python-numpy repacked layer by layer with umoci (root entry, umoci's whiteouts)",
            "debootstrap",
            ("python3", "/app/main.py"),
            packer="umoci",
            source="python-numpy",
        ),
        Recipe(
            "python-scipy",
            "python3 + numpy + scipy; imports seven scipy subpackages and uses each",
            "debootstrap",
            ("python3", "/app/main.py"),
            packages=("python3", "python3-numpy", "python3-scipy"),
            files=(("app/main.py", SCIPY_MAIN, 0o644),),
        ),
        Recipe(
            "jre",
            "default-jre-headless; a jar (hashing, parallel streams, regex, java.time)",
            "debootstrap",
            ("java", "-jar", "/app/app.jar"),
            packages=("default-jre-headless",),
            java=(("Main.java", JAVA_MAIN),),
            needs_proc=True,
        ),
        Recipe(
            "gcc",
            "gcc + libc6-dev; compiles hello.c with -O2 and runs it",
            "debootstrap",
            ("/bin/sh", "-c", "gcc -O2 -o /tmp/hello /app/hello.c -lm && /tmp/hello"),
            packages=("gcc", "libc6-dev"),
            files=(("app/hello.c", HELLO_C, 0o644),),
        ),
        Recipe(
            "node",
            "nodejs; a script loading http, crypto, zlib, streams",
            "debootstrap",
            ("node", "/app/main.js"),
            packages=("nodejs",),
            files=(("app/main.js", NODE_MAIN, 0o644),),
        ),
        Recipe(
            "big-app",
            "python3 + flask web app (test client) beside 1.1 GB of assets not read at start",
            "debootstrap",
            ("python3", "/app/app.py"),
            packages=("python3", "python3-flask"),
            files=(("app/app.py", BIG_APP_MAIN, 0o644),),
            assets=(
                Assets("app/assets/models", 32, 24 << 20, "random", 1),
                Assets("app/assets/media", 320, 1 << 20, "random", 2),
                Assets("app/assets/i18n", 2000, 8 << 10, "text", 3),
            ),
        ),
        Recipe(
            "small",
            "busybox; a shell script reading three files (one whiteout in the app layer)",
            "busybox",
            ("/bin/sh", "/app/run.sh"),
            files=(
                ("app/run.sh", SMALL_RUN, 0o755),
                ("app/data/config.txt", b"mode=bench\n", 0o644),
                ("app/data/words.txt", _words(200_000, 1), 0o644),
                ("app/data/blob.bin", random.Random(2).randbytes(1 << 20), 0o644),
                ("app/data/unread.bin", random.Random(3).randbytes(4 << 20), 0o644),
            ),
            removes=("etc/motd",),
        ),
        Recipe(
            "small-umoci",
            "small repacked layer by layer with umoci (for tests of the umoci packer)",
            "busybox",
            ("/bin/sh", "/app/run.sh"),
            packer="umoci",
            source="small",
        ),
    ]
}


# --- scanning and diffing trees -------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    """What a scan records of one entry (lstat, plus the link target)."""

    kind: str  # reg, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits, including setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int
    rdev: int = 0
    target: str = ""

    def same_as(self, other: Meta) -> bool:
        """Equal in everything a layer records (not ctime, inode or link count)."""
        return self._recorded() == other._recorded()

    def _recorded(self) -> tuple:
        return (self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.rdev, self.target)


_KINDS = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _meta(path: str | Path) -> Meta:
    st = os.lstat(path)
    kind = _KINDS[stat.S_IFMT(st.st_mode)]
    return Meta(
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_size if kind == "reg" else 0,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        st.st_nlink,
        st.st_rdev if kind in ("char", "block") else 0,
        os.readlink(path) if kind == "symlink" else "",
    )


def scan(root: Path, exclude_contents: Sequence[str] = NOT_PACKED) -> dict[str, Meta]:
    """Every entry below `root` by relative POSIX path (the root itself excluded); the contents of the
    top-level directories `exclude_contents` are left out (the directories themselves are kept)."""
    out: dict[str, Meta] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                meta = _meta(entry.path)
                out[path] = meta
                if meta.kind == "dir" and path not in exclude_contents:
                    stack.append(path)
    return out


def _same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        if name.startswith("security.selinux"):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass
    return out


@dataclass(frozen=True)
class TreeDiff:
    """What the app layer must hold: entries added or changed, and deletions (whiteouts)."""

    changed: tuple[str, ...]  # added or modified paths of the after tree
    deleted: tuple[str, ...]  # topmost deleted paths of the before tree (one whiteout each)

    def layer_entries(self, after: dict[str, Meta]) -> list[LayerEntry]:
        """The layer's entries in tar order: changed paths with all their parent directories, and a
        whiteout per deletion, sorted by path (a parent always comes before what it holds)."""
        paths: set[str] = set()
        for path in self.changed:
            paths.add(path)
            parent = path.rpartition("/")[0]
            while parent and parent not in paths:
                paths.add(parent)
                parent = parent.rpartition("/")[0]
        entries = [LayerEntry(p) for p in paths if p in after]
        for path in self.deleted:
            parent = path.rpartition("/")[0]
            while parent and parent not in paths:  # a whiteout's parents exist in the after tree
                paths.add(parent)
                entries.append(LayerEntry(parent))
                parent = parent.rpartition("/")[0]
            entries.append(LayerEntry(path, whiteout=True))
        return sorted(entries, key=lambda e: _path_key(e.tar_name))


def _path_key(path: str) -> bytes:
    """Tar order: by the path's bytes (a directory comes before everything below it)."""
    return path.encode("utf-8", "surrogateescape")


def diff_trees(
    before_root: Path,
    after_root: Path,
    before: dict[str, Meta] | None = None,
    after: dict[str, Meta] | None = None,
    *,
    touched_since_ns: int | None = None,
) -> TreeDiff:
    """Compare two trees (the after tree a copy of the before tree, then changed).

    A path is changed when it is new, or its type, mode, owner, size, mtime, device or link target
    differ; a regular file with equal metadata is compared byte by byte (and by xattrs) when its
    ctime is at or after `touched_since_ns` (always when that is None): only files the build touched
    are read. A path of the before tree missing from the after tree is deleted; only the topmost of a
    deleted subtree is listed (its whiteout hides what is below).
    """
    before = scan(before_root) if before is None else before
    after = scan(after_root) if after is None else after
    changed = []
    for path, meta in after.items():
        old = before.get(path)
        if old is None or not old.same_as(meta):
            changed.append(path)
        elif touched_since_ns is None or meta.ctime_ns >= touched_since_ns:
            a, b = before_root / path, after_root / path
            if meta.kind == "reg" and not _same_content(a, b):
                changed.append(path)
            elif _xattrs(a) != _xattrs(b):
                changed.append(path)
    deleted = []
    for path in before:
        parent = path.rpartition("/")[0]
        # below a deleted or replaced directory, that directory's whiteout or new entry hides it
        if path not in after and (not parent or (parent in after and after[parent].kind == "dir")):
            deleted.append(path)
    return TreeDiff(tuple(sorted(changed)), tuple(sorted(deleted)))


# --- packing layers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerEntry:
    path: str
    whiteout: bool = False

    @property
    def tar_name(self) -> str:
        if not self.whiteout:
            return self.path
        parent, _, name = self.path.rpartition("/")
        return f"{parent}/.wh.{name}" if parent else f".wh.{name}"


@dataclass(frozen=True)
class LayerBlob:
    """A packed layer on disk."""

    path: Path
    digest: str  # of the gzip blob
    size: int
    diff_id: str  # of the uncompressed tar
    uncompressed_size: int
    entries: int
    whiteouts: int
    media_type: str = OCI_LAYER_GZIP

    def to_json(self, relative_to: Path) -> dict:
        doc = dataclasses.asdict(self)
        doc["path"] = str(self.path.relative_to(relative_to))
        return doc

    @classmethod
    def from_json(cls, doc: dict, relative_to: Path) -> LayerBlob:
        return cls(**{**doc, "path": relative_to / doc["path"]})


class _GzipSink:
    """Hashes the uncompressed stream here, and compresses, hashes and writes it in a worker thread
    (zlib and hashlib release the GIL: packing uses two cores)."""

    def __init__(self, out: Path, level: int = GZIP_LEVEL):
        self.raw = hashlib.sha256()
        self.raw_size = 0
        self.blob = hashlib.sha256()
        self.blob_size = 0
        self._file = open(out, "wb")  # closed in close()
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # gzip header with mtime 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._error: BaseException | None = None
        self._pending = bytearray()
        self._thread = threading.Thread(target=self._work, name="gzip", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while (data := self._queue.get()) is not None:
                self._emit(self._compressor.compress(data))
            self._emit(self._compressor.flush())
        except BaseException as e:  # reported by write()/close()
            self._error = e
            while self._queue.get() is not None:  # drain so the producer never blocks
                pass

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob.update(data)
            self.blob_size += len(data)
            self._file.write(data)

    def write(self, data: bytes) -> None:
        self.raw.update(data)
        self.raw_size += len(data)
        self._pending += data
        if len(self._pending) >= _CHUNK:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if self._error:
            raise BuildError(f"compressing a layer failed: {self._error}") from self._error
        if self._pending:
            self._queue.put(bytes(self._pending))
            self._pending.clear()

    def close(self) -> None:
        try:
            self._flush_pending()
        finally:
            self._queue.put(None)
            self._thread.join()
            self._file.close()
        if self._error:
            raise BuildError(f"compressing a layer failed: {self._error}") from self._error


def _tar_info(root: Path, entry: LayerEntry, meta: Meta | None, link_to: str | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.tar_name)
    if entry.whiteout or meta is None:
        info.mode, info.mtime = 0o644, 0
        return info
    info.mode, info.uid, info.gid, info.mtime = meta.mode, meta.uid, meta.gid, meta.mtime_ns // 1_000_000_000
    info.uname = info.gname = ""
    if link_to is not None:
        info.type, info.linkname = tarfile.LNKTYPE, link_to
    elif meta.kind == "reg":
        info.size = meta.size
    elif meta.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif meta.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, meta.target
    elif meta.kind == "fifo":
        info.type = tarfile.FIFOTYPE
    else:
        info.type = tarfile.CHRTYPE if meta.kind == "char" else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(meta.rdev), os.minor(meta.rdev)
    info.pax_headers = {
        f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
        for name, value in _xattrs(root / entry.path).items()
    }
    return info


def write_layer(root: Path, entries: Iterable[LayerEntry], out: Path, level: int = GZIP_LEVEL) -> LayerBlob:
    """Pack `entries` of the tree at `root` into a gzip-compressed PAX tar at `out`.

    Regular files sharing an inode become one file and hard links to it (within this layer); sockets
    are skipped. The tar ends with two zero blocks, as Go's archive/tar writes it.
    """
    sink = _GzipSink(out, level)
    count = whiteouts = 0
    first_name: dict[int, str] = {}  # inode -> its first name in this layer
    try:
        for entry in entries:
            meta = None if entry.whiteout else _meta(root / entry.path)
            if meta is not None and meta.kind == "socket":
                continue
            link_to = None
            if meta is not None and meta.kind == "reg" and meta.nlink > 1:
                link_to = first_name.setdefault(meta.ino, entry.path)
                if link_to == entry.path:
                    link_to = None
            info = _tar_info(root, entry, meta, link_to)
            sink.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            count += 1
            whiteouts += entry.whiteout
            if info.type == tarfile.REGTYPE and info.size:
                _copy_data(root / entry.path, info.size, sink)
        sink.write(b"\0" * 1024)
    finally:
        sink.close()
    return LayerBlob(
        out,
        "sha256:" + sink.blob.hexdigest(),
        sink.blob_size,
        "sha256:" + sink.raw.hexdigest(),
        sink.raw_size,
        count,
        whiteouts,
    )


def _copy_data(path: Path, size: int, sink: _GzipSink) -> None:
    left = size
    with open(path, "rb") as f:
        while left:
            data = f.read(min(_CHUNK, left))
            if not data:
                raise BuildError(f"{path} shrank while it was packed (expected {size} bytes)")
            sink.write(data)
            left -= len(data)
    if size % 512:
        sink.write(b"\0" * (512 - size % 512))


def extract_layers(blobs: Sequence[Path], dest: Path) -> None:
    """Apply gzip layer blobs in order into `dest` as containerd's applier does: a `.wh.NAME` removes
    NAME of the layers below, `.wh..wh..opq` empties its directory, an entry replaces a non-directory
    (or a directory, unless both are directories); owners numeric, modes and mtimes kept (atime = mtime).
    """
    dest.mkdir(parents=True, exist_ok=True)
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    for blob in blobs:
        with tarfile.open(blob, mode="r|gz") as tar:
            for member in tar:
                name = member.name.rstrip("/")
                parent, _, base = name.rpartition("/")
                if ".." in name.split("/") or name.startswith("/"):
                    raise BuildError(f"{blob}: unsafe member name {member.name!r}")
                if base == ".wh..wh..opq":
                    directory = dest / parent
                    for child in directory.iterdir() if directory.is_dir() else ():
                        _remove(child)
                    continue
                if base.startswith(".wh."):
                    target = dest / parent / base[len(".wh.") :]
                    if target.exists() or target.is_symlink():
                        _remove(target)
                    continue
                target = dest / name
                if (target.exists() or target.is_symlink()) and not (member.isdir() and target.is_dir()):
                    _remove(target)
                tar.extract(member, dest, numeric_owner=True, **trusted)
                if member.issym():  # tarfile leaves a symlink's mtime at extraction time
                    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


# --- built images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    """An image on disk: layer blobs, config, the workload command and what it prints when ready."""

    name: str
    key: str
    directory: Path
    layers: tuple[LayerBlob, ...]
    command: tuple[str, ...]
    env: tuple[str, ...]
    description: str = ""
    ready: str = READY
    build_seconds: float = 0.0
    packages: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The tag the image is pushed under: its recipe key (a changed recipe never reuses a tag)."""
        return self.key[:16]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.uncompressed_size for layer in self.layers)

    def config(self) -> dict:
        return {
            "created": CREATED,
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": list(self.env), "Cmd": list(self.command), "WorkingDir": "/app"},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
            "history": [
                {"created": CREATED, "created_by": what}
                for what in ("lazysnap bench: base", f"lazysnap bench: {self.name} app")[: len(self.layers)]
            ],
        }

    def config_bytes(self) -> bytes:
        return json.dumps(self.config(), sort_keys=True, separators=(",", ":")).encode()

    def save(self, cache_dir: Path) -> None:
        doc = {
            "name": self.name,
            "key": self.key,
            "layers": [layer.to_json(cache_dir) for layer in self.layers],
            "command": list(self.command),
            "env": list(self.env),
            "description": self.description,
            "ready": self.ready,
            "build_seconds": self.build_seconds,
            "packages": list(self.packages),
            "extra": self.extra,
        }
        tmp = self.directory / "image.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.directory / "image.json")

    @classmethod
    def load(cls, directory: Path, cache_dir: Path) -> BuiltImage:
        doc = json.loads((directory / "image.json").read_text())
        return cls(
            name=doc["name"],
            key=doc["key"],
            directory=directory,
            layers=tuple(LayerBlob.from_json(d, cache_dir) for d in doc["layers"]),
            command=tuple(doc["command"]),
            env=tuple(doc["env"]),
            description=doc["description"],
            ready=doc["ready"],
            build_seconds=doc["build_seconds"],
            packages=tuple(doc["packages"]),
            extra=doc.get("extra", {}),
        )

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.layers)} layers, {self.uncompressed_size / 1e6:.0f} MB tar, "
            f"{self.size / 1e6:.0f} MB gzip, {sum(x.entries for x in self.layers)} entries, "
            f"{sum(x.whiteouts for x in self.layers)} whiteouts (built in {self.build_seconds:.0f} s)"
        )


# --- base trees -----------------------------------------------------------------------------------


def base_key(base: str) -> str:
    if base == "debootstrap":
        doc = [RECIPE_VERSION, "debootstrap", "minbase", SUITE, MIRROR]
    elif base == "busybox":
        doc = [RECIPE_VERSION, "busybox", _file_sha256(_busybox())]
    else:
        raise ValueError(f"unknown base {base!r}: 'debootstrap' or 'busybox'")
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


@functools.cache
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(_CHUNK):
            h.update(data)
    return h.hexdigest()


def _busybox() -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists():
            return candidate
    raise BuildError("/bin/busybox is missing: install the Debian package busybox-static")


@dataclass(frozen=True)
class BaseTree:
    rootfs: Path
    layer: LayerBlob


def _run(argv: Sequence[str], log_path: Path, what: str, timeout: float = 1800) -> None:
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            p = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            raise BuildError(f"{what}: timed out after {timeout:.0f} s (log: {log_path})") from e
    if p.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BuildError(f"{what}: `{' '.join(argv)}` exited {p.returncode} (log: {log_path}):\n{tail}")


def _make_busybox_tree(rootfs: Path) -> None:
    """A minimal tree: /bin/busybox with the applets the workload uses, /etc, /tmp, empty mount points."""
    for d, mode in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("root", 0o700),
    ]:
        (rootfs / d).mkdir(parents=True, exist_ok=True)
        os.chmod(rootfs / d, mode)
    shutil.copyfile(_busybox(), rootfs / "bin/busybox")
    os.chmod(rootfs / "bin/busybox", 0o755)
    for applet in ("sh", "cat", "echo", "wc", "sha256sum", "ls", "sleep", "test", "[", "head", "true"):
        os.symlink("busybox", rootfs / "bin" / applet)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/motd").write_text("removed by the app layer\n")
    _fix_mtimes(rootfs)


def _fix_mtimes(root: Path) -> None:
    """Every entry's mtime to FIXED_MTIME (trees this module writes itself; children before parents)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(Path(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


def _base(kind: str, cache_dir: Path, log: Log) -> BaseTree:
    key = base_key(kind)
    home = cache_dir / "base" / f"{kind}-{key[:16]}"
    meta_path = home / "layer.json"
    if meta_path.exists():
        return BaseTree(home / "rootfs", LayerBlob.from_json(json.loads(meta_path.read_text()), cache_dir))
    if home.exists():
        shutil.rmtree(home)  # an interrupted build
    tmp = cache_dir / "base" / f".{kind}-{key[:16]}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    rootfs = tmp / "rootfs"
    if kind == "debootstrap":
        if not shutil.which("debootstrap"):
            raise BuildError("debootstrap is missing: apt-get install debootstrap")
        log(f"  base: debootstrap --variant=minbase {SUITE} (about 30 s)")
        _run(
            ["debootstrap", "--variant=minbase", SUITE, str(rootfs), MIRROR],
            cache_dir / "logs" / f"debootstrap-{key[:16]}.log",
            "debootstrap",
        )
    else:
        rootfs.mkdir()
        _make_busybox_tree(rootfs)
    entries = [
        LayerEntry(p) for p in sorted(scan(rootfs), key=lambda p: p.encode("utf-8", "surrogateescape"))
    ]
    layer = write_layer(rootfs, entries, tmp / "layer.tar.gz")
    final = dataclasses.replace(layer, path=home / "layer.tar.gz")
    (tmp / "layer.json").write_text(json.dumps(final.to_json(cache_dir), indent=2) + "\n")
    tmp.rename(home)
    log(
        f"  base {kind}: {layer.uncompressed_size / 1e6:.0f} MB tar, {layer.size / 1e6:.0f} MB gzip, "
        f"{layer.entries} entries ({time.monotonic() - started:.0f} s)"
    )
    return BaseTree(home / "rootfs", final)


# --- building the app layer -----------------------------------------------------------------------


def _chroot(rootfs: Path, argv: Sequence[str], log_path: Path, what: str, proc: bool = False) -> None:
    prefix = ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={rootfs}/proc"] if proc else []
    env = [
        "env",
        "-i",
        f"PATH={CHROOT_PATH}",
        "HOME=/root",
        "LC_ALL=C.UTF-8",
        "DEBIAN_FRONTEND=noninteractive",
    ]
    _run([*prefix, "chroot", str(rootfs), *env, *argv], log_path, what)


def _apt_install(rootfs: Path, packages: Sequence[str], log_path: Path, proc: bool = False) -> None:
    dev_null = rootfs / "dev/null"
    made_null = not dev_null.exists()
    if made_null:
        subprocess.run(["mknod", "-m", "666", str(dev_null), "c", "1", "3"], check=True)
    policy = rootfs / "usr/sbin/policy-rc.d"  # no service starts inside the chroot
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        _chroot(rootfs, ["apt-get", "update", "-q"], log_path, "apt-get update")
        _chroot(
            rootfs,
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            log_path,
            f"apt-get install {' '.join(packages)}",
            proc,
        )
        _chroot(rootfs, ["apt-get", "clean"], log_path, "apt-get clean")
    finally:
        policy.unlink(missing_ok=True)
        if made_null:
            dev_null.unlink(missing_ok=True)
    lists = rootfs / "var/lib/apt/lists"
    for entry in lists.iterdir() if lists.is_dir() else ():
        if entry.name not in ("partial", "lock"):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _write_file(rootfs: Path, rel: str, data: bytes, mode: int = 0o644) -> None:
    path = rootfs / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, (FIXED_MTIME, FIXED_MTIME))


def _write_assets(rootfs: Path, assets: Sequence[Assets]) -> list[dict]:
    index = []
    for spec in assets:
        rng = random.Random(spec.seed)
        suffix = {"random": ".bin", "text": ".json"}[spec.kind]
        for i in range(spec.count):
            rel = f"{spec.directory}/{Path(spec.directory).name}-{i:04d}{suffix}"
            if spec.kind == "random":
                data = rng.randbytes(spec.size)
            else:
                data = _words(spec.size, spec.seed * 100_000 + i)
            _write_file(rootfs, rel, data)
            index.append({"name": rel, "size": spec.size})
    return index


def _build_jar(sources: Sequence[tuple[str, bytes]], out: Path) -> bytes:
    """Compile the sources with this machine's javac (--release 17, bookworm's JRE) into a jar whose
    zip entries carry a fixed date (the jar's bytes depend only on javac's output)."""
    if not shutil.which("javac"):
        raise BuildError("javac is missing: apt-get install default-jdk-headless")
    with tempfile.TemporaryDirectory(prefix="lzs-bench-java-") as tmp:
        src, classes = Path(tmp, "src"), Path(tmp, "classes")
        src.mkdir()
        for name, data in sources:
            (src / name).write_bytes(data)
        _run(
            ["javac", "--release", "17", "-d", str(classes), *(str(src / n) for n, _ in sources)],
            out.with_suffix(".log"),
            "javac",
        )
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as jar:
            stamp = (2023, 11, 14, 22, 13, 20)
            manifest = "Manifest-Version: 1.0\r\nMain-Class: Main\r\nCreated-By: lazysnap bench\r\n\r\n"
            jar.writestr(zipfile.ZipInfo("META-INF/MANIFEST.MF", stamp), manifest)
            for path in sorted(classes.rglob("*.class")):
                jar.writestr(zipfile.ZipInfo(str(path.relative_to(classes)), stamp), path.read_bytes())
    return out.read_bytes()


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One builder per cache directory at a time (another harness may be building the same image)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(name: str, cache_dir: Path = DEFAULT_CACHE) -> BuiltImage | None:
    """The built image if the cache has it for the current recipe, else None."""
    recipe = _recipe(name)
    directory = cache_dir / "images" / f"{name}-{recipe.key()[:16]}"
    if (directory / "image.json").exists():
        return BuiltImage.load(directory, cache_dir)
    return None


def _recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown image {name!r}: one of {', '.join(RECIPES)}") from None


def build(name: str, cache_dir: Path = DEFAULT_CACHE, *, log: Log = print) -> BuiltImage:
    """The image `name` (see RECIPES): from the cache, or built now (as root: debootstrap, chroot)."""
    recipe = _recipe(name)
    if recipe.packer == "umoci":
        source = build(recipe.source, cache_dir, log=log)  # before taking the lock: it takes it too
        with _locked(cache_dir):
            if (found := cached(name, cache_dir)) is not None:
                return found
            return _build_umoci(recipe, source, cache_dir, log)
    if recipe.packer:
        raise BuildError(f"recipe {name}: unknown packer {recipe.packer!r} (only 'umoci')")
    with _locked(cache_dir):
        if (found := cached(name, cache_dir)) is not None:
            return found
        if os.geteuid() != 0:
            raise BuildError(f"building {name} needs root (debootstrap, chroot, file owners)")
        (cache_dir / "logs").mkdir(parents=True, exist_ok=True)
        key = recipe.key()
        directory = cache_dir / "images" / f"{name}-{key[:16]}"
        log(f"building image {name} ({recipe.description})")
        started = time.monotonic()
        base = _base(recipe.base, cache_dir, log)
        work_parent = cache_dir / "tmp"
        work_parent.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=work_parent) as tmp:
            work = Path(tmp) / "rootfs"
            subprocess.run(["cp", "-a", "--reflink=auto", str(base.rootfs), str(work)], check=True)
            touched_since = time.time_ns() + 50_000_000  # past every ctime the copy set (coarse clocks)
            time.sleep(0.1)
            log_path = cache_dir / "logs" / f"{name}-{key[:16]}.log"
            if recipe.packages:
                log(f"  apt-get install {' '.join(recipe.packages)}")
                _apt_install(work, recipe.packages, log_path, recipe.needs_proc)
            for rel in recipe.removes:
                _remove(work / rel)
            for rel, data, mode in recipe.files:
                _write_file(work, rel, data, mode)
            extra: dict = {}
            if recipe.java:
                jar = _build_jar(recipe.java, Path(tmp) / "app.jar")
                _write_file(work, "app/app.jar", jar)
            if recipe.assets:
                log(f"  writing {sum(a.count * a.size for a in recipe.assets) / 1e9:.2f} GB of assets")
                index = _write_assets(work, recipe.assets)
                _write_file(work, "app/assets/index.json", json.dumps({"assets": index}).encode())
                extra["assets_bytes"] = sum(a["size"] for a in index)
            if (work / "app").exists():
                _fix_mtimes(work / "app")
            log("  diffing the tree and packing the app layer")
            after = scan(work)
            diff = diff_trees(base.rootfs, work, after=after, touched_since_ns=touched_since)
            staging = directory.with_name(directory.name + ".tmp")
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            app = write_layer(work, diff.layer_entries(after), staging / "app.tar.gz")
        app = dataclasses.replace(app, path=directory / "app.tar.gz")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
        image = BuiltImage(
            name=name,
            key=key,
            directory=directory,
            layers=(base.layer, app),
            command=recipe.command,
            env=IMAGE_ENV + recipe.env,
            description=recipe.description,
            build_seconds=time.monotonic() - started,
            packages=recipe.packages,
            extra=extra,
        )
        image.save(cache_dir)
        log(f"  {image.summary()}")
        return image


# --- repacking with umoci ------------------------------------------------------------------------


def _build_umoci(recipe: Recipe, source: BuiltImage, cache_dir: Path, log: Log) -> BuiltImage:
    """`source`'s layers applied one by one to a umoci bundle, each followed by `umoci repack` (all but
    the last with --refresh-bundle, or the next repack would replace the layer); the layers umoci wrote
    become the image's. The command, env and workload are the source's."""
    if not shutil.which("umoci"):
        raise BuildError("umoci is missing: apt-get install umoci")
    if os.geteuid() != 0:
        raise BuildError(f"building {recipe.name} needs root (file owners in the umoci bundle)")
    key = recipe.key()
    directory = cache_dir / "images" / f"{recipe.name}-{key[:16]}"
    log(f"building image {recipe.name} ({recipe.description})")
    started = time.monotonic()
    log_path = cache_dir / "logs" / f"{recipe.name}-{key[:16]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    work_parent = cache_dir / "tmp"
    work_parent.mkdir(exist_ok=True)
    staging = directory.with_name(directory.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix=f"{recipe.name}-", dir=work_parent) as tmp:
        layout, bundle = Path(tmp) / "layout", Path(tmp) / "bundle"
        image = f"{layout}:img"
        _run(["umoci", "init", "--layout", str(layout)], log_path, "umoci init")
        _run(["umoci", "new", "--image", image], log_path, "umoci new")
        _run(["umoci", "unpack", "--image", image, str(bundle)], log_path, "umoci unpack")
        for i, layer in enumerate(source.layers):
            log(f"  umoci repack of layer {i + 1}/{len(source.layers)}")
            extract_layers([layer.path], bundle / "rootfs")
            refresh = ["--refresh-bundle"] if i < len(source.layers) - 1 else []
            _run(["umoci", "repack", *refresh, "--image", image, str(bundle)], log_path, "umoci repack")
        layers = _oci_layout_layers(layout, "img", staging)
    layers = tuple(dataclasses.replace(x, path=directory / x.path.name) for x in layers)
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    built = dataclasses.replace(
        source,
        name=recipe.name,
        key=key,
        directory=directory,
        layers=layers,
        description=recipe.description,
        build_seconds=time.monotonic() - started,
    )
    built.save(cache_dir)
    log(f"  {built.summary()}")
    return built


def _oci_layout_layers(layout: Path, tag: str, dest: Path) -> list[LayerBlob]:
    """The layers of `tag` in an OCI image layout, copied into `dest` as layer<N>.tar.gz and described
    (digest and size from the manifest, diff ID from the config, entries and whiteouts counted)."""
    index = json.loads((layout / "index.json").read_text())
    wanted = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    if len(wanted) != 1:
        raise BuildError(f"{layout}: {len(wanted)} manifests tagged {tag!r} in index.json")

    def blob(digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return layout / "blobs" / algorithm / hexdigest

    manifest = json.loads(blob(wanted[0]["digest"]).read_text())
    diff_ids = json.loads(blob(manifest["config"]["digest"]).read_text())["rootfs"]["diff_ids"]
    out = []
    for i, (desc, diff_id) in enumerate(zip(manifest["layers"], diff_ids, strict=True)):
        if desc["mediaType"] != OCI_LAYER_GZIP:
            raise BuildError(f"{layout}: layer {desc['digest']} is {desc['mediaType']}, not gzip")
        path = dest / f"layer{i}.tar.gz"
        shutil.copyfile(blob(desc["digest"]), path)
        entries = whiteouts = size = 0
        with gzip.open(path, "rb") as raw:
            while data := raw.read(_CHUNK):
                size += len(data)
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                entries += 1
                whiteouts += member.name.rpartition("/")[2].startswith(".wh.")
        out.append(LayerBlob(path, desc["digest"], desc["size"], diff_id, size, entries, whiteouts))
    return out


# --- pushing --------------------------------------------------------------------------------------


def registry_client() -> RegistryClient:
    """lazysnap's registry client for the benchmark registry (plain HTTP, no credentials)."""
    return RegistryClient(
        hosts=HostsConfig(None, plain_http=True),
        credentials=CredentialStore(Path("/nonexistent/config.json")),
    )


async def push_async(built: BuiltImage, registry_host: str, repo: str, tag: str | None = None) -> str:
    """Push the image as registry_host/repo:tag (tag defaults to built.tag) through lazysnap's registry
    client; blobs the registry has are skipped. Returns the manifest digest."""
    ref = Reference.parse(f"{registry_host}/{repo}:{tag or built.tag}")
    async with registry_client() as client:
        layers = []
        for layer in built.layers:
            digest = await client.upload_blob_file(ref, layer.path, digest=layer.digest)
            layers.append({"mediaType": layer.media_type, "digest": digest, "size": layer.size})
        config = built.config_bytes()
        config_digest = await client.push_blob(ref, config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": layers,
        }
        body = json.dumps(manifest, indent=2).encode()
        return await client.push_manifest(ref, body, OCI_MANIFEST)


def push(built: BuiltImage, registry_host: str, repo: str, tag: str | None = None) -> str:
    """push_async for synchronous callers."""
    return trio.run(push_async, built, registry_host, repo, tag)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"images (default: all): {', '.join(RECIPES)}")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    try:
        for name in args.names or list(RECIPES):
            print(build(name, args.cache_dir).summary(), flush=True)
    except (BuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
