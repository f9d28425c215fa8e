"""Shared fixtures: tiny random checkpoints (built offline), their exported packages, the trained demo models'
packages, transformers' reference tokens and the held-out scores.

Everything expensive is built once per test run and shared (`Shared` below): by every test that reads it, and
by every pytest-xdist worker (`pytest -n 2`, as CI runs), through a folder they all see and a file lock per
entry. Tests take (shape, target) pairs from `CASES`, so a new family or target is a new entry, not new test
code.
"""

from __future__ import annotations

import os
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from mmedge.exporters import tiny
from mmedge.exporters.family import families

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_THREAD_VARS = {name: os.environ.get(name) for name in ("MMEDGE_THREADS", "OMP_NUM_THREADS")}  # the user's own


def pytest_configure(config):
    """`pytest -n N` on C cores: each worker's engines (ONNX Runtime, OpenVINO, torch, and the `mmedge` commands
    the tests run) get C // N threads, so the workers do not fight over the cores: ONNX Runtime's threads spin
    while they wait, and two workers of two threads each on two cores ran their evaluations up to 14x slower.
    The controller sets it before it starts the workers, which inherit it; a value the user set is kept."""
    import torch

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT") or getattr(config.option, "numprocesses", None)
    workers = int(workers) if str(workers).isdigit() and int(workers) > 0 else 1
    threads = max(1, (os.cpu_count() or 1) // workers)
    for name, value in _THREAD_VARS.items():
        os.environ[name] = value if value else str(threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
# the generative families' tiny shapes (every VLM test runs over them) and the embedding families' (CLIP, SigLIP:
# tests/test_embedding.py)
_KIND = {name: getattr(module, "KIND", "generative") for name, module in
         ((m.__name__.rsplit(".", 1)[-1], m) for m in families().values())}
_TAKES = {name: getattr(module, "TAKES", "images") for name, module in
          ((m.__name__.rsplit(".", 1)[-1], m) for m in families().values())}
ALL_SHAPES = tiny.shapes()
SHAPES = {name: shape for name, shape in ALL_SHAPES.items()
          if _KIND[shape.family] == "generative" and _TAKES[shape.family] == "images"}
EMBEDDING_SHAPES = [name for name, shape in ALL_SHAPES.items() if _KIND[shape.family] == "embedding"]
# the families that take audio (Whisper): tests/test_audio.py
AUDIO_SHAPES = [name for name, shape in ALL_SHAPES.items() if _TAKES[shape.family] == "audio"]
# targets whose packages run on this machine
RUN_HERE = [t for t in TARGETS if t != "coreml" or sys.platform == "darwin"]
PARITY_TARGETS = [t for t in RUN_HERE if t != "onnxruntime-buffer"]
CASES = [(shape, target) for shape in SHAPES for target in PARITY_TARGETS]

# The contributors' loop, `pytest -m "not slow"`: each family's first tiny shape, each on one target (the
# families take the targets in turn, so every target's exporter and backend runs), and every test that exports
# nothing of its own. CI runs everything.
slow = pytest.mark.slow
_first: dict[str, str] = {}
for _name, _shape in SHAPES.items():
    _first.setdefault(_shape.family, _name)
FIRST_SHAPES = list(_first.values())
FAST_CASES = {(shape, PARITY_TARGETS[i % len(PARITY_TARGETS)]) for i, shape in enumerate(FIRST_SHAPES)}


def matrix(cases=CASES) -> list:
    """(shape, target) parameters, all but FAST_CASES marked slow."""
    return [pytest.param(*case, marks=() if case in FAST_CASES else slow) for case in cases]


def each_shape(shapes=SHAPES) -> list:
    """shape parameters, all but each family's first marked slow."""
    return [pytest.param(shape, marks=() if shape in FIRST_SHAPES else slow) for shape in shapes]
# calibration samples for the tiny random packages' quantized exports (their tests check the contract and the
# quantized graphs, not accuracy); the demo models' quantized packages use DEMO_CALIB_SAMPLES
TINY_CALIB_SAMPLES = 8
DEMO_CALIB_SAMPLES = 32
N_EVAL = 1000  # held-out examples behind every accuracy bar

PROMPTS = ["caption en", "what color is the circle on the left of the square?"]
NEW_TOKENS = 24  # greedy tokens compared with transformers per (image, prompt)


# -- built once per run, shared by every test and every xdist worker ---------------------------------------


class Shared:
    """A folder of things built once: `folder(key, build)` runs build(path) the first time a key is asked for,
    in whichever worker asks first, while the others wait on the key's lock; `value(key, compute)` does the
    same for a JSON value. A build that fails leaves nothing, so the next test to ask sees the same error."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, key: str, build: Callable[[Path], object]) -> Path:
        out = self.root / key
        done = out.parent / f".{out.name}.done"
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out.parent / f".{out.name}.build-lock")):
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)
                try:
                    build(out)
                except BaseException:
                    shutil.rmtree(out, ignore_errors=True)
                    raise
                done.touch()
        return out

    def value(self, key: str, compute: Callable[[], object]):
        def build(out: Path) -> None:
            result = compute()
            out.mkdir()
            (out / "value.json").write_text(json.dumps(result))

        return json.loads((self.folder(key, build) / "value.json").read_text())


def _shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # xdist gives each worker base/popen-gwN; their parent is this run's, shared by all of them
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Shared:
    return Shared(_shared_root(tmp_path_factory))


@pytest.fixture(scope="session", autouse=True)
def trace_cache(shared):
    """Every export in this run (in-process and through the CLI) reuses traced graphs (exporters/trace_cache.py):
    the targets and precisions of one tiny model trace each graph once. Each export still verifies its graphs."""
    from mmedge.exporters.trace_cache import ENV

    os.environ[ENV] = str(shared.root / "traces")
    yield shared.root / "traces"
    os.environ.pop(ENV, None)


class _Checkpoints(Mapping):
    """name -> checkpoint dir of every tiny shape, saved on first use."""

    def __init__(self, shared: Shared):
        self._shared = shared

    def __getitem__(self, name: str) -> Path:
        shape = ALL_SHAPES[name]
        return self._shared.folder(f"checkpoints/{name}", lambda out: tiny.save(shape, out))

    def __iter__(self) -> Iterator[str]:
        return iter(SHAPES)

    def __len__(self) -> int:
        return len(SHAPES)


@pytest.fixture(scope="session")
def checkpoints(shared) -> Mapping[str, Path]:
    return _Checkpoints(shared)


@pytest.fixture(scope="session")
def packages(checkpoints, shared):
    """(shape, target, quant) -> package dir of a tiny random checkpoint, exported on first use."""
    from mmedge.exporters.export import ExportOptions, export

    def get(shape: str, target: str = "onnxruntime", quant: str = "fp32") -> Path:
        def build(out: Path) -> None:
            export(ExportOptions(model=str(checkpoints[shape]), output=out, progress=False, quant=quant,
                                 calib_samples=TINY_CALIB_SAMPLES, **TARGETS[target]))

        return shared.folder(f"packages/{shape}-{target}-{quant}", build)

    return get


@pytest.fixture(scope="session")
def demo_packages(shared):
    """(model, target, quant, *extra CLI options) -> package of a shipped demo model, exported through the CLI
    with its alias, as users do (in this process: the imports of a new one cost ~10 s an export)."""

    def get(model: str, target: str = "onnxruntime", quant: str = "fp32", *extra: str) -> tuple[Path, str]:
        key = "-".join((model, target, quant, *extra)).replace("=", "_").replace(",", "_")

        def build(out: Path) -> None:
            default = quant != "fp32" and "--calib-samples" not in extra
            calib = ["--calib-samples", str(DEMO_CALIB_SAMPLES)] if default else []
            result = run_cli_in_process("export", "--model", model, "-o", str(out / "pkg"), "--target", target,
                                        "--quant", quant, *calib, *extra)
            assert result.returncode == 0, result.stderr
            (out / "stdout.txt").write_text(result.stdout)

        out = shared.folder(f"demos/{key}", build)
        return out / "pkg", (out / "stdout.txt").read_text()

    return get


@pytest.fixture(scope="session")
def scores(shared):
    """package or checkpoint dir -> `mmedge eval --json` on N_EVAL held-out examples, run once per path (through
    the CLI's main() in this process: a new one would import its engines again)."""
    from mmedge.evaluate import DEFAULT_SEED

    def get(path: Path, backend: str | None = None, n: int = N_EVAL, precision: str | None = None) -> dict:
        def compute() -> dict:
            extra = ["--backend", backend] if backend else []
            extra += ["--inference-precision", precision] if precision else []
            result = run_cli_in_process("eval", str(path), "--task", "shapes", "-n", str(n), "--seed",
                                        str(DEFAULT_SEED), "--json", *extra)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        key = f"{Path(path).resolve()}|{backend}|{n}" + (f"|{precision}" if precision else "")
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return shared.value(f"scores/{digest}", compute)

    return get


@pytest.fixture(scope="session")
def reference_tokens(checkpoints, shared):
    """shape -> {(image name, prompt): transformers' greedy NEW_TOKENS tokens} over sample_images x PROMPTS."""
    from mmedge.exporters import checkpoint as ckpt

    def get(shape: str) -> dict[tuple[str, str], list[int]]:
        def compute() -> list:
            from mmedge.evaluate import load_processor

            path = checkpoints[shape]
            model = ckpt.family_for(ckpt.read_config(path)["model_type"]).load(path)
            processor = load_processor(path)
            return [[name, prompt, hf_generate(model, processor, image, prompt)]
                    for name, image in sample_images().items() for prompt in PROMPTS]

        return {(name, prompt): tokens for name, prompt, tokens in shared.value(f"reference/{shape}", compute)}

    return get


@pytest.fixture(scope="session")
def hf_model(checkpoints):
    """shape -> (transformers model, processor) of its tiny checkpoint, each loaded once."""
    from mmedge.evaluate import load_processor
    from mmedge.exporters import checkpoint as ckpt

    done = {}

    def get(shape: str):
        if shape not in done:
            path = checkpoints[shape]
            done[shape] = (ckpt.family_for(ckpt.read_config(path)["model_type"]).load(path), load_processor(path))
        return done[shape]

    return get


def hf_greedy(model, inputs, n: int = NEW_TOKENS) -> list[int]:
    """transformers' own greedy generate() on processor `inputs`, n tokens past the prompt (EOS not allowed to
    stop it)."""
    import torch

    from mmedge.evaluate import generated_from

    start, forced = generated_from(model, inputs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n + forced, min_new_tokens=n + forced, do_sample=False)
    return out[0, start:].tolist()


def hf_generate(model, processor, image, prompt, n: int = NEW_TOKENS) -> list[int]:
    """hf_greedy on the inputs the processor makes of (image, prompt) as the evaluator does."""
    from mmedge.evaluate import reference_inputs

    return hf_greedy(model, reference_inputs(processor, image, prompt), n)


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


def mmedge_command() -> list[str]:
    """The installed `mmedge` console script, as users run it."""
    script = Path(sys.executable).parent / "mmedge"
    return [str(script)] if script.exists() else [shutil.which("mmedge") or "mmedge"]


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`mmedge ARGS` through the CLI's own main() in this process: the same parsing, messages and exit status as
    run_cli, without starting Python and importing torch again."""
    import contextlib
    import io
    import signal

    from mmedge import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(list(args))
    finally:
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(["mmedge", *args], code, stdout.getvalue(), stderr.getvalue())


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run `mmedge ARGS`; returns CompletedProcess (text)."""
    return subprocess.run(
        [*mmedge_command(), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
