"""containerd's certs.d hosts configuration, read the way containerd 1.6 reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuse.registry.errors import ConfigError
from fuse.registry.hosts import CAPABILITIES, Endpoint, HostsConfig, is_loopback, load_endpoints


def write_hosts(root: Path, dirname: str, text: str) -> Path:
    directory = root / dirname
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)
    return directory


def urls(endpoints: list[Endpoint]) -> list[str]:
    return [e.base_url for e in endpoints]


# --- no configuration ---------------------------------------------------------------------------


def test_no_config_path_gives_the_https_origin() -> None:
    [origin] = load_endpoints("registry.example.com", None)
    assert origin == Endpoint("https", "registry.example.com", "/v2", registry="registry.example.com")
    assert origin.capabilities == CAPABILITIES
    assert not origin.mirror
    assert (origin.ca, origin.client, origin.skip_verify, origin.headers) == ((), (), False, ())


def test_docker_hub_origin_is_registry_1() -> None:
    [origin] = load_endpoints("docker.io", None)
    assert origin.base_url == "https://registry-1.docker.io/v2"
    assert origin.registry == "docker.io"


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:5000", "127.0.0.1", "127.0.0.1:5000", "127.8.9.10:80", "[::1]:5000", "[::1]"],
)
def test_loopback_hosts_are_plain_http(host: str) -> None:
    assert is_loopback(host)
    [origin] = load_endpoints(host, None)
    assert (origin.scheme, origin.host, origin.path) == ("http", host, "/v2")


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "10.0.0.1:5000",
        "128.0.0.1",
        "localhost.example.com:5000",
        "[::2]:5000",
        "[2001:db8::1]",
    ],
)
def test_other_hosts_are_https(host: str) -> None:
    assert not is_loopback(host)
    [origin] = load_endpoints(host, None)
    assert origin.scheme == "https"


def test_config_root_without_a_directory_for_the_host_gives_defaults(tmp_path: Path) -> None:
    write_hosts(tmp_path, "other.example.com", 'server = "https://elsewhere"\n')
    assert urls(load_endpoints("registry.example.com", tmp_path)) == ["https://registry.example.com/v2"]
    assert urls(load_endpoints("registry.example.com", tmp_path / "missing")) == [
        "https://registry.example.com/v2"
    ]


# --- host directory lookup ------------------------------------------------------------------------


def test_host_port_underscore_directory_is_preferred(tmp_path: Path) -> None:
    write_hosts(tmp_path, "reg.local_5000_", 'server = "https://underscored"\n')
    write_hosts(tmp_path, "reg.local:5000", 'server = "https://coloned"\n')
    write_hosts(tmp_path, "_default", 'server = "https://default"\n')
    assert urls(load_endpoints("reg.local:5000", tmp_path)) == ["https://underscored/v2"]


def test_host_colon_port_directory_is_used_without_the_underscore_one(tmp_path: Path) -> None:
    write_hosts(tmp_path, "reg.local:5000", 'server = "https://coloned"\n')
    write_hosts(tmp_path, "_default", 'server = "https://default"\n')
    assert urls(load_endpoints("reg.local:5000", tmp_path)) == ["https://coloned/v2"]


def test_ipv6_host_with_port_directory(tmp_path: Path) -> None:
    write_hosts(tmp_path, "[::1]_5000_", 'server = "http://[::1]:5000"\n')
    assert urls(load_endpoints("[::1]:5000", tmp_path)) == ["http://[::1]:5000/v2"]


def test_default_directory_is_the_fallback(tmp_path: Path) -> None:
    write_hosts(tmp_path, "reg.local", 'server = "https://specific"\n')
    default = write_hosts(tmp_path, "_default", 'ca = "ca.pem"\n')
    assert urls(load_endpoints("reg.local", tmp_path)) == ["https://specific/v2"]
    [origin] = load_endpoints("other.local:5000", tmp_path)
    # no server in _default: the origin is the registry host itself
    assert origin.base_url == "https://other.local:5000/v2"
    assert origin.ca == (default / "ca.pem",)


# --- server ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "override", "url"),
    [
        ("registry.example.com", False, "https://registry.example.com/v2"),
        ("registry.example.com:5443", False, "https://registry.example.com:5443/v2"),
        ("http://registry.example.com", False, "http://registry.example.com/v2"),
        ("https://registry.example.com/", False, "https://registry.example.com/v2"),
        ("https://registry.example.com/v2", False, "https://registry.example.com/v2"),
        ("https://registry.example.com/v2/", False, "https://registry.example.com/v2"),
        (
            "https://proxy.example.com/artifactory/api/docker",
            False,
            "https://proxy.example.com/artifactory/api/docker/v2",
        ),
        ("https://proxy.example.com/custom/api", True, "https://proxy.example.com/custom/api"),
        ("https://proxy.example.com", True, "https://proxy.example.com"),
    ],
)
def test_server_url(tmp_path: Path, server: str, override: bool, url: str) -> None:
    write_hosts(tmp_path, "reg.local", f'server = "{server}"\noverride_path = {str(override).lower()}\n')
    [origin] = load_endpoints("reg.local", tmp_path)
    assert origin.base_url == url
    assert not origin.mirror
    assert origin.registry == "reg.local"


def test_without_server_the_origin_is_the_default_one(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io", '[host."https://mirror.example.com"]\ncapabilities = ["pull"]\n')
    assert urls(load_endpoints("docker.io", tmp_path)) == [
        "https://mirror.example.com/v2",
        "https://registry-1.docker.io/v2",
    ]
    write_hosts(tmp_path, "localhost:5000", "skip_verify = true\n")
    [origin] = load_endpoints("localhost:5000", tmp_path)
    assert origin.base_url == "http://localhost:5000/v2"
    assert origin.skip_verify


# --- mirrors --------------------------------------------------------------------------------------


def test_mirrors_come_in_file_order_before_the_origin(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "docker.io",
        """
server = "https://registry-1.docker.io"

[host."https://zeta.example.com"]
  capabilities = ["pull", "resolve"]

[host."http://alpha.example.com:5000"]
  capabilities = ["pull"]

[host."mid.example.com/prefix"]
  capabilities = ["pull"]
""",
    )
    endpoints = load_endpoints("docker.io", tmp_path)
    assert urls(endpoints) == [
        "https://zeta.example.com/v2",
        "http://alpha.example.com:5000/v2",
        "https://mid.example.com/prefix/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert [e.mirror for e in endpoints] == [True, True, True, False]
    assert {e.registry for e in endpoints} == {"docker.io"}
    assert [sorted(e.capabilities) for e in endpoints] == [
        ["pull", "resolve"],
        ["pull"],
        ["pull"],
        ["pull", "push", "resolve"],
    ]


def test_top_level_settings_apply_to_the_origin_only(tmp_path: Path) -> None:
    directory = write_hosts(
        tmp_path,
        "reg.local",
        """
server = "https://reg.local"
ca = "origin-ca.pem"
skip_verify = true

[host."https://mirror.local"]
  ca = "mirror-ca.pem"
""",
    )
    mirror, origin = load_endpoints("reg.local", tmp_path)
    assert mirror.ca == (directory / "mirror-ca.pem",)
    assert not mirror.skip_verify
    assert origin.ca == (directory / "origin-ca.pem",)
    assert origin.skip_verify


# --- capabilities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", {"pull", "resolve", "push"}),
        ("capabilities = []", {"pull", "resolve", "push"}),  # containerd: empty means all
        ('capabilities = ["pull"]', {"pull"}),
        ('capabilities = ["pull", "resolve"]', {"pull", "resolve"}),
        ('capabilities = ["PULL", "Push"]', {"pull", "push"}),
    ],
)
def test_capabilities(tmp_path: Path, line: str, expected: set[str]) -> None:
    write_hosts(tmp_path, "reg.local", f'server = "https://reg.local"\n{line}\n')
    [origin] = load_endpoints("reg.local", tmp_path)
    assert origin.capabilities == expected
    for capability in ("pull", "resolve", "push"):
        assert origin.can(capability) == (capability in expected)


def test_unknown_capability_is_an_error(tmp_path: Path) -> None:
    directory = write_hosts(tmp_path, "reg.local", '[host."https://m"]\ncapabilities = ["pull", "delete"]\n')
    with pytest.raises(ConfigError) as info:
        load_endpoints("reg.local", tmp_path)
    assert str(directory / "hosts.toml") in str(info.value)
    assert "delete" in str(info.value)
    assert "https://m" in str(info.value)


# --- TLS files --------------------------------------------------------------------------------------


def test_ca_as_string_or_list_with_relative_paths_resolved_against_the_host_dir(tmp_path: Path) -> None:
    directory = write_hosts(
        tmp_path,
        "reg.local",
        """
server = "https://reg.local"
ca = ["ca.pem", "/etc/ssl/extra.pem", "sub/other.pem"]

[host."https://mirror.local"]
  ca = "/abs/mirror.pem"
""",
    )
    mirror, origin = load_endpoints("reg.local", tmp_path)
    assert mirror.ca == (Path("/abs/mirror.pem"),)
    assert origin.ca == (directory / "ca.pem", Path("/etc/ssl/extra.pem"), directory / "sub" / "other.pem")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('client = "both.pem"', [("both.pem", None)]),
        ('client = ["one.pem", "/abs/two.pem"]', [("one.pem", None), ("/abs/two.pem", None)]),
        (
            'client = [["c.cert", "c.key"], ["/a/d.cert", "/a/d.key"]]',
            [("c.cert", "c.key"), ("/a/d.cert", "/a/d.key")],
        ),
        ('client = ["mixed.pem", ["c.cert", "c.key"]]', [("mixed.pem", None), ("c.cert", "c.key")]),
    ],
)
def test_client_certificates(tmp_path: Path, line: str, expected: list[tuple[str, str | None]]) -> None:
    directory = write_hosts(tmp_path, "reg.local", f'server = "https://reg.local"\n{line}\n')
    [origin] = load_endpoints("reg.local", tmp_path)
    assert origin.client == tuple(
        (directory / cert, None if key is None else directory / key) for cert, key in expected
    )


def test_directory_with_certificate_files_and_no_hosts_toml(tmp_path: Path) -> None:
    directory = tmp_path / "reg.local:5000"
    directory.mkdir()
    for name in ("ca.crt", "b-ca.crt", "client.cert", "client.key", "nokey.cert", "README"):
        (directory / name).write_text("x")
    [origin] = load_endpoints("reg.local:5000", tmp_path)
    assert origin.base_url == "https://reg.local:5000/v2"
    assert not origin.mirror
    assert origin.capabilities == CAPABILITIES
    assert set(origin.ca) == {directory / "ca.crt", directory / "b-ca.crt"}
    assert set(origin.client) == {
        (directory / "client.cert", directory / "client.key"),
        (directory / "nokey.cert", None),
    }


def test_empty_host_directory_gives_the_plain_origin(tmp_path: Path) -> None:
    (tmp_path / "localhost:5000").mkdir()
    [origin] = load_endpoints("localhost:5000", tmp_path)
    assert origin == Endpoint("http", "localhost:5000", "/v2", registry="localhost:5000")


# --- skip_verify, header ----------------------------------------------------------------------------


def test_skip_verify_and_headers(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "reg.local",
        """
server = "https://reg.local"
skip_verify = true

[header]
  X-Single = "one"
  X-Multi = ["a", "b"]

[host."https://mirror.local"]
  skip_verify = false
  [host."https://mirror.local".header]
    Authorization = "Basic abc"
""",
    )
    mirror, origin = load_endpoints("reg.local", tmp_path)
    assert origin.skip_verify
    assert origin.headers == (("X-Single", "one"), ("X-Multi", "a"), ("X-Multi", "b"))
    assert not mirror.skip_verify
    assert mirror.headers == (("Authorization", "Basic abc"),)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('server = "https://reg.local"\n[host\n', "cannot read"),  # invalid TOML
        ("server = 5\n", "server"),
        ('host = "https://mirror"\n', "host"),
        ('[host]\n"https://m" = 1\n', "must be a table"),
        ('capabilities = "pull"\n', "capabilities"),
        ("capabilities = [1]\n", "capabilities"),
        ("ca = 5\n", "ca"),
        ('ca = ["a.pem", 2]\n', "ca"),
        ("client = 5\n", "client"),
        ('client = [["only-cert.pem"]]\n', "client"),
        ('client = [["a", "b", "c"]]\n', "client"),
        ('client = [["a", 1]]\n', "client"),
        ('skip_verify = "yes"\n', "skip_verify"),
        ('override_path = "yes"\n', "override_path"),
        ('header = "X-A: b"\n', "header"),
        ("[header]\nX-A = 1\n", "X-A"),
        ('server = "https://"\n', "no host"),
    ],
)
def test_invalid_configuration_names_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    directory = write_hosts(tmp_path, "reg.local", text)
    with pytest.raises(ConfigError) as info:
        load_endpoints("reg.local", tmp_path)
    assert str(directory / "hosts.toml") in str(info.value)
    assert fragment in str(info.value)


def test_undecodable_hosts_toml_is_a_config_error(tmp_path: Path) -> None:
    directory = tmp_path / "reg.local"
    directory.mkdir()
    (directory / "hosts.toml").write_bytes(b'server = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="hosts.toml"):
        load_endpoints("reg.local", tmp_path)


# --- Endpoint, HostsConfig ----------------------------------------------------------------------------


def test_endpoint_url() -> None:
    endpoint = Endpoint("https", "reg.local:5000", "/v2", registry="reg.local:5000")
    assert endpoint.base_url == "https://reg.local:5000/v2"
    assert endpoint.url("a/b", "manifests", "v1") == "https://reg.local:5000/v2/a/b/manifests/v1"
    assert endpoint.url("a/b", "blobs", "sha256:00") == "https://reg.local:5000/v2/a/b/blobs/sha256:00"
    assert endpoint.url("a/b", "blobs/uploads") == "https://reg.local:5000/v2/a/b/blobs/uploads/"


def test_endpoint_url_with_overridden_paths(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "reg.local",
        """
server = "https://proxy.local"
override_path = true

[host."https://mirror.local/api/v2/"]
  override_path = true
""",
    )
    mirror, origin = load_endpoints("reg.local", tmp_path)
    assert mirror.url("x", "manifests", "latest") == "https://mirror.local/api/v2/x/manifests/latest"
    assert origin.url("x", "manifests", "latest") == "https://proxy.local/x/manifests/latest"


def test_hosts_config_reads_each_host_once(tmp_path: Path) -> None:
    hosts_file = write_hosts(tmp_path, "reg.local", 'server = "https://first"\n') / "hosts.toml"
    config = HostsConfig(tmp_path)
    first = config.endpoints("reg.local")
    hosts_file.write_text('server = "https://second"\n')
    assert config.endpoints("reg.local") is first
    assert urls(first) == ["https://first/v2"]
    assert urls(HostsConfig(tmp_path).endpoints("reg.local")) == ["https://second/v2"]
    assert urls(HostsConfig().endpoints("docker.io")) == ["https://registry-1.docker.io/v2"]


def test_unknown_keys_are_ignored_like_containerd(tmp_path: Path, caplog) -> None:
    (tmp_path / "r.example").mkdir()
    (tmp_path / "r.example" / "hosts.toml").write_text(
        'server = "https://r.example"\ndial_timeout = "3s"\n'
        '[host."https://m.example"]\n  dial_timeout = "1s"\n'
    )
    endpoints = load_endpoints("r.example", tmp_path)
    assert [e.base_url for e in endpoints] == ["https://m.example/v2", "https://r.example/v2"]
    assert "dial_timeout" in caplog.text
