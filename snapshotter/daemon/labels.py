"""containerd's Prepare labels that ask for a lazy pull, read into the neutral `fuse.layers.LayerRequest`.

containerd asks for a lazy pull by labelling the Prepare of each layer (shared/reference/
containerd-protocol.md): `ctr-remote rpull` with `containerd.io/snapshot/remote/stargz.*`, CRI with
`containerd.io/snapshot/cri.*`, both with the target name in `containerd.io/snapshot.ref` and, when the
manifest has it, the TOC digest in `containerd.io/snapshot/stargz/toc.digest` (the same key as the
manifest annotation: `fuse.formats.spec.TOC_DIGEST`). The labels also name the image's other layers,
whose TOCs are then read ahead.
"""

from __future__ import annotations

import re

from fuse.formats.spec import TOC_DIGEST
from fuse.layers import MAX_AHEAD, LayerRequest
from fuse.registry import Reference

TARGET = "containerd.io/snapshot.ref"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
CRI_REFERENCE = "containerd.io/snapshot/cri.image-ref"
CRI_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"  # this layer's digest, then those above
CRI_LAYERS = "containerd.io/snapshot/cri.image-layers"  # every layer of the image
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def layer_request(labels: dict[str, str]) -> LayerRequest | None:
    """The lazy pull a Prepare's labels ask for, or None for an ordinary Prepare."""
    target = labels.get(TARGET)
    ref = labels.get(STARGZ_REFERENCE) or labels.get(CRI_REFERENCE)
    digest = labels.get(STARGZ_DIGEST) or labels.get(CRI_DIGEST)
    if not (target and ref and digest):
        return None
    try:
        reference = Reference.parse(ref)
    except ValueError:
        return None
    named = (labels.get(STARGZ_LAYERS) or labels.get(CRI_LAYERS) or "").split(",")
    others = tuple(dict.fromkeys(d for d in named if _DIGEST.fullmatch(d) and d != digest))[:MAX_AHEAD]
    return LayerRequest(target, reference, digest, labels.get(TOC_DIGEST), labels.get(CRI_MANIFEST), others)
