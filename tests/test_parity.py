"""Exported packages against transformers: the same greedy tokens, image preprocessing and prompt ids.

One runner over every tiny family shape and target (conftest.CASES).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from mmedge.evaluate import load_processor

from conftest import BACKEND, CASES, NEW_TOKENS, PROMPTS, SHAPES, each_shape, matrix, sample_images, slow
from mmedge import Pipeline
from mmedge.evaluate import reference_inputs
from mmedge.runtimes.preprocess import preprocess, preprocess_with_grid


@pytest.fixture(scope="module")
def processors(checkpoints):
    cache = {}

    def get(shape):
        if shape not in cache:
            cache[shape] = load_processor(checkpoints[shape])
        return cache[shape]

    return get


@pytest.mark.parametrize("shape,target", matrix())
def test_greedy_tokens_match_transformers(shape, target, packages, reference_tokens):
    reference = reference_tokens(shape)  # transformers generate(), computed once per shape for every target
    pipe = Pipeline.load(packages(shape, target), backend=BACKEND.get(target))
    seen = set()
    for image_name, image in sample_images().items():
        for prompt in PROMPTS:
            expected = reference[image_name, prompt]
            got = list(pipe.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
            assert got == expected, f"{shape}/{target} image={image_name} prompt={prompt!r}"
            seen.update(got)
    assert len(seen) > NEW_TOKENS // 2, "the tiny model should not be degenerate (repeating one token)"
    if pipe.max_batch == 1:  # Core ML's fixed batch: generate_batch refuses more (tests/test_errors.py)
        return
    # the same pairs as one batch (prompts of different lengths, left-padded or prefilled row by row)
    pairs = [(name, image, prompt) for name, image in sample_images().items() for prompt in PROMPTS]
    batched = pipe.generate_ids_batch([(image, prompt) for _, image, prompt in pairs], max_new_tokens=NEW_TOKENS,
                                      ignore_eos=True)
    for (name, _, prompt), got in zip(pairs, batched):
        assert got == reference[name, prompt], f"batched: {shape}/{target} image={name} prompt={prompt!r}"


@pytest.mark.parametrize("shape,target", matrix())
def test_kv_cache_equals_recompute(shape, target, packages):
    pipe = Pipeline.load(packages(shape, target), backend=BACKEND.get(target))
    image = sample_images()["shapes"]
    for prompt in PROMPTS:
        cached = list(pipe.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
        full = list(pipe.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, use_cache=False))
        assert cached == full


# onnxruntime builds the decoder on GroupQueryAttention (KV cache written in place) for Llama- and Gemma-block
# decoders whose head size is a multiple of 16 (PaliGemma's prefix, Gemma 3's image blocks and sliding windows
# as attention bias); every other shape keeps the traced decoder
IN_PLACE = {"smolvlm-tiles": True, "llava-gqa": True, "llava-full-multilayer": True, "idefics3-single": False,
            "paligemma-gqa": True, "paligemma2-sliding": True, "gemma3-sliding": True, "qwen2vl-gqa": True,
            "internvl-tiles": True, "internvl-single": True, "glm4v-gqa": False}


# in the contributors' loop: the Llama-block case (Qwen2-VL's M-RoPE one runs in its greedy parity case there)
@pytest.mark.parametrize("shape", each_shape([s for s in sorted(set(IN_PLACE) & set(SHAPES)) if s != "qwen2vl-gqa"])
                         + [pytest.param("qwen2vl-gqa", marks=slow)])
def test_in_place_decoder_fills_the_cache_as_the_traced_one(shape, packages):
    built = Pipeline.load(packages(shape, "onnxruntime"))
    storage = built.manifest.kv_cache.storage
    assert storage == ("in_place" if IN_PLACE[shape] else "buffer")
    if storage != "in_place":
        assert "attention_mask" in built.manifest.graphs["decoder"].inputs
        return
    assert set(built.manifest.graphs["decoder"].inputs) >= {"seqlens_k", "total_sequence_length"}
    traced = Pipeline.load(packages(shape, "onnxruntime-buffer"))
    image = sample_images()["shapes"]
    buffers = built.cache.keys[0]
    for prompt in PROMPTS:
        ids = list(built.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
        assert ids == list(traced.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
        n = built.cache.length
        assert n == traced.cache.length > NEW_TOKENS
        for mine, theirs in ((built.cache.keys, traced.cache.keys), (built.cache.values, traced.cache.values)):
            for a, b in zip(mine, theirs):
                scale = max(1.0, float(np.abs(b[:, :, :n]).max()))  # the exporter's rule: error vs max(1, |ref|)
                np.testing.assert_allclose(a[:, :, :n], b[:, :, :n], rtol=1e-3, atol=1e-4 * scale)
    assert built.cache.keys[0] is buffers  # written in place: the same arrays, never reallocated


def test_a_sliding_window_llama_ignores_keeps_the_fused_decoder(checkpoints, reference_tokens, tmp_path):
    """transformers' own Idefics3 test config carries text_config.sliding_window, which Llama's attention ignores:
    the decoder is still built on GroupQueryAttention, and its tokens are still transformers'."""
    import json
    import shutil

    from mmedge.exporters.export import ExportOptions, export

    shape = "smolvlm-tiles"
    checkpoint = tmp_path / "ck"
    shutil.copytree(checkpoints[shape], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["sliding_window"] = 4  # shorter than any prompt: it would change every token if applied
    (checkpoint / "config.json").write_text(json.dumps(config))
    export(ExportOptions(model=str(checkpoint), output=tmp_path / "pkg", progress=False))
    pipe = Pipeline.load(tmp_path / "pkg")
    assert pipe.manifest.kv_cache.storage == "in_place" and not pipe.mask_names
    reference = reference_tokens(shape)
    image = sample_images()["shapes"]
    for prompt in PROMPTS:
        assert list(pipe.generate_ids(image, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)) == \
            reference["shapes", prompt]


@pytest.mark.parametrize("shape", each_shape())
def test_prompt_ids_and_pixels_match_processor(shape, packages, processors):
    processor = processors(shape)
    pipe = Pipeline.load(packages(shape))
    for image in sample_images().values():
        for prompt in [*PROMPTS, "", "  spaces  and {braces} {{ jinja }} {% raw %} <b>"]:
            inputs = reference_inputs(processor, image, prompt)
            pixels, grid = preprocess_with_grid(image, pipe.manifest.preprocess)  # grid: tiles, where split
            assert pipe.encode_prompt(prompt, grid=grid).tolist() == inputs["input_ids"][0].tolist(), prompt
            expected = inputs["pixel_values"].numpy().reshape(pixels.shape)  # [tiles, 3, H, W] either way
            np.testing.assert_allclose(pixels, expected, atol=1e-6)


@pytest.mark.parametrize("shape", each_shape())
def test_raw_prompt_is_passed_through(shape, packages, processors):
    """A fully formatted prompt is used as typed (only image markers expand), as the processor takes it."""
    processor = processors(shape)
    pipe = Pipeline.load(packages(shape))
    image = sample_images()["wide"]
    _, grid = preprocess_with_grid(image, pipe.manifest.preprocess)
    if pipe.manifest.prompt.mode == "chat":  # typed as the template renders it, with one image marker
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
        typed = processor.apply_chat_template(messages, add_generation_prompt=True)
        expected = processor(images=image, text=typed, return_tensors="np")["input_ids"][0].tolist()
        assert pipe.encode_prompt(typed, raw=True, grid=grid).tolist() == expected
    else:  # the fixed format, image tokens included
        typed = pipe.codec.render("what is this?")
    assert pipe.encode_prompt(typed, raw=True, grid=grid).tolist() == pipe.encode_prompt("what is this?", grid=grid).tolist()
    assert pipe.codec.render("x y", raw=True) == "x y"


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK"])
def test_image_modes_match_processor(mode, checkpoints, packages, processors):
    shape = next(iter(checkpoints))
    processor = processors(shape)
    spec = Pipeline.load(packages(shape)).manifest.preprocess
    base = sample_images()["shapes"]
    image = base.convert(mode)
    if mode in ("RGBA", "LA"):  # a real gradient of transparency, composited onto white
        image.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, base.size[0], dtype=np.uint8), (base.size[1], 1))))
    got = preprocess(image, spec)
    expected = processor.image_processor(images=image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(got, expected.reshape(got.shape), atol=1e-6)


def test_sixteen_bit_image_is_scaled_not_clipped(checkpoints, packages):
    spec = Pipeline.load(packages(next(iter(checkpoints)))).manifest.preprocess
    eight = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_allclose(preprocess(sixteen, spec), preprocess(Image.fromarray(eight), spec), atol=1e-6)


@pytest.mark.parametrize("shape,target", CASES[:1])
def test_stream_pieces_join_to_generate(shape, target, packages):
    pipe = Pipeline.load(packages(shape, target))
    image = sample_images()["noise"]
    text = pipe.generate(image, "caption en", max_new_tokens=16, ignore_eos=True)
    pieces = list(pipe.stream(image, "caption en", max_new_tokens=16, ignore_eos=True))
    assert "".join(pieces) == text and len(pieces) > 1


@pytest.mark.parametrize("shape,target", CASES[:1])
def test_sampling_is_seeded(shape, target, packages):
    pipe = Pipeline.load(packages(shape, target))
    image = sample_images()["noise"]
    opts = dict(max_new_tokens=16, ignore_eos=True, do_sample=True, temperature=1.5, top_p=0.95)
    a = list(pipe.generate_ids(image, "caption en", seed=1, **opts))
    b = list(pipe.generate_ids(image, "caption en", seed=1, **opts))
    c = list(pipe.generate_ids(image, "caption en", seed=2, **opts))
    greedy = list(pipe.generate_ids(image, "caption en", max_new_tokens=16, ignore_eos=True))
    assert a == b
    assert a != c or a != greedy


@pytest.mark.parametrize("shape,target", CASES[:1])
def test_image_as_path_pil_or_array(shape, target, packages, tmp_path):
    pipe = Pipeline.load(packages(shape, target))
    image = sample_images()["shapes"]
    path = tmp_path / "im.png"
    image.save(path)
    runs = [list(pipe.generate_ids(x, "caption en", max_new_tokens=8, ignore_eos=True))
            for x in (image, np.asarray(image), path, str(path))]
    assert all(r == runs[0] for r in runs)


def test_external_data_package(checkpoints, packages, tmp_path, monkeypatch):
    """Graphs over the protobuf limit keep weights in .onnx.data files; force that path on a tiny model."""
    from mmedge.exporters import onnxruntime_target
    from mmedge.exporters.export import ExportOptions, export

    monkeypatch.setattr(onnxruntime_target, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "pkg"
    manifest = export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=out, progress=False))
    assert all(f"{spec.file}.data" in manifest.files for spec in manifest.graphs.values())
    assert all(r["passed"] for r in manifest.verification["graphs"].values())
    image = sample_images()["noise"]
    inline = Pipeline.load(packages("paligemma-gqa"))
    external = Pipeline.load(out)
    assert list(external.generate_ids(image, "caption en", max_new_tokens=12, ignore_eos=True)) == list(
        inline.generate_ids(image, "caption en", max_new_tokens=12, ignore_eos=True)
    )
    # quantized from external-data graphs: the same graphs as from inline ones, but for the tied embedding table,
    # stored once: the embedding gathers the LM head's INT8 blocks from the decoder's data file
    quantized = export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=tmp_path / "int8",
                                     quant="int8", calib_samples=8, progress=False))
    embed = quantized.graphs["embed_tokens"].file
    assert all(f"{spec.file}.data" in quantized.files for part, spec in quantized.graphs.items() if part != "embed_tokens")
    assert f"{embed}.data" not in quantized.files
    assert quantized.quantization["graphs"]["embed_tokens"]["shared_with"] == "decoder"
    # readable by other users (a service account): onnx writes external data files 0600
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (tmp_path / "int8").rglob("*")), \
        {p.name: oct(p.stat().st_mode) for p in (tmp_path / "int8").rglob("*")}
    inline = Pipeline.load(packages("paligemma-gqa", "onnxruntime", "int8"))
    shared = Pipeline.load(tmp_path / "int8")
    # the shared embedding is the fp32 embedding graph over the head's dequantized table
    table = _dequantized_head(tmp_path / "int8" / quantized.graphs["decoder"].file)
    ids = np.arange(len(table), dtype=np.int64)[None]
    want = _with_table(packages("paligemma-gqa") / embed, table, {"input_ids": ids})
    got = shared.graphs["embed_tokens"].run({"input_ids": ids})["inputs_embeds"]
    assert np.array_equal(got, want)
    # the other graphs are those quantized from inline graphs
    shared.graphs["embed_tokens"] = inline.graphs["embed_tokens"]
    assert list(shared.generate_ids(image, "caption en", max_new_tokens=12, ignore_eos=True)) == list(
        inline.generate_ids(image, "caption en", max_new_tokens=12, ignore_eos=True))


def _dequantized_head(decoder: Path) -> np.ndarray:
    """An INT8 MatMulNBits decoder's LM head as a [vocab, hidden] table: (q - 128) x its block's scale."""
    from mmedge.calibration.weights import GraphWeights

    graph = GraphWeights(decoder)
    nbits = [n for n in graph.model.graph.node if n.op_type == "MatMulNBits"]
    head = max(nbits, key=lambda n: next(a.i for a in n.attribute if a.name == "N"))
    q, scales = graph.array(head.input[1]).astype(np.float32), graph.array(head.input[2])
    return ((q - 128) * scales[..., None]).reshape(len(q), -1)


def _with_table(graph: Path, table: np.ndarray, feeds: dict) -> np.ndarray:
    """The output of embedding graph `graph` run with its Gather's table replaced by `table`."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    init = next(i for i in model.graph.initializer if i.name == gather.input[0])
    init.CopyFrom(numpy_helper.from_array(table.astype(np.float32), init.name))
    return ort.InferenceSession(model.SerializeToString()).run(["inputs_embeds"], feeds)[0]
