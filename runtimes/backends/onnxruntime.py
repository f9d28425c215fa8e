"""ONNX Runtime backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from mmedge.errors import MmedgeError, first_line

log = logging.getLogger(__name__)


# the graphs run for every token; the others (vision encoder, projector, text or audio encoder) run once per
# request, and their arena's memory is handed back after each run (ARENA_SHRINK)
PER_TOKEN = ("decoder", "embed_tokens")
# ONNX Runtime's CPU arena keeps the most a session ever allocated for its activations. A vision encoder's, over a
# 512 x 512 image, stayed allocated for the rest of the process: shrinking it after each run took the SmolVLM-256M
# fp32 package's peak from 1,241 to 1,130 MB (its weights are 1,027 MB), at the cost of allocating it again on the
# next image: the vision encoder's run 1.86-1.90 -> 1.97-2.11 s (docs/performance.md)
ARENA_SHRINK = ("memory.enable_memory_arena_shrinkage", "cpu:0")
# the graph transformer that turns a CPU session's float16 weights into float32 ones as the session is created
WIDENS_FP16 = "FuseFp16InitializerToFp32NodeTransformer"


class OnnxRuntimeGraph:
    def __init__(self, session, ort, run_options=None):
        self.session, self._ort, self.run_options = session, ort, run_options
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._binding = None
        # (side, name) -> (the array bound now, the OrtValue over it, kept alive)
        self._bound: dict[tuple[str, str], tuple[np.ndarray, object]] = {}

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if not into:
            values = self.session.run(self.output_names, inputs, self.run_options)
            return dict(zip(self.output_names, values))
        # IO binding: inputs and the `into` outputs are bound over the caller's arrays (no copies). A binding
        # persists between runs, so an array bound last time (the KV cache) is not bound again.
        io = self._binding = self._binding or self.session.io_binding()
        for name, array in inputs.items():
            self._bind(io.bind_ortvalue_input, "in", name, array)
        for name in self.output_names:
            if name in into:
                self._bind(io.bind_ortvalue_output, "out", name, into[name])
            else:  # allocated by ONNX Runtime each run (a binding would otherwise keep last run's shape)
                io.bind_output(name, "cpu")
                self._bound.pop(("out", name), None)
        self.session.run_with_iobinding(io, self.run_options)
        if len(into) == len(self.output_names):
            return {}
        values = io.get_outputs()  # in the order first bound: output_names, as every run binds them all
        return {name: values[i].numpy() for i, name in enumerate(self.output_names) if name not in into}

    def _bind(self, bind, side: str, name: str, array: np.ndarray) -> None:
        bound = self._bound.get((side, name))
        if bound is not None and bound[0] is array:
            return
        if not array.flags.c_contiguous:
            raise ValueError(f"{name}: bound arrays must be C-contiguous")
        value = self._ort.OrtValue.ortvalue_from_numpy(array)
        bind(name, value)
        self._bound[side, name] = (array, value)


class OnnxRuntimeBackend:
    """Runs ONNX graphs with onnxruntime.

    providers: execution providers in priority order (default CPU). threads:
    intra-op threads (0 = onnxruntime's default, one per physical core).
    low_memory: float (fp32/fp16) graphs run without prepacking, so their weights
    are their memory-mapped data files only (fp32 MatMuls run a little slower);
    quantized graphs are prepacked as always. A 3B fp32 package's check at
    export took 11.6 GiB of anonymous memory with prepacking, the mapped files
    only without. On the CPU, fp16 graphs widen each weight as they run rather
    than holding a float32 copy of them all (_widens_per_run).
    """

    name = "onnxruntime"

    def __init__(self, providers: Sequence[str] | None = None, threads: int = 0, device: str | None = None,
                 inference_precision: str | None = None, low_memory: bool = False):
        if device:
            raise MmedgeError("onnxruntime picks its device through execution providers, not a device name: "
                              "providers=[...] (`--providers` on run, chat and serve)")
        if inference_precision:
            raise MmedgeError("onnxruntime computes in the precision the package was exported at; "
                              "--inference-precision is for openvino packages (export with --quant fp16 instead)")
        try:
            import onnxruntime as ort
        except ImportError:
            raise MmedgeError("onnxruntime is not installed; `pip install onnxruntime` (or onnxruntime-gpu)") from None
        self._ort = ort
        self.low_memory = low_memory
        available = ort.get_available_providers()
        if providers is not None and (isinstance(providers, str) or not all(isinstance(p, str) for p in providers)):
            raise MmedgeError(f"providers is a list of ONNX Runtime execution provider names, e.g. "
                              f"[\"CPUExecutionProvider\"], not {providers!r}")
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in self.providers if p not in available]
        if unknown:
            raise MmedgeError(
                f"onnxruntime here has no {', '.join(unknown)}; available: {', '.join(available)}"
            )
        self.threads = threads
        self.package: Path | None = None
        self.manifest = None

    def open_package(self, package: Path, manifest) -> None:
        """Called by Pipeline.load: where NVIDIA providers keep their engines, and a TensorRT package's profiles."""
        self.package, self.manifest = Path(package), manifest

    def _provider_options(self, path: Path) -> list[dict]:
        """Per provider: TensorRT caches its engines and timings in the package (engines/onnxruntime-trt), with
        the package's optimization profiles where it has them; the graph's own types set the precision."""
        options = []
        for provider in self.providers:
            if provider != "TensorrtExecutionProvider":
                options.append({})
                continue
            cache = (self.package or path.parent) / "engines" / "onnxruntime-trt"
            try:
                cache.mkdir(parents=True, exist_ok=True)
                opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}
            except OSError as exc:  # a read-only package: build each time rather than fail
                log.warning("TensorRT engines will not be cached (%s: %s)", cache, exc.strerror)
                opts = {}
            graphs = self.manifest.graphs if self.manifest else {}
            part = self.manifest.graph_of(path.name) if self.manifest else None
            if part and graphs[part].precision != "fp32":
                opts["trt_fp16_enable"] = "True"  # what the graph does not pin to fp32 may run in fp16
                opts["trt_int8_enable"] = str(graphs[part].precision in ("int8", "int4"))  # its explicit Q/DQ
            profiles = self.manifest.tensorrt.get("profiles", {}) if self.manifest else {}
            if part in profiles:
                opts.update(ort_profile_shapes(profiles[part]))
            options.append(opts)
        return options

    @property
    def loads_in_parallel(self) -> bool:
        """On the CPU a session is created (its graph optimized, its weights repacked) outside Python's lock, on
        one core: a package's sessions side by side opened SmolVLM-256M's fp32 package in 0.60-0.64 s instead of
        0.91-0.95 (int4: 0.23-0.26 instead of 0.36), peak RSS within 35 MB of one at a time (load_graphs). GPU
        providers (engine builds on one device) are not measured: one at a time there."""
        return self._on_cpu

    @property
    def _on_cpu(self) -> bool:
        return self.providers[0] == "CPUExecutionProvider"  # the first provider takes every node it can run

    def _precision(self, path: Path) -> str | None:
        part = self.manifest.graph_of(path.name) if self.manifest else None
        return self.manifest.graphs[part].precision if part is not None else None

    def _prepacks(self, path: Path) -> bool:
        """low_memory leaves a float graph's weights mapped (prepacking would copy them whole); a quantized graph
        is still prepacked: MatMulNBits runs its int8 kernels on packed weights (a 2048 x 16384 int4 MatMul took
        1.9 ms prepacked, 189 ms not)."""
        return not self.low_memory or self._precision(path) not in (None, "fp32", "fp16")

    def _widens_per_run(self, path: Path) -> bool:
        """low_memory on the CPU, float16 graph: ONNX Runtime's CPU has no float16 MatMul, so it widens each
        float16 weight to a float32 copy when the session is created (FuseFp16InitializerToFp32NodeTransformer):
        a float32 copy of the whole graph in anonymous memory (PaliGemma-3B's 5 GB float16 decoder: 10 GB more).
        Instead each weight is widened by its Cast as the run reaches it, in the graph's order, without the arena
        keeping the widened copy (only the weights in use are held twice). paligemma-135m-shaped's tensorrt fp16
        package, 2 threads: 831 -> 97 MB anonymous after a generation, decode 26.5 -> 13.3 tok/s, the same tokens.
        This is the export's check of a float16 package (tensorrt, onnxruntime fp16) on a machine without their
        GPU, and `--low-memory`."""
        return self.low_memory and self._on_cpu and self._precision(path) == "fp16"

    def load(self, path: Path) -> OnnxRuntimeGraph:
        path = Path(path)
        opts = self._ort.SessionOptions()
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        if not self._prepacks(path):  # weights stay mapped from the package's files, not copied
            opts.add_session_config_entry("session.disable_prepacking", "1")
        extra = {}
        widens = self._widens_per_run(path)
        if widens:
            extra["disabled_optimizers"] = [WIDENS_FP16]
            opts.enable_cpu_mem_arena = False  # the arena would keep every widened weight's block
            opts.execution_order = self._ort.ExecutionOrder.PRIORITY_BASED  # each Cast just before its MatMul
        # not session.prepack.enable_parallel: SmolVLM-256M's fp32 package opened in 0.65 s instead of 1.0-1.4,
        # but peaked at 1,445 MB instead of 1,040 while doing it (int4: +50 MB), which a 3B model cannot spare
        try:
            session = self._ort.InferenceSession(str(path), sess_options=opts, providers=self.providers,
                                                 provider_options=self._provider_options(path), **extra)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise MmedgeError(f"onnxruntime could not load {path.name}: {first_line(exc)}") from None
        return OnnxRuntimeGraph(session, self._ort, None if widens else self._run_options(path))

    def _run_options(self, path: Path):
        """A graph run once per request hands its arena's memory back after each run (ARENA_SHRINK; load() asks
        only where the session has an arena)."""
        part = self.manifest.graph_of(path.name) if self.manifest else None
        if part is None or part in PER_TOKEN:
            return None
        options = self._ort.RunOptions()
        options.add_run_config_entry(*ARENA_SHRINK)
        return options


def ort_profile_shapes(profiles: list[dict]) -> dict[str, str]:
    """A TensorRT package's profiles as ONNX Runtime's TensorRT options: one profile spanning them all."""
    def merged(name: str, which: str) -> list[int]:
        shapes = [p[name][which] for p in profiles]
        if which == "opt":
            return shapes[0]
        pick = min if which == "min" else max
        return [pick(dims) for dims in zip(*shapes)]

    names = list(profiles[0])
    return {f"trt_profile_{which}_shapes": ",".join(f"{n}:{'x'.join(map(str, merged(n, which)))}" for n in names)
            for which in ("min", "opt", "max")}
