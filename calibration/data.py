"""Calibration sets: (image, prompt) pairs that run through the real pipeline.

    --calib builtin          the model's own task generator for a shipped demo
                             model, otherwise scikit-image's bundled photographs
                             with a set of prompts
    --calib photos/          every image in a folder, prompts cycled from PROMPTS
    --calib calib.jsonl      one {"image": path, "prompt": text} per line (paths
                             relative to the file)

A package that takes audio (Whisper) calibrates on speech instead: `builtin` is
the spoken commands shipped in calibration/speech/ (synthesised offline with
espeak-ng), a folder its sound files (WAV; FLAC, MP3, ... with PyAV).

A set is split into samples that calibrate and held-out samples that measure
the quantized package against the fp32 one. Unreadable images are skipped
with one warning that counts them; too few readable samples is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmedge.errors import ExportError

log = logging.getLogger(__name__)

PROMPTS = (
    "caption en",
    "describe en",
    "answer en what is in the image?",
    "answer en what color is the largest object?",
    "answer en how many objects are there?",
    "detect object",
    "question: what is shown here? answer:",
    "",
)
# The photographs bundled in scikit-image's wheel (skimage/data), colour and greyscale.
SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
    "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png", "gravel.png", "brick.png", "grass.png",
    "coins.png", "camera.png", "moon.png", "page.png", "text.png", "horse.png", "cell.png", "clock_motion.png",
    "logo.png",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MIN_SAMPLES = 8  # fewer cannot both calibrate and leave held-out samples to measure on
TASK_SEED = 777  # the demo task's calibration stream: not a training seed, not the eval seed (12345)


@dataclass
class Sample:
    image: Image.Image | None
    prompt: str
    answer: str | None = None  # known for task-generated samples
    audio: object = None  # an audio package's sample: float32 samples at the model's rate (then no image)


@dataclass
class CalibrationSet:
    source: str
    calibrate: list[Sample]
    held_out: list[Sample]
    skipped: int = 0
    token_budget: int | None = None  # calibration stops once its prompts reach this many tokens (token_budget())
    prompt_tokens: int | None = None  # the calibration prompts' tokens, once counted against the budget

    def describe(self) -> dict:
        budget = ({"token_budget": self.token_budget, "prompt_tokens": self.prompt_tokens}
                  if self.prompt_tokens is not None else {})  # where calibration counted its prompts against it
        return {"source": self.source, "calibration_samples": len(self.calibrate),
                "held_out_samples": len(self.held_out), "skipped_unreadable": self.skipped, **budget}


DEFAULT_SAMPLES = 64


def default_samples(weights) -> int:
    """Calibration samples when --calib-samples is not given: 64, and for a model over 1B parameters as many as
    64 would be for 1B in time (a sample's prefill costs in proportion), at least 16: 21 for a 3B model."""
    params = weights.elements if weights is not None else 0
    if params <= 1e9:
        return DEFAULT_SAMPLES
    return max(16, round(DEFAULT_SAMPLES * 1e9 / params))


SAMPLE_TOKENS = 320  # the prompt one sample of default_samples stands for: a 256-token image and its text


def token_budget(weights) -> int | None:
    """Where default_samples lowers the count for a big model, the prompt tokens those samples stand for
    (default_samples x SAMPLE_TOKENS): calibration stops once its prompts reach them, at least MIN_SAMPLES. A
    prefill costs in proportion to its tokens, and a dynamic-resolution image is as many tokens as its size
    makes it (Qwen2.5-VL: 98 to 1,250 for the builtin photographs, PaliGemma: 256 each). None for a model
    calibrated on the full DEFAULT_SAMPLES, and where --calib-samples is given."""
    samples = default_samples(weights)
    return samples * SAMPLE_TOKENS if samples < DEFAULT_SAMPLES else None


def load_calibration(source: str, samples: int, checkpoint: Path | None = None,
                     held_out: int | None = None, audio_rate: int | None = None) -> CalibrationSet:
    """`samples` calibration samples from `source`, plus held-out ones (default: a quarter as many, at least 4);
    `audio_rate`: the model takes audio at this rate, and the samples are speech."""
    if samples < MIN_SAMPLES:
        raise ExportError(f"--calib-samples must be at least {MIN_SAMPLES}, got {samples}")
    n_held = held_out if held_out is not None else max(4, samples // 4)
    if audio_rate is not None:
        return _speech_set(source, samples, n_held, audio_rate)
    if source == "builtin":
        task = _checkpoint_task(checkpoint)
        if task == "shapes":
            return _task_set(samples, n_held)
        return _split("builtin (scikit-image photographs)", *_skimage(samples + n_held), samples, n_held)
    path = Path(source).expanduser()
    if not path.exists():
        raise ExportError(f"calibration source not found: {path}; pass an image folder, a .jsonl file or 'builtin'")
    if path.is_dir():
        pairs, skipped = _folder(path, samples + n_held)
        return _split(str(path), pairs, skipped, samples, n_held)
    if path.suffix.lower() in (".jsonl", ".json"):
        pairs, skipped = _jsonl(path, samples + n_held)
        return _split(str(path), pairs, skipped, samples, n_held)
    raise ExportError(f"calibration source {path} is neither a folder of images nor a .jsonl file")


SPEECH = Path(__file__).parent / "speech"
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus", ".webm"}


def _speech_set(source: str, samples: int, n_held: int, rate: int) -> CalibrationSet:
    """Speech clips (cycled where there are fewer than asked for) for an audio package."""
    from mmedge.errors import InputError
    from mmedge.runtimes.audio import load_audio

    folder = SPEECH if source == "builtin" else Path(source).expanduser()
    if not folder.is_dir():
        raise ExportError(f"calibration source {folder} is not a folder of sound files; an audio model calibrates "
                          "on speech: pass --calib <folder of WAV/FLAC/MP3 files> or 'builtin'")
    clips, skipped = [], 0
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        try:
            clips.append(load_audio(path, rate))
        except InputError:
            skipped += 1
    if skipped:
        log.warning("skipped %d sound file(s) in %s that could not be read", skipped, folder)
    if not clips:
        raise ExportError(f"no readable sound files in {folder} (WAV; FLAC, MP3, ... with PyAV)")
    pairs = [Sample(None, "", audio=clips[i % len(clips)]) for i in range(samples + n_held)]
    name = "builtin (espeak-ng speech, calibration/speech)" if source == "builtin" else str(folder)
    return CalibrationSet(name, pairs[:samples], pairs[samples:], skipped)


def _checkpoint_task(checkpoint: Path | None) -> str | None:
    """The task a shipped demo model was trained on (its eval.json), if any."""
    if checkpoint is None or not (Path(checkpoint) / "eval.json").is_file():
        return None
    try:
        return json.loads((Path(checkpoint) / "eval.json").read_text()).get("task")
    except (OSError, ValueError):
        return None


def _task_set(samples: int, n_held: int) -> CalibrationSet:
    from mmedge.tasks import shapes

    stream = shapes.examples(samples + n_held, seed=TASK_SEED)
    pairs = [Sample(ex.image, ex.prompt, ex.answer) for ex in stream]
    return CalibrationSet("builtin (shapes task generator)", pairs[:samples], pairs[samples:])


def _skimage(n: int) -> tuple[list[Sample], int]:
    try:
        import skimage
    except ImportError:
        raise ExportError("--calib builtin needs scikit-image for its photographs: `pip install scikit-image`, "
                          "or pass --calib <image folder | calib.jsonl>") from None
    root = Path(skimage.__file__).parent / "data"
    paths = [root / name for name in SKIMAGE_PHOTOS if (root / name).is_file()]
    images, skipped = _open_all(paths)
    # every photograph with several prompts: more samples than photographs, no photograph twice with one prompt
    pairs = [Sample(images[i % len(images)], PROMPTS[(i + i // len(images)) % len(PROMPTS)])
             for i in range(n)] if images else []
    return pairs, skipped


def _folder(path: Path, n: int) -> tuple[list[Sample], int]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images, skipped = _open_all(files[:n])
    return [Sample(img, PROMPTS[i % len(PROMPTS)]) for i, img in enumerate(images)], skipped


def _jsonl(path: Path, n: int) -> tuple[list[Sample], int]:
    pairs, skipped = [], 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, prompt = record["image"], record.get("prompt", "")
            if not isinstance(image, str) or not isinstance(prompt, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ExportError(f"{path}:{lineno}: expected a JSON object {{\"image\": path, \"prompt\": text}}") from None
        if not (path.parent / image).is_file():  # a listed image that is not there is a typo, not a bad file
            raise ExportError(f"{path}:{lineno}: image {image!r} not found (paths are relative to {path.parent})")
        opened, bad = _open_all([(path.parent / image)])
        skipped += bad
        pairs += [Sample(img, prompt) for img in opened]
        if len(pairs) >= n:
            break
    return pairs, skipped


def _open_all(paths: list[Path]) -> tuple[list[Image.Image], int]:
    images, skipped = [], 0
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                images.append(img.copy())
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            skipped += 1
            log.debug("skipping %s: %s", p, exc)
    return images, skipped


def _split(source: str, pairs: list[Sample], skipped: int, samples: int, n_held: int) -> CalibrationSet:
    if skipped:
        log.warning("skipped %d unreadable calibration image%s in %s", skipped, "s" * (skipped != 1), source)
    if len(pairs) < MIN_SAMPLES:
        raise ExportError(
            f"calibration set {source} has {len(pairs)} readable sample(s); at least {MIN_SAMPLES} are needed "
            "(add images, or use --calib builtin)"
        )
    if len(pairs) < samples + n_held:
        asked = samples + n_held
        n_held = max(1, len(pairs) // 4)
        log.warning("%s has %d readable samples, fewer than the %d asked for: calibrating on %d, measuring on %d",
                    source, len(pairs), asked, len(pairs) - n_held, n_held)
        samples = len(pairs) - n_held
    return CalibrationSet(source, pairs[:samples], pairs[samples:samples + n_held], skipped)
