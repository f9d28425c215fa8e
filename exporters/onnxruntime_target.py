"""Target `onnxruntime`: torch parts -> ONNX graphs (torch.export based), verified in ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from mmedge.errors import ExportError, first_line
from mmedge.exporters import encoder_attention, lazy, repeat_layers, trace_cache
from mmedge.exporters.graphs import GraphJob
from mmedge.manifest import TensorSpec

log = logging.getLogger(__name__)

OPSET = 18
DERIVED_DIMS = {"total_len"}  # sizes that follow from others; torch.export infers them
# a graph whose weights pass this keeps them beside it in <file>.data (and any past protobuf's 2 GB must):
# ONNX Runtime memory-maps that file instead of parsing the weights out of the protobuf and copying them. A
# 538 MB fp32 decoder's session opened in 0.66 s instead of 1.34 s, its load-time peak 679 MB instead of 694;
# without prepacking (low_memory) in 0.03 s, its weights paged in as they are first read
EXTERNAL_DATA_BYTES = 64 << 20
LAZY_WEIGHTS = True  # traced from ONNX graphs whose weights are read from the checkpoint as they are written


def export_graph(job: GraphJob, path: Path) -> None:
    """The onnxruntime target's graph of `job` at `path`: its trace (`trace_graph`), where it is no decoder and
    computes in float32, with each unmasked attention as ONNX Runtime's MultiHeadAttention (flash attention on
    CPU: exporters/encoder_attention.py)."""
    trace_graph(job, path)
    if job.kv_storage is not None or job.precision == "fp16":  # (CPU MultiHeadAttention: float32 only)
        return
    model = onnx.load(str(path), load_external_data=False)  # the weights of a big graph stay in its data file
    fused = encoder_attention.fuse(model)
    if fused:
        temporary = path.with_name(f".fused-{path.name}")  # beside it: the data file's relative path holds
        onnx.save_model(model, str(temporary))
        temporary.replace(path)
        log.info("%s: %d attentions as MultiHeadAttention", job.name, fused)


def trace_graph(job: GraphJob, path: Path) -> None:
    """Trace `job.module` (or build it: the in-place decoder) and write `path` (weights external over 64 MB): the
    ONNX graph every ONNX-fed target starts from (onnxruntime, tensorrt, openvino)."""
    if job.kv_storage == "in_place":
        model, deferred = job.module.build()
        lazy.write_model(model, deferred, path, external=_weight_bytes(model, deferred) > EXTERNAL_DATA_BYTES)
        return
    if job.kv_storage == "state":
        _past_and_new_from_buffer_trace(job, path)
        return
    dims: dict[str, object] = {}

    def dim(name: str):
        if name in DERIVED_DIMS:
            return torch.export.Dim.AUTO
        return dims.setdefault(name, torch.export.Dim(name))

    dynamic = [{axis: dim(n) for axis, n in job.dynamic_axes.get(name, {}).items()} for name in job.input_names]

    def export(inputs, input_names, output_names):
        try:
            return torch.onnx.export(
                job.module,
                inputs,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=_match_signature(job.module, dynamic[: len(input_names)]),
                opset_version=OPSET,
                dynamo=True,
                optimize=False,  # after its weights are bound: folding must not read placeholders
                verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"tracing {job.name} failed: {first_line(exc)}") from exc

    def trace(dest: Path) -> None:
        with _quiet(), _one_translation_table(), torch.no_grad():
            program = None
            if layers is not None:
                inputs, input_names, output_names = repeat_layers.truncated(job, layers)
                with repeat_layers.first_layers(layers):
                    program = export(inputs, input_names, output_names)
                try:
                    added = repeat_layers.expand(program.model.graph, layers, job.input_names, job.output_names)
                    log.info("%s: %d layers traced, %d nodes repeated for the other %d", job.name,
                             repeat_layers.TRACED, added, job.repeated_layers)
                except repeat_layers.NotRepeatable as why:
                    log.info("%s traced whole: %s", job.name, why)
                    program, job.repeated_layers = None, 0
            if program is None:
                program = export(job.trace_inputs, job.input_names, job.output_names)
            lazy.bind_program(program, job.module)
            with _single_node_rewrites():
                program.optimize()
        save_program(program, dest, job)

    # a deep decoder: its first layers traced, the rest repeated (repeat_layers.py), unless export_jobs asks for it
    # whole
    layers = repeat_layers.plan(job) if not job.trace_whole else None
    job.repeated_layers = layers.count - repeat_layers.TRACED if layers is not None else 0
    trace_cache.cached_trace(job, trace, path, job.trace_cache)
    if path.stat().st_size > EXTERNAL_DATA_BYTES:  # read back inline from a cache an export with a higher limit filled
        save_model(onnx.load(str(path)), path)


def _weight_bytes(model: onnx.ModelProto, deferred: dict) -> int:
    """The float32 bytes of a built graph's initializers, deferred ones included (counted from their shapes)."""
    return sum(4 * int(np.prod(init.dims, dtype=np.int64)) if init.name in deferred else init.ByteSize()
               for init in model.graph.initializer)


def _past_and_new_from_buffer_trace(job: GraphJob, path: Path) -> None:
    """The decoder whose present outputs are past + new (OpenVINO's state), made from the trace of the one that
    returns the new slots only ("buffer"): that graph already joins past and new for attention, one Concat per
    layer and kind, so its present outputs become those Concats. One trace (and one cache entry) serves both
    storages; the result is verified against the "state" module all the same."""
    from mmedge.exporters.graphs import with_kv_storage

    source = with_kv_storage(job, "buffer")
    source.trace_cache = job.trace_cache
    trace_graph(source, path)
    job.repeated_layers = source.repeated_layers
    if getattr(source, "_trace_key", None):  # what is converted from this graph is kept under a key of its own
        job._trace_key = source._trace_key + "|past and new"
    model = onnx.load(str(path), load_external_data=False)  # weights beside a big graph stay where they are
    pasts = [n for n in job.input_names if n.startswith("past.")]
    outputs_past_and_new(model, {p: p.replace("past.", "present.", 1) for p in pasts}, job.name)
    _name_dims(model, job)
    onnx.save_model(model, str(path))


def outputs_past_and_new(model: onnx.ModelProto, pairs: dict[str, str], name: str = "decoder") -> None:
    """Make each present output (the new keys or values) the Concat of its past input and those new ones, which
    the graph computes for attention anyway: the Concat's result takes the output's name, the new slots a name
    of their own."""
    rename: dict[str, str] = {}
    for past, present in pairs.items():
        joins = [n for n in model.graph.node if n.op_type == "Concat" and list(n.input) == [past, present]]
        if len(joins) != 1:
            raise ExportError(f"{name}: expected one Concat of {past} and {present} in the traced graph, found "
                              f"{len(joins)}; export with --kv-cache buffer")
        rename[present] = present + ".new"
        rename[joins[0].output[0]] = present
    for node in model.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    kept = [v for v in model.graph.value_info if v.name not in rename]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def save_program(program, path: Path, job: GraphJob) -> None:
    """Write a traced graph. Its weights are the torch model's own tensors until written: a small graph is
    serialized whole; a big one (past EXTERNAL_DATA_BYTES) has its weights streamed into `<file>.data` tensor by
    tensor, never all copied in memory at once (a 3B decoder would need its size again), and only the small
    graph proto is read back to name its axes."""
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    if weights <= EXTERNAL_DATA_BYTES:
        model = program.model_proto
        _name_dims(model, job)
        save_model(model, path)
        return
    program.save(str(path), external_data=True)  # writes <file>.data beside it
    model = onnx.load(str(path), load_external_data=False)
    _name_dims(model, job)
    onnx.save_model(model, str(path))  # the proto only: its tensors keep pointing at <file>.data


@contextlib.contextmanager
def _single_node_rewrites():
    """torch's ONNXProgram.optimize runs onnxscript's rewrite rules; the one rule whose pattern is two nodes
    (SlicesSplit: two Slices of one tensor into a Split) is matched by a generic matcher that costs far more
    than the rest: Qwen2.5-VL-3B's vision encoder spent 18.6 s of its 63 s trace in it (all 46 rules: 22 s).
    It cannot match a traced graph: its Slices have four inputs, torch.onnx writes five (steps included); it
    matched nothing in the 85 graphs of the 23 test shapes. So it is left out while a traced graph is
    optimized; the other rules run as before. Where onnxscript's internals differ, nothing is changed."""
    try:
        from onnxscript import rewriter

        rules = rewriter._DEFAULT_REWRITE_RULES
        kept = tuple(r for r in rules if len(r._target_pattern.outputs) == 1)
    except (ImportError, AttributeError, TypeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = kept
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


_TABLES: dict = {}  # opset -> torch.onnx's table of aten -> ONNX translations, built once per process


@contextlib.contextmanager
def _one_translation_table():
    """torch.onnx.export builds its table of ONNX translations (torchlib) anew on every call: ~2 s, several
    times per export and hundreds of times in the tests. Called without a custom translation table (as here),
    export only reads the table, so one per opset serves every call. Where torch's internals differ, nothing
    is changed."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry = _registration.ONNXRegistry
        original = registry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, opset_version=OPSET):
        if opset_version not in _TABLES:
            _TABLES[opset_version] = original.__func__(cls, opset_version=opset_version)
        return _TABLES[opset_version]

    registry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry.from_torchlib = original


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model`, its weights in `<file>.data` beside it when they exceed EXTERNAL_DATA_BYTES."""
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    if not big:  # a data file left from an earlier version of this graph (the model was read whole) is stale
        path.with_name(path.name + ".data").unlink(missing_ok=True)


def _match_signature(module: torch.nn.Module, per_input: list) -> tuple:
    """torch.export wants dynamic shapes nested like forward's parameters (*args as one tuple)."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params) and len(per_input) > len(fixed):
        return (*per_input[: len(fixed)], tuple(per_input[len(fixed) :]))
    return tuple(per_input)


def _name_dims(model: onnx.ModelProto, job: GraphJob) -> None:
    """Give every dynamic axis the contract's name (torch.export invents names for derived ones)."""
    axes = {**job.dynamic_axes, **job.output_axes}
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, name in axes.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name


def io_specs(path: Path, job: GraphJob | None = None) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """The graph's inputs and outputs with the contract's axis names (as written into the ONNX)."""
    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        return TensorSpec(dtype, [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim])

    return {v.name: spec(v) for v in model.graph.input}, {v.name: spec(v) for v in model.graph.output}


SUFFIX = ".onnx"
# explicit cache inputs/outputs (ONNX Runtime has no graph state): written in place by a decoder built on
# GroupQueryAttention where the model allows it (the default), else the traced decoder's new slots
KV_STORAGE = ("in_place", "buffer")


def kv_storage(parts, attention: str, requested: str | None) -> str:
    """The cache storage to export: `requested`, or the fastest this decoder allows."""
    from mmedge.exporters import fused_decoder

    why = fused_decoder.supports(parts, attention)
    if requested == "in_place" and why:
        raise ExportError(f"--kv-cache in_place needs a decoder GroupQueryAttention can run, not this one: {why}; "
                          "use --kv-cache buffer")
    if requested:
        return requested
    if why:
        log.info("decoder traced, KV cache as buffers: %s", why)
        return "buffer"
    return "in_place"


def verify_graph(job: GraphJob, path: Path, rtol: float = 1e-3) -> dict:
    """Run the graph in ONNX Runtime on inputs not used for tracing; compare with PyTorch."""
    import onnxruntime as ort

    from mmedge.runtimes.backends import default_threads

    expected = reference_outputs(job)  # before the session: the torch weights and the graph's are not held at once
    if _by_layers(job, path):
        return _verify_by_layers(job, path, rtol, expected)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = default_threads()
    opts.add_session_config_entry("session.disable_prepacking", "1")  # one copy of the weights: the graph's
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if job.kv_storage != "in_place":
        return compare_with_torch(job, lambda feeds: session.run(job.output_names, feeds), rtol, expected)
    from mmedge.runtimes.backends.onnxruntime import OnnxRuntimeGraph

    graph = OnnxRuntimeGraph(session, ort)

    def run_in_place(feeds):  # as the runtime runs it: each present bound to its past buffer (here a copy)
        feeds = {name: value.copy() if name.startswith("past.") else value for name, value in feeds.items()}
        into = {name.replace("past.", "present.", 1): feeds[name] for name in feeds if name.startswith("past.")}
        out = graph.run(feeds, into=into)
        return [into[name] if name in into else out[name] for name in job.output_names]

    return compare_with_torch(job, run_in_place, rtol, expected)


def _by_layers(job: GraphJob, path: Path) -> bool:
    """A big decoder is checked piece by piece (calibration/layered.py): a 3B model's float32 decoder mapped whole
    is 12.3 GB of resident pages."""
    from mmedge.calibration.package import big_decoder

    return job.name == "decoder" and big_decoder(path)


def _verify_by_layers(job: GraphJob, path: Path, rtol: float, expected: list[tuple]) -> dict:
    """verify_graph's check, the graph run a few layers at a time over every check input (the same nodes and
    weights as the whole graph's; at most one piece's weights mapped at once)."""
    from mmedge.calibration import layered
    from mmedge.runtimes.backends import default_threads, get_backend

    cases = [{name: t.numpy() for name, t in zip(job.input_names, inputs)} for inputs in job.check_inputs]
    pieces = layered.split(path, outputs=job.output_names)
    try:
        load = get_backend("onnxruntime", threads=default_threads(), low_memory=True, model_cache=False).load
        results = iter(layered.run_cases(pieces, cases, load, in_place=job.kv_storage == "in_place"))
    finally:
        layered.remove(pieces)

    def run(feeds):  # the check inputs in their order
        out = next(results)
        return [out[name] for name in job.output_names]

    return {**compare_with_torch(job, run, rtol, expected), "pieces": len(pieces)}


def reference_outputs(job: GraphJob) -> list[tuple]:
    """PyTorch's outputs for each of the job's check inputs (weights read module by module where lazy)."""
    out = []
    with torch.no_grad(), lazy.materialized(job.module):
        for inputs in job.check_inputs:
            expected = job.module(*inputs)
            out.append(tuple(expected) if isinstance(expected, (tuple, list)) else (expected,))
    return out


def compare_with_torch(job: GraphJob, run, rtol: float = 1e-3, expected: list[tuple] | None = None) -> dict:
    """Run `run(feeds) -> outputs in job.output_names order` on the job's check inputs and compare with PyTorch
    (`expected`, or computed here by reference_outputs).

    Passes when every output's max abs error <= rtol * max(1, max |reference|).
    """
    worst: dict[str, dict[str, float]] = {}
    for inputs, expected in zip(job.check_inputs, expected or reference_outputs(job)):
        feeds = {name: t.numpy() for name, t in zip(job.input_names, inputs)}
        got = run(feeds)
        for name, ref, out in zip(job.output_names, expected, got):
            ref = ref.numpy()
            if ref.shape != out.shape:
                raise ExportError(f"{job.name} output {name} has shape {out.shape} in ONNX, {ref.shape} in PyTorch")
            err = float(np.max(np.abs(ref - out))) if ref.size else 0.0
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            entry = worst.setdefault(name, {"max_abs_err": 0.0, "max_abs_ref": 0.0})
            entry["max_abs_err"] = max(entry["max_abs_err"], err)
            entry["max_abs_ref"] = max(entry["max_abs_ref"], scale)
    passed = all(e["max_abs_err"] <= rtol * max(1.0, e["max_abs_ref"]) for e in worst.values())
    return {"outputs": worst, "rtol": rtol, "cases": len(job.check_inputs), "passed": passed}


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings of its own; keep the CLI's output ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
