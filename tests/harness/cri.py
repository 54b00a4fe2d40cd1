"""A minimal CRI client (what kubelet sends) built from the CRI descriptor compiled into containerd:
`PullImage` and friends over containerd's socket, with no hand-written copy of the CRI protos."""

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

    def pull_image(self, ref: str, timeout: float = 300) -> str:
        """PullImage as kubelet calls it; returns the image reference containerd gives back."""
        request = message("PullImageRequest")(image=message("ImageSpec")(image=ref))
        return self._call("ImageService", "PullImage", request, "PullImageResponse", timeout).image_ref

    def list_images(self, timeout: float = 30) -> list[str]:
        response = self._call(
            "ImageService", "ListImages", message("ListImagesRequest")(), "ListImagesResponse", timeout
        )
        return [tag for image in response.images for tag in image.repo_tags]

    def remove_image(self, ref: str, timeout: float = 60) -> None:
        request = message("RemoveImageRequest")(image=message("ImageSpec")(image=ref))
        self._call("ImageService", "RemoveImage", request, "RemoveImageResponse", timeout)
