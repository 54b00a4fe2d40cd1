"""fuse.pyimports: what a compiled Python module imports, read without unmarshalling it."""

from __future__ import annotations

import importlib.util
import marshal
import struct
import sys
import textwrap
import time

import pytest

from fuse.pyimports import Listed, compiled, imports, module_files, root_of, version_of
from tests.harness.procs import limited_main, run_limited

SOURCE = textwrap.dedent(
    """
    import os, json.decoder
    from . import sibling
    from .pkg import sub, attr
    try:
        import maybe_there
    except ImportError:
        maybe_there = None
    X = [i for i in range(3)]

    def later():
        import only_when_called  # not run at import time

    class K:
        import in_class_body
    """
)


def pyc(source: str) -> bytes:
    """A .pyc as CPython writes it: magic, flags, mtime and size, the marshalled module code."""
    code = compile(source, "mod.py", "exec")
    return importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, 0, len(source)) + marshal.dumps(code)


def test_the_imports_of_module_level_code() -> None:
    assert imports(pyc(SOURCE)) == [
        ("os", []),
        ("json.decoder", []),
        ("", ["sibling"]),
        ("pkg", ["sub", "attr"]),
        ("maybe_there", []),
    ]


def test_other_versions_and_files_give_nothing() -> None:
    assert version_of(importlib.util.MAGIC_NUMBER) == sys.version_info[:2]
    assert version_of((3413).to_bytes(2, "little") + b"\r\n") == (3, 8)
    assert version_of((3531).to_bytes(2, "little") + b"\r\n") == (3, 12)
    assert version_of((3570).to_bytes(2, "little") + b"\r\n") is None  # 3.13: other opcodes
    assert version_of(b"\x7fELF") is None
    data = pyc(SOURCE)
    assert imports(b"\x7fELF" + data[4:]) == []
    assert imports(data[:40]) == []  # cut short
    assert imports(data[:16] + b"\xff" * 100) == []  # no marshal type


@pytest.mark.parametrize(
    "body",
    [
        b"(" + struct.pack("<i", 0x7FFFFFFF),  # a tuple claiming 2**31 elements
        b")\x03" * 10_000,  # nesting 10,000 deep
        b"\xe3" + b"\0" * 20 + b"r" + struct.pack("<i", 5),  # a reference to nothing
        b"s" + struct.pack("<i", -5),  # a negative length
        b"[" + struct.pack("<i", 3) + b"N" * 3 + b"g",  # a float cut short
    ],
)
def test_hostile_modules_give_nothing_in_bounded_memory(body: bytes) -> None:
    """Run in a child under a 300 MiB address-space limit: a reader that believed a claimed size or
    recursed without bound would die there, not pass."""
    module = importlib.util.MAGIC_NUMBER + bytes(12) + body
    outcome, _ = run_limited("tests.unit.test_pyimports", "imports", module.hex())
    assert outcome == "[]"


def test_compiled_paths() -> None:
    assert compiled("usr/lib/python3.11/json/__pycache__/decoder.cpython-311.pyc") == (
        "usr/lib/python3.11/json",
        "cpython-311",
    )
    assert compiled("usr/lib/python3.11/json/__pycache__/decoder.cpython-311.opt-1.pyc") is not None
    assert compiled("usr/lib/python3.11/json/decoder.py") is None
    assert compiled("app/cache/decoder.cpython-311.pyc") is None


TREE = {
    "/usr/lib/python3.11": {"os.py", "json", "lib-dynload", "__pycache__"},
    "/usr/lib/python3.11/__pycache__": {"os.cpython-311.pyc"},
    "/usr/lib/python3.11/json": {"__init__.py", "decoder.py", "__pycache__"},
    "/usr/lib/python3.11/json/__pycache__": {"__init__.cpython-311.pyc", "decoder.cpython-311.pyc"},
    "/usr/lib/python3.11/lib-dynload": {"_json.cpython-311-x86_64-linux-gnu.so"},
    "/app": {"pkg", "__init__.py", "__pycache__"},
    "/app/__pycache__": {"__init__.cpython-311.pyc", "sibling.cpython-311.pyc"},
    "/app/pkg": {"__init__.py", "__pycache__", "sub.abi3.so"},
    "/app/pkg/__pycache__": {"__init__.cpython-311.pyc"},
}


def listing(path: str) -> Listed:
    return Listed(set(TREE.get(path, ())))


def test_modules_are_found_as_the_import_system_finds_them() -> None:
    roots = ["/usr/lib/python3.11", "/usr/lib/python3.11/lib-dynload"]
    find = lambda name, bases: module_files(name, bases, "cpython-311", listing)  # noqa: E731
    assert find("os", ["/app", *roots]) == ["/usr/lib/python3.11/__pycache__/os.cpython-311.pyc"]
    assert find("json.decoder", roots) == [  # the package on the way, then the module
        "/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc",
        "/usr/lib/python3.11/json/__pycache__/decoder.cpython-311.pyc",
    ]
    assert find("_json", roots) == ["/usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"]
    assert find("sibling", ["/app"]) == ["/app/__pycache__/sibling.cpython-311.pyc"]
    assert find("pkg", ["/app"]) == ["/app/pkg/__pycache__/__init__.cpython-311.pyc"]
    assert find("sub", ["/app/pkg"]) == ["/app/pkg/sub.abi3.so"]
    assert find("attr", ["/app/pkg", *roots]) == []  # an attribute, no module
    assert root_of("/app/pkg", "cpython-311", listing) == "/"
    assert root_of("/usr/lib/python3.11/json", "cpython-311", listing) == "/usr/lib/python3.11"


def test_extended_args_stay_32_bits_and_imports_are_capped() -> None:
    # a run of EXTENDED_ARG made the oparg grow without end (quadratic shifts); 100,000 imported names
    # are cut at MAX_IMPORTS
    from fuse.pyimports import MAX_IMPORTS

    code = compile("from os import (" + ", ".join(f"n{i}" for i in range(1000)) + ")\n", "m.py", "exec")
    many = importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)
    found = imports(many)
    assert found[0][0] == "os" and sum(1 + len(f) for _, f in found) <= MAX_IMPORTS
    code = compile("import os\n", "m.py", "exec")
    hostile = code.replace(co_code=bytes([144, 255]) * 400_000 + code.co_code)  # EXTENDED_ARG x 400,000
    started = time.monotonic()
    imports(importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(hostile))
    assert time.monotonic() - started < 2


if __name__ == "__main__":
    limited_main({"imports": lambda data: str(imports(bytes.fromhex(data)))}, 300 << 20)
