"""The tools behind docs/scale.md. (A graph over the inline limit, streamed to <file>.data as it is written:
tests/test_parity.py::test_external_data_package.)"""

from __future__ import annotations

import pytest


def test_the_scale_tool_counts_the_memory_of_the_whole_process_tree(tmp_path):
    """tools/scale.py's peak RSS includes children: here a child holds 300 MB that its parent never touches; and a
    forked child's pages, shared with its parent, are not counted twice."""
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
    # a child forked without exec (OpenVINO's telemetry does so) shares its parent's pages: counted once, not twice
    forks = ("import os, time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)\n"
             "pid = os.fork()\nif pid == 0:\n    time.sleep(1.5); os._exit(0)\nos.waitpid(pid, 0)")
    result = scale.measure([sys.executable, "-c", forks], tmp_path / "fork-log")
    assert result["exit"] == 0 and 0.28 <= result["peak_anon_gb"] < 0.45, result


def test_low_memory_sessions_keep_one_copy_of_the_weights_and_the_same_tokens(packages):
    """Pipeline.load(low_memory=True) (the export's final check, calibration of a big decoder, --low-memory):
    ONNX Runtime without prepacking, the same greedy tokens; for another backend it is one clear error."""
    import numpy as np
    from PIL import Image

    from mmedge import InputError, Pipeline

    package = packages("paligemma-gqa")
    image_file = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    def prepacking(pipe) -> bool:
        try:
            return pipe.graphs["decoder"].session.get_session_options().get_session_config_entry(
                "session.disable_prepacking") != "1"
        except RuntimeError:  # not set: onnxruntime prepacks
            return True

    lean, full = Pipeline.load(package, low_memory=True), Pipeline.load(package)
    assert not prepacking(lean) and prepacking(full)
    ask = dict(max_new_tokens=6, ignore_eos=True)
    assert list(lean.generate_ids(image_file, "describe", **ask)) == list(full.generate_ids(image_file, "describe",
                                                                                              **ask))
    # quantized graphs keep prepacking (MatMulNBits' int8 kernels run on packed weights: ~100x slower without)
    int4 = Pipeline.load(packages("paligemma-gqa", quant="int4"), low_memory=True)
    assert prepacking(int4)
    with pytest.raises(InputError, match="low_memory is for the onnxruntime backend"):
        Pipeline.load(package, backend="openvino", low_memory=True)


def test_onnx_runtime_opens_a_packages_graphs_side_by_side(packages, monkeypatch):
    """ONNX Runtime creates a session (optimizing its graph, repacking its weights) outside Python's lock, so
    Pipeline.load opens a package's graphs on worker threads, the biggest first; one thread where the engine may use
    one core. Either way, the same graphs by part and the same tokens."""
    import threading

    from conftest import sample_images
    from mmedge import Pipeline
    from mmedge.runtimes.backends.onnxruntime import OnnxRuntimeBackend

    package = packages("paligemma-gqa")
    seen, load = [], OnnxRuntimeBackend.load

    def spy(self, path):
        seen.append((path.name, threading.current_thread().name))
        return load(self, path)

    monkeypatch.setattr(OnnxRuntimeBackend, "load", spy)
    ask = dict(max_new_tokens=6, ignore_eos=True)
    image = sample_images()["shapes"]
    tokens = {}
    for threads in (2, 1):
        seen.clear()
        pipe = Pipeline.load(package, threads=threads)
        assert list(pipe.graphs) == ["vision_encoder", "projector", "embed_tokens", "decoder"]
        workers = {name for _, name in seen}
        if threads == 2:
            sizes = [sum(f.stat().st_size for f in package.glob(name + "*")) for name, _ in seen]
            assert len(workers) == 2 and all(w.startswith("mmedge-load") for w in workers), seen
            assert sizes == sorted(sizes, reverse=True), seen  # the biggest started first
        else:
            assert workers == {threading.current_thread().name}, seen
        tokens[threads] = list(pipe.generate_ids(image, "caption en", **ask))
    assert tokens[2] == tokens[1]


def test_graphs_run_once_per_request_hand_back_their_arena(packages):
    """The vision encoder and projector (run once per image) shrink ONNX Runtime's CPU arena after each run, so
    their activations do not stay allocated beside the weights; the per-token graphs keep theirs (no allocation
    per token)."""
    from mmedge import Pipeline
    from mmedge.runtimes.backends.onnxruntime import ARENA_SHRINK

    pipe = Pipeline.load(packages("paligemma-gqa"))

    def shrinks(part) -> bool:
        options = pipe.graphs[part].run_options
        return options is not None and options.get_run_config_entry(ARENA_SHRINK[0]) == ARENA_SHRINK[1]

    assert shrinks("vision_encoder") and shrinks("projector")
    assert not shrinks("decoder") and not shrinks("embed_tokens")


def test_held_out_generation_is_cut_to_one_token_where_the_fp32_decoder_does_not_fit(tmp_path, monkeypatch):
    """Measuring a quantized package generates 16 tokens a held-out sample with the fp32 one, each token reading every
    fp32 weight; where those are more than the memory available (LLaVA-1.5-7B's 27 GB decoder on 24 GB), each token
    re-read them from disk, so only the first token is generated."""
    from types import SimpleNamespace

    from mmedge.calibration import package
    from mmedge.exporters import resources

    (tmp_path / "decoder.onnx").write_bytes(b"\0" * 1000)
    (tmp_path / "decoder.onnx.data").write_bytes(b"\0" * 5000)
    manifest = SimpleNamespace(target="onnxruntime", graphs={"decoder": SimpleNamespace(file="decoder.onnx")})
    options = package.QuantOptions()
    monkeypatch.setattr(resources, "available_memory", lambda: 5999)
    assert package._held_out_steps(tmp_path, manifest, options) == 1
    monkeypatch.setattr(resources, "available_memory", lambda: 6000)
    assert package._held_out_steps(tmp_path, manifest, options) == options.decode_steps == 16


def test_a_big_decoder_is_calibrated_after_every_images_vision_side_is_let_go(packages, tmp_path, monkeypatch):
    """Where the decoder is big, calibration and the fp32 side of the held-out measurement run the vision encoder
    and projector on every sample first (their outputs kept in the image cache) and let their engines go before the
    decoder runs, so the two sets of weights are never resident together. Same recorded inputs, same quantized
    graphs byte for byte, same measurements as running each sample whole."""
    import gc
    import shutil
    import weakref

    from mmedge.calibration import layered, package
    from mmedge.calibration.data import load_calibration
    from mmedge.calibration.plan import parse_quant
    from mmedge.manifest import load_manifest

    monkeypatch.setattr(package, "BIG_DECODER_BYTES", 0)  # both runs: this tiny decoder counts as big
    monkeypatch.setattr(layered, "PIECE_BYTES", 1 << 14)  # ... and is run in pieces of a few layers
    released = []
    let_go = package._let_go

    def spy(pipe, parts):
        engines = [weakref.ref(pipe.graphs[part].graph) for part in parts]
        let_go(pipe, parts)
        gc.collect()
        released.append((tuple(parts), [e() is None for e in engines]))

    monkeypatch.setattr(package, "_let_go", spy)
    calib = load_calibration("builtin", 8, held_out=2)
    runs, vision_first = {}, package._vision_first
    for staged in (False, True):
        monkeypatch.setattr(package, "_vision_first", vision_first if staged else lambda *a: [])
        stage = tmp_path / str(staged)
        shutil.copytree(packages("paligemma-gqa"), stage)
        manifest = load_manifest(stage, verify_files=False)
        report = package.quantize_package(stage, manifest, parse_quant("int4", "onnxruntime"), calib,
                                          package.QuantOptions(), progress=False)
        runs[staged] = report, {p.name: p.read_bytes() for p in sorted(stage.glob("*.onnx*"))}
        assert not list(stage.glob(".*.onnx"))  # the tapped copy and the pieces removed
    # calibration, then the held-out measurement: the vision encoder and projector let go, their sessions freed;
    # every graph of the fp32 side let go before its decoder is replayed by layers (calibration/layered.py)
    vision, every = (("vision_encoder", "projector"), [True, True]), (("vision_encoder", "projector",
                                                                        "embed_tokens"), [True] * 3)
    assert released == [every, vision, vision, every]
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]


def test_a_big_float16_package_is_measured_widening_one_weight_at_a_time(packages, tmp_path, monkeypatch):
    """Measuring a big model's float16 package (tensorrt, onnxruntime fp16) on the CPU: ONNX Runtime would widen
    every float16 weight into a float32 copy as the session opens (PaliGemma-3B: 12 GiB anonymous); low_memory
    widens each as the run reaches it: the same report as the default path's. Float16 needs no calibration data:
    no pipeline is opened over the fp32 package for it (OpenVINO compiled PaliGemma-3B's float32 decoder for
    nothing: 12.9 GiB anonymous)."""
    import shutil

    from mmedge.calibration import package
    from mmedge.calibration.data import load_calibration
    from mmedge.calibration.plan import parse_quant
    from mmedge.manifest import load_manifest

    calib = load_calibration("builtin", 8, held_out=2)
    opened, make = [], package._pipeline
    monkeypatch.setattr(package, "_pipeline", lambda *a, **k: opened.append(make(*a, **k)) or opened[-1])
    reports, arenas = {}, {}
    for big in (False, True):
        monkeypatch.setattr(package, "BIG_DECODER_BYTES", 0 if big else 1 << 40)
        stage = tmp_path / str(big)
        shutil.copytree(packages("paligemma-gqa", "tensorrt"), stage)
        manifest = load_manifest(stage, verify_files=False)
        before = len(opened)
        reports[big] = package.quantize_package(stage, manifest, parse_quant("fp16", "tensorrt"), calib,
                                                package.QuantOptions(), progress=False)
        # the measurement's: the fp32 reference, then the float16 package; where the decoder is big, the float16
        # package first, then the fp32 one, its decoder replayed by layers (calibration/layered.py)
        assert len(opened) - before == 2
        decoder = opened[-2 if big else -1].graphs["decoder"].session.get_session_options()
        arenas[big] = decoder.enable_cpu_mem_arena
    assert arenas == {False: True, True: False}  # the float16 decoder measured without the arena's copies
    # the same measurement up to float32 rounding: widened at load, ONNX Runtime fuses the widened weights into its
    # float32 kernels and skips some float16 roundings between them (decoder max abs error 0.01889 vs 0.01892)
    lean, default = reports[True], reports[False]
    near = [("teacher_forced_kl",), ("graphs", "decoder", "held_out_max_abs_err"),
            ("graphs", "decoder", "held_out_rel_l2_err")]
    for path in near:
        *parents, leaf = path
        a, b = lean, default
        for key in parents:
            a, b = a[key], b[key]
        assert a.pop(leaf) == pytest.approx(b.pop(leaf), rel=0.01), path
    assert lean == default


def test_the_logits_generation_computes_are_teacher_forcing_on_its_answer(packages):
    """The held-out measurement takes the fp32 package's teacher-forced logits from its greedy generation
    (Pipeline.logits_out) instead of forcing the answer again: the same rows, bit for bit."""
    import numpy as np

    from conftest import sample_images
    from mmedge import Pipeline

    pipe = Pipeline.load(packages("paligemma-gqa"))
    image = sample_images()["shapes"]
    pipe.logits_out = []
    tokens = list(pipe.generate_ids(image, "caption en", max_new_tokens=8, ignore_eos=True))
    rows = np.stack(pipe.logits_out)
    pipe.logits_out = None
    assert len(tokens) == 8 and rows.shape[0] == 8  # after the prompt and after each token but the last
    assert np.array_equal(rows, pipe.teacher_forced_logits(image, "caption en", tokens[:-1]))
    assert [int(np.argmax(r)) for r in rows] == tokens


def test_whether_greedy_generation_gives_an_answer_is_read_off_its_teacher_forced_rows(packages):
    """The held-out measurement reads whether the quantized package's greedy answer is the fp32 one off its
    teacher-forced rows along that answer (Pipeline.greedy_along) instead of generating again: generation makes
    those very steps while it agrees, so the two give the same tokens, and a forced token generation would not
    choose shows where it parts."""
    import numpy as np

    from conftest import sample_images
    from mmedge import Pipeline

    pipe = Pipeline.load(packages("paligemma-gqa"))
    image = sample_images()["shapes"]
    for budget in (3, 40):  # cut by the budget (its last token's row not computed), and ended by EOS
        tokens = list(pipe.generate_ids(image, "caption en", max_new_tokens=budget))
        forced = tokens[:-1] if len(tokens) == budget else tokens
        rows = pipe.teacher_forced_logits(image, "caption en", forced)
        assert pipe.greedy_along(rows) == tokens
    other = next(t for t in range(rows.shape[1]) if t != tokens[0] and t not in pipe.manifest.special_tokens.eos_ids)
    rows = pipe.teacher_forced_logits(image, "caption en", [other, *tokens[1:]])
    along = pipe.greedy_along(rows)
    assert along[0] == tokens[0] != other  # generation picks its own first token: the forced answer is not its
    assert np.array_equal(rows[0], pipe.teacher_forced_logits(image, "caption en", tokens)[0])


def test_a_big_openvino_vision_encoder_is_quantized_as_onnx_and_runs_in_int8(checkpoints, packages, tmp_path,
                                                                            monkeypatch):
    """NNCF's static INT8 compiles the float32 vision encoder and runs every calibration image through it twice more
    for its statistics (Qwen2.5-VL-3B: 7.9 of the export's 30.8 minutes). A big one is calibrated as ONNX through
    ONNX Runtime, its ranges measured in that pass, quantized to QuantizeLinear/DequantizeLinear by the ONNX
    quantizer and only then converted: the IR runs in INT8, is checked against float32 beside the QDQ graph (a broken
    conversion refused: tests/test_openvino_target.py), and measures about as NNCF's quantization of the same tiny
    model does."""
    import openvino as ov

    from conftest import TINY_CALIB_SAMPLES
    from mmedge.exporters import openvino_target
    from mmedge.exporters.export import ExportOptions, export
    from mmedge.manifest import load_manifest

    monkeypatch.setattr(openvino_target, "STATIC_INT8_ONNX_BYTES", 0)  # this tiny vision side counts as big

    manifest = export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=tmp_path / "big", progress=False,
                                    quant="int4", calib_samples=TINY_CALIB_SAMPLES, target="openvino"))
    nncf = load_manifest(packages("paligemma-gqa", "openvino", "int4")).quantization["graphs"]
    for part in ("vision_encoder", "projector"):
        report = manifest.quantization["graphs"][part]
        assert "onnxruntime" in manifest.verification["graphs"][part]["engine"]
        assert "converted to OpenVINO, run in INT8" in report["scheme"] and report["conversion_check"]["passed"]
        assert report["held_out_rel_l2_err"] <= 1.5 * nncf[part]["held_out_rel_l2_err"] + 0.01, (report, nncf[part])
        compiled = ov.Core().compile_model(str(tmp_path / "big" / f"{part}.xml"), "CPU")
        kernels = {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
                   if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"}
        assert kernels & {"i8", "u8"}, kernels  # the projections run in INT8
    assert manifest.quantization["graphs"]["decoder"]["scheme"].startswith("int4 weight compression")  # NNCF's
    assert not (tmp_path / "big" / ".onnx").exists() and manifest.verification["generation"]["passed"]
    load_manifest(tmp_path / "big")  # every file hashed, nothing outside the package


def test_a_big_openvino_decoder_is_quantized_as_onnx_and_converted_with_compressed_weights(
        checkpoints, packages, tmp_path, monkeypatch):
    """OpenVINO's conversion copies a graph's constants and its CPU plugin repacks float32 weights to run them
    (PaliGemma-3B: ~10 GiB each). A big decoder bound for INT4 is therefore never compiled by OpenVINO in float32:
    verified, calibrated and measured as ONNX through ONNX Runtime, quantized in ONNX, and only then converted; the
    IR keeps the weights compressed, matches the quantized ONNX graph (a broken conversion is refused), and measures
    as NNCF's compression of the same tiny model does."""
    import numpy as np
    import onnx
    import openvino as ov

    from conftest import TINY_CALIB_SAMPLES
    from mmedge.calibration import layered, package
    from mmedge.calibration import openvino as ov_quant
    from mmedge.errors import ExportError
    from mmedge.exporters.export import ExportOptions, export
    from mmedge.manifest import load_manifest

    monkeypatch.setattr(package, "BIG_DECODER_BYTES", 0)  # this tiny decoder counts as big
    monkeypatch.setattr(layered, "PIECE_BYTES", 1 << 14)  # ... and is checked and calibrated in pieces
    compiled, compile_model = [], ov.Core.compile_model

    def watch(core, model, *args, **kwargs):  # what OpenVINO is asked to run: never a float32 decoder
        model = core.read_model(model) if isinstance(model, str) else model
        inputs = {n for port in model.inputs for n in port.get_names()}
        compiled.append(("inputs_embeds" in inputs, any(op.get_type_name() == "Constant" and op.get_element_type()
                                                         == ov.Type.i4 for op in model.get_ordered_ops())))
        return compile_model(core, model, *args, **kwargs)

    monkeypatch.setattr(ov.Core, "compile_model", watch)

    def run(out, **extra):
        return export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=out, progress=False, quant="int4",
                                    calib_samples=TINY_CALIB_SAMPLES, target="openvino", **extra))

    manifest = run(tmp_path / "big")
    decoders = [compressed for decoder, compressed in compiled if decoder]
    assert len(decoders) >= 3 and all(decoders)  # conversion check, measurement, generation check: INT4 IR only
    report = manifest.quantization["graphs"]["decoder"]
    assert "onnxruntime" in manifest.verification["graphs"]["decoder"]["engine"]
    assert manifest.verification["graphs"]["decoder"]["pieces"] >= 3  # checked in pieces, as calibrated
    assert report["conversion_check"]["passed"] and report["conversion_check"]["max_abs_err"] < 1e-4
    assert report["conversion_check"]["pieces"] >= 3  # its reference, the quantized ONNX graph, by layers too
    assert "converted to OpenVINO's compressed weights" in report["scheme"]
    model = ov.Core().read_model(str(tmp_path / "big" / "decoder.xml"))
    weights = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
               and len(op.get_output_shape(0)) >= 2 and op.get_element_type() in (ov.Type.i4, ov.Type.f32)]
    smallest = min(int(np.prod(op.get_output_shape(0))) for op in weights if op.get_element_type() == ov.Type.i4)
    assert not [op for op in weights if op.get_element_type() == ov.Type.f32
                and np.prod(op.get_output_shape(0)) >= smallest]  # no float32 weight matrix left
    assert not (tmp_path / "big" / ".onnx").exists() and manifest.verification["generation"]["passed"]
    load_manifest(tmp_path / "big")  # every file hashed, nothing outside the package
    # as accurate as NNCF's whole-graph compression of the same model (AWQ both; tiny random weights)
    nncf = load_manifest(packages("paligemma-gqa", "openvino", "int4")).quantization
    mine = manifest.quantization
    assert mine["teacher_forced_kl"] <= 1.5 * nncf["teacher_forced_kl"], (mine, nncf)
    assert mine["teacher_forced_top1_agreement"] >= nncf["teacher_forced_top1_agreement"] - 0.1

    # a conversion that changes the quantized weights (one scale negated) is caught, and nothing is written
    convert = ov_quant.convert

    def broken(src, dst, *args, **kwargs):
        model = onnx.load(str(src))
        scale = next(i for i in model.graph.initializer if i.name.endswith("_scale"))
        values = onnx.numpy_helper.to_array(scale)
        scale.CopyFrom(onnx.numpy_helper.from_array(-values, scale.name))
        onnx.save_model(model, str(src.with_name("broken.onnx")))
        convert(src.with_name("broken.onnx"), dst, *args, **kwargs)

    monkeypatch.setattr(ov_quant, "convert", broken)
    with pytest.raises(ExportError, match="does not match its quantized ONNX graph"):
        run(tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
    monkeypatch.setattr(ov_quant, "convert", convert)
    with pytest.raises(ExportError, match="--int4-ratio 0.5 needs NNCF"):
        run(tmp_path / "ratio", int4_ratio=0.5)


def test_a_big_models_default_calibration_stops_at_its_prompt_token_budget(checkpoints, packages):
    """A dynamic-resolution image is as many tokens as its size makes it: a big model's default calibration stops
    once its samples' prompts (counted as the processor counts them) reach its token budget, at least MIN_SAMPLES,
    in their order; the set records what it used. Without a budget (--calib-samples given) every sample runs."""
    from mmedge.calibration import package
    from mmedge.calibration.data import MIN_SAMPLES, load_calibration
    from mmedge.evaluate import load_processor
    from mmedge.runtimes import Pipeline

    from test_qwen_vl import hf_inputs

    processor = load_processor(checkpoints["qwen2vl-gqa"])
    pipe = Pipeline.load(packages("qwen2vl-gqa"))
    fresh = lambda: load_calibration("builtin", 12, held_out=2)  # noqa: E731
    lengths = [pipe.prompt_tokens(s.image, s.prompt) for s in fresh().calibrate]
    assert lengths == [hf_inputs(processor, [s.image], s.prompt)["input_ids"].shape[1] for s in fresh().calibrate]
    assert len(set(lengths)) > 4  # the photographs' sizes make prompts of many lengths

    calib = fresh()
    calib.token_budget = sum(lengths[:10]) + lengths[10] - 1  # the eleventh sample would pass it
    assert package._within_budget(pipe, calib) == calib.calibrate == fresh().calibrate[:10]
    assert calib.describe()["calibration_samples"] == 10
    assert (calib.describe()["prompt_tokens"], calib.describe()["token_budget"]) == (sum(lengths[:10]),
                                                                                  calib.token_budget)
    calib = fresh()
    calib.token_budget = 1  # the first sample is over it: the minimum still calibrates
    assert len(package._within_budget(pipe, calib)) == MIN_SAMPLES
    calib = fresh()
    assert package._within_budget(pipe, calib) == fresh().calibrate and "token_budget" not in calib.describe()
    # an encoder-decoder's prompt is what its encoder reads, the image's tokens and the text's (Florence-2), not the
    # decoder's start tokens
    florence, processor = Pipeline.load(packages("florence2-tiny")), load_processor(checkpoints["florence2-tiny"])
    image = fresh().calibrate[0].image
    for task in ("<CAPTION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a red square"):
        expected = processor(text=task, images=image, return_tensors="np")["input_ids"].shape[1]
        assert florence.prompt_tokens(image, task) == expected, task


@pytest.mark.parametrize("shape,target", [("paligemma-gqa", "onnxruntime"), ("qwen2vl-gqa", "onnxruntime"),
                                          ("paligemma-gqa", "tensorrt"), ("qwen2vl-gqa", "tensorrt")])
def test_a_big_decoder_run_by_layers_gives_the_whole_graphs_outputs(packages, shape, target):
    """calibration/layered.py: the decoder cut into pieces of a few layers, a Pipeline run with the decoder deferred
    (its inputs kept), then every sequence replayed piece after piece over its own cache slots: the teacher-forced
    logits and every MatMul input of the whole graph, for the fused decoder (GroupQueryAttention writing its cache in
    place; Qwen2-VL's 3-D positions) and a traced one (the "buffer" cache, masks over the whole buffer)."""
    import numpy as np

    from mmedge.calibration import layered
    from mmedge.calibration.data import load_calibration
    from mmedge.calibration.onnxruntime import _tapped_copy
    from mmedge.manifest import load_manifest
    from mmedge.runtimes import Pipeline
    from mmedge.runtimes.backends import get_backend

    package = packages(shape, target)
    manifest = load_manifest(package, verify_files=False)
    decoder = package / manifest.graphs["decoder"].file
    tapped = decoder.with_name(".tapped-" + decoder.name)
    taps = _tapped_copy(decoder, tapped)
    samples = load_calibration("builtin", 8, held_out=2).held_out
    forced = [[5, 9, 2], [7]]
    whole = Pipeline.load(package, backend="onnxruntime", low_memory=True)
    recorded = []
    graph = whole.graphs["decoder"]

    class Taps:  # the whole graph's MatMul inputs, recorded as it runs
        def __init__(self):
            self.session = get_backend("onnxruntime", low_memory=True).load(tapped)
            self.input_names = graph.input_names

        def run(self, inputs, into=None):
            out = self.session.run(inputs, into=into)
            recorded[-1].append({t: out.pop(t) for t in taps})
            return out

    whole.graphs["decoder"] = Taps()
    want = []
    for sample, tokens in zip(samples, forced):
        recorded.append([])
        want.append(whole.teacher_forced_logits(sample.image, sample.prompt, tokens))

    deferred = layered.Deferred(manifest)
    pipe = Pipeline.load(package, backend="onnxruntime", low_memory=True)
    pipe.graphs["decoder"] = deferred
    for sample, tokens in zip(samples, forced):
        deferred.begin()
        pipe.teacher_forced_logits(sample.image, sample.prompt, tokens)
    assert [len(s) for s in deferred.sequences] == [4, 2]  # the prefill and a step per forced token
    size = sum(p.stat().st_size for p in package.glob(decoder.name + "*"))
    pieces = layered.split(tapped, budget=size // 10)
    try:
        assert len(pieces) >= 3
        got = [[{} for _ in steps] for steps in deferred.sequences]
        load = get_backend("onnxruntime", low_memory=True).load
        layered.replay(pieces, deferred.sequences, load, manifest.kv_cache,
                       lambda s, t, out: got[s][t].update(out), progress=False)
    finally:
        layered.remove(pieces)
        tapped.unlink()
    assert not any(p.path.exists() for p in pieces)  # (another test may be writing its own into this package)
    for s, steps in enumerate(got):
        logits = np.stack([out["logits"][0, -1] for out in steps])
        assert np.abs(logits - want[s]).max() < 1e-4 * max(1.0, np.abs(want[s]).max())
        for t, out in enumerate(steps):
            for tap in taps:
                assert np.allclose(out[tap], recorded[s][t][tap], rtol=1e-4, atol=1e-5), tap


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_a_big_decoder_generates_by_layers_as_the_whole_graph_does(packages, target):
    """The export's generation check of a big float32 decoder (layered.ByLayers: each step through the pieces in
    turn, over the Pipeline's own cache): the whole graph's tokens and next-token logits, for GroupQueryAttention
    writing its cache in place and for a traced decoder over "buffer" slots."""
    import numpy as np

    from mmedge.calibration import layered
    from mmedge.calibration.data import load_calibration
    from mmedge.manifest import load_manifest
    from mmedge.runtimes import Pipeline
    from mmedge.runtimes.backends import get_backend

    package = packages("qwen2vl-gqa", target)
    manifest = load_manifest(package, verify_files=False)
    decoder = package / manifest.graphs["decoder"].file
    sample = load_calibration("builtin", 8, held_out=1).held_out[0]
    answers = []
    for by_layers in (False, True):
        pipe = Pipeline.load(package, backend="onnxruntime", low_memory=True, verify=False)
        if by_layers:
            size = sum(p.stat().st_size for p in package.glob(decoder.name + "*"))
            pieces = layered.split(decoder, budget=size // 10)
            pipe.graphs["decoder"] = layered.ByLayers(pieces, get_backend("onnxruntime", low_memory=True).load)
        pipe.logits_out = []
        try:
            tokens = list(pipe.generate_ids(sample.image, sample.prompt, max_new_tokens=5, ignore_eos=True))
        finally:
            if by_layers:
                layered.remove(pieces)
        answers.append((tokens, np.stack(pipe.logits_out)))
    assert len(pieces) >= 3 and pipe.graphs["decoder"].calls == 5 and not any(p.path.exists() for p in pieces)
    (want, want_logits), (got, got_logits) = answers
    assert got == want
    assert np.abs(got_logits - want_logits).max() < 1e-4 * max(1.0, np.abs(want_logits).max())


def test_a_quantized_decoder_is_cut_with_each_dequantized_weight_beside_its_matmul(packages, tmp_path):
    """layered.split on a decoder whose quantizer put every DequantizeLinear at the graph's top (weight-only INT8 with
    float32 compute: what OpenVINO's staged big decoder is converted from, and the reference of that conversion's
    check): each DequantizeLinear moves beside the MatMul that reads it, no dequantized weight crosses a cut (at
    Qwen2.5-VL-3B's size every one of them did: 23 GiB), and the pieces give the whole graph's logits."""
    import numpy as np
    import onnx

    from mmedge.calibration import layered
    from mmedge.calibration import onnxruntime as ort_quant
    from mmedge.calibration import tensorrt as dq_quant
    from mmedge.calibration.data import load_calibration
    from mmedge.calibration.package import QuantOptions
    from mmedge.manifest import load_manifest
    from mmedge.runtimes import Pipeline
    from mmedge.runtimes.backends import get_backend

    package = packages("qwen2vl-gqa", "tensorrt")  # a traced decoder, "buffer" cache
    manifest = load_manifest(package, verify_files=False)
    src = package / manifest.graphs["decoder"].file
    quantized = tmp_path / "decoder.onnx"
    dq_quant.quantize_decoder(src, quantized, "int8", QuantOptions(), None, ort_quant._lm_head_vocab(src), fp16=False)
    graph = onnx.load(str(quantized), load_external_data=False).graph
    nodes, weights = graph.node, sum(layered._initializer_bytes(i) for i in graph.initializer)
    assert nodes[0].op_type == "DequantizeLinear"
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    deferred = layered.Deferred(manifest)
    pipe = Pipeline.load(package, backend="onnxruntime", low_memory=True, verify=False)
    pipe.graphs["decoder"] = deferred
    sample = load_calibration("builtin", 8, held_out=1).held_out[0]
    deferred.begin()
    pipe.teacher_forced_logits(sample.image, sample.prompt, [5, 9, 2])
    load = get_backend("onnxruntime", low_memory=True).load
    answers = []
    for budget in (4 * weights, weights // 8):
        pieces = layered.split(quantized, budget=budget)
        crossing = {name for piece in pieces[1:] for name in piece.inputs}
        got = [{} for _ in deferred.sequences[0]]
        try:
            layered.replay(pieces, deferred.sequences, load, manifest.kv_cache, lambda s, t, out: got[t].update(out),
                           progress=False)
        finally:
            layered.remove(pieces)
        answers.append((len(pieces), crossing & dequantized, np.stack([out["logits"][0, -1] for out in got])))
    (whole_pieces, _, whole), (pieces, crossed, by_layers) = answers
    assert whole_pieces == 1 and pieces >= 3 and not crossed
    assert np.abs(by_layers - whole).max() < 1e-4 * max(1.0, np.abs(whole).max())


def test_a_big_decoder_is_checked_at_export_by_layers(checkpoints, packages, tmp_path, monkeypatch):
    """The export's check of a big float32 decoder against PyTorch runs it a few layers at a time
    (calibration/layered.py; GroupQueryAttention's presents bound to their past as the runtime binds them): the same
    errors as the whole graph's check, no piece left in the package."""
    import numpy as np

    from conftest import TINY_CALIB_SAMPLES
    from mmedge.calibration import layered, package
    from mmedge.exporters.export import ExportOptions, export, generate_once
    from mmedge.manifest import load_manifest

    whole_package = packages("qwen2vl-gqa")
    whole_tokens = generate_once(whole_package, load_manifest(whole_package, verify_files=False))["tokens"]
    monkeypatch.setattr(package, "BIG_DECODER_BYTES", 0)
    monkeypatch.setattr(layered, "PIECE_BYTES", 1 << 14)
    manifest = export(ExportOptions(model=str(checkpoints["qwen2vl-gqa"]), output=tmp_path / "pkg", progress=False,
                                    calib_samples=TINY_CALIB_SAMPLES, target="onnxruntime"))
    whole = load_manifest(whole_package).verification["graphs"]["decoder"]
    pieces = manifest.verification["graphs"]["decoder"]
    assert pieces["passed"] and pieces["pieces"] >= 3 and "pieces" not in whole
    assert manifest.kv_cache.storage == "in_place"
    for name, err in whole["outputs"].items():
        assert np.isclose(pieces["outputs"][name]["max_abs_err"], err["max_abs_err"], rtol=0.05, atol=1e-6), name
    generation = manifest.verification["generation"]  # the package run once, its decoder by layers too
    assert generation["passed"] and generation["pieces"] >= 3 and generation["tokens"] == whole_tokens
    assert not list((tmp_path / "pkg").glob(".piece*"))
