"""InternVL beyond the shared runners (test_parity covers one image a prompt, tiled and single-tile, on every
target): several images in one prompt, each tiled on its own grid, against transformers; the tile grid choice
against GotOcr2's own function at many aspect ratios."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import BACKEND, NEW_TOKENS, PROMPTS, SHAPES, hf_greedy, sample_images, slow
from mmedge import Pipeline
from mmedge.runtimes.preprocess import tile_grid

INTERNVL = [name for name, shape in SHAPES.items() if shape.family == "internvl"]  # internvl-tiles, -single


@pytest.fixture(scope="module")
def reference(hf_model):
    """shape -> (images, processor inputs, transformers' greedy tokens) for two images of different tile grids."""
    done = {}

    def get(shape):
        if shape not in done:
            model, processor = hf_model(shape)
            images = [sample_images()["wide"], sample_images()["noise"]]
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPTS[1]}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            inputs = processor(images=images, text=[text], return_tensors="pt")
            done[shape] = images, inputs, hf_greedy(model, inputs)
        return done[shape]

    return get


@pytest.mark.parametrize("shape,target", [pytest.param(s, t, marks=() if (s, t) == (INTERNVL[0], "onnxruntime")
                                                       else slow)
                                          for s in INTERNVL for t in ("onnxruntime", "openvino")])
def test_several_images_in_one_prompt_match_transformers(shape, target, packages, reference):
    images, inputs, expected = reference(shape)
    pipe = Pipeline.load(packages(shape, target), backend=BACKEND.get(target))
    seq = pipe._prepare(images, PROMPTS[1], pipe.options())
    assert seq.ids.tolist() == inputs["input_ids"][0].tolist()  # each image's tiles in one <img> run, in order
    np.testing.assert_array_equal(np.concatenate(seq.pixels), inputs["pixel_values"].numpy())
    assert list(pipe.generate_ids(images, PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True)) == expected


def test_tile_grid_is_gotocr2s_choice():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, (300, 2))] + [(448, 448), (896, 448), (10, 4000)]
    for high in (1, 4, 6, 12):
        for h, w in sizes:
            assert tile_grid(h, w, 448, 1, high) == get_optimal_tiled_canvas((h, w), (448, 448), 1, high), (h, w, high)


@pytest.mark.parametrize("shape", [pytest.param(s, marks=() if s == "internvl-single" else slow) for s in INTERNVL])
def test_bounded_vision_engines_take_several_images_in_calls_they_hold(shape, packages, reference):
    """A TensorRT package's vision engine takes at most one image's tiles a call (its profile); two images
    go through in calls of that size, with transformers' tokens (here through ONNX Runtime)."""
    images, _, expected = reference(shape)
    pipe = Pipeline.load(packages(shape, "tensorrt"), backend=BACKEND["tensorrt"])
    bound = pipe.manifest.preprocess.frames_per_image()
    assert pipe.vision_batch == bound
    vision, batches = pipe.graphs["vision_encoder"], []
    run = vision.run
    vision.run = lambda feeds: batches.append(len(feeds["pixel_values"])) or run(feeds)
    assert list(pipe.generate_ids(images, PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True)) == expected
    assert batches and max(batches) <= bound and sum(batches) == sum(len(p) for p in pipe._prepare(
        images, PROMPTS[1], pipe.options()).pixels)
