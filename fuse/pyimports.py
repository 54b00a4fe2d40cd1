"""What Python imports next, read from a compiled module (`__pycache__/*.pyc`) as it arrives.

A Python program starts by importing module after module, each one a file read that waits for the
registry before the next import is even known. The imports a module makes when it is imported are in
its compiled module-level code: `IMPORT_NAME` (`import a.b`, `from a import b`) and `IMPORT_FROM` (the
`b`, which may be a submodule) name them. `imports` reads them out of a .pyc: a marshal reader of our
own (marshal itself is not safe against hostile data; this one only walks bytes, bounded in depth,
count and size, and never builds more than the strings it returns) and a scan of the module-level
bytecode. Only CPython 3.8-3.12 bytecode is understood (its import opcodes); other versions give
nothing. `module_files` then says which files such a name would be, as the import system looks
(next to the importing module, then in the roots the program imports from).
"""

from __future__ import annotations

import posixpath
import struct
from collections.abc import Callable

PYC_DIR = "__pycache__"
PYC_HEADER = 16  # magic, flags, and a source mtime+size or hash (PEP 552, CPython 3.7+)
IMPORT_NAME, IMPORT_FROM, EXTENDED_ARG = 108, 109, 144  # stable from 3.6 to 3.12
MAX_DEPTH = 64  # nesting of marshalled objects (CPython's own limit is 2000)
MAX_OBJECTS = 200_000  # objects walked in one module (a large stdlib module has ~30,000)
MAX_IMPORTS = 256  # names imported (IMPORT_NAME and IMPORT_FROM) taken from one module
_FLAG_REF = 0x80
_NULL = object()  # marshal's TYPE_NULL: the end of a dict


MAGICS = {8: (3400, 3413), 9: (3420, 3425), 10: (3430, 3439), 11: (3450, 3495), 12: (3500, 3531)}


def version_of(magic: bytes) -> tuple[int, int] | None:
    """(3, minor) of a .pyc magic number CPython 3.8-3.12 writes; None for any other."""
    if len(magic) < 4 or magic[2:4] != b"\r\n":
        return None
    number = int.from_bytes(magic[:2], "little")
    return next(((3, minor) for minor, (low, high) in MAGICS.items() if low <= number <= high), None)


class _Bad(Exception):
    """Not a module this reader understands."""


class _Reader:
    """Walks marshal data; keeps what code objects need (strings, ints, tuples of them, code)."""

    def __init__(self, data: bytes, minor: int):
        self.data, self.pos, self.minor = data, 0, minor
        self.refs: list[object] = []
        self.count = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Bad()
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def object(self, depth: int = 0) -> object:
        self.count += 1
        if depth > MAX_DEPTH or self.count > MAX_OBJECTS:
            raise _Bad()
        code = self.take(1)[0]
        flag, kind = code & _FLAG_REF, chr(code & ~_FLAG_REF)
        slot = len(self.refs)
        if flag:
            self.refs.append(None)
        value = self._value(kind, depth)
        if flag:
            self.refs[slot] = value
        return value

    def _value(self, kind: str, depth: int) -> object:
        if kind == "0":
            return _NULL
        if kind in "NFTS.":
            return None
        if kind == "i":
            return self.int32()
        if kind == "l":  # a long: its digits are skipped
            n = self.int32()
            self.take(2 * abs(n))
            return None
        if kind == "g":
            self.take(8)
            return None
        if kind == "y":
            self.take(16)
            return None
        if kind in "fx":  # old text floats: one (float) or two (complex) length-prefixed numbers
            for _ in range(2 if kind == "x" else 1):
                self.take(self.take(1)[0])
            return None
        if kind in "stuaA":
            data = self.take(self.int32())
            return data if kind == "s" else data.decode("utf-8", "replace")
        if kind in "zZ":
            return self.take(self.take(1)[0]).decode("ascii", "replace")
        if kind == "r":
            index = self.int32()
            if not 0 <= index < len(self.refs):
                raise _Bad()
            return self.refs[index]
        if kind in "([<>":
            return tuple(self.object(depth + 1) for _ in range(self._count()))
        if kind == ")":
            return tuple(self.object(depth + 1) for _ in range(self.take(1)[0]))
        if kind == "{":  # key, value, ... up to a NULL
            while self.object(depth + 1) is not _NULL:
                self.object(depth + 1)
            return None
        if kind == "c":
            return self._code(depth)
        raise _Bad()

    def _count(self) -> int:
        n = self.int32()
        if not 0 <= n <= len(self.data) - self.pos:  # each element takes a byte at least
            raise _Bad()
        return n

    def _code(self, depth: int) -> tuple[bytes, tuple]:
        """(bytecode, names) of a code object; the rest is walked over."""
        self.take(4 * (5 if self.minor >= 11 else 6))  # argument counts, stack size, flags
        bytecode = self.object(depth + 1)
        self.object(depth + 1)  # consts (nested code objects are walked, not kept)
        names = self.object(depth + 1)
        for _ in range(5):  # 3.11+: localsplus names and kinds, filename, name, qualname; before:
            self.object(depth + 1)  # varnames, freevars, cellvars, filename, name
        self.take(4)  # first line number
        for _ in range(2 if self.minor >= 11 else 1):  # line table (and exception table)
            self.object(depth + 1)
        if not isinstance(bytecode, bytes) or not isinstance(names, tuple):
            raise _Bad()
        return bytecode, names


def imports(data: bytes) -> list[tuple[str, list[str]]]:
    """What importing this compiled module imports: (name, [names imported from it]) in order, as the
    module-level code says (`import a.b` -> ("a.b", []); `from . import x` -> ("", ["x"])). A name
    is relative or absolute: the level is not read, so callers try both. [] for anything else."""
    if len(data) < PYC_HEADER or (version := version_of(data[:4])) is None:
        return []
    try:
        top = _Reader(data[PYC_HEADER:], version[1]).object()
    except (_Bad, struct.error, RecursionError):
        return []
    if not isinstance(top, tuple) or len(top) != 2:
        return []
    bytecode, names = top
    out: list[tuple[str, list[str]]] = []
    arg = taken = 0
    for i in range(0, len(bytecode) - 1, 2):
        op, arg = bytecode[i], ((arg << 8) | bytecode[i + 1]) & 0xFFFFFFFF  # an oparg is 32 bits
        if op == EXTENDED_ARG:
            continue
        if op in (IMPORT_NAME, IMPORT_FROM) and arg < len(names) and isinstance(names[arg], str):
            if op == IMPORT_NAME:
                out.append((names[arg], []))
            elif out:
                out[-1][1].append(names[arg])
            taken += 1
            if taken >= MAX_IMPORTS:
                break
        arg = 0
    return out


def compiled(path: str) -> tuple[str, str] | None:
    """(the module's directory, the cache tag) of a .pyc path such as
    usr/lib/python3.11/json/__pycache__/decoder.cpython-311.pyc; None for any other file."""
    head, base = posixpath.split(path)
    parent, cache = posixpath.split(head)
    parts = base.split(".")
    if cache != PYC_DIR or len(parts) < 3 or parts[-1] != "pyc":
        return None
    return parent, parts[1]


class Listed:
    """A directory's names, with its extension modules by module name (no scan per lookup)."""

    def __init__(self, names: set[str]):
        self.names = frozenset(names)
        self.extensions: dict[str, list[str]] = {}
        for name in self.names:
            if name.endswith(".so") and "." in name[:-3]:
                self.extensions.setdefault(name.split(".", 1)[0], []).append(name)

    def __contains__(self, name: str) -> bool:
        return name in self.names


Listing = Callable[[str], Listed]  # the names in a directory of the merged layers


def root_of(directory: str, tag: str, listing: Listing) -> str:
    """Where `import top` finds the top-level package a module's directory belongs to: its first
    ancestor that is no package (has no __init__)."""
    while directory not in ("", "/") and _is_package(directory, tag, listing):
        directory = posixpath.dirname(directory)
    return directory


def _is_package(directory: str, tag: str, listing: Listing) -> bool:
    return "__init__.py" in listing(directory) or f"__init__.{tag}.pyc" in listing(
        posixpath.join(directory, PYC_DIR)
    )


def module_files(dotted: str, bases: list[str], tag: str, listing: Listing) -> list[str]:
    """The files `import dotted` loads (each package's __init__ on the way, then the module: a
    compiled module or an extension), from the first base directory that has the first of them."""
    first, *rest = dotted.split(".")
    for base in bases:
        path = posixpath.join(base, first)
        found = _in(path, tag, listing)
        if found is None:
            continue
        files = [found]
        for part in rest:
            path = posixpath.join(path, part)
            if (found := _in(path, tag, listing)) is None:
                break
            files.append(found)
        return files
    return []


def _in(path: str, tag: str, listing: Listing) -> str | None:
    """The compiled file of module `path` (a directory path plus the module's name)."""
    parent, name = posixpath.split(path)
    if f"__init__.{tag}.pyc" in listing(posixpath.join(path, PYC_DIR)):
        return posixpath.join(path, PYC_DIR, f"__init__.{tag}.pyc")
    if f"{name}.{tag}.pyc" in listing(posixpath.join(parent, PYC_DIR)):
        return posixpath.join(parent, PYC_DIR, f"{name}.{tag}.pyc")
    candidates = listing(parent).extensions.get(name, ())
    for ext in (f"{name}.{tag}-", f"{name}.abi3.so", f"{name}.so"):
        hit = next((n for n in candidates if n.startswith(ext)), None)
        if hit is not None:
            return posixpath.join(parent, hit)
    return None
