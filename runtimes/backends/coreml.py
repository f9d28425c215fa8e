"""Core ML backend: the package's .mlpackage models, run by Core ML on macOS (and, through an app, iOS).

Each model is loaded once (compiled by Core ML on load) with the compute
units asked for (`device`: ALL, CPU_ONLY, CPU_AND_GPU or CPU_AND_NE;
default ALL, and CPU_AND_GPU for the stateful decoder). The decoder keeps its KV cache as Core ML state:
one `MLState` per sequence (`make_state`), passed to every predict call, so
per token only the embedding, the mask, the position and the logits cross
the API. To the Pipeline it is a stateful decoder (kv_cache storage
"state"): the runtime counts the tokens, the masks cover exactly the tokens
so far, and `reset_state` starts a new state.

Core ML runs models only on Apple platforms. Elsewhere the backend says so
in one line; conversion and compression (export) work everywhere.

coremltools imports torch (and transformers) when they are installed; this
backend imports it with both hidden, so the runtime stays torch-free.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np

from mmedge.errors import InputError, MmedgeError, PackageError

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
DECODER_UNITS = "CPU_AND_GPU"  # the stateful decoder's default (see CoreMLBackend.load)
_HIDDEN = ("torch", "transformers")


class _Hide:
    """A meta-path finder that makes `import torch` / `import transformers` fail while coremltools loads."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def import_coremltools():
    """coremltools without torch: its converters are not needed to run models, and the runtime must not
    load torch. Where torch is already imported (the user's app did), nothing is hidden."""
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    hide = None if any(m in sys.modules for m in _HIDDEN) else _Hide()
    if hide:
        sys.meta_path.insert(0, hide)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module("coremltools")
    except ImportError:
        raise MmedgeError("the coreml backend needs coremltools: pip install coremltools") from None
    finally:
        if hide:
            sys.meta_path.remove(hide)


# Core ML's ArrayFeatureType data types (FeatureTypes.proto) as numpy types
ARRAY_DTYPES = {65568: np.dtype(np.float32), 65552: np.dtype(np.float16), 131104: np.dtype(np.int32),
                65600: np.dtype(np.float64)}


def array_dtype(array_type) -> np.dtype:
    """The numpy type of a model description's multiArrayType."""
    if array_type.dataType not in ARRAY_DTYPES:
        raise PackageError(f"the model has an input of Core ML data type {array_type.dataType}, which mmedge "
                           "does not feed; re-export the package")
    return ARRAY_DTYPES[array_type.dataType]


def check_platform() -> None:
    if sys.platform != "darwin":
        raise MmedgeError(f"Core ML runs models on macOS and iOS only, not on {sys.platform}; copy the package to a "
                          "Mac (or into an app), or export for this machine with --target onnxruntime or openvino")
    import platform

    release = platform.mac_ver()[0]
    major = int(release.split(".")[0]) if release else 0
    if major and major < 15:
        raise MmedgeError(f"these Core ML packages need macOS 15 or later (stateful models), not {release}")


class CoreMLGraph:
    def __init__(self, model, name: str):
        self.model, self.name = model, name
        spec = model.get_spec()
        self.input_names = [f.name for f in spec.description.input]
        self.output_names = [f.name for f in spec.description.output]
        self.dtypes = {f.name: array_dtype(f.type.multiArrayType) for f in spec.description.input}

    def _feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"{self.name} needs the inputs {', '.join(missing)}")
        return {n: np.ascontiguousarray(inputs[n], dtype=self.dtypes[n]) for n in self.input_names}

    def _predict(self, inputs: dict[str, np.ndarray], state=None) -> dict:
        try:
            if state is None:
                return self.model.predict(self._feeds(inputs))
            return self.model.predict(self._feeds(inputs), state=state)
        except InputError:
            raise
        except Exception as exc:  # Core ML reports shape and range errors as RuntimeError
            raise InputError(f"Core ML refused the {self.name} call: {str(exc).splitlines()[0]}") from exc

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        return _outputs(self._predict(inputs), self.output_names, into)


class CoreMLDecoder(CoreMLGraph):
    """The stateful decoder: one MLState per sequence."""

    def __init__(self, model):
        super().__init__(model, "decoder")
        self.state = model.make_state()

    def reset_state(self) -> None:
        self.state = self.model.make_state()  # a new state starts zeroed; the old one is freed

    def truncate_state(self, length: int) -> None:
        """Nothing to cut: each call writes its tokens at [mask length - new, mask length) of the fixed buffers, so
        the next call after `length` tokens overwrites what followed them."""

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        return _outputs(self._predict(inputs, self.state), self.output_names, into)


def _outputs(result: dict, names: list[str], into: dict | None) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        value = np.asarray(result[name], dtype=np.float32)
        if into and name in into:
            into[name][...] = value
        else:
            out[name] = value
    return out


class CoreMLBackend:
    """Loads a package's .mlpackage models with Core ML (macOS)."""

    name = "coreml"

    def __init__(self, threads: int = 0, device: str | None = None, inference_precision: str | None = None,
                 providers=None):
        if inference_precision or providers:
            raise MmedgeError("coreml runs at the precision set at export; --inference-precision and --providers "
                              "do not apply (--device picks the compute units)")
        units = device.upper() if device else None
        if units is not None and units not in COMPUTE_UNITS:
            raise MmedgeError(f"unknown Core ML compute units {device!r}; choose one of {', '.join(COMPUTE_UNITS)}")
        check_platform()
        self.ct = import_coremltools()
        self.units = units
        self.manifest = None

    def open_package(self, package: Path, manifest) -> None:
        if manifest.target != "coreml":
            raise PackageError(f"this package was exported for {manifest.target}; the coreml backend runs packages "
                               "exported with --target coreml")
        self.manifest = manifest

    def load(self, path: Path):
        path = Path(path)
        stateful = bool(self.ct.utils.load_spec(str(path)).description.state)
        # Stateful models on the Neural Engine have open Core ML / coremltools faults (e.g. coremltools
        # issues 2325, 2716; its own tests skip CPU_AND_NE prediction for them): the decoder defaults to
        # CPU and GPU, the other models to every unit; --device overrides both.
        units = self.units or (DECODER_UNITS if stateful else "ALL")
        try:
            model = self.ct.models.MLModel(str(path), compute_units=getattr(self.ct.ComputeUnit, units))
        except Exception as exc:
            raise PackageError(f"Core ML could not load {path.name}: {str(exc).splitlines()[0]}") from exc
        if model.__proxy__ is None:  # coremltools only warns when Core ML refuses a model
            why = str(getattr(model, "_framework_error", "") or "no reason given").splitlines()[0]
            raise PackageError(f"Core ML could not load {path.name} ({why}); it needs macOS 15 / iOS 18")
        if stateful:
            return CoreMLDecoder(model)
        return CoreMLGraph(model, path.stem)
