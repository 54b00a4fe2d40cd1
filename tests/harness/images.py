"""Build OCI images from a Python description and push them to a registry.

An :class:`Image` is a stack of :class:`Layer` objects; a layer is a sequence of entries
(:class:`File`, :class:`Dir`, :class:`Symlink`, :class:`Hardlink`, :class:`CharDev`, :class:`BlockDev`,
:class:`Fifo`, and the overlay markers :class:`Whiteout` and :class:`Opaque`). From that description
this module produces

* each layer's tar (PAX format, entries in the given order, no implied parent directories), its
  compressed blob and diff ID;
* the image config, and OCI or Docker schema 2 manifests and indexes, pushed over the registry
  distribution API with :func:`push_image` and :func:`push_index`;
* :meth:`Image.expected_tree`, the file tree a container should see once all layers are applied.

All paths are relative POSIX paths without a leading slash.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import posixpath
import random
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from functools import cached_property

import trio
import zstandard

from fuse.registry import Reference, RegistryClient
from tests.harness import trees
from tests.harness.registry import anonymous_client

DEFAULT_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
CREATED = "2023-11-14T22:13:20Z"
UPLOAD_CHUNK = 1 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = {
    "none": "application/vnd.docker.image.rootfs.diff.tar",
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


# --- layer entries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(frozen=True)
class Hardlink:
    """A second name for ``target``, a non-directory path already present (normally in this layer)."""

    path: str
    target: str


@dataclass(frozen=True)
class CharDev:
    path: str
    major: int
    minor: int
    mode: int = 0o666
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(frozen=True)
class BlockDev:
    path: str
    major: int
    minor: int
    mode: int = 0o660
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(frozen=True)
class Fifo:
    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(frozen=True)
class Whiteout:
    """Removes ``path`` (and everything below it) of the lower layers."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides all lower-layer content of directory ``path``; the directory itself stays."""

    path: str


Entry = File | Dir | Symlink | Hardlink | CharDev | BlockDev | Fifo | Whiteout | Opaque


# --- data helpers ---------------------------------------------------------------------------------


def pseudo_random(n: int, seed: int) -> bytes:
    """``n`` deterministic, incompressible bytes (made in 64 MiB pieces: randbytes has a size limit)."""
    rng = random.Random(seed)
    piece = 64 << 20
    return b"".join(rng.randbytes(min(piece, n - off)) for off in range(0, n, piece)) if n else b""


def zero_runs(n: int, seed: int, *, gap: int = 1 << 20, island: int = 4096) -> bytes:
    """``n`` bytes of zeros with an ``island`` of pseudo-random bytes at every multiple of ``gap``."""
    data = bytearray(n)
    rng = random.Random(seed)
    for offset in range(0, n, gap):
        length = min(island, n - offset)
        data[offset : offset + length] = rng.randbytes(length)
    return bytes(data)


# --- layers ---------------------------------------------------------------------------------------


def _whiteout_name(path: str) -> str:
    parent, name = posixpath.split(path)
    return posixpath.join(parent, ".wh." + name)


def _tar_member(entry: Entry, link_target: Entry | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    """The tar header (and data) of an entry. A hardlink's header carries its target's metadata, as
    tar writers record the shared inode; extractors such as containerd apply it to that inode."""
    if isinstance(entry, Whiteout):
        return tarfile.TarInfo(_whiteout_name(entry.path)), b""
    if isinstance(entry, Opaque):
        return tarfile.TarInfo(posixpath.join(entry.path, ".wh..wh..opq")), b""
    info = tarfile.TarInfo(entry.path)
    if isinstance(entry, Hardlink):
        if link_target is not None:
            info, _ = _tar_member(link_target)
            info.name = entry.path
        info.type, info.linkname, info.size = tarfile.LNKTYPE, entry.target, 0
        return info, None
    info.uid, info.gid, info.mtime = entry.uid, entry.gid, entry.mtime
    data = None
    if isinstance(entry, File):
        info.mode, data = entry.mode, entry.data
    elif isinstance(entry, Dir):
        info.type, info.mode = tarfile.DIRTYPE, entry.mode
    elif isinstance(entry, Symlink):
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
    elif isinstance(entry, Fifo):
        info.type, info.mode = tarfile.FIFOTYPE, entry.mode
    else:
        info.type = tarfile.CHRTYPE if isinstance(entry, CharDev) else tarfile.BLKTYPE
        info.mode, info.devmajor, info.devminor = entry.mode, entry.major, entry.minor
    # tarfile writes str PAX values as UTF-8, or, when one holds surrogates, all of them as raw
    # bytes (hdrcharset=BINARY); surrogateescape makes any xattr value come out byte for byte.
    info.pax_headers = {
        f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
        for name, value in getattr(entry, "xattrs", {}).items()
    }
    return info, data


@dataclass
class Layer:
    entries: Sequence[Entry]

    def __post_init__(self) -> None:
        self.entries = tuple(self.entries)
        for entry in self.entries:
            if entry.path.startswith("/") or entry.path.endswith("/") or not entry.path:
                raise ValueError(f"paths must be relative, without a trailing slash: {entry.path!r}")

    @cached_property
    def _tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            by_path: dict[str, Entry] = {}
            for entry in self.entries:
                target = by_path.get(entry.target) if isinstance(entry, Hardlink) else None
                info, data = _tar_member(entry, target)
                by_path[entry.path] = entry
                if data is None:
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    def tar(self) -> bytes:
        """The uncompressed layer: PAX tar, one member per entry, in entry order."""
        return self._tar

    def blob(self, compression: str) -> bytes:
        """The layer blob: ``compression`` is "gzip", "zstd" or "none"."""
        return compress(self._tar, compression)

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self._tar).hexdigest()

    def overlay_tree(self) -> trees.Tree:
        """This layer alone as an overlayfs lower directory shows it (as lazysnap's FUSE layers do):
        a whiteout is a character device 0/0 (mode 0, root) named after what it hides, an opaque
        marker sets `trusted.overlay.opaque=y` on its directory, missing parents are implicit dirs."""
        fs = _Rootfs()
        opaque: set[str] = set()
        for entry in self.entries:
            fs.make_parents(entry.path)
            if isinstance(entry, Whiteout):
                fs.put(entry.path, trees.Node("char", 0, rdev=(0, 0), mtime=0, xattrs={}))
            elif isinstance(entry, Opaque):
                opaque.add(entry.path)
            elif isinstance(entry, Hardlink):
                fs.put(entry.path, fs.nodes[entry.target], inode=fs.inodes[entry.target])
            else:
                fs.put(entry.path, _entry_node(entry))
        for path in opaque:
            node = fs.nodes[path]
            fs.nodes[path] = dataclasses.replace(
                node, xattrs={**(node.xattrs or {}), "trusted.overlay.opaque": b"y"}
            )
        return fs.tree()


def compress(tar: bytes, compression: str) -> bytes:
    """A layer blob from its tar: ``compression`` is "gzip", "zstd" or "none"."""
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    if compression == "none":
        return tar
    raise ValueError(f"unknown compression {compression!r}")


@dataclass(frozen=True)
class TarLayer:
    """A layer whose tar another tool made (GNU tar, umoci): pushed byte for byte as that tool wrote
    it. It has no entries, so an image holding one has no :meth:`Image.expected_tree`: compare such
    images with a full pull instead."""

    data: bytes

    def tar(self) -> bytes:
        return self.data

    def blob(self, compression: str) -> bytes:
        return compress(self.data, compression)

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


# --- images and the tree they produce -------------------------------------------------------------


def _entry_node(entry: Entry) -> trees.Node:
    if isinstance(entry, File):
        digest = hashlib.sha256(entry.data).hexdigest()
        return trees.Node(
            "reg",
            entry.mode,
            entry.uid,
            entry.gid,
            len(entry.data),
            digest,
            mtime=entry.mtime,
            xattrs=dict(entry.xattrs),
        )
    if isinstance(entry, Dir):
        return trees.Node("dir", entry.mode, entry.uid, entry.gid, xattrs=dict(entry.xattrs))
    if isinstance(entry, Symlink):
        return trees.Node(
            "symlink", 0o777, entry.uid, entry.gid, target=entry.target, mtime=entry.mtime, xattrs={}
        )
    if isinstance(entry, Fifo):
        return trees.Node("fifo", entry.mode, entry.uid, entry.gid, mtime=entry.mtime, xattrs={})
    assert isinstance(entry, CharDev | BlockDev)
    kind = "char" if isinstance(entry, CharDev) else "block"
    return trees.Node(
        kind, entry.mode, entry.uid, entry.gid, rdev=(entry.major, entry.minor), mtime=entry.mtime, xattrs={}
    )


_IMPLICIT_DIR = trees.Node("dir", 0o755, xattrs={})


class _Rootfs:
    """The merged view while applying layers: nodes by path, and an inode number per non-directory."""

    def __init__(self) -> None:
        self.nodes: dict[str, trees.Node] = {}
        self.inodes: dict[str, int] = {}
        self._next_inode = 0

    def clear_dir(self, path: str) -> None:
        for p in [p for p in self.nodes if p.startswith(path + "/")]:
            del self.nodes[p]
            self.inodes.pop(p, None)

    def remove(self, path: str) -> None:
        node = self.nodes.pop(path, None)
        self.inodes.pop(path, None)
        if node is not None and node.kind == "dir":
            self.clear_dir(path)

    def make_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.put("/".join(parts[:i]), _IMPLICIT_DIR, keep_existing_dir=True)

    def put(
        self, path: str, node: trees.Node, *, inode: int | None = None, keep_existing_dir: bool = False
    ) -> None:
        existing = self.nodes.get(path)
        if existing is not None and existing.kind == "dir" and node.kind == "dir":
            if not keep_existing_dir:
                self.nodes[path] = node  # a directory over a directory merges: children stay
            return
        self.remove(path)
        self.nodes[path] = node
        if node.kind != "dir":
            if inode is None:
                inode, self._next_inode = self._next_inode, self._next_inode + 1
            self.inodes[path] = inode

    def tree(self) -> trees.Tree:
        by_inode: dict[int, set[str]] = {}
        for path, inode in self.inodes.items():
            by_inode.setdefault(inode, set()).add(path)
        return trees.Tree(dict(self.nodes), {frozenset(g) for g in by_inode.values() if len(g) > 1})


@dataclass
class Image:
    layers: Sequence[Layer | TarLayer]
    _: KW_ONLY
    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    cmd: list[str] | None = None
    env: list[str] | None = None

    def config(self, diff_ids: Sequence[str] | None = None) -> dict:
        """The OCI image config; ``diff_ids`` default to the layers' own."""
        diff_ids = [layer.diff_id for layer in self.layers] if diff_ids is None else list(diff_ids)
        container_config: dict[str, object] = {"Env": self.env if self.env is not None else DEFAULT_ENV}
        if self.cmd is not None:
            container_config["Cmd"] = self.cmd
        config = {
            "created": CREATED,
            "architecture": self.architecture,
            "os": self.os,
            "config": container_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": CREATED, "created_by": f"lazysnap test layer {i}"} for i in range(len(diff_ids))
            ],
        }
        if self.variant is not None:
            config["variant"] = self.variant
        return config

    def expected_tree(self) -> trees.Tree:
        """The tree a container sees after all layers are applied with OCI/overlay semantics.

        Whiteouts and opaque markers affect only lower layers (they are applied before the layer's
        other entries); missing parents appear as directories 0755 root:root; directory mtimes are
        ``None`` because extraction does not preserve them.
        """
        if any(isinstance(layer, TarLayer) for layer in self.layers):
            raise TypeError("an image with a TarLayer has no expected tree: compare it with a full pull")
        fs = _Rootfs()
        for layer in self.layers:
            for entry in layer.entries:
                if isinstance(entry, Whiteout):
                    fs.make_parents(entry.path)
                    fs.remove(entry.path)
                elif isinstance(entry, Opaque):
                    fs.make_parents(entry.path)
                    fs.put(entry.path, _IMPLICIT_DIR, keep_existing_dir=True)
                    fs.clear_dir(entry.path)
            for entry in layer.entries:
                if isinstance(entry, Whiteout | Opaque):
                    continue
                fs.make_parents(entry.path)
                if isinstance(entry, Hardlink):
                    target = fs.nodes.get(entry.target)
                    if target is None or target.kind == "dir":
                        raise ValueError(f"hard link {entry.path!r} to missing or directory {entry.target!r}")
                    fs.put(entry.path, target, inode=fs.inodes[entry.target])
                else:
                    fs.put(entry.path, _entry_node(entry))
        return fs.tree()


# --- pushing --------------------------------------------------------------------------------------


def _check_options(compression: str, manifest_format: str) -> None:
    if manifest_format not in ("oci", "docker"):
        raise ValueError(f"manifest_format must be 'oci' or 'docker', not {manifest_format!r}")
    if compression not in OCI_LAYER:
        raise ValueError(f"unknown compression {compression!r}")
    if manifest_format == "docker" and compression not in DOCKER_LAYER:
        raise ValueError(f"Docker schema 2 has no media type for {compression!r} layers")


def _client(chunked_upload: bool) -> RegistryClient:
    return anonymous_client(upload_chunk=UPLOAD_CHUNK if chunked_upload else 0)


def _reference(base_url: str, repo: str, tag: str | None) -> Reference:
    host = base_url.split("://", 1)[-1].rstrip("/")
    return Reference.parse(f"{host}/{repo}:{tag or 'untagged'}")


async def _push_manifest(
    client: RegistryClient,
    ref: Reference,
    tagged: bool,
    image: Image,
    compression: str,
    manifest_format: str,
) -> dict:
    """Push the image's blobs and manifest (under ref's tag, or by digest); return its descriptor."""
    if manifest_format == "oci":
        layer_types, config_type, manifest_type = OCI_LAYER, OCI_CONFIG, OCI_MANIFEST
    else:
        layer_types, config_type, manifest_type = DOCKER_LAYER, DOCKER_CONFIG, DOCKER_MANIFEST
    layers = []
    for layer in image.layers:
        blob = layer.blob(compression)
        digest = await client.push_blob(ref, blob)
        layers.append({"mediaType": layer_types[compression], "digest": digest, "size": len(blob)})
    config = json.dumps(image.config(), indent=2).encode()
    config_digest = await client.push_blob(ref, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
        "layers": layers,
    }
    return await _put_manifest(client, ref, tagged, manifest)


async def _put_manifest(client: RegistryClient, ref: Reference, tagged: bool, manifest: dict) -> dict:
    body = json.dumps(manifest, indent=2).encode()
    target = ref if tagged else dataclasses.replace(ref, tag=None, digest=_digest(body))
    digest = await client.push_manifest(target, body, manifest["mediaType"])
    return {"mediaType": manifest["mediaType"], "digest": digest, "size": len(body)}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_image_async(
    base_url: str,
    repo: str,
    tag: str,
    image: Image,
    *,
    compression: str = "gzip",
    manifest_format: str = "oci",
    chunked_upload: bool = False,
) -> str:
    """Push ``image`` as ``repo:tag`` to the plain-HTTP registry at ``base_url`` through lazysnap's
    registry client; return the manifest digest.

    ``compression`` is "gzip", "zstd" or "none"; ``manifest_format`` is "oci" or "docker" (schema 2,
    which has no zstd layers). Blobs already present are skipped; others are uploaded in one PUT, or
    with ``chunked_upload`` as PATCHes of ``UPLOAD_CHUNK`` bytes and a closing PUT.
    """
    _check_options(compression, manifest_format)
    async with _client(chunked_upload) as client:
        ref = _reference(base_url, repo, tag)
        descriptor = await _push_manifest(client, ref, True, image, compression, manifest_format)
    return descriptor["digest"]


async def push_index_async(
    base_url: str,
    repo: str,
    tag: str,
    images: Mapping[str, Image],
    *,
    compression: str = "gzip",
    manifest_format: str = "oci",
    chunked_upload: bool = False,
) -> str:
    """Push a multi-platform image as ``repo:tag``; return the index (manifest list) digest.

    ``images`` maps platforms such as "linux/amd64" or "linux/arm64/v8" to images; each image's
    os/architecture/variant are taken from its key. Each manifest is pushed by digest, then an OCI
    index (``manifest_format="oci"``) or a Docker manifest list (``"docker"``) under ``tag``.
    """
    _check_options(compression, manifest_format)
    manifests = []
    async with _client(chunked_upload) as client:
        ref = _reference(base_url, repo, tag)
        for key, image in images.items():
            os_name, architecture, *variant = key.split("/")
            platform = {"architecture": architecture, "os": os_name} | (
                {"variant": variant[0]} if variant else {}
            )
            image = dataclasses.replace(
                image, os=os_name, architecture=architecture, variant=platform.get("variant")
            )
            descriptor = await _push_manifest(client, ref, False, image, compression, manifest_format)
            manifests.append(descriptor | {"platform": platform})
        index_type = OCI_INDEX if manifest_format == "oci" else DOCKER_MANIFEST_LIST
        index = {"schemaVersion": 2, "mediaType": index_type, "manifests": manifests}
        return (await _put_manifest(client, ref, True, index))["digest"]


def push_image(*args, **kw) -> str:
    """push_image_async for synchronous callers (tests that are not async)."""
    return trio.run(functools.partial(push_image_async, *args, **kw))


def push_index(*args, **kw) -> str:
    """push_index_async for synchronous callers."""
    return trio.run(functools.partial(push_index_async, *args, **kw))
