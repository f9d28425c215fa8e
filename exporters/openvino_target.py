"""Target `openvino`: OpenVINO IR (.xml + .bin) per part, converted from the verified ONNX graphs.

Why from ONNX rather than from the torch modules: the ONNX graphs are already
traced with the contract's input/output names and dynamic axes, so one trace
serves both targets and the torch model is held in memory once; OpenVINO's
ONNX frontend keeps the tensor names. Each IR is then verified against
PyTorch on its own, in OpenVINO, on inputs not used for tracing.

The decoder holds its KV cache in one of two forms (`--kv-cache`):
"state" (default): OpenVINO's stateful model. The decoder returns past +
new keys/values (made from the "buffer" trace, whose present outputs become
the Concats of past and new it computes for attention: one trace serves
both storages), is converted, and each past input / present output pair
becomes a state variable (ReadValue/Assign) that starts empty,
sized by the batch of inputs_embeds; nothing of the cache crosses the API
per token. "buffer": explicit cache inputs and outputs, the same contract as
the ONNX Runtime target (the runtime's preallocated buffers). docs/targets.md
has the decode-speed measurement behind the default.

A big decoder bound for INT8/INT4 (its float32 ONNX graph over
calibration/package.BIG_DECODER_BYTES) is converted only once quantized:
OpenVINO's conversion copies a graph's constants and its CPU plugin makes its
own, repacked copy of float32 weights to run them (PaliGemma-3B: ~10 GiB each),
so the float32 decoder is verified, calibrated and measured as ONNX through
ONNX Runtime, its weights memory-mapped, and its quantized ONNX graph
(INT4 blocks / INT8 channels as DequantizeLinear weights) is what becomes the
IR, where the CPU plugin keeps the weights compressed (calibration/openvino.py).

A big vision encoder or projector bound for static INT8 (its float32 graph over
STATIC_INT8_ONNX_BYTES) likewise: NNCF's static quantization compiles the
float32 graph and runs every calibration image through it twice more for its
statistics (Qwen2.5-VL-3B's 2.5 GB vision encoder: 7.9 of its 30.8 minutes).
It is calibrated as ONNX through ONNX Runtime, its MinMax ranges measured in
that same pass, quantized to INT8 QuantizeLinear/DequantizeLinear by the ONNX
quantizer (the onnxruntime target's scheme), and that graph converted, which
OpenVINO's CPU plugin runs in INT8.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mmedge.errors import ExportError, first_line
from mmedge.exporters import onnxruntime_target as onnx_target
from mmedge.exporters import trace_cache
from mmedge.exporters.graphs import GraphJob

SUFFIX = ".xml"
KV_STORAGE = ("state", "buffer")  # the first is the default
ONNX_DIR = ".onnx"  # intermediate ONNX graphs in the staged package, removed by finish() (finalize())
LAZY_WEIGHTS = True  # traced from ONNX graphs whose weights are read from the checkpoint as they are written
# a float decoder is converted and checked whole: the conversion and the CPU plugin each copy its weights (the
# export refuses at once where they clearly do not fit: exporters/resources.py)
COMPILES_FLOAT_DECODER = "OpenVINO"
CONVERSION = "stateful-sdpa-fc"  # how the IR is made from the trace (its trace-cache key): fuse_projections, fuse_attention


def _onnx_path(path: Path) -> Path:
    return path.parent / ONNX_DIR / (path.stem + ".onnx")


def export_graph(job: GraphJob, path: Path) -> None:
    import openvino as ov

    onnx_path = _onnx_path(path)
    onnx_path.parent.mkdir(exist_ok=True)
    onnx_target.trace_graph(job, onnx_path)
    if converted_once_quantized(job, onnx_path):
        path.unlink(missing_ok=True)  # (an IR left by an earlier attempt at this stage)
        return
    trace_cache.converted(job, f"OpenVINO IR|{ov.__version__}|{CONVERSION}",
                          lambda dest: convert(onnx_path, dest, job.name, job.kv_storage == "state"), path)


def convert(onnx_path: Path, dest: Path, name: str, stateful: bool, finish=None) -> None:
    """The ONNX graph as OpenVINO IR at `dest`: projections side by side, and for a decoder that keeps its cache
    as state, its past/present pairs as state variables with the attention OpenVINO fuses over them; `finish`
    (the model) before it is saved."""
    import openvino as ov

    try:
        model = fuse_projections(ov.convert_model(str(onnx_path)))
        if stateful:
            names = [n for port in model.inputs for n in port.get_names()]
            model = fuse_attention(make_stateful(model, _cache_pairs(names)))
        if finish is not None:
            finish(model)
        ov.save_model(model, str(dest), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"OpenVINO could not convert {name}: {first_line(exc)}") from exc


# the dims of a decoder's inputs (but its past) that calibration/openvino.check_conversion knows how to feed
CHECKED_DIMS = {"batch", "seq", "total_len"}


# a vision encoder or projector bound for static INT8 whose float32 graph is bigger is quantized as ONNX, then
# converted (module docstring)
STATIC_INT8_ONNX_BYTES = 1 << 30
STATIC_INT8_PARTS = ("vision_encoder", "projector")


def converted_once_quantized(job: GraphJob, onnx_path: Path) -> bool:
    """Whether this graph stays ONNX until it is quantized: a decoder bound for INT8/INT4 whose float32 weights
    are more than calibration/package.BIG_DECODER_BYTES, or a vision encoder or projector bound for static INT8
    over STATIC_INT8_ONNX_BYTES (module docstring)."""
    from mmedge.calibration import onnxruntime as ort_quant
    from mmedge.calibration.package import big_decoder, graph_bytes

    if job.name in STATIC_INT8_PARTS:
        return job.precision == "int8" and graph_bytes(ort_quant, onnx_path) > STATIC_INT8_ONNX_BYTES
    per_token = all(set(axes.values()) <= CHECKED_DIMS for name, axes in job.dynamic_axes.items()
                    if not name.startswith("past."))  # (not a cross-attention decoder's image keys and values)
    return (job.name == "decoder" and job.precision in ("int8", "int4") and job.kv_storage == "state" and per_token
            and big_decoder(onnx_path))


def staged_source(path: Path) -> Path:
    """The staged float32 graph that calibration runs for manifest path `path`: its ONNX graph where finish() kept
    one (a decoder converted only once quantized, and the embedding beside it), else the IR."""
    return _onnx_path(path) if _onnx_path(path).exists() else path


def converted_from(path: Path) -> Path:
    """The IR converted from the staged ONNX graph `path` (the file itself where it is not ONNX)."""
    return path.parent.parent / (path.stem + SUFFIX) if path.suffix == ".onnx" else path


def _cache_pairs(inputs) -> dict[str, str]:
    """past input -> present output, per layer and kind."""
    past = [n for n in inputs if n.startswith("past.")]
    return dict(zip(past, [n.replace("past.", "present.", 1) for n in past]))


def make_stateful(model, pairs: dict[str, str]):
    """Turn each past input / present output pair into a state variable that starts empty.

    OpenVINO's MakeStateful leaves the variables without an initial value, so
    the first call after a reset would read a tensor of the wrong batch; each
    ReadValue gets a zero-length [batch, kv_heads, 0, head_dim] initializer,
    batch taken from inputs_embeds.
    """
    import numpy as np
    import openvino.opset6 as opset6
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    apply_make_stateful_transformation(model, pairs)
    embeds = next(p for p in model.get_parameters() if "inputs_embeds" in p.get_output_tensor(0).get_names())
    batch = ops.gather(ops.shape_of(embeds, "i64"), ops.constant(np.array([0], np.int64)), ops.constant(np.int64(0)))
    variables = {v.get_info().variable_id: v for v in model.get_variables()}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "ReadValue":
            continue
        variable = variables[node.get_variable_id()]
        info = variable.get_info()
        heads, dim = info.data_shape[1].get_length(), info.data_shape[3].get_length()
        shape = ops.concat([batch, ops.constant(np.array([heads, 0, dim], np.int64))], 0)
        empty = ops.broadcast(ops.constant(np.array(0, info.data_type.to_dtype())), shape)
        node.output(0).replace(opset6.read_value(empty, variable).output(0))
    model.validate_nodes_and_infer_types()
    return model


def fuse_projections(model):
    """Each set of MatMuls that multiply one input by constant weights (a layer's query, key and value
    projections; an MLP's gate and up) as one MatMul over their weights side by side, its output split back.

    One fully connected kernel reads the input once and runs over all the output channels: on a SmolVLM-256M-
    shaped decoder stack at INT4 (group 64, 2 threads) a token took 2.92 ms instead of 3.49. Exact: every output
    channel is the same dot product, and weight compression quantizes per output channel (INT8) or per group of
    one output channel's inputs (INT4), so the compressed weights are the separate layers' side by side. Weights
    already compressed (converted from ONNX DequantizeLinear weights: `_compressed`) are joined the same way, their
    integers and scales side by side.
    """
    import numpy as np
    import openvino.opset13 as ops

    groups: dict[tuple, list] = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul" or node.get_attributes()["transpose_a"]:
            continue
        weight = node.input_value(1).get_node()
        if weight.get_type_name() == "Constant" and len(weight.get_output_partial_shape(0)) == 2:
            kind = weight.get_element_type().get_type_name()
        elif not node.get_attributes()["transpose_b"] and (found := _compressed(weight)):
            kind = "compressed " + found[0].get_element_type().get_type_name()
        else:
            continue
        source = node.input_value(0)
        groups.setdefault((source.get_node().get_instance_id(), source.get_index(),
                           node.get_attributes()["transpose_b"], kind), []).append(node)
    fused = 0
    while groups:  # popped, so that each set's separate weights are let go once it is joined (one copy at a time)
        (_, _, transposed, kind), nodes = groups.popitem()
        if kind.startswith("compressed"):
            joined, sizes = _join_compressed([n.input_value(1).get_node() for n in nodes])
            if joined is None:
                continue
        else:
            inner = 1 if transposed else 0  # the weights' input axis; they are joined on the other
            weights = [n.input_value(1).get_node().get_data() for n in nodes]
            if len(nodes) < 2 or len({w.shape[inner] for w in weights}) > 1:
                continue
            sizes = [w.shape[1 - inner] for w in weights]
            joined = ops.constant(np.concatenate(weights, axis=1 - inner))
            del weights
        matmul = ops.matmul(nodes[0].input_value(0), joined, False, transposed)
        parts = ops.variadic_split(matmul, ops.constant(np.int64(-1)), ops.constant(np.array(sizes, np.int64)))
        for i, node in enumerate(nodes):
            node.output(0).replace(parts.output(i))
        del nodes, node, joined, matmul, parts
        fused += 1
    if fused:
        model.validate_nodes_and_infer_types()
    return model


def _compressed(weight):
    """(integers, scales, the Reshape or None) of a weight OpenVINO's CPU plugin multiplies compressed, as its
    ONNX frontend converts a DequantizeLinear weight: Convert(Constant i4 [groups, group, out] or i8 [in, out])
    -> Multiply(Constant scales over the last axis) [-> Reshape to [in, out]]; None for anything else."""
    reshape = None
    if weight.get_type_name() == "Reshape" and weight.get_output_partial_shape(0).is_static:  # (shape: a Concat)
        reshape, weight = weight, weight.input_value(0).get_node()
    if weight.get_type_name() != "Multiply":
        return None
    convert, scale = (weight.input_value(i).get_node() for i in (0, 1))
    if convert.get_type_name() != "Convert" or scale.get_type_name() != "Constant":
        return None
    integers = convert.input_value(0).get_node()
    if integers.get_type_name() != "Constant" or integers.get_element_type().get_type_name() not in ("i4", "i8"):
        return None
    shape, scales = list(integers.get_output_shape(0)), list(scale.get_output_shape(0))
    if len(shape) != (3 if reshape is not None else 2) or scales[-1] != shape[-1]:
        return None
    return integers, scale, reshape


def _join_compressed(weights) -> tuple:
    """One compressed weight of `weights` side by side on the output axis (the integers' and scales' last): the
    decompression chain over the joined constants and the output sizes; (None, None) where they do not join."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    found = [_compressed(w) for w in weights]
    shapes = [list(q.get_output_shape(0)) for q, _, _ in found]
    four = found[0][0].get_element_type() == ov.Type.i4
    if (len(found) < 2 or len({tuple(s[:-1]) for s in shapes}) > 1 or (four and any(s[-1] % 2 for s in shapes))
            or len({len(sc.get_output_shape(0)) for _, sc, _ in found}) > 1):
        return None, None
    sizes = [s[-1] for s in shapes]
    # int4: two to a byte along the last axis (even widths), so the packed bytes join on their last axis too
    data = [q.get_data().reshape(*s[:-1], -1) for (q, _, _), s in zip(found, shapes)]
    tensor = ov.Tensor(found[0][0].get_element_type(), ov.Shape([*shapes[0][:-1], sum(sizes)]))
    tensor.data[...] = np.concatenate(data, axis=-1).reshape(tensor.data.shape)
    integers = ops.convert(ov.op.Constant(tensor), found[0][1].get_element_type())
    scales = ops.constant(np.concatenate([sc.get_data() for _, sc, _ in found], axis=-1))
    joined = ops.multiply(integers, scales)
    if found[0][2] is not None:
        inner = found[0][2].get_output_shape(0)[0]
        joined = ops.reshape(joined, ops.constant(np.array([inner, sum(sizes)], np.int64)), False)
    return joined, sizes


def fuse_attention(model):
    """Rewrite each layer's traced attention over the state as ScaledDotProductAttention, in the form the CPU
    plugin fuses with the state (its StatefulSDPAFusion): ReadValue -> Gather(beam_idx) -> Concat(past, new)
    -> [GQA: Unsqueeze, Broadcast, Reshape] -> ScaledDotProductAttention, the Concat also feeding the Assign.
    The plugin then keeps each layer's cache inside one attention kernel instead of concatenating it, expanding
    it per query head and running MatMul + Softmax + MatMul every token.

    Traced attention: MatMul(q, k, transpose_b) -> Multiply(scale) -> Add(mask) -> Softmax -> MatMul(., v).
    Layers of another form (Gemma 2's soft-capping) are left as they are. beam_idx, which the pattern
    requires, is computed in the graph (0..batch-1: every row keeps its own cache), so the inputs do not change.
    """
    import numpy as np
    import openvino.opset13 as ops

    def single(node, kind):
        users = [t.get_node() for t in node.output(0).get_target_inputs()]
        return users[0] if len(users) == 1 and users[0].get_type_name() == kind else None

    def constant(output):
        node = output.get_node()
        return node.get_data() if node.get_type_name() == "Constant" else None

    rewritten = 0
    for softmax in [op for op in model.get_ordered_ops() if op.get_type_name() == "Softmax"]:
        add = softmax.input_value(0).get_node()
        mul = add.input_value(0).get_node() if add.get_type_name() == "Add" else None
        qk = mul.input_value(0).get_node() if mul is not None and mul.get_type_name() == "Multiply" else None
        out = single(softmax, "MatMul")
        scale = constant(mul.input_value(1)) if mul is not None else None
        if (qk is None or qk.get_type_name() != "MatMul" or out is None or scale is None or scale.size != 1
                or qk.get_attributes() != {"transpose_a": False, "transpose_b": True}
                or out.get_attributes() != {"transpose_a": False, "transpose_b": False}
                or softmax.get_attributes().get("axis") not in (-1, 3)):
            continue
        sdpa = ops.scaled_dot_product_attention(qk.input_value(0), qk.input_value(1), out.input_value(1),
                                                add.input_value(1), ops.constant(np.float32(scale.reshape(()))),
                                                causal=False)
        out.output(0).replace(sdpa.output(0))
        rewritten += 1
    if not rewritten:
        return model
    embeds = next(p for p in model.get_parameters() if "inputs_embeds" in p.get_output_tensor(0).get_names())
    batch = ops.gather(ops.shape_of(embeds, "i32"), ops.constant(np.int32(0)), ops.constant(np.int32(0)))
    beam_idx = ops.range(ops.constant(np.int32(0)), batch, ops.constant(np.int32(1)), "i32")
    for read in [op for op in model.get_ordered_ops() if op.get_type_name() == "ReadValue"]:
        for target in list(read.output(0).get_target_inputs()):
            if target.get_node().get_type_name() == "Concat":
                target.replace_source_output(ops.gather(read.output(0), beam_idx, ops.constant(np.int32(0))).output(0))
    model.validate_nodes_and_infer_types()
    return model


def io_specs(path: Path, job: GraphJob | None = None):
    """The ONNX graph's specs (OpenVINO keeps the names, ONNX the axis names) for the tensors the IR still has."""
    import openvino as ov

    inputs, outputs = onnx_target.io_specs(_onnx_path(path))
    if not path.exists():  # converted once quantized: a stateful IR keeps no past inputs or present outputs
        state = job is None or job.kv_storage == "state"
        return ({k: v for k, v in inputs.items() if not (state and k.startswith("past."))},
                {k: v for k, v in outputs.items() if not (state and k.startswith("present."))})
    model = ov.Core().read_model(str(path))
    kept_in = {n for p in model.inputs for n in p.get_names()}
    kept_out = {n for p in model.outputs for n in p.get_names()}
    return ({k: v for k, v in inputs.items() if k in kept_in}, {k: v for k, v in outputs.items() if k in kept_out})


def verify_graph(job: GraphJob, path: Path, rtol: float = 1e-3) -> dict:
    """Run the IR in OpenVINO on inputs not used for tracing; compare with PyTorch.

    A stateful decoder gets each case's past through its state variables
    (or starts from a reset, empty state when the past is empty) and is
    checked on its logits and on the state it leaves behind.
    """
    import openvino as ov

    from mmedge.runtimes.backends import default_threads

    if not path.exists():  # converted once quantized: checked as the ONNX graph the IR will be made from
        return {**onnx_target.verify_graph(job, _onnx_path(path), rtol),
                "engine": "onnxruntime (the float32 ONNX graph; OpenVINO runs it once quantized)"}
    expected = onnx_target.reference_outputs(job)  # before compiling: one copy of the weights at a time
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    if default_threads():
        config["INFERENCE_NUM_THREADS"] = default_threads()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    ports = {name: p for p in compiled.outputs for name in p.get_names()}  # a tensor may carry several names
    pairs = _cache_pairs(job.input_names) if job.kv_storage == "state" else {}
    states = {}
    for state in request.query_state():
        past = next(p for p in pairs if state.name == p + pairs[p])  # OpenVINO names a variable input + output
        states[past] = state

    def run(feeds):
        if states:
            request.reset_state()
            for past, state in states.items():
                if feeds[past].shape[2]:
                    state.state = ov.Tensor(feeds[past])
        result = request.infer({k: v for k, v in feeds.items() if k not in pairs})
        got = {name: result[ports[name]].copy() for name in job.output_names if name in ports}
        got.update({pairs[past]: state.state.data.copy() for past, state in states.items()})
        return [got[name] for name in job.output_names]

    return onnx_target.compare_with_torch(job, run, rtol, expected)


def finish(stage: Path) -> None:
    """The intermediate ONNX graphs removed, but for those converted only once quantized, and, beside such a
    decoder, the embedding's too (finalize removes them): calibration and the float32 side of the measurement run
    both through ONNX Runtime, whose Gather reads the rows it needs from the mapped table, where OpenVINO's CPU plugin
    copied PaliGemma-3B's 2.1 GB float32 table when it compiled the IR (+2.0 GiB anonymous, measured)."""
    onnx = list((stage / ONNX_DIR).glob("*.onnx"))
    deferred = {path.stem for path in onnx if not (stage / (path.stem + SUFFIX)).exists()}
    if "decoder" in deferred:
        deferred.add("embed_tokens")
    for path in onnx:
        if path.stem in deferred:
            continue
        for file in (path, path.with_name(path.name + ".data")):
            file.unlink(missing_ok=True)


def finalize(stage: Path, manifest) -> None:
    missing = [g.file for g in manifest.graphs.values() if not (stage / g.file).exists()]
    if missing:  # a graph left to convert once quantized that was not quantized: cannot happen from the CLI
        raise ExportError(f"internal error: {', '.join(missing)} not converted; please report it")
    shutil.rmtree(stage / ONNX_DIR, ignore_errors=True)
