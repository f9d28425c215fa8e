"""Encoder-decoder families (scheme encoder "prompt": Florence-2) beyond the shared runners, which check greedy
tokens against transformers, the cache against recomputing, the prompt ids and pixels against the processor and
INT8/INT4 packages on every target: task prompts as the processor writes them, boxes as transformers' post-
processor reads them (through `detect` and the CLI), the encoder run once per prompt, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import SHAPES
from conftest import run_cli_in_process as run_cli
from mmedge import Pipeline
from mmedge.errors import InputError
from mmedge.evaluate import generated_from, load_processor
from mmedge.runtimes import boxes
from test_chat import Counting
from test_errors import assert_one_line_error

FLORENCE = [name for name, shape in SHAPES.items() if shape.family == "florence2"]
TASKS = ["<OD>", "<CAPTION>", "<OCR>", "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>a red circle",
         "<OPEN_VOCABULARY_DETECTION>blue square", "what is left of the square?"]


def picture() -> Image.Image:
    image = Image.new("RGB", (90, 60), (240, 240, 230))
    image.paste((220, 30, 30), (10, 10, 40, 40))
    return image


@pytest.fixture(scope="module", params=FLORENCE)
def florence(request, packages, checkpoints, hf_model):
    shape = request.param
    return Pipeline.load(packages(shape, "onnxruntime")), load_processor(checkpoints[shape]), hf_model(shape)[0]


def test_task_prompts_are_the_processors(florence):
    pipe, processor, _ = florence
    image = picture()
    for task in TASKS:
        inputs = processor(images=image, text=task, return_tensors="pt")
        seq = pipe._prepare(image, task, pipe.options())
        assert seq.source.tolist() == inputs["input_ids"][0].tolist(), task
        assert seq.ids.tolist() == pipe.manifest.prompt.decoder_start_ids


def test_boxes_are_read_as_transformers_reads_them(florence):
    """The parser against Florence2PostProcessor on answers with labels, several boxes a label, a cut-off box
    and boxes alone; then detect() end to end against transformers' generate() and post-processor."""
    pipe, processor, model = florence
    size = (640, 480)
    parse = processor.post_processor.parse_description_with_bboxes_from_text_and_spans
    answers = ["car<loc_52><loc_333><loc_932><loc_774>door handle<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6>"
               "<loc_7><loc_8>", "<loc_100><loc_200><loc_300><loc_400><loc_999><loc_0><loc_10><loc_20>",
               "a red circle<loc_10><loc_20><loc_30><loc_40>a blue<loc_5><loc_6>"]
    for text in answers:
        found = boxes.parse("loc1000_xyxy", text, size).boxes
        ours = [(b.label, [int(v) for v in (b.x0, b.y0, b.x1, b.y1)]) for b in found]
        empty = parse(text, image_size=size, allow_empty_phrase=True)
        labelled = parse(text, image_size=size)
        assert [box for _, box in ours] == [i["bbox"] for i in empty], text
        if not text.startswith("<"):  # (on boxes alone transformers' labelled parse takes "loc_100>" for a label)
            assert [(label, box) for label, box in ours] == [(i["cat_name"], i["bbox"]) for i in labelled]
    image = picture()
    found = pipe.detect(image, "<REGION_PROPOSAL>", max_new_tokens=17)
    inputs = processor(images=image, text="<REGION_PROPOSAL>", return_tensors="pt")
    start, forced = generated_from(model, inputs)
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=17 + forced, do_sample=False)
    text = processor.batch_decode(out[:, start:], skip_special_tokens=False)[0]
    expected = parse(text, image_size=image.size, allow_empty_phrase=True)
    assert found.boxes and [[int(v) for v in (b.x0, b.y0, b.x1, b.y1)] for b in found.boxes] == \
        [i["bbox"] for i in expected]


def test_detect_from_the_command_line(florence, tmp_path):
    pipe = florence[0]
    image = tmp_path / "in.png"
    picture().save(image)
    result = run_cli("run", str(pipe.path), "--image", str(image), "--detect", "<OD>", "--max-new-tokens", "12",
                     "--draw", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (90, 60)
    expected = pipe.detect(picture(), "<OD>", max_new_tokens=12)
    lines = result.stdout.strip().splitlines()
    assert expected.boxes and lines[0] == expected.text  # the answer, then a box a line
    assert lines[1:] == [f"{b.label or '-'}: {b.x0:.0f} {b.y0:.0f} {b.x1:.0f} {b.y1:.0f}" for b in expected.boxes]


def test_encoder_runs_once_per_prompt(florence):
    """One vision, projector and encoder call per question, none per generated token; the same image asked
    again takes its embeddings from the image cache but runs the encoder over the new prompt."""
    pipe = Pipeline.load(florence[0].path)
    for part in ("vision_encoder", "projector", "encoder", "decoder"):
        pipe.graphs[part] = Counting(pipe.graphs[part])
    image = picture()
    first = pipe.generate_ids(image, "<OD>", max_new_tokens=6, ignore_eos=True)
    assert len(list(first)) == 6
    calls = {part: graph.calls for part, graph in pipe.graphs.items() if isinstance(graph, Counting)}
    assert calls == {"vision_encoder": 1, "projector": 1, "encoder": 1, "decoder": 6}
    list(pipe.generate_ids(image, "<CAPTION>", max_new_tokens=2, ignore_eos=True))
    assert pipe.graphs["vision_encoder"].calls == 1 and pipe.graphs["encoder"].calls == 2


def test_bad_input(florence, tmp_path):
    pipe = florence[0]
    image = tmp_path / "in.png"
    picture().save(image)
    path = str(pipe.path)
    assert_one_line_error(run_cli("run", path, "--image", str(image), "--prompt", "<OD> cars"), "<OD> takes no text")
    long = "red " * (pipe.manifest.schemes.encoder_length + 1)
    assert_one_line_error(run_cli("run", path, "--image", str(image), "--prompt", long), "encoder takes")
    assert_one_line_error(run_cli("run", path, "--prompt", "<OD>"), "image")
    with pytest.raises(Exception, match="one prompt at a time"):
        pipe.chat()
    with pytest.raises(InputError, match="encoder reads the prompt with the image"):
        pipe.encode_media(picture(), "<OD>")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    assert list(pipe.generate_ids(noise, "<OD>", max_new_tokens=3, ignore_eos=True))  # still answers after errors


@pytest.mark.parametrize("shape", FLORENCE)
def test_coreml_int4_package(shape, packages):
    """Core ML's INT4 clip search takes statistics of the decoder's own linear layers only: the cross-attention
    key/value projections it shares with the encoder graph (not in the converted decoder) are left to the
    encoder's INT8. The package generates through the torch modules with its stored weights."""
    from mmedge.exporters import coreml_target

    pipe, _ = coreml_target.simulated_pipeline(packages(shape, "coreml", "int4"))
    report = pipe.manifest.quantization
    assert report["plan"] == {"vision_encoder": "int8", "projector": "int8", "embed_tokens": "int8",
                              "encoder": "int8", "decoder": "int4"}
    assert report["int4_clip"]["layers"] > 0
    assert len(list(pipe.generate_ids(picture(), "<OD>", max_new_tokens=4, ignore_eos=True))) == 4


def test_encoder_plan_only_where_the_checkpoint_has_one(checkpoints, tmp_path):
    """BLIP-2 is an encoder-decoder with Flan-T5 but not with OPT: --quant names an `encoder` graph only for the
    former, and the latter refuses it in one line before anything is exported."""
    args = ["--target", "onnxruntime", "--quant", "int8,encoder=fp32"]
    assert_one_line_error(run_cli("export", "--model", str(checkpoints["blip2-opt"]), *args, "-o",
                                  str(tmp_path / "opt")), "unknown graph 'encoder'")
    assert not (tmp_path / "opt").exists()
    from mmedge.exporters import checkpoint as ckpt
    from mmedge.exporters.families import blip2

    assert blip2.has_encoder(ckpt.read_config(checkpoints["blip2-flan-t5"]))
