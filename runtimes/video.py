"""Video: read a file with PyAV, sample frames as the package's processor does, and cut them into temporal patches
(the dynamic-resolution families) or tiles (the fixed-size families that take video as images).

A video is a file path (any container and codec FFmpeg reads) or a list of frames (anything `load_image`
takes), already sampled. From a file, frames are sampled at the package's `video_fps`: Qwen2-VL's rule
("uniform": n = frames / native fps x video_fps, within [video_min_frames, video_max_frames] and the file's frame
count, rounded down to whole temporal patches, at indices 0, N/n, 2N/n, ...) or GLM-4V's ("per_second"). Each
frame is resized like an image (smart_resize within the video's pixel bounds, Pillow's filter, the same
normalisation), the frames are padded to a whole number of temporal patches by repeating the last, and
patches hold `temporal_patch_size` consecutive frames: [t * h * w, 3 * T * p * p] with the grid (t, h, w). For a
fixed-size family (InternVL) each frame is one tile, as an image is without splitting. A package with
`video_as_images` then takes each temporal patch (or frame) as one more image (`video_units`).

PyAV is the reader: FFmpeg's decoders in-process (no subprocess, no binary on PATH), exact frame counts and
rates from the container, and it is what transformers itself uses to load video. It is an optional
dependency (`pip install "mmedge[video]"`): nothing else in the runtime needs it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from mmedge.errors import InputError, PackageError
from mmedge.manifest import PreprocessSpec

VideoInput = Union[str, os.PathLike, Sequence]


@dataclass
class Video:
    """A prepared video: patches [t*h*w, patch_dim], grid (t, h, w) in patches, and the frame rate of the sampled
    frames (positions of Qwen2.5-VL's temporal row follow time)."""

    patches: np.ndarray
    grid: tuple[int, int, int]
    fps: float
    seconds: list[float]  # each temporal patch's time: the mean of its first and last frame's (Qwen3-VL's stamps)
    starts: list[float]  # each temporal patch's first frame's time (GLM-4V's stamps)


def sample_indices(total: int, native_fps: float, spec: PreprocessSpec) -> np.ndarray:
    """Which of a file's `total` frames to keep, as the package's processor samples them (`video_sampling`)."""
    if spec.video_sampling == "per_second":
        return _per_second(total, native_fps, spec)
    if spec.video_sampling != "uniform":
        raise PackageError(f"this mmedge does not know the frame sampling {spec.video_sampling!r}; upgrade mmedge")
    step = spec.temporal_patch_size or 1
    most = math.floor(min(spec.video_max_frames, total) / step) * step
    n = total / native_fps * spec.video_fps
    n = math.floor(min(max(n, spec.video_min_frames), most, total) / step) * step
    if n < 1:
        raise InputError(f"the video has {total} frame(s); this model needs at least {step}")
    # torch.arange(0, total, total / n).int(): the values in float64, stored as float32, then truncated
    return np.arange(0, total, total / n).astype(np.float32).astype(np.int64)


def _per_second(total: int, native_fps: float, spec: PreprocessSpec) -> np.ndarray:
    """GLM-4V's sampling: frame ceil(i x native / video_fps) for each i < duration x video_fps (duration in whole
    seconds, at least one frame); a clip longer than video_max_frames allows, video_max_frames frames at evenly
    spaced times (or every frame, if it has no more); repeats dropped, the last repeated to an even count."""
    last = total - 1
    duration = round(last / native_fps) + 1
    most = spec.video_max_frames or 0
    if not most or duration * spec.video_fps <= most:  # the processor's max_duration x fps
        n = max(int(math.floor(duration * spec.video_fps)), 1)
        picked = [min(last, int(math.ceil(i * native_fps / spec.video_fps))) for i in range(n)]
    elif most >= total:
        picked = list(range(total))
    else:
        picked = [min(last, int(math.ceil(t * native_fps))) for t in np.linspace(0, duration, most, endpoint=True)]
    keep = list(dict.fromkeys(picked))
    if len(keep) % 2:
        keep.append(keep[-1])
    return np.asarray(keep, dtype=np.int64)


def read_video(path: str | os.PathLike, spec: PreprocessSpec, convert) -> tuple[list, float, np.ndarray, float]:
    """The sampled frames of a video file, each passed through `convert(rgb PIL image, kept frame count)` as it is
    decoded (so only the kept frames, at their final size, are held), their frame rate, their indices and the
    file's rate."""
    try:
        import av
    except ImportError:
        raise InputError('reading video files needs PyAV: pip install "mmedge[video]" (or pip install av), '
                         "or pass the frames as a list of images") from None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            native = float(stream.average_rate or stream.guessed_rate or 0)
            total = stream.frames or sum(1 for _ in container.decode(stream))  # count where the container does not
            if total and not native:
                raise InputError(f"{path} does not say its frame rate; pass its frames as a list of images")
            if not total:
                raise InputError(f"{path} holds no frames")
            keep = sample_indices(total, native, spec)
            if stream.frames == 0:
                container.seek(0)
            wanted, frames = {}, []
            for index in keep.tolist():
                wanted[index] = wanted.get(index, 0) + 1  # GLM-4V's sampling may keep a frame twice
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames.extend([convert(frame.to_image().convert("RGB"), len(keep))] * wanted[i])
    except InputError:
        raise
    except Exception as exc:  # av.error.* (not a video, damaged, unknown codec), OSError
        raise InputError(f"{path} is not a video FFmpeg can read ({str(exc).splitlines()[0] if str(exc) else exc})"
                         ) from None
    if not frames:
        raise InputError(f"{path} holds no frames")
    return frames, len(keep) / total * native, keep, native


def prepare_video(video: VideoInput, spec: PreprocessSpec, fps: float | None = None, max_tokens: int | None = None,
                  tokens_per_frame: int | None = None) -> Video:
    """A file or a list of frames -> temporal patches and their grid ("smart_resize" families), or the frames as
    tiles [frames, 3, H, W] with the grid (frames, H, W) (the fixed-size families that take video as images).

    max_tokens: the most tokens the video may take: its frames resized down to fit (dynamic resolution), or, where
    each frame takes a fixed `tokens_per_frame`, at most that many frames sampled from a file (a list of frames
    over it is refused)."""
    from mmedge.runtimes.preprocess import RESAMPLE, load_image, normalized, rgb_array, smart_resize, to_rgb

    if spec.video_fps is None:
        raise InputError("this package's model takes no video")
    size = {}
    patches = spec.resize_mode == "smart_resize"
    if max_tokens is not None and not patches:
        most = max_tokens // (tokens_per_frame or 1)
        if most < 1:
            raise InputError(f"max_video_tokens {max_tokens} is less than one frame's {tokens_per_frame} tokens")
        if isinstance(video, (list, tuple)) and len(video) > most:
            raise InputError(f"the video's {len(video)} frames take {len(video) * tokens_per_frame} tokens, more "
                             f"than max_video_tokens {max_tokens}: pass at most {most} frames")
        spec = dataclasses.replace(spec, video_max_frames=min(spec.video_max_frames or most, most),
                                   video_min_frames=min(spec.video_min_frames or 1, most))

    def bounds(count: int) -> tuple[int, int]:
        """The frames' pixel bounds: the package's, lowered so that `count` frames take at most max_tokens."""
        low, high = spec.video_min_pixels, spec.video_max_pixels
        if max_tokens is None:
            return low, high
        patches_t = -(-count // spec.temporal_patch_size)  # temporal patches, after padding
        each = max_tokens // patches_t
        if each < 1:
            raise InputError(f"max_video_tokens {max_tokens} leaves less than one token for each of the video's "
                             f"{patches_t} temporal patches: raise it, or pass fewer frames")
        # the pixels of `each` tokens a frame (GLM-4V's bounds count the clip's frames: as many times that)
        cap = each * (spec.patch_size * spec.merge_size) ** 2 * (count if spec.video_budget_per_clip else 1)
        return min(low, cap), min(high, cap)

    def convert(frame: Image.Image, count: int) -> np.ndarray:
        """One frame resized (the first frame's size decides, as the processor resizes a clip as one) and
        normalised: [3, H, W]. `count`: the clip's frames, which GLM-4V's pixel bounds count."""
        if not patches:  # one tile, as an image is without splitting
            from mmedge.runtimes.preprocess import preprocess

            return preprocess(frame, dataclasses.replace(spec, do_image_splitting=False))[0]
        if "hw" not in size:
            h, w = frame.height, frame.width
            budget = dataclasses.replace(spec, smart_resize_frames=count) if spec.video_budget_per_clip else spec
            size["hw"] = smart_resize(h, w, budget, *bounds(count)) if spec.do_resize else (h, w)
        h, w = size["hw"]
        if frame.size != (w, h):
            frame = frame.resize((w, h), resample=RESAMPLE[spec.resample])
        return normalized(rgb_array(frame), spec)

    if isinstance(video, (str, os.PathLike)):
        arrays, rate, indices, native = read_video(video, spec, convert)
    elif isinstance(video, (list, tuple)):
        if not video:
            raise InputError("the video has no frames")
        frames = [to_rgb(load_image(f)) for f in video]
        if any(f.size != frames[0].size for f in frames):
            raise InputError("the video's frames differ in size; pass frames of one size")
        arrays, rate = [convert(f, len(frames)) for f in frames], spec.video_fps
        indices, native = np.arange(len(frames)), spec.video_fps
    else:
        raise InputError(f"a video is a file path or a list of frames, not {type(video).__name__}")
    rate = fps or rate
    if not patches:
        stamps = [float(i) / native for i in indices]
        clip = np.stack(arrays)
        return Video(clip, (len(clip), *clip.shape[2:]), rate, stamps, stamps)
    h, w = size["hw"]
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    pad = -len(arrays) % t
    arrays += [arrays[-1]] * pad  # whole temporal patches: the last frame repeated
    stamps = [float(i) / native for i in list(indices) + [indices[-1]] * pad]
    seconds = [(stamps[i] + stamps[i + t - 1]) / 2 for i in range(0, len(stamps), t)]
    clip = np.stack(arrays)  # [frames, 3, H, W]
    gt, gh, gw = len(arrays) // t, h // p, w // p
    c = clip.shape[1]
    cut = clip.reshape(gt, t, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return Video(np.ascontiguousarray(cut.reshape(gt * gh * gw, c * t * p * p)), (gt, gh, gw), rate, seconds,
                 stamps[::t])


def video_units(video: Video) -> list[tuple[np.ndarray, tuple]]:
    """A video as the images of a model that takes it so (`video_as_images`): each temporal patch's patches with
    the grid (1, h, w), or each frame's tile [1, 3, H, W] with the grid (0, 0) of an unsplit image."""
    t, h, w = video.grid
    if video.patches.ndim == 4:
        return [(video.patches[i : i + 1], (0, 0)) for i in range(t)]
    return [(video.patches[i * h * w : (i + 1) * h * w], (1, h, w)) for i in range(t)]
