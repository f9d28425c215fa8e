"""The shapes task: images of one to four coloured shapes on a 3x3 grid, and questions about them.

Every example is drawn from a seeded numpy Generator, so a seed names a data
set exactly: the demo models train on one seed's stream and are scored on
another's. Six question kinds, one sixth of the examples each:

    caption    "caption"                       -> "a red circle and a blue square"
    color      "what color is the circle?"     -> "red"          (the shape occurs once)
    count      "how many circles?"             -> "zero" .. "four"
    where      "where is the red circle?"      -> "top left" .. "bottom right", "center"
    exists     "is there a triangle?"          -> "yes" / "no"
    left_of    "what is left of the circle?"   -> "a blue square" / "nothing"  (nearest, same row)

Captions list objects in reading order (rows top to bottom, then left to right).
Colours include close pairs (red/orange, blue/cyan); sizes, positions within
cells, shades and backgrounds vary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("caption", "color", "count", "where", "exists", "left_of")
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (235, 215, 40),
    "green": (45, 165, 65),
    "blue": (40, 70, 215),
    "cyan": (40, 200, 215),
    "purple": (145, 60, 195),
}
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
IMAGE_SIZE = 96
JITTER = 0.8  # how far a shape may wander from its cell's centre, as a fraction of the room it has
SIZE_RANGE = (0.22, 0.4)  # a shape's half-size as a fraction of its cell


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: int  # 0..8, row-major

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def phrase(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape}"


@dataclass
class Example:
    image: Image.Image
    prompt: str
    answer: str
    kind: str
    objects: tuple[Obj, ...] = ()  # the scene, in reading order


def _scene(rng: np.random.Generator) -> list[Obj]:
    n = int(rng.integers(1, 5))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())
    return [Obj(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], c) for c in cells]


def draw(objs: list[Obj], rng: np.random.Generator, size: int) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cell = size / 3
    for o in objs:
        r = cell * rng.uniform(*SIZE_RANGE)
        cx = (o.col + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r) * JITTER
        cy = (o.row + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r) * JITTER
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[o.color])
        if o.shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.9
            d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o.shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    return img


def caption(objs: list[Obj]) -> str:
    phrases = [o.phrase for o in objs]  # objs are in reading order
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _question(kind: str, objs: list[Obj], rng: np.random.Generator, variant: bool) -> tuple[str, str] | None:
    """A question of `kind` with one right answer for this scene, or None if the scene allows none.

    `variant` picks the answer's side for yes/no and something/nothing questions,
    drawn once per example so that scenes retried for it do not bias the balance.
    """
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    unique = [o for o in objs if len(by_shape[o.shape]) == 1]
    if kind == "caption":
        return "caption", caption(objs)
    if kind == "color":
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"what color is the {o.shape}?", o.color
    if kind == "count":
        present = sorted({o.shape for o in objs})
        s = present[rng.integers(len(present))] if variant else SHAPES[rng.integers(len(SHAPES))]
        return f"how many {s}s?", NUMBERS[len(by_shape[s])]
    if kind == "where":
        solo = [o for o in objs if sum(p.shape == o.shape and p.color == o.color for p in objs) == 1]
        if not solo:
            return None
        o = solo[rng.integers(len(solo))]
        return f"where is the {o.color} {o.shape}?", CELLS[o.cell]
    if kind == "exists":
        want = variant
        pool = [s for s in SHAPES if bool(by_shape[s]) == want]
        if not pool:
            return None
        return f"is there a {pool[rng.integers(len(pool))]}?", "yes" if want else "no"
    if kind == "left_of":
        if not unique:
            return None
        want_something = variant
        rng.shuffle(unique)
        for o in unique:
            left = [p for p in objs if p.row == o.row and p.col < o.col]
            if bool(left) == want_something:
                answer = max(left, key=lambda p: p.col).phrase if left else "nothing"
                return f"what is left of the {o.shape}?", answer
        return None
    raise ValueError(f"unknown kind {kind!r}")


def sample(rng: np.random.Generator, kind: str, size: int = IMAGE_SIZE) -> Example:
    variant = bool(rng.integers(2))
    while True:
        objs = _scene(rng)
        qa = _question(kind, objs, rng, variant)
        if qa is not None:
            return Example(draw(objs, rng, size), qa[0], qa[1], kind, tuple(objs))


def examples(n: int, seed: int, size: int = IMAGE_SIZE, kinds: tuple[str, ...] = KINDS):
    """n examples from `seed`, `kinds` in rotation (a generator: images are made as consumed)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield sample(rng, kinds[i % len(kinds)], size)


# The zero-shot form of the task, for embedding packages (CLIP, SigLIP): a scene of one shape, and either its
# colour or its shape picked among every label of the kind by image-text similarity, the labels written into
# the kind's template.
ZERO_SHOT = {"color": ("a {} shape", tuple(COLORS)), "shape": ("a {}", SHAPES)}


@dataclass
class ZeroShotExample:
    image: Image.Image
    kind: str  # "color" or "shape"
    template: str  # with {} for the label
    labels: tuple[str, ...]
    answer: str


def zero_shot_examples(n: int, seed: int, size: int = IMAGE_SIZE):
    """n single-shape scenes from `seed`, the kinds of ZERO_SHOT in rotation (a generator)."""
    rng = np.random.default_rng(seed)
    kinds = tuple(ZERO_SHOT)
    for i in range(n):
        obj = Obj(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], int(rng.integers(9)))
        kind = kinds[i % len(kinds)]
        template, labels = ZERO_SHOT[kind]
        yield ZeroShotExample(draw([obj], rng, size), kind, template, labels,
                              obj.color if kind == "color" else obj.shape)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def corpus() -> list[str]:
    """Every word the task uses, in sentences: what the demo tokenizer is trained on."""
    words = [*SHAPES, *(s + "s" for s in SHAPES), *COLORS, *CELLS, *NUMBERS, "yes", "no", "nothing", "a", "and"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=8)) for _ in range(300)]
    for kind in KINDS:
        for _ in range(200):
            objs = _scene(rng)
            qa = _question(kind, objs, rng, bool(rng.integers(2)))
            if qa:
                lines.append(qa[0] + "\n" + qa[1])
    return lines
