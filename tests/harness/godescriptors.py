"""Protobuf descriptors compiled into Go binaries: the wire contract as containerd itself has it.

Go protobuf code embeds each .proto file's FileDescriptorProto, gzipped. Reading them out of
/usr/bin/containerd lets tests compare our API with containerd's exactly, and talk CRI to containerd
without a hand-written copy of the CRI protos.
"""

from __future__ import annotations

import functools
import re
import shutil
import zlib
from pathlib import Path

from google.protobuf import descriptor_pb2

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
GZIP_MEMBER = re.compile(
    rb"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
)  # Go's gzip header, as protoc-gen-gogo writes


@functools.cache
def descriptors_in_binary(path: str = CONTAINERD) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    data = Path(path).read_bytes()
    found = {}
    for m in GZIP_MEMBER.finditer(data):
        try:
            raw = zlib.decompressobj(wbits=31).decompress(data[m.start() : m.start() + (1 << 20)])
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except Exception:  # most matches are other gzip data or not a descriptor
            continue
        if fd.name.endswith(".proto"):
            found[fd.name] = fd
    return found
