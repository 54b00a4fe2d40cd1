"""The snapshots API we serve is containerd's, on the wire, and the committed Python code is current.

The reference is not a copy of containerd's .proto files but the descriptors compiled into the
containerd binary that the tests run against (Go protobuf embeds each file's FileDescriptorProto,
gzipped): package, service, method, message and enum names, field numbers, types and labels must match.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from proto.generate import generate
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2
from snapshotter.api.containerd.types import mount_pb2
from tests.harness.godescriptors import CONTAINERD, descriptors_in_binary

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def containerd_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    found = descriptors_in_binary(CONTAINERD)
    assert found, f"no protobuf descriptors found in {CONTAINERD}"
    return found


def _ours(module) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)
    return fd


def _wire_shape(fd: descriptor_pb2.FileDescriptorProto) -> dict:
    """What decides the bytes on the wire and the gRPC method paths; nothing else."""

    def message(m: descriptor_pb2.DescriptorProto) -> dict:
        return {
            "fields": {f.number: (f.name, f.type, f.label, f.type_name) for f in m.field},
            "nested": {n.name: message(n) for n in m.nested_type},
            "map_entry": m.options.map_entry,
        }

    return {
        "package": fd.package,
        "messages": {m.name: message(m) for m in fd.message_type},
        "enums": {e.name: {v.name: v.number for v in e.value} for e in fd.enum_type},
        "services": {
            s.name: {
                m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                for m in s.method
            }
            for s in fd.service
        },
    }


@pytest.mark.parametrize(
    ("module", "theirs"),
    [
        (snapshots_pb2, "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto"),
        (mount_pb2, "github.com/containerd/containerd/api/types/mount.proto"),
    ],
)
def test_wire_identical_to_containerd(module, theirs, containerd_files) -> None:
    assert theirs in containerd_files, f"{CONTAINERD} does not embed {theirs}"
    assert _wire_shape(_ours(module)) == _wire_shape(containerd_files[theirs])


def test_service_path_is_containerds() -> None:
    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in service.methods] == [
        "Prepare",
        "View",
        "Mounts",
        "Commit",
        "Remove",
        "Stat",
        "Update",
        "List",
        "Usage",
        "Cleanup",
    ]


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate(tmp_path)
    committed = REPO / "snapshotter" / "api"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    present = sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == present, "snapshotter/api has stale or missing files: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"generated code differs from the .proto files: run `make proto` ({stale})"
