"""Export reads weights from the checkpoint as it needs them (exporters/lazy.py): the placeholders know their
tensors, the values read are transformers' own, legacy names are renamed as transformers renames them, and a
graph written that way is the graph written from the loaded model."""

from __future__ import annotations


import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import SHAPES
from mmedge.exporters import lazy
from mmedge.exporters.checkpoint import family_for, read_config


def _family(checkpoint):
    return family_for(read_config(checkpoint)["model_type"])


@pytest.mark.parametrize("shape", SHAPES)
def test_placeholders_read_exactly_what_transformers_loads(checkpoints, shape):
    model = lazy.load(checkpoints[shape])
    assert model is not None, "this checkpoint should not need loading whole"
    loaded = _family(checkpoints[shape]).load(checkpoints[shape])
    want = dict(loaded.named_parameters(remove_duplicate=False))
    for name, param in model.named_parameters(remove_duplicate=False):
        source = lazy.source_of(param)
        assert source is not None and param.untyped_storage().nbytes() <= 4, name  # a placeholder: no memory
        assert torch.equal(source.tensor(), want[name].detach()), name
    buffers = dict(loaded.named_buffers())
    for name, buf in model.named_buffers():  # rotary frequencies, position ids: computed as transformers does
        assert torch.equal(buf, buffers[name]), name


def test_a_bfloat16_checkpoint_with_legacy_names_is_read_as_transformers_reads_it(checkpoints, tmp_path):
    """LLaVA checkpoints name the decoder language_model.model.* (as transformers still saves them; it renames
    them at load) and are stored in half precision on the Hub: both are handled per tensor."""
    from safetensors.torch import load_file, save_file

    import shutil

    src = checkpoints["llava-gqa"]
    ck = tmp_path / "legacy"
    shutil.copytree(src, ck, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = {}
    for path in sorted(src.glob("*.safetensors")):
        state.update(load_file(path))
    legacy = {key: value.to(torch.bfloat16) for key, value in state.items()}
    model_keys = set(_family(src).load(src).state_dict())
    assert any(key.startswith("language_model.model.") for key in legacy) and not set(legacy) <= model_keys
    save_file(legacy, ck / "model.safetensors", metadata={"format": "pt"})
    model = lazy.load(ck)
    assert model is not None
    loaded = _family(ck).load(ck)
    want = dict(loaded.named_parameters(remove_duplicate=False))
    for name, param in model.named_parameters(remove_duplicate=False):
        assert torch.equal(lazy.source_of(param).tensor(), want[name].detach()), name


def test_a_lazily_written_graph_is_the_graph_written_from_the_loaded_model(checkpoints, tmp_path, monkeypatch):
    """The same ops and the same initializer bytes, with the weights streamed into <file>.data (as for a model
    past protobuf's 2 GB) and a checkpoint's fused decoder (deferred weights) too."""
    from mmedge.exporters import onnxruntime_target
    from mmedge.exporters.export import ExportOptions, export

    def graphs(package):
        out = {}
        for path in sorted(package.glob("*.onnx")):
            model = onnx.load(str(path))
            out[path.name] = ([n.op_type for n in model.graph.node],
                              {i.name: numpy_helper.to_array(i).tobytes() for i in model.graph.initializer})
        return out

    monkeypatch.delenv("MMEDGE_TRACE_CACHE", raising=False)  # trace both times: nothing read back from a cache
    inline = onnxruntime_target.EXTERNAL_DATA_BYTES
    # traced decoder; fused decoder (Gemma 2 blocks: norm weights + 1, soft-capping) built from deferred weights
    for shape in ("idefics3-single", "paligemma2-sliding"):
        packages = {}
        for lazily, external in ((False, inline), (True, 0)):
            monkeypatch.setattr(onnxruntime_target, "LAZY_WEIGHTS", lazily)
            monkeypatch.setattr(onnxruntime_target, "EXTERNAL_DATA_BYTES", external)
            packages[lazily] = tmp_path / f"{shape}-{lazily}"
            export(ExportOptions(model=str(checkpoints[shape]), output=packages[lazily], progress=False))
        assert not list(packages[False].glob("*.data")) and len(list(packages[True].glob("*.onnx.data"))) == 4
        assert graphs(packages[False]) == graphs(packages[True]), shape
