"""What starting a program reads of its ELF files, known early enough to fetch it ahead of the reads.

Starting a program or loading a shared library, the kernel or ld.so reads the ELF header, maps the
segments, and then relocates: it walks the dynamic section and writes the relocated pointers of the
writable segment (`.got`, `.data.rel.ro`, `.data`), which sits near the end of the file. Those pages
are read a few milliseconds after the header, always, whatever the program does next; on a lazily
loaded layer each is a round trip to the registry (a 4 MiB chunk of libpython, libcrypto or libjvm
takes 100-200 ms at 100 Mbit/s). `loader_ranges` finds them in the header's first bytes, so the
fetcher can fetch them while the loader is still mapping.

The loader then opens the program's interpreter (`PT_INTERP`) and every library its dynamic section
names (`DT_NEEDED`), found in `DT_RUNPATH`/`DT_RPATH` and the system's library directories, and each
of those in turn: one round trip after another, each after the last library's header and dynamic
section came in. `needed` and `interpreter` read those names, `library_dirs` says where the loader
looks, so the fetcher can fetch all the heads at once.

Only program headers, the dynamic section and the strings it names are read (32- or 64-bit, either
byte order); anything malformed, truncated or absurd gives nothing: this is a hint, never a reason to
fail a read.
"""

from __future__ import annotations

import posixpath
import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
PF_W = 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29
MAX_PHNUM = 64  # real files have 7-15 program headers
MAX_DYNAMIC = 64 << 10  # bytes of dynamic section read (real ones: 0.5-2 KiB)
MAX_NAME = 4096  # a library name or search path, as the loader reads it
# where glibc's and musl's loaders look when RUNPATH does not say, by e_machine (the multiarch triplet)
MULTIARCH = {62: "x86_64-linux-gnu", 183: "aarch64-linux-gnu", 3: "i386-linux-gnu", 40: "arm-linux-gnueabihf"}
MULTIARCH |= {21: "powerpc64le-linux-gnu", 22: "s390x-linux-gnu", 243: "riscv64-linux-gnu"}


@dataclass(frozen=True)
class Segment:
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int


@dataclass(frozen=True)
class Header:
    wide: bool  # ELFCLASS64
    order: str  # struct byte order
    machine: int
    segments: tuple[Segment, ...]

    def find(self, kind: int) -> Segment | None:
        return next((s for s in self.segments if s.type == kind), None)

    def file_offset(self, vaddr: int) -> int | None:
        """Where the byte mapped at `vaddr` is in the file (None: in no loaded segment's file part)."""
        for s in self.segments:
            if s.type == PT_LOAD and s.vaddr <= vaddr < s.vaddr + s.filesz:
                return s.offset + vaddr - s.vaddr
        return None


def parse_header(head: bytes) -> Header | None:
    """The ELF header and program headers at the start of a file; None when `head` is not one."""
    if len(head) < 52 or head[:4] != ELF_MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if wide and len(head) < 64:
        return None
    machine = struct.unpack_from(order + "H", head, 18)[0]
    # e_phoff, then e_phentsize and e_phnum; an Elf64_Phdr is 56 bytes, an Elf32_Phdr 32
    (phoff,) = struct.unpack_from(order + ("Q" if wide else "I"), head, 32 if wide else 28)
    phentsize, phnum = struct.unpack_from(order + "HH", head, 54 if wide else 42)
    entry, need = (order + "IIQQQQ", 56) if wide else (order + "IIIIII", 32)
    if phentsize < need or not 0 < phnum <= MAX_PHNUM or phoff + phnum * phentsize > len(head):
        return None
    segments = []
    for i in range(phnum):
        fields = struct.unpack_from(entry, head, phoff + i * phentsize)
        if wide:
            p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz = fields
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz, _memsz = fields
            p_flags = struct.unpack_from(order + "I", head, phoff + i * phentsize + 24)[0]
        segments.append(Segment(p_type, p_flags, p_offset, p_vaddr, p_filesz))
    return Header(wide, order, machine, tuple(segments))


def loader_ranges(head: bytes, file_size: int) -> list[tuple[int, int]]:
    """File ranges (offset, length) the loader reads after the header: the dynamic section and the
    writable loadable segments, clipped to the file; [] when `head` is not a usable ELF header."""
    header = parse_header(head)
    if header is None:
        return []
    ranges = []
    for s in header.segments:
        if s.type == PT_DYNAMIC or (s.type == PT_LOAD and s.flags & PF_W):
            end = min(s.offset + s.filesz, file_size)
            if s.offset < end:
                ranges.append((s.offset, end - s.offset))
    return ranges


def interpreter(header: Header, head: bytes) -> str | None:
    """The program interpreter (`PT_INTERP`, e.g. /lib64/ld-linux-x86-64.so.2) when `head` holds it."""
    s = header.find(PT_INTERP)
    if s is None or not 0 < s.filesz <= MAX_NAME or s.offset + s.filesz > len(head):
        return None
    name = head[s.offset : s.offset + s.filesz].split(b"\0", 1)[0]
    return name.decode("utf-8", "replace") if name.startswith(b"/") else None


def dynamic_range(header: Header) -> tuple[int, int] | None:
    """(offset, length) of the dynamic section, bounded by MAX_DYNAMIC."""
    s = header.find(PT_DYNAMIC)
    if s is None or s.filesz <= 0:
        return None
    return s.offset, min(s.filesz, MAX_DYNAMIC)


@dataclass(frozen=True)
class Dynamic:
    strtab: int | None  # file offset of the dynamic string table
    strsz: int
    needed: tuple[int, ...]  # offsets of DT_NEEDED names in the string table
    runpath: int | None  # offset of DT_RUNPATH (or DT_RPATH when there is no RUNPATH)


def parse_dynamic(header: Header, data: bytes) -> Dynamic:
    """The entries of a dynamic section that name libraries and where to look for them."""
    fmt = header.order + ("qQ" if header.wide else "iI")
    size = struct.calcsize(fmt)
    needed, strtab, strsz, runpath, rpath = [], None, 0, None, None
    for pos in range(0, len(data) - size + 1, size):
        tag, value = struct.unpack_from(fmt, data, pos)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed.append(value)
        elif tag == DT_STRTAB:
            strtab = header.file_offset(value)
        elif tag == DT_STRSZ:
            strsz = value
        elif tag == DT_RUNPATH:
            runpath = value
        elif tag == DT_RPATH:
            rpath = value
    return Dynamic(strtab, strsz, tuple(needed[:MAX_PHNUM]), runpath if runpath is not None else rpath)


def string_at(table: bytes, offset: int) -> str | None:
    """The NUL-terminated string at `offset` of a string table (None: outside it, or unterminated)."""
    if not 0 <= offset < len(table):
        return None
    end = table.find(b"\0", offset, offset + MAX_NAME)
    return table[offset:end].decode("utf-8", "replace") if end > offset else None


def library_dirs(header: Header, runpath: str | None, origin: str) -> list[str]:
    """Where the loader looks for a library without a slash in its name: RUNPATH/RPATH ($ORIGIN is
    the directory of the file that needs it), then the system directories of glibc (multiarch and
    lib64 first) and musl."""
    given = (runpath or "").split(":")
    dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in given if d]
    triplet = MULTIARCH.get(header.machine)
    system = [f"/lib/{triplet}", f"/usr/lib/{triplet}"] if triplet else []
    system += ["/lib64", "/usr/lib64"] if header.wide else []
    system += ["/lib", "/usr/lib", "/usr/local/lib"]
    return [posixpath.normpath(d) for d in dirs if d.startswith("/")] + system
