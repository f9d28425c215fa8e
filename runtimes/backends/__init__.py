"""Backends: one module per inference engine, behind a two-method protocol.

A backend loads a graph file and returns a `Graph`, which runs with a dict of
named numpy arrays and returns a dict of named numpy arrays, writing any
output the caller names in `into` into the caller's array instead (ONNX
Runtime binds it, so the engine writes there directly). A backend that
needs the whole package first (TensorRT: engines built per device) also has
`open_package(path, manifest)`, called before its graphs load; one whose
`load` runs outside Python's lock, a core each (`loads_in_parallel`), has a
package's graphs opened side by side (`load_graphs`). Nothing else of
an engine leaks into the runtime, so adding an engine is one module here plus
one line in `_BACKENDS`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from mmedge.errors import InputError, MmedgeError


class Graph(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Outputs by name; those named in `into` are written into its arrays instead (and not returned)."""


class Backend(Protocol):
    name: str

    def load(self, path: Path) -> Graph: ...


def load_graphs(engine: Backend, package: Path, manifest, parts: Sequence[str]) -> dict[str, Graph]:
    """The graphs of `parts` on `engine`, by part. An engine that `loads_in_parallel` opens them side by side, the
    biggest first (it sets the wall time), on as many threads as it may use cores (its `threads`, else the
    machine's): each graph's weights are read and repacked on its own core."""
    files = {part: Path(package) / manifest.graphs[part].file for part in parts}
    workers = min(len(files), getattr(engine, "threads", 0) or os.cpu_count() or 1)
    if not getattr(engine, "loads_in_parallel", False) or workers < 2:
        return {part: engine.load(file) for part, file in files.items()}

    def size(part: str) -> int:
        data = files[part].with_name(files[part].name + ".data")
        return files[part].stat().st_size + (data.stat().st_size if data.exists() else 0)

    from concurrent.futures import ThreadPoolExecutor

    order = sorted(files, key=size, reverse=True)
    with ThreadPoolExecutor(workers, thread_name_prefix="mmedge-load") as pool:
        loaded = dict(zip(order, pool.map(lambda part: engine.load(files[part]), order)))
    return {part: loaded[part] for part in files}


# backend name -> (module, class). Imported lazily so a device needs only the
# engine it uses.
_BACKENDS = {
    "onnxruntime": ("mmedge.runtimes.backends.onnxruntime", "OnnxRuntimeBackend"),
    "openvino": ("mmedge.runtimes.backends.openvino", "OpenVinoBackend"),
    "tensorrt": ("mmedge.runtimes.backends.tensorrt", "TensorRTBackend"),
    "coreml": ("mmedge.runtimes.backends.coreml", "CoreMLBackend"),
}

# Which backend runs a package exported for a target, unless the user picks one.
DEFAULT_BACKEND_FOR_TARGET = {
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "tensorrt": "tensorrt",  # its ONNX graphs also run with --backend onnxruntime, anywhere
    "coreml": "coreml",  # macOS / iOS only
}
MAX_THREADS = 4096  # more is a mistake (ONNX Runtime's binding overflows on 2**64)
# targets whose graphs only their own backend reads
ONLY_OWN_BACKEND = ("coreml",)
# KV-cache storages only some backends keep: "in_place" is ONNX Runtime's GroupQueryAttention writing each new key
# and value into the buffer bound as its output (another engine reading the graph computes something else)
STORAGE_BACKENDS = {"in_place": ("onnxruntime",)}


THREADS_ENV = "MMEDGE_THREADS"


def default_threads() -> int:
    """The intra-op threads an engine gets when the caller asks for none: $MMEDGE_THREADS, else 0 (the engine's
    own choice, one per core). For a device whose cores are shared (a robot's control loop, several pipelines,
    parallel test workers): every session mmedge opens, at export and at run time, takes it."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise InputError(f"{THREADS_ENV} must be a whole number >= 0 (0: the engine's choice), got {raw!r}")
    return int(raw)


def available_memory() -> int | None:
    """Bytes of memory available to a new process (Linux: MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.virtual_memory().available
    except Exception:
        return None


def get_backend(name: str, model_cache: bool = True, **options: Any) -> Backend:
    """Backend `name` with its options. model_cache False: nothing compiled is kept on disk for a later load
    (OpenVINO's model cache off), for graphs opened once (export's checks and calibration)."""
    if name not in _BACKENDS:
        raise MmedgeError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(_BACKENDS))}")
    module_name, class_name = _BACKENDS[name]
    module = importlib.import_module(module_name)
    options["threads"] = options.get("threads") or default_threads()
    if not model_cache and name == "openvino":
        options["cache_dir"] = None
    return getattr(module, class_name)(**options)


def open_engine(path: Path, manifest, backend: str | None = None, threads: int = 0,
                providers: Sequence[str] | None = None, device: str | None = None,
                inference_precision: str | None = None, kv_cache_precision: str | None = None,
                low_memory: bool = False, model_cache: bool = True) -> Backend:
    """The engine that runs package `path` (its manifest read): `backend`, else the target's own, with the
    options only some backends take refused by the others; opened on the package where the backend holds
    whole packages (TensorRT's engines). model_cache False: nothing compiled is kept on disk for the next load
    (OpenVINO's model cache off), for packages opened once (export's checks)."""
    from mmedge.errors import PackageError

    name = backend or DEFAULT_BACKEND_FOR_TARGET.get(manifest.target)
    if name is None:
        raise PackageError(f"no backend here runs target {manifest.target!r}; pass backend=...")
    if manifest.target in ONLY_OWN_BACKEND and name != manifest.target:
        raise PackageError(f"a {manifest.target} package runs with the {manifest.target} backend only, "
                           f"not {name}; export for {name} to run there")
    if threads > MAX_THREADS:
        raise InputError(f"threads must be at most {MAX_THREADS}, got {threads}")
    options: dict[str, Any] = {"threads": threads}
    if providers:
        options["providers"] = providers
    if device:
        options["device"] = device
    if inference_precision:
        options["inference_precision"] = inference_precision
    if kv_cache_precision:
        if name != "openvino":
            raise InputError(f"kv_cache_precision is for the openvino backend, not {name}")
        options["kv_cache_precision"] = kv_cache_precision
    if low_memory:
        if name != "onnxruntime":
            raise InputError(f"low_memory is for the onnxruntime backend, not {name}")
        options["low_memory"] = True
    storage = manifest.kv_cache.storage if manifest.kv_cache is not None else None
    if name not in STORAGE_BACKENDS.get(storage, (name,)):
        raise PackageError(f"this package's decoder keeps its KV cache {storage} ({manifest.target} target), which "
                           f"the {' or '.join(STORAGE_BACKENDS[storage])} backend runs, not {name}; export for {name} "
                           "to run there")
    engine = get_backend(name, model_cache=model_cache, **options)
    if hasattr(engine, "open_package"):
        engine.open_package(path, manifest)
    return engine
