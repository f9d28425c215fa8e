"""Target `coreml`: one ML Program (.mlpackage) per part, the decoder's KV cache held as Core ML state.

Each part's torch module is traced (torch.jit.trace) and converted with
coremltools for iOS 18 / macOS 15, the first deployment target with stateful
models and per-block INT4 weights:

- vision_encoder, projector: batch 1 (1 to tiles + 1 for families that
  split images), float32 I/O.
- embed_tokens: input_ids int32 [1, seq], seq 1..max_context.
- decoder (graphs.StatefulDecoder): inputs_embeds [1, seq, hidden], the
  masks [1, 1, seq, total_len] and position_ids int32 [1, seq] -> logits
  [1, 1, vocab]; seq and total_len are flexible (1..max_context), so one
  model does prefill and decode. Keys and values live in two fp16 states
  (Core ML states are fp16), `key_cache` and `value_cache`, each [layers, 1,
  kv_heads, max_context, head_dim]. The model writes each call's keys and
  values at [total_len - seq, total_len) and attends over [0, total_len):
  the caller's mask says where the new tokens go, and nothing of the cache
  crosses the API. For the runtime this is the "state" contract (as
  OpenVINO's stateful decoder): it tracks the length and starts a new state
  per sequence.

Precision (`--quant`) is set at conversion (fp32 or fp16 compute) and by
weight compression after it (calibration/coreml.py: int8, int4 per block,
palettes). All of it runs on Linux; running the models needs macOS or iOS,
so off macOS the converted models are not run at export (the manifest says
so). What is checked everywhere: the stateful decoder module handed to the
converter against the traced decoder contract in PyTorch, on a prefill and
decode sequence. On macOS every converted model is run against PyTorch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from mmedge.calibration.coreml import quiet
from mmedge.errors import ExportError, first_line
from mmedge.exporters import graphs
from mmedge.exporters.graphs import GraphJob
from mmedge.exporters.onnxruntime_target import compare_with_torch
from mmedge.manifest import Manifest, TensorSpec
from mmedge.runtimes.backends.coreml import array_dtype

log = logging.getLogger(__name__)

SUFFIX = ".mlpackage"
KV_STORAGE = ("state",)
DEPLOYMENT_TARGET = "iOS18"  # = macOS15: states (ct.StateType) and per-block INT4 weights
STATES = ("key_cache", "value_cache")
STATE_DTYPE = "float16"  # the only state type Core ML has
WRAPPER_RTOL = 1e-4  # the stateful wrapper with float32 buffers vs the traced decoder: the same computation
FP16_STATE_RTOL = 2e-2  # ... with the fp16 states Core ML keeps: keys and values rounded to float16
FP16_RTOL = 3e-2  # converted fp16-compute models vs PyTorch (macOS only)
NOT_RUN = "Core ML runs models on macOS and iOS only; converted here, not run"


def import_coremltools():
    """coremltools, or one line saying how to get it."""
    try:
        with quiet():
            import coremltools as ct
    except ImportError:
        raise ExportError("--target coreml needs coremltools: pip install \"mmedge[coreml]\"") from None
    _numpy2_casts()
    return ct


def build_jobs(parts, kv_storage: str, max_context: int, preprocess) -> list[GraphJob]:
    """The shared vision/projector/embedding jobs, and the decoder as a StatefulDecoder over a fixed cache."""
    jobs = {job.name: job for job in graphs.build_jobs(parts, kv_storage="buffer")}
    reference, embed = jobs.pop("decoder"), jobs["embed_tokens"]
    encoder = [jobs["encoder"]] if "encoder" in jobs else []
    vision, projector = jobs.get("vision_encoder"), jobs.get("projector")
    if vision is None:  # an audio family: no vision graphs
        assert parts.encoder_input is not None
    elif parts.patch_grid:  # one image a call, up to the package's max_pixels
        unit = preprocess.merge_size ** 2
        most = preprocess.max_pixels // preprocess.token_pixels() * unit
        # a window holds at least one merged token: never more windows than tokens
        vision.bounds = projector.bounds = {"patches": most, "tokens": most // unit, "windows": most // unit}
    else:
        vision.bounds = projector.bounds = {"batch": preprocess.frames_per_image()}
    source = parts.encoder_length if parts.encoder_input is None else 0  # a prompt encoder's source is tokens too
    embed.bounds = {"batch": 1, "seq": max(max_context, source)}
    for job in encoder:
        job.bounds = {"batch": 1, "source_len": parts.encoder_length} if source else {"batch": 1}
    for job in jobs.values():  # trace and check within the model's fixed or bounded batch
        batch = job.bounds.get("batch")
        if batch:
            job.trace_inputs = tuple(t[:batch] for t in job.trace_inputs)
            job.check_inputs = [c for c in job.check_inputs if c[0].shape[0] <= batch]
    g = torch.Generator().manual_seed(1)
    module = graphs.StatefulDecoder(parts, max_context).eval()
    # a cross-attention decoder's image keys and values: the same for every step of a sequence
    image_kv = {length: graphs._cross_inputs(parts, 1, 1, length, g)[2:] for length in (5, 7)}

    def step(begin: int, n: int, length: int = 7):
        embeds = torch.randn(1, n, parts.hidden_size, generator=g)
        masks = [graphs._mask(1, n, begin, g) for _ in parts.mask_names]
        positions = torch.arange(begin, begin + n)[None] + 1
        if parts.position_rows > 1:
            positions = torch.stack([positions + i for i in range(parts.position_rows)])
        extra = [torch.randn(parts.deepstack_layers, 1, n, parts.hidden_size, generator=g)] if parts.deepstack_layers else []
        if parts.cross_attention:
            extra += [*graphs._cross_inputs(parts, 1, n, length, g)[:2], *image_kv[length]]
        return (embeds, *masks, positions, *extra)

    cross_names = ["cross_mask", "cross_rows", *graphs.cross_names(parts.cross_attention)] \
        if parts.cross_attention else []
    decoder = GraphJob(
        "decoder",
        module,
        ["inputs_embeds", *parts.mask_names, "position_ids", *(["deepstack_embeds"] if parts.deepstack_layers else []),
         *cross_names],
        ["logits"],
        {"inputs_embeds": {1: "seq"}, "position_ids": {parts.position_rows > 1 and 2 or 1: "seq"},
         "deepstack_embeds": {2: "seq"}, "cross_mask": {2: "seq", 3: "cross_len"}, "cross_rows": {2: "seq"},
         **{n: {2: "cross_len"} for n in cross_names[2:]},
         **{m: {2: "seq", 3: "total_len"} for m in parts.mask_names}},
        step(2, 5, 5),
        # one sequence from an empty cache: prefill, a decode step, a second chunk, a decode step
        [step(0, 4), step(4, 1), step(5, 3), step(8, 1)],
        kv_storage="state",
    )
    decoder.bounds = {"batch": 1, "seq": max_context, "total_len": max_context}
    if parts.encoder is not None:  # an encoder-decoder's source, up to its encoder's positions
        decoder.bounds["cross_len"] = parts.encoder_length
    elif parts.cross_attention:  # from a text-only prompt's one position to CROSS_IMAGES images' keys and values
        from mmedge.exporters.tensorrt_target import CROSS_IMAGES

        with torch.no_grad():
            image = projector.module(*[t[:1] for t in projector.trace_inputs])[0].shape[2]
        decoder.bounds["cross_len"] = CROSS_IMAGES * image
    decoder.reference = reference.module
    return [*jobs.values(), decoder]


def export_graph(job: GraphJob, path: Path) -> None:
    ct = import_coremltools()
    stateful = job.kv_storage == "state"
    with torch.no_grad(), quiet():
        if stateful:
            job.module.reset()
        try:
            traced = torch.jit.trace(job.module, job.trace_inputs, check_trace=False)
        except Exception as exc:
            raise ExportError(f"tracing {job.name} failed: {first_line(exc)}") from exc
        finally:
            if stateful:
                job.module.reset()
    job.traced = traced  # verify_graph runs it in PyTorch too: a shape the trace fixed shows up there
    dims = {}  # one RangeDim per named axis, shared by every input that has it
    inputs = [ct.TensorType(name=name, shape=_shape(ct, job, name, tensor, dims), dtype=_dtype(tensor))
              for name, tensor in zip(job.input_names, job.trace_inputs)]
    states = []
    if stateful:
        for name in STATES:
            buffer = getattr(job.module, name)
            states.append(ct.StateType(wrapped_type=ct.TensorType(shape=tuple(buffer.shape), dtype=np.float16),
                                       name=name))
    precision = ct.precision.FLOAT32 if job.precision == "fp32" else ct.precision.FLOAT16

    def convert(dest: Path) -> None:
        try:
            with quiet():
                model = ct.convert(
                    traced,
                    inputs=inputs,
                    outputs=[ct.TensorType(name=name, dtype=np.float32) for name in job.output_names],
                    states=states or None,
                    minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                    compute_precision=precision,
                    convert_to="mlprogram",
                    skip_model_load=True,
                )
                model.save(str(dest))
        except Exception as exc:
            raise ExportError(f"coremltools could not convert {job.name}: {first_line(exc)}") from exc

    # the same module, inputs, bounds and compute precision convert to the same program: with a trace cache,
    # the fp16 / int8 / int4 presets of one model convert it once (compression comes after, per preset)
    from mmedge.exporters import trace_cache

    kind = f"Core ML program|{ct.__version__}|{DEPLOYMENT_TARGET}|{precision}|{sorted(job.bounds.items())}"
    trace_cache.converted(job, kind, convert, path)


def _shape(ct, job: GraphJob, name: str, tensor: torch.Tensor, dims: dict):
    """The trace shape with each named axis fixed (bound 1) or a RangeDim up to its bound (one per name)."""
    shape = list(tensor.shape)
    for axis, dim in job.dynamic_axes.get(name, {}).items():
        upper = job.bounds[dim]
        if upper == 1:
            shape[axis] = 1
        else:
            shape[axis] = dims.setdefault(dim, ct.RangeDim(lower_bound=1, upper_bound=upper, default=1))
    return tuple(shape)


def _dtype(tensor: torch.Tensor):
    return np.int32 if not tensor.is_floating_point() else np.float32  # Core ML inputs: no int64


def io_specs(path: Path, job: GraphJob | None = None) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Inputs and outputs as the saved model's description has them, flexible axes named as the contract does."""
    spec = _load_spec(path)
    axes = dict(job.dynamic_axes) if job else {}
    out_axes = _output_axes(job) if job else {}

    bounds = job.bounds if job else {}

    def tensor(feature, named) -> TensorSpec:
        array = feature.type.multiArrayType
        dtype = array_dtype(array).name
        dims: list = list(array.shape)
        for axis, dim in named.get(feature.name, {}).items():
            if axis < len(dims) and bounds.get(dim) != 1:
                dims[axis] = dim
        return TensorSpec(dtype, dims)

    inputs = {f.name: tensor(f, axes) for f in spec.description.input}
    outputs = {f.name: tensor(f, out_axes) for f in spec.description.output}
    if job is not None and any(not o.shape for o in outputs.values()):  # the converter left them unsized
        with torch.no_grad():
            if job.kv_storage == "state":
                job.module.reset()
            got = job.module(*job.trace_inputs)
            if job.kv_storage == "state":
                job.module.reset()
        got = got if isinstance(got, (tuple, list)) else (got,)
        for name, value in zip(job.output_names, got):
            dims = list(value.shape)
            for axis, dim in out_axes.get(name, {}).items():
                dims[axis] = 1 if bounds.get(dim) == 1 else dim
            outputs[name] = TensorSpec(outputs[name].dtype, dims)
    return inputs, outputs


def _output_axes(job: GraphJob) -> dict[str, dict[int, str]]:
    first = job.dynamic_axes.get(job.input_names[0], {})
    return {name: {a: d for a, d in first.items() if a < 2} for name in job.output_names} if job.name != "decoder" \
        else {"logits": {}}


def verify_graph(job: GraphJob, path: Path, rtol: float = 1e-3) -> dict:
    """The stateful decoder module against the traced contract in PyTorch; on macOS each model against PyTorch.

    `passed` is None where Core ML could not run the model (off macOS); the export then
    records why instead of a comparison.
    """
    result: dict = {}
    if job.kv_storage == "state":
        for key, module, tolerance in (("torch_stateful_wrapper", job.module.with_state_dtype(torch.float32), WRAPPER_RTOL),
                                       ("torch_fp16_state", job.module, FP16_STATE_RTOL)):
            check = result[key] = stateful_vs_reference(job, module, tolerance)
            if not check["passed"]:
                return {**result, "passed": False, "outputs": check["outputs"], "rtol": tolerance}
    check = result["torch_traced"] = traced_vs_module(job)
    if not check["passed"]:
        return {**result, "passed": False, "outputs": check["outputs"], "rtol": WRAPPER_RTOL}
    if sys.platform != "darwin":
        return {**result, "passed": None, "not_run": NOT_RUN, "outputs": {}}
    tolerance = rtol if job.precision == "fp32" else FP16_RTOL
    return {**result, **_run_on_core_ml(job, path, tolerance)}


def stateful_vs_reference(job: GraphJob, module, rtol: float) -> dict:
    """Run the check sequence through `module` (a StatefulDecoder) and through the traced decoder contract
    (explicit fp32 past keys/values), from an empty cache; compare the logits."""
    reference = job.reference
    layers, _, heads, _, dim = module.key_cache.shape
    past = [torch.zeros(1, heads, 0, dim) for _ in range(2 * layers)]
    expected = []
    with torch.no_grad():
        for inputs in job.check_inputs:
            logits, *new = reference(*inputs, *past)
            past = [torch.cat([p, n], dim=2) for p, n in zip(past, new)]
            expected.append(logits)
    module.reset()
    steps = iter(expected)
    try:
        return compare_with_torch(_Reference(job, steps), lambda feeds: _outputs(module, job, feeds), rtol)
    finally:
        module.reset()


def traced_vs_module(job: GraphJob) -> dict:
    """The traced module (what the converter read) against the module on the check inputs, in PyTorch: a size
    the trace baked in, or a branch it took once, fails here even where Core ML cannot run."""
    traced, stateful = job.traced, job.kv_storage == "state"

    def reset():
        if stateful:
            job.module.reset()
            traced.key_cache.zero_()
            traced.value_cache.zero_()

    reset()
    try:
        return compare_with_torch(job, lambda feeds: _outputs(traced, job, feeds), WRAPPER_RTOL)
    finally:
        reset()


def _outputs(module, job: GraphJob, feeds: dict) -> list[np.ndarray]:
    """`module` run on numpy feeds (by the job's input names); its outputs as numpy, in order."""
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in job.input_names))
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


class _Reference:
    """A GraphJob stand-in whose module returns the precomputed reference logits, one step per call."""

    def __init__(self, job: GraphJob, steps):
        self.name, self.input_names, self.output_names = job.name, job.input_names, job.output_names
        self.check_inputs, self.steps = job.check_inputs, steps

    def module(self, *inputs):
        return next(self.steps)


def _run_on_core_ml(job: GraphJob, path: Path, rtol: float) -> dict:  # pragma: no cover - macOS only
    import coremltools as ct

    from mmedge.runtimes.backends.coreml import CoreMLDecoder, CoreMLGraph

    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    stateful = job.kv_storage == "state"
    graph = CoreMLDecoder(model) if stateful else CoreMLGraph(model, job.name)  # as the runtime runs it
    if stateful:
        job.module.reset()
    try:
        return compare_with_torch(job, lambda feeds: [graph.run(feeds)[n] for n in job.output_names], rtol)
    finally:
        if stateful:
            job.module.reset()


def needs_calibration(plan: dict[str, str], opts) -> bool:
    """Only the activation-aware INT4 ranges use calibration data; the rest of Core ML's compression is data-free."""
    return plan.get("decoder") == "int4" and opts.int4_method == "awq"


def compress(stage: Path, manifest: Manifest, plan: dict[str, str], opts, jobs: list[GraphJob], calib=None) -> dict:
    """Compress the weights of each graph the plan says (calibration/coreml.py); returns the report."""
    from tqdm.auto import tqdm

    from mmedge.calibration import coreml as cq
    from mmedge.calibration.plan import describe

    plan = {p: plan[p] for p in manifest.graphs}
    report = {"plan": dict(plan), "name": describe(plan), "graphs": {},
              "calibration": {"used": False, "why": "Core ML weight compression is data-free here (coremltools' "
                              "activation-aware schemes run the model, which needs macOS)"}}
    clip = None
    if calib is not None:
        decoder = next(job for job in jobs if job.name == "decoder")
        stats = activation_stats(stage, manifest, jobs, calib, opts.progress)
        clip, errors = int4_clip_ratios(decoder.module, stats, opts.int4_block_size, opts.progress)
        report["calibration"] = {**calib.describe(), "used": True,
                                 "why": "INT4 block ranges chosen on the decoder's recorded inputs (clip search)"}
        report["int4_clip"] = errors
    parts = [p for p in plan if p in manifest.graphs and plan[p] in cq.COMPRESSED]
    for part in tqdm(parts, desc="compress", unit="graph", disable=not opts.progress):
        path = stage / manifest.graphs[part].file
        before = _bytes(path)
        try:
            done = cq.compress(path, plan[part], opts.int4_block_size, clip if part == "decoder" else None)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"compressing {part} to {plan[part]} failed: {first_line(exc)}") from exc
        if part == "decoder" and clip:
            done["method"] = "awq clip search"
        report["graphs"][part] = {"precision": plan[part], **done, "bytes_before": before, "bytes": _bytes(path)}
    for part in manifest.graphs:
        manifest.graphs[part].precision = plan[part]
        size = _bytes(stage / manifest.graphs[part].file)
        compute = "float32 compute" if plan[part] == "fp32" else "float16 compute"
        report["graphs"].setdefault(part, {"precision": plan[part], "scheme": compute, "bytes_before": size,
                                           "bytes": size})
    report["graphs"] = {part: report["graphs"][part] for part in manifest.graphs}
    report["bytes_before"] = sum(g["bytes_before"] for g in report["graphs"].values())
    report["bytes"] = sum(g["bytes"] for g in report["graphs"].values())
    return report


def activation_stats(stage: Path, manifest: Manifest, jobs: list[GraphJob], calib, progress: bool) -> dict:
    """Mean squared input per channel of every linear layer of the decoder, over the calibration samples run
    through the runtime's Pipeline with the torch modules that were converted (decoder cache in float32)."""
    from tqdm.auto import tqdm

    from mmedge.calibration.package import answer
    from mmedge.runtimes.pipeline import Pipeline
    from mmedge.runtimes.text import TextCodec

    graphs = {job.name: TorchGraph(job) for job in jobs}
    decoder = graphs["decoder"]
    decoder.module = decoder.module.with_state_dtype(torch.float32)
    sums: dict[int, list] = {}
    in_decoder = [False]  # layers the decoder shares with another graph (an encoder-decoder's cross-attention
    run = decoder.run     # key/value projections, which the encoder runs) count only the decoder's own calls

    def decoder_run(inputs, into=None):
        in_decoder[0] = True
        try:
            return run(inputs, into)
        finally:
            in_decoder[0] = False

    decoder.run = decoder_run

    def record(module, args):
        if not in_decoder[0]:
            return
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        entry = sums.setdefault(id(module), [module, 0.0, 0])
        entry[1] = entry[1] + (x * x).sum(0)
        entry[2] += x.shape[0]

    linears = [m for m in decoder.module.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        pipe = Pipeline(stage, manifest, graphs, TextCodec.from_package(stage, manifest))
        pipe.reuse_prefix = False  # the statistics count every token of every sample
        for sample in tqdm(calib.calibrate, desc="calibrate", unit="sample", disable=not progress):
            answer(pipe, sample, 16)
    finally:
        for hook in hooks:
            hook.remove()
    return {module: (total / count).numpy() for module, total, count in sums.values()}


def int4_clip_ratios(module, stats: dict, block: int, progress: bool = False) -> tuple[dict, dict]:
    """Per linear layer of `module` that INT4 compression will take: the clip ratios per (row, block),
    keyed by the weight's name as the converted program has it; and the weighted errors, RTN vs clipped."""
    from tqdm.auto import tqdm

    from mmedge.calibration import coreml as cq

    done: set[int] = set()
    names: dict[int, list[str]] = {}  # a weight shared by two modules (a tied LM head) has two names
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name.replace(".", "_"))
    clip, rtn, clipped = {}, 0.0, 0.0
    for layer, act in tqdm(stats.items(), desc="clip search", unit="layer", disable=not progress):
        w = layer.weight.detach().numpy()
        if w.size <= cq.WEIGHT_THRESHOLD or w.shape[1] % block or id(layer.weight) in done:
            continue  # left float16, or not blockable: coremltools skips it as well; or seen already
        done.add(id(layer.weight))
        ratios, errors = cq.clip_ratios(w, act, block)
        aliases = names[id(layer.weight)]
        for alias in aliases:
            clip[alias] = (ratios, block, aliases[0])
        rtn, clipped = rtn + errors["rtn"], clipped + errors["clipped"]
    return clip, {"layers": len(done), "weighted_sq_err_rtn": rtn, "weighted_sq_err_clipped": clipped,
                  "error_ratio": clipped / rtn if rtn else 1.0}


def finalize(stage: Path, manifest: Manifest) -> None:
    """Record what an app needs besides the I/O: deployment target, the decoder's states."""
    if "decoder" not in manifest.graphs:  # a dual encoder (CLIP, SigLIP): no state
        spec = _load_spec(stage / manifest.graphs["vision_encoder"].file)
        manifest.coreml = {"deployment_target": DEPLOYMENT_TARGET, "specification_version": spec.specificationVersion,
                           "flexible_batch": f"1 to {manifest.embedding.max_batch} images or texts a call"}
        return
    spec = _load_spec(stage / manifest.graphs["decoder"].file)
    manifest.kv_cache.dtype = STATE_DTYPE
    manifest.coreml = {
        "deployment_target": DEPLOYMENT_TARGET,
        "specification_version": spec.specificationVersion,
        "states": {s.name: {"dtype": STATE_DTYPE, "shape": list(s.type.stateType.arrayType.shape)}
                   for s in spec.description.state},
        "state_layout": "layers,batch,kv_heads,max_context,head_dim; a call writes [total_len - seq, total_len) "
                        "and attends over [0, total_len)",
    }


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _load_spec(path: Path):
    ct = import_coremltools()
    return ct.utils.load_spec(str(path))


_PATCHED = False


def _numpy2_casts() -> None:
    """coremltools 9.0's torch frontend casts a folded one-element array with int(array), which NumPy 2
    refuses for arrays of one dimension (traced models hold such constants, e.g. a layer's scaling);
    register the torch `int` / `bool` ops again, taking the element out first."""
    global _PATCHED
    if _PATCHED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def cast(context, node, kind, dtype_name):
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and isinstance(x.val, np.ndarray) and x.val.size == 1:
            context.add(mb.const(val=kind(x.val.reshape(()).item()), name=node.name), node.name)
            return
        ops._cast(context, node, kind, dtype_name)

    def _int(context, node):
        cast(context, node, int, "int32")

    def _bool(context, node):
        cast(context, node, bool, "bool")

    register_torch_op(_int, torch_alias=["int"], override=True)
    register_torch_op(_bool, torch_alias=["bool"], override=True)
    _PATCHED = True


# -- the package as PyTorch runs it (off macOS) ------------------------------------------------


class TorchGraph:
    """A job's torch module behind the runtime's Graph protocol; the stateful decoder resets as Core ML's does,
    and (unlike Core ML's, of batch 1) takes the batch of the first call after a reset, as OpenVINO's state does."""

    def __init__(self, job: GraphJob):
        self.job, self.module = job, job.module
        self.input_names, self.output_names = job.input_names, job.output_names
        self._fresh = False

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if self._fresh:
            batch = inputs["inputs_embeds"].shape[0]
            if batch != self.module.key_cache.shape[1]:
                self.module = self.module.with_state_dtype(self.module.key_cache.dtype, batch)
            self._fresh = False
        return dict(zip(self.output_names, _outputs(self.module, self.job, inputs)))

    def reset_state(self) -> None:
        self.module.reset()
        self._fresh = isinstance(self.module, graphs.StatefulDecoder)

    def truncate_state(self, length: int) -> None:
        """As Core ML's (runtimes/backends/coreml.py): the buffers are written at the mask's length."""


def simulated_pipeline(package: Path, checkpoint: Path | None = None, stored_weights: bool = True):
    """The package's Pipeline over the torch modules its .mlpackage files were converted from, for
    measuring a Core ML package where Core ML cannot run (Linux): with `stored_weights`, each module gets
    the weights its .mlpackage stores (compressed ones dequantized); compute is float32, the KV cache in
    float16 buffers as Core ML's states. Returns (pipeline, the transformers model)."""
    from mmedge.calibration.coreml import load_stored_weights
    from mmedge.exporters import checkpoint as ckpt
    from mmedge.exporters.export import _load_tokenizer
    from mmedge.manifest import load_manifest
    from mmedge.runtimes.pipeline import Pipeline
    from mmedge.runtimes.text import TextCodec

    import_coremltools()
    package = Path(package)
    manifest = load_manifest(package)
    if manifest.target != "coreml":
        raise ExportError(f"{package} was exported for {manifest.target}, not coreml")
    checkpoint = Path(checkpoint or manifest.source["checkpoint"])
    family = ckpt.family_for(ckpt.read_config(checkpoint)["model_type"])
    model = family.load(checkpoint)
    desc = family.describe(model, checkpoint, _load_tokenizer(checkpoint))
    jobs = build_jobs(family.split(model), "state", manifest.kv_cache.max_context, desc.preprocess)
    if stored_weights:
        for job in jobs:
            load_stored_weights(job.module, package / manifest.graphs[job.name].file)
    graphs = {job.name: TorchGraph(job) for job in jobs}
    pipe = Pipeline(package, manifest, graphs, TextCodec.from_package(package, manifest))
    pipe.max_batch = None  # the torch modules take any batch (generate_batch); Core ML's decoder takes one
    return pipe, model


def simulated_embedder(package: Path, checkpoint: Path | None = None):
    """An embedding package's (CLIP, SigLIP) Embedder over the torch modules its .mlpackage files were converted
    from, each with the weights its .mlpackage stores (compressed ones dequantized), float32 compute: what
    measures a Core ML dual encoder where Core ML cannot run. Returns (embedder, the transformers model)."""
    from tokenizers import Tokenizer

    from mmedge.calibration.coreml import load_stored_weights
    from mmedge.exporters import checkpoint as ckpt
    from mmedge.exporters import embedding
    from mmedge.manifest import load_manifest
    from mmedge.runtimes.embedder import Embedder

    import_coremltools()
    package = Path(package)
    manifest = load_manifest(package)
    if manifest.target != "coreml" or manifest.kind != "embedding":
        raise ExportError(f"{package} is a {manifest.target} {manifest.kind} package, not a coreml embedding one")
    checkpoint = Path(checkpoint or manifest.source["checkpoint"])
    family = ckpt.family_for(ckpt.read_config(checkpoint)["model_type"])
    model = family.load(checkpoint)
    jobs = embedding.build_jobs(family.split(model), manifest.embedding.max_batch)
    for job in jobs:
        load_stored_weights(job.module, package / manifest.graphs[job.name].file)
    graphs = {job.name: TorchGraph(job) for job in jobs}
    return Embedder(package, manifest, graphs, Tokenizer.from_file(str(package / manifest.tokenizer))), model
