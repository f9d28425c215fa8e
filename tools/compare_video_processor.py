"""The runtime's video preprocessing against transformers' Qwen2VLVideoProcessor (torchvision).

transformers builds that processor on torchvision, which does not import beside the CPU torch of the test
environment, so this runs in two environments:

    python tools/compare_video_processor.py ours /tmp/ours.npz              # the test venv: mmedge's patches
    /tmp/tvenv/bin/python tools/compare_video_processor.py theirs /tmp/ours.npz   # torchvision's, compared

(/tmp/tvenv: `pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0`.) `theirs` also checks the
frame sampling (runtimes/video.sample_indices, read from the source) against the processor's `sample_frames`.
The figures are in docs/dynamic-resolution.md.
"""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
BOUNDS = {"defaults": (14, 128 * 28 * 28, 768 * 28 * 28), "tiny": (4, 256, 4096)}  # patch, min and max pixels


def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    return [np.clip(np.stack([(x + 8 * i) % 256, y * 255 // 240, (x + y) // 3 % 256], -1)
                    + rng.integers(-10, 10, (240, 320, 3)), 0, 255).astype(np.uint8) for i in range(6)]


def ours(out: str) -> None:
    from PIL import Image

    from mmedge.manifest import PreprocessSpec
    from mmedge.runtimes.video import prepare_video

    result = {}
    for name, (patch, low, high) in BOUNDS.items():
        spec = PreprocessSpec(height=1, width=1, resample="bicubic", resize_mode="smart_resize", patch_size=patch,
                              merge_size=2, temporal_patch_size=2, min_pixels=1, max_pixels=1, video_fps=2.0,
                              video_min_frames=4, video_max_frames=768, video_min_pixels=low, video_max_pixels=high,
                              mean=CLIP_MEAN, std=CLIP_STD)
        video = prepare_video([Image.fromarray(f) for f in frames()], spec)
        result[name], result[name + "_grid"] = video.patches, np.array(video.grid)
    np.savez(out, **result)


def theirs(saved: str) -> None:
    from transformers import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    mine = np.load(saved)
    for name, (patch, low, high) in BOUNDS.items():
        got = Qwen2VLVideoProcessor(patch_size=patch, min_pixels=low, max_pixels=high)(
            videos=[frames()], return_tensors="np", do_sample_frames=False)
        d = np.abs(got["pixel_values_videos"] - mine[name])
        print(f"{name}: grid {got['video_grid_thw'].tolist()} vs {mine[name + '_grid'].tolist()}; max abs "
              f"{d.max():.4f}, mean {d.mean():.5f}, values > 0.01: {(d > 0.01).mean():.3%}")
    source = (Path(__file__).parents[1] / "runtimes" / "video.py").read_text()
    scope = {"math": math, "np": np, "InputError": ValueError, "PreprocessSpec": object}
    exec(source[source.index("def sample_indices("):source.index("def read_video(")], scope)
    spec = SimpleNamespace(temporal_patch_size=2, video_fps=2.0, video_min_frames=4, video_max_frames=768)
    processor = SimpleNamespace(fps=2.0, temporal_patch_size=2, min_frames=4, max_frames=768, num_frames=None)
    for total, fps in [(20, 10.0), (300, 30.0), (7, 24.0), (1000, 29.97), (50, 1.0), (9, 3.0), (3001, 59.94),
                       (100000, 30.0)]:
        expected = Qwen2VLVideoProcessor.sample_frames(processor, VideoMetadata(total_num_frames=total, fps=fps))
        same = np.array_equal(expected.numpy(), scope["sample_indices"](total, fps, spec))
        print(f"sampling {total} frames at {fps} fps: {len(expected)} frames, {'equal' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    {"ours": ours, "theirs": theirs}[sys.argv[1]](sys.argv[2])
