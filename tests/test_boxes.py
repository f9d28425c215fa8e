"""Boxes out of detection answers, in the original image's pixels, for each family's box format; pipe.detect()
and `mmedge run --detect/--draw` end to end on the tiny packages (random weights write no real boxes, so the
parsing is checked on answers in each model's published format)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import SHAPES, sample_images
from conftest import run_cli_in_process as run_cli
from mmedge import Pipeline
from mmedge.errors import InputError
from mmedge.runtimes import boxes
from test_errors import assert_one_line_error


def corners(found):
    return [(b.label, round(b.x0, 3), round(b.y0, 3), round(b.x1, 3), round(b.y1, 3)) for b in found.boxes]


def test_paligemma_locations_are_y_x_in_1024_bins_over_the_image():
    text = "<loc0256><loc0128><loc0768><loc0896> cat ; <loc0000><loc0000><loc1023><loc1023> dog ; " \
           "<loc0512><loc0512><loc0640><loc0640><seg012><seg100><seg003> ball"
    found = boxes.parse("loc1024_yxyx", text, (400, 200))
    assert corners(found) == [("cat", 50.0, 50.0, 350.0, 150.0), ("dog", 0.0, 0.0, 399.609, 199.805),
                              ("ball", 200.0, 100.0, 250.0, 125.0)]
    assert found.segments == ["ball"] and found.text == text


def test_qwen2_box_tokens_are_x_y_over_1000():
    text = ("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,250),(500,750)<|box_end|> and "
            "<|box_start|>(0, 0),(1000, 1000)<|box_end|>")
    assert corners(boxes.parse("box_1000", text, (640, 480))) == [("the cat", 64.0, 120.0, 320.0, 360.0),
                                                                 ("", 0.0, 0.0, 640.0, 480.0)]


def test_qwen25_json_is_in_pixels_of_the_resized_image_and_qwen3_over_1000():
    text = '```json\n[\n  {"bbox_2d": [28, 56, 224, 112], "label": "cat"},\n  {"bbox_2d": [0, 0, 448, 224], "label": "sofa"}\n]\n```'
    # the model saw the 896 x 448 photo at 448 x 224
    assert corners(boxes.parse("json_pixels", text, (896, 448), seen=(448, 224))) == [
        ("cat", 56.0, 112.0, 448.0, 224.0), ("sofa", 0.0, 0.0, 896.0, 448.0)]
    assert corners(boxes.parse("json_1000", text, (2000, 1000)))[0] == ("cat", 56.0, 56.0, 448.0, 112.0)
    cut = text[: text.index('"sofa"') - 30]  # the answer ran out of tokens inside the second box
    assert [b.label for b in boxes.parse("json_pixels", cut, (896, 448), seen=(448, 224)).boxes] == ["cat"]
    assert boxes.parse("json_1000", '[{"bbox_2d": [1, 2], "label": "x"}, {"label": "y"}, no json', (9, 9)).boxes == []


def test_detect_prompt_joins_the_objects_as_the_family_writes_them():
    assert boxes.detect_prompt("detect {objects}", "loc1024_yxyx", "cat;dog , ball") == "detect cat ; dog ; ball"
    assert boxes.detect_prompt("find {objects}.", "json_1000", ["cat", "dog"]) == "find cat, dog."
    with pytest.raises(InputError, match="name the objects to detect"):
        boxes.detect_prompt("detect {objects}", "loc1024_yxyx", " ; ")


def test_draw_outlines_each_box(tmp_path):
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    boxes.draw(image, [boxes.Box("cat", 20, 10, 120, 60)], tmp_path / "out.png")
    drawn = np.asarray(Image.open(tmp_path / "out.png"))
    assert (drawn[10, 60] != 255).any() and (drawn[35, 20] != 255).any()  # top and left edges
    assert (drawn[35, 60] == 255).all() and (drawn[90, 180] == 255).all()  # inside and outside: untouched


BOX_SHAPES = [next(n for n, s in SHAPES.items() if s.family == f) for f in ("paligemma", "qwen2_vl")]


@pytest.mark.parametrize("shape", BOX_SHAPES)
def test_detect_asks_the_family_prompt_and_reads_its_answer(shape, packages, tmp_path):
    pipe = Pipeline.load(packages(shape))
    image = sample_images()["wide"]
    found = pipe.detect(image, "circle ; square", max_new_tokens=12, ignore_eos=True)
    s = pipe.manifest.schemes
    prompt = boxes.detect_prompt(s.detect_prompt, s.boxes, ["circle", "square"])
    assert found.text == pipe.generate(image, prompt, max_new_tokens=12, ignore_eos=True)
    assert corners(found) == corners(pipe.boxes(image, found.text))
    path = tmp_path / "wide.png"
    image.save(path)
    result = run_cli("run", str(packages(shape)), "--image", str(path), "--detect", "circle ; square",
                     "--max-new-tokens", "12", "--draw", str(tmp_path / "drawn.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "drawn.png").size == image.size


def test_a_family_without_boxes_says_so_in_one_line(packages, tmp_path):
    shape = next(n for n, s in SHAPES.items() if s.family == "llava")
    with pytest.raises(InputError, match="writes no boxes mmedge reads"):
        Pipeline.load(packages(shape)).detect(sample_images()["shapes"], "cat")
    path = tmp_path / "x.png"
    sample_images()["shapes"].save(path)
    assert_one_line_error(run_cli("run", str(packages(shape)), "--image", str(path), "--prompt", "hi", "--draw",
                                  str(tmp_path / "o.png")), "writes no boxes mmedge reads")
    assert_one_line_error(run_cli("run", str(packages(shape)), "--image", str(path)), "give --prompt")
