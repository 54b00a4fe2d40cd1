"""Seekable layer formats: eStargz (gzip and zstd) and zstd:chunked. `open_layer` reads a layer's
footer and TOC over any `BlobSource` and gives a `Layer` whose files are read chunk by chunk, every
byte verified; `LayerIndex` is the compact index the filesystem serves from. Reading a TOC takes
bounded memory and time whatever the TOC claims (`Limits`)."""

from .errors import FormatError, NotLazy, Unverified
from .footer import Footer, parse_footer
from .index import Chunk, IndexBuilder, LayerIndex, Limits, Stat, build_index
from .reader import (
    ChunkStream,
    Layer,
    TocInfo,
    decode_chunk,
    fetch_toc,
    layer_from_toc,
    merge_spans,
    read_toc,
)
from .source import BlobSource, BytesSource, FileSource, RegistrySource
from .spec import ESTARGZ, ESTARGZ_ZSTD, ZSTD_CHUNKED
from .tocstream import fetch_layer, open_layer

__all__ = [
    "ChunkStream",
    "ESTARGZ",
    "ESTARGZ_ZSTD",
    "ZSTD_CHUNKED",
    "BlobSource",
    "BytesSource",
    "Chunk",
    "FileSource",
    "Footer",
    "FormatError",
    "IndexBuilder",
    "Layer",
    "LayerIndex",
    "Limits",
    "NotLazy",
    "RegistrySource",
    "Stat",
    "TocInfo",
    "Unverified",
    "build_index",
    "decode_chunk",
    "fetch_layer",
    "fetch_toc",
    "layer_from_toc",
    "merge_spans",
    "open_layer",
    "parse_footer",
    "read_toc",
]
