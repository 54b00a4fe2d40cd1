"""One size grammar for every command: `serve` (config file), `convert --chunk-size`, `convertd`
(config file) and `mount --cache-limit` read the same string as the same number of bytes, and refuse the
same strings (k/M/G/T decimal, KiB/MiB/GiB/TiB binary, plain numbers bytes, fractions rounded)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from snapshotter import mount as mount_cmd
from snapshotter.convert import cli as convert_cmd
from snapshotter.convertd.config import load_config
from snapshotter.daemon.config import load as load_serve
from snapshotter.errors import ConfigError
from snapshotter.settings import parse_duration

SIZES = [
    ("65536", 65536),
    ("64k", 64_000),
    ("64KiB", 65_536),
    ("4M", 4_000_000),
    ("4MB", 4_000_000),
    ("4MiB", 4_194_304),
    ("4mib", 4_194_304),
    ("1.5MiB", 1_572_864),
    ("2.5MB", 2_500_000),
    ("16 Mi", 16_777_216),
]
BAD = ["lots", "4X", "-4M", "4 M B", ""]


def serve(tmp: Path, text: str) -> int:
    path = tmp / "serve.toml"
    path.write_text(f'cache_limit = "{text}"\n')
    return load_serve(path).size("cache_limit")


def convertd(tmp: Path, text: str) -> int:
    path = tmp / "convertd.toml"
    path.write_text(f'[[repositories]]\nname = "team/*"\nchunk_size = "{text}"\n')
    return load_config(path).repositories[0].chunk_size


def _flag(add_arguments, argv: list[str], dest: str) -> int:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    try:
        return getattr(parser.parse_args(argv), dest)
    except (argparse.ArgumentError, SystemExit) as e:
        raise ConfigError(str(e)) from None


def convert(tmp: Path, text: str) -> int:
    return _flag(convert_cmd.add_arguments, ["r.example/app:v1", f"--chunk-size={text}"], "chunk_size")


def mount(tmp: Path, text: str) -> int:
    return _flag(
        mount_cmd.add_arguments, ["r.example/app:v1", str(tmp), f"--cache-limit={text}"], "cache_limit"
    )


COMMANDS = [serve, convert, convertd, mount]


@pytest.mark.parametrize(("text", "expected"), SIZES)
def test_every_command_reads_a_size_the_same(tmp_path: Path, text: str, expected: int) -> None:
    assert {command.__name__: command(tmp_path, text) for command in COMMANDS} == {
        command.__name__: expected for command in COMMANDS
    }


@pytest.mark.parametrize("text", BAD)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.__name__)
def test_every_command_refuses_what_is_not_a_size(tmp_path: Path, command, text: str) -> None:
    with pytest.raises(ConfigError, match="not a size|invalid"):
        command(tmp_path, text)


def test_mount_and_serve_share_the_cache_limit_default(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    args = argparse.ArgumentParser()
    mount_cmd.add_arguments(args)
    assert args.parse_args(["r/app:v1", str(tmp_path)]).cache_limit == load_serve(empty).size("cache_limit")


@pytest.mark.parametrize(("text", "seconds"), [("30", 30.0), ("500ms", 0.5), ("1.5m", 90.0), ("1h", 3600.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
