"""ONNX Runtime backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from mmedge.errors import MmedgeError, first_line

log = logging.getLogger(__name__)


class OnnxRuntimeGraph:
    def __init__(self, session):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values))


class OnnxRuntimeBackend:
    """Runs ONNX graphs with onnxruntime.

    providers: execution providers in priority order (default CPU). threads:
    intra-op threads (0 = onnxruntime's default, one per physical core).
    """

    name = "onnxruntime"

    def __init__(self, providers: Sequence[str] | None = None, threads: int = 0, device: str | None = None):
        if device:
            raise MmedgeError("onnxruntime picks its device through execution providers: pass --providers, not --device")
        try:
            import onnxruntime as ort
        except ImportError:
            raise MmedgeError("onnxruntime is not installed; `pip install onnxruntime` (or onnxruntime-gpu)") from None
        self._ort = ort
        available = ort.get_available_providers()
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in self.providers if p not in available]
        if unknown:
            raise MmedgeError(
                f"onnxruntime here has no {', '.join(unknown)}; available: {', '.join(available)}"
            )
        self.threads = threads

    def load(self, path: Path) -> OnnxRuntimeGraph:
        opts = self._ort.SessionOptions()
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        try:
            session = self._ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise MmedgeError(f"onnxruntime could not load {path.name}: {first_line(exc)}") from None
        return OnnxRuntimeGraph(session)
