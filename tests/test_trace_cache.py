"""Traced graphs reused between exports (exporters/trace_cache.py): found again only for the very same graph."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from conftest import run_cli
from mmedge.exporters import checkpoint as ckpt
from mmedge.exporters.graphs import build_jobs, with_kv_storage
from mmedge.exporters.trace_cache import ENV, LIST, job_key
from mmedge.manifest import load_manifest

SHAPE = "paligemma2-sliding"  # sliding-window layers and soft-capping: settings that live outside the weights


def _jobs(checkpoint, **options):
    family = ckpt.family_for(ckpt.read_config(checkpoint)["model_type"])
    model = family.load(checkpoint)
    return model, {job.name: job for job in build_jobs(family.split(model), max_context=64, **options)}


def graphs(entry):
    """The ONNX graphs a cache entry keeps."""
    return [entry / n for n in (entry / LIST).read_text().split() if n.endswith(".onnx")] if (entry / LIST).exists() else []


def test_the_key_follows_weights_settings_and_storage(checkpoints):
    path = checkpoints[SHAPE]
    model, jobs = _jobs(path)
    keys = {name: job_key(job) for name, job in jobs.items()}
    assert keys == {name: job_key(job) for name, job in _jobs(path)[1].items()}  # a fresh load: the same keys
    assert len(set(keys.values())) == 4

    with torch.no_grad():  # one weight element of the decoder changes only the decoder's key
        model.model.language_model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert {n: job_key(j) for n, j in jobs.items()} == {**keys, "decoder": job_key(jobs["decoder"])}
    assert job_key(jobs["decoder"]) != keys["decoder"]

    _, fresh = _jobs(path)
    fresh["decoder"].module.text_model.config.final_logit_softcapping = 7.0  # a setting, no weight
    assert job_key(fresh["decoder"]) != keys["decoder"]
    _, stateful = _jobs(path, kv_storage="state")
    assert job_key(stateful["decoder"]) != keys["decoder"] and job_key(stateful["projector"]) == keys["projector"]
    # OpenVINO's state decoder is made from the buffer decoder's trace: its twin is found under the same key
    assert job_key(with_kv_storage(stateful["decoder"], "buffer")) == keys["decoder"]


def test_a_second_export_reads_the_traces_and_writes_the_same_graphs(checkpoints, tmp_path, caplog):
    from mmedge.exporters.export import ExportOptions, export

    cache = tmp_path / "traces"
    first = tmp_path / "first"
    # the traced decoder (the default, built on GroupQueryAttention, is not traced): four traced graphs
    export(ExportOptions(model=str(checkpoints[SHAPE]), output=first, progress=False, trace_cache=str(cache),
                         kv_cache="buffer"))
    entries = sorted(p for p in cache.iterdir())
    assert len(entries) == 4 and all(graphs(p) for p in entries)
    # a damaged entry is traced again (and replaced), never used; the smallest graph's, as retracing it is cheapest
    damaged = min((g for e in entries for g in graphs(e)), key=lambda g: g.stat().st_size)
    damaged.write_bytes(b"not a graph")
    with caplog.at_level(logging.INFO, logger="mmedge.exporters.trace_cache"):
        second = tmp_path / "second"
        export(ExportOptions(model=str(checkpoints[SHAPE]), output=second, progress=False, trace_cache=str(cache),
                             kv_cache="buffer"))
    assert caplog.text.count("traced graph read from") == 3 and "unreadable" in caplog.text
    for name, spec in load_manifest(first).graphs.items():
        assert (first / spec.file).read_bytes() == (second / spec.file).read_bytes(), name
    assert load_manifest(second).verification["graphs"]["decoder"]["passed"]  # still verified against PyTorch


def test_the_cli_takes_the_cache_from_the_flag_or_the_environment(checkpoints, trace_cache, tmp_path):
    """OpenVINO: the traced graphs and the IR converted from them are both read back, byte for byte. The cache
    is this test run's own (conftest.trace_cache), so the first export may find the graphs there already."""
    cache = trace_cache
    model = ["--model", str(checkpoints["paligemma-gqa"]), "--target", "openvino"]
    result = run_cli("-v", "export", *model, "-o", str(tmp_path / "a"), "--trace-cache", str(cache), env={ENV: ""})
    assert result.returncode == 0, result.stderr
    used = re.findall(r"(traced graph|OpenVINO IR) (?:read from|kept in) (\S+)", result.stderr)
    assert len(used) == 8 and all(Path(where).parent == cache for _, where in used), result.stderr
    result = run_cli("-v", "export", *model, "-o", str(tmp_path / "b"), env={ENV: str(cache)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("traced graph read from") == 4, result.stderr
    assert result.stderr.count("OpenVINO IR read from") == 4, result.stderr
    first, second = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    assert {n: f.sha256 for n, f in first.files.items()} == {n: f.sha256 for n, f in second.files.items()}
    assert second.verification["graphs"]["decoder"]["passed"]  # the IR read back is verified all the same


def test_the_state_decoder_outputs_the_concat_the_buffer_graph_computes():
    """exporters/onnxruntime_target.outputs_past_and_new on a one-layer graph: present becomes Concat(past, new)."""
    import numpy as np
    import onnxruntime as ort
    import pytest
    from onnx import TensorProto, helper

    from mmedge.errors import ExportError
    from mmedge.exporters.onnxruntime_target import outputs_past_and_new

    def graph(with_concat: bool):
        kv = [1, 2, "n", 4]
        nodes = [helper.make_node("Mul", ["x", "x"], ["present.0.key"])]
        if with_concat:
            nodes.append(helper.make_node("Concat", ["past.0.key", "present.0.key"], ["full"], axis=2))
            nodes.append(helper.make_node("ReduceSum", ["full"], ["logits"], keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceSum", ["present.0.key"], ["logits"], keepdims=1))
        return helper.make_model(helper.make_graph(
            nodes, "g",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv) for n in ("x", "past.0.key")],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, kv)]),
            opset_imports=[helper.make_opsetid("", 18)])

    model = graph(True)
    outputs_past_and_new(model, {"past.0.key": "present.0.key"})
    x, past = np.full((1, 2, 3, 4), 2, np.float32), np.ones((1, 2, 5, 4), np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, present = session.run(["logits", "present.0.key"], {"x": x, "past.0.key": past})
    np.testing.assert_array_equal(present, np.concatenate([past, x * x], axis=2))
    assert logits.item() == present.sum()
    with pytest.raises(ExportError, match="expected one Concat of past.0.key and present.0.key"):
        outputs_past_and_new(graph(False), {"past.0.key": "present.0.key"})


def test_tracing_leaves_out_the_two_node_rewrite_and_puts_it_back(tmp_path, monkeypatch):
    """The one onnxscript rewrite whose pattern is two nodes (SlicesSplit) is not tried while a traced graph is
    optimized (it cost Qwen2.5-VL-3B's vision encoder 18.6 s and cannot match torch's five-input Slices); the
    other rules are, the graph computes what the module does, and the rule set is as it was afterwards."""
    import numpy as np
    import onnxruntime as ort
    from onnxscript import rewriter
    from onnxscript.rewriter import _rewrite_rule

    from mmedge.exporters.graphs import GraphJob
    from mmedge.exporters.onnxruntime_target import export_graph

    class Halves(torch.nn.Module):  # rotate_half's two Slices, the shape of that rule's pattern
        def forward(self, x):
            return torch.cat((-x[..., 4:], x[..., :4]), dim=-1).transpose(0, 1).transpose(0, 1) * 2

    tried = set()
    try_rewrite = _rewrite_rule.RewriteRule.try_rewrite

    def spy(rule, *args, **kwargs):
        tried.add(rule.name)
        return try_rewrite(rule, *args, **kwargs)

    monkeypatch.setattr(_rewrite_rule.RewriteRule, "try_rewrite", spy)
    rules = rewriter._DEFAULT_REWRITE_RULES
    assert "SlicesSplit" in {r.name for r in rules}
    x = torch.randn(3, 8)
    job = GraphJob("halves", Halves(), ["x"], ["y"], {"x": {0: "rows"}}, (x,), [(x,)])
    export_graph(job, tmp_path / "halves.onnx")
    assert "SlicesSplit" not in tried and {"TransposeTranspose", "TransposeIdentity"} <= tried
    assert rewriter._DEFAULT_REWRITE_RULES is rules
    session = ort.InferenceSession(str(tmp_path / "halves.onnx"), providers=["CPUExecutionProvider"])
    x2 = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x2})[0], Halves()(torch.from_numpy(x2)).numpy(), rtol=1e-6)
