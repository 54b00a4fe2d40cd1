"""Image references: `host/repo:tag`, `host/repo@sha256:...`, and Docker Hub short names.

Follows the grammar of the distribution reference package: the first path component is a registry
host when it contains "." or ":" or is "localhost"; otherwise the image is on Docker Hub (`docker.io`)
and a single-component name gets the `library/` prefix. Without tag or digest the tag is `latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import ReferenceError

DOCKER_HUB = "docker.io"
# \Z, not $: $ also matches before a trailing newline. Character classes are spelled out because
# Python's \w matches any Unicode letter, the reference grammar only ASCII ones.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}\Z")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?\Z")


@dataclass(frozen=True)
class Reference:
    host: str  # registry host as users name it: "docker.io", "127.0.0.1:5000"
    repository: str  # "library/debian"
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or text != text.strip():
            raise ReferenceError(f"invalid image reference {text!r}: empty or surrounded by spaces")
        rest, at, digest = text.partition("@")
        if at and not _DIGEST.match(digest):
            raise ReferenceError(f"invalid image reference {text!r}: bad digest {digest!r}")
        name, tag = rest, None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            name, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.match(tag):
                raise ReferenceError(f"invalid image reference {text!r}: bad tag {tag!r}")
        first, sep, remainder = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            host, path = first, remainder
            if not _HOST.match(host):
                raise ReferenceError(f"invalid image reference {text!r}: bad registry host {host!r}")
        else:
            host, path = DOCKER_HUB, name
        if host == "index.docker.io":
            host = DOCKER_HUB
        if host == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if not path or not all(_COMPONENT.match(c) for c in path.split("/")):
            raise ReferenceError(
                f"invalid image reference {text!r}: repository {path!r} must be lowercase components "
                "of letters, digits and separators"
            )
        if tag is None and not digest:
            tag = "latest"
        return cls(host, path, tag, digest or None)

    @property
    def name(self) -> str:
        """host/repository, without tag or digest."""
        return f"{self.host}/{self.repository}"

    def with_tag(self, tag: str) -> Reference:
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digest)

    @property
    def object(self) -> str:
        """What a manifest URL names: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
