"""The CRI image service proxy: what kubelet's `--image-service-endpoint` points at to give lazysnap the
pull credentials of each pod.

`lazysnap serve` with `cri_address` set serves `runtime.v1.ImageService` and `runtime.v1alpha2.
ImageService` (containerd 1.6 serves both) on that unix socket (0600) and forwards every call, as raw
bytes, to containerd's socket (`cri_backend`): the request metadata and deadline go along; containerd's
answer (response bytes, metadata, status code and message) comes back unchanged, so a pull with wrong
credentials fails exactly as containerd fails it; a caller that gives up cancels the forwarded call.
Other services (RuntimeService) are not served here: kubelet sends them to containerd directly.

Only PullImage is read. The credentials kubelet took from the pod's imagePullSecrets are kept in memory
(`fuse.registry.PullCredentials`, shared with the registry client of the lazy layers) for the registry
and repository of the pulled image, BEFORE the pull is forwarded: containerd prepares the layers, and
lazysnap reads their TOCs with these credentials, while the pull is in flight. A pull that fails puts
back what was kept before it. Credentials whose `server_address` names another registry than the
image's are not kept (containerd does not use them either). They never reach a log, a metric or the disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from fuse.registry import Credentials, Reference
from fuse.registry.credentials import PullCredentials, decode_auth, normalize_registry
from fuse.registry.errors import ReferenceError as BadReference
from snapshotter.api.k8s.cri.v1 import api_subset_pb2
from snapshotter.daemon import metrics
from snapshotter.daemon.config import Config
from snapshotter.daemon.unixgrpc import MAX_MESSAGE, UnixServer
from snapshotter.errors import StartupError

log = logging.getLogger("lazysnap.cri")

SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
METHODS = frozenset({"ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"})
WORKERS = 32  # concurrent calls; a PullImage holds one for the whole pull
STOP_GRACE = 5.0  # seconds calls in flight get when the daemon stops; then they are cancelled
NO_DEADLINE = 1e9  # grpc reports "no deadline" as a time remaining of about 292 years
TOKEN_USER = "<token>"  # the username of credentials that are a token (docker's convention)


def credentials_from(auth: api_subset_pb2.AuthConfig) -> Credentials | None:
    """The credentials a CRI AuthConfig carries, in containerd's order of preference (username and
    password, identity token, `auth`), then a registry token (which containerd ignores; lazysnap sends
    it as the bearer token); None when there are none (an anonymous pull) or `auth` is not base64 of
    "user:password"."""
    if auth.username:
        return Credentials(auth.username, auth.password)
    if auth.identity_token:
        return Credentials(TOKEN_USER, auth.identity_token, identity_token=True)
    if auth.auth:
        decoded = decode_auth(auth.auth)
        return Credentials(*decoded) if decoded else None
    if auth.registry_token:
        return Credentials(TOKEN_USER, auth.registry_token, registry_token=True)
    return None


class CriProxy(grpc.GenericRpcHandler):
    """The proxy's gRPC server: `start()` opens the socket, `stop()` closes it."""

    def __init__(self, address: Path, backend: Path, credentials: PullCredentials):
        self.address, self.backend, self.credentials = address, backend, credentials
        self.channel = grpc.insecure_channel(
            f"unix://{backend}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._server: UnixServer | None = None

    # --- serving ---------------------------------------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """Every method of the two ImageService names, as raw bytes (None: grpc answers UNIMPLEMENTED)."""
        path = handler_call_details.method
        service, _, method = path.lstrip("/").partition("/")
        if service not in SERVICES:
            return None
        backend_call = self.channel.unary_unary(path)  # no serializers: bytes in, bytes out

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._forward(backend_call, service, method, request, context)

        return grpc.unary_unary_rpc_method_handler(forward)

    def _forward(
        self,
        backend_call: grpc.UnaryUnaryMultiCallable,
        service: str,
        method: str,
        request: bytes,
        context: grpc.ServicerContext,
    ) -> bytes:
        started = time.perf_counter()
        undo = self._keep_credentials(request) if method == "PullImage" else None
        remaining = context.time_remaining()
        call = backend_call.future(
            request,
            timeout=remaining if remaining is not None and remaining < NO_DEADLINE else None,
            metadata=[(m.key, m.value) for m in context.invocation_metadata() if m.key != "user-agent"],
        )
        context.add_callback(call.cancel)  # kubelet gave up (or the proxy stops): so does containerd
        try:
            response = call.result()
        except grpc.FutureCancelledError:
            error: grpc.RpcError | None = None
            response, code, details = b"", grpc.StatusCode.CANCELLED, "the caller cancelled the call"
        except grpc.RpcError as e:
            error, response, code, details = e, b"", e.code(), e.details()
        else:
            error, code, details = None, grpc.StatusCode.OK, ""
        label = f"{service}/{method if method in METHODS else 'other'}"
        metrics.CRI_CALLS.labels(label, code.name).inc()
        if log.isEnabledFor(logging.DEBUG):
            ms = (time.perf_counter() - started) * 1000
            log.debug("cri call", extra={"fields": {"method": label, "code": code.name, "ms": ms}})
        if code != grpc.StatusCode.OK and undo is not None:
            undo()  # the pull failed: these credentials proved nothing
        source = error if error is not None else call
        if code != grpc.StatusCode.CANCELLED:
            if initial := source.initial_metadata():
                context.send_initial_metadata(initial)
            context.set_trailing_metadata(source.trailing_metadata() or ())
        if code != grpc.StatusCode.OK:
            context.abort(code, details or "")
        return response

    def _keep_credentials(self, request: bytes) -> Callable[[], None] | None:
        """Keep the credentials of a PullImage request, if it has any, for its image's repository;
        returns the store's undo (None when nothing was kept)."""
        try:
            pull = api_subset_pb2.PullImageRequest.FromString(request)
        except DecodeError:
            return None  # containerd refuses it; the proxy forwards it all the same
        creds = credentials_from(pull.auth) if pull.HasField("auth") else None
        if creds is None:
            return None
        try:
            ref = Reference.parse(pull.image.image)
        except BadReference:
            return None  # containerd refuses the pull with its own message
        if pull.auth.server_address and normalize_registry(pull.auth.server_address) != ref.host.lower():
            log.warning(
                "pull credentials not kept: they are for another registry than the image's",
                extra={"fields": {"image": ref.name}},
            )
            return None
        undo = self.credentials.store(ref.host, ref.repository, creds)
        metrics.CRI_PULLS_WITH_CREDENTIALS.inc()
        log.info(
            "pull credentials kept",
            extra={"fields": {"image": ref.name, "kind": creds.kind, "ttl_s": self.credentials.ttl}},
        )
        return undo

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the socket (0600) and serve."""
        self._server = UnixServer(
            self.address, workers=WORKERS, thread_prefix="cri", setting="cri_address", handlers=[self]
        )
        log.info(
            "CRI image service proxy serving",
            extra={
                "fields": {
                    "address": str(self.address),
                    "backend": str(self.backend),
                    "credentials_ttl_s": self.credentials.ttl,
                }
            },
        )

    def stop(self) -> None:
        """Stop accepting calls, give those in flight STOP_GRACE, close the socket and the channel."""
        if self._server is not None:
            self._server.stop(STOP_GRACE)
            self._server = None
        self.channel.close()


def start(config: Config, credentials: PullCredentials | None) -> CriProxy:
    """The proxy `config` asks for, serving (`config.cri_address` must be set); `credentials` is the
    store the lazy layers' registry client reads (its CredentialStore's `pulled`)."""
    if credentials is None:
        raise StartupError("the CRI proxy needs the registry client's pull-credentials store; none was made")
    proxy = CriProxy(Path(config.cri_address), Path(config.cri_backend), credentials)
    proxy.start()
    return proxy
