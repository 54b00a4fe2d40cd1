"""`lazysnap convert` on the command line: its flags, and running the converter (or, with `--optimize`,
the optimizer) with them. Sizes and durations follow `snapshotter.settings`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fuse.formats.spec import ESTARGZ, FORMATS
from fuse.registry import CredentialStore, HostsConfig, RegistryClient, RegistryError
from snapshotter.convert import converter
from snapshotter.convert.converter import ConvertError, convert_image
from snapshotter.convert.image import SUFFIX
from snapshotter.convert.optimize import DEFAULT_TIMEOUT
from snapshotter.convert.writer import DEFAULT_CHUNK_SIZE
from snapshotter.progress import Progress
from snapshotter.settings import duration_arg, size_arg

DESCRIPTION = converter.__doc__.split("\n\n")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `lazysnap convert`."""

    parser.add_argument("src", metavar="SRC", help="image to convert, e.g. registry.example.com/app:1.0")
    parser.add_argument(
        "dst", metavar="DST", nargs="?", help=f"where to push it (default: SRC's tag + {SUFFIX})"
    )
    parser.add_argument("--format", choices=FORMATS, default=ESTARGZ, help="layer format (default: estargz)")
    parser.add_argument(
        "--chunk-size",
        type=size_arg,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="files larger than this are split into chunks of this size "
        f"(default: {DEFAULT_CHUNK_SIZE >> 20}MiB; ctr-remote's is 4MiB)",
    )
    prio = parser.add_mutually_exclusive_group()
    prio.add_argument(
        "--prioritize",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="files to put first in their layer (prefetched at mount time), in this order",
    )
    prio.add_argument(
        "--prioritize-from",
        type=Path,
        metavar="FILE",
        help="read the prioritized files from FILE (one path a line, or ctr-remote's JSON records)",
    )
    prio.add_argument(
        "--optimize",
        action="store_true",
        help="prioritize the files that the --run command opens in the image, mounted lazily (needs root)",
    )
    parser.add_argument(
        "--run",
        metavar="COMMAND",
        help="with --optimize: the workload, run with /bin/sh -c in a chroot of the image until it exits",
    )
    parser.add_argument(
        "--optimize-timeout",
        type=duration_arg,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"with --optimize: stop the workload after this long (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--level", type=int, metavar="N", help="compression level (gzip 1-9, default 6; zstd 1-22, default 3)"
    )
    plat = parser.add_mutually_exclusive_group()
    plat.add_argument("--platform", metavar="P", help="platform to convert from an index, e.g. linux/arm64")
    plat.add_argument("--all-platforms", action="store_true", help="convert every platform of an index")
    parser.add_argument(
        "--hosts-dir", type=Path, metavar="DIR", help="containerd hosts directory (certs.d layout)"
    )
    parser.add_argument(
        "--docker-config", type=Path, metavar="FILE", help="docker config.json with credentials"
    )
    parser.add_argument("--tmpdir", type=Path, metavar="DIR", help="where to keep layers while converting")
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N", help="compression threads (default: cores)"
    )


async def run(args: argparse.Namespace) -> int:
    """`lazysnap convert`: 0 on success, 1 on failure (the error on stderr)."""
    prioritize: Sequence[str] | Path | None = args.prioritize_from or args.prioritize
    if bool(args.optimize) != bool(args.run):
        print("lazysnap convert: --optimize and --run COMMAND go together", file=sys.stderr)
        return 2
    hosts = HostsConfig(args.hosts_dir) if args.hosts_dir else HostsConfig(None)
    credentials = CredentialStore(args.docker_config) if args.docker_config else CredentialStore()
    options = dict(
        format=args.format,
        chunk_size=args.chunk_size,
        level=args.level,
        platform=args.platform,
        all_platforms=args.all_platforms,
        threads=args.threads,
        tmpdir=args.tmpdir,
    )
    try:
        # live progress on a terminal (stderr), plain lines otherwise; results stay on stdout
        with Progress() as progress:
            options["log"] = progress.print
            async with RegistryClient(hosts=hosts, credentials=credentials) as client:
                if args.optimize:
                    from snapshotter.convert.optimize import optimize_image

                    result = await optimize_image(
                        client, args.src, args.dst, args.run, timeout=args.optimize_timeout, **options
                    )
                else:
                    result = await convert_image(
                        client, args.src, args.dst, prioritize=prioritize, progress=progress, **options
                    )
    except (ConvertError, RegistryError) as e:
        print(f"lazysnap convert: {e}", file=sys.stderr)
        return 1
    converted = [layer for layer in result.layers if layer.action == "converted"]
    print(
        f"pushed {result.destination}@{result.digest} ({len(result.manifests)} manifest(s), "
        f"{len(converted)} layer(s) converted, {result.seconds:.1f}s)"
    )
    return 0
