"""The examples run as users run them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_caption_example(packages, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "caption.py"), str(packages("paligemma-gqa")),
         str(ROOT / "examples" / "images" / "shapes.png"), "caption en"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "prompt tokens" in result.stderr


def test_cli_run_and_inspect(packages, tmp_path):
    from conftest import run_cli

    pkg = packages("paligemma-gqa")
    image = ROOT / "examples" / "images" / "two_shapes.png"
    plain = run_cli("run", str(pkg), "--image", str(image), "--prompt", "caption en", "--max-new-tokens", "10",
                    cwd=tmp_path)
    streamed = run_cli("run", str(pkg), "--image", str(image), "--prompt", "caption en", "--max-new-tokens", "10",
                       "--stream", cwd=tmp_path)
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout and plain.stdout.strip()
    shown = run_cli("inspect", str(pkg), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for graph in ("vision_encoder", "projector", "embed_tokens", "decoder"):
        assert graph in shown.stdout
    assert "max abs err" in shown.stdout and "FAIL" not in shown.stdout
