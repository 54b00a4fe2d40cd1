"""What the dynamic loader reads of an ELF file after its header: the parts a lazy read can fetch early.

Starting a program or loading a shared library, the kernel or ld.so reads the ELF header, maps the
segments, and then relocates: it walks the dynamic section and writes the relocated pointers of the
writable segment (`.got`, `.data.rel.ro`, `.data`), which sits near the end of the file. Those pages
are read a few milliseconds after the header, always, whatever the program does next; on a lazily
loaded layer each is a round trip to the registry (a 4 MiB chunk of libpython, libcrypto or libjvm
takes 100-200 ms at 100 Mbit/s). `loader_ranges` finds them in the header's first bytes, so the
fetcher can fetch them while the loader is still mapping.

Only the program headers are read (32- or 64-bit, either byte order); anything malformed, truncated
or absurd gives no ranges: this is a hint, never a reason to fail a read.
"""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC = 1, 2
PF_W = 2
MAX_PHNUM = 64  # real files have 7-15 program headers


def loader_ranges(head: bytes, file_size: int) -> list[tuple[int, int]]:
    """File ranges (offset, length) the loader reads after the header: the dynamic section and the
    writable loadable segments, clipped to the file; [] when `head` is not a usable ELF header."""
    if len(head) < 52 or head[:4] != ELF_MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
        return []
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if wide:
        if len(head) < 64:
            return []
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "Q", head, 32)[0],
            *struct.unpack_from(order + "HH", head, 54),
        )
        entry, need = order + "IIQQQQQQ", 56
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "I", head, 28)[0],
            *struct.unpack_from(order + "HH", head, 42),
        )
        entry, need = order + "IIIIIIII", 32
    if phentsize < need or not 0 < phnum <= MAX_PHNUM or phoff + phnum * phentsize > len(head):
        return []
    ranges = []
    for i in range(phnum):
        fields = struct.unpack_from(entry, head, phoff + i * phentsize)
        if wide:
            p_type, p_flags, p_offset, _vaddr, _paddr, p_filesz = fields[:6]
        else:
            p_type, p_offset, _vaddr, _paddr, p_filesz, _memsz, p_flags = fields[:7]
        if p_type == PT_DYNAMIC or (p_type == PT_LOAD and p_flags & PF_W):
            end = min(p_offset + p_filesz, file_size)
            if p_offset < end:
                ranges.append((p_offset, end - p_offset))
    return ranges
