"""Video in the families that take it as images (InternVL: each frame one tile; GLM-4.1V: each temporal patch an
image of one frame's grid): prompt ids as the processor's own video expansion writes them, GLM-4V's 3-D positions
against get_rope_index, and greedy tokens against transformers, for a 4-frame clip alone and after an image.

transformers builds these video processors on torchvision, which does not import beside the CPU torch here, so the
model takes the runtime's frames (InternVL) or patches (GLM-4V), as tests/test_qwen_vl.py does for Qwen-VL."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import FIRST_SHAPES, NEW_TOKENS, PROMPTS, SHAPES, sample_images, slow
from mmedge import Pipeline
from mmedge.evaluate import load_processor
from mmedge.exporters import checkpoint as ckpt
from test_qwen_vl import clip_frames

# each family's first tiny shape (InternVL's tiled one: its frames are single tiles whatever the image splitting)
VIDEO_SHAPES = [name for name in FIRST_SHAPES if SHAPES[name].family in ("glm4v", "internvl")]
FAST = {(VIDEO_SHAPES[0], "onnxruntime")}


@pytest.fixture(scope="module")
def models(checkpoints):
    done = {}

    def get(shape):
        if shape not in done:
            path = checkpoints[shape]
            done[shape] = ckpt.family_for(ckpt.read_config(path)["model_type"]).load(path), load_processor(path)
        return done[shape]

    return get


def reference(model, processor, seq, images, frames):
    """transformers' prompt ids (the processor's chat template, image expansion and its own replace_video_token),
    3-D positions (GLM-4V) and greedy tokens, the model given the runtime's frames or patches."""
    from transformers.video_utils import VideoMetadata

    content = [{"type": "image"} for _ in images] + [{"type": "video"}, {"type": "text", "text": PROMPTS[1]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    marker = processor.video_token
    units = seq.pixels[len(images):]  # the video's frames (or temporal patches) after the images
    glm = model.config.model_type == "glm4v"
    if glm:
        t, h, w = 1 * len(units), *seq.grids[-1][1:]
        metadata = VideoMetadata(total_num_frames=2 * t, fps=2.0, frames_indices=list(range(2 * t)))
        processor.video_processor = SimpleNamespace(merge_size=2)  # all replace_video_token reads of it
        expanded = processor.replace_video_token({"video_grid_thw": [torch.tensor([t, h, w])],
                                                  "video_metadata": [metadata]}, 0)
    else:
        expanded = processor.replace_video_token({"pixel_values_videos": [torch.zeros(len(units))]}, 0)
    text = text.replace(marker, expanded)
    # the images expanded by the processor's own replace_image_token (its __call__ refuses image tokens in a
    # prompt without images, and a video's are image tokens here)
    image_inputs = {}
    if images:
        options = {"crop_to_patches": True} if not glm else {}
        image_inputs = processor.image_processor(images=images, return_tensors="pt", **options)
        pieces = text.split(processor.image_token)
        marks = len(images) if glm else len(pieces) - 1  # InternVL: the video's expansion holds image tokens too
        text = pieces[0] + "".join((processor.replace_image_token(image_inputs, i) if i < len(images) else
                                    processor.image_token) + rest for i, rest in enumerate(pieces[1:]))
        assert marks >= len(images)
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    positions = None
    if glm:
        types = torch.tensor(processor.create_mm_token_type_ids(ids.tolist()))
        video = torch.from_numpy(np.concatenate(units))
        with torch.no_grad():
            positions, _ = model.model.get_rope_index(ids, types, image_inputs.get("image_grid_thw"),
                                                      torch.tensor([[t, h, w]]))
        positions = positions[:, 0].numpy()
        if not images:
            kw.update(pixel_values_videos=video, video_grid_thw=torch.tensor([[t, h, w]]), mm_token_type_ids=types)
        else:
            # transformers' GLM-4V cannot take an image and a video in one prompt (get_placeholder_mask counts the
            # video's image tokens as the image's too); its video path encodes and positions each temporal patch as
            # an image of grid (1, h, w), so the model gets the clip as those images, the same computation
            kw.update(pixel_values=torch.cat([image_inputs["pixel_values"], video]),
                      image_grid_thw=torch.cat([image_inputs["image_grid_thw"], torch.tensor([[1, h, w]] * t)]),
                      mm_token_type_ids=(types > 0).long())
    else:
        tiles = [image_inputs["pixel_values"]] if images else []
        kw["pixel_values"] = torch.cat([*tiles, torch.from_numpy(np.concatenate(units))])
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return ids[0].tolist(), positions, out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("shape,target", [pytest.param(s, t, marks=() if (s, t) in FAST else slow)
                                          for s in VIDEO_SHAPES for t in ("onnxruntime", "openvino")])
def test_video_as_images_matches_transformers(shape, target, packages, models):
    model, processor = models(shape)
    pipe = Pipeline.load(packages(shape, target))
    for images in ([], [sample_images()["noise"]]):
        seq = pipe._prepare(images or None, PROMPTS[1], pipe.options(), clip_frames())
        assert len(seq.pixels) == len(images) + (2 if model.config.model_type == "glm4v" else 4)
        ids, positions, expected = reference(model, processor, seq, images, clip_frames())
        assert seq.ids.tolist() == ids, (shape, len(images))
        if positions is not None:
            np.testing.assert_array_equal(seq.positions, positions)
        got = pipe.generate_ids(images or None, PROMPTS[1], video=clip_frames(), max_new_tokens=NEW_TOKENS,
                                ignore_eos=True)
        assert list(got) == expected, (shape, target, len(images))


def test_glm4v_frame_sampling_is_the_processors():
    """GLM-4V's per-second sampling against Glm4vVideoProcessor.sample_frames, short and long clips."""
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import VideoMetadata

    from mmedge.manifest import PreprocessSpec
    from mmedge.runtimes.video import sample_indices

    spec = PreprocessSpec(height=28, width=28, resize_mode="smart_resize", patch_size=14, merge_size=2,
                          temporal_patch_size=2, video_fps=2.0, video_min_frames=2, video_max_frames=600,
                          video_sampling="per_second")
    sampler = Glm4vVideoProcessor.sample_frames
    processor = type("P", (), {"fps": 2, "max_duration": 300})()
    for total, native in ((5, 30.0), (61, 30.0), (300, 24.0), (7, 2.0), (1, 25.0), (40000, 25.0), (9000, 25.0)):
        metadata = VideoMetadata(total_num_frames=total, fps=native, duration=None)
        assert sample_indices(total, native, spec).tolist() == sampler(processor, metadata).tolist(), (total, native)


def test_video_token_budget(packages, tmp_path):
    """max_video_tokens caps a prompt's video: dynamic-resolution frames resized down (Qwen2-VL per frame, GLM-4V
    over the clip), fixed-size frames fewer (InternVL, from a file); too small a cap is one line, exit 2."""
    from conftest import run_cli_in_process as run_cli
    from test_errors import assert_one_line_error
    from test_qwen_vl import write_clip

    frames = clip_frames(4, (120, 96))
    for shape in ("qwen2vl-gqa", VIDEO_SHAPES[0]):  # Qwen2-VL's own video tokens; GLM-4V's as images
        pipe = Pipeline.load(packages(shape, "onnxruntime"))
        p = pipe.manifest.prompt
        token = p.image_token_id if p.video_as_images else p.video_token_id
        full = int((pipe._prepare(None, PROMPTS[1], pipe.options(), frames).ids == token).sum())
        capped = int((pipe._prepare(None, PROMPTS[1], pipe.options(max_video_tokens=full // 3), frames).ids
                      == token).sum())
        assert 0 < capped <= full // 3 < full, (shape, capped, full)
        assert len(list(pipe.generate_ids(None, PROMPTS[1], video=frames, max_new_tokens=2, max_video_tokens=8))) == 2

    internvl = [s for s in VIDEO_SHAPES if SHAPES[s].family == "internvl"][0]
    pipe = Pipeline.load(packages(internvl, "onnxruntime"))
    per = pipe.manifest.prompt.image_seq_len
    clip = tmp_path / "clip.mp4"
    write_clip(clip, clip_frames(40, (64, 48)), fps=10)
    seq = pipe._prepare(None, PROMPTS[1], pipe.options(max_video_tokens=3 * per), str(clip))
    assert len(seq.pixels) == 3  # three frames sampled from the file, not the package's eight
    result = run_cli("run", str(packages(internvl, "onnxruntime")), "--video", str(clip), "--prompt", "hi",
                     "--max-video-tokens", str(per - 1))
    assert_one_line_error(result, "less than one frame's")
    result = run_cli("run", str(packages("qwen2vl-gqa", "onnxruntime")), "--video", str(clip), "--prompt", "hi",
                     "--max-video-tokens", "1")
    assert_one_line_error(result, "less than one token for each")
