"""What lets an export scale past a few hundred MB, exercised on a tiny model's graph: a graph whose weights
exceed the inline limit streams them to <file>.data as it is written, keeps its named axes, and verifies
against PyTorch as one written inline."""

from __future__ import annotations

import onnx

from mmedge.exporters import checkpoint as ckpt
from mmedge.exporters import onnxruntime_target
from mmedge.exporters.graphs import build_jobs


def test_a_graph_over_the_inline_limit_streams_its_weights_beside_it(checkpoints, tmp_path, monkeypatch):
    path = checkpoints["paligemma-gqa"]
    family = ckpt.family_for(ckpt.read_config(path)["model_type"])
    job = next(j for j in build_jobs(family.split(family.load(path)), max_context=64) if j.name == "vision_encoder")
    monkeypatch.setattr(onnxruntime_target, "EXTERNAL_DATA_BYTES", 0)  # this graph counts as big
    graph = tmp_path / "vision_encoder.onnx"
    onnxruntime_target.export_graph(job, graph)  # job.trace_cache is None: traced here
    model = onnx.load(str(graph), load_external_data=False)
    biggest = max(model.graph.initializer, key=lambda t: int(next((e.value for e in t.external_data
                                                                    if e.key == "length"), 0)))
    assert biggest.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / "vision_encoder.onnx.data").stat().st_size >= int(biggest.external_data[-1].value)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][0] == "batch"
    assert onnxruntime_target.verify_graph(job, graph)["passed"]


def test_the_scale_tool_counts_the_memory_of_the_whole_process_tree(tmp_path):
    """tools/scale.py's peak RSS includes children: here a child holds 300 MB that its parent never touches."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[1] / "tools" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    child = "b = bytearray(300 << 20); import time; time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    result = scale.measure([sys.executable, "-c", parent], tmp_path / "log")
    assert result["exit"] == 0 and result["peak_rss_gb"] >= 0.29, result
