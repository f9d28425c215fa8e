"""Shared fixtures: tiny random checkpoints (built offline) and their exported packages.

Every family's tiny shape (`mmedge.exporters.tiny.shapes()`) is exported once per
session for every target that can run here; tests take (shape, target) pairs
from `CASES` so a new family or target is a new entry, not new test code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmedge.exporters import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# name -> export options: every target, and every KV-cache storage a target offers beyond its default
TARGETS = {
    "onnxruntime": dict(target="onnxruntime"),
    "openvino": dict(target="openvino"),  # KV cache as engine state
    "openvino-buffer": dict(target="openvino", kv_cache="buffer"),
    # the traced decoder, for comparison with the in-place one that onnxruntime builds where it can
    "onnxruntime-buffer": dict(target="onnxruntime", kv_cache="buffer"),
    # TensorRT-ready graphs; here they run through ONNX Runtime (BACKEND), as `mmedge run --backend onnxruntime`
    "tensorrt": dict(target="tensorrt"),
    # mlpackages with the KV cache as Core ML state; Core ML runs them on macOS only (tests/test_coreml.py)
    "coreml": dict(target="coreml"),
}
# the backend a target's packages run with in these tests, where not the target's own (no GPU here)
BACKEND = {"tensorrt": "onnxruntime"}
SHAPES = tiny.shapes()
# targets whose packages run on this machine
RUN_HERE = [t for t in TARGETS if t != "coreml" or sys.platform == "darwin"]
CASES = [(shape, target) for shape in SHAPES for target in RUN_HERE if target != "onnxruntime-buffer"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: tiny.save(shape, root / name) for name, shape in SHAPES.items()}


@pytest.fixture(scope="session")
def packages(checkpoints, tmp_path_factory):
    """(shape, target) -> package dir, exported lazily on first use."""
    from mmedge.exporters.export import ExportOptions, export

    root = tmp_path_factory.mktemp("packages")
    made: dict[tuple[str, str], Path] = {}

    def get(shape: str, target: str = "onnxruntime") -> Path:
        if (shape, target) not in made:
            out = root / f"{shape}-{target}"
            export(ExportOptions(model=str(checkpoints[shape]), output=out, progress=False, **TARGETS[target]))
            made[shape, target] = out
        return made[shape, target]

    return get


def sample_images() -> dict[str, Image.Image]:
    """A few different images: noise, shapes on a background, odd aspect ratio."""
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    shapes = Image.new("RGB", (96, 96), (240, 240, 230))
    from PIL import ImageDraw

    d = ImageDraw.Draw(shapes)
    d.ellipse((10, 10, 40, 40), fill=(220, 30, 30))
    d.rectangle((50, 50, 90, 80), fill=(30, 60, 220))
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (40, 1))).convert("RGB")
    return {"noise": noise, "shapes": shapes, "wide": wide}


PROMPTS = ["caption en", "what color is the circle on the left of the square?"]


def mmedge_command() -> list[str]:
    """The installed `mmedge` console script, as users run it."""
    script = Path(sys.executable).parent / "mmedge"
    return [str(script)] if script.exists() else [shutil.which("mmedge") or "mmedge"]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `mmedge ARGS`; returns CompletedProcess (text)."""
    return subprocess.run(
        [*mmedge_command(), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
