"""fuse.elf: the ranges the dynamic loader reads right after an ELF header."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest
import trio

from fuse.ahead import needed
from fuse.elf import interpreter, library_dirs, loader_ranges, parse_header
from tests.harness import images as im

PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE = 1, 2, 3, 4
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RUNPATH = 0, 1, 5, 10, 29
R, W, X = 4, 2, 1


def elf(wide: bool, order: str, phdrs: list[tuple[int, int, int, int]]) -> bytes:
    """An ELF header and program headers (type, flags, offset, filesz), as a linker lays them out."""
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if order == "<" else 2, 1]) + bytes(9)
    if wide:
        head = ident + struct.pack(
            order + "HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0
        )
        table = b"".join(struct.pack(order + "IIQQQQQQ", t, f, o, o, o, n, n, 8) for t, f, o, n in phdrs)
    else:
        head = ident + struct.pack(
            order + "HHIIIIIHHHHHH", 3, 20, 1, 0, 52, 0, 0, 52, 32, len(phdrs), 40, 0, 0
        )
        table = b"".join(struct.pack(order + "IIIIIIII", t, o, o, o, n, n, f, 8) for t, f, o, n in phdrs)
    return head + table


LAYOUT = [
    (PT_LOAD, R, 0, 0x1000),
    (PT_LOAD, R | X, 0x1000, 0x50000),
    (PT_NOTE, R, 0x200, 0x40),
    (PT_LOAD, R | W, 0x60000, 0x8000),
    (PT_DYNAMIC, R | W, 0x62000, 0x200),
]


@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("order", ["<", ">"])
def test_the_dynamic_section_and_the_writable_segment(wide: bool, order: str) -> None:
    assert loader_ranges(elf(wide, order, LAYOUT), 0x70000) == [(0x60000, 0x8000), (0x62000, 0x200)]


def test_ranges_are_clipped_to_the_file() -> None:
    # a header that claims more than the file holds (a truncated or hostile file) asks for the file only
    assert loader_ranges(elf(True, "<", LAYOUT), 0x61000) == [(0x60000, 0x1000)]
    assert loader_ranges(elf(True, "<", LAYOUT), 0x50000) == []


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\x7fELF",
        b"#!/bin/sh\n" + bytes(100),
        elf(True, "<", LAYOUT)[:100],  # program headers cut off
        elf(True, "<", LAYOUT).replace(b"\x7fELF\x02", b"\x7fELF\x03", 1),  # no such class
        elf(True, "<", LAYOUT)[:56] + struct.pack("<H", 0) + elf(True, "<", LAYOUT)[58:],  # no phnum
        elf(True, "<", LAYOUT)[:54] + struct.pack("<H", 8) + elf(True, "<", LAYOUT)[56:],  # phentsize
        elf(True, "<", [(PT_LOAD, R | W, 0, 16)] * 100),  # more program headers than real files have
    ],
)
def test_what_is_not_a_usable_header_gives_nothing(head: bytes) -> None:
    assert loader_ranges(head, 1 << 20) == []


def test_a_real_executable_agrees_with_readelf() -> None:
    path = os.path.realpath(sys.executable)
    with open(path, "rb") as f:
        head = f.read(16384)
    got = loader_ranges(head, os.path.getsize(path))
    assert got, f"{path}: no dynamic section found"
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    want = []
    for line in subprocess.run(
        ["readelf", "-lW", path], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        f = line.split()
        if f and (f[0] == "DYNAMIC" or (f[0] == "LOAD" and "W" in "".join(f[6:-1]))):
            want.append((int(f[1], 16), int(f[4], 16)))
    assert got == want


def program(
    size: int,
    needs: list[str],
    *,
    interp: str | None = "/lib64/ld-linux-x86-64.so.2",
    runpath: str | None = None,
    dynamic_at: int | None = None,
    wide: bool = True,
    order: str = "<",
) -> bytes:
    """A dynamically linked ELF file as a linker lays it out: the interpreter's path and the dynamic
    string table in the first (read-only) segment, the dynamic section in the writable one at
    `dynamic_at` (default: the last 4 KiB), pseudo-random code in between."""
    dynamic_at = size - 4096 if dynamic_at is None else dynamic_at
    base = 0x400000  # where the read-only segment is mapped; the writable one one page further
    strtab = b"\0"
    offsets = []
    for name in [*needs, *([runpath] if runpath else [])]:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    entries = [(DT_NEEDED, off) for off in offsets[: len(needs)]]
    entries += [(DT_STRTAB, base + 0x800), (DT_STRSZ, len(strtab))]
    entries += [(DT_RUNPATH, offsets[-1])] if runpath else []
    entries += [(DT_NULL, 0)]
    dynamic = b"".join(struct.pack(order + ("qQ" if wide else "iI"), t, v) for t, v in entries)
    phdrs = [(PT_LOAD, R | X, 0, dynamic_at)]
    if interp:
        phdrs.append((PT_INTERP, R, 0x400, len(interp) + 1))
    phdrs += [(PT_LOAD, R | W, dynamic_at, len(dynamic)), (PT_DYNAMIC, R | W, dynamic_at, len(dynamic))]
    head = bytearray(elf(wide, order, phdrs))
    # vaddr = base + offset for the first segment, + one page for the second: patch the headers
    ph = 64 if wide else 52
    for i, (_t, _f, off, _n) in enumerate(phdrs):
        vaddr = base + off + (0x1000 if off >= dynamic_at else 0)
        at = ph + i * (56 if wide else 32) + (16 if wide else 8)
        struct.pack_into(order + ("Q" if wide else "I"), head, at, vaddr)
    body = bytearray(im.pseudo_random(size, seed=len(needs)))
    body[: len(head)] = head
    if interp:
        body[0x400 : 0x400 + len(interp) + 1] = interp.encode() + b"\0"
    body[0x800 : 0x800 + len(strtab)] = strtab
    body[dynamic_at : dynamic_at + len(dynamic)] = dynamic
    return bytes(body)


async def needs_of(data: bytes) -> tuple[str | None, list[str], str | None]:
    header = parse_header(data[:16384])
    assert header is not None

    async def read(offset: int, n: int) -> bytes:
        return data[offset : offset + n]

    return (interpreter(header, data[:16384]), *await needed(header, read))


@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("order", ["<", ">"])
async def test_what_a_program_needs(wide: bool, order: str) -> None:
    data = program(
        64 << 10, ["libfoo.so.1", "libc.so.6"], runpath="$ORIGIN/../lib:/opt/x", wide=wide, order=order
    )
    assert await needs_of(data) == (
        "/lib64/ld-linux-x86-64.so.2",
        ["libfoo.so.1", "libc.so.6"],
        "$ORIGIN/../lib:/opt/x",
    )
    assert await needs_of(program(64 << 10, [], interp=None)) == (None, [], None)


async def test_a_dynamic_section_that_lies_gives_nothing_usable() -> None:
    data = bytearray(program(64 << 10, ["libfoo.so.1"]))
    struct.pack_into("<qQ", data, len(data) - 4096 + 16, DT_STRTAB, 0x7FFF_0000)  # a table in no segment
    assert await needs_of(bytes(data)) == ("/lib64/ld-linux-x86-64.so.2", [], None)
    data = bytearray(program(64 << 10, ["libfoo.so.1"]))
    struct.pack_into("<qQ", data, len(data) - 4096, DT_NEEDED, 1 << 40)  # a name far outside the table
    assert (await needs_of(bytes(data)))[1] == []


def test_where_the_loader_looks() -> None:
    header = parse_header(program(64 << 10, []))
    assert header is not None
    assert library_dirs(header, "$ORIGIN/../lib:relative:/opt/x", "/app/bin") == [
        "/app/lib",
        "/opt/x",
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
    ]


def test_a_real_program_needs_what_readelf_says() -> None:
    path = os.path.realpath(sys.executable)
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    with open(path, "rb") as f:
        data = f.read()
    out = subprocess.run(["readelf", "-dlW", path], capture_output=True, text=True, check=True).stdout
    want_needed = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    interp = [line.split(": ")[1].rstrip("]") for line in out.splitlines() if "interpreter:" in line]
    paths = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "PATH)" in line]
    assert trio.run(needs_of, data) == (
        interp[0] if interp else None,
        want_needed,
        paths[0] if paths else None,
    )


async def test_a_lying_string_table_is_read_no_further_than_real_ones_reach() -> None:
    # names 3 MiB apart in a table that claims 1 GiB: what is read stays within MAX_STRINGS
    from fuse.ahead import MAX_STRINGS

    data = bytearray(program(4 << 20, ["libfoo.so.1", "libbar.so.2"]))
    at = len(data) - 4096
    struct.pack_into("<qQ", data, at + 16, DT_NEEDED, 3 << 20)
    struct.pack_into("<qQ", data, at + 48, DT_STRSZ, 1 << 30)
    header = parse_header(bytes(data[:16384]))
    assert header is not None
    asked: list[int] = []

    async def read(offset: int, n: int) -> bytes:
        asked.append(n)
        return bytes(data[offset : offset + n])

    names, _ = await needed(header, read)
    assert names == ["libfoo.so.1"] and max(asked) <= MAX_STRINGS
