"""fuse.elf: the ranges the dynamic loader reads right after an ELF header."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest

from fuse.elf import loader_ranges

PT_LOAD, PT_DYNAMIC, PT_NOTE = 1, 2, 4
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
