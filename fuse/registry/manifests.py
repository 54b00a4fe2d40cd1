"""Image manifests and indexes: media types, parsing with validation, platform selection."""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass

from .errors import ManifestError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((*MANIFESTS, *INDEXES))
MAX_MANIFEST_SIZE = 4 << 20  # containerd's limit


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ManifestError(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(*parts)

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        arch, variant = {
            "x86_64": ("amd64", ""),
            "amd64": ("amd64", ""),
            "aarch64": ("arm64", ""),
            "arm64": ("arm64", ""),
            "armv7l": ("arm", "v7"),
            "armv6l": ("arm", "v6"),
            "ppc64le": ("ppc64le", ""),
            "s390x": ("s390x", ""),
            "riscv64": ("riscv64", ""),
            "i686": ("386", ""),
        }.get(machine, (machine, ""))
        return cls("linux", arch, variant)

    def matches(self, entry: dict) -> bool:
        if entry.get("os") != self.os or entry.get("architecture") != self.architecture:
            return False
        theirs = entry.get("variant", "")
        if self.architecture == "arm64":  # v8 is arm64's only variant: absent means v8
            return (theirs or "v8") == (self.variant or "v8")
        if self.architecture == "arm":  # an arm entry without variant is v7, as containerd normalizes it
            theirs = theirs or "v7"
        return not self.variant or theirs == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse(body: bytes, media_type: str, what: str) -> tuple[dict, str]:
    """Decode a manifest or index; return (document, media type). Content-Type is trusted only when
    the document does not say its own mediaType."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{what}: manifest is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ManifestError(f"{what}: manifest is not a JSON object")
    kind = doc.get("mediaType") or media_type.split(";")[0].strip()
    if kind not in (*MANIFESTS, *INDEXES):
        if doc.get("schemaVersion") == 1:
            raise ManifestError(f"{what}: Docker schema 1 manifests are not supported; push the image again")
        if "manifests" in doc:
            kind = OCI_INDEX
        elif "layers" in doc and "config" in doc:
            kind = OCI_MANIFEST
        else:
            raise ManifestError(f"{what}: unsupported manifest media type {kind!r}")
    key = "manifests" if kind in INDEXES else "layers"
    if not isinstance(doc.get(key), list) or (key == "layers" and not isinstance(doc.get("config"), dict)):
        raise ManifestError(f"{what}: {kind} without a valid {key!r} list")
    for desc in doc[key] + ([doc["config"]] if key == "layers" else []):
        if (
            not isinstance(desc, dict)
            or not isinstance(desc.get("digest"), str)
            or not isinstance(desc.get("size"), int)
        ):
            raise ManifestError(f"{what}: a descriptor lacks a digest or size: {str(desc)[:200]}")
    return doc, kind


def select(index: dict, want: Platform, what: str) -> dict:
    """The descriptor of the manifest for a platform in an index."""
    for entry in index["manifests"]:
        if want.matches(entry.get("platform") or {}):
            return entry
    have = ", ".join(
        str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant", "")))
        for p in (e.get("platform") or {} for e in index["manifests"])
    )
    raise ManifestError(f"{what}: no manifest for platform {want} (the index has: {have or 'none'})")


# --- what the image's containers run -----------------------------------------------------------------

MAX_CONFIG_READ = 1 << 20  # an image config read for its command (real ones: a few KiB)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # runc's, when unset
MAX_PATH_DIRS = 32  # PATH directories a program is looked for in
PATH_MAX = 4096  # a longer path cannot be executed (ENAMETOOLONG): it is not looked up


@dataclass(frozen=True)
class Command:
    """What a container of the image runs unless told otherwise: the image config's Entrypoint, then
    its Cmd (as Docker and containerd join them), in its working directory and PATH."""

    argv: tuple[str, ...]
    workdir: str = "/"
    path: tuple[str, ...] = tuple(DEFAULT_PATH.split(":"))

    def program(self) -> list[str]:
        """Where the program may be, in the order it is looked for: argv[0] itself when it names a path
        (relative to the working directory), else in each PATH directory."""
        name = self.argv[0]
        if "/" in name:
            paths = [name if name.startswith("/") else f"{self.workdir.rstrip('/')}/{name}"]
        else:
            paths = [f"{d.rstrip('/')}/{name}" for d in self.path if d.startswith("/")][:MAX_PATH_DIRS]
        return [p for p in paths if len(p.encode("utf-8", "surrogateescape")) < PATH_MAX]


def command(config: bytes) -> Command | None:
    """The command an image config names, or None when it names none (or is not a valid config)."""
    try:
        doc = json.loads(config)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer of over 4300 digits...
        return None
    settings = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(settings, dict):
        return None

    def strings(key: str) -> list[str]:
        value = settings.get(key)
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else []

    argv = [*strings("Entrypoint"), *strings("Cmd")]
    if not argv or not argv[0]:
        return None
    workdir = settings.get("WorkingDir")
    path = next((e[5:] for e in strings("Env") if e.startswith("PATH=")), DEFAULT_PATH)
    return Command(
        tuple(argv),
        workdir if isinstance(workdir, str) and workdir.startswith("/") else "/",
        tuple(path.split(":")),
    )
