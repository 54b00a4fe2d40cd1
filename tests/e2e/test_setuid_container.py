"""Setuid binaries keep working in container roots made of lazily pulled layers. The view that
`lazysnap mount` makes is nosuid,nodev, and so is the FUSE mount of the layers. A container's root is
different: containerd mounts it itself from the Mounts that lazysnap returns (an overlay over the FUSE
layer directories), and only that mount's own options count. Those Mounts carry no nosuid.

`ctr run` cannot show this: ctr 1.6 has no --user, and its default spec sets no_new_privs, which
ignores setuid bits. CRI and docker leave no_new_privs off. So the test mounts the active snapshot's
Mounts exactly as containerd would, then runs the image's setuid-root busybox in it as uid 65534."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import trio

from tests.e2e.test_lazy_pull import PLUGIN, accelerate, lazysnap_with, rpull
from tests.e2e.test_mount_security import SUID_CONF, as_nobody
from tests.harness import images as im
from tests.harness.containers import BUSYBOX, chain_ids
from tests.harness.registry import Registry, anonymous_client


def top_chain_id(ref: str) -> str:
    """The name containerd commits the image's top layer under (from the accelerated image's config)."""

    async def diff_ids() -> list[str]:
        client = anonymous_client()
        async with client:
            resolved = await client.resolve(ref)
            config = await client.get_blob(resolved.reference, resolved.config_descriptor["digest"])
            return json.loads(config)["rootfs"]["diff_ids"]

    return chain_ids(trio.run(diff_ids))[-1]


def test_setuid_root_binary_in_a_lazily_pulled_container_root(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background=False)
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    tools = [
        im.Dir("bin"),
        im.File("bin/busybox", BUSYBOX, mode=0o4755),
        im.File("etc/busybox.conf", SUID_CONF, mode=0o600),  # busybox keeps root for `id`
    ]
    images = {
        "one-layer": im.Image([im.Layer(tools)]),
        "two-layers": im.Image([im.Layer(tools), im.Layer([im.File("etc/motd", b"top\n")])]),
    }
    for name, image in images.items():
        ref = accelerate(registry, f"lazy/setuid-{name}", image)
        rpull(containerd, ref)
        served = list((snapshotter.root / "mnt").iterdir())
        assert len(served) >= len(image.layers), "the layers were not lazily pulled"
        out = containerd.ctr(
            "snapshots", "--snapshotter", PLUGIN, "prepare", "--mounts", f"root-{name}", top_chain_id(ref)
        ).stdout
        mounts = json.loads(out)
        assert [m["Type"] for m in mounts] == ["overlay"], mounts  # a container's root over the layers
        options = mounts[0]["Options"]
        assert not {"nosuid", "nodev"} & set(options), options
        assert all(str(snapshotter.root / "mnt") in o for o in options if o.startswith("lowerdir=")), options
        root = workdir / f"root-{name}"
        root.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(options), str(root)], check=True)
        try:
            p = as_nobody(root, "/bin/busybox", "id", "-u")
            assert p.stdout.strip() == b"0", f"{name}: setuid-root busybox did not run as root: {p}"
        finally:
            subprocess.run(["umount", str(root)], check=True)
