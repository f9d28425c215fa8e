"""Qwen2-VL / Qwen2.5-VL beyond the shared runners (test_parity covers one image at three sizes on every target):
several images in one prompt, the 3-D positions against the model's own get_rope_index, the vision encoder
verified at several grids, the visual token budget, and their bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BACKEND, NEW_TOKENS, PROMPTS, SHAPES, hf_greedy, sample_images, slow
from conftest import run_cli_in_process as run_cli  # the CLI's main() here: the same exit status and messages
from mmedge import Pipeline
from mmedge.errors import InputError
from mmedge.evaluate import load_processor
from mmedge.exporters import checkpoint as ckpt
from mmedge.runtimes import schemes
from test_errors import assert_one_line_error

QWEN = [name for name, shape in SHAPES.items() if shape.family == "qwen2_vl"]  # qwen2vl-gqa, qwen2.5vl-window


@pytest.fixture(scope="module")
def reference(hf_model):
    """shape -> [(images, processor inputs, transformers' greedy tokens, (positions, delta) of get_rope_index)]
    for the multi-image cases, computed once per shape for every target."""
    done = {}

    def get(shape):
        if shape not in done:
            model, processor = hf_model(shape)
            done[shape] = []
            for images in (two_images(), [sample_images()["shapes"]] * 3):
                inputs = hf_inputs(processor, images, PROMPTS[1])
                with torch.no_grad():
                    rope = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      inputs["image_grid_thw"])
                done[shape].append((images, inputs, hf_greedy(model, inputs), rope))
        return done[shape]

    return get


def hf_inputs(processor, images, prompt):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=images, text=[text], return_tensors="pt")


def two_images():
    images = sample_images()
    return [images["wide"], images["noise"]]


# TensorRT packages hold the ONNX Runtime package's graphs (test_parity runs them too)
@pytest.mark.parametrize("shape,target", [pytest.param(s, t, marks=() if (s, t) == (QWEN[0], "onnxruntime") else slow)
                                          for s in QWEN for t in ("onnxruntime", "openvino")])
def test_several_images_in_one_prompt_match_transformers(shape, target, packages, reference):
    pipe = Pipeline.load(packages(shape, target), backend=BACKEND.get(target))
    for images, inputs, expected, (positions, delta) in reference(shape):
        assert list(pipe.generate_ids(images, PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True)) == expected
        # the prompt, the patches and the 3-D positions are the processor's and the model's own
        seq = pipe._prepare(images, PROMPTS[1], pipe.options())
        assert seq.ids.tolist() == inputs["input_ids"][0].tolist()
        np.testing.assert_array_equal(np.concatenate(seq.pixels), inputs["pixel_values"].numpy())
        assert [list(g) for g in seq.grids] == inputs["image_grid_thw"].tolist()
        np.testing.assert_array_equal(seq.positions, positions[:, 0].numpy())
        after = schemes.position_ids(pipe.manifest.schemes, len(seq.ids), 2, prompt=seq.positions)
        np.testing.assert_array_equal(after[:, 0], np.tile(np.arange(len(seq.ids), len(seq.ids) + 2) + int(delta), (3, 1)))


@pytest.mark.parametrize("shape,target", [pytest.param(s, t, marks=() if (s, t) == (QWEN[0], "onnxruntime") else slow)
                                          for s in QWEN for t in ("onnxruntime", "openvino")])
def test_vision_encoder_verified_at_grids_other_than_the_traced_one(shape, target, packages):
    """Export checks the vision encoder against PyTorch at every grid of graphs.PATCH_GRIDS_CHECKS (portrait,
    landscape, the smallest, two images, a two-frame clip), in each target's engine."""
    from mmedge.exporters.graphs import PATCH_GRIDS_CHECKS

    report = Pipeline.load(packages(shape, target)).manifest.verification["graphs"]["vision_encoder"]
    assert report["passed"] is True and report["cases"] == len(PATCH_GRIDS_CHECKS), report


def test_token_budget_per_call_at_load_and_for_a_huge_image(packages):
    pipe = Pipeline.load(packages(QWEN[0]))
    spec = pipe.manifest.preprocess
    token = (spec.patch_size * spec.merge_size) ** 2
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6000, 8000, 3), dtype=np.uint8))

    def image_tokens(p, images, **options):
        return int((p._prepare(images, "x", p.options(**options)).ids == p.manifest.prompt.image_token_id).sum())

    assert image_tokens(pipe, big) <= spec.max_pixels // token  # resized as the processor would: within the budget
    assert list(pipe.generate_ids(big, "x", max_new_tokens=2, ignore_eos=True))
    assert image_tokens(pipe, big, max_pixels=16 * token) <= 16
    assert image_tokens(pipe, [big, big], max_image_tokens=20) <= 20  # an equal share each
    assert image_tokens(Pipeline.load(pipe.path, max_pixels=9 * token), big) <= 9
    with pytest.raises(InputError, match="less than one token"):
        pipe.generate([big] * 3, "x", max_image_tokens=2)


def test_budget_and_image_count_errors(packages, tmp_path):
    qwen = packages(QWEN[0])
    image = tmp_path / "a.png"
    sample_images()["shapes"].save(image)
    assert_one_line_error(run_cli("run", str(packages("paligemma-gqa")), "--image", str(image), "--prompt", "x",
                                  "--max-pixels", "4096"), "fixed size")
    assert_one_line_error(run_cli("run", str(qwen), "--image", str(image), "--prompt", "x", "--max-image-tokens",
                                  "0"), "max_image_tokens must be")
    # more images than the context holds: one line, not an engine error
    args = [a for _ in range(12) for a in ("--image", str(image))]
    assert_one_line_error(run_cli("run", str(qwen), *args, "--prompt", "x"), "context holds")
    # a raw prompt with fewer image markers than images
    assert_one_line_error(run_cli("run", str(qwen), "--image", str(image), "--image", str(image), "--raw-prompt",
                                  "--prompt", "<|vision_start|><|image_pad|><|vision_end|>x"), "image markers")
    ok = run_cli("run", str(qwen), "--image", str(image), "--image", str(image), "--prompt", "x",
                 "--max-new-tokens", "3")
    assert ok.returncode == 0, ok.stderr


# -- video -----------------------------------------------------------------------------------------------
# transformers builds these models' video processor on torchvision, which does not import beside the CPU torch
# here: the reference runs the model itself on the runtime's patches (its prompt ids, 3-D positions and tokens
# are transformers'). The patches against the video processor (grids equal, values within its torchvision
# resize's difference) and the frame sampling (indices equal) are measured in docs/dynamic-resolution.md.
VIDEO_SHAPES = QWEN


def clip_frames(n: int = 4, size=(56, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, 6 * i, axis=1)) for i in range(n)]  # the scene pans


def video_reference(model, processor, pipe, images, frames):
    """transformers' prompt ids, 3-D positions and greedy tokens for `images` then a video of `frames`."""
    seq = pipe._prepare(images or None, PROMPTS[1], pipe.options(), frames)
    video = seq.videos[0]
    content = [{"type": "image"} for _ in images] + [{"type": "video"}, {"type": "text", "text": PROMPTS[1]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kw = {}
    if images:
        kw = dict(processor.image_processor(images=images, return_tensors="pt"))
        text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(kw["image_grid_thw"].prod()) // 4))
    t, h, w = video.grid
    if model.config.model_type == "qwen3_vl":  # Qwen3VLProcessor's expansion: each temporal patch stamped
        stamps = processor._calculate_timestamps(list(range(len(frames))), pipe.manifest.preprocess.video_fps, 2)
        tokens = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * (h * w // 4) + "<|vision_end|>"
                         for s in stamps)
    else:  # Qwen2VLProcessor's: one run
        tokens = "<|video_pad|>" * (t * h * w // 4)
    text = text.replace("<|video_pad|>", tokens)
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    types = (ids == model.config.image_token_id).long() + 2 * (ids == model.config.video_token_id).long()
    kw.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
              pixel_values_videos=torch.from_numpy(video.patches), video_grid_thw=torch.tensor([video.grid]))
    rope = dict(image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw["video_grid_thw"])
    if model.config.model_type == "qwen2_5_vl":
        kw["second_per_grid_ts"] = rope["second_per_grid_ts"] = torch.tensor([2 / video.fps])
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        positions, _ = model.model.get_rope_index(ids, types, **rope)
    return seq, ids[0].tolist(), positions[:, 0].numpy(), out[0, ids.shape[1]:].tolist()


@slow  # the contributors' loop reads and runs a clip in test_video_file_is_sampled_at_the_package_rate
@pytest.mark.parametrize("shape", VIDEO_SHAPES)
def test_video_matches_transformers(shape, checkpoints, packages):
    path = checkpoints[shape]
    model = ckpt.family_for(ckpt.read_config(path)["model_type"]).load(path)
    processor = load_processor(path)
    for target in ("onnxruntime", "openvino"):
        pipe = Pipeline.load(packages(shape, target))
        for images in ([], [sample_images()["noise"]]):  # a 4-frame clip alone, and after an image
            seq, ids, positions, expected = video_reference(model, processor, pipe, images, clip_frames())
            assert seq.videos[0].grid[0] == 2  # 4 frames, 2 a temporal patch
            assert seq.ids.tolist() == ids
            np.testing.assert_array_equal(seq.positions, positions)
            got = pipe.generate_ids(images or None, PROMPTS[1], video=clip_frames(), max_new_tokens=NEW_TOKENS,
                                    ignore_eos=True)
            assert list(got) == expected, (shape, target, len(images))


def write_clip(path, frames, fps: int = 10):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_file_is_sampled_at_the_package_rate(packages, tmp_path):
    import av

    from mmedge.runtimes.video import prepare_video

    pipe = Pipeline.load(packages(VIDEO_SHAPES[0]))
    spec = pipe.manifest.preprocess
    clip = tmp_path / "clip.mp4"
    write_clip(clip, clip_frames(20), fps=10)  # 2 s at 10 fps: 2 s x 2 fps = 4 frames, at 0, 5, 10, 15
    with av.open(str(clip)) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    from_file = prepare_video(clip, spec)
    from_list = prepare_video([decoded[i] for i in (0, 5, 10, 15)], spec)
    assert from_file.grid == from_list.grid and from_file.grid[0] == 2 and from_file.fps == spec.video_fps == 2.0
    np.testing.assert_array_equal(from_file.patches, from_list.patches)
    expected = list(pipe.generate_ids(None, "x", video=[decoded[i] for i in (0, 5, 10, 15)], max_new_tokens=4,
                                      ignore_eos=True))
    result = run_cli("run", str(pipe.path), "--video", str(clip), "--prompt", "x", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert list(pipe.generate_ids(None, "x", video=str(clip), max_new_tokens=4, ignore_eos=True)) == expected


def _empty_clip(path):
    """A container with a video stream and no frames."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"


def test_video_errors(packages, tmp_path):
    qwen = packages(VIDEO_SHAPES[0])
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    assert_one_line_error(run_cli("run", str(qwen), "--video", str(not_video), "--prompt", "x"), "not a video")
    empty = tmp_path / "empty.mp4"
    _empty_clip(empty)
    assert_one_line_error(run_cli("run", str(qwen), "--video", str(empty), "--prompt", "x"), str(empty.name))
    assert_one_line_error(run_cli("run", str(qwen), "--video", str(tmp_path / "nope.mp4"), "--prompt", "x"),
                          "video not found")
    image = tmp_path / "a.png"
    sample_images()["shapes"].save(image)
    clip = tmp_path / "clip.mp4"
    write_clip(clip, clip_frames(8))
    assert_one_line_error(run_cli("run", str(packages("paligemma-gqa")), "--image", str(image), "--video", str(clip),
                                  "--prompt", "x"), "not video")
    assert_one_line_error(run_cli("run", str(qwen), "--prompt", "x"), "--image")
    pipe = Pipeline.load(qwen)
    with pytest.raises(InputError, match="differ in size"):
        pipe.generate(None, "x", video=[Image.new("RGB", (40, 40)), Image.new("RGB", (48, 40))])
