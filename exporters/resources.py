"""Before an export starts: is there clearly enough memory and disk for it?

A 3B model takes minutes to load and trace; a machine without room for it should hear so in one line at once,
with the numbers, not from the kernel's OOM killer half an hour in. The estimates come from the checkpoint's
own weight files (the safetensors headers give every tensor's type and shape) and count only what the export
cannot do without:

- memory, where the target converts from the torch model whole (Core ML): the model's weights in float32, plus
  the largest single weight tensor (a converter's or quantizer's working copy); where every graph is converted to
  compute in float16, the largest graph's weights in float32 instead (coremltools' float16 passes make their own
  copies of the graph's weights beside the torch model's: PaliGemma-3B's fp16 export peaked at 20.0 GiB anonymous,
  its 10.9 GiB torch model and 9.3 GiB decoder; converting to compute in float32, its program shares the torch
  model's arrays). The largest graph is at least the largest group (`graph_group`) of the checkpoint's tensors;
- memory, where the target compiles a float decoder whole to check it (OpenVINO at fp32 and fp16: its conversion
  copies the graph's weights, and its CPU plugin repacks them into its own float32 copy to run them): the decoder
  graph's weights in float32 (its layers and head: a tied head is the embedding table again). Qwen2.5-VL-3B's
  12.3 GB decoder peaked at 12.9 GiB anonymous converting and 12.8 checking (docs/scale.md);
- memory, where export reads weights from the checkpoint as it writes graphs (ONNX Runtime, OpenVINO,
  TensorRT: exporters/lazy.py): a graph serialized whole below protobuf's 2 GB limit, plus three copies of the
  largest tensor (read, transposed or quantized, written). The engines that check the graphs map their files
  from disk: those pages can be dropped and read again, so they are not counted;
- disk, in the output's file system: the graphs in float32 (the staged package), plus, for a quantized
  export, the quantized graphs beside them until the float32 ones are removed.

Only a clear shortfall is refused: these are lower bounds, and the export may still need more.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from mmedge.errors import ExportError
from mmedge.runtimes.backends import available_memory  # noqa: F401 (export's checks read it from here)

GB = 2**30


@dataclass
class Weights:
    elements: int  # every weight tensor's element count, summed
    largest: int  # the largest single tensor's element count
    largest_graph: int = 0  # the largest of graph_group's sums: a lower bound on the largest graph's elements
    decoder_graph: int = 0  # the decoder group, with the embedding table where no LM head is stored (tied)


# Tensors, by name, that one exported graph holds together: a vision tower (and what feeds it), a text or audio
# encoder, and the rest (a decoder's layers, its norm and LM head: the decoder graph, which also holds a tied
# embedding table as its head; the table itself, its own graph, is counted in none of them).
# (BLIP-2's language_projection, Idefics' perceiver and InternVL's remote-code mlp1 feed the decoder from the
# vision side under names of their own)
_VISION = re.compile(r"vision|visual|image|multi_modal|mm_projector|qformer|query_tokens|connector"
                     r"|language_projection|perceiver|^mlp1\.")
_ENCODER = re.compile(r"(^|\.)encoder\.")
_EMBEDDING = re.compile(r"embed_tokens|wte\.|word_embeddings")
_HEAD = re.compile(r"lm_head|proj_out")


def graph_group(name: str) -> str | None:
    """Which graph's group a checkpoint tensor belongs to (vision, encoder, decoder); None for the token embedding
    table."""
    if _VISION.search(name):
        return "vision"
    if _ENCODER.search(name):
        return "encoder"
    return None if _EMBEDDING.search(name) else "decoder"


def checkpoint_weights(checkpoint: Path) -> Weights | None:
    """Counted from the safetensors headers (no weights are read); None when the checkpoint has none."""
    from mmedge.exporters.lazy import read_header

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None
    elements = largest = table = 0
    head = False
    groups: dict[str, int] = {}
    for path in files:
        try:
            header, _ = read_header(path)
        except (OSError, struct.error, ValueError):
            return None  # unreadable: loading will say what is wrong
        for name, info in header.items():
            n = 1
            for d in info["shape"]:
                n *= d
            elements += n
            largest = max(largest, n)
            group = graph_group(name)
            if group is not None:
                groups[group] = groups.get(group, 0) + n
            elif n > table:  # the embedding table (the largest tensor of no group)
                table = n
            head = head or bool(_HEAD.search(name))
    return Weights(elements, largest, max(groups.values(), default=0),
                   groups.get("decoder", 0) + (0 if head else table))


def release_freed_memory() -> None:
    """Unreachable objects collected, and the memory the C allocator keeps after engines free it handed back to the
    system (glibc's malloc_trim): an engine's weights come and go in blocks under glibc's mmap threshold (up to 32 MB
    once larger blocks were freed), which the heap keeps for reuse. A full collection and a trim cost ~0.3-1 s in a
    big process: only between stages, where memory is needed next."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def needs(weights: Weights, quantized: bool, whole: bool = True, graph_copied: bool = False,
          float_decoder: bool = False) -> tuple[int, int]:
    """(memory, disk) bytes an export of these weights cannot do without; `whole`: the torch model is loaded
    whole (else its weights are read from the checkpoint as graphs are written); `graph_copied`: its converter
    copies each graph's weights (Core ML in float16); `float_decoder`: the target compiles a float decoder whole
    (module docstring)."""
    fp32 = weights.elements * 4
    if whole:
        memory = fp32 + max(weights.largest, weights.largest_graph if graph_copied else 0) * 4
    else:
        memory = max(INLINE_GRAPH_BYTES + 3 * weights.largest * 4, 4 * weights.decoder_graph if float_decoder else 0)
    disk = fp32 + (fp32 // 2 if quantized else 0)  # int8 graphs are a quarter of fp32, int4 less; room for both
    return memory, disk


INLINE_GRAPH_BYTES = 2 * GB  # a graph under protobuf's limit is serialized whole


def check(checkpoint: Path, output: Path, quantized: bool, whole: bool = True, graph_copied: bool = False,
          float_decoder: str | None = None) -> None:
    """Refuse, in one line with the numbers, an export this machine clearly has no room for (`needs`);
    `float_decoder`: the target and precision (e.g. "OpenVINO at fp32") where the target compiles a float decoder
    whole."""
    weights = checkpoint_weights(checkpoint)
    if weights is None or os.environ.get("MMEDGE_SKIP_RESOURCE_CHECK"):
        return
    memory, disk = needs(weights, quantized, whole, graph_copied, bool(float_decoder))
    free_memory = available_memory()
    if free_memory is not None and free_memory < memory:
        held = ("holds its weights in float32 and its largest graph's again while converting it"
                if whole and graph_copied else "holds its weights in float32" if whole
                else "holds its largest graph and weight in float32")
        advice = ""
        if float_decoder and memory == 4 * weights.decoder_graph:
            held = f"to {float_decoder} copies its decoder's weights in float32 to convert and check it"
            advice = "--quant int8 or int4 (the decoder is quantized before it is converted), "
        raise ExportError(
            f"not enough memory: exporting {checkpoint.name} ({weights.elements / 1e9:.2f}B parameters) {held}, "
            f"about {memory / GB:.1f} GB, and {free_memory / GB:.1f} GB is available; {advice}close "
            "other programs or use a machine with more memory (MMEDGE_SKIP_RESOURCE_CHECK=1 tries anyway)")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free_disk = shutil.disk_usage(parent).free
    if free_disk < disk:
        raise ExportError(
            f"not enough disk space in {parent}: the package of {checkpoint.name} needs about {disk / GB:.1f} GB "
            f"while it is written{' and quantized' if quantized else ''}, and {free_disk / GB:.1f} GB is free; "
            "choose another -o (MMEDGE_SKIP_RESOURCE_CHECK=1 tries anyway)")
