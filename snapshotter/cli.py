"""The `lazysnap` command line's root: one subcommand per product (`serve`, `status`, `convert`,
`index`, `convertd`, `webhook`, `mount`, `supervise`, `version`), each taking its arguments from, and
running in, its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from snapshotter import __version__

#: name, module (imported only when that command runs: a restarted daemon's readers wait for its
#: start-up), help line, and the description when the module docstring's first paragraph is not it
COMMANDS = [
    (
        "serve",
        "snapshotter.daemon.main",
        "run the snapshotter: containerd's proxy plugin dials its socket",
        "Serve containerd's snapshots API on a unix socket until SIGINT or SIGTERM.",
    ),
    (
        "status",
        "snapshotter.daemon.status",
        "what the running daemon serves: lazy layers, cache, fetches, fallbacks",
        None,
    ),
    (
        "convert",
        "snapshotter.convert.cli",
        "convert an image to eStargz or zstd:chunked and push it beside the original",
        "DESCRIPTION",
    ),
    (
        "convertd",
        "snapshotter.convertd.service",
        "accelerate every image pushed to enabled repositories (registry notifications)",
        None,
    ),
    (
        "webhook",
        "snapshotter.webhook.server",
        "Kubernetes mutating admission webhook: pods start from accelerated images",
        None,
    ),
    (
        "index",
        "snapshotter.convert.index",
        "build SOCI indexes of an image's gzip layers and publish them beside it (no conversion)",
        "DESCRIPTION",
    ),
    ("mount", "snapshotter.mount", "mount an accelerated image read-only, lazily, without containerd", None),
    (
        "supervise",
        "snapshotter.supervise",
        "run and restart `lazysnap serve` keeping its FUSE connection, where systemd does not",
        None,
    ),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the arguments of that command alone are loaded."""
    parser = argparse.ArgumentParser(
        prog="lazysnap", description="Lazy-loading container images for containerd."
    )
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print versions and the containerd API served")
    for name, module_name, help_text, description in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        if description == "DESCRIPTION":
            description = module.DESCRIPTION
        module.add_arguments(
            sub.add_parser(name, help=help_text, description=description or module.__doc__.split("\n\n")[0])
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in args_in if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in {c[0] for c in COMMANDS} else None)
    args = parser.parse_args(argv)
    if args.command == "version":
        from google.protobuf import __version__ as protobuf_version

        from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2

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
    if args.command == "supervise":
        from snapshotter import supervise as supervise_cmd

        return supervise_cmd.run(args)
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
