"""Build a TensorRT package's engines on the device that will run them (`mmedge build`, or on first load).

An engine is tied to the GPU (compute capability) and the TensorRT version,
so engines live in `engines/sm<major><minor>-<SMs>sm-trt<version>/` inside the
package, one directory per device kind, each with a `built.json` naming the
graph files (by sha256) they were built from, and one timing cache per
directory, reused by every later build there.

Typing: TensorRT 10.12 and later build strongly typed networks (each tensor
has the ONNX type: fp16 where the graph says fp16, fp32 islands, explicit
Q/DQ; no precision flags). TensorRT 10.3 (JetPack 6.2 on Orin) is built weakly
typed: the FP16 and INT8 flags let TensorRT use fp16 and the graph's Q/DQ,
and every layer the ONNX computes in fp32 (the islands) is pinned to fp32.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mmedge.errors import MmedgeError, PackageError
from mmedge.manifest import Manifest

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
RECORD = "built.json"
STRONG_TYPING_FROM = (10, 12)  # TensorRT versions from which strongly typed builds are the default
TYPINGS = ("auto", "strong", "weak")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MmedgeError("TensorRT is not installed here: on Jetson it comes with JetPack (python3-libnvinfer); "
                          "on x86 `pip install tensorrt`. Or run the package with --backend onnxruntime") from None
    from mmedge.runtimes.backends import cuda

    if cuda.device_count() == 0:
        raise MmedgeError("no NVIDIA GPU is visible here; TensorRT engines are built on the device that runs them "
                          "(or run the package with --backend onnxruntime)")
    return trt


def _version(trt) -> tuple[int, ...]:
    return tuple(int(p) for p in trt.__version__.split(".")[:3] if p.isdigit())


def engine_dir(package: Path, trt) -> Path:
    from mmedge.runtimes.backends import cuda

    major, minor = cuda.compute_capability()
    sms = cuda.attribute(cuda.MULTIPROCESSOR_COUNT)  # tells apart GPUs of one architecture (Orin Nano / AGX)
    return Path(package) / ENGINES_DIR / f"sm{major}{minor}-{sms}sm-trt{trt.__version__}"


def graph_digest(manifest: Manifest, part: str) -> str:
    """The graph's identity: the sha256 of its file and of its external weights, if it has them (a re-export
    of other weights can leave the .onnx itself byte for byte the same)."""
    file = manifest.graphs[part].file
    return "+".join(manifest.files[name].sha256 for name in (file, file + ".data") if name in manifest.files)


def engines_current(package: Path, manifest: Manifest, trt) -> bool:
    """Whether this device's engines exist and were built from the package's graphs as they are now."""
    record = engine_dir(package, trt) / RECORD
    if not record.exists():
        return False
    built = json.loads(record.read_text()).get("graphs", {})
    return all(
        built.get(part, {}).get("sha256") == graph_digest(manifest, part) and (record.parent / f"{part}.engine").exists()
        for part in manifest.graphs
    )


def build_package(package: Path, manifest: Manifest, workspace_gb: float | None = None, typing: str = "auto",
                  force: bool = False, progress: bool = True) -> dict:
    """Build the engines this device lacks; returns what was done (graph -> seconds, or "current")."""
    if manifest.target != "tensorrt" or not manifest.tensorrt.get("profiles"):
        raise PackageError(f"{package} was exported for {manifest.target}; `mmedge build` builds TensorRT packages "
                           "(mmedge export --target tensorrt)")
    if typing not in TYPINGS:
        raise MmedgeError(f"unknown typing {typing!r}; choose one of {', '.join(TYPINGS)}")
    trt = import_tensorrt()
    out = engine_dir(package, trt)
    if not force and engines_current(package, manifest, trt):
        return dict.fromkeys(manifest.graphs, "current")
    out.mkdir(parents=True, exist_ok=True)
    strong = typing == "strong" or (typing == "auto" and _version(trt) >= STRONG_TYPING_FROM)
    cache_file = out / "timing.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    report, record = {}, {"tensorrt": trt.__version__, "typing": "strong" if strong else "weak", "graphs": {}}
    from tqdm.auto import tqdm

    bar = tqdm(list(manifest.graphs), desc="build", unit="engine", disable=not progress)
    for part in bar:
        bar.set_postfix_str(part)
        spec = manifest.graphs[part]
        started = time.perf_counter()
        engine = build_engine(trt, logger, Path(package) / spec.file, manifest.tensorrt["profiles"][part],
                              cache_file, strong, workspace_gb)
        tmp = out / f"{part}.engine.tmp"
        tmp.write_bytes(engine)
        tmp.replace(out / f"{part}.engine")  # a half-written engine never has the final name
        report[part] = round(time.perf_counter() - started, 1)
        record["graphs"][part] = {"sha256": graph_digest(manifest, part), "seconds": report[part]}
    bar.close()
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("engines in %s", out)
    return report


def build_engine(trt, logger, onnx_path: Path, profiles: list[dict], cache_file: Path, strong: bool,
                 workspace_gb: float | None) -> bytes:
    """Parse one ONNX graph and build its serialized engine with `profiles` (input -> min/opt/max shapes)."""
    builder = trt.Builder(logger)
    flags = 0
    if strong:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # finds external weights beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PackageError(f"TensorRT could not parse {onnx_path.name}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.clear_flag(trt.BuilderFlag.TF32)  # what the graph computes in fp32 stays fp32 (islands, fp32 packages)
    if not strong:
        _weak_precision(trt, network, config)
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            if name in inputs:  # TensorRT drops inputs nothing reads
                profile.set_shape(name, s["min"], s["opt"], s["max"])
        if config.add_optimization_profile(profile) < 0:
            raise PackageError(f"TensorRT refused an optimization profile of {onnx_path.name}; re-export the package")
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another device or version
        log.warning("the timing cache %s does not match this device; starting a new one", cache_file)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PackageError(f"TensorRT could not build {onnx_path.name} (its log above says why); "
                           "if it ran out of memory, close other programs or pass --workspace")
    cache_file.write_bytes(memoryview(cache.serialize()))
    return bytes(memoryview(serialized))


def _weak_precision(trt, network, config) -> None:
    """Weakly typed (TensorRT < 10.12): allow fp16 and the graph's Q/DQ; keep the ONNX's fp32 layers in fp32."""
    has_fp16 = has_qdq = False
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        has_qdq |= layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
        types = [layer.get_output(j).dtype for j in range(layer.num_outputs)]
        has_fp16 |= trt.float16 in types
    if has_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE, trt.LayerType.QUANTIZE,
                              trt.LayerType.DEQUANTIZE, trt.LayerType.CAST):
                continue
            if layer.num_outputs and all(layer.get_output(j).dtype == trt.float32 for j in range(layer.num_outputs)):
                layer.precision = trt.float32  # an fp32 island (norm variance, softmax) or fp32 I/O
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    if has_qdq:
        config.set_flag(trt.BuilderFlag.INT8)
