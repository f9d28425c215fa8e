"""The examples a developer copies run, on the shapes demo: the robot loop on a video file, the Jetson budget.

(examples/client.py is run against a live server in test_serve.py.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mmedge.runtimes import Pipeline
from mmedge.tasks import shapes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FPS, HOLD = 20, 10  # the clip's frame rate; frames each scene is held for


def example(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, EXAMPLES / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module, *argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = module.main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def package(demo_packages):
    return demo_packages("shapes-paligemma")[0]  # fp32 onnxruntime, shared with the demo tests


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Four scenes, each held for HOLD frames, losslessly (FFV1): the frames OpenCV reads are the images."""
    av = pytest.importorskip("av")
    scenes = list(shapes.examples(4, seed=99))
    path = tmp_path_factory.mktemp("clip") / "scenes.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=FPS)
        stream.width = stream.height = shapes.IMAGE_SIZE
        stream.pix_fmt = "bgr0"
        for ex in scenes:
            for _ in range(HOLD):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(ex.image), format="rgb24")))
        container.mux(stream.encode())
    return path, scenes


def test_robot_loop_answers_the_newest_frame_and_drops_the_rest(package, clip):
    pytest.importorskip("cv2")
    path, scenes = clip
    code, out = run(example("robot_loop.py"), str(package), "--video", str(path), "--question", "caption",
                    "--rate", "8")
    assert code == 0, out
    pipe = Pipeline.load(package)
    answers = re.findall(r"frame +(\d+): '(.*)' \(", out)
    assert len(answers) >= 4, out  # 2 s of video at up to 8 questions a second
    for index, text in answers:  # each answer is about the frame it names
        assert text == pipe.generate(scenes[int(index) // HOLD].image, "caption", max_new_tokens=16), (index, out)
    summary = re.search(r"answered (\d+) frames of (\d+) captured \((\d+) dropped\)", out)
    answered, captured, dropped = map(int, summary.groups())
    assert captured == len(scenes) * HOLD and answered == len(answers) and dropped == captured - answered > 0


def test_jetson_budget_is_computed_from_the_package(package):
    budget = example("jetson/budget.py")
    manifest = json.loads((package / "mmedge.json").read_text())
    graphs = {f for f in manifest["files"] if f.endswith((".onnx", ".data", ".bin", ".xml"))}
    b = budget.budget(package)
    assert b["weights"] == sum(manifest["files"][f]["bytes"] for f in graphs) > 0
    kv = manifest["kv_cache"]
    assert b["kv_cache"] == 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * kv["max_context"] * 4
    code, out = run(budget, str(package), "--device", "orin-nano-8gb")
    assert code == 0 and "an estimate" in out and "fits" in out
    assert run(budget, str(package.parent))[0] == 2  # not a package


def test_zero_shot_names_each_scene_as_the_embedder_does(demo_packages, tmp_path):
    """examples/zero_shot.py on the CLIP demo: each single-shape scene's shape, as Embedder.classify ranks it."""
    from mmedge.runtimes import Embedder

    package = demo_packages("shapes-clip")[0]
    scenes = [ex for ex in shapes.zero_shot_examples(6, seed=5) if ex.kind == "shape"]
    paths = []
    for i, ex in enumerate(scenes):
        paths.append(tmp_path / f"scene{i}.png")
        ex.image.save(paths[-1])
    code, out = run(example("zero_shot.py"), str(package), "--labels", ",".join(shapes.SHAPES), "--template", "a {}",
                    *map(str, paths))
    assert code == 0, out
    emb = Embedder.load(package)
    for path, ex in zip(paths, scenes):
        best = emb.classify(path, list(shapes.SHAPES), template="a {}")[0][0]
        assert f"{path}: {best} (" in out and best == ex.answer, out
    assert f"{len(scenes)} images" in out


def test_voice_command_transcribes_each_recording(packages, tmp_path):
    """examples/voice_command.py on the tiny Whisper with the shipped speech clips: each line is the recording's
    transcription (as Pipeline.transcribe gives it) and the action its words pick."""
    from conftest import AUDIO_SHAPES
    from mmedge.calibration.data import SPEECH

    package = packages(AUDIO_SHAPES[0])
    voice = example("voice_command.py")
    code, out = run(voice, str(package), str(SPEECH), "--language", "en", "--max-new-tokens", "6")
    assert code == 0, out
    pipe = Pipeline.load(package)
    clips = sorted(SPEECH.glob("*.wav"))
    assert len(out.strip().splitlines()) == len(clips) == 16
    for path in clips[:3]:
        text = pipe.transcribe(path, language="en", max_new_tokens=6)
        assert f"{path.name}: {text.strip()!r} -> {voice.action(text) or 'no command'} (" in out
    assert voice.action("Please stop now, then go forward.") == "stop"
    assert run(voice, str(package), str(tmp_path / "missing.wav"))[0] == 2
