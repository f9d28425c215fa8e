"""What the vision encoder and projector made of an image, kept by the image's content.

A robot asks several questions about one camera frame; a chat goes on about one photo. Each question renders
its prompt again, but the image's embeddings are the same as long as its preprocessed pixels are: they are
kept here, keyed by a hash of those pixels (and their grid), least recently used out first, within a byte
budget. One cache per Pipeline, so the package is part of the key by construction.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

DEFAULT_MB = 64  # a 1280-token Qwen2-VL-2B image is 7.5 MB of fp32 embeddings; a PaliGemma-3B one 2.4 MB


def media_key(pixels: np.ndarray, grid: tuple) -> bytes:
    """The content key of preprocessed pixels: their bytes, shape, dtype and grid."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((pixels.shape, str(pixels.dtype), tuple(grid))).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.digest()


class MediaCache:
    """key -> (embeddings, other vision outputs), at most `max_bytes` of arrays in all (0: keeps nothing)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[bytes, tuple] = OrderedDict()

    def get(self, key: bytes):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: tuple[np.ndarray | None, dict]) -> None:
        """`value`: (embeddings, the vision side's other outputs by name), or (None, outputs) where there are no
        embeddings (a cross-attention family's image keys and values)."""
        size = (0 if value[0] is None else value[0].nbytes) + sum(a.nbytes for a in value[1].values())
        if size > self.max_bytes or key in self._items:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old
        self._items[key] = (value, size)
        self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)
