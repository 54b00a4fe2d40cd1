"""convertd's configuration file (every key, relative paths, errors that name the line and the reason),
repository globs, and what each notification event asks for."""

from __future__ import annotations

import calendar
import logging
from pathlib import Path

import pytest

from snapshotter.convertd.config import (
    Config,
    ConfigError,
    RepositoryRule,
    glob_regex,
    load_config,
    parse_listen,
)
from snapshotter.convertd.events import Ignored, classify, parse_timestamp
from snapshotter.convertd.jobs import Push, RetryPolicy
from snapshotter.convertd.service import main

DIGEST = "sha256:" + "d" * 64
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def write(tmp_path: Path, text: str, name: str = "convertd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "# nothing\n"))
    assert cfg == Config()
    assert cfg.address == ("127.0.0.1", 8089) and cfg.suffix == "_accelerated" and cfg.concurrency == 1
    assert (
        cfg.state_dir == Path("/var/lib/lazysnap/convertd") and cfg.secret is None and cfg.repositories == ()
    )


def test_every_key(tmp_path: Path) -> None:
    (tmp_path / "certs.d").mkdir()
    write(tmp_path, '{"auths": {}}', "docker.json")
    write(tmp_path, "  hunter2\n", "secret")
    cfg = load_config(
        write(
            tmp_path,
            """
listen = "[::1]:9000"
state_dir = "state"
registry = "registry.example.com:5000"
suffix = "-lazy"
concurrency = 2
hosts_dir = "certs.d"
docker_config = "docker.json"
secret_file = "secret"
secret_header = "X-Convertd-Token"
log_level = "debug"
max_body = "2MiB"
job_timeout = "30m"

[retry]
attempts = 4
backoff = "500ms"
max_backoff = 60
multiplier = 3

[[repositories]]
name = "team/*"
format = "zstd-chunked"
chunk_size = "1MiB"
level = 9
platform = "linux/arm64"

[[repositories]]
name = "**"
all_platforms = true
""",
        )
    )
    assert cfg.address == ("::1", 9000)
    assert cfg.state_dir == tmp_path / "state" and cfg.hosts_dir == tmp_path / "certs.d"
    assert cfg.docker_config == tmp_path / "docker.json"
    assert cfg.secret == "hunter2" and "hunter2" not in repr(cfg)
    assert (cfg.registry, cfg.suffix, cfg.concurrency, cfg.secret_header) == (
        "registry.example.com:5000",
        "-lazy",
        2,
        "X-Convertd-Token",
    )
    assert (cfg.log_level, cfg.max_body, cfg.job_timeout) == ("debug", 2 << 20, 1800.0)
    assert cfg.retry == RetryPolicy(attempts=4, backoff=0.5, max_backoff=60, multiplier=3)
    assert cfg.repositories == (
        RepositoryRule("team/*", "zstd-chunked", 1 << 20, 9, False, "linux/arm64"),
        RepositoryRule("**", all_platforms=True),
    )
    assert cfg.rule_for("team/app") is cfg.repositories[0]
    assert cfg.rule_for("team/app/sub") is cfg.repositories[1]  # the first match wins


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = "nope"\n', "line 1: listen: 'nope' is not host:port"),
        ('listen = "127.0.0.1:8089"\nconcurency = 2\n', "line 2: concurency: unknown key"),
        ("concurrency = true\n", "line 1: concurrency: must be an integer, not True"),
        ("concurrency = 0\n", "line 1: concurrency: must be between 1 and 64"),
        ("x = [\n", "invalid TOML"),
        ('log_level = "loud"\n', "line 1: log_level: must be one of debug, info, warning, error"),
        ('suffix = "/x"\n', "line 1: suffix: must be 1-64 characters"),
        (
            'registry = "https://r.example.com"\n',
            "line 1: registry: 'https://r.example.com' is not a registry",
        ),
        ('registry = "justaname"\n', "is not a registry host[:port]"),
        (
            'hosts_dir = "/nonexistent/certs.d"\n',
            "line 1: hosts_dir: /nonexistent/certs.d is not a directory",
        ),
        ('docker_config = "/nonexistent/config.json"\n', "line 1: docker_config: cannot read"),
        ('secret = "a"\nsecret_file = "x"\n', "line 2: secret_file: give secret or secret_file, not both"),
        ('secret_file = "missing"\n', "line 1: secret_file: cannot read"),
        ('secret = "  "\n', "line 1: secret: must not be empty"),
        ("max_body = 10\n", "line 1: max_body: must be between 1KiB and 64MiB"),
        ('job_timeout = "soon"\n', "line 1: job_timeout: 'soon' is not a duration"),
        ("retry = 5\n", "line 1: retry: must be a [retry] table"),
        ("\n[retry]\nattempts = 0\n", "line 3: retry.attempts: must be between 1 and 100"),
        ('[retry]\nbackoff = "10 parsecs"\n', "line 2: retry.backoff: '10 parsecs' is not a duration"),
        ('[retry]\nbackoff = "10s"\nmax_backoff = "1s"\n', "line 3: retry.max_backoff: must not be less"),
        ("[retry]\ntries = 3\n", "line 2: retry.tries: unknown key"),
        ('[[repositories]]\nformat = "estargz"\n', "line 1: repositories[0]: missing"),
        (
            '[[repositories]]\nname = "Team/App"\n',
            "line 2: repositories[0].name: 'Team/App' is not a repository",
        ),
        (
            '[[repositories]]\nname = "a"\n\n[[repositories]]\nname = "b"\nlevel = 99\n',
            "line 6: repositories[1].level: compression level 99 is outside 1..9 for estargz",
        ),
        ('[[repositories]]\nname = "a"\nformat = "gzip"\n', "line 3: repositories[0].format: must be one of"),
        (
            '[[repositories]]\nname = "a"\nmode = "copy"\n',
            "line 3: repositories[0].mode: must be one of convert, index, both",
        ),
        ('[[repositories]]\nname = "a"\nchunk_size = "huge"\n', "line 3: repositories[0].chunk_size:"),
        ('[[repositories]]\nname = "a"\nchunk_size = 100\n', "repositories[0].chunk_size: chunk size 100"),
        (
            '[[repositories]]\nname = "a"\nall_platforms = "yes"\n',
            "line 3: repositories[0].all_platforms: must be",
        ),
        ('[[repositories]]\nname = "a"\nplatform = "linux"\n', "line 3: repositories[0].platform: invalid"),
        (
            '[[repositories]]\nname = "a"\nall_platforms = true\nplatform = "linux/amd64"\n',
            "line 4: repositories[0].platform: give platform or all_platforms",
        ),
        ('[[repositories]]\nname = "a"\ntag = "x"\n', "line 3: repositories[0].tag: unknown key"),
        ('repositories = ["a"]\n', "line 1: repositories: must be [[repositories]] tables"),
    ],
)
def test_bad_files_name_the_line_and_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_the_command_stops_on_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(write(tmp_path, "concurrency = 100\n"))]) == 2
    assert "lazysnap convertd: config file" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pattern", "repository", "matches"),
    [
        ("team/app", "team/app", True),
        ("team/app", "team/app2", False),
        ("team/*", "team/app", True),
        ("team/*", "team/a/b", False),
        ("team/**", "team/a/b", True),
        ("**", "anything/at/all", True),
        ("**/app", "app", True),
        ("**/app", "a/b/app", True),
        ("**/app", "a/b/myapp", False),
        ("team/ap?", "team/app", True),
        ("team/ap?", "team/ap/", False),
        ("team.x/*", "teamax/y", False),
        ("*", "library/busybox", False),
    ],
)
def test_repository_globs(pattern: str, repository: str, matches: bool) -> None:
    assert (glob_regex(pattern).match(repository) is not None) is matches


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8089") == ("127.0.0.1", 8089)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":8089") == ("", 8089)
    for bad in ("8089", "host:99999", "[::1]", "a:b"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_event_timestamps() -> None:
    seconds = calendar.timegm((2026, 11, 29, 13, 13, 12, 0, 0, 0))
    assert parse_timestamp("2026-11-29T13:13:12.418397045Z") == seconds * 10**9 + 418_397_045
    assert parse_timestamp("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert parse_timestamp("1970-01-01T02:00:00+02:00") == 0
    assert parse_timestamp("1970-01-01T00:00:00.1234567891234Z") == 123_456_789
    for bad in ("yesterday", "", None, 5, "2024-13-45T99:99:99Z"):
        assert parse_timestamp(bad) is None


CONFIG = Config(repositories=(RepositoryRule("team/*", chunk_size=1 << 20),))


def event(**target) -> dict:
    base = {
        "mediaType": OCI_MANIFEST,
        "size": 475,
        "digest": DIGEST,
        "length": 475,
        "repository": "team/app",
        "url": f"http://127.0.0.1:5000/v2/team/app/manifests/{DIGEST}",
        "tag": "v1",
    }
    return {
        "id": "e1",
        "timestamp": "1970-01-01T00:00:02.000000001Z",
        "action": "push",
        "target": {k: v for k, v in (base | target).items() if v is not None},
        "request": {"host": "registry.internal:5000", "method": "PUT"},
    }


def test_a_tagged_manifest_push_is_a_job() -> None:
    push = classify(event(), CONFIG, now_ns=7)
    assert push == Push(
        "127.0.0.1:5000",
        "team/app",
        DIGEST,
        OCI_MANIFEST,
        "v1",
        2_000_000_001,
        {"format": "estargz", "chunk_size": 1 << 20, "level": None, "all_platforms": False, "platform": None},
        "e1",
    )
    index = classify(event(mediaType="application/vnd.docker.distribution.manifest.list.v2+json"), CONFIG, 7)
    assert isinstance(index, Push)
    # where to convert: the configured registry, else the event's URL, else the request's host
    assert classify(
        event(), Config(registry="r.example.com", repositories=CONFIG.repositories), 7
    ).registry == (  # type: ignore[union-attr]
        "r.example.com"
    )
    assert classify(event(url=None), CONFIG, 7).registry == "registry.internal:5000"  # type: ignore[union-attr]
    no_timestamp = event()
    del no_timestamp["timestamp"]
    assert classify(no_timestamp, CONFIG, 7).pushed_at == 7  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "reason", "malformed"),
    [
        ({"action": "pull"}, "pull event", False),
        ({"action": "delete"}, "delete event", False),
        ({"action": "frobnicate"}, "unknown action 'frobnicate'", False),
        ({"target": {"mediaType": "application/octet-stream"}}, "not an image manifest or index", False),
        (
            {"target": {"mediaType": "application/vnd.oci.artifact.manifest.v1+json"}},
            "not an image manifest",
            False,
        ),
        ({"target": {"tag": None}}, "pushed by digest, without a tag", False),
        ({"target": {"tag": "v1_accelerated"}}, "an accelerated image is never converted again", False),
        ({"target": {"repository": "other/app"}}, "repository other/app is not enabled", False),
        ({"target": {"repository": "team/a/b"}}, "repository team/a/b is not enabled", False),
        ({"target": {"tag": "x" * 120}}, "would be over 128 characters", False),
        ({"target": {"digest": "sha256:xyz"}}, "is not a sha256 digest", True),
        ({"target": {"repository": None}}, "target without a repository", True),
        ({"target": {"tag": "bad tag!"}}, "is not a valid tag", True),
        ({"target": {"repository": "Team/App"}}, "repository Team/App is not enabled", False),
        ({"target": "nope"}, "no target", True),
        ({"action": None}, "no action", True),
        ({"target": {"url": None}, "request": None}, "no registry host", True),
    ],
)
def test_events_that_ask_for_nothing(change: dict, reason: str, malformed: bool) -> None:
    ev = event(**change.get("target", {})) if isinstance(change.get("target", {}), dict) else event()
    for key, value in change.items():
        if key != "target" or not isinstance(value, dict):
            ev[key] = value
    verdict = classify(ev, CONFIG, 7)
    assert isinstance(verdict, Ignored), verdict
    assert reason in verdict.reason and verdict.malformed is malformed
    assert verdict.level == (logging.WARNING if malformed or "128" in reason else logging.DEBUG)


def test_non_objects_are_malformed() -> None:
    for value in ("push", 5, None, ["push"]):
        verdict = classify(value, CONFIG, 7)
        assert isinstance(verdict, Ignored) and verdict.malformed
