"""Boxes (and segment tokens) out of a detection answer, in the original image's pixels.

Each family writes boxes its own way; the package names the way (`schemes.boxes`) and the prompt that asks
for them (`schemes.detect_prompt`, with {objects}):

  "loc1024_yxyx"   PaliGemma: four <locNNNN> tokens (y0, x0, y1, x1 in 1024 bins over the image) then the
                   label, detections separated by " ; "; <segNNN> tokens after a box are a mask for
                   PaliGemma's separate mask decoder (reported, not decoded)
  "box_1000"       Qwen2-VL: <|object_ref_start|>label<|object_ref_end|><|box_start|>(x0,y0),(x1,y1)<|box_end|>,
                   coordinates over the image in [0, 1000)
  "json_pixels"    Qwen2.5-VL: a JSON list of {"bbox_2d": [x0, y0, x1, y1], "label": ...} in pixels of the image
                   as the model saw it (after its resize)
  "json_1000"      Qwen3-VL: the same JSON, coordinates over the image in [0, 1000]
  "loc1000_xyxy"   Florence-2: a label, then one or more boxes of four <loc_N> tokens (x0, y0, x1, y1 in 1000 bins
                   over the image; a box's corner is its bin's centre); an answer of boxes alone (region
                   proposals) gives them unlabelled

A truncated answer (the token budget ran out mid-list) gives the boxes that are complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mmedge.errors import InputError

BOX_FORMATS = ("loc1024_yxyx", "box_1000", "json_pixels", "json_1000", "loc1000_xyxy")
SEPARATOR = {"loc1024_yxyx": " ; "}  # between the objects asked for in the detect prompt; others ", "


@dataclass
class Box:
    label: str
    x0: float
    y0: float
    x1: float
    y1: float


@dataclass
class Detections:
    boxes: list[Box]
    text: str  # the answer as generated
    segments: list[str] = field(default_factory=list)  # labels that came with mask tokens (not decoded)


_LOC = re.compile(r"((?:<loc\d{4}>){4})\s*((?:<seg\d{3}>)*)\s*([^<;]*)")
_QWEN2 = re.compile(r"(?:<\|object_ref_start\|>(.*?)<\|object_ref_end\|>)?\s*<\|box_start\|>\s*\(\s*(-?[\d.]+)\s*,"
                    r"\s*(-?[\d.]+)\s*\)\s*,\s*\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)\s*<\|box_end\|>")
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_FLORENCE = re.compile(r"([^<]*)((?:<loc_\d+>){4,})")


def parse(fmt: str, text: str, size: tuple[int, int], seen: tuple[int, int] | None = None) -> Detections:
    """The boxes in `text`, in pixels of an image of `size` (width, height); `seen`: the (width, height) the
    model saw it at, for "json_pixels" (default: `size`)."""
    width, height = size
    boxes: list[Box] = []
    segments: list[str] = []
    if fmt == "loc1024_yxyx":
        for locs, segs, label in _LOC.findall(text):
            y0, x0, y1, x1 = (int(v) / 1024 for v in re.findall(r"\d{4}", locs))
            boxes.append(Box(label.strip(), x0 * width, y0 * height, x1 * width, y1 * height))
            if segs:
                segments.append(label.strip())
    elif fmt == "box_1000":
        for label, *xy in _QWEN2.findall(text):
            x0, y0, x1, y1 = (float(v) / 1000 for v in xy)
            boxes.append(Box(label.strip(), x0 * width, y0 * height, x1 * width, y1 * height))
    elif fmt == "loc1000_xyxy":
        for label, locs in _FLORENCE.findall(text):
            bins = [int(v) for v in re.findall(r"<loc_(\d+)>", locs)]
            for i in range(0, len(bins) - 3, 4):
                x0, y0, x1, y1 = ((b + 0.5) / 1000 for b in bins[i : i + 4])
                boxes.append(Box(label.strip(), x0 * width, y0 * height, x1 * width, y1 * height))
    elif fmt in ("json_pixels", "json_1000"):
        sx, sy = ((width / seen[0], height / seen[1]) if seen else (1.0, 1.0)) if fmt == "json_pixels" else (
            width / 1000, height / 1000)
        for chunk in _JSON_OBJECT.findall(text):  # object by object: a cut-off list still gives its complete ones
            try:
                item = json.loads(chunk)
                x0, y0, x1, y1 = (float(v) for v in item["bbox_2d"])
            except (ValueError, KeyError, TypeError):
                continue
            boxes.append(Box(str(item.get("label", "")), x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    else:
        raise InputError(f"this mmedge does not know the box format {fmt!r}; upgrade mmedge")
    return Detections(boxes, text, segments)


def detect_prompt(template: str, fmt: str, objects: str | list[str]) -> str:
    """The family's detection prompt for `objects` (a list, or one string with the objects separated by ";" or
    ",")."""
    if not isinstance(objects, (str, list, tuple)) or not all(isinstance(n, str) for n in objects):
        raise InputError(f"the objects to detect are text (\"cat ; dog\") or a list of texts, not "
                         f"{type(objects).__name__}")
    names = objects if isinstance(objects, (list, tuple)) else re.split(r"\s*[;,]\s*", objects)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError("name the objects to detect, e.g. \"cat ; dog\"")
    return template.replace("{objects}", SEPARATOR.get(fmt, ", ").join(names))


def check_drawing(out) -> None:
    """That an image can be written to `out`: its folder exists and its extension names an image format."""
    from pathlib import Path

    from PIL import Image

    out = Path(out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"cannot write {out}: name an image file (.png, .jpg, ...)")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist")


def draw(image, boxes: list[Box], out) -> None:
    """The image with each box outlined and labelled, written to `out`."""
    from PIL import ImageDraw

    canvas = image.convert("RGB")
    pen = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 200))
    colors = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    for i, box in enumerate(boxes):
        color = colors[i % len(colors)]
        # corners in order: a model may write a box's far corner first (drawn, not corrected, in `boxes`)
        x0, x1 = sorted((box.x0, box.x1))
        y0, y1 = sorted((box.y0, box.y1))
        pen.rectangle((x0, y0, x1, y1), outline=color, width=width)
        if box.label:
            pen.text((x0 + width, y0 + width), box.label, fill=color)
    try:
        canvas.save(out)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot write {out}: {exc}") from None
