"""TensorRT backend: engines deserialized once, device memory allocated once, the KV cache on the GPU.

Each graph's engine has one execution context per optimization profile (the
decoder: prefill and decode), all on one CUDA stream. Inputs and outputs have
device buffers that grow to the largest shape seen and are then reused.

The decoder keeps the KV cache on the GPU: one key and one value buffer per
layer at [batch, kv_heads, max_context, head_dim], bound as the past inputs
on every step (the package's engines take the whole buffer, unwritten slots
masked), and each step's new keys and values are written into their slots
by a device-to-device copy. Per token, only the token's embedding, the mask,
the position and the logits cross between host and GPU. To the Pipeline
this decoder holds its cache like a stateful engine (`holds_cache`,
`reset_state`), with the whole buffer in every mask.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mmedge.errors import InputError, MmedgeError, PackageError
from mmedge.manifest import KVCacheSpec, Manifest
from mmedge.runtimes.backends import cuda
from mmedge.runtimes.backends.tensorrt_build import build_package, engine_dir, engines_current, import_tensorrt

log = logging.getLogger(__name__)


# inputs at least this large are not uploaded again when the same array comes again (see TensorRTGraph)
REUSED_UPLOAD_BYTES = 1 << 20


class _Buffers:
    """Device buffers by tensor name, grown when a larger tensor comes."""

    def __init__(self):
        self.buffers: dict[str, cuda.DeviceBuffer] = {}

    def get(self, name: str, nbytes: int) -> cuda.DeviceBuffer:
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self.buffers[name] = cuda.DeviceBuffer(nbytes)
        return buf


class TensorRTGraph:
    def __init__(self, trt, engine, stream: cuda.Stream, name: str):
        self.trt, self.engine, self.stream, self.name = trt, engine, stream, name
        tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [t for t in tensors if engine.get_tensor_mode(t) == mode]
        self.output_names = [t for t in tensors if engine.get_tensor_mode(t) != mode]
        self.dtypes = {t: np.dtype(trt.nptype(engine.get_tensor_dtype(t))) for t in tensors}
        # one context per profile, each allocating its scratch memory for its own profile (not the largest)
        strategy = trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
        self.contexts = []
        for p in range(engine.num_optimization_profiles):
            context = engine.create_execution_context(strategy)
            if context is None:
                raise MmedgeError(f"TensorRT could not create a context for {name}: out of GPU memory?")
            context.set_optimization_profile_async(p, stream.ptr)
            self.contexts.append(context)
        stream.synchronize()
        # per profile, per input: (min, max) shapes, to pick the profile a call's shapes fall in
        self.ranges = []
        for p in range(engine.num_optimization_profiles):
            shapes = {t: engine.get_tensor_profile_shape(t, p) for t in self.input_names}
            self.ranges.append({t: (tuple(s[0]), tuple(s[2])) for t, s in shapes.items()})
        self.buffers = _Buffers()
        # input name -> the host array last uploaded for it (kept, so its identity stays its own): given the very
        # same array again, the device copy is reused. The Pipeline feeds a prompt's image keys and values
        # (cross-attention decoders, up to hundreds of MB) as the same arrays on every step, so they cross to
        # the GPU once per prompt, not once per token
        self._uploaded: dict[str, np.ndarray] = {}

    def _context(self, shapes: dict[str, tuple]):
        """The context of the tightest profile the shapes fall in (decode steps: the decode profile)."""
        def fits(ranges: dict) -> bool:
            return all(len(shape) == len(ranges[name][0])
                       and all(lo <= d <= hi for d, lo, hi in zip(shape, *ranges[name]))
                       for name, shape in shapes.items() if name in ranges)

        def volume(ranges: dict) -> int:
            return sum(int(np.prod(hi)) for _, hi in ranges.values())

        fitting = [i for i, ranges in enumerate(self.ranges) if fits(ranges)]
        if fitting:
            return self.contexts[min(fitting, key=lambda i: volume(self.ranges[i]))]
        wanted = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
        raise InputError(f"{self.name}: no optimization profile of this engine takes {wanted}; "
                         "re-export with a larger --max-context, or shorten the prompt")

    def _execute(self, inputs: dict[str, np.ndarray], bound: dict[str, cuda.DeviceBuffer] | None = None):
        """Upload `inputs`, bind `bound` device buffers as given, run; returns the context (output shapes)."""
        bound = bound or {}
        shapes = {name: tuple(a.shape) for name, a in inputs.items()}
        shapes.update({name: self._bound_shape(name) for name in bound if name in self.input_names})
        context = self._context(shapes)
        for name in self.input_names:
            if name not in shapes:
                raise InputError(f"{self.name} needs the input {name!r}")
            if not context.set_input_shape(name, shapes[name]):
                raise InputError(f"{self.name}: TensorRT refused the shape {list(shapes[name])} for {name}")
            if name in bound:
                self._address(context, name, bound[name])
                continue
            given = inputs[name]
            if self._uploaded.get(name) is given:
                self._address(context, name, self.buffers.buffers[name])
                continue
            array = np.ascontiguousarray(given, dtype=self.dtypes[name])
            buf = self.buffers.get(name, array.nbytes)
            buf.upload(array, self.stream)
            self._address(context, name, buf)
            self._uploaded[name] = given if given.nbytes >= REUSED_UPLOAD_BYTES else None
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
            self._address(context, name, self.buffers.get(name, nbytes))
        if not context.execute_async_v3(self.stream.ptr):
            raise MmedgeError(f"TensorRT could not run {self.name} (its log above says why)")
        return context

    def _address(self, context, name: str, buf: cuda.DeviceBuffer) -> None:
        if not context.set_tensor_address(name, buf.ptr):
            raise MmedgeError(f"{self.name}: TensorRT refused the device address of {name}")

    def _bound_shape(self, name: str) -> tuple:
        raise PackageError(f"{self.name}: {name} is bound to a device buffer this graph does not know")

    def _download(self, context, name: str, into: np.ndarray | None = None) -> np.ndarray:
        shape = tuple(context.get_tensor_shape(name))
        out = into if into is not None else np.empty(shape, self.dtypes[name])
        if out.shape != shape or out.dtype != self.dtypes[name] or not out.flags.c_contiguous:
            raise ValueError(f"{name}: `into` must be a C-contiguous {self.dtypes[name]} array of shape {shape}")
        self.buffers.buffers[name].download(out, self.stream)
        return out

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        context = self._execute(inputs)
        into = into or {}
        out = {name: self._download(context, name, into.get(name)) for name in self.output_names}
        return {name: value for name, value in out.items() if name not in into}


class TensorRTDecoder(TensorRTGraph):
    """The decoder with its KV cache held on the GPU (see the module docstring)."""

    holds_cache = True

    def __init__(self, trt, engine, stream: cuda.Stream, kv: KVCacheSpec):
        super().__init__(trt, engine, stream, "decoder")
        self.kv = kv
        layers = range(kv.num_layers)
        self.past = [(kv.past_key.format(layer=i), kv.past_value.format(layer=i)) for i in layers]
        self.present = [(kv.present_key.format(layer=i), kv.present_value.format(layer=i)) for i in layers]
        self.itemsize = self.dtypes[self.past[0][0]].itemsize  # the engine's, whatever the manifest says
        if any(self.dtypes[name].itemsize != self.itemsize for pair in self.past + self.present for name in pair):
            raise PackageError("the decoder's past and present keys/values differ in type; re-export the package")
        slot = kv.num_kv_heads * kv.max_context * kv.head_dim * self.itemsize
        self.cache = {name: cuda.DeviceBuffer(slot) for pair in self.past for name in pair}
        for buf in self.cache.values():
            buf.zero(stream)  # unwritten slots are masked, but 0 x NaN would not be
        self.length = 0

    def reset_state(self) -> None:
        self.length = 0

    def _bound_shape(self, name: str) -> tuple:
        return (1, self.kv.num_kv_heads, self.kv.max_context, self.kv.head_dim)

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        n = inputs["inputs_embeds"].shape[1]
        if inputs["inputs_embeds"].shape[0] != 1:
            raise InputError("the TensorRT decoder runs one sequence at a time (batch 1)")
        if self.length + n > self.kv.max_context:
            raise InputError(f"KV cache overflow: {self.length + n} > {self.kv.max_context}")
        context = self._execute(inputs, bound=self.cache)
        row = self.kv.head_dim * self.itemsize
        for (pk, pv), (nk, nv) in zip(self.past, self.present):
            for past, new in ((pk, nk), (pv, nv)):
                cuda.copy_rows(self.cache[past], self.kv.max_context * row, self.length * row,
                               self.buffers.buffers[new], n * row, n * row, self.kv.num_kv_heads, self.stream)
        self.length += n
        into = into or {}
        logits = self._download(context, "logits", into.get("logits"))
        return {} if "logits" in into else {"logits": logits}


class TensorRTBackend:
    """Runs a TensorRT package's engines; builds them on first load if this device has none."""

    name = "tensorrt"

    def __init__(self, threads: int = 0, device: str | None = None, inference_precision: str | None = None,
                 providers=None, build: bool = True):
        if device or inference_precision or providers:
            raise MmedgeError("tensorrt runs its engines as built on GPU 0: --device, --providers and "
                              "--inference-precision do not apply (precision is set at export)")
        self.trt = import_tensorrt()
        self.build = build
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = cuda.Stream()
        self.package: Path | None = None
        self.manifest: Manifest | None = None

    def open_package(self, package: Path, manifest: Manifest) -> None:
        """Called by Pipeline.load before `load`: find (or build) this device's engines."""
        if manifest.target != "tensorrt":
            raise PackageError(f"this package was exported for {manifest.target}; the tensorrt backend runs "
                               "packages exported with --target tensorrt")
        if not engines_current(package, manifest, self.trt):
            if not self.build:
                raise PackageError(f"{package} has no engines for this GPU and TensorRT {self.trt.__version__}; "
                                   f"run `mmedge build {package}`")
            log.warning("building TensorRT engines for this device (once; minutes)")
            build_package(package, manifest)
        self.package, self.manifest = package, manifest

    def load(self, path: Path):
        if self.manifest is None:
            raise PackageError("the tensorrt backend loads whole packages: use Pipeline.load(package)")
        part = self.manifest.graph_of(Path(path).name)
        if part is None:
            raise PackageError(f"{path} is not one of the package's graphs")
        data = (engine_dir(self.package, self.trt) / f"{part}.engine").read_bytes()
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise PackageError(f"TensorRT could not load the {part} engine; rebuild it: mmedge build {self.package} --force")
        if part == "decoder":
            return TensorRTDecoder(self.trt, engine, self.stream, self.manifest.kv_cache)
        return TensorRTGraph(self.trt, engine, self.stream, part)
