"""`lazysnap serve` configuration: TOML file, flags over file, and errors that name the line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.cli import main
from snapshotter.daemon.config import DEFAULT_ADDRESS, DEFAULT_ROOT, Config, ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lazysnap.toml"
    path.write_text(text)
    return path


def test_defaults_and_file_values(tmp_path: Path) -> None:
    assert Config() == Config(DEFAULT_ROOT, DEFAULT_ADDRESS, "info")
    cfg = load(write(tmp_path, '# comment\nroot = "/srv/snap"\nlog_level = "debug"\n'))
    assert cfg == Config("/srv/snap", DEFAULT_ADDRESS, "debug")
    assert load(write(tmp_path, "")) == Config()


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, 'root = "/a"\naddress = "/b.sock"\n')).with_overrides(
        root="/c", address=None, log_level="warning"
    )
    assert cfg == Config("/c", "/b.sock", "warning")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('root = "/a"\n\nrot = "/b"\n', "line 3: unknown key 'rot'"),
        ('[server]\naddress = "/x"\n', "line 1: unknown key 'server'"),
        ("root = 5\n", "line 1: root must be a string"),
        ('log_level = "verbose"\n', "line 1: log_level must be one of debug, info, warning, error"),
        ('root = "relative/dir"\n', "root must be an absolute path"),
        ('address = "/' + "x" * 120 + '"\n', "limit of unix socket paths"),
        ('root = "/a"\nroot = "/b"\n', "invalid TOML"),
        ("root = \n", "line 1"),
        ('cache_limit = "lots"\n', "line 1: cache_limit: 'lots' is not a size"),
        ('background = "yes"\n', "line 1: background must be true or false"),
        ("read_timeout = -1\n", "line 1: read_timeout must be a positive number"),
        ('metrics_address = "9090"\n', "line 1: metrics_address must be host:port"),
        ('log_format = "xml"\n', "line 1: log_format must be one of logfmt, json"),
    ],
)
def test_bad_files_name_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert message in str(e.value)
    assert str(tmp_path / "lazysnap.toml") in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.toml")


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'bogus = "x"\n')
    assert main(["serve", "--config", str(path)]) == 2
    assert "line 1: unknown key 'bogus'" in capsys.readouterr().err
    assert main(["serve", "--root", "relative"]) == 2
    assert "root must be an absolute path" in capsys.readouterr().err


def test_version_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert "containerd.services.snapshots.v1.Snapshots" in capsys.readouterr().out


def test_lazy_settings(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, 'cache_limit = "2GiB"\nmerge_cap = 65536\nbackground = false\nread_timeout = 5\n')
    )
    assert (cfg.size("cache_limit"), cfg.size("merge_cap"), cfg.background, cfg.read_timeout) == (
        2 << 30,
        65536,
        False,
        5.0,
    )
    assert cfg.cache_path == Path(cfg.root) / "cache"
