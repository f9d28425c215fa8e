"""Core ML target: what can be proven on Linux (the torch modules converted, the saved specs, the
compressed weights, the errors), and prediction tests for macOS that skip elsewhere with their reason.

Core ML runs models only on Apple platforms, so off macOS the converted models are read, not run.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import N_EVAL, NEW_TOKENS, PROMPTS, SHAPES, each_shape, hf_generate, run_cli, sample_images
from mmedge import Pipeline
from mmedge.exporters import checkpoint as ckpt
from mmedge.calibration.coreml import WEIGHT_THRESHOLD
from mmedge.exporters import coreml_target
from mmedge.exporters.export import ExportOptions, export
from mmedge.manifest import load_manifest

ct = pytest.importorskip("coremltools")
MACOS = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs models on macOS only")
SHAPE = "paligemma-gqa"
INT4_OP = "constexpr_blockwise_shift_scale"  # iOS 18 dequantize of INT4/INT8 data with per-block scales


@pytest.fixture(scope="module")
def variants(checkpoints, packages, shared):
    """quant -> package of the tiny PaliGemma for coreml (fp32 from the shared fixture); built once per run."""

    def get(quant: str, **options) -> object:
        if quant == "fp32" and not options:
            return packages(SHAPE, "coreml")
        key = quant + "".join(f"-{k}{v}" for k, v in options.items())
        return shared.folder(f"coreml/{key}".replace(",", "_").replace("=", "_"), lambda out: export(
            ExportOptions(model=str(checkpoints[SHAPE]), output=out, target="coreml", quant=quant, progress=False,
                          **options)))

    return get


def program(path):
    """The saved model's spec and the operations of its main function."""
    spec = ct.utils.load_spec(str(path))
    main = spec.mlProgram.functions["main"]
    return spec, list(main.block_specializations[main.opset].operations)


def const_dtypes(op) -> dict[str, int]:
    """dtype (proto enum) of each inline constant argument of `op`, by input name."""
    out = {}
    for name, arg in op.inputs.items():
        for a in arg.arguments:
            if a.HasField("value"):
                out[name] = a.value.type.tensorType.dataType
    return out


def shape_of(arg) -> list[int]:
    return [d.constant.size for d in arg.arguments[0].value.type.tensorType.dimensions]


# -- the torch module handed to the converter --------------------------------------------------


def torch_pipeline(checkpoint, package):
    """The package's Pipeline over the very torch modules its .mlpackage files were converted from."""
    return coreml_target.simulated_pipeline(package, checkpoint, stored_weights=False)


@pytest.mark.parametrize("shape", each_shape(sorted(SHAPES)))
def test_stateful_decoder_is_token_exact_in_pytorch(shape, checkpoints, packages, reference_tokens):
    """Greedy tokens through the runtime's Pipeline, with the torch modules handed to the converter as its
    graphs, equal transformers' generate. The decoder module is the converted one over float32 buffers
    (the traced graph is the same; Core ML's states hold the buffers in float16, checked below)."""
    pipe, _ = torch_pipeline(checkpoints[shape], packages(shape, "coreml"))
    assert pipe.manifest.kv_cache.storage == "state" and pipe.manifest.kv_cache.dtype == "float16"
    decoder = pipe.graphs["decoder"]
    fp16_state = decoder.module
    decoder.module = fp16_state.with_state_dtype(torch.float32)
    seen, expected = set(), reference_tokens(shape)  # transformers generate(), shared with test_parity
    for name, image in sample_images().items():
        for prompt in PROMPTS:
            got = list(pipe.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
            assert got == expected[name, prompt], f"{shape} image={name} prompt={prompt!r}"
            seen.update(got)
    assert len(seen) > NEW_TOKENS // 2
    # the state restarts per sequence: the uncached path (whole sequence each step, from a reset) agrees
    image = sample_images()["shapes"]
    full = list(pipe.generate_ids(image, PROMPTS[0], max_new_tokens=8, ignore_eos=True, use_cache=False))
    assert full == expected["shapes", PROMPTS[0]][:8]
    if pipe.codec.chat is not None:  # a conversation: the state keeps turn 1 and turn 2 writes after it
        from test_chat import hf_turn, with_images
        from mmedge.evaluate import load_processor

        path = checkpoints[shape]  # a model of its own: the pipeline's was split (Qwen3-VL's patched in place)
        model = ckpt.family_for(ckpt.read_config(path)["model_type"]).load(path)
        processor, chat = load_processor(path), pipe.chat()
        for names, question in (["shapes"], "what is this?"), ([], "and its color?"):
            user = {"role": "user", "content": [{"type": "image"}] * len(names) + [{"type": "text", "text": question}]}
            want = hf_turn(model, processor, with_images(chat.messages() + [user], [image]))
            chat.ask([image] * len(names) or None, question, max_new_tokens=len(want), ignore_eos=True)
            assert chat.history[-1].tokens == want, f"{shape}: turn {len(chat.history) // 2}"
        assert pipe.timings.reused_tokens > 0
    # with float16 buffers, as Core ML keeps them: the next token after every prefix of transformers'
    # answers mostly the same (random weights leave near-ties that fp16 keys and values can flip)
    decoder.module = fp16_state
    agree = total = 0
    for (name, prompt), tokens in expected.items():
        logits = pipe.teacher_forced_logits(sample_images()[name], prompt, tokens)
        agree += int((logits[:-1].argmax(-1) == np.array(tokens)).sum())
        total += len(tokens)
    assert agree / total >= 0.95, f"{shape}: {agree}/{total}"


# -- the saved mlpackages ----------------------------------------------------------------------


def test_specs_io_states_and_deployment_target(variants):
    package = variants("fp32")
    m = load_manifest(package)
    context = m.kv_cache.max_context
    spec, ops = program(package / m.graphs["decoder"].file)
    assert spec.specificationVersion == 9  # iOS 18 / macOS 15: the first with states
    assert m.coreml["deployment_target"] == "iOS18"
    inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
    assert list(inputs) == ["inputs_embeds", "attention_mask", "position_ids"]
    assert inputs["position_ids"].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    seq = inputs["inputs_embeds"].shapeRange.sizeRanges[1]
    assert (seq.lowerBound, seq.upperBound) == (1, context)  # one model for prefill and decode
    mask = inputs["attention_mask"].shapeRange.sizeRanges
    assert [(r.lowerBound, r.upperBound) for r in mask[2:]] == [(1, context), (1, context)]
    assert [f.name for f in spec.description.output] == ["logits"]
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    kv = m.kv_cache
    assert set(states) == {"key_cache", "value_cache"}
    for array in states.values():
        assert list(array.shape) == [kv.num_layers, 1, kv.num_kv_heads, context, kv.head_dim]
        assert array.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    kinds = {op.type for op in ops}
    assert {"read_state", "write_state", "slice_update"} <= kinds  # the cache is written in the graph
    # the manifest describes what an app binds
    assert m.coreml["states"]["key_cache"]["shape"] == [kv.num_layers, 1, kv.num_kv_heads, context, kv.head_dim]
    assert m.graphs["decoder"].inputs["attention_mask"].shape == [1, 1, "seq", "total_len"]
    vision, _ = program(package / m.graphs["vision_encoder"].file)
    assert [f.name for f in vision.description.input] == ["pixel_values"]
    assert list(vision.description.input[0].type.multiArrayType.shape) == [1, 3, m.preprocess.height, m.preprocess.width]
    embed, _ = program(package / m.graphs["embed_tokens"].file)
    assert embed.description.input[0].type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    for part, checked in m.verification["graphs"].items():  # the TorchScript each conversion read, run in PyTorch
        assert checked["torch_traced"]["passed"] and checked["torch_traced"]["cases"] >= 1, part
    report = m.verification["graphs"]["decoder"]
    assert report["passed"] is None and "macOS" in report["not_run"]
    assert report["torch_stateful_wrapper"]["outputs"]["logits"]["max_abs_err"] < 1e-5  # fp32 buffers: exact


def compressed_linears(ops, dtype) -> int:
    """How many linear layers read weights stored as `dtype`; every other one is too small to compress."""
    made = {o.outputs[0].name for o in ops if o.type == INT4_OP and const_dtypes(o)["data"] == dtype}
    assert not [o for o in ops if o.type == INT4_OP and o.outputs[0].name not in made]
    linear = [o for o in ops if o.type in ("linear", "conv")]
    for o in linear:
        weight = o.inputs["weight"].arguments[0]
        assert weight.name in made or np.prod(shape_of(o.inputs["weight"])) <= WEIGHT_THRESHOLD, o.type
    return len([o for o in linear if o.inputs["weight"].arguments[0].name in made])


def _int4_weight(path, name: str):
    """The dequantized INT4 weight `name` of a model, read from its weight file."""
    from coremltools.libmilstoragepython import _BlobStorageReader

    _, ops = program(path)
    op = next(o for o in ops if o.type == INT4_OP and o.attributes["name"].immediateValue.tensor.strings.values[0]
              .startswith(name))
    data, scale = op.inputs["data"].arguments[0].value, op.inputs["scale"].arguments[0].value
    reader = _BlobStorageReader(str(path / "Data/com.apple.CoreML/weights/weight.bin"))
    rows, cols = shape_of(op.inputs["data"])
    q = np.asarray(reader.read_int4_data(data.blobFileValue.offset), np.float32)[: rows * cols].reshape(rows, cols)
    blocks = shape_of(op.inputs["scale"])
    raw = np.asarray(reader.read_fp16_data(scale.blobFileValue.offset))  # the float16 bits, as uint16
    s = raw.astype(np.uint16).view(np.float16).astype(np.float32).reshape(blocks)
    return q * np.repeat(s, cols // blocks[1], axis=1), cols // blocks[1]


@pytest.mark.slow
def test_int4_decoder_weights_are_blockwise_int4(variants, checkpoints):
    package = variants("int4")
    m = load_manifest(package)
    _, ops = program(package / m.graphs["decoder"].file)
    dequant = [o for o in ops if o.type == INT4_OP]
    assert dequant and all(const_dtypes(o)["data"] == ct.proto.MIL_pb2.INT4 for o in dequant)
    assert compressed_linears(ops, ct.proto.MIL_pb2.INT4) >= 5 * m.kv_cache.num_layers
    # the stored weights, dequantized: with --int4-method rtn the model's within half a quantization step;
    # by default each block's range is clipped first, to one of the searched ratios, on calibration data
    model = ckpt.family_for("paligemma").load(checkpoints[SHAPE])
    want = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
    name = "text_model_layers_0_self_attn_q_proj"
    rtn, block = _int4_weight(variants("int4", int4_method="rtn") / m.graphs["decoder"].file, name)
    assert block == 32 and rtn.shape == want.shape
    blocks = np.abs(want).reshape(want.shape[0], -1, block).max(-1)
    step = np.repeat(blocks / 7, block, axis=1)
    assert np.all(np.abs(rtn - want) <= 0.51 * step + 1e-3 * np.abs(want))
    got, _ = _int4_weight(package / m.graphs["decoder"].file, name)
    ratios = np.abs(got).reshape(want.shape[0], -1, block).max(-1) / blocks  # the top level used, x 7 / 7
    from mmedge.calibration.coreml import CLIP_RATIOS
    assert ratios.max() <= 1.0 + 1e-2 and ratios.min() >= min(CLIP_RATIOS) - 0.08
    assert (ratios < 0.97).any()  # some blocks were clipped
    assert m.quantization["calibration"]["used"] and m.quantization["int4_clip"]["error_ratio"] < 1.0
    # the rest of the int4 preset: int8 per channel
    for part in ("vision_encoder", "projector"):
        _, part_ops = program(package / m.graphs[part].file)
        compressed_linears(part_ops, ct.proto.MIL_pb2.INT8)
    assert compressed_linears(program(package / m.graphs["vision_encoder"].file)[1], ct.proto.MIL_pb2.INT8) >= 1
    _, embed_ops = program(package / m.graphs["embed_tokens"].file)
    table = [o for o in embed_ops if o.type == INT4_OP]
    assert len(table) == 1 and const_dtypes(table[0])["data"] == ct.proto.MIL_pb2.INT8  # the embedding table
    q = m.quantization
    assert q["graphs"]["decoder"]["block_size"] == 32 and q["bytes"] < q["bytes_before"]
    assert [m.graphs[p].precision for p in m.graphs] == ["int8", "int8", "int8", "int4"]


def test_clip_search_lowers_the_weighted_error(monkeypatch):
    """The chosen per-block ratios: the weights clipped with them, then rounded as coremltools rounds
    (scale = max |w| / 7 per block), have the activation-weighted error the search reports, below RTN's; the
    same searched a few rows at a time (CLIP_CHUNK: a big model's LM head is not searched whole)."""
    from mmedge.calibration import coreml
    from mmedge.calibration.coreml import CLIP_RATIOS, clip_blocks, clip_ratios

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 8  # outliers that stretch their block's range
    act = rng.gamma(0.5, 1.0, 128).astype(np.float32)
    ratios, errors = clip_ratios(w, act, 32)
    assert ratios.shape == (16, 4) and set(np.unique(ratios)) <= {np.float32(r) for r in CLIP_RATIOS}

    def weighted_rtn_error(x):
        blocks = x.reshape(16, 4, 32)
        scale = np.abs(blocks).max(-1, keepdims=True) / 7
        q = np.clip(np.round(blocks / scale), -7, 7) * scale
        return float((((w.reshape(16, 4, 32) - q) ** 2) * act.reshape(4, 32)).sum())

    assert weighted_rtn_error(w) == pytest.approx(errors["rtn"], rel=1e-4)
    assert weighted_rtn_error(clip_blocks(w, ratios, 32)) == pytest.approx(errors["clipped"], rel=1e-4)
    assert errors["clipped"] < 0.9 * errors["rtn"]
    monkeypatch.setattr(coreml, "CLIP_CHUNK", 3 * 128)  # 3 rows at a time: 16 rows in 6 pieces, the last of 1
    chunked, again = clip_ratios(w, act, 32)
    assert np.array_equal(chunked, ratios) and again == pytest.approx(errors, rel=1e-6)


@pytest.mark.slow
def test_block_size_fp16_and_palettes(variants):
    big = variants("int4", int4_block_size=64)
    m = load_manifest(big)
    _, ops = program(big / m.graphs["decoder"].file)
    op = next(o for o in ops if o.type == INT4_OP)
    rows, cols = shape_of(op.inputs["data"])
    assert shape_of(op.inputs["scale"]) == [rows, cols // 64]
    fp16 = variants("fp16")
    m = load_manifest(fp16)
    _, ops = program(fp16 / m.graphs["decoder"].file)
    assert not [o for o in ops if o.type.startswith("constexpr")]
    linear = [o for o in ops if o.type == "linear"]
    assert linear and all(const_dtypes(o).get("weight", ct.proto.MIL_pb2.FLOAT16) == ct.proto.MIL_pb2.FLOAT16
                          for o in linear)
    pal = variants("fp16,decoder=pal4")
    m = load_manifest(pal)
    _, ops = program(pal / m.graphs["decoder"].file)
    luts = [o for o in ops if o.type == "constexpr_lut_to_dense"]
    assert luts and m.graphs["decoder"].precision == "pal4"
    lut = shape_of(luts[0].inputs["lut"])
    assert lut[-2:] == [16, 1]  # 2^4 entries of scalars
    assert m.quantization["graphs"]["decoder"]["bits"] == 4


def coreml_demo(demo_packages, quant: str):
    """The demo model for coreml at `quant`, with the default 64 calibration samples (int4's AWQ clipping)."""
    return demo_packages("shapes-paligemma", "coreml", quant, "--calib-samples", "64")[0]


@pytest.mark.slow
def test_demo_model_converts_at_every_preset(demo_packages):
    """The trained demo model at fp16 / int8 / int4: converted, compressed, smaller each step."""
    sizes = {}
    for quant in ("fp16", "int8", "int4"):
        m = load_manifest(coreml_demo(demo_packages, quant))
        assert m.graphs["decoder"].precision == {"fp16": "fp16", "int8": "int8", "int4": "int4"}[quant]
        sizes[quant] = sum(f.bytes for f in m.files.values())
        assert m.verification["graphs"]["decoder"]["torch_fp16_state"]["passed"]
    assert sizes["fp16"] > sizes["int8"] > sizes["int4"]
    shown = run_cli("inspect", str(coreml_demo(demo_packages, "int4")))
    assert shown.returncode == 0 and "key_cache" in shown.stdout and "not run" in shown.stdout


@pytest.mark.slow
@pytest.mark.parametrize("quant, bar", [("int8", 0.97 - 0.005), ("int4", 0.97 - 0.02)])
def test_demo_model_keeps_its_accuracy_in_core_ml_weights(demo_packages, quant, bar):
    """Held-out accuracy with the weights the int8 / int4 packages store (read back and dequantized, run in
    PyTorch with the KV cache in fp16 as Core ML's states) within the quantization bars of fp32's 97%."""
    from mmedge.evaluate import PackageAnswerer, evaluate

    pipe, _ = coreml_target.simulated_pipeline(coreml_demo(demo_packages, quant))
    result = evaluate(PackageAnswerer(pipe), n=N_EVAL)  # generate_batch, 16 examples a call
    assert result["accuracy"] >= bar, (quant, result)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_prediction_off_macos_is_one_line(variants, tmp_path):
    package = variants("fp32")
    image = tmp_path / "x.png"
    sample_images()["shapes"].save(image)
    result = run_cli("run", str(package), "--image", str(image), "--prompt", "caption en")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "macOS" in result.stderr
    with pytest.raises(Exception, match="coreml backend only"):
        Pipeline.load(package, backend="onnxruntime")


def test_option_errors(tmp_path):
    cases = [
        (["--target", "coreml", "--kv-cache", "buffer"], "--kv-cache buffer is not available for --target coreml"),
        (["--target", "coreml", "--quant", "fp16,decoder=pal3"], "decoder cannot be 'pal3'"),
        (["--quant", "fp16,decoder=pal4"], "decoder cannot be 'pal4' for --target onnxruntime"),
    ]
    for args, message in cases:
        result = run_cli("export", "--model", "tiny-paligemma", *args, "-o", str(tmp_path / "o"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()


# -- prediction (macOS) ------------------------------------------------------------------------


@pytest.mark.macos
@MACOS
def test_core_ml_greedy_tokens_match_transformers(variants, checkpoints):  # pragma: no cover - macOS
    """fp32 compute on the CPU: the same greedy tokens as transformers; the state restarts per prompt."""
    from mmedge.evaluate import load_processor

    pipe = Pipeline.load(variants("fp32"), device="CPU_ONLY")
    model = ckpt.family_for("paligemma").load(checkpoints[SHAPE])
    processor = load_processor(checkpoints[SHAPE])
    for image in sample_images().values():
        for prompt in PROMPTS:
            got = list(pipe.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
            assert got == hf_generate(model, processor, image, prompt)


@pytest.mark.macos
@MACOS
def test_core_ml_compressed_packages_run_close_to_fp32(variants):  # pragma: no cover - macOS
    ref = Pipeline.load(variants("fp32"), device="CPU_ONLY")
    image = sample_images()["shapes"]
    tokens = list(ref.generate_ids(image, PROMPTS[0], max_new_tokens=NEW_TOKENS, ignore_eos=True))
    want = ref.teacher_forced_logits(image, PROMPTS[0], tokens)
    for quant in ("fp16", "int8", "int4"):
        got = Pipeline.load(variants(quant)).teacher_forced_logits(image, PROMPTS[0], tokens)
        assert got.shape == want.shape and np.isfinite(got).all()
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        assert agree >= {"fp16": 0.95, "int8": 0.5, "int4": 0.3}[quant], (quant, agree)
