"""The registry client: image references, containerd hosts configuration, credentials and
authentication, range reads and pushes. `RegistryClient` is the entry point."""

from .client import Options, RegistryClient, Resolved
from .credentials import Credentials, CredentialStore
from .errors import (
    ConfigError,
    DigestMismatch,
    ManifestError,
    NotFound,
    ProtocolViolation,
    RangeNotSatisfiable,
    RegistryError,
    Unauthorized,
    Unavailable,
)
from .hosts import Endpoint, HostsConfig
from .manifests import Platform
from .reference import Reference

__all__ = [
    "ConfigError",
    "Credentials",
    "CredentialStore",
    "DigestMismatch",
    "Endpoint",
    "HostsConfig",
    "ManifestError",
    "NotFound",
    "Options",
    "Platform",
    "ProtocolViolation",
    "RangeNotSatisfiable",
    "Reference",
    "RegistryClient",
    "RegistryError",
    "Resolved",
    "Unauthorized",
    "Unavailable",
]
