"""The runtime runs where torch and transformers cannot even be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import BACKEND, RUN_HERE, sample_images
from mmedge import Pipeline

BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def run_blocked(code: str, cwd):
    """Run `code` in a fresh interpreter where torch and transformers cannot be imported."""
    script = BLOCKER + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("target", RUN_HERE)
def test_pipeline_runs_without_torch(packages, tmp_path, target):
    package = packages("paligemma-gqa", target)
    image = tmp_path / "img.png"
    sample_images()["shapes"].save(image)
    result = run_blocked(
        f"""
        import json
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("blocker failed")
        import mmedge
        pipe = mmedge.Pipeline.load({str(package)!r}, backend={BACKEND.get(target)!r})
        ids = list(pipe.generate_ids({str(image)!r}, "caption en", max_new_tokens=12, ignore_eos=True))
        text = "".join(pipe.stream({str(image)!r}, "caption en", max_new_tokens=12, ignore_eos=True))
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({{"ids": ids, "text": text, "leaked": leaked}}))
        """,
        tmp_path,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    # same answer as in this process, where torch is importable (and which matches transformers)
    pipe = Pipeline.load(package, backend=BACKEND.get(target))
    assert out["ids"] == list(pipe.generate_ids(image, "caption en", max_new_tokens=12, ignore_eos=True))
    assert out["text"] == pipe.generate(image, "caption en", max_new_tokens=12, ignore_eos=True)


def test_cli_run_without_torch(packages, tmp_path):
    """`mmedge run` itself never imports torch either."""
    package = packages("paligemma-gqa")
    image = tmp_path / "img.png"
    sample_images()["noise"].save(image)
    run_blocked(
        f"""
        from mmedge.cli import main
        code = main(["run", {str(package)!r}, "--image", {str(image)!r}, "--prompt", "caption en",
                     "--max-new-tokens", "8"])
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        raise SystemExit(code)
        """,
        tmp_path,
    )


def test_embedder_and_cli_classify_without_torch(packages, tmp_path):
    """An embedding package (CLIP) embeds and classifies, through the API and the CLI, with torch unimportable."""
    from conftest import EMBEDDING_SHAPES

    from mmedge.runtimes import Embedder

    package = packages(EMBEDDING_SHAPES[0])
    image = tmp_path / "img.png"
    sample_images()["shapes"].save(image)
    result = run_blocked(
        f"""
        import json
        from mmedge import Embedder
        from mmedge.cli import main
        emb = Embedder.load({str(package)!r})
        ranked = emb.classify({str(image)!r}, ["circle", "square", "cat"])
        assert main(["classify", {str(package)!r}, "--image", {str(image)!r}, "--labels", "circle,square"]) == 0
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({{"leaked": leaked, "ranked": ranked}}))
        """,
        tmp_path,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    assert [tuple(x) for x in out["ranked"]] == Embedder.load(package).classify(image, ["circle", "square", "cat"])


def test_every_runtime_module_imports_without_torch(tmp_path):
    """Every module of mmedge.runtimes: the chat and caches apps embed, the TensorRT backend, its engine builder
    and CUDA wrapper (Jetson apps), and whatever is added later."""
    run_blocked(
        """
        import importlib, pkgutil
        import mmedge.runtimes
        names = [m.name for m in pkgutil.walk_packages(mmedge.runtimes.__path__, "mmedge.runtimes.")]
        assert {"mmedge.runtimes.chat", "mmedge.runtimes.media_cache", "mmedge.runtimes.backends.tensorrt",
                "mmedge.runtimes.backends.tensorrt_build", "mmedge.runtimes.backends.cuda"} <= set(names), names
        for name in names:
            importlib.import_module(name)
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        """,
        tmp_path,
    )


def test_coreml_backend_imports_coremltools_without_torch(tmp_path):
    """coremltools imports torch and transformers when they are installed; the Core ML backend hides both."""
    pytest.importorskip("coremltools")
    run_blocked(
        """
        sys.meta_path.pop(0)  # no block from the test: torch is importable, the backend must hide it itself
        import mmedge.runtimes.backends.coreml as backend
        ct = backend.import_coremltools()
        assert ct.models.MLModel is not None
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        import torch  # hidden only while coremltools loads
        """,
        tmp_path,
    )


def test_server_without_torch(packages, tmp_path):
    """`mmedge serve`'s app answers a request in a process where torch cannot be imported."""
    pytest.importorskip("fastapi")
    package = packages("paligemma-gqa")
    image = tmp_path / "img.png"
    sample_images()["shapes"].save(image)
    result = run_blocked(
        f"""
        import base64, json
        from fastapi.testclient import TestClient
        import mmedge
        from mmedge.serve import create_app
        app = create_app({{"m": mmedge.Pipeline.load({str(package)!r})}})
        uri = "data:image/png;base64," + base64.b64encode(open({str(image)!r}, "rb").read()).decode()
        r = TestClient(app).post("/v1/chat/completions", json={{"model": "m", "max_tokens": 8, "messages": [
            {{"role": "user", "content": [{{"type": "image_url", "image_url": {{"url": uri}}}},
                                         {{"type": "text", "text": "caption en"}}]}}]}})
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({{"status": r.status_code, "text": r.json()["choices"][0]["message"]["content"],
                          "leaked": leaked}}))
        """,
        tmp_path,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == 200 and out["leaked"] == []
    assert out["text"] == Pipeline.load(package).generate(image, "caption en", max_new_tokens=8)
