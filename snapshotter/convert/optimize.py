"""`lazysnap convert SRC [DST] --optimize --run COMMAND`: prioritize the files a workload opens.

1. SRC is converted once without prioritized files, under a scratch tag beside DST (`<DST tag>-optimize-
   tmp`, mounted by digest); an image whose layers are all lazily loadable already is used as it is.
2. That image is mounted lazily by `lazysnap mount --record` in a child process (pyfuse3 serves one mount
   per process, and a FUSE server of its own can neither stall nor take down the caller's trio loop:
   convertd runs conversions beside its HTTP server). `LazyFS` records each regular file opened, once,
   in first-open order; the mount writes the list when it stops.
3. COMMAND runs as `/bin/sh -c COMMAND` (as root, with the image's Env and WorkingDir, the host's
   network), chrooted into a writable overlay over the mounted tree (upper and work directories in the
   temp dir), in new mount and PID namespaces (util-linux `unshare`), with /proc of its PID namespace, a
   minimal /dev on tmpfs, /sys read-only, and tmpfs on /tmp and /run. When it exits, or at the timeout,
   every process of its PID namespace is killed, and its mounts vanish with its mount namespace.
4. The mount is stopped, and SRC is converted again with the recorded paths prioritized, in order: they
   lie before `.prefetch.landmark` in each layer that has them.

Processes, mounts and the temp dir are cleaned up on errors, timeouts and cancellation; should this
process die without cleaning up, the kernel sends the mount SIGTERM (it unmounts itself) and the
workload's namespace SIGKILL (PR_SET_PDEATHSIG). The scratch tag stays in the registry (the registry
client does not delete tags); the next run for the same DST overwrites it.

The sandbox isolates for cleanup, not for security: the image's code runs as root with every capability
and the host's network. Optimize only images you trust (for convertd: repositories whose pushers you
trust).

The workload's first process, in its new namespaces, is `python -m snapshotter.convert.sandbox SPEC`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from fuse.registry import Platform, Reference, RegistryClient, RegistryError
from snapshotter import host
from snapshotter.convert.converter import (
    ConvertError,
    ConvertResult,
    convert_image,
    default_destination,
    read_prioritized,
)
from snapshotter.convert.image import all_accelerated

DEFAULT_TIMEOUT = 60.0  # seconds the workload may run
MOUNT_TIMEOUT = 120.0  # for `lazysnap mount` to resolve the image and read every layer's TOC
STOP_GRACE = 15.0  # for a process to exit after SIGTERM (or its namespace after SIGKILL)
SCRATCH_SUFFIX = "-optimize-tmp"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_TAIL = 20  # lines of a child's output quoted in an error


class OptimizeError(ConvertError):
    """Running the workload on the lazily mounted image failed; the message says what and why."""


# --- the API ----------------------------------------------------------------------------------------------


async def optimize_image(
    client: RegistryClient,
    src: Reference | str,
    dst: Reference | str | None,
    command: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    **convert_kwargs: Any,
) -> ConvertResult:
    """`convert_image(client, src, dst, **convert_kwargs)` with the files `command` opens prioritized:
    convert once without prioritized files (or use SRC as it is when it is accelerated already), record
    the files the command opens on that image mounted lazily (`record_accessed_files`), convert again
    with them. The platform the workload runs on is `platform`, else the host's. Raises ConvertError
    (OptimizeError when the workload could not be run)."""
    if convert_kwargs.pop("prioritize", None):
        raise ConvertError("the files to prioritize are recorded from the workload: give no others")
    started = time.monotonic()
    say: Callable[[str], None] = convert_kwargs.get("log") or (lambda _msg: None)
    try:
        src_ref = Reference.parse(src) if isinstance(src, str) else src
        dst_ref = (Reference.parse(dst) if isinstance(dst, str) else dst) or default_destination(src_ref)
    except (RegistryError, ValueError) as e:
        raise ConvertError(str(e)) from e
    if dst_ref.digest or not dst_ref.tag or (dst_ref.name, dst_ref.tag) == (src_ref.name, src_ref.tag):
        raise ConvertError(f"DST {dst_ref} must be a tag other than SRC's")
    platform = convert_kwargs.get("platform")
    image = await _lazily_loadable(client, src_ref, platform)
    if image is not None:
        say(f"{src_ref} is accelerated already: the workload runs on it")
    else:
        scratch = replace(dst_ref, tag=scratch_tag(dst_ref.tag), digest=None)
        say(f"converting {src_ref} to {scratch} (nothing prioritized) to run the workload on")
        first = await convert_image(client, src_ref, scratch, **{**convert_kwargs, "all_platforms": False})
        image = replace(scratch, tag=None, digest=first.digest)
    paths = await record_accessed_files(
        client,
        image,
        command,
        timeout=timeout,
        platform=platform,
        tmpdir=convert_kwargs.get("tmpdir"),
        log=say,
    )
    say(f"recorded {len(paths)} files opened by the workload")
    result = await convert_image(client, src_ref, dst_ref, prioritize=paths, **convert_kwargs)
    result.seconds = time.monotonic() - started
    return result


async def record_accessed_files(
    client: RegistryClient,
    image_ref: Reference | str,
    command: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    platform: Platform | str | None = None,
    tmpdir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Mount the accelerated image lazily, run `/bin/sh -c command` chrooted into it until it exits or
    `timeout` seconds pass, and return the absolute paths of the regular files it opened, once each, in
    first-open order. Needs root. The mount reaches the registry with the client's hosts directory,
    plain-HTTP setting and docker config (not with credentials given to the client in code)."""
    say = log or (lambda _msg: None)
    if not timeout > 0:
        raise OptimizeError(f"the workload's timeout must be positive, not {timeout}")
    if os.geteuid() != 0:
        raise OptimizeError("running a workload on the image needs root (it mounts the image and chroots)")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise OptimizeError("running a workload needs `unshare` (util-linux) on the PATH")
    try:
        ref = Reference.parse(image_ref) if isinstance(image_ref, str) else image_ref
        want = Platform.parse(platform) if isinstance(platform, str) else platform
        resolved = await client.resolve(ref, want)
        config = json.loads(await client.get_blob(resolved.reference, resolved.config_descriptor["digest"]))
        env, cwd = workload_environment(config)
    except (RegistryError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise OptimizeError(f"cannot read the image {image_ref} to run the workload on: {e}") from e
    work = Path(tempfile.mkdtemp(prefix="lazysnap-optimize-", dir=tmpdir)).absolute()
    try:
        os.chmod(work, 0o700)
        if re.search(r"[,:\\\s]", str(work)):
            raise OptimizeError(f"{work}: overlayfs options cannot name it; choose another temp dir")
        async with _lazy_mount(client, resolved.reference, work, say) as (lower, record):
            await _run_workload(unshare, work, lower, command, env, cwd, timeout, say)
        try:
            return read_prioritized(record)
        except ConvertError as e:
            raise OptimizeError(f"lazysnap mount wrote no record: {e}\n{_tail(work / 'mount.log')}") from e
    finally:
        with trio.CancelScope(shield=True):
            await _remove(work)


def scratch_tag(tag: str) -> str:
    """The tag the unprioritized conversion is pushed under, beside DST's."""
    scratch = tag + SCRATCH_SUFFIX
    if len(scratch) <= 128:
        return scratch
    return "lazysnap" + SCRATCH_SUFFIX + "-" + hashlib.sha256(tag.encode()).hexdigest()[:16]


def workload_environment(config: dict) -> tuple[dict[str, str], str]:
    """The environment and working directory the image config gives its processes (PATH and HOME
    defaulted as container runtimes do)."""
    settings = config.get("config") or {}
    env: dict[str, str] = {}
    for item in settings.get("Env") or ():
        if isinstance(item, str) and "=" in item:
            key, value = item.split("=", 1)
            env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/root")
    cwd = settings.get("WorkingDir") or "/"
    return env, posixpath.normpath(posixpath.join("/", str(cwd)))


async def _lazily_loadable(
    client: RegistryClient, ref: Reference, platform: Platform | str | None
) -> Reference | None:
    """ref pinned to its manifest, when every layer of it can be mounted lazily as it is."""
    try:
        want = Platform.parse(platform) if isinstance(platform, str) else platform
        resolved = await client.resolve(ref, want)
    except RegistryError:
        return None  # the conversion says what is wrong with it
    return resolved.reference if all_accelerated(resolved.layers) else None


# --- the mount and the workload -----------------------------------------------------------------------------


class _Child:
    """A child process in its own session, with its output in a log file. Started from the calling
    (trio) thread, not a worker thread as trio.lowlevel.open_process does: PR_SET_PDEATHSIG follows the
    thread that forked, and a worker thread exits whenever trio retires it."""

    def __init__(self, argv: Sequence[str], log_path: Path, death_signal: int):
        def die_with_parent() -> None:
            host.set_death_signal(death_signal)

        with open(log_path, "ab") as out:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.pid = self.popen.pid
        self._pidfd = os.pidfd_open(self.pid)

    def poll(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        if self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        return self.popen.wait()

    async def stop(self, signum: int, grace: float = STOP_GRACE) -> int:
        """Send signum, SIGKILL after `grace` seconds; the exit status."""
        if self.poll() is None:
            self.popen.send_signal(signum)
            with trio.move_on_after(grace):
                await self.wait()
            if self.poll() is None:
                self.popen.kill()
        code = await self.wait()
        trio.lowlevel.notify_closing(self._pidfd)
        os.close(self._pidfd)
        return code


@contextlib.asynccontextmanager
async def _lazy_mount(
    client: RegistryClient, ref: Reference, work: Path, say: Callable[[str], None]
) -> AsyncIterator[tuple[Path, Path]]:
    """`lazysnap mount --record` of ref at work/lower; yields (mountpoint, record file). On exit it is
    stopped with SIGTERM (it unmounts and writes the record)."""
    lower, record, log_path = work / "lower", work / "record.txt", work / "mount.log"
    lower.mkdir()
    argv = [sys.executable, "-m", "snapshotter.cli", "mount", "--no-background", "--record", str(record)]
    argv += ["--cache", str(work / "cache"), "--docker-config", str(client.credentials.docker_config)]
    if client.hosts.config_path is not None:
        argv += ["--hosts-dir", str(client.hosts.config_path)]
    if client.hosts.plain_http:
        argv.append("--plain-http")
    argv += [str(ref), str(lower)]
    proc = _Child(argv, log_path, signal.SIGTERM)
    try:
        with trio.move_on_after(MOUNT_TIMEOUT):
            while not host.is_mountpoint(lower):
                if proc.poll() is not None:
                    raise OptimizeError(f"lazysnap mount {ref} failed:\n{_tail(log_path)}")
                await trio.sleep(0.05)
        if not host.is_mountpoint(lower):
            raise OptimizeError(f"lazysnap mount {ref}: not mounted after {MOUNT_TIMEOUT:.0f}s")
        say(f"mounted {ref} lazily; recording the files opened")
        yield lower, record
    finally:
        with trio.CancelScope(shield=True):
            code = await proc.stop(signal.SIGTERM)
    if code != 0:
        raise OptimizeError(f"lazysnap mount {ref} exited with status {code}:\n{_tail(log_path)}")


async def _run_workload(
    unshare: str,
    work: Path,
    lower: Path,
    command: str,
    env: dict[str, str],
    cwd: str,
    timeout: float,
    say: Callable[[str], None],
) -> None:
    """Run the command in its sandbox until it exits or the timeout; kill what is left of it."""
    for name in ("upper", "ovlwork", "root"):
        (work / name).mkdir()
    spec = work / "sandbox.json"
    spec.write_text(
        json.dumps(
            {
                "lower": str(lower),
                "upper": str(work / "upper"),
                "work": str(work / "ovlwork"),
                "root": str(work / "root"),
                "command": command,
                "env": env,
                "cwd": cwd,
            }
        )
    )
    log_path = work / "workload.log"
    argv = [unshare, "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--"]
    argv += [sys.executable, "-m", "snapshotter.convert.sandbox", str(spec)]
    say(f"running the workload (at most {timeout:g}s): {command}")
    proc = _Child(argv, log_path, signal.SIGKILL)
    try:
        with trio.move_on_after(timeout) as waiting:
            await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            await _kill_namespace(proc)
    failed = work / "sandbox.error"
    if failed.exists():
        raise OptimizeError(f"cannot run the workload: {failed.read_text().strip()}")
    if waiting.cancelled_caught:
        say(f"the workload was still running after {timeout:g}s: stopped")
    elif proc.popen.returncode:
        say(f"the workload exited with status {proc.popen.returncode}; its last output:\n{_tail(log_path)}")
    else:
        say("the workload exited with status 0")


async def _kill_namespace(proc: _Child) -> None:
    """Kill the workload's PID namespace: its first process (unshare's child; the kernel then kills the
    rest), and wait for unshare, which exits once its child is gone. unshare itself is killed only when
    it has no child yet, or does not exit: `--kill-child` passes that SIGKILL on."""
    if proc.poll() is None:
        children = _children(proc.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if children:
            with trio.move_on_after(STOP_GRACE):
                await proc.wait()
    await proc.stop(signal.SIGKILL, grace=0)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def _remove(work: Path) -> None:
    """Unmount whatever is still mounted under work (detached, deepest first), then delete it."""
    for point in sorted(host.mounts_under(work), key=len, reverse=True):
        host.umount(point, host.MNT_DETACH)
    left = host.mounts_under(work)
    if left:
        raise OptimizeError(f"cannot unmount {', '.join(left)}: {work} is left in place")
    await trio.to_thread.run_sync(shutil.rmtree, work)


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
