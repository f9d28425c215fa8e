"""Opening a generative package: its graphs on one engine, its text codec, and what its decoder takes (masks,
lengths, positions, DeepStack features, cross-attention states), read from the manifest once.

runtimes/pipeline.py's Pipeline builds on this to generate; the checks here are the ones a load can fail.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

import numpy as np

from mmedge.errors import InputError, PackageError
from mmedge.manifest import Manifest, load_manifest
from mmedge.runtimes import schemes
from mmedge.runtimes.backends import load_graphs, open_engine
from mmedge.runtimes.batch import Timings
from mmedge.runtimes.kv_cache import EngineCache, make_cache
from mmedge.runtimes.media_cache import DEFAULT_MB, MediaCache
from mmedge.runtimes.preprocess import check_spec
from mmedge.runtimes.text import TextCodec

if TYPE_CHECKING:
    from mmedge.runtimes.pipeline import _Held

Loaded = TypeVar("Loaded", bound="PackageGraphs")

PARTS = ("vision_encoder", "projector", "embed_tokens", "decoder")


def graph_parts(manifest: Manifest) -> tuple[str, ...]:
    """The graphs a generative package runs: PARTS, and an encoder-decoder's `encoder`; an audio package's
    encoder, token embedding and decoder."""
    if manifest.schemes.encoder == "audio":
        return "embed_tokens", "decoder", "encoder"
    return (*PARTS, "encoder") if manifest.schemes.encoder else PARTS


VISION_BATCH = 16  # images (or tiles) per vision encoder call


class PackageGraphs:
    """A package opened on its engine. Subclasses (Pipeline) add generation; `_image_spec` and `options` are
    theirs (load checks a token budget with them)."""

    def __init__(self, path: Path, manifest: Manifest, graphs: dict[str, Any], codec: TextCodec):
        self.path = path
        self.manifest = manifest
        self.graphs = graphs
        self.codec = codec
        self.cache = make_cache(manifest.kv_cache, graphs["decoder"])
        decoder_inputs = manifest.graphs["decoder"].inputs
        # "attention_mask" first; a decoder with sliding-window layers also takes "sliding_attention_mask"
        self.mask_names = sorted((n for n in decoder_inputs if n.endswith("attention_mask")),
                                 key=lambda n: n != "attention_mask")
        self.mask_dtype = np.dtype(decoder_inputs[self.mask_names[0]].dtype) if self.mask_names else np.float32
        # a decoder built on GroupQueryAttention (kv_cache "in_place") takes the sequence lengths instead of
        # masks and position ids: causal attention at linear positions, which is all that kernel does
        self.takes_lengths = "seqlens_k" in decoder_inputs
        # (a fused decoder whose attention is not plain causal takes the masks as well, over the tokens so far)
        # ... and, for 3-D positions (M-RoPE), the positions too: the kernel rotates nothing itself then
        self.lengths_and_positions = self.takes_lengths and "position_ids" in decoder_inputs
        # a decoder with DeepStack (Qwen3-VL) takes visual features for its first k layers beside the embeddings
        spec = decoder_inputs.get("deepstack_embeds")
        self.deepstack_shape = (spec.shape[0], spec.shape[-1], np.dtype(spec.dtype)) if spec else None
        # a cross-attention decoder (image placement "cross_attention") takes each cross layer's image keys and
        # values, which the projector gives per image (`image_positions` each, `tile_positions` per tile)
        # an encoder-decoder (scheme encoder "prompt") gets them from its encoder, once per prompt
        self.encoder = manifest.schemes.encoder
        source = manifest.graphs["encoder" if self.encoder else "projector"].outputs
        self.cross_names = [n for n in source if n.startswith(("cross_key_", "cross_value_"))]
        if self.encoder:
            self.cross_dtype = np.dtype(decoder_inputs["cross_mask"].dtype)
        elif self.cross_names:
            key = manifest.graphs["projector"].outputs[self.cross_names[0]]
            self.image_positions = key.shape[2]
            self.tile_positions = self.image_positions // manifest.preprocess.frames_per_image()
            self.cross_dtype = np.dtype(decoder_inputs["cross_mask"].dtype)
        # where the engine writes the cache itself, it writes the logits [1, 1, vocab] into one buffer too
        self._into = dict(self.cache.into())
        if self._into:
            vocab = manifest.graphs["decoder"].outputs["logits"].shape[-1]
            self._into["logits"] = np.empty((1, 1, vocab), np.dtype(manifest.graphs["decoder"].outputs["logits"].dtype))
        # the most sequences one generate_batch call runs (None: no limit but memory); decoders of a fixed batch
        # (Core ML) or holding their cache on their device (TensorRT) run one at a time
        fixed = manifest.graphs["decoder"].inputs["inputs_embeds"].shape[0]
        self.max_batch: int | None = 1 if isinstance(fixed, int) or isinstance(self.cache, EngineCache) else None
        if self.cross_names:  # rows of one batch would each need their own images' keys and values
            self.max_batch = 1
        # images (tiles, frames) per vision encoder call: engines built for a bounded batch (TensorRT's profiles,
        # Core ML's bounds: one image's tiles) take at most that many, however many images a prompt has
        bounded = manifest.target in ("tensorrt", "coreml")
        frames = manifest.preprocess.frames_per_image() if manifest.preprocess else 1  # none: an audio package
        self.vision_batch = min(VISION_BATCH, frames) if bounded else VISION_BATCH
        self.timings = Timings()
        self._load_options: dict[str, Any] | None = None  # what load() was given, for clone()
        self.defaults: dict[str, Any] = {}  # options set at load (the visual token budget), under each call's
        self._lock = threading.Lock()  # one generation at a time: they share the KV cache and the engines' state
        self._owner: int | None = None
        self.media = MediaCache(DEFAULT_MB << 20)  # image embeddings by content (runtimes/media_cache.py)
        self.language: str | None = None  # an audio package's: the language of the last window transcribed
        self._held: _Held | None = None  # what the KV cache holds, for the next call to start from
        # a call's prompt starts from what the cache holds of the call before, where they agree (docs/apps.md);
        # False: every call computes its whole prompt (benchmarks of one question, recording graph inputs)
        self.reuse_prefix = True
        # a list: generation appends each next-token logits row it computes to it (after the prompt, after each
        # token but the last), [vocab]: what teacher forcing on its own answer would give, without running
        # the answer twice (measuring a quantized package against its fp32 one)
        self.logits_out: list[np.ndarray] | None = None

    @classmethod
    def load(
        cls: type[Loaded],
        path: str | Path,
        backend: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        verify: bool | str = True,
        device: str | None = None,
        inference_precision: str | None = None,
        kv_cache_precision: str | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        max_image_tokens: int | None = None,
        max_video_tokens: int | None = None,
        image_cache_mb: float = DEFAULT_MB,
        low_memory: bool = False,
        model_cache: bool = True,
    ) -> Loaded:
        """Open a package directory written by `mmedge export`.

        backend: engine to run the graphs (default: the package's target).
        providers (ONNX Runtime) / device (OpenVINO: CPU, GPU, NPU, ...) /
        threads: passed to the backend (threads 0: $MMEDGE_THREADS if set,
        else the engine's choice). inference_precision (OpenVINO on
        CPU): compute precision of every graph, "f32", "bf16" or "f16"; by
        default f32 for graphs stored in float, and bf16 for the float parts
        of int8/int4 graphs where that is OpenVINO's CPU default (else f32).
        kv_cache_precision (OpenVINO): "f32" (default), "f16" or "u8", the KV
        cache's precision (u8: faster decode, answers may change). verify: check every file's size and sha256
        against the manifest first; a file that is the very file verified at
        an earlier load (same inode, size, mtime and ctime, recorded under
        $MMEDGE_CACHE/verified) is not read again; "full": hash every byte;
        False: no check. max_pixels / min_pixels / max_image_tokens: the
        visual token budget of dynamic-resolution packages, instead of the
        package's (each call can set them again); max_video_tokens: the most
        tokens a prompt's video takes (its frames resized down, or, where
        frames have a fixed size, fewer of them sampled from a file). image_cache_mb: memory
        for the embeddings of images seen before (0: none kept), so that
        another question about the same image skips the vision encoder.
        low_memory (ONNX Runtime): float graphs' weights are not repacked into
        copies of their own; their memory is their memory-mapped files (fp32
        MatMuls a little slower). Quantized graphs are packed as always.
        model_cache (OpenVINO): keep the compiled graphs under $MMEDGE_CACHE/openvino so that the next load
        imports them (default; pruned, docs/performance.md); False for a package opened once.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"the package is a folder's path (str or Path), not {type(path).__name__}")
        path = Path(path)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InputError(f"threads must be a whole number >= 0 (0: the engine's choice), got {threads!r}")
        if isinstance(image_cache_mb, bool) or not isinstance(image_cache_mb, (int, float)) \
                or not 0 <= image_cache_mb < float("inf"):
            raise InputError(f"image_cache_mb must be a number of megabytes >= 0, got {image_cache_mb!r}")
        manifest = load_manifest(path, verify_files=verify)
        if manifest.kind != "generative":
            raise PackageError(f"{path} is an {manifest.kind} package ({manifest.model_type}), which does not generate "
                               "text: open it with mmedge.Embedder.load (CLI: mmedge embed, mmedge classify)")
        schemes.check_schemes(manifest.schemes)
        check_spec(manifest.preprocess)
        parts = graph_parts(manifest)
        missing = [p for p in parts if p not in manifest.graphs]
        if missing:
            raise PackageError(f"package {path} lacks the graphs {', '.join(missing)}; re-export it")
        engine = open_engine(path, manifest, backend, threads=threads, providers=providers, device=device,
                             inference_precision=inference_precision, kv_cache_precision=kv_cache_precision,
                             low_memory=low_memory, model_cache=model_cache)
        graphs = load_graphs(engine, path, manifest, parts)
        codec = TextCodec.from_package(path, manifest)
        pipe = cls(path, manifest, graphs, codec)
        pipe.defaults = {k: v for k, v in dict(max_pixels=max_pixels, min_pixels=min_pixels,
                                               max_image_tokens=max_image_tokens,
                                               max_video_tokens=max_video_tokens).items() if v is not None}
        if manifest.preprocess is not None:  # a budget the package cannot take fails here, not at the first call
            pipe._image_spec(pipe.options(), 1)
        pipe.media = MediaCache(int(image_cache_mb * (1 << 20)))
        pipe._load_options = dict(backend=backend, providers=providers, threads=threads, device=device,
                                  inference_precision=inference_precision,
                                  kv_cache_precision=kv_cache_precision, image_cache_mb=image_cache_mb,
                                  low_memory=low_memory, model_cache=model_cache, **pipe.defaults)
        return pipe

    def clone(self: Loaded) -> Loaded:
        """Another Pipeline over the same package, with its own engine sessions and KV cache, for generating in
        parallel from several threads (one Pipeline serialises its callers). Costs a second load's memory."""
        if self._load_options is None:
            raise PackageError("clone() needs a Pipeline made by Pipeline.load")
        return type(self).load(self.path, verify=False, **self._load_options)
