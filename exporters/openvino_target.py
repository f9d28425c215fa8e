"""Target `openvino`: OpenVINO IR (.xml + .bin) per part, converted from the verified ONNX graphs.

Why from ONNX rather than from the torch modules: the ONNX graphs are already
traced with the contract's input/output names and dynamic axes, so one trace
serves both targets and the torch model is held in memory once; OpenVINO's
ONNX frontend keeps the tensor names. Each IR is then verified against
PyTorch on its own, in OpenVINO, on inputs not used for tracing.

The decoder keeps the KV cache as explicit inputs and outputs (the same
contract as the ONNX Runtime target), so the runtime's preallocated cache
serves both engines.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mmedge.errors import ExportError, first_line
from mmedge.exporters import onnxruntime_target as onnx_target
from mmedge.exporters.graphs import GraphJob

SUFFIX = ".xml"
ONNX_DIR = ".onnx"  # intermediate ONNX graphs inside the staged package, removed by finish()


def _onnx_path(path: Path) -> Path:
    return path.parent / ONNX_DIR / (path.stem + ".onnx")


def export_graph(job: GraphJob, path: Path) -> None:
    import openvino as ov

    onnx_path = _onnx_path(path)
    onnx_path.parent.mkdir(exist_ok=True)
    onnx_target.export_graph(job, onnx_path)
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(path), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"OpenVINO could not convert {job.name}: {first_line(exc)}") from exc


def io_specs(path: Path):
    return onnx_target.io_specs(_onnx_path(path))  # OpenVINO keeps the names; ONNX keeps the axis names


def verify_graph(job: GraphJob, path: Path, rtol: float = 1e-3) -> dict:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    ports = {name: p for p in compiled.outputs for name in p.get_names()}  # a tensor may carry several names

    def run(feeds):
        result = request.infer(feeds)
        return [result[ports[name]].copy() for name in job.output_names]

    return onnx_target.compare_with_torch(job, run, rtol)


def finish(stage: Path) -> None:
    shutil.rmtree(stage / ONNX_DIR, ignore_errors=True)
