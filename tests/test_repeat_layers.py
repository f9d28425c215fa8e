"""A deep decoder traced through its first layers, the rest repeated in the graph (exporters/repeat_layers.py):
the same graph as the whole trace, node for node, and PyTorch's outputs; layers that differ are traced whole."""

from __future__ import annotations

import collections
import dataclasses
import logging

import onnx
import pytest
import torch

from mmedge.exporters import checkpoint as ckpt
from mmedge.exporters import onnxruntime_target as ort_target
from mmedge.exporters import repeat_layers, tiny
from mmedge.exporters.graphs import build_jobs

LAYERS = repeat_layers.MIN_LAYERS + 1

# shape -> whether its layers are alike (repeated) or not (traced whole)
SHAPES = {
    "llava-gqa": True,  # Llama blocks
    "qwen2.5vl-window": True,  # Qwen2 blocks with 3-D rotary positions (mrope)
    "paligemma-mqa": True,  # Gemma blocks, a prefix attended both ways (the mask is an input)
    "paligemma2-sliding": False,  # Gemma 2: sliding and global layers alternate
    "gemma3-sliding": False,  # Gemma 3: five sliding layers to one global one
}


def _deep(shape_name: str, out):
    shape = tiny.shapes()[shape_name]
    text = {**shape.text, "num_hidden_layers": LAYERS}
    if "layer_types" in text:
        text.pop("layer_types")  # rebuilt from the pattern for the new depth
    return tiny.save(dataclasses.replace(shape, text=text), out)


def _decoder(path, kv_storage: str = "buffer"):
    family = ckpt.family_for(ckpt.read_config(path)["model_type"])
    jobs = build_jobs(family.split(family.load(path)), max_context=64, kv_storage=kv_storage)
    return next(j for j in jobs if j.name == "decoder")


def _ops(path) -> tuple:
    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node), len(graph.initializer)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_deep_decoder_is_traced_once_a_layer_where_its_layers_are_alike(shape, tmp_path, monkeypatch):
    checkpoint = _deep(shape, tmp_path / "ckpt")
    job = _decoder(checkpoint)
    plan = repeat_layers.plan(job)
    assert (plan is not None) == SHAPES[shape]
    if plan is None:
        return  # traced whole, as every decoder is tested elsewhere
    repeated = tmp_path / "repeated.onnx"
    ort_target.export_graph(job, repeated)
    check = ort_target.verify_graph(job, repeated, rtol=1e-4)  # against PyTorch on inputs not traced
    assert check["passed"] and check["cases"] >= 2, check
    graph = onnx.load(str(repeated), load_external_data=False).graph
    assert [i.name for i in graph.input] == job.input_names and [o.name for o in graph.output] == job.output_names
    monkeypatch.setattr(repeat_layers, "MIN_LAYERS", LAYERS + 1)  # the same decoder traced whole
    whole = tmp_path / "whole.onnx"
    ort_target.export_graph(_decoder(checkpoint), whole)
    assert _ops(repeated) == _ops(whole)  # the same graph, node for node and weight for weight, up to names


def test_a_repeated_decoder_keeps_its_cache_as_openvino_state(tmp_path):
    """The state storage (past + new as each present) is made from the buffer trace's Concats: one per layer
    and kind in the repeated layers too."""
    job = _decoder(_deep("qwen2.5vl-window", tmp_path / "ckpt"), kv_storage="state")
    assert repeat_layers.plan(job) is not None
    path = tmp_path / "state.onnx"
    ort_target.export_graph(job, path)
    check = ort_target.verify_graph(job, path, rtol=1e-4)
    assert check["passed"], check


def test_a_repeated_decoder_that_does_not_match_pytorch_is_traced_whole(tmp_path, caplog):
    """plan() compares the layers' modules and settings, not their code: a layer that computes otherwise with
    the same settings (here one layer's output doubled) makes a repeated graph that does not match PyTorch;
    the export then traces the decoder whole, and that graph matches."""
    from mmedge.exporters.export import ExportOptions, export_jobs

    job = _decoder(_deep("llava-gqa", tmp_path / "ckpt"))
    layer = job.module.text_model.layers[LAYERS - 2]
    forward = layer.forward

    def doubled(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out * 2 if torch.is_tensor(out) else (out[0] * 2, *out[1:])

    layer.forward = doubled
    assert repeat_layers.plan(job) is not None
    caplog.set_level(logging.WARNING)
    _, report = export_jobs(ort_target, [job], {"decoder": "fp32"}, tmp_path,
                            ExportOptions(model=str(tmp_path / "ckpt"), output=tmp_path / "out", progress=False))
    assert report["decoder"]["passed"] and job.trace_whole and job.repeated_layers == 0
    assert "tracing it whole" in caplog.text
