"""ONNX graph quantizers for the TensorRT target: the precision is written into the graph.

TensorRT 10.12+ builds strongly typed networks (every tensor's type is the
ONNX type; no precision flags, no calibrators), and 10.3 (JetPack 6.2) reads
explicit Q/DQ the same way. So each graph says exactly what runs at what
precision, and the same file runs under ONNX Runtime on any machine, which is
how it is measured here (calibration/package.py) without a GPU:

- fp16: weights and compute in float16, with float32 islands where float16
  overflows or loses the result: each norm's variance (x^2, its mean, + eps,
  sqrt, reciprocal), Softmax, LayerNormalization. Inputs and outputs stay
  float32 (the runtime's contract).
- int8: vision encoder and projector with INT8 Q/DQ on every weight layer's
  input (symmetric, zero point 0: ranges calibrated on the recorded inputs)
  and per-output-channel INT8 weights; the decoder weight-only INT8 (a
  per-channel DequantizeLinear feeding each weight MatMul). All on the fp16
  graph. The embedding table stays fp16: the parser takes no INT8 Gather.
- int4: the decoder's weight MatMuls as INT4 block-quantized DequantizeLinear
  (opset 21 block_size along K, float16 scales: TensorRT's weight-only INT4),
  activation-aware scales as for onnxruntime (calibration/onnxruntime.py),
  the LM head INT8 per channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmedge.calibration import onnxruntime as ort_quant
from mmedge.calibration.weights import GraphWeights, Pairs, to_float16
from mmedge.calibration.package import QuantOptions
from mmedge.errors import ExportError

OPSET = 19  # float16 inputs to QuantizeLinear
OPSET_INT4 = 21  # DequantizeLinear's block_size and INT4 tensors (IR 10); only where needed: ONNX Runtime's
IR_VERSION_INT4 = 10  # optimizer breaks int8 Q/DQ at 21 ("output_dtype INT8 does not match y_zero_point")
# ops computed in float32 inside fp16 graphs
ISLAND_OPS = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "LayerNormalization"}

# the package is verified, calibrated and measured through this backend at export (no GPU needed)
BACKEND = "onnxruntime"
# static INT8 as TensorRT takes it: int8 activations around zero (zero points 0), every layer's Q/DQ kept; the
# range probe and the quantizer both read it
SYMMETRIC_INT8 = True
graph_files = ort_quant.graph_files
decoder_capture = ort_quant.decoder_capture


def range_probe(part: str, graph: Path, options):
    """As the onnxruntime target's, for TensorRT's symmetric static INT8 (its layers' outputs keep their Q/DQ)."""
    return ort_quant.range_probe(part, graph, options, symmetric=SYMMETRIC_INT8)


def fp16_islands(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float32: ISLAND_OPS, and the Add / Div that take a norm's mean or sqrt
    (x^2 and its mean overflow float16 once activations pass ~256)."""
    island = [n for n in model.graph.node if n.op_type in ISLAND_OPS]
    made = {o for n in island if n.op_type in ("ReduceMean", "Sqrt") for o in n.output}
    extra = [n for n in model.graph.node if n.op_type in ("Add", "Div") and made & set(n.input)]
    return [n.name for n in island + extra]


def to_fp16(graph: GraphWeights, deferred: dict | None = None) -> dict:
    """`graph` to float16 weights and compute, float32 islands and I/O, opset 19 (21 with INT4 weights), its
    weights read as they are written (calibration/weights.py to_float16): returns the deferred initializers."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    ort_quant._name_nodes(graph.model)
    deferred = to_float16(graph, deferred, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST,
                          node_block_list=fp16_islands(graph.model))
    _drop_cast_round_trips(graph.model)
    _sort_topologically(graph.model)
    _opset(graph.model)
    return deferred


def fp16_file(src: Path, dst: Path) -> None:
    """The graph at `src` in float16 (to_fp16) at `dst`, one weight at a time."""
    graph = GraphWeights(src)
    graph.write(dst, to_fp16(graph), external=ort_quant._has_external_data(src))


def _drop_cast_round_trips(model: onnx.ModelProto) -> None:
    """The converter casts every island node's output to float16 and back to float32 for the next island
    node (x^2 would overflow on the way); read the float32 tensor directly instead."""
    nodes = list(model.graph.node)
    produced_by = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rename, dropped = {}, set()
    for node in nodes:
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        half = produced_by.get(node.input[0])
        if half is None or half.op_type != "Cast" or _cast_to(half) != onnx.TensorProto.FLOAT16:
            continue
        source = produced_by.get(half.input[0])
        if source is None or source.name in dropped or node.output[0] in outputs:
            continue
        if source.op_type == "Cast" or half.input[0] in outputs:
            continue
        rename[node.output[0]] = half.input[0]
        dropped.add(node.name)
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    used = {i for n in model.graph.node for i in n.input} | outputs
    for node in nodes:
        if node.name in dropped or (node.op_type == "Cast" and node.output[0] not in used):
            model.graph.node.remove(node)


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _sort_topologically(model: onnx.ModelProto) -> None:
    """Nodes in an order where each input is made before it is read (the converter appends its Casts;
    TensorRT's parser reads nodes in file order)."""
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        still = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            raise ExportError(f"the fp16 graph has a cycle or a missing input at {still[0].name}")
        pending = still
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _opset(model: onnx.ModelProto) -> onnx.ModelProto:
    int4 = any(a.name == "block_size" for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, OPSET_INT4 if int4 else OPSET)
    if int4:
        model.ir_version = max(model.ir_version, IR_VERSION_INT4)
    return model


def weight_only(graph: GraphWeights, bits: dict[str, int], block: int) -> tuple[dict, int]:
    """Replace each weight MatMul's initializer named in `bits` (MatMul name -> 4 or 8) by INT4 blocks along K
    (`block`; INT8 per channel where K is not a multiple of it) or INT8 per output channel, and a
    DequantizeLinear that makes the weight. Returns the deferred initializers (each weight read, with its AWQ
    factors, and quantized as it is written) and how many became INT4."""
    deferred, int4 = {}, 0
    pairs = Pairs()
    nodes = graph.model.graph.node
    for node in ort_quant._weight_matmuls(graph.model):
        if node.name not in bits:
            continue
        name = node.input[1]
        k, n = graph.shape(name)
        four = bits[node.name] == 4 and k % block == 0

        def quantized(name=name, four=four):
            return _weight_only(graph.array(name).astype(np.float32, copy=False), four, block)

        if four:
            int4 += 1
            q_type, scale_dims, attrs = TensorProto.INT4, [k // block, n], dict(axis=0, block_size=block)
        else:
            q_type, scale_dims, attrs = TensorProto.INT8, [n], dict(axis=1)
        graph.model.graph.initializer.remove(graph.inits[name])
        graph.model.graph.initializer.extend([TensorProto(name=name + "_quantized", data_type=q_type, dims=[k, n]),
                                              TensorProto(name=name + "_scale", data_type=TensorProto.FLOAT,
                                                          dims=scale_dims)])
        deferred[name + "_quantized"], deferred[name + "_scale"] = pairs.deferred(name, quantized)
        nodes.insert(0, helper.make_node("DequantizeLinear", [name + "_quantized", name + "_scale"], [name],
                                         name=node.name + "_weight_dq", **attrs))
    return deferred, int4


def _weight_only(w: np.ndarray, four: bool, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(the weight's stored bytes: INT4 packed two to a byte, or INT8; its float32 scales)."""
    if four:
        q, scale = ort_quant.int4_blocks(w, block)
        packed = numpy_helper.from_array(q.reshape(w.shape).astype(_int4()), "q").raw_data
        return np.frombuffer(packed, dtype=np.uint8), scale[:, 0, :].astype(np.float32)
    scale = np.abs(w).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _int4():
    import ml_dtypes  # what onnx's numpy_helper packs into INT4 tensors

    return ml_dtypes.int4


def quantize_decoder(src: Path, dst: Path, precision: str, options: QuantOptions, stats, vocab: int,
                     fp16: bool = True) -> dict:
    """Weight-only INT8 or INT4 (+ activation-aware scales) on the fp16 decoder (float32 compute where not
    `fp16`: what OpenVINO's conversion makes compressed weights of), one weight at a time."""
    graph = GraphWeights(src)
    ort_quant._name_nodes(graph.model)
    matmuls = ort_quant._weight_matmuls(graph.model)
    heads = ort_quant.lm_heads(graph.model, matmuls, vocab)
    awq = {}
    if precision == "int4" and options.int4_method == "awq":
        awq = ort_quant.apply_awq(graph, matmuls, heads, options.int4_block_size, stats)
    wide = 8 if precision == "int8" else 4
    deferred, int4 = weight_only(graph, {n.name: 8 if n.name in heads else wide for n in matmuls},
                                 options.int4_block_size)
    if fp16:
        deferred = to_fp16(graph, deferred)
    else:
        _opset(graph.model)
    graph.write(dst, deferred, external=ort_quant._has_external_data(src))
    compute = "fp16 compute" if fp16 else "float32 compute"
    if precision == "int8":
        return {"scheme": f"int8 weight-only (per-channel DequantizeLinear), {compute}", "matmuls": len(matmuls)}
    scales = "fp16 scales" if fp16 else "float32 scales"
    return {"scheme": f"int4 weight-only (block-quantized DequantizeLinear, block {options.int4_block_size}, "
                      f"{scales}), LM head int8 per channel, {compute}",
            "int4_method": options.int4_method, "int4_matmuls": int4, **awq}


def quantize_graph(part, precision, src, dst, options, feeds, stats) -> dict:
    if precision == "fp16":
        fp16_file(src, dst)
        return {"scheme": "fp16 weights and compute, fp32 islands (norm variance, softmax), fp32 inputs and outputs"}
    if part == "decoder":
        return quantize_decoder(src, dst, precision, options, stats, ort_quant._lm_head_vocab(src))
    # vision encoder, projector (the embedding table is never int8 here: calibration/plan.py TARGET_LIMITS)
    int8 = dst.with_name(".int8-" + dst.name)
    try:
        report = ort_quant.quantize_static_int8(src, int8, feeds[part], options.calib_method,
                                                symmetric=SYMMETRIC_INT8)
        fp16_file(int8, dst)
    finally:
        for path in ort_quant.graph_files(int8):
            path.unlink(missing_ok=True)
    return {**report, "scheme": report["scheme"] + "; fp16 elsewhere"}
