"""convertd's notification events: what one event of a registry's notification envelope asks for
(``classify``: a ``Push`` to convert, or ``Ignored`` and why), the timestamps in it, and the fields of an
event worth logging.
"""

from __future__ import annotations

import calendar
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fuse.registry import Reference, RegistryError
from fuse.registry import manifests as mf
from snapshotter.convert.image import MAX_TAG
from snapshotter.convertd.config import Config
from snapshotter.convertd.jobs import Push

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
MANIFEST_TYPES = frozenset((*mf.MANIFESTS, *mf.INDEXES))
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


@dataclass(frozen=True)
class Ignored:
    """An event that asks for no conversion, and why (logged at `level`)."""

    reason: str
    level: int = logging.DEBUG
    malformed: bool = False


_TIMESTAMP = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:\d\d)\Z")


def parse_timestamp(text: Any) -> int | None:
    """An RFC 3339 timestamp ("2024-05-01T10:00:00.123456789Z") -> nanoseconds since the epoch."""
    if not isinstance(text, str):
        return None
    m = _TIMESTAMP.match(text.strip())
    if not m:
        return None
    try:
        seconds = calendar.timegm(tuple(int(m[i]) for i in range(1, 7)) + (0, 0, 0))  # type: ignore[arg-type]
    except (ValueError, OverflowError):
        return None
    zone = m[8].upper()
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int((m[7] or "0")[:9].ljust(9, "0"))


def classify(event: Any, config: Config, now_ns: int) -> Push | Ignored:
    """What one notification event asks for: a Push to convert, or why it is ignored."""

    def malformed(why: str) -> Ignored:
        return Ignored(f"malformed event: {why}", logging.WARNING, malformed=True)

    if not isinstance(event, dict):
        return malformed("not a JSON object")
    action = event.get("action")
    if not isinstance(action, str):
        return malformed("no action")
    if action != "push":
        known = action in ("pull", "delete", "mount")
        return Ignored(f"{action} event" if known else f"unknown action {action[:40]!r}")
    target = event.get("target")
    if not isinstance(target, dict):
        return malformed("no target")
    media_type = target.get("mediaType")
    repository = target.get("repository")
    digest = target.get("digest")
    tag = target.get("tag") or None
    if not isinstance(repository, str) or not repository:
        return malformed("target without a repository")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        return malformed(f"target digest {str(digest)[:80]!r} is not a sha256 digest")
    if not isinstance(media_type, str) or media_type.split(";")[0].strip() not in MANIFEST_TYPES:
        return Ignored(f"not an image manifest or index ({str(media_type)[:80]})")
    media_type = media_type.split(";")[0].strip()
    if tag is None:
        return Ignored("pushed by digest, without a tag")
    if not isinstance(tag, str) or not _TAG.match(tag):
        return malformed(f"tag {str(tag)[:80]!r} is not a valid tag")
    if tag.endswith(config.suffix):
        return Ignored(f"tag ends in {config.suffix!r}: an accelerated image is never converted again")
    rule = config.rule_for(repository)
    if rule is None:
        return Ignored(f"repository {repository} is not enabled")
    if len(tag) + len(config.suffix) > MAX_TAG:
        return Ignored(
            f"tag {tag!r} plus {config.suffix!r} would be over {MAX_TAG} characters", logging.WARNING
        )
    host = config.registry or _event_host(event)
    if not host:
        return malformed("no registry host in target.url or request.host (or set registry in the config)")
    try:
        ref = Reference.parse(f"{host}/{repository}:{tag}")
    except RegistryError as e:
        return malformed(str(e))
    if ref.repository != repository:
        return malformed(f"{host!r} is not a registry host[:port], or {repository!r} not a repository name")
    event_id = event.get("id") if isinstance(event.get("id"), str) else ""
    pushed_at = parse_timestamp(event.get("timestamp")) or now_ns
    return Push(ref.host, ref.repository, digest, media_type, tag, pushed_at, rule.options(), event_id[:100])


def _event_host(event: dict) -> str | None:
    url = event["target"].get("url")
    if isinstance(url, str) and url:
        netloc = urlsplit(url).netloc
        if netloc:
            return netloc.rpartition("@")[2]
    request = event.get("request")
    if isinstance(request, dict) and isinstance(request.get("host"), str) and request["host"]:
        return request["host"]
    return None


def event_fields(event: Any) -> dict[str, Any]:
    if not isinstance(event, dict):
        return {}
    target = event.get("target") if isinstance(event.get("target"), dict) else {}
    return {
        k: str(v)[:200]
        for k, v in (
            ("action", event.get("action")),
            ("repository", target.get("repository")),
            ("tag", target.get("tag")),
            ("digest", target.get("digest")),
            ("media_type", target.get("mediaType")),
        )
        if v is not None
    }
