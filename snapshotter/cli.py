"""The `lazysnap` command line."""

from __future__ import annotations

import argparse
import sys

from google.protobuf import __version__ as protobuf_version

from snapshotter import __version__
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazysnap", description="Lazy-loading container images for containerd."
    )
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print versions and the containerd API served")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].full_name
        print(
            f"lazysnap {__version__}\nserves {service} (containerd 1.6 proxy snapshotter)\n"
            f"protobuf {protobuf_version}"
        )
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
