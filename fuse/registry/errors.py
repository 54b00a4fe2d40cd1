"""Errors of the registry client. Each says what failed, for which image or blob, and what to do;
none ever contains a credential."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class: the registry could not give what was asked."""


class ReferenceError(RegistryError, ValueError):
    """An image reference that cannot be parsed."""


class ConfigError(RegistryError):
    """A hosts.toml or docker config.json that cannot be used."""


class NotFound(RegistryError):
    """The manifest, tag or blob does not exist (HTTP 404)."""


class Unauthorized(RegistryError):
    """Credentials are missing or were refused (HTTP 401/403)."""


class RangeNotSatisfiable(RegistryError):
    """A byte range outside the blob (HTTP 416)."""


class Unavailable(RegistryError):
    """Every endpoint failed after retries (connection errors, 5xx, 429), or the deadline passed."""


class ProtocolViolation(RegistryError):
    """The registry answered something the protocol does not allow (wrong Content-Range, short body)."""


class DigestMismatch(RegistryError):
    """Content whose sha256 is not the digest it was fetched or pushed by."""


class ManifestError(RegistryError):
    """A manifest or index that is malformed, unsupported or has no matching platform."""
