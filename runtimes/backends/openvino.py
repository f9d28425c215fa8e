"""OpenVINO backend: runs OpenVINO IR (.xml + .bin) with ov.Core."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mmedge.errors import MmedgeError, first_line

log = logging.getLogger(__name__)

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PRECISIONS = ("f32", "bf16", "f16")
KV_PRECISIONS = ("f32", "f16", "u8")
QUANTIZED = ("int8", "int4")  # graph precisions (the manifest's) whose weights are quantized
CACHE_LIMIT_ENV = "MMEDGE_OPENVINO_CACHE_MB"
CACHE_LIMIT_MB = 8192  # the compiled graphs of ~3 fp32 SmolVLM-256M packages, or one 2B-class package at int4


class ModelCache:
    """OpenVINO's compiled-model cache, one folder per package directory, kept from growing without bound.

    OpenVINO names each entry by a hash of the graph and the compile settings and never deletes one: every
    re-export, every copy and every temporary package left its compiled weights behind (16 GB in 15,018 files
    here after the test suite had run a few times). Here a package's entries live in a folder keyed by its
    path, with a record of its manifest's sha256. When a package is opened, that folder is emptied if the
    package was re-exported since, and the other folders are pruned (at the first graph of each load): those
    whose package is gone or changed, then the least recently opened ones while the whole is over the limit
    ($MMEDGE_OPENVINO_CACHE_MB, default 8192; the package being opened is always kept).
    """

    RECORD = "package.json"
    ORPHAN_S = 600  # a folder without a record may be one another process is filling

    def __init__(self, root: Path, limit_mb: float | None = None):
        self.root = Path(root)
        if limit_mb is None:
            raw = os.environ.get(CACHE_LIMIT_ENV, "").strip()
            try:
                limit_mb = float(raw) if raw else CACHE_LIMIT_MB
            except ValueError:
                raise MmedgeError(f"{CACHE_LIMIT_ENV} must be a number of megabytes, got {raw!r}") from None
        self.limit = int(limit_mb * (1 << 20))
        self._pruned = False
        self._folders: dict[Path, Path] = {}  # package -> its folder, made and recorded once per load

    @staticmethod
    def _manifest_digest(package: Path) -> str:
        from mmedge.manifest import MANIFEST_NAME

        try:
            return hashlib.sha256((package / MANIFEST_NAME).read_bytes()).hexdigest()
        except OSError:
            return ""

    def folder(self, package: Path) -> Path:
        """The cache folder for the graphs of `package` (made, emptied if the package changed since, recorded)."""
        from mmedge.manifest import package_key

        package = Path(package).resolve()
        if package in self._folders:
            return self._folders[package]
        folder = self.root / package_key(package)
        digest = self._manifest_digest(package)
        record = self._read(folder)
        if record is not None and record.get("manifest") != digest:
            shutil.rmtree(folder, ignore_errors=True)  # compiled from the files of an earlier export at this path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{self.RECORD}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"package": str(package), "manifest": digest}))
        os.replace(tmp, folder / self.RECORD)  # its mtime: when the package was last opened
        self._folders[package] = folder
        if not self._pruned:
            self._pruned = True
            self.prune(keep=folder)
        return folder

    def _read(self, folder: Path) -> dict | None:
        try:
            record = json.loads((folder / self.RECORD).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Remove the entries of packages that are gone or changed, then the least recently opened while the
        cache is over its limit; returns the folders (and stray files) removed."""
        removed, live = [], []
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return removed
        now = time.time()
        for entry in entries:
            if entry == keep:
                continue
            if entry.is_file():  # the flat layout of earlier versions: no package to tell it by
                if entry.suffix == ".blob":
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
                continue
            record = self._read(entry)
            if record is None:
                try:
                    young = now - entry.stat().st_mtime < self.ORPHAN_S
                except OSError:
                    continue
                if young:
                    continue
                stale = True
            else:
                package = Path(str(record.get("package", "")))
                stale = not package.is_absolute() or self._manifest_digest(package) != record.get("manifest")
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            else:
                live.append(entry)
        sizes = {entry: _size(entry) for entry in live}
        total = sum(sizes.values()) + (_size(keep) if keep else 0)
        for entry in sorted(live, key=lambda e: _mtime(e / self.RECORD)):
            if total <= self.limit:
                break
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            total -= sizes[entry]
        if removed:
            log.info("OpenVINO model cache: removed %d stale or old entries from %s", len(removed), self.root)
        return removed


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class OpenVinoGraph:
    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in compiled.inputs]
        # inputs read in place from the caller's arrays, not copied into the request's tensors each call: the
        # buffer KV cache and a cross-attention decoder's image keys and values are tens to hundreds of MB a
        # step (docs/targets.md has the measurement); the arrays are not changed while a call runs
        self.share_inputs = True
        # a tensor may carry several names (the exporter's and the graph's own): answer to all of them
        self._outputs = [(sorted(p.get_names()), p) for p in compiled.outputs]
        self.output_names = [name for names, _ in self._outputs for name in names]
        if self.request.query_state():  # a stateful graph (the decoder's KV cache held in the engine)
            self.reset_state = self.request.reset_state
            self.truncate_state = lambda length: self._cut_states((slice(None), slice(None), slice(0, length)))
            self.keep_state_rows = lambda rows: self._cut_states((np.asarray(rows),))

    def _cut_states(self, index: tuple) -> None:
        """Every state ([batch, kv_heads, tokens, head_dim], grown by Concat) cut to `index`: the first tokens
        (a new sequence that starts as the cached one did), or some rows of a batch (the others ended)."""
        import openvino as ov

        for state in self.request.query_state():
            state.state = ov.Tensor(np.ascontiguousarray(state.state.data[index]))

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        results = self.request.infer(inputs, share_inputs=self.share_inputs)
        out = {}
        for names, port in self._outputs:
            target = next((into[n] for n in names if into and n in into), None)
            if target is not None:
                np.copyto(target, results[port])
                continue
            value = np.array(results[port], copy=True)  # the request reuses its tensors on the next call
            out.update(dict.fromkeys(names, value))
        return out


class OpenVinoBackend:
    """Runs OpenVINO IR.

    device: OpenVINO device name passed through (CPU, GPU, NPU, AUTO, ...;
    default CPU). threads: inference threads on CPU (0 = OpenVINO's choice).
    hint: performance hint, LATENCY (default) or THROUGHPUT. inference_precision
    (CPU): f32, bf16 or f16 compute for every graph. Unless it is given, a graph
    stored in float (fp32, fp16) computes in f32, so an fp32 package is not run in
    bf16 silently (OpenVINO's own CPU default where the CPU has it); a graph with
    quantized weights (int8, int4: `open_package` reads each graph's precision)
    computes its float parts in bf16 where that is OpenVINO's CPU default (AVX512-BF16,
    AMX), else in f32: its quantization moves its numbers far more than bf16 rounding
    does (the held-out accuracy of nine int8/int4 demo packages moved by at most 0.1
    point), and it is faster (docs/performance.md, "Time to first token").
    kv_cache_precision (CPU): the precision OpenVINO keeps the decoder's KV cache in, f32 (default) or f16 / u8
    (OpenVINO's own CPU default). u8 decoded 1.20x faster on a PaliGemma-135M-shaped int4 package and cost the
    int4 demo packages 1.0-1.2 points of held-out accuracy (docs/performance.md), so it is opt-in.
    cache_dir: where OpenVINO keeps each compiled graph (its model cache, CACHE_DIR), so that the next load of
    the same file with the same settings imports it instead of compiling; default $MMEDGE_CACHE/openvino,
    None or "" for none (also when the folder cannot be made). OpenVINO keys each entry on the graph file
    and the compile settings, and compiles again when the file changes; `ModelCache` keeps one folder per
    package and prunes the rest.
    """

    name = "openvino"

    def __init__(self, device: str | None = None, threads: int = 0, hint: str = "LATENCY",
                 inference_precision: str | None = None, cache_dir: str | Path | None = "default",
                 kv_cache_precision: str | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise MmedgeError("openvino is not installed; `pip install openvino`") from None
        self._ov = ov
        self.core = ov.Core()
        self.device = device or "CPU"
        available = self.core.available_devices
        base = self.device.split(":")[0].split(".")[0]
        if base not in ("AUTO", "MULTI", "HETERO") and not any(d.split(".")[0] == base for d in available):
            raise MmedgeError(f"OpenVINO here has no device {self.device}; available: {', '.join(available)}")
        if hint.upper() not in HINTS:
            raise MmedgeError(f"unknown performance hint {hint!r}; choose one of {', '.join(HINTS)}")
        self.config = {"PERFORMANCE_HINT": hint.upper()}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if inference_precision not in (None, *PRECISIONS):
            raise MmedgeError(f"unknown inference precision {inference_precision!r}; choose one of "
                              f"{', '.join(PRECISIONS)}")
        if kv_cache_precision not in (None, *KV_PRECISIONS):
            raise MmedgeError(f"unknown KV-cache precision {kv_cache_precision!r}; choose one of "
                              f"{', '.join(KV_PRECISIONS)}")
        self.on_cpu = base == "CPU"
        self.precision = inference_precision
        self.quantized_precision = None  # what a quantized graph computes in, unless asked: see quantized_compute
        self.manifest = None
        # a stateful KV cache stays f32 on CPU unless asked (OpenVINO would keep it in u8); each graph's compute
        # precision is set as it loads (compute_precision)
        if self.on_cpu or kv_cache_precision:
            self.config["KV_CACHE_PRECISION"] = kv_cache_precision or "f32"
        if cache_dir == "default":
            from mmedge.manifest import user_cache_dir

            cache_dir = user_cache_dir() / "openvino"
        self.cache_dir = None
        self.cache = None
        if cache_dir:
            try:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                self.cache = ModelCache(Path(cache_dir))
                self.cache_dir = Path(cache_dir)
            except OSError as exc:
                log.info("OpenVINO model cache off: %s", exc)

    def open_package(self, package: Path, manifest) -> None:
        """The package's manifest, for each graph's stored precision (`load`)."""
        self.manifest = manifest

    def compute_precision(self, path: Path) -> str | None:
        """The INFERENCE_PRECISION_HINT graph `path` compiles with (None: the device's own choice, off CPU). On CPU:
        the one asked for; else f32 for a graph stored in float (parity), and for int8/int4 ones quantized_compute."""
        if self.precision or not self.on_cpu:
            return self.precision
        part = self.manifest.graph_of(Path(path).name) if self.manifest else None
        stored = self.manifest.graphs[part].precision if part is not None else None
        if stored in QUANTIZED:
            if self.quantized_precision is None:
                self.quantized_precision = quantized_compute(self.core)
            return self.quantized_precision
        return "f32"

    def load(self, path: Path):
        config = self.config
        precision = self.compute_precision(path)
        if precision:
            config = {**config, "INFERENCE_PRECISION_HINT": precision}
        if self.cache is not None:
            try:
                config = {**config, "CACHE_DIR": str(self.cache.folder(Path(path).parent))}
            except OSError as exc:
                log.info("OpenVINO model cache off for %s: %s", path, exc)
        try:
            # from the path: with a cache entry for this file and these settings, the graph is not even read
            compiled = self.core.compile_model(str(path), self.device, config)
        except Exception as exc:  # openvino raises RuntimeError with multi-line messages
            raise MmedgeError(f"OpenVINO could not load {Path(path).name}: {reason(exc)}") from None
        return OpenVinoGraph(compiled)


def quantized_compute(core) -> str:
    """What a graph with quantized weights computes its float parts in on this CPU: bf16 where it is OpenVINO's
    CPU default (AVX512-BF16, AMX), else f32. (OpenVINO's f16 default on ARM CPUs is not taken: not measured.)"""
    try:
        default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # a build whose CPU plugin does not say
        return "f32"
    return "bf16" if default == "bf16" else "f32"


def reason(exc: BaseException) -> str:
    """OpenVINO's own words: its exceptions open with source locations ("Exception from src/...:84:",
    "Check 'false' failed at ...") and say what is wrong on their last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Exception from ", "Check ")) and not line.endswith(":")]
    return said[-1] if said else first_line(exc)
