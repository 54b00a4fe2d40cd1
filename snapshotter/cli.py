"""The `lazysnap` command line's root: one subcommand per product (`serve`, `status`, `convert`,
`convertd`, `webhook`, `mount`, `version`), each taking its arguments from, and running in, its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from google.protobuf import __version__ as protobuf_version

from snapshotter import __version__
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2


def build_parser() -> argparse.ArgumentParser:
    from snapshotter import mount as mount_cmd
    from snapshotter.convert import cli as convert_cmd
    from snapshotter.convertd import service as convertd_cmd
    from snapshotter.daemon import main as serve_cmd
    from snapshotter.daemon import status as status_cmd
    from snapshotter.webhook import server as webhook_cmd

    parser = argparse.ArgumentParser(
        prog="lazysnap", description="Lazy-loading container images for containerd."
    )
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print versions and the containerd API served")
    commands = [
        (
            "serve",
            serve_cmd,
            "run the snapshotter: containerd's proxy plugin dials its socket",
            "Serve containerd's snapshots API on a unix socket until SIGINT or SIGTERM.",
        ),
        (
            "status",
            status_cmd,
            "what the running daemon serves: lazy layers, cache, fetches, fallbacks",
            None,
        ),
        (
            "convert",
            convert_cmd,
            "convert an image to eStargz or zstd:chunked and push it beside the original",
            convert_cmd.DESCRIPTION,
        ),
        (
            "convertd",
            convertd_cmd,
            "accelerate every image pushed to enabled repositories (registry notifications)",
            None,
        ),
        (
            "webhook",
            webhook_cmd,
            "Kubernetes mutating admission webhook: pods start from accelerated images",
            None,
        ),
        ("mount", mount_cmd, "mount an accelerated image read-only, lazily, without containerd", None),
    ]
    for name, module, help_text, description in commands:  # description: the module docstring's head
        module.add_arguments(
            sub.add_parser(name, help=help_text, description=description or module.__doc__.split("\n\n")[0])
        )
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
    if args.command == "serve":
        from snapshotter.daemon import main as serve_cmd

        return serve_cmd.run(args)
    if args.command == "status":
        from snapshotter.daemon import status as status_cmd

        return status_cmd.run(args)
    if args.command == "convertd":
        from snapshotter.convertd import service as convertd_cmd

        return convertd_cmd.run(args)  # sets up its own logging
    if args.command == "webhook":
        from snapshotter.webhook import server as webhook_cmd

        return webhook_cmd.run(args)  # sets up its own logging
    if args.command == "convert":
        import trio

        from snapshotter.convert import cli as convert_cmd

        return trio.run(convert_cmd.run, args)
    if args.command == "mount":
        import trio

        from snapshotter import mount as mount_cmd

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is too much
        return trio.run(mount_cmd.run, args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
