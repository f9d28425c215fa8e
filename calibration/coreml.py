"""Weight compression for the Core ML target, with coremltools.optimize.coreml on the converted ML Programs.

Core ML cannot run a model off Apple hardware, so nothing here calibrates on
activations: every scheme is data-free and works on the weights alone, on
Linux as on macOS.

- fp16: the graph is converted with float16 compute (weights float16), which
  is what the Neural Engine runs.
- int8: per-output-channel symmetric INT8 weights (constexpr_blockwise_shift_scale
  ops dequantize them on load or on the fly), float16 compute.
- int4: per-block symmetric INT4 weights along the input dimension, blocks of
  `--int4-block-size` (32 by default), float16 compute (iOS 18 / macOS 15).
  With `--int4-method awq` (the default) each block's range is chosen with
  the calibration data first: the decoder runs the calibration samples in
  PyTorch (the module that was converted), each linear layer's mean squared
  input per channel is recorded, and per block of each row the clipping
  ratio is picked that minimises the activation-weighted squared error of
  the INT4 weights (`clip_ratios`); the weights are clipped in the converted
  program and then quantized as above, so Core ML's data-free scale
  (max |w| / 7) lands on the chosen range. `--int4-method rtn`: no clipping.
- pal4 / pal6 / pal8: palettized weights, a k-means lookup table of 2^n
  float16 values per group of 16 output channels (constexpr_lut_to_dense).

Weights under WEIGHT_THRESHOLD elements (norms, biases, small convolutions)
stay float16. The embedding table is a weight too: its Gather reads the
dequantized table. INT8 and the palettes are data-free: coremltools'
activation-aware schemes for them run the model, which needs macOS.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from mmedge.errors import ExportError

WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller constants are not worth a dequantize op
PALETTE_GROUP = 16  # output channels sharing one lookup table
PALETTES = {"pal4": 4, "pal6": 6, "pal8": 8}
COMPRESSED = ("int8", "int4", *PALETTES)
INT4_MAX = 7  # symmetric INT4 as coremltools writes it: [-7, 7], scale = max |w| / 7 per block
CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))  # searched per block, 1.0 = no clipping


def compression_config(precision: str, block_size: int):
    """The coremltools.optimize.coreml op config for a precision that compresses weights."""
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                           weight_threshold=WEIGHT_THRESHOLD)
    if precision == "int4":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=block_size, weight_threshold=WEIGHT_THRESHOLD)
    if precision in PALETTES:
        return cto.OpPalettizerConfig(mode="kmeans", nbits=PALETTES[precision], granularity="per_grouped_channel",
                                      group_size=PALETTE_GROUP, weight_threshold=WEIGHT_THRESHOLD)
    raise ExportError(f"Core ML has no weight compression called {precision!r}; choose one of {', '.join(COMPRESSED)}")


# rows of a weight searched at once: about this many elements, so that the search's temporaries stay a few MB
# (searched whole, PaliGemma-3B's 527M-element LM head took the export's anonymous memory from 6.5 to 19.5 GiB)
CLIP_CHUNK = 1 << 20


def clip_ratios(w: np.ndarray, act: np.ndarray, block: int) -> tuple[np.ndarray, dict]:
    """Per (row, block) of `w` [out, in], the clipping ratio of CLIP_RATIOS with the least
    activation-weighted INT4 error (act: mean squared input per input channel), and the summed errors: RTN's
    (ratio 1.0) and the chosen ratios'. A block clipped to `ratio` x max |w| has scale ratio x max |w| / 7, as
    coremltools' data-free INT4 then computes it on the clipped block. Rows are searched CLIP_CHUNK elements at
    a time, each ratio's error computed in place."""
    rows, cols = w.shape
    blocks = cols // block
    ab = act.astype(np.float32).reshape(blocks, block)
    ratios = np.asarray(CLIP_RATIOS, np.float32)
    best = np.empty((rows, blocks), np.float32)
    rtn = clipped = 0.0
    step = max(1, CLIP_CHUNK // cols)
    for start in range(0, rows, step):
        wb = np.asarray(w[start:start + step], np.float32).reshape(-1, blocks, block)
        top = np.abs(wb).max(-1, keepdims=True)
        q = np.empty_like(wb)
        errors = np.empty((len(ratios), len(wb), blocks), np.float32)  # [ratios, rows, blocks]
        for i, ratio in enumerate(CLIP_RATIOS):
            scale = np.maximum(top * ratio / INT4_MAX, 1e-12)
            np.divide(wb, scale, out=q)
            np.round(q, out=q)
            np.clip(q, -INT4_MAX, INT4_MAX, out=q)
            q *= scale
            np.subtract(wb, q, out=q)
            np.square(q, out=q)
            q *= ab
            q.sum(-1, out=errors[i])
        pick = errors.argmin(0)
        best[start:start + len(wb)] = ratios[pick]
        rtn += float(errors[0].sum(dtype=np.float64))
        clipped += float(np.take_along_axis(errors, pick[None], 0).sum(dtype=np.float64))
    return best, {"rtn": rtn, "clipped": clipped}


def clip_blocks(w: np.ndarray, ratios: np.ndarray, block: int) -> np.ndarray:
    """`w` with each (row, block) clipped to its ratio x its max |w|."""
    rows, cols = w.shape
    wb = w.reshape(rows, cols // block, block)
    limit = np.abs(wb).max(-1, keepdims=True) * ratios[..., None].astype(w.dtype)
    return np.clip(wb, -limit, limit).reshape(rows, cols).astype(w.dtype)


def _clip_pass(clipped: dict[str, tuple[np.ndarray, int]]):
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class ClipWeights(_ClipWeights, AbstractGraphPass):
        pass

    return ClipWeights(clipped)


class _ClipWeights:
    """A MIL graph pass: replace the named weight constants by their clipped values (same dtype)."""

    def __init__(self, clipped: dict[str, tuple[np.ndarray, int]]):
        self.clipped, self.done = clipped, set()

    def apply(self, program) -> None:
        from coremltools.converters.mil import Builder as mb

        for function in program.functions.values():
            with function:
                for op in list(function.operations):
                    name = _torch_name(op.name)
                    if op.op_type != "const" or name not in self.clipped:
                        continue
                    ratios, block, _ = self.clipped[name]
                    value = op.val.val
                    # blocks run along the input axis of a linear layer's [out, in] weight; anything else
                    # (a matmul operand, another layout) is left to the plain quantizer
                    readers = op.outputs[0].child_ops
                    if (not isinstance(value, np.ndarray) or value.shape != (ratios.shape[0], ratios.shape[1] * block)
                            or not readers or any(r.op_type != "linear" or r.weight is not op.outputs[0]
                                                  for r in readers)):
                        continue
                    new = mb.const(val=clip_blocks(value, ratios, block), name=op.name + "_clip", before_op=op)
                    op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0],
                                                                    new_var=new)
                    op.enclosing_block.remove_ops([op])
                    self.done.add(name)


def compress(path: Path, precision: str, block_size: int, clip: dict | None = None) -> dict:
    """Compress the weights of the .mlpackage at `path` in place; returns what was done.

    clip (int4): torch parameter name ('.' as '_') -> (ratios [rows, blocks], block size, the weight's first
    name: a tied weight is listed under each of its names), applied first."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.models.utils import _apply_graph_pass

    config = cto.OptimizationConfig(global_config=compression_config(precision, block_size))
    model = ct.models.MLModel(str(path), skip_model_load=True)
    clipper = None
    with quiet():
        if precision in PALETTES:
            model = cto.palettize_weights(model, config)
        elif clip:
            clipper = _clip_pass(clip)
            quantizer = PASS_REGISTRY["compression::linear_quantize_weights"]
            quantizer.set_options([PassOption("config", config), PassOption("joint_compression", False)])
            model = _apply_graph_pass(model, [clipper, quantizer], spec_version=model.get_spec().specificationVersion)
        else:
            model = cto.linear_quantize_weights(model, config)
    if clipper is not None:  # every clipped weight must be found, under one of its names
        missing = sorted({key for _, _, key in clip.values()} - {clip[name][2] for name in clipper.done})
        if missing:
            raise ExportError(f"{path.name}: the weights {', '.join(missing[:3])} were not found as linear "
                              "layers' [out, in] weights to clip")
    tmp = path.with_name(path.stem + ".compressed.mlpackage")
    model.save(str(tmp))
    _replace_dir(tmp, path)
    report = {"scheme": precision, "weight_threshold": WEIGHT_THRESHOLD}
    if precision == "int4":
        report["block_size"] = block_size
    if precision in PALETTES:
        report.update(bits=PALETTES[precision], group_size=PALETTE_GROUP, mode="kmeans")
    return report


def _replace_dir(new: Path, old: Path) -> None:
    import shutil

    shutil.rmtree(old)
    new.rename(old)


@contextlib.contextmanager
def quiet():
    """coremltools warns about untested torch versions and draws a progress bar per pass; keep the CLI's output ours."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- reading the stored weights back ----------------------------------------------------------

# what the converter and the compression passes append to a torch parameter's name
_SUFFIXES = ("_to_fp16_clip_quantized", "_to_fp16_clip", "_to_fp16_quantized", "_to_fp16_palettized", "_to_fp16")


def stored_weights(path: Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """The weights a .mlpackage stores, by their torch parameter name ('.' written as '_'), dense float32:
    compressed ones (constexpr ops: INT8/INT4 with scales, lookup tables) dequantized as Core ML does;
    and the names of the compressed ones."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    with quiet():
        program = milproto_to_pymil(model_spec=spec, specification_version=spec.specificationVersion,
                                    file_weights_dir=model.weights_dir)
    out, compressed = {}, set()
    for op in program.functions["main"].operations:
        if op.op_type.startswith("constexpr"):
            value = op.materialized_val_inference()
            compressed.add(_torch_name(op.name))
        elif op.op_type == "const" and isinstance(op.val.val, np.ndarray) and op.val.val.size > 1:
            value = op.val.val
        else:
            continue
        out[_torch_name(op.name)] = np.asarray(value, np.float32)
    return out, compressed


def _torch_name(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_stored_weights(module, path: Path) -> dict:
    """Copy the weights stored in the .mlpackage at `path` into the torch `module` it was converted from.

    Weights are matched by name; a compressed constant the converter renamed (one it folded, e.g. a
    position-embedding table gathered at fixed positions) by value: the parameter of the same size
    it approximates. Every compressed weight must land somewhere, or the reading is wrong; float
    weights the converter transformed keep their torch values."""
    import torch

    stored, compressed = stored_weights(path)
    params = {name.replace(".", "_"): p for name, p in module.named_parameters(remove_duplicate=False)}
    loaded, by_value = set(), 0
    with torch.no_grad():
        for name, value in stored.items():
            param = params.get(name)
            if param is None and name in compressed:
                param, value = _closest(params.values(), value)
                by_value += param is not None
            if param is not None and param.numel() == value.size and (name not in params
                                                                      or tuple(param.shape) == value.shape):
                param.copy_(torch.from_numpy(np.ascontiguousarray(value).reshape(tuple(param.shape))))
                loaded.add(name)
    lost = sorted(compressed - loaded)
    if lost:
        raise ExportError(f"{path.name}: compressed weights {', '.join(lost[:3])} match no parameter of the module")
    return {"loaded": len(loaded), "compressed": len(compressed), "matched_by_value": by_value}


def _closest(params, value: np.ndarray, tolerance: float = 0.25):
    """The parameter of `value`'s size that `value` (or its transpose: a weight the converter transposed
    for a matmul) approximates best, within a relative L2 error of `tolerance`; and the value laid out
    as that parameter. (None, value) if there is none."""
    squeezed = value.reshape([d for d in value.shape if d != 1])
    layouts = [squeezed] + ([squeezed.T] if squeezed.ndim == 2 else [])
    best, best_value, best_err = None, value, tolerance
    for param in params:
        if param.numel() != value.size:
            continue
        ref = param.detach().numpy()
        for layout in layouts:
            if layout.shape != ref.reshape([d for d in ref.shape if d != 1]).shape:
                continue
            err = float(np.linalg.norm(ref.reshape(-1) - layout.reshape(-1)) / max(np.linalg.norm(ref), 1e-12))
            if err < best_err:
                best, best_value, best_err = param, layout.reshape(ref.shape), err
    return best, best_value
