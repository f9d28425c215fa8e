"""Cross-attention families (image placement "cross_attention": Llama 3.2 Vision, IDEFICS) beyond the shared
runners, which cover one image per prompt on every target (and, for Llama 3.2 Vision, 4 tiles and two images in
one question): images of 1 and 2 tiles and a text-only prompt against transformers, the tiles and aspect-ratio
inputs against the processor's, the rule of which tokens see which image against each processor's mask, IDEFICS's
images interleaved with text in a raw prompt, the image keys and values computed once per image, and bad
input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import BACKEND, NEW_TOKENS, PROMPTS, SHAPES, hf_greedy, sample_images, slow
from conftest import run_cli_in_process as run_cli
from mmedge import Pipeline
from mmedge.evaluate import load_processor
from mmedge.manifest import SchemeSpec
from mmedge.runtimes import schemes
from test_chat import Counting
from test_errors import assert_one_line_error

MLLAMA = [name for name, shape in SHAPES.items() if shape.family == "mllama"]
IDEFICS = [name for name, shape in SHAPES.items() if shape.family == "idefics"]


def images() -> dict[str, Image.Image | None]:
    """A 1-tile image (a small square: scaled up into one tile), a 2-tile one (twice as wide as high), none."""
    rng = np.random.default_rng(3)
    return {"one tile": Image.fromarray(rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)),
            "two tiles": Image.fromarray(rng.integers(0, 256, (30, 64, 3), dtype=np.uint8)),
            "text only": None}


def hf_inputs(processor, image, prompt):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[image] if image is not None else None, text=[text], return_tensors="pt")


@pytest.fixture(scope="module")
def reference(hf_model):
    """shape -> {case: (processor inputs, transformers' greedy tokens)}, computed once for every target."""
    done = {}

    def get(shape):
        if shape not in done:
            model, processor = hf_model(shape)
            done[shape] = {}
            for name, image in images().items():
                inputs = hf_inputs(processor, image, PROMPTS[1])
                done[shape][name] = (inputs, hf_greedy(model, inputs))
        return done[shape]

    return get


@pytest.mark.parametrize("shape,target", [pytest.param(s, t, marks=() if t == "onnxruntime" else slow)
                                          for s in MLLAMA for t in ("onnxruntime", "openvino")])
def test_tiles_and_text_only_match_transformers(shape, target, packages, reference):
    pipe = Pipeline.load(packages(shape, target), backend=BACKEND.get(target))
    for (name, image), tiles in zip(images().items(), (1, 2, 0)):
        inputs, expected = reference(shape)[name]
        got = list(pipe.generate_ids(image, PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True))
        assert got == expected, name
        seq = pipe._prepare(image, PROMPTS[1], pipe.options())
        assert seq.ids.tolist() == inputs["input_ids"][0].tolist()
        if image is None:
            assert not seq.pixels and "pixel_values" not in inputs
            continue
        assert int(np.prod(seq.grids[0])) == tiles == int(inputs["aspect_ratio_mask"][0, 0].sum())
        np.testing.assert_array_equal(seq.pixels[0], inputs["pixel_values"][0, 0].numpy())  # padding tiles too
        feeds = schemes.vision_feeds(pipe.manifest.schemes, seq.pixels[0], seq.grids[0])
        np.testing.assert_array_equal(feeds["aspect_ratio_ids"], inputs["aspect_ratio_ids"][0].numpy())
        np.testing.assert_array_equal(feeds["aspect_ratio_mask"], inputs["aspect_ratio_mask"][0].numpy())


@pytest.mark.parametrize("shape", MLLAMA)
def test_which_tokens_see_which_image_is_the_processors_rule(shape, checkpoints):
    """schemes.cross_visibility against MllamaProcessor's cross_attention_mask, for images alone, in a row, between
    words and at the end of a raw prompt."""
    processor = load_processor(checkpoints[shape])
    scheme = SchemeSpec(image_placement="cross_attention", cross_mask="image_spans")
    token = processor.image_token_id
    picture = images()["one tile"]
    for text in ("<|image|>a red circle", "a <|image|><|image|> two of them", "<|image|>left <|image|>right",
                 "one<|image|> two<|image|> three<|image|><|image|> and four", "at the end<|image|>"):
        n = text.count("<|image|>")
        inputs = processor(images=[[picture] * n], text=[text], return_tensors="np")
        ids = inputs["input_ids"][0]
        expected = inputs["cross_attention_mask"][0, :, :, 0].astype(bool)  # [tokens, images], first tile
        np.testing.assert_array_equal(schemes.cross_visibility(scheme, ids, token, n), expected, err_msg=text)


@pytest.mark.parametrize("shape", MLLAMA)
def test_image_keys_and_values_are_computed_once_per_image(shape, packages):
    """The vision encoder and the projector (which gives every cross-attention layer's keys and values) run once
    for an image; the decoder's steps reuse what they gave, and a new question about the same image, or a
    follow-up turn without one, runs neither."""
    pipe = Pipeline.load(packages(shape))
    vision = pipe.graphs["vision_encoder"] = Counting(pipe.graphs["vision_encoder"])
    projector = pipe.graphs["projector"] = Counting(pipe.graphs["projector"])
    decoder = pipe.graphs["decoder"] = Counting(pipe.graphs["decoder"])
    image = sample_images()["shapes"]
    pipe.generate(image, PROMPTS[0], max_new_tokens=8, ignore_eos=True)
    assert (vision.calls, projector.calls, decoder.calls) == (1, 1, 8)  # prefill + 7 steps
    pipe.generate(np.asarray(image), PROMPTS[1], max_new_tokens=4, ignore_eos=True)
    assert (vision.calls, projector.calls) == (1, 1)
    chat = pipe.chat()
    chat.ask(sample_images()["wide"], "what is it?", max_new_tokens=4)
    chat.ask(None, "and the color?", max_new_tokens=4)
    assert (vision.calls, projector.calls) == (2, 2)
    pipe.generate([image, sample_images()["wide"]], PROMPTS[0], max_new_tokens=2)  # both seen before
    assert (vision.calls, projector.calls) == (2, 2)


def test_a_raw_prompt_needs_one_image_token_per_image(packages):
    package = packages(MLLAMA[0])
    image = "examples/images/shapes.png"
    result = run_cli("run", str(package), "--image", image, "--image", image, "--raw-prompt",
                     "--prompt", "<|image|>what is this?", "--max-new-tokens", "2")
    assert_one_line_error(result, "1 image markers", "for 2 image(s)")


# -- IDEFICS ---------------------------------------------------------------------------------------------------


def interleaved(processor, a, b):
    """A raw prompt with two images between words and an end-of-sequence token after the second one's text (the
    tokens after it see no image), and the processor's inputs for the same items."""
    eos = processor.tokenizer.eos_token
    raw = f"{processor.tokenizer.bos_token}User:<image>the left one<image>the right one{eos}and now<end_of_utterance>" \
          "\nAssistant:"
    items = ["User:", a, "the left one", b, f"the right one{eos}and now<end_of_utterance>\nAssistant:"]
    return raw, processor.processor(text=[items], return_tensors="pt")


@pytest.mark.parametrize("shape,target", [pytest.param(s, t, marks=() if t == "onnxruntime" else slow)
                                          for s in IDEFICS for t in ("onnxruntime", "openvino", "openvino-buffer")])
def test_idefics_images_in_a_row_and_interleaved_match_transformers(shape, target, hf_model, packages):
    """Two images in the instruct format (sharing the fake token between them), a text-only prompt, and two
    images interleaved with text in a raw prompt: transformers' tokens, the processor's ids and, for the raw
    prompt, its image_attention_mask rule (the last image seen; none after an end-of-sequence token)."""
    model, processor = hf_model(shape)
    pipe = Pipeline.load(packages(shape, target))
    a, b = sample_images()["wide"], sample_images()["noise"]
    raw, raw_inputs = interleaved(processor, a, b)
    cases = [([a, b], PROMPTS[1], processor(images=[a, b], text=PROMPTS[1]), {}),
             (None, PROMPTS[0], processor(images=None, text=PROMPTS[0]), {}),
             ([a, b], raw, raw_inputs, {"raw_prompt": True})]
    for images, prompt, inputs, options in cases:
        expected = hf_greedy(model, inputs)
        got = list(pipe.generate_ids(images, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, **options))
        assert got == expected, prompt
        seq = pipe._prepare(images, prompt, pipe.options(**options))
        assert seq.ids.tolist() == inputs["input_ids"][0].tolist()
        pipe._prompt_embeddings(seq)
        if images:
            np.testing.assert_array_equal(seq.cross_sees, inputs["image_attention_mask"][0].numpy().astype(bool))
