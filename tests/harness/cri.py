"""A minimal CRI client (what kubelet sends) built from the CRI descriptor compiled into containerd:
`PullImage` (with kubelet's AuthConfig) and friends over containerd's socket or lazysnap's CRI proxy,
with no hand-written copy of the CRI protos; `raw()` sends request bytes as they are and returns the
response bytes, to compare two servers' answers byte for byte."""

from __future__ import annotations

import functools

import grpc
from google.protobuf import descriptor_pool, message_factory

from .godescriptors import descriptors_in_binary

CRI_FILE = "api.proto"  # k8s.io/cri-api runtime/v1, as vendored in containerd 1.6


@functools.cache
def _pool() -> descriptor_pool.DescriptorPool:
    fd = descriptors_in_binary()[CRI_FILE]
    clean = type(fd)()
    clean.CopyFrom(fd)
    del clean.dependency[:]  # gogoproto only: its options are kept as unknown fields, harmless
    pool = descriptor_pool.DescriptorPool()
    pool.Add(clean)
    return pool


def message(name: str):
    """The class of a runtime.v1 message, e.g. message("PullImageRequest")."""
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"runtime.v1.{name}"))


class CriClient:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(f"unix://{address}")

    def close(self) -> None:
        self.channel.close()

    def _call(self, service: str, method: str, request, response_type: str, timeout: float):
        rpc = self.channel.unary_unary(
            f"/runtime.v1.{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=message(response_type).FromString,
        )
        return rpc(request, timeout=timeout)

    def raw(self, path: str, request: bytes, timeout: float = 60) -> bytes:
        """Call `path` ("/runtime.v1.ImageService/ListImages") with these bytes; the response's bytes."""
        return self.channel.unary_unary(path)(request, timeout=timeout)

    def pull_image(self, ref: str, timeout: float = 300, auth: dict[str, str] | None = None) -> str:
        """PullImage as kubelet calls it, with `auth` as AuthConfig fields (username, password, auth,
        server_address, identity_token, registry_token) when given; returns containerd's image ref."""
        request = message("PullImageRequest")(image=message("ImageSpec")(image=ref))
        if auth is not None:
            request.auth.CopyFrom(message("AuthConfig")(**auth))
        return self._call("ImageService", "PullImage", request, "PullImageResponse", timeout).image_ref

    def image_status(self, ref: str, timeout: float = 30):
        """ImageStatusResponse of one image (`image` unset when containerd does not have it)."""
        request = message("ImageStatusRequest")(image=message("ImageSpec")(image=ref))
        return self._call("ImageService", "ImageStatus", request, "ImageStatusResponse", timeout)

    def list_images(self, timeout: float = 30) -> list[str]:
        response = self._call(
            "ImageService", "ListImages", message("ListImagesRequest")(), "ListImagesResponse", timeout
        )
        return [tag for image in response.images for tag in image.repo_tags]

    def remove_image(self, ref: str, timeout: float = 60) -> None:
        request = message("RemoveImageRequest")(image=message("ImageSpec")(image=ref))
        self._call("ImageService", "RemoveImage", request, "RemoveImageResponse", timeout)
