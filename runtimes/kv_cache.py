"""A KV cache preallocated to the package's maximum context, written by position.

One key and one value buffer per layer, [batch, kv_heads, max_context,
head_dim]. The decoder reads the whole buffer (masked past its fill level)
and returns keys/values for the new tokens only, which are written in place.
No buffer is reallocated or concatenated while generating, and the shapes fed
to the engine never change, which is what static-shape engines need.
"""

from __future__ import annotations

import numpy as np

from mmedge.manifest import KVCacheSpec


class KVCache:
    def __init__(self, spec: KVCacheSpec, batch: int = 1):
        self.spec = spec
        shape = (batch, spec.num_kv_heads, spec.max_context, spec.head_dim)
        dtype = np.dtype(spec.dtype)
        layers = range(spec.num_layers)
        self.keys = [np.zeros(shape, dtype) for _ in layers]
        self.values = [np.zeros(shape, dtype) for _ in layers]
        self._past_names = [(spec.past_key.format(layer=i), spec.past_value.format(layer=i)) for i in layers]
        self._present_names = [(spec.present_key.format(layer=i), spec.present_value.format(layer=i)) for i in layers]
        # the buffers are written in place, so one feed dict serves every step
        self._feeds = {}
        for (kname, vname), k, v in zip(self._past_names, self.keys, self.values):
            self._feeds[kname] = k
            self._feeds[vname] = v
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.spec.max_context

    def reset(self) -> None:
        self.length = 0  # stale slots are masked out, no need to clear them

    def feeds(self) -> dict[str, np.ndarray]:
        return self._feeds

    def empty_feeds(self) -> dict[str, np.ndarray]:
        """Zero-length past, for running a sequence from scratch without the cache."""
        shape = (self.keys[0].shape[0], self.spec.num_kv_heads, 0, self.spec.head_dim)
        empty = np.zeros(shape, self.keys[0].dtype)
        return {name: empty for pair in self._past_names for name in pair}

    def write(self, outputs: dict[str, np.ndarray], n_new: int) -> None:
        start, end = self.length, self.length + n_new
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} > {self.capacity}")
        for (kname, vname), k, v in zip(self._present_names, self.keys, self.values):
            k[:, :, start:end] = outputs[kname]
            v[:, :, start:end] = outputs[vname]
        self.length = end
