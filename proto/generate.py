"""Generate the Python gRPC code for containerd's snapshots API (and the CRI subset the CRI proxy reads)
into snapshotter/api/.

The generated modules are committed (so an installed lazysnap needs no protoc), and
tests/unit/test_proto.py fails when they are stale: run `make proto` after editing a .proto file.

    python proto/generate.py [OUTPUT_DIR]      # default: snapshotter/api

protoc names Python modules after the .proto paths (``containerd.types.mount_pb2``); they are
re-rooted under ``snapshotter.api`` so that lazysnap does not claim a top-level ``containerd`` (or
``k8s``) package. The protobuf package names, which are the wire contract, are untouched.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PACKAGE = "snapshotter.api"
SOURCES = [
    "containerd/types/mount.proto",
    "containerd/services/snapshots/v1/snapshots.proto",
    "k8s/cri/v1/api_subset.proto",
]
TOP_LEVELS = ("containerd", "k8s")  # the first directories of SOURCES: generated packages


def generate(out_dir: Path) -> list[Path]:
    """Write the generated package tree into out_dir; return the files written."""
    from grpc_tools import protoc  # test/dev dependency only

    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *SOURCES,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see the messages above)")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            if src.name.endswith("_grpc.py") and "class " not in src.read_text():
                continue  # a .proto without services gets an empty gRPC module: skip it
            rel = src.relative_to(tmp)
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_reroot(src.read_text()))
            written.append(dst)
    # Every directory on the way is a package.
    for d in {p.parent for p in written} | {out_dir}:
        while True:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            written.append(init)
            if d == out_dir:
                break
            d = d.parent
    return sorted(set(written))


def _reroot(text: str) -> str:
    # "from containerd.types import mount_pb2" -> "from snapshotter.api.containerd.types import mount_pb2"
    tops = "|".join(TOP_LEVELS)
    return re.sub(rf"^(from|import) ({tops})\.", rf"\1 {PACKAGE}.\2.", text, flags=re.MULTILINE)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "snapshotter" / "api"
    if out.exists() and len(sys.argv) == 1:
        for top in TOP_LEVELS:
            shutil.rmtree(out / top, ignore_errors=True)
    for path in generate(out):
        print(path.relative_to(out.parent) if out.parent in path.parents else path)


if __name__ == "__main__":
    main()
