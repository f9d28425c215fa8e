"""Target `tensorrt`: ONNX graphs written for TensorRT's ONNX parser, built into engines on the device.

Engines are specific to the GPU and the TensorRT version, so export writes
what every device can build from: the traced ONNX graphs (verified against
PyTorch in ONNX Runtime, as for the onnxruntime target), their precision
written into the graph (calibration/tensorrt.py: fp16 with fp32 islands,
explicit INT8 Q/DQ, INT4 block-quantized DequantizeLinear), and in the
manifest (`tensorrt`) what a build needs: an optimization profile per graph
(the decoder two, prefill and decode) over the fixed KV-cache layout.
`mmedge build` (or the runtime, on first load) turns them into engines on
the device; `mmedge run --backend onnxruntime` runs the same package on any
machine.

The KV cache is the "buffer" contract with every past input at the full
max_context ([batch, kv_heads, max_context, head_dim], unwritten slots
masked): the shapes an engine sees never change with the fill level, and
the TensorRT backend keeps the cache on the GPU, written in place.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from mmedge.errors import ExportError
from mmedge.exporters import tensorrt_ops
from mmedge.exporters.onnxruntime_target import (  # noqa: F401 (the target API)
    LAZY_WEIGHTS,
    io_specs,
    verify_graph,
)
from mmedge.exporters.onnxruntime_target import trace_graph as export_graph  # noqa: F401 (no com.microsoft ops)
from mmedge.manifest import Manifest

SUFFIX = ".onnx"
KV_STORAGE = ("buffer",)
PROMPT_SLACK = 32  # text tokens around the image ones, for the prefill profile's optimum
VISION_BATCH_OPT = 1
TEXT_OPT = 16  # a dual encoder's text encoder: the profile's optimum length in tokens (a short label prompt)


def vision_ranges(manifest: Manifest) -> tuple[dict[str, tuple[int, int, int]], int]:
    """The vision encoder's and projector's profile dims (min, opt, max), and the most image tokens a prompt's
    image gives. A "smart_resize" encoder runs one image a call, from the smallest grid (merge x merge patches)
    to the package's max_pixels, its optimum at 448 x 448 pixels' worth (or max_pixels, if less)."""
    pre = manifest.preprocess
    if pre.resize_mode == "smart_resize":
        unit = pre.merge_size ** 2
        most = pre.max_pixels // pre.token_pixels() * unit
        opt = min(most, max(unit, 448 * 448 // pre.patch_size ** 2 // unit * unit))
        dims = {"patches": (unit, opt, most), "tokens": (1, opt // unit, most // unit)}
        side = manifest.schemes.vision_window
        if side:  # at least one merged token a window; the optimum's windows as full as they come
            dims["windows"] = (1, -(-opt // unit // side ** 2), most // unit)
        return dims, most // unit
    if pre.resize_mode == "tile_canvas":  # one image a call, its tiles (padded to max_tiles) inside the batch row
        return {"batch": (1, 1, 1)}, manifest.prompt.image_seq_len
    images = pre.frames_per_image()
    return {"batch": (1, min(VISION_BATCH_OPT, images), images)}, manifest.prompt.image_seq_len * images


# cross-attention decoders: the most images a prompt's cross-attention keys and values hold in the engine's profile
# (Llama 3.2 Vision at 4 tiles: 6404 positions an image); more are refused by the engine's shape check
CROSS_IMAGES = 4


def cross_range(manifest: Manifest) -> dict[str, tuple[int, int, int]]:
    """The cross-attention length's profile dims: from a text-only prompt's one position to CROSS_IMAGES images; an
    encoder-decoder's, its source's: from one token to the most its encoder takes."""
    if manifest.schemes.encoder:
        return {"cross_len": source_range(manifest)}
    outputs = manifest.graphs["projector"].outputs
    key = next((spec for name, spec in outputs.items() if name.startswith("cross_key_")), None)
    if key is None:
        return {}
    image = key.shape[2]
    return {"cross_len": (1, image, CROSS_IMAGES * image)}


def source_range(manifest: Manifest) -> tuple[int, int, int]:
    """An encoder-decoder's source lengths: one token up to its encoder's positions, tuned for the image's tokens
    and a prompt."""
    most = manifest.schemes.encoder_length or manifest.prompt.image_seq_len + PROMPT_SLACK
    if manifest.audio is not None:  # an audio encoder's positions are fixed: a whole window, always
        return most, most, most
    return 1, min(most, manifest.prompt.image_seq_len + PROMPT_SLACK), most


def dim_ranges(manifest: Manifest) -> dict[str, list[dict[str, tuple[int, int, int]]]]:
    """Per graph, per optimization profile: (min, opt, max) of each named dimension."""
    if manifest.kind == "embedding":  # a dual encoder: batches up to max_batch, texts up to text_length
        spec = manifest.embedding
        batch = (1, 1, spec.max_batch)
        length = spec.text_length
        seq = (length, length, length) if spec.text_padding == "max_length" else (1, min(TEXT_OPT, length), length)
        return {"vision_encoder": [{"batch": batch}], "text_encoder": [{"batch": batch, "seq": seq}]}
    vision, image_tokens = vision_ranges(manifest) if manifest.preprocess is not None else ({}, 0)
    context = manifest.kv_cache.max_context
    prompt = min(context, image_tokens + PROMPT_SLACK)
    cache = (context, context, context)  # the whole buffer, always
    one = (1, 1, 1)
    cross = cross_range(manifest)
    if manifest.schemes.encoder:  # the decoder's prompt is its few start tokens; the source goes to the encoder
        prompt = min(context, PROMPT_SLACK)
    encoder = {"encoder": [{"batch": one, "source_len": source_range(manifest)}]} if manifest.schemes.encoder else {}
    images = {"vision_encoder": [vision], "projector": [vision]} if manifest.preprocess is not None else {}
    return {
        **encoder,
        **images,
        "embed_tokens": [{"batch": one, "seq": (1, prompt, context)}],
        "decoder": [
            {"batch": one, "seq": (1, prompt, context), "cache_len": cache, **cross},  # prefill
            {"batch": one, "seq": one, "cache_len": cache, **cross},  # decode
        ],
    }


def profiles(manifest: Manifest) -> dict[str, list[dict[str, dict[str, list[int]]]]]:
    """Per graph, per profile, per input: {"min": shape, "opt": shape, "max": shape} (TensorRT's profile)."""
    out = {}
    for graph, ranges in dim_ranges(manifest).items():
        spec = manifest.graphs[graph]
        out[graph] = []
        for dims in ranges:
            sizes = dict(dims)
            if "cache_len" in sizes:  # total_len = cache slots + new tokens
                sizes["total_len"] = tuple(c + s for c, s in zip(sizes["cache_len"], sizes["seq"]))
            shapes = {}
            for name, tensor in spec.inputs.items():
                unknown = [d for d in tensor.shape if isinstance(d, str) and d not in sizes]
                if unknown:
                    raise ExportError(f"{graph} input {name} has the dimension {unknown[0]!r}, which no "
                                      "TensorRT profile sizes; this family needs a profile rule")
                shapes[name] = {k: [sizes[d][i] if isinstance(d, str) else d for d in tensor.shape]
                                for i, k in enumerate(("min", "opt", "max"))}
            out[graph].append(shapes)
    return out


def finalize(stage: Path, manifest: Manifest) -> None:
    """After quantization: every graph must parse in TensorRT; record the build settings in the manifest."""
    unsupported = {}
    for name, spec in manifest.graphs.items():
        found = tensorrt_ops.unsupported(onnx.load(str(stage / spec.file), load_external_data=False))
        if found:
            unsupported[name] = found
    if unsupported:
        listed = "; ".join(f"{g}: {', '.join(found[:5])}" for g, found in unsupported.items())
        raise ExportError(f"TensorRT's ONNX parser would reject {listed}; nothing was written")
    manifest.tensorrt = {
        "profiles": profiles(manifest),
        **({"kv_cache": "past inputs at the full max_context, unwritten slots masked; new slots written on the GPU"}
           if manifest.kv_cache else {}),
        "parser_check": f"every op and type in the graphs is in TensorRT {tensorrt_ops.TABLE_VERSION}'s ONNX "
                        "parser table",
    }
