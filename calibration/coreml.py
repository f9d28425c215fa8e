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
- pal4 / pal6 / pal8: palettized weights, a k-means lookup table of 2^n
  float16 values per group of 16 output channels (constexpr_lut_to_dense).

Weights under WEIGHT_THRESHOLD elements (norms, biases, small convolutions)
stay float16. The embedding table is a weight too: its Gather reads the
dequantized table.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from mmedge.errors import ExportError

WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller constants are not worth a dequantize op
PALETTE_GROUP = 16  # output channels sharing one lookup table
PALETTES = {"pal4": 4, "pal6": 6, "pal8": 8}
COMPRESSED = ("int8", "int4", *PALETTES)


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


def compress(path: Path, precision: str, block_size: int) -> dict:
    """Compress the weights of the .mlpackage at `path` in place; returns what was done."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=compression_config(precision, block_size))
    model = ct.models.MLModel(str(path), skip_model_load=True)
    with quiet():
        if precision in PALETTES:
            model = cto.palettize_weights(model, config)
        else:
            model = cto.linear_quantize_weights(model, config)
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
    """coremltools draws a progress bar per pass on stderr; the CLI draws its own."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield
