"""The decoder's KV cache, in the two forms a package can hold it (manifest `kv_cache.storage`).

"buffer": one key and one value buffer per layer, [batch, kv_heads,
max_context, head_dim], preallocated and written by position. The decoder
reads the whole buffer (masked past its fill level) and returns keys/values
for the new tokens only, which are written in place. Nothing is reallocated
or concatenated while generating, and the shapes fed to the engine never
change, which is what static-shape engines need.

"state": the engine keeps the keys and values inside the graph between calls
(OpenVINO stateful models), so nothing crosses the engine boundary per token.
The runtime tracks the length and resets the state for each new sequence.

"in_place": the "buffer" buffers, bound as the decoder's present outputs
too, so the decoder writes each new key and value into its slot itself and
the runtime only counts (ONNX Runtime GroupQueryAttention with IO binding).

A decoder graph can also hold the "buffer" layout itself, on its device
(`holds_cache`: TensorRT keeps the buffers in GPU memory and writes the new
slots there): `EngineCache` then only counts and masks the whole buffer.

All of them answer the Pipeline the same questions: what to feed (`feeds`), how
many cache slots the step's attention mask covers (`mask_slots`), which
outputs land in its own arrays (`into`), what to do with the step's outputs
(`write`), and how to start over (`reset`, `fresh`).
"""

from __future__ import annotations

import numpy as np

from mmedge.errors import InputError, PackageError
from mmedge.manifest import KVCacheSpec

STORAGE = ("buffer", "state", "in_place")


class KVCache:
    """Preallocated buffers fed as the decoder's past inputs (storage "buffer")."""

    def __init__(self, spec: KVCacheSpec, batch: int = 1):
        self.spec = spec
        shape = (batch, spec.num_kv_heads, spec.max_context, spec.head_dim)
        dtype = np.dtype(spec.dtype)
        _check_fits(spec, 2 * spec.num_layers * int(np.prod(shape, dtype=np.float64)) * dtype.itemsize, batch)
        layers = range(spec.num_layers)
        self.keys = [np.zeros(shape, dtype) for _ in layers]
        self.values = [np.zeros(shape, dtype) for _ in layers]
        self._past_names = [(spec.past_key.format(layer=i), spec.past_value.format(layer=i)) for i in layers]
        self._present_names = [(spec.present_key.format(layer=i), spec.present_value.format(layer=i)) for i in layers]
        # the buffers are written in place, so one feed dict serves every step
        self._feeds = self._named(self._past_names)
        self.length = 0

    def _named(self, names: list[tuple[str, str]]) -> dict[str, np.ndarray]:
        """{key name: keys, value name: values} per layer, over the cache's own arrays."""
        out = {}
        for (kname, vname), k, v in zip(names, self.keys, self.values):
            out[kname], out[vname] = k, v
        return out

    @property
    def capacity(self) -> int:
        return self.spec.max_context

    @property
    def mask_slots(self) -> int:
        """Cache slots the next step attends over (unwritten ones are masked)."""
        return self.capacity

    def reset(self) -> None:
        self.length = 0  # stale slots are masked out, no need to clear them

    def truncate(self, length: int) -> int:
        """Keep the first `length` tokens (a new sequence that starts as the cached one did); returns how many are
        kept: `length`, or 0 where the cache could only start over."""
        self.length = min(length, self.length)  # the slots past it are masked, then overwritten
        return self.length

    def keep_rows(self, rows: np.ndarray) -> bool:
        """Keep only these rows of a batch (the others' sequences ended), so later steps run the rest alone;
        False where the cache cannot (the rows then run on)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self._feeds = self._named(self._past_names)
        return True

    def feeds(self) -> dict[str, np.ndarray]:
        return self._feeds

    def into(self) -> dict[str, np.ndarray]:
        """Outputs the decoder writes straight into the cache's arrays (none: `write` copies them)."""
        return {}

    def fresh(self) -> dict[str, np.ndarray]:
        """Feeds for running a whole sequence from scratch, past the cache: zero-length past."""
        shape = (self.keys[0].shape[0], self.spec.num_kv_heads, 0, self.spec.head_dim)
        empty = np.zeros(shape, self.keys[0].dtype)
        return {name: empty for pair in self._past_names for name in pair}

    def write(self, outputs: dict[str, np.ndarray], n_new: int) -> None:
        start, end = self._advance(n_new)
        for (kname, vname), k, v in zip(self._present_names, self.keys, self.values):
            k[:, :, start:end] = outputs[kname]
            v[:, :, start:end] = outputs[vname]

    def _advance(self, n_new: int) -> tuple[int, int]:
        start, end = self.length, self.length + n_new
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} > {self.capacity}")
        self.length = end
        return start, end


def _check_fits(spec: KVCacheSpec, nbytes: int, batch: int) -> None:
    """Buffers larger than the memory available are refused with the numbers, before any is allocated (the
    kernel would otherwise end the process as they fill)."""
    from mmedge.runtimes.backends import available_memory

    free = available_memory()
    if free is not None and nbytes > free:
        raise PackageError(
            f"this package's KV cache takes {nbytes / 2**30:.1f} GiB ({spec.num_layers} layers x {batch} "
            f"sequence(s) x {spec.max_context} positions x {spec.num_kv_heads} heads x {spec.head_dim}, "
            f"{spec.dtype}), more than the {free / 2**30:.1f} GiB of memory available here; export it with a "
            "smaller --max-context (or run fewer sequences at once)")


class InPlaceCache(KVCache):
    """The buffers, bound as the decoder's present outputs too (storage "in_place")."""

    def __init__(self, spec: KVCacheSpec, batch: int = 1):
        super().__init__(spec, batch)
        self._into = self._named(self._present_names)

    def into(self) -> dict[str, np.ndarray]:
        return self._into

    @property
    def mask_slots(self) -> int:
        return self.length  # GroupQueryAttention's bias covers the tokens so far, not the whole buffer

    def keep_rows(self, rows: np.ndarray) -> bool:
        super().keep_rows(rows)
        self._into = self._named(self._present_names)
        return True

    def write(self, outputs: dict[str, np.ndarray], n_new: int) -> None:
        self._advance(n_new)  # the decoder wrote the new slots itself


class StateCache(KVCache):
    """Keys and values held by the engine as graph state (storage "state")."""

    def __init__(self, spec: KVCacheSpec, decoder):
        if not callable(getattr(decoder, "reset_state", None)):
            raise PackageError("this package keeps its KV cache as engine state, which this backend cannot hold; "
                               "run it with the backend of its target")
        self.spec, self.decoder, self.length = spec, decoder, 0

    @property
    def mask_slots(self) -> int:
        return self.length  # the state holds exactly the tokens seen so far

    def reset(self) -> None:
        self.decoder.reset_state()
        self.length = 0

    def truncate(self, length: int) -> int:
        """The engine cuts its state (`truncate_state`: OpenVINO's grows token by token; Core ML's is a buffer
        written at the mask's length, so there is nothing to cut); an engine that cannot starts over."""
        if length >= self.length:
            return self.length
        cut = getattr(self.decoder, "truncate_state", None)
        if length <= 0 or cut is None:
            self.reset()
            return 0
        cut(length)
        self.length = length
        return length

    def feeds(self) -> dict[str, np.ndarray]:
        return {}

    def keep_rows(self, rows: np.ndarray) -> bool:
        keep = getattr(self.decoder, "keep_state_rows", None)
        if keep is None:
            return False
        keep(rows)
        return True

    def fresh(self) -> dict[str, np.ndarray]:
        self.reset()
        return {}

    def write(self, outputs: dict[str, np.ndarray], n_new: int) -> None:
        self._advance(n_new)


class EngineCache(StateCache):
    """The "buffer" layout held by the decoder graph on its own device (`holds_cache`)."""

    @property
    def mask_slots(self) -> int:
        return self.spec.max_context  # the engine attends over the whole buffer, unwritten slots masked

    def truncate(self, length: int) -> int:
        return KVCache.truncate(self, length)  # a buffer written by position, as "buffer"

    def fresh(self) -> dict[str, np.ndarray]:
        raise InputError("this decoder keeps its KV cache on its device and always attends over the whole cache; "
                         "generation without the cache (use_cache=False) is not available with it")


def make_cache(spec: KVCacheSpec, decoder, batch: int = 1) -> KVCache:
    """The cache for a package's decoder graph, as its manifest says it is held, for `batch` sequences at once
    (engine state takes its batch from the first step's inputs)."""
    if spec.storage == "buffer" and getattr(decoder, "holds_cache", False):
        if batch != 1:
            raise InputError("this decoder keeps its KV cache on its device for one sequence: batch 1 only")
        return EngineCache(spec, decoder)
    if spec.storage == "buffer":
        return KVCache(spec, batch)
    if spec.storage == "in_place":
        return InPlaceCache(spec, batch)
    if spec.storage == "state":
        return StateCache(spec, decoder)
    raise PackageError(f"this mmedge does not know the KV-cache storage {spec.storage!r} the package needs; "
                       "upgrade mmedge")
