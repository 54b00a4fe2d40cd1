"""Errors of the layer format readers. Each names the layer and what is wrong with it."""

from __future__ import annotations


class FormatError(ValueError):
    """A layer that claims a seekable format but breaks its rules (bad footer, TOC or chunk)."""


class NotLazy(FormatError):
    """A valid layer that is not lazily loadable (plain gzip/zstd/tar): the caller falls back to a
    full pull. `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unverified(FormatError):
    """Content whose digest does not match what the TOC or the manifest promised: never served."""
