"""ONNX graph quantizers for the ONNX Runtime target (driven by calibration/package.py).

- vision encoder, projector: INT8 QDQ, activations and weights, ranges
  calibrated (MinMax / Entropy / Percentile) on their recorded inputs;
- embedding table: INT8 per row (a scale per token), dequantized by Gather; where the LM head is the same table
  (tied weights) and the decoder keeps its weights in a data file, the embedding instead gathers rows of the
  head's INT8 blocks from that file (GatherBlockQuantized), so the table is stored and mapped once;
- decoder INT8: block-wise INT8 MatMulNBits weights, activations quantized per
  block at run time, since a decoder's activation ranges move with the text;
- decoder INT4: block-wise INT4 MatMulNBits for every weight MatMul but the LM
  head (block-wise INT8), with activation-aware scaling (AWQ style: a scale per input
  channel, searched per MatMul on activations recorded through a decoder copy
  that returns every MatMul's input, folded into the weight and undone by a
  Mul on the activation) or plain round-to-nearest;
- fp16: weights and compute in float16, inputs and outputs kept float32.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mmedge.calibration.package import SEVEN_BIT_WEIGHTS, QuantOptions
from mmedge.calibration.weights import GraphWeights, Pairs, to_float16, to_matmul_nbits
from mmedge.errors import ExportError

log = logging.getLogger(__name__)

ROW_SAMPLE = 512  # activation rows kept per MatMul for the INT4 scale search
AWQ_GRID = np.linspace(0.0, 1.0, 11)
AWQ_SEARCH_COLUMNS = 512


# -- recording the real pipeline ---------------------------------------------


class _ActivationStats:
    """Runs the decoder copy that exposes MatMul inputs; keeps mean |x| per channel and a sample of rows (each tap's
    own draws, so that the sample is the same whichever order the taps come in: whole runs or a layered replay)."""

    def __init__(self, graph, taps: list[str], seed: int = 0):
        self.graph, self.taps = graph, taps
        self.abs_sum: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}
        self.rows: dict[str, list[np.ndarray]] = {}
        self.rng = {tap: np.random.default_rng([seed, i]) for i, tap in enumerate(taps)}

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        out = self.graph.run(inputs, into=into)
        self.take(out)
        return out

    def take(self, out: dict[str, np.ndarray]) -> None:
        """The taps among `out` (popped: their arrays are the caller's to give, |x| is taken in place)."""
        for tap in self.taps:
            if tap not in out:
                continue
            x = out.pop(tap)
            x = x.reshape(-1, x.shape[-1])
            if x.dtype != np.float32 or not x.flags.writeable:
                x = x.astype(np.float32)
            keep = self.rows.setdefault(tap, [])
            have = sum(len(r) for r in keep)
            if have < ROW_SAMPLE:
                take = min(len(x), ROW_SAMPLE - have, 32)  # spread the sample over many steps and samples
                keep.append(x[self.rng[tap].choice(len(x), take, replace=False)])
            # |x| in place, the output being ours: a 1,300-token prefill of a 3B decoder returns 3.2 GB of MatMul
            # inputs, whose copy and |x| temporaries cost 2.2 s a sample (0.4 so)
            self.abs_sum[tap] = self.abs_sum.get(tap, 0) + np.abs(x, out=x).sum(0)
            self.count[tap] = self.count.get(tap, 0) + x.shape[0]

    def __getattr__(self, name):  # the rest of the graph's interface (reset_state of a decoder held as state)
        return getattr(self.graph, name)

    def stats(self, tap: str) -> tuple[np.ndarray, np.ndarray]:
        return self.abs_sum[tap] / max(1, self.count[tap]), np.concatenate(self.rows[tap])


def _weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def _name_nodes(model: onnx.ModelProto) -> None:
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _tapped_copy(path: Path, out: Path) -> list[str]:
    """Write a decoder copy whose extra outputs are the inputs of its weight MatMuls; returns their names. The
    copy is the graph only: `out` lies beside `path` and reads its weights from the same data file."""
    model = onnx.load(str(path), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    taps = []
    for node in _weight_matmuls(model):
        tap = node.input[0]
        if tap not in taps and tap not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
            taps.append(tap)
    onnx.save_model(model, str(out))
    return taps


# -- graph transforms ----------------------------------------------------------


def _has_external_data(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists()


class _FeedReader:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


# The quantized layers' outputs stay float on the CPU targets: ONNX Runtime then runs each as MatMulIntegerToFloat
# (int8 product, float result) instead of QLinearMatMul + DequantizeLinear, one rounding fewer. SmolVLM-256M-shaped's
# INT8 vision encoder, 2 threads, taking turns: 749 -> 699 ms a 512 x 512 image (median of 8), relative L2 error
# from fp32 on two held-out photographs 0.0625 / 0.0624 -> 0.0574 / 0.0582. TensorRT (symmetric) keeps its Q/DQ.
FLOAT_OUTPUTS = ("MatMul", "Gemm")  # (a Conv runs as QLinearConv only with its output quantized)


def float_outputs(symmetric: bool) -> tuple[str, ...]:
    """The op types whose quantized outputs static INT8 leaves float: FLOAT_OUTPUTS on the CPU targets, none for
    TensorRT's symmetric Q/DQ. The quantizer and the range probe both read it, so the probe measures exactly the
    tensors the quantizer takes ranges for."""
    return () if symmetric else FLOAT_OUTPUTS


def quantize_static_int8(src: Path, dst: Path, feeds: list[dict], method: str, symmetric: bool = False) -> dict:
    """INT8 QDQ: activations uint8 with calibrated ranges (int8 around zero if `symmetric`, as TensorRT
    wants them), weights int8 symmetric per output channel.

    Only the layers with weights (MatMul by a 2-D initializer, Conv, Gemm) are quantized; the
    attention MatMuls (queries x keys, probabilities x values) stay fp32: per-tensor uint8 on
    attention scores and probabilities cost the Gemma 3 demo's vision encoder a relative L2
    error of 0.46 (0.08 without them) and 3.6 points of accuracy.

    MinMax ranges are measured here (`_minmax_ranges`) and handed to the quantizer as its calibration
    cache, where onnxruntime allows it: its own calibrator holds a shape-inferred and an augmented
    copy of the graph and a session over every MatMul's inputs and outputs, attention scores
    included, 23 GB for the 2.5 GB vision encoder of Qwen2-VL-2B at 1024 patches.
    """
    import os

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    external = _has_external_data(src)
    model = onnx.load(str(src), load_external_data=False)  # the graph; its weights stay in the data file
    _name_nodes(model)
    nodes = _quantized_nodes(model)
    named = src.with_name(f".named-{src.name}")  # beside src: it reads src's data file
    onnx.save_model(model, str(named))
    lean = method == "minmax" and _takes_ranges()
    seven_bits = SEVEN_BIT_WEIGHTS and not symmetric  # TensorRT (symmetric, on a GPU) keeps 8
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = None
            if lean:
                from onnxruntime.quantization.calibrate import save_tensors_data

                cache = Path(tmp) / "ranges.json"
                # measured as calibration ran the graph (RangeProbe), or now over the recorded inputs
                measured = getattr(feeds, "ranges", None)
                save_tensors_data(measured if measured is not None else _minmax_ranges(named, model, feeds, symmetric),
                                  cache)
            del model
            os.chdir(tmp)  # the calibrator writes its augmented model to the working directory, and the quantizer
            try:           # refuses to write dst's <name>.data where one exists in it
                quantize_static(
                    str(named), str(dst), None if lean else _FeedReader(feeds),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Conv", "Gemm"],
                    nodes_to_quantize=nodes,
                    per_channel=True,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=methods[method],
                    use_external_data_format=external,
                    reduce_range=seven_bits,
                    # TensorRT: zero points 0, and float biases (its parser takes no INT32 DequantizeLinear)
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": symmetric,
                                   "QuantizeBias": not symmetric,
                                   "OpTypesToExcludeOutputQuantization": list(float_outputs(symmetric))},
                    **({"calibration_cache_path": str(cache)} if lean else {}),
                )
            finally:
                os.chdir(cwd)
    finally:
        named.unlink(missing_ok=True)
    activations = "int8 symmetric" if symmetric else "uint8"
    weights = "int8 in 7 bits" if seven_bits else "int8"
    outputs = "" if symmetric else "; outputs float"
    return {"scheme": f"int8 QDQ: activations {activations} (calibrated), weights {weights} per channel{outputs}; "
                      "attention MatMuls fp32",
            "calibration": method, "calibration_batches": len(feeds), "layers": len(nodes)}


def _takes_ranges() -> bool:
    """Whether this onnxruntime's quantize_static takes ranges measured elsewhere (its calibration cache; 1.24+)."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes static INT8 quantizes (named by _name_nodes): MatMuls by a 2-D weight, Conv, Gemm."""
    return [n.name for n in _weight_matmuls(model)] + [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]


class RangeProbe:
    """Runs a float graph as the engine would and measures, as it runs, the MinMax ranges onnxruntime's calibrator
    gives the tensors static INT8 quantizes (the float inputs and outputs of the quantized nodes): each tensor's
    min and max over every run, reduced inside a copy of the graph (beside it, reading its weights from the same
    file, unpacked) so that a run returns two numbers per tensor besides the graph's own outputs. Calibration runs
    the vision side once through it and quantize_static_int8 takes the ranges, instead of running the graph over
    the recorded inputs again (Qwen2.5-VL-3B's vision encoder over 17 images: ~4 min)."""

    def __init__(self, graph: Path, model: onnx.ModelProto | None = None, symmetric: bool = False):
        """`symmetric` as quantize_static_int8 takes it: the outputs it leaves float (float_outputs) not measured."""
        import onnxruntime as ort

        if model is None:
            model = onnx.load(str(graph), load_external_data=False)
            _name_nodes(model)
        inits, wanted = {i.name for i in model.graph.initializer}, set(_quantized_nodes(model))
        unquantized = float_outputs(symmetric)
        self.tensors = list(dict.fromkeys(
            t for n in model.graph.node if n.name in wanted
            for t in (*n.input, *(n.output if n.op_type not in unquantized else ()))
            if t and t not in inits))
        self.own = [o.name for o in model.graph.output]
        index = {t: i for i, t in enumerate(self.tensors)}
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.node[:]

        def reduce(produced):
            for t in produced:
                if t in index:
                    for op in ("ReduceMin", "ReduceMax"):
                        out = f"mmedge_range_{index[t]}_{op}"
                        probe.graph.node.append(helper.make_node(op, [t], [out], keepdims=0, name=out))

        # Each reduction right after the node that makes its tensor, run in that order: appended at the end, every
        # probed tensor stayed alive until the last layer (a 24-layer chain of 16 MB activations: 1.6 GB at the
        # peak instead of 64 MB; the Qwen2.5-VL-3B vision encoder's step held 20 GiB)
        reduce(i.name for i in model.graph.input)
        for node in model.graph.node:
            probe.graph.node.append(node)
            reduce(node.output)
        for i in range(len(self.tensors)):
            for op in ("ReduceMin", "ReduceMax"):
                probe.graph.output.append(
                    helper.make_tensor_value_info(f"mmedge_range_{i}_{op}", onnx.TensorProto.FLOAT, []))
        self.path = graph.with_name(".ranges-" + graph.name.lstrip("."))
        onnx.save_model(probe, str(self.path))
        probe.Clear()  # (not del: reduce() above closes over it)
        try:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator runs it
            opts.add_session_config_entry("session.disable_prepacking", "1")  # weights stay the mapped file
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # the graph's order (the default runs them last)
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        finally:
            self.path.unlink(missing_ok=True)  # the session holds the graph; its weights are the original's file
        self.low = np.full(len(self.tensors), np.inf, dtype=np.float32)
        self.high = np.full(len(self.tensors), -np.inf, dtype=np.float32)

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        assert not into, "a range probe returns its outputs (no bound buffers)"
        out = self.session.run(None, inputs)
        n = len(self.own)
        ranges = np.asarray(out[n:], dtype=np.float32).reshape(len(self.tensors), 2)
        self.low, self.high = np.fmin(self.low, ranges[:, 0]), np.fmax(self.high, ranges[:, 1])
        return dict(zip(self.own, out[:n]))

    def ranges(self):
        """onnxruntime.quantization's TensorsData of what the runs so far measured."""
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import TensorsData

        return TensorsData(CalibrationMethod.MinMax,
                           {t: (self.low[i:i + 1], self.high[i:i + 1]) for i, t in enumerate(self.tensors)})


def range_probe(part: str, graph: Path, options, symmetric: bool = False):
    """The graph calibration runs for `part`: a RangeProbe where its static INT8 (quantize_static_int8 with
    `symmetric`) takes MinMax ranges measured elsewhere, else None (the engine's own graph; the ranges come from its
    recorded inputs)."""
    if options.calib_method != "minmax" or not _takes_ranges():
        return None
    return RangeProbe(graph, symmetric=symmetric)


def _minmax_ranges(graph: Path, model: onnx.ModelProto, feeds: list[dict], symmetric: bool = False):
    """The MinMax ranges of `graph` (whose nodes `model` names) over `feeds`, measured by a RangeProbe."""
    probe = RangeProbe(graph, model, symmetric)
    for feed in feeds:
        probe.run(feed)
    return probe.ranges()


def quantize_embedding_int8(src: Path, dst: Path) -> dict:
    """The embedding table as int8 with one scale per row; Gather picks rows and scales, a Mul dequantizes. The
    table is read from its file and quantized rows at a time as it is written (LLaVA-1.5-7B's is 0.5 GB)."""
    if src.resolve() == dst.resolve():  # rewritten in place (a dual encoder's text encoder): read from a moved copy
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".embedding-") as tmp:
            for path in graph_files(src):
                if path.exists():
                    path.replace(Path(tmp) / path.name)
            return quantize_embedding_int8(Path(tmp) / src.name, dst)
    graph = GraphWeights(src)
    nodes, inits = graph.model.graph.node, graph.model.graph.initializer
    deferred, pairs = {}, Pairs()
    for node in list(nodes):
        base = node.input[0]
        if node.op_type != "Gather" or base not in graph.inits or len(graph.shape(base)) != 2:
            continue

        inits.remove(graph.inits[base])
        inits.extend([onnx.TensorProto(name=base + "_int8", data_type=onnx.TensorProto.INT8, dims=graph.shape(base)),
                      onnx.TensorProto(name=base + "_scale", data_type=onnx.TensorProto.FLOAT,
                                       dims=[graph.shape(base)[0], 1])])
        deferred[base + "_int8"], deferred[base + "_scale"] = pairs.deferred(
            base, lambda base=base: _int8_rows(graph.mapped(base)))
        out, ids = node.output[0], node.input[1]
        at = list(nodes).index(node)
        nodes.remove(node)
        new = [
            helper.make_node("Gather", [base + "_int8", ids], [out + "_q"], name=node.name + "_q", axis=0),
            helper.make_node("Cast", [out + "_q"], [out + "_f"], name=node.name + "_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [base + "_scale", ids], [out + "_s"], name=node.name + "_scale", axis=0),
            helper.make_node("Mul", [out + "_f", out + "_s"], [out], name=node.name + "_dequant"),
        ]
        for i, n in enumerate(new):
            nodes.insert(at + i, n)
    if not deferred:
        raise ExportError(f"{src.name} has no embedding table (Gather on a 2-D initializer) to quantize")
    graph.write(dst, deferred, external=_has_external_data(src))
    return {"scheme": "int8 weight-only, one scale per row"}


EMBEDDING_ROWS = 4096  # table rows quantized at a time


def _int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [V, H], float32 scales [V, 1]): each row over its largest magnitude / 127, a slice of rows at a time."""
    q = np.empty(table.shape, dtype=np.int8)
    scale = np.empty((table.shape[0], 1), dtype=np.float32)
    for start in range(0, table.shape[0], EMBEDDING_ROWS):
        rows = np.asarray(table[start:start + EMBEDDING_ROWS], dtype=np.float32)
        s = np.abs(rows).max(axis=1, keepdims=True) / 127.0
        s[s == 0] = 1.0
        q[start:start + EMBEDDING_ROWS] = np.clip(np.round(rows / s), -127, 127)
        scale[start:start + EMBEDDING_ROWS] = s
    return q, scale


def share_tied_table(embed_src: Path, embed_dst: Path, decoder_src: Path, decoder_dst: Path) -> dict | None:
    """Write `embed_dst` as a graph that gathers its rows from the quantized decoder's LM head, when the head is
    the embedding table (tied weights); None (nothing written) when it is not, or cannot be shared.

    The head is 8-bit MatMulNBits in blocks along the hidden size, stored [vocab, blocks, block] with scales
    [vocab, blocks] in `decoder.onnx.data`: byte for byte an embedding table quantized per row block, which
    GatherBlockQuantized reads as [vocab, hidden] (same zero point, 128). The embedding graph's two tensors
    point into the decoder's data file (same folder), so the table is on disk once and ONNX Runtime maps the
    same pages for both graphs. Shared where the decoder has a data file (past 64 MB of weights) and the block
    divides the hidden size; the fp32 tables are compared value for value first.
    """
    if not _has_external_data(decoder_dst):
        return None
    embed = GraphWeights(embed_src)
    gathers = [n for n in embed.model.graph.node
               if n.op_type == "Gather" and n.input[0] in embed.inits and len(embed.shape(n.input[0])) == 2]
    if len(gathers) != 1:
        return None
    gather, table = gathers[0], embed.inits[gathers[0].input[0]]
    others = [i for i in embed.model.graph.initializer if i is not table and i.data_location == onnx.TensorProto.EXTERNAL]
    vocab, hidden = table.dims
    decoder = GraphWeights(decoder_src)
    heads = [n for n in _weight_matmuls(decoder.model) if decoder.shape(n.input[1]) == (hidden, vocab)]
    if others or len(heads) != 1:
        return None
    quantized = onnx.load(str(decoder_dst), load_external_data=False)
    head = next((n for n in quantized.graph.node if n.op_type == "MatMulNBits" and n.output[0] == heads[0].output[0]),
                None)
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute} if head is not None else {}
    if attrs.get("bits") != 8 or len(head.input) != 3 or hidden % attrs["block_size"] \
            or not _same_table(embed, table.name, decoder, heads[0].input[1]):
        return None
    block = attrs["block_size"]
    inits = {i.name: i for i in quantized.graph.initializer}
    values = _external_view(inits[head.input[1]], table.name + "_head_q8", onnx.TensorProto.UINT8, [vocab, hidden])
    scales = _external_view(inits[head.input[2]], table.name + "_head_scales", onnx.TensorProto.FLOAT,
                            [vocab, hidden // block])
    model = embed.model
    model.graph.initializer.remove(table)
    model.graph.initializer.extend([values, scales])
    at = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(at, helper.make_node(
        "GatherBlockQuantized", [values.name, gather.input[1], scales.name], list(gather.output), name=gather.name,
        domain="com.microsoft", bits=8, block_size=block, gather_axis=0, quantize_axis=1))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    embed_dst.with_name(embed_dst.name + ".data").unlink(missing_ok=True)
    onnx.save_model(model, str(embed_dst))  # the graph only: its two tensors point into the decoder's data file
    return {"scheme": f"int8 blocks of {block} shared with the LM head (tied): GatherBlockQuantized over the "
                      f"decoder's MatMulNBits weights in {values.external_data[0].value}", "shared_with": "decoder"}


def _external_view(tensor: onnx.TensorProto, name: str, dtype: int, dims: list[int]) -> onnx.TensorProto:
    """A tensor named `name` with `dims` over the bytes of external `tensor` (same file, offset and length)."""
    view = onnx.TensorProto(name=name, data_type=dtype, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        view.external_data.add(key=entry.key, value=entry.value)
    return view


def _same_table(embed: GraphWeights, table: str, decoder: GraphWeights, head: str, rows: int = 8192) -> bool:
    """Whether embedding `table` [vocab, hidden] equals LM head weight `head` [hidden, vocab] transposed, compared
    a slice of rows at a time from the mapped files."""
    a, b = embed.mapped(table), decoder.mapped(head)
    return all(np.array_equal(a[i:i + rows], b[:, i:i + rows].T) for i in range(0, a.shape[0], rows))


def convert_fp16(src: Path, dst: Path) -> dict:
    """float16 weights and compute (onnxruntime's converter and its default block list), one weight at a time."""
    graph = GraphWeights(src)
    graph.write(dst, to_float16(graph, keep_io_types=True), external=_has_external_data(src))
    return {"scheme": "fp16 weights and compute, fp32 inputs and outputs"}


def int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise INT4 along K (rows of a [K, N] MatMul weight, zero-padded to whole blocks):
    (q [K/block, block, N] in -8..7, scale [K/block, 1, N]), as MatMulNBits stores it.

    onnxruntime's symmetric blocks map the block's largest-magnitude value to -8
    (scale = that value / -8, zero point 8) and clamp the other side at +7.
    """
    q, scale = _int4_blocks(_torch(w), block)
    return q.numpy(), scale.numpy()


def _torch(a: np.ndarray):
    """`a` as a torch tensor sharing its memory; read-only arrays (mapped weights) too: nothing here writes into
    the tensors it is given, only into new ones."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def _int4_blocks(w, block: int):
    """int4_blocks on a torch tensor: the same arithmetic (round half to even), on every core, without numpy's
    temporary copies. A block's largest-magnitude value is its max or its min (a reduction along the middle axis
    costs a tenth of an argmax there); where the two tie in magnitude, the one that comes first, as argmax has it."""
    import torch

    k, n = w.shape
    wp = torch.nn.functional.pad(w, (0, 0, 0, (-k) % block)).reshape(-1, block, n)
    top, bottom = wp.amax(dim=1, keepdim=True), wp.amin(dim=1, keepdim=True)
    peak = torch.where(top >= -bottom, top, bottom)
    tie = (top == -bottom) & (top != 0)
    if bool(tie.any()):
        peak = torch.where(tie, torch.gather(wp, 1, wp.abs().argmax(dim=1, keepdim=True)), peak)
    scale = peak / -8.0
    scale[scale == 0] = 1.0
    return torch.clamp(torch.round(wp / scale), -8, 7), scale


def _fake_int4(w, block: int):
    """The INT4 round trip of `w` (what the quantized MatMul multiplies by): numpy in, numpy out; a torch
    tensor in, a torch tensor out."""
    if isinstance(w, np.ndarray):
        return _fake_int4(_torch(w), block).numpy()
    q, scale = _int4_blocks(w, block)
    return (q * scale).reshape(-1, w.shape[1])[: w.shape[0]]


def awq_scales(w, act_mean: np.ndarray, rows: np.ndarray, block: int) -> tuple[np.ndarray, float, float]:
    """Search s = mean|x|^alpha per input channel so that (x / s) @ Q(diag(s) W) best matches x @ W on `rows`;
    `w` a [K, N] weight or the list of those that share the scale (joined along N).

    The error is measured on at most AWQ_SEARCH_COLUMNS output columns (a fixed random choice): the scale is per
    input channel, and a 3B decoder's MLP has 32768 columns, whose full search took minutes per layer. The search
    runs in float32 with the float32 scale the weights will get (the weights' own type), in torch: a Qwen2.5-3B-shaped
    layer's four groups took 3.36 s in float64 numpy (the grid's float64 alphas promoted it), 1.29 s so, the same
    alphas (2 cores); Qwen2.5-VL-3B-shaped's whole decoder INT4 step 180 -> 90 s."""
    ws = list(w) if isinstance(w, (list, tuple)) else [w]
    widths = [m.shape[1] for m in ws]
    if sum(widths) > AWQ_SEARCH_COLUMNS:  # the columns of the joined weight, taken from each member
        cols = np.sort(np.random.default_rng(0).choice(sum(widths), AWQ_SEARCH_COLUMNS, replace=False))
        starts = np.cumsum([0, *widths])
        ws = [m[:, cols[(cols >= a) & (cols < b)] - a] for m, a, b in zip(ws, starts[:-1], starts[1:])]
    w = _torch(np.concatenate(ws, axis=1, dtype=np.float32) if len(ws) > 1 else ws[0].astype(np.float32, copy=False))
    x = _torch(rows.astype(np.float32, copy=False))
    ref = x @ w
    best = (None, 0.0, np.inf)
    base = np.maximum(act_mean, 1e-8)
    for alpha in AWQ_GRID:
        s = base ** alpha
        s = s / np.sqrt(s.max() * s.min())
        s32 = _torch(s.astype(np.float32))
        err = float(((ref - (x / s32) @ _fake_int4(w * s32[:, None], block)) ** 2).mean())
        if err < best[2]:
            best = (s, float(alpha), err)
    rtn_err = float(((ref - x @ _fake_int4(w, block)) ** 2).mean())
    return best[0], best[1], best[2] / max(rtn_err, 1e-30)


# MatMulNBits' compute type: 4 = int8 activations (quantized per block at run time) x int8/int4 weights, the
# VNNI / dot-product path; 0 dequantizes the weights to fp32 first. On the SmolVLM-256M decoder (2-core x86,
# AVX-512 VNNI) a decode step took 10.4 ms at level 0 and 8.2 ms at level 4 with an fp32 LM head, 5.0 ms with
# the LM head in 8 bits too (tools/bench_peers.py, docs/benchmarks.md).
ACCURACY_LEVEL = 4
# INT8 blocks: 32 values, or 128 where a weight's K is at least INT8_WIDE_K. At a real model's width the
# 32-blocks' float scales are an eighth of the int8 bytes and the kernel is slower: Qwen2-VL-2B's LM head (K 1536,
# N 151936, one token, 2 threads, idle machine) took 12.8 ms in blocks of 32 and 11.6 ms in blocks of 128, and
# its int4 decoder's step 42.1 -> 39.4 ms (docs/quantization.md). Every demo model is narrower (K <= 512), so
# its packages are as before.
INT8_BLOCK, INT8_WIDE_BLOCK, INT8_WIDE_K = 32, 128, 1024


def int8_block(k: int) -> int:
    return INT8_WIDE_BLOCK if k >= INT8_WIDE_K else INT8_BLOCK


INT8_BLOCKS = f"block {INT8_BLOCK}, {INT8_WIDE_BLOCK} where K >= {INT8_WIDE_K}"


def quantize_decoder_int8(src: Path, dst: Path) -> dict:
    """Every weight MatMul (LM head included) as block-wise INT8 MatMulNBits."""
    graph = GraphWeights(src)
    _name_nodes(graph.model)
    matmuls = _weight_matmuls(graph.model)
    deferred = to_matmul_nbits(graph, matmuls, 8, int8_block, ACCURACY_LEVEL)
    graph.write(dst, deferred, external=_has_external_data(src))
    return {"scheme": f"int8 block-wise weights (MatMulNBits, {INT8_BLOCKS}, symmetric); activations int8 "
                      f"per block at run time (accuracy level {ACCURACY_LEVEL})", "matmuls": len(matmuls)}


def _fold_target(graph: GraphWeights, x: str, readers: list):
    """Where a per-channel factor on activation `x` can go inside the op that makes it: a function
    taking the factor, or None.

    An RMSNorm's weight (x = norm(h) * gamma) or, for x = a * up(h), the up
    projection's output columns take it, when only `readers` read x; then AWQ
    costs no node per token.
    """
    model, inits = graph.model, graph.inits
    consumers = [n for n in model.graph.node if x in n.input]
    producer = next((n for n in model.graph.node if x in n.output), None)
    if producer is None or {id(n) for n in consumers} != {id(n) for n in readers}:
        return None
    used = lambda name: sum(name in n.input for n in model.graph.node)  # noqa: E731

    def scaling(name: str, shape: tuple):
        return lambda factor: graph.scale(name, factor.reshape(shape).astype(np.float32))

    if producer.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
        gamma = producer.input[1 if producer.op_type == "SimplifiedLayerNormalization" else 2]
        if producer.output[0] == x and gamma in inits and used(gamma) == 1:
            return scaling(gamma, (-1,))
    if producer.op_type == "Mul":
        for operand in producer.input:
            up = next((n for n in model.graph.node if operand in n.output), None)
            if up is not None and up.op_type == "MatMul" and up.input[1] in inits and used(operand) == 1 \
                    and used(up.input[1]) == 1:
                return scaling(up.input[1], (1, -1))
            if up is not None and up.op_type == "Split" and used(operand) == 1:  # gate|up joined, then split
                return _split_columns(graph, up, operand, used)
    return None


def _split_columns(graph: GraphWeights, split: onnx.NodeProto, part: str, used):
    """For `part`, one output of a Split along the last axis of a weight MatMul's output (the fused decoder's
    gate|up): a function scaling that part's columns of the weight, or None."""
    model, inits = graph.model, graph.inits
    matmul = next((n for n in model.graph.node if split.input[0] in n.output), None)
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits or len(split.input) < 2 \
            or split.input[1] not in inits or used(matmul.input[1]) != 1 or used(split.input[0]) != 1 \
            or axis != -1:
        return None
    weight = matmul.input[1]
    width = graph.shape(weight)[1]
    sizes = [int(n) for n in numpy_helper.to_array(inits[split.input[1]])]
    if sum(sizes) != width:
        return None
    j = list(split.output).index(part)
    start, stop = sum(sizes[:j]), sum(sizes[: j + 1])

    def fold(factor: np.ndarray) -> None:
        full = np.ones((1, width), dtype=np.float32)
        full[0, start:stop] = factor.reshape(-1)
        graph.scale(weight, full)
    return fold


def apply_awq(graph: GraphWeights, matmuls: list[onnx.NodeProto], skip: list[str], block: int,
              stats: _ActivationStats | None) -> dict:
    """Activation-aware scales for the weight MatMuls (but `skip`), recorded as factors on the fp32 weights
    (applied as each is read for quantization); returns the report's AWQ entries. Each scale s multiplies a
    weight's input rows and 1/s is taken by the op that makes the activation (folded) or by a Mul on it."""
    if stats is None:
        raise ExportError("activation-aware INT4 needs decoder calibration data")
    groups: dict[str, list[onnx.NodeProto]] = {}  # MatMuls reading one activation share one scale
    for node in matmuls:
        if node.name not in skip and node.input[0] in stats.abs_sum:
            groups.setdefault(node.input[0], []).append(node)
    alphas, gains, folded = {}, [], 0
    for x, group in groups.items():
        fold = _fold_target(graph, x, group)
        # one scale for all the MatMuls reading x when the op making x can take 1/s (no node added per
        # token); otherwise each MatMul gets its own scale and a Mul on its input
        for members in [group] if fold else [[n] for n in group]:
            alpha, gain = _scale_group(graph, x, members, fold, block, stats)
            alphas.update(dict.fromkeys((n.name for n in members), alpha))
            gains.append(gain)
            folded += bool(fold) and alpha != 0.0
    return {"awq_alpha": {k: round(v, 2) for k, v in alphas.items()},
            "awq_scales_folded": folded,  # shared inputs whose 1/s went into the norm or MatMul before them
            "awq_error_vs_rtn": round(float(np.mean(gains)), 4) if gains else 1.0}  # mean AWQ MSE / RTN MSE


def _scale_group(graph: GraphWeights, x, members, fold, block, stats) -> tuple[float, float]:
    """Search and apply one scale for the MatMuls `members` reading `x`; returns (alpha, error vs RTN)."""
    act, rows = stats.stats(x)
    s, alpha, gain = awq_scales([graph.array(n.input[1]) for n in members], act, rows, block)
    if alpha == 0.0:
        return alpha, gain
    for n in members:
        graph.scale(n.input[1], s[:, None].astype(np.float32))
    if fold:
        fold(1.0 / s)
        return alpha, gain
    node = members[0]
    inv = node.name + "_awq_inv_scale"
    graph.add((1.0 / s).astype(np.float32), inv)
    scaled = node.input[0] + "_awq_" + node.name
    nodes = graph.model.graph.node
    nodes.insert(list(nodes).index(node), helper.make_node("Mul", [node.input[0], inv], [scaled],
                                                           name=node.name + "_awq"))
    node.input[0] = scaled
    return alpha, gain


def lm_heads(model: onnx.ModelProto, matmuls: list[onnx.NodeProto], vocab: int) -> list[str]:
    """The weight MatMuls that project to the vocabulary (kept at 8 bits: the logits are the output)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in matmuls if inits[n.input[1]].dims[1] == vocab]


def quantize_decoder_int4(src: Path, dst: Path, block: int, method: str, stats: _ActivationStats | None,
                          lm_head_vocab: int) -> dict:
    """Block-wise INT4 (MatMulNBits) for every weight MatMul but the LM head, which gets INT8."""
    graph = GraphWeights(src)
    _name_nodes(graph.model)
    matmuls = _weight_matmuls(graph.model)
    heads = lm_heads(graph.model, matmuls, lm_head_vocab)
    awq = apply_awq(graph, matmuls, heads, block, stats) if method == "awq" else {}
    deferred = to_matmul_nbits(graph, [n for n in matmuls if n.name not in heads], 4, block, ACCURACY_LEVEL)
    deferred.update(to_matmul_nbits(graph, [n for n in matmuls if n.name in heads], 8, int8_block, ACCURACY_LEVEL))
    graph.write(dst, deferred, external=_has_external_data(src))
    return {"scheme": f"int4 block-wise (MatMulNBits, block {block}, symmetric) weights; LM head int8 block-wise "
                      f"({INT8_BLOCKS}); activations int8 per block at run time (accuracy level {ACCURACY_LEVEL})",
            "int4_method": method, "int4_matmuls": len(matmuls) - len(heads), **awq}


# -- the hooks calibration/package.py calls --------------------------------------


def graph_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + ".data")]


def decoder_capture(work: Path, decoder: Path, plan: dict, options: QuantOptions):
    """For activation-aware INT4: run a decoder copy that also returns its MatMul inputs, keeping statistics."""
    if plan["decoder"] != "int4" or options.int4_method != "awq":
        return None
    tapped = decoder.with_name(".tapped-" + decoder.name)  # beside the decoder: it reads the decoder's data file
    taps = _tapped_copy(decoder, tapped)
    return tapped, lambda graph: _ActivationStats(graph, taps)


def quantize_graph(part, precision, src, dst, options, feeds, stats) -> dict:
    if precision == "fp16":
        return convert_fp16(src, dst)
    if part == "embed_tokens":
        return quantize_embedding_int8(src, dst)
    if part == "decoder" and precision == "int8":
        return quantize_decoder_int8(src, dst)
    if part == "decoder":
        return quantize_decoder_int4(src, dst, options.int4_block_size, options.int4_method, stats, _lm_head_vocab(src))
    report = quantize_static_int8(src, dst, feeds[part], options.calib_method)
    if part == "text_encoder":  # a dual encoder's (CLIP, SigLIP): its token table as int8 rows too
        quantize_embedding_int8(dst, dst)
        report["scheme"] += "; token embedding int8 per row"
    return report


def _lm_head_vocab(decoder: Path) -> int:
    out = onnx.load(str(decoder), load_external_data=False).graph.output
    logits = next(o for o in out if o.name == "logits")
    return int(logits.type.tensor_type.shape.dim[-1].dim_value)


