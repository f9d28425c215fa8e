"""The tensorrt target: graphs TensorRT's parser takes, precision written into them, profiles the runtime's
shapes fall in, one-line errors without TensorRT; engines and the TensorRT backend where there is a GPU.

Without a GPU the packages' graphs run through ONNX Runtime on CPU (`--backend onnxruntime`), which is also
how conftest's shared parity runner (token-exact against transformers, cache == recompute) covers this target
for every family. Tests marked `gpu` need TensorRT and an NVIDIA GPU, and skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import BACKEND, PROMPTS, SHAPES, run_cli, sample_images, slow
from mmedge import Pipeline
from mmedge.calibration.package import Recorder
from mmedge.exporters import tensorrt_ops
from mmedge.manifest import load_manifest

SHAPE = "paligemma-gqa"
PARTS = ("vision_encoder", "projector", "embed_tokens", "decoder")
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def trt_packages(packages):
    """quant -> tensorrt package of the tiny random PaliGemma (conftest's shared packages)."""
    return lambda quant: packages(SHAPE, "tensorrt", quant)


def _graph(package, part) -> onnx.ModelProto:
    return onnx.load(str(package / f"{part}.onnx"))


@pytest.mark.parametrize("quant", ["fp32", pytest.param("fp16", marks=pytest.mark.slow),
                                   pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_every_op_and_type_is_one_the_parser_takes(trt_packages, quant):
    package = trt_packages(quant)
    for part in PARTS:
        assert tensorrt_ops.unsupported(_graph(package, part)) == [], (quant, part)


def test_the_parser_check_finds_what_tensorrt_would_reject(packages):
    """The onnxruntime target's graphs hold what TensorRT's parser rejects; the check names it."""
    fused = tensorrt_ops.unsupported(_graph(packages("llava-gqa", "onnxruntime"), "decoder"))
    assert any(found.startswith("com.microsoft.GroupQueryAttention") for found in fused), fused
    model = _graph(packages(SHAPE, "tensorrt"), "embed_tokens")
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64), model.graph.initializer[0].name))
    assert any("DOUBLE" in found for found in tensorrt_ops.unsupported(model))


@pytest.mark.slow
def test_precision_is_written_into_the_graphs(trt_packages):
    fp16 = _graph(trt_packages("fp16"), "decoder")
    types = tensorrt_ops.tensor_types(fp16)
    weights = {n.input[1] for n in fp16.graph.node if n.op_type == "MatMul" and n.input[1] in
               {i.name for i in fp16.graph.initializer}}
    assert weights and {types[w] for w in weights} == {TensorProto.FLOAT16}
    islands = [n for n in fp16.graph.node if n.op_type in ("Softmax", "ReduceMean", "Sqrt")]
    assert islands and all(types[n.output[0]] == TensorProto.FLOAT for n in islands)  # fp32 islands
    assert {types[i.name] for i in fp16.graph.input} <= {TensorProto.FLOAT, TensorProto.INT64}  # fp32 I/O

    vision = _graph(trt_packages("int8"), "vision_encoder")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in vision.graph.initializer}
    quantize = [n for n in vision.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any() for n in quantize)

    decoder = _graph(trt_packages("int4"), "decoder")
    assert max(o.version for o in decoder.opset_import if o.domain in ("", "ai.onnx")) >= 21
    dq = {n.input[0]: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
          for n in decoder.graph.node if n.op_type == "DequantizeLinear"}
    kinds = {i.name: i.data_type for i in decoder.graph.initializer if i.name in dq}
    int4 = [name for name, kind in kinds.items() if kind == TensorProto.INT4]
    assert int4 and all(dq[name]["block_size"] == 64 and dq[name]["axis"] == 0 for name in int4)
    assert TensorProto.INT8 in kinds.values()  # the LM head, per channel


# a cross-attention family too: its decoder takes image keys and values of any prompt's length (cross_len)
CROSS_SHAPE = next(name for name, shape in SHAPES.items() if shape.family == "mllama")


@pytest.mark.parametrize("shape", [SHAPE, pytest.param(CROSS_SHAPE, marks=slow)])
def test_profiles_hold_every_shape_the_runtime_feeds(shape, packages):
    package = packages(shape, "tensorrt")
    manifest = load_manifest(package)
    profiles = manifest.tensorrt["profiles"]
    context = manifest.kv_cache.max_context
    prefill, decode = profiles["decoder"]
    assert decode["inputs_embeds"]["max"][1] == 1 and prefill["inputs_embeds"]["max"][1] == context
    for name in ("past.0.key", "past.1.value"):
        assert prefill[name]["min"] == prefill[name]["max"] == decode[name]["opt"]  # the whole cache, always
        assert prefill[name]["max"][2] == context
    for part, listed in profiles.items():
        for profile in listed:
            assert set(profile) == set(manifest.graphs[part].inputs), part
            for shape in profile.values():
                assert all(lo <= opt <= hi for lo, opt, hi in zip(shape["min"], shape["opt"], shape["max"]))

    pipe = Pipeline.load(package, backend="onnxruntime")
    for part in PARTS:
        pipe.graphs[part] = Recorder(pipe.graphs[part])
    for prompt in PROMPTS:
        list(pipe.generate_ids(sample_images()["shapes"], prompt, max_new_tokens=4, ignore_eos=True))
    if pipe.cross_names:  # no image (one position), and two images
        list(pipe.generate_ids(None, PROMPTS[0], max_new_tokens=2, ignore_eos=True))
        list(pipe.generate_ids([sample_images()["wide"], sample_images()["noise"]], PROMPTS[0], max_new_tokens=2,
                               ignore_eos=True))
    for part in PARTS:
        assert pipe.graphs[part].feeds
        for feeds in pipe.graphs[part].feeds:
            assert any(all(all(lo <= d <= hi for d, lo, hi in zip(array.shape, profile[name]["min"],
                                                                    profile[name]["max"]))
                           for name, array in feeds.items())
                       for profile in profiles[part]), (part, {n: a.shape for n, a in feeds.items()})


def _greedy(pipe) -> list[list[int]]:
    return [list(pipe.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
            for image in sample_images().values() for prompt in PROMPTS]


@pytest.mark.slow
def test_fp16_graphs_agree_with_fp32_on_the_tiny_random_model(trt_packages):
    """Measured on this model: 5 of 6 greedy runs identical, 98.5% teacher-forced top-1 (fp16 rounding on
    random weights, whose logits are nearly tied)."""
    ref = _greedy(Pipeline.load(trt_packages("fp32"), backend="onnxruntime"))
    package = trt_packages("fp16")
    got = _greedy(Pipeline.load(package, backend="onnxruntime"))
    assert sum(a == b for a, b in zip(ref, got)) >= len(ref) // 2, (ref, got)
    assert load_manifest(package).quantization["teacher_forced_top1_agreement"] >= 0.95
    # low_memory (the export's own checks of a big model): each float16 weight widened as the run reaches it, not
    # all of them when the session opens; the same tokens (the two differ by float32 rounding only)
    lean = Pipeline.load(package, backend="onnxruntime", low_memory=True)
    assert not lean.graphs["decoder"].session.get_session_options().enable_cpu_mem_arena
    assert _greedy(lean) == got


@pytest.mark.slow
def test_demo_model_fp16_on_the_tensorrt_graphs_keeps_its_accuracy(demo_packages, scores):
    package, _ = demo_packages("shapes-paligemma", "tensorrt", "fp16")
    result = scores(package, BACKEND["tensorrt"])  # N_EVAL = 1000 held-out examples
    assert result["n"] == 1000 and result["accuracy"] >= 0.975  # fp32: 0.984 on the same examples


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_every_command_says_so_in_one_line(packages, checkpoints, tmp_path):
    package = packages(SHAPE, "tensorrt")
    image = tmp_path / "shapes.png"
    sample_images()["shapes"].save(image)
    for args in (["build", str(package)],
                 ["run", str(package), "--image", str(image), "--prompt", "caption en"],
                 ["export", "--model", str(checkpoints[SHAPE]), "--target", "tensorrt", "--build-engines",
                  "-o", str(tmp_path / "never")]):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and "TensorRT is not installed" in result.stderr, result.stderr
    assert not (tmp_path / "never").exists()
    shown = run_cli("run", str(package), "--image", str(image), "--prompt", "caption en", "--backend", "onnxruntime")
    assert shown.returncode == 0 and shown.stdout.strip()
    shown = run_cli("inspect", str(package))
    assert shown.returncode == 0 and "TensorRT optimization profiles" in shown.stdout and "none yet" in shown.stdout


def test_tensorrt_only_options_are_refused_in_one_line(packages, checkpoints, tmp_path):
    for args, message in (
        (["build", str(packages(SHAPE, "onnxruntime"))], "builds TensorRT packages"),
        (["export", "--model", str(checkpoints[SHAPE]), "--target", "tensorrt", "--quant", "int4",
          "--int4-block-size", "32", "-o", str(tmp_path / "a")], "must be one of 64, 128 for --target tensorrt"),
        (["export", "--model", str(checkpoints[SHAPE]), "--target", "tensorrt", "--kv-cache", "state",
          "-o", str(tmp_path / "b")], "--kv-cache state is not available for --target tensorrt"),
        (["export", "--model", str(checkpoints[SHAPE]), "--build-engines", "-o", str(tmp_path / "c")],
         "--build-engines is for --target tensorrt"),
    ):
        result = run_cli(*args)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


# -- on a GPU with TensorRT -----------------------------------------------------------------------------------


def _gpu_missing() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "needs TensorRT (pip install tensorrt, or JetPack)"
    from mmedge.errors import MmedgeError
    from mmedge.runtimes.backends import cuda

    try:
        return None if cuda.device_count() else "needs an NVIDIA GPU"
    except MmedgeError as exc:
        return f"needs a working CUDA runtime: {exc}"


@pytest.mark.parametrize("quant", ["fp32", "fp16", "int4"])
@pytest.mark.gpu
@pytest.mark.skipif(_gpu_missing() is not None, reason=str(_gpu_missing()))
def test_engines_build_once_and_generate_as_onnxruntime_does(trt_packages, quant, tmp_path):
    from mmedge.runtimes.backends.tensorrt_build import build_package

    package = tmp_path / quant
    shutil.copytree(trt_packages(quant), package)
    manifest = load_manifest(package)
    built = build_package(package, manifest, progress=False)
    assert all(isinstance(seconds, float) for seconds in built.values()), built
    assert set(build_package(package, manifest, progress=False).values()) == {"current"}

    on_gpu = Pipeline.load(package)  # the tensorrt backend: KV cache on the GPU
    assert on_gpu.graphs["decoder"].holds_cache
    on_cpu = Pipeline.load(package, backend="onnxruntime")
    got, ref = _greedy(on_gpu), _greedy(on_cpu)
    assert _greedy(on_gpu) == got  # the cache starts over for each prompt
    if quant == "fp32":
        assert got == ref  # TF32 is off: fp32 is fp32
    image = sample_images()["shapes"]
    a = on_cpu.teacher_forced_logits(image, PROMPTS[0], ref[0])
    b = on_gpu.teacher_forced_logits(image, PROMPTS[0], ref[0])
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95
    assert np.abs(a - b).max() <= (1e-3 if quant == "fp32" else 0.1) * max(1.0, np.abs(a).max())


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_missing() is not None, reason=str(_gpu_missing()))
def test_demo_model_on_tensorrt_engines_keeps_its_accuracy(tmp_path):
    for quant in ("fp32", "int4"):
        out = tmp_path / quant
        exported = run_cli("export", "--model", "shapes-paligemma", "--target", "tensorrt", "--quant", quant,
                           "--calib-samples", "32", "--build-engines", "-o", str(out))
        assert exported.returncode == 0, exported.stderr
        result = run_cli("eval", str(out), "-n", "1000", "--json")
        assert result.returncode == 0, result.stderr
        accuracy = json.loads(result.stdout)["accuracy"]
        assert accuracy >= (0.975 if quant == "fp32" else 0.96), (quant, accuracy)
