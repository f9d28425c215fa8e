"""NNCF quantizers for the OpenVINO target (driven by calibration/package.py).

Fed by the same calibration samples and the same recording through the
runtime pipeline as the ONNX Runtime target:

- vision encoder, projector: static INT8 (nncf.quantize: activations and
  weights) on their recorded inputs; the vision encoder as a transformer
  (NNCF keeps normalisations and softmax in float);
- embedding table and decoder INT8: INT8 weight compression (asymmetric,
  per output channel), activations stay float;
- decoder INT4: INT4 weight compression (symmetric, group size
  --int4-block-size; --int4-ratio of the layers, the rest INT8, NNCF
  ranking them by sensitivity, default 1.0: every layer) with NNCF's AWQ and scale
  estimation on the decoder inputs recorded during prefill and cached decode
  steps (--int4-method awq), or data-free round-to-nearest (rtn); NNCF keeps
  the LM head in INT8;
- fp16: weights stored in float16.

A big decoder (exporters/openvino_target.py: its float32 graph over
BIG_DECODER_BYTES, bound for INT8/INT4) is staged as ONNX, never compiled by
OpenVINO in float32: calibration and the float32 side of the measurement run
it through ONNX Runtime (memory-mapped weights, no prepacking), its cache held
between calls by `StatefulOnnx` as OpenVINO holds its state; its weights are
quantized by the ONNX quantizer (calibration/tensorrt.py's DequantizeLinear
weights with the activation-aware scales of calibration/onnxruntime.py, float32
compute), one weight at a time, and that graph converted to IR, where the CPU
plugin keeps INT4 blocks and INT8 channels compressed. NNCF's compression would
compile the whole float32 decoder to collect its statistics (PaliGemma-3B:
14.6 GiB anonymous, 10.7 min).

A big vision encoder or projector bound for static INT8 (its float32 graph over
exporters/openvino_target.STATIC_INT8_ONNX_BYTES) is staged as ONNX too:
calibration runs it through ONNX Runtime with its MinMax ranges measured in
that pass (calibration/onnxruntime.RangeProbe), the ONNX quantizer makes it
static INT8 QuantizeLinear/DequantizeLinear (the onnxruntime target's scheme),
and that graph is converted to IR and checked against it. NNCF's two statistics
passes over the float32 graph took Qwen2.5-VL-3B's vision encoder 7.9 min.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mmedge.calibration import onnxruntime as ort_quant
from mmedge.calibration.package import SEVEN_BIT_WEIGHTS, QuantOptions, Recorder
from mmedge.errors import ExportError
from mmedge.exporters.openvino_target import STATIC_INT8_PARTS, convert, converted_from, staged_source  # noqa: F401

MAX_DECODER_STEPS = 256  # recorded decoder calls kept for the data-aware INT4 compression
CPU_ACTIVATION_GROUP = 32  # OpenVINO's CPU default for DYNAMIC_QUANTIZATION_GROUP_SIZE


def graph_files(path: Path) -> list[Path]:
    if path.suffix == ".onnx":  # a big decoder (and the embedding beside it) staged as ONNX until quantized
        return ort_quant.graph_files(path)
    return [path, path.with_suffix(".bin")]


class StatefulOnnx:
    """An ONNX decoder with explicit past inputs and past + new present outputs, run as OpenVINO runs its stateful
    IR: the caller feeds the new tokens only; the presents are kept and fed back as the next call's past."""

    def __init__(self, graph):
        self.graph, self.past = graph, {}
        shapes = {i.name: i.shape for i in graph.session.get_inputs()}  # past: [batch, kv_heads, past, head_dim]
        self.empty = {name: (shape[1], shape[3]) for name, shape in shapes.items() if name.startswith("past.")}

    @classmethod
    def open(cls, path: Path):
        """`path` through ONNX Runtime, its weights memory-mapped (no prepacked copy); a graph without past inputs
        as it is."""
        from mmedge.runtimes.backends import get_backend

        graph = get_backend("onnxruntime", model_cache=False, low_memory=True).load(path)
        return cls(graph) if any(n.startswith("past.") for n in graph.input_names) else graph

    def reset_state(self) -> None:
        self.past = {}

    def truncate_state(self, length: int) -> None:
        self.past = {name: np.ascontiguousarray(v[:, :, :length]) for name, v in self.past.items()}

    def run(self, inputs: dict[str, np.ndarray], into=None) -> dict[str, np.ndarray]:
        batch = (inputs["inputs_embeds"] if "inputs_embeds" in inputs else next(iter(inputs.values()))).shape[0]
        feeds = dict(inputs)
        for name, (heads, dim) in self.empty.items():
            feeds[name] = self.past.get(name, np.zeros((batch, heads, 0, dim), np.float32))
        out = self.graph.run(feeds)
        self.past = {name: out.pop(name.replace("past.", "present.", 1)) for name in self.empty}
        for name, target in (into or {}).items():
            np.copyto(target, out.pop(name))
        return out


def load_graph(engine, path: Path, manifest):
    """`path` on the package's engine, or, staged as ONNX (a big decoder and its embedding), through ONNX Runtime
    (StatefulOnnx)."""
    return StatefulOnnx.open(path) if path.suffix == ".onnx" else engine.load(path)


def check_conversion(onnx_path: Path, ir_path: Path, rtol: float = 1e-3) -> dict:
    """The converted decoder IR in OpenVINO against the ONNX graph it was made from in ONNX Runtime, on the same
    random prefill of 6 tokens and 2 cached steps: the logits each step (its weights compressed the same way, the
    plugin's int8 activations off). An ExportError where they differ by more than rtol x max(1, |reference|)."""
    import onnx
    import openvino as ov

    from mmedge.runtimes.backends import default_threads

    inputs = [i for i in onnx.load(str(onnx_path), load_external_data=False).graph.input
              if not i.name.startswith("past.")]
    config = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if default_threads():
        config["INFERENCE_NUM_THREADS"] = default_threads()
    rng = np.random.default_rng(0)
    steps, done = [], 0
    for n in (6, 1, 1):
        sizes = {"batch": 1, "seq": n, "total_len": done + n}  # exporters/openvino_target.CHECKED_DIMS
        feeds = {}
        for tensor in inputs:
            shape = [sizes[d.dim_param] if d.dim_param else d.dim_value for d in tensor.type.tensor_type.shape.dim]
            if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.type.tensor_type.elem_type), np.integer):
                feeds[tensor.name] = np.broadcast_to(np.arange(done, done + n, dtype=np.int64), shape).copy()
            elif "mask" in tensor.name:  # every position visible: the same for both engines
                feeds[tensor.name] = np.zeros(shape, np.float32)
            else:
                feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
        steps.append(feeds)
        done += n
    wanted, pieces = _reference_logits(onnx_path, steps)  # first, and let go: not beside the compiled IR
    request = ov.Core().compile_model(str(ir_path), "CPU", config).create_infer_request()
    worst = {"max_abs_err": 0.0, "max_abs_ref": 0.0}
    for feeds, want in zip(steps, wanted):
        got = request.infer(feeds)
        got = next(got[port] for port in request.model_outputs if "logits" in port.get_names())
        worst = {"max_abs_err": max(worst["max_abs_err"], float(np.abs(got - want).max())),
                 "max_abs_ref": max(worst["max_abs_ref"], float(np.abs(want).max()))}
    if worst["max_abs_err"] > rtol * max(1.0, worst["max_abs_ref"]):
        raise ExportError(f"the decoder converted to OpenVINO does not match its quantized ONNX graph: logits max abs "
                          f"error {worst['max_abs_err']:.3g} (tolerance {rtol} x max(1, |ref|)); nothing was written")
    return {**worst, "rtol": rtol, "passed": True, **({"pieces": pieces} if pieces else {})}


def _reference_logits(onnx_path: Path, steps: list[dict]) -> tuple[list[np.ndarray], int]:
    """The ONNX decoder's logits for `steps` (one sequence, each step's past the state the steps before left) through
    ONNX Runtime, and the number of pieces it ran in (0: whole). A big one runs a few layers at a time (layered.py):
    ONNX Runtime turns DequantizeLinear weights into float32 as a session opens (Qwen2.5-VL-3B's INT8 decoder whole:
    9 GiB anonymous, 12.03 GiB RSS with the IR compiled beside it), so each piece holds about a quarter of
    PIECE_BYTES of quantized weights."""
    from mmedge.calibration import layered
    from mmedge.calibration.package import big_decoder
    from mmedge.manifest import KVCacheSpec
    from mmedge.runtimes.backends import get_backend

    if not big_decoder(onnx_path):
        reference = StatefulOnnx.open(onnx_path)
        return [reference.run(feeds)["logits"] for feeds in steps], 0
    import onnx

    pasts = [[d.dim_value for d in i.type.tensor_type.shape.dim]
             for i in onnx.load(str(onnx_path), load_external_data=False).graph.input if i.name.startswith("past.")]
    spec = KVCacheSpec(num_layers=len(pasts) // 2, num_kv_heads=pasts[0][1], head_dim=pasts[0][3], dtype="float32",
                       max_context=0, storage="state")  # (a state's length is what its steps make it)
    load = get_backend("onnxruntime", model_cache=False, low_memory=True).load
    pieces = layered.split(onnx_path, budget=layered.PIECE_BYTES // 4)
    try:
        wanted: list = [None] * len(steps)

        def take(s, t, out):  # (a piece that makes only presents hands those in too)
            if "logits" in out:
                wanted[t] = out["logits"]

        layered.replay(pieces, [steps], load, spec, take, progress=False)
    finally:
        layered.remove(pieces)
    return wanted, len(pieces)


class _CappedRecorder(Recorder):
    """Keeps the first MAX_DECODER_STEPS decoder calls.

    For a stateful decoder each recorded call also says whether the state was
    reset before it (NNCF's reset flag), so NNCF replays the recorded
    sequences with the same cache contents the runtime had.
    """

    def __init__(self, graph):
        super().__init__(graph)
        self.reset_before = False
        if callable(getattr(graph, "reset_state", None)):
            self.reset_state = self._reset_state

    def _reset_state(self):
        self.graph.reset_state()
        self.reset_before = True

    def run(self, inputs, into=None):
        self.keep = len(self.feeds) < MAX_DECODER_STEPS
        out = super().run(inputs, into=into)
        if self.keep and "reset_state" in vars(self):
            from nncf.definitions import NNCF_DATASET_RESET_STATE_KEY

            self.feeds[-1][NNCF_DATASET_RESET_STATE_KEY] = self.reset_before
        self.reset_before = False
        return out


def decoder_capture(work: Path, decoder: Path, plan: dict, options: QuantOptions):
    if decoder.suffix == ".onnx":  # staged as ONNX: its MatMul inputs' statistics, as for onnxruntime
        if plan["decoder"] == "int4" and options.int4_ratio != 1.0:  # before calibration, not after it
            raise ExportError(f"--int4-ratio {options.int4_ratio} needs NNCF's compression of the whole float32 "
                              "decoder, which a decoder this big does not get here (it would hold ~2x its float32 "
                              "size in memory); leave --int4-ratio at 1.0")
        return ort_quant.decoder_capture(work, decoder, plan, options)
    if plan["decoder"] != "int4" or options.int4_method != "awq":
        return None
    return decoder, _CappedRecorder


def range_probe(part: str, graph: Path, options):
    """A vision encoder or projector staged as ONNX (exporters/openvino_target.STATIC_INT8_PARTS) has its INT8
    ranges measured as calibration runs it, as on the onnxruntime target; NNCF measures the others itself."""
    return ort_quant.range_probe(part, graph, options) if graph.suffix == ".onnx" else None


def quantize_graph(part, precision, src, dst, options, feeds, decoder_data) -> dict:
    import nncf
    import openvino as ov

    if src.suffix == ".onnx" and part == "decoder":
        return _quantize_onnx_decoder(src, dst, precision, options, decoder_data)
    if src.suffix == ".onnx" and part in STATIC_INT8_PARTS:
        return _quantize_onnx_static(part, src, dst, options, feeds[part])
    model = ov.Core().read_model(str(converted_from(src)))  # (the embedding calibration ran as ONNX: its IR)
    if precision == "fp16":
        ov.save_model(model, str(dst), compress_to_fp16=True)
        return {"scheme": "fp16 weights"}
    # text_encoder: a dual encoder's (CLIP, SigLIP); encoder: an encoder-decoder's (Florence-2)
    if part in ("vision_encoder", "projector", "text_encoder", "encoder"):
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        kind = None if part == "projector" else nncf.ModelType.TRANSFORMER
        # SEVEN_BIT_WEIGHTS: in every layer (NNCF's default overflow fix covers the first only)
        advanced = AdvancedQuantizationParameters(
            overflow_fix=OverflowFix.ENABLE if SEVEN_BIT_WEIGHTS else OverflowFix.FIRST_LAYER)
        # largest first: OpenVINO's CPU plugin sizes a dynamic graph's buffers for the largest input so far and
        # does not give the smaller ones back when a larger one comes (one size, the largest, from the first)
        samples = sorted(feeds[part], key=lambda feed: -sum(np.asarray(v).nbytes for v in feed.values()))
        with _statistics_run_as_they_come(model):
            quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples), model_type=kind,
                                      advanced_parameters=advanced)
        ov.save_model(quantized, str(dst), compress_to_fp16=False)
        weights = "weights in 7 bits" if SEVEN_BIT_WEIGHTS else "weights"
        return {"scheme": f"int8 static (nncf.quantize): activations and {weights}",
                "calibration_batches": len(feeds[part])}
    if precision == "int8":
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        group = set_activation_group(compressed)
        ov.save_model(compressed, str(dst), compress_to_fp16=False)
        report = {"scheme": "int8 weight compression (asymmetric, per channel)"}
        return {**report, "activation_group": group} if group else report
    data_aware = options.int4_method == "awq"
    kwargs = {}
    if data_aware:
        kwargs = dict(dataset=nncf.Dataset(decoder_data.feeds), awq=True, scale_estimation=True,
                      subset_size=len(decoder_data.feeds))
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    # a layer whose input size the group size does not divide gets the largest group size that does (>= 8)
    advanced = AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST,
                                             min_adjusted_group_size=8)
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM,
                                       group_size=options.int4_block_size, ratio=options.int4_ratio,
                                       advanced_parameters=advanced,
                                       **kwargs)
    group = set_activation_group(compressed)
    ov.save_model(compressed, str(dst), compress_to_fp16=False)
    share = "" if options.int4_ratio == 1.0 else f", {options.int4_ratio:.0%} of layers (the rest int8)"
    report = {"scheme": f"int4 weight compression (symmetric, group {options.int4_block_size}{share}); LM head int8",
              "int4_method": options.int4_method, "activation_group": group}
    if data_aware:
        report["decoder_calibration_steps"] = len(decoder_data.feeds)
    return report


@contextmanager
def _statistics_run_as_they_come(graph):
    """NNCF's statistics graphs, with their reductions placed so OpenVINO runs each right after the tensor it reads.

    NNCF collects activation statistics by compiling the graph with a reduction (min, max, abs max) on every
    tensor it measures, each its own output, appended after the graph's own outputs. OpenVINO's CPU plugin orders
    the nodes from the outputs in their order: the graph's own output first, so the whole graph runs, then the
    reductions, and every measured tensor is held until the end. Qwen2.5-VL-3B's vision encoder on a 4,900-patch
    image: 10 GiB more than the plain graph's run (128 reductions; 5.9 -> 15.6 GiB RSS), which killed its
    OpenVINO INT4 export at 23 GiB. With the reductions' outputs listed first, in the order the graph makes what
    they measure, the plugin runs each as soon as its tensor is made (5.9 GiB, as the plain graph; NNCF's two
    statistics passes there 15.3 and 19.0 -> 6.2 and 8.7 GiB). The same statistics: the quantized graph is the same
    byte for byte. `graph` is the model NNCF was given (its outputs and nodes tell NNCF's from its own); a graph
    with state (a decoder's) is left as NNCF builds it."""
    import openvino as ov

    from nncf.openvino import engine

    own_outputs = {n for port in graph.outputs for n in port.get_names()}
    graph_ops = {op.get_friendly_name() for op in graph.get_ordered_ops()}
    build = engine.OVNativeEngine.__init__

    def reordered(self, model, *args, **kwargs):
        results = list(model.get_results())
        own = [bool(r.get_output_tensor(0).get_names() & own_outputs) for r in results]
        if any(own) and not all(own) and not model.get_sinks():
            order = {op.get_friendly_name(): i for i, op in enumerate(model.get_ordered_ops())}

            def measured(result):  # where the tensor a reduction reads is made: up its data inputs to the graph's
                node = result.input_value(0).get_node()
                while node.get_friendly_name() not in graph_ops and node.get_input_size():
                    node = node.input_value(0).get_node()
                return order.get(node.get_friendly_name(), len(order))

            # the reductions first, in the order of what they measure; the graph's own outputs after, as they were
            ranked = sorted(zip(own, results), key=lambda pair: (1, 0) if pair[0] else (0, measured(pair[1])))
            model = ov.Model([r for _, r in ranked], model.get_parameters(), model.friendly_name)
        build(self, model, *args, **kwargs)

    engine.OVNativeEngine.__init__ = reordered
    try:
        yield
    finally:
        engine.OVNativeEngine.__init__ = build


# the converted INT8 graph's error against float32, relative L2 over one calibration input, may be this much more than
# the quantized ONNX graph's: OpenVINO's CPU plugin runs the QuantizeLinear/DequantizeLinear pairs as its own INT8
# kernels, which round their rescaling another way (the two land apart by about as much as either is from float32),
# while a scale lost or negated in conversion takes the output far from float32
STATIC_CONVERSION_SLACK = 1.5


def _quantize_onnx_static(part: str, src: Path, dst: Path, options: QuantOptions, feeds: list[dict]) -> dict:
    """A big vision encoder or projector staged as ONNX: static INT8 QuantizeLinear/DequantizeLinear by the ONNX
    quantizer (its ranges measured as calibration ran it), converted to IR, and checked against that graph."""
    quantized = dst.with_name(".quantized-" + src.name)
    try:
        report = ort_quant.quantize_static_int8(src, quantized, feeds, options.calib_method)
        convert(quantized, dst, part, stateful=False)
        # the smallest calibration input: the check is of the conversion, which any input shows, and it runs the
        # graph three times (Qwen2.5-VL-3B's calibration images are up to 4,900 patches)
        smallest = min(feeds, key=lambda feed: sum(value.size for value in feed.values()))
        report["conversion_check"] = check_static_conversion(part, src, quantized, dst, smallest)
    finally:
        for path in ort_quant.graph_files(quantized):
            path.unlink(missing_ok=True)
    report["scheme"] += "; ONNX QuantizeLinear/DequantizeLinear converted to OpenVINO, run in INT8"
    return report


def check_static_conversion(part: str, fp32: Path, onnx_path: Path, ir_path: Path, feeds: dict,
                            slack: float = STATIC_CONVERSION_SLACK) -> dict:
    """The converted INT8 IR in OpenVINO against float32 (`fp32`, the ONNX graph quantized) on one calibration
    input, beside the quantized ONNX graph it was made from, in ONNX Runtime: the relative L2 error of each output
    from float32. An ExportError where the IR's is over `slack` times the ONNX graph's (+ 0.01)."""
    import openvino as ov

    from mmedge.runtimes.backends import default_threads, get_backend

    onnxruntime = get_backend("onnxruntime", model_cache=False, low_memory=True)
    want = onnxruntime.load(fp32).run(feeds)
    want = {name: np.array(value, copy=True) for name, value in want.items()}
    qdq = onnxruntime.load(onnx_path).run(feeds)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if default_threads():
        config["INFERENCE_NUM_THREADS"] = default_threads()
    request = ov.Core().compile_model(str(ir_path), "CPU", config).create_infer_request()
    result = request.infer(feeds)

    def rel(got, ref):
        return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))

    ir_err = onnx_err = 0.0
    for port in request.model_outputs:
        name = next((n for n in port.get_names() if n in want), None)
        if name is not None:
            ir_err, onnx_err = max(ir_err, rel(result[port], want[name])), max(onnx_err, rel(qdq[name], want[name]))
    if ir_err > slack * onnx_err + 0.01:
        raise ExportError(f"the {part} converted to OpenVINO does not match its quantized ONNX graph: relative L2 "
                          f"error from float32 {ir_err:.3g}, the ONNX graph's {onnx_err:.3g} (at most {slack} x that "
                          "+ 0.01); nothing was written")
    return {"rel_l2_err": ir_err, "onnx_rel_l2_err": onnx_err, "slack": slack, "passed": True}


def _quantize_onnx_decoder(src: Path, dst: Path, precision: str, options: QuantOptions, stats) -> dict:
    """A big decoder staged as ONNX: its weights quantized in the ONNX graph, one at a time (INT4 blocks along the
    input axis with activation-aware scales, INT8 per output channel, the LM head INT8), then converted to IR."""
    from mmedge.calibration import tensorrt as dq_quant

    quantized = dst.with_name(".quantized-" + src.name)
    groups = []
    try:
        report = dq_quant.quantize_decoder(src, quantized, precision, options, stats, ort_quant._lm_head_vocab(src),
                                           fp16=False)
        convert(quantized, dst, "decoder", stateful=True,
                finish=lambda model: groups.append(set_activation_group(model, input_axis_first=True)))
        report["conversion_check"] = check_conversion(quantized, dst)
    finally:
        for path in ort_quant.graph_files(quantized):
            path.unlink(missing_ok=True)
    report["scheme"] += "; ONNX DequantizeLinear weights converted to OpenVINO's compressed weights"
    return {**report, "activation_group": groups[0]} if groups[0] else report


def set_activation_group(model, input_axis_first: bool = False) -> int | None:
    """How many activations OpenVINO's CPU plugin quantizes to int8 together (one scale) when it multiplies
    them with these compressed weights; written into the graph as a runtime option, where OpenVINO reads it
    when it compiles (a setting given at load still wins). None where no compressed weight is multiplied.

    The plugin's default, 32, serves any weights; a group must divide every weight's group (an int4 weight's
    group size; an int8 weight is per output channel, so its whole input width), or the plugin computes that
    layer without int8 activations. Taking the largest such group cut Qwen2-VL-2B's prefill of 122 tokens by a
    quarter (int4 groups of 128: 867 -> 638 ms; int8: 876 -> 673 ms at 256), decode unchanged
    (docs/performance.md). Below the default (a layer whose width forced a smaller group) the default stays.
    """
    import math

    import openvino as ov

    def into_matmul(node, depth=6) -> bool:  # through the decompression: Convert, Subtract, Multiply, Reshape
        for target in node.output(0).get_target_inputs():
            user = target.get_node()
            kind = user.get_type_name()
            if kind == "MatMul" or (depth and kind in ("Convert", "Subtract", "Multiply", "Reshape")
                                    and into_matmul(user, depth - 1)):
                return True
        return False

    groups = []
    for op in model.get_ordered_ops():
        if (op.get_type_name() != "Constant" or op.get_output_partial_shape(0).is_dynamic
                or op.get_element_type() not in (ov.Type.i4, ov.Type.u4, ov.Type.i8, ov.Type.u8)
                or not into_matmul(op)):  # an embedding table is gathered from, not multiplied
            continue
        shape = list(op.get_output_shape(0))
        kind = op.get_element_type()
        # weights only (zero points and scales have a dimension of 1): NNCF's int4 [out, groups, group] and int8
        # [out, in]; converted from ONNX DequantizeLinear weights (input_axis_first): [groups, group, out], [in, out]
        if kind in (ov.Type.i4, ov.Type.u4) and len(shape) == 3:
            groups.append(shape[1] if input_axis_first else shape[2])
        elif kind in (ov.Type.i8, ov.Type.u8) and len(shape) == 2:
            groups.append(shape[0] if input_axis_first else shape[1])
        if groups and groups[-1] == 1:
            groups.pop()
    if not groups:
        return None  # no compressed weight is multiplied (an embedding table)
    group = math.gcd(*groups)
    if group <= CPU_ACTIVATION_GROUP:
        return CPU_ACTIVATION_GROUP
    model.set_rt_info(str(group), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    return group
