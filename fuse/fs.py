"""The FUSE filesystem: one pyfuse3 mount serving many read-only layers, one subdirectory each.

The mount root lists the mounted layers by name; `<mount>/<name>/` is a layer's root and an overlayfs
lower directory. A layer appears atomically when added and disappears when removed (reference counted
by its users; removal waits until nothing uses it). Inode numbers are `slot << 40 | local inode`:
the slot is stable per layer (the caller chooses and persists it) and local inodes are a pure function
of the TOC, so a restarted daemon gives the same numbers.

Everything is immutable, so the kernel caches to the full: huge entry and attribute timeouts,
`keep_cache`. Reads go through the fetcher; an error or a timeout is EIO with a log line naming the
image, layer and file. Writes fail with EROFS (the mount is read-only). Mounted with
`default_permissions` so the kernel enforces each file's mode and owner (images carry secrets), and
`allow_other` only together with it; and `nosuid,nodev`, so neither an image's setuid files nor its device
nodes take effect through this mount itself. (An overlayfs over the layers follows its own mount options:
containerd's container roots keep setuid, `lazysnap mount`'s view does not.)

Mounting, serving and unmounting it: `fuse.mount`.

With `record=True` the filesystem remembers which regular files are opened, as (layer name, path), once
each and in the order of their first open (`recorded()`): what a workload reads, for prioritizing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as statmod
from dataclasses import dataclass

import pyfuse3
import trio

from .fetch import Fetcher, FetchTimeout, LayerHandle
from .formats import FormatError
from .formats.index import BLOCK, CHAR, DIR, FIFO, REG, ROOT, SYMLINK

log = logging.getLogger("lazysnap.fs")
SLOT_SHIFT = 40
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
FOREVER = 365 * 24 * 3600.0  # immutable trees: cache entries and attributes for a year
TYPE_BITS = {
    DIR: statmod.S_IFDIR,
    REG: statmod.S_IFREG,
    SYMLINK: statmod.S_IFLNK,
    CHAR: statmod.S_IFCHR,
    BLOCK: statmod.S_IFBLK,
    FIFO: statmod.S_IFIFO,
}
MOUNT_OPTIONS = (
    "fsname=lazysnap",
    "subtype=lazysnap",
    "ro",
    "nosuid",
    "nodev",
    "default_permissions",
    "allow_other",
)


@dataclass
class _Mounted:
    name: str
    slot: int
    handle: LayerHandle
    refs: int = 1  # snapshots (or mounts) using the layer


class LazyFS(pyfuse3.Operations):
    """Operations of the lazysnap mount. Call add_layer/remove_layer from the trio loop."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fetcher: Fetcher, *, record: bool = False):
        super().__init__()
        self.fetcher = fetcher
        self._by_name: dict[str, _Mounted] = {}
        self._by_slot: dict[int, _Mounted] = {}
        self._coming: dict[int, tuple[str, trio.Event]] = {}  # slot -> layer being restored, set when done
        self._lost: set[int] = set()  # slots whose layer could not be restored: their files give EIO
        self._uid, self._gid = os.getuid(), os.getgid()
        self._opened: dict[tuple[str, str], None] | None = {} if record else None  # ordered set
        self.on_init = None  # called from init(), before libfuse answers the kernel's INIT (fuse.mount)

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    def recorded(self) -> list[tuple[str, str]]:
        """(layer name, path) of each regular file opened since the mount, in first-open order; empty
        unless made with `record=True`."""
        return list(self._opened or ())

    # --- layers ----------------------------------------------------------------------------------

    def add_layer(self, name: str, slot: int, handle: LayerHandle) -> None:
        """Show a layer as <mount>/<name>; adding a mounted layer again takes one more reference."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"invalid layer directory name {name!r}")
        existing = self._by_name.get(name)
        if existing is not None and existing.slot == slot:
            existing.refs += 1
            return
        if existing is not None or slot in self._by_slot:
            raise ValueError(f"layer {name!r} or slot {slot} is already mounted")
        if not 0 < slot < 1 << 23:
            raise ValueError(f"slot {slot} out of range")
        m = _Mounted(name, slot, handle)
        self._by_slot[slot] = m
        self._by_name[name] = m  # visible from here on: one dict insertion
        self._lost.discard(slot)
        self._arrived(slot)

    def expect_layer(self, name: str, slot: int) -> None:
        """A layer a previous process served is being restored: requests for it wait until `add_layer`
        (or `lose_layer`) instead of failing, so readers of a running container see a pause, not an
        error."""
        self._coming.setdefault(slot, (name, trio.Event()))  # readers may be waiting on it already

    def lose_layer(self, slot: int) -> None:
        """The layer expected at `slot` cannot be restored: its waiting and later requests fail with EIO."""
        self._lost.add(slot)
        self._arrived(slot)

    def _arrived(self, slot: int) -> None:
        coming = self._coming.pop(slot, None)
        if coming is not None:
            coming[1].set()

    def release_layer(self, name: str) -> bool:
        """Drop one reference; the layer disappears with the last. Returns True when it was removed."""
        m = self._by_name[name]
        m.refs -= 1
        if m.refs > 0:
            return False
        del self._by_name[name]
        del self._by_slot[m.slot]
        m.handle.closed = True
        try:
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode())
        except Exception:  # not mounted (tests drive the operations directly)
            pass
        return True

    def layer_names(self) -> list[str]:
        return sorted(self._by_name)

    # --- helpers ----------------------------------------------------------------------------------

    async def _resolve(self, inode: int) -> tuple[_Mounted, int]:
        slot = inode >> SLOT_SHIFT
        m = self._by_slot.get(slot)
        if m is None:
            coming = self._coming.get(slot)
            if coming is not None:
                await coming[1].wait()
                m = self._by_slot.get(slot)
            if m is None:
                raise pyfuse3.FUSEError(errno.EIO if slot in self._lost else errno.ENOENT)
        return m, inode & LOCAL_MASK

    async def _layer_named(self, name: str) -> _Mounted | None:
        m = self._by_name.get(name)
        if m is None:
            for slot, (coming, arrived) in list(self._coming.items()):
                if coming == name:
                    await arrived.wait()
                    return self._by_slot.get(slot)
        return m

    def _attrs(self, m: _Mounted, local: int) -> pyfuse3.EntryAttributes:
        ix = m.handle.layer.index
        a = pyfuse3.EntryAttributes()
        a.st_ino = (m.slot << SLOT_SHIFT) | local
        a.generation = 0
        a.entry_timeout = a.attr_timeout = FOREVER
        kind = ix.kind[local]
        a.st_mode = TYPE_BITS[kind] | ix.mode[local]
        a.st_nlink = ix.nlink[local]
        a.st_uid, a.st_gid = ix.uid[local], ix.gid[local]
        if kind in (CHAR, BLOCK):
            major, minor = ix.rdev.get(local, (0, 0))
            a.st_rdev = os.makedev(major, minor)
        a.st_size = ix.size[local]
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ix.mtime[local]
        return a

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.ROOT_INODE
        a.entry_timeout, a.attr_timeout = 0, 1.0  # the layer list changes
        a.st_mode = statmod.S_IFDIR | 0o711
        a.st_nlink = 2 + len(self._by_name)
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_blksize = 4096
        return a

    # --- operations -------------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        text = os.fsdecode(name)
        if parent_inode == pyfuse3.ROOT_INODE:
            m = await self._layer_named(text)
            if m is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(m, ROOT)
        m, local = await self._resolve(parent_inode)
        child = m.handle.layer.index.lookup(local, text)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(m, child)

    async def getattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attrs()
        m, local = await self._resolve(inode)
        return self._attrs(m, local)

    async def readlink(self, inode, ctx):
        m, local = await self._resolve(inode)
        try:
            return os.fsencode(m.handle.layer.index.readlink(local))
        except KeyError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            m, local = await self._resolve(inode)
            if m.handle.layer.index.kind[local] != DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if fh == pyfuse3.ROOT_INODE:
            for _name, arrived in list(self._coming.values()):  # the listing includes layers restored
                await arrived.wait()
            entries = [(name, self._by_name[name], ROOT) for name in sorted(self._by_name)]
            for i in range(start_id, len(entries)):
                name, m, local = entries[i]
                if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(m, local), i + 1):
                    return
            return
        m, local = await self._resolve(fh)
        children = m.handle.layer.index.children(local)
        for i in range(start_id, len(children)):
            name, child = children[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(m, child), i + 1):
                return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        m, local = await self._resolve(inode)
        if m.handle.layer.index.kind[local] != REG:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self._opened is not None:
            self._opened.setdefault((m.name, m.handle.layer.index.path(local)), None)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        m, local = await self._resolve(fh)
        try:
            return await self.fetcher.read(m.handle, local, off, size)
        except (FetchTimeout, FormatError, OSError, trio.TooSlowError) as e:
            log.error(
                "read failed: %s: %s (offset %d, %d bytes): %s",
                m.handle.name,
                m.handle.layer.index.path(local),
                off,
                size,
                e,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as e:  # registry errors and the like: EIO, never a crashed daemon
            log.error(
                "read failed: %s: %s: %s: %s",
                m.handle.name,
                m.handle.layer.index.path(local),
                type(e).__name__,
                e,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):
        pass  # file handles are inode numbers: nothing to free (and one opened by an earlier daemon)

    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        m, local = await self._resolve(inode)
        value = m.handle.layer.index.xattr(local, os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            return []
        m, local = await self._resolve(inode)
        return [os.fsencode(n) for n in m.handle.layer.index.xattr_names(local)]

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(sum(m.handle.layer.index.size) for m in self._by_name.values())
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(m.handle.layer.index.inode_count for m in self._by_name.values()) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s
