"""Render the example images in examples/images/ with the shapes task's own renderer.

    python tools/make_example_images.py
"""

from pathlib import Path

import numpy as np

from mmedge.tasks.shapes import Obj, caption, draw

SCENES = {
    # name: objects (shape, color, cell 0..8 row-major)
    "shapes.png": [("circle", "red", 0), ("triangle", "green", 5), ("square", "blue", 7)],
    "two_shapes.png": [("diamond", "orange", 3), ("circle", "cyan", 4)],
    "count.png": [("square", "yellow", 1), ("square", "purple", 2), ("triangle", "blue", 6), ("square", "red", 8)],
}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "examples" / "images"
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, spec) in enumerate(SCENES.items()):
        objs = [Obj(*o) for o in spec]
        draw(objs, np.random.default_rng(i), size=96).save(out / name, optimize=True)
        print(f"{name}: {caption(objs)}")


if __name__ == "__main__":
    main()
