"""The `lazysnap` command line: `serve` (the containerd snapshotter daemon), `convert`, `mount`, `version`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
    serve = sub.add_parser(
        "serve",
        help="run the snapshotter: containerd's proxy plugin dials its socket",
        description="Serve containerd's snapshots API on a unix socket until SIGINT or SIGTERM.",
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file (default /etc/lazysnap/config.toml when it exists)",
    )
    serve.add_argument("--root", metavar="DIR", help="state root (default /var/lib/lazysnap)")
    serve.add_argument("--address", metavar="SOCKET", help="socket (default /run/lazysnap/lazysnap.sock)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    from . import convert
    from . import mount as mount_cmd

    convert.add_arguments(
        sub.add_parser(
            "convert",
            help="convert an image to eStargz or zstd:chunked and push it beside the original",
            description=convert.__doc__.split("\n\n")[0],
        )
    )

    from . import convertd as convertd_cmd

    convertd_cmd.add_arguments(
        sub.add_parser(
            "convertd",
            help="accelerate every image pushed to enabled repositories (registry notifications)",
            description=convertd_cmd.__doc__.split("\n\n")[0],
        )
    )
    mount_cmd.add_arguments(
        sub.add_parser(
            "mount",
            help="mount an accelerated image read-only, lazily, without containerd",
            description=mount_cmd.__doc__.split("\n\n")[0],
        )
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .config import DEFAULT_CONFIG, Config, ConfigError, load
    from .daemon import serve

    try:
        if args.config:
            config = load(args.config)
        else:
            config = load(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else Config()
        config = config.with_overrides(root=args.root, address=args.address, log_level=args.log_level)
    except ConfigError as e:
        print(f"lazysnap serve: {e}", file=sys.stderr)
        return 2
    return serve(config)


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
    if args.command == "serve":
        return _serve(args)
    if args.command == "convertd":
        from . import convertd as convertd_cmd

        return convertd_cmd.run(args)  # sets up its own logging
    if args.command == "convert":
        import trio

        from . import convert

        return trio.run(convert.run, args)
    if args.command == "mount":
        import trio

        from . import mount as mount_cmd

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is too much
        return trio.run(mount_cmd.run, args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
