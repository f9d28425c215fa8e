"""Export is all or nothing: a killed or failed export leaves nothing that loads as a package."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import mmedge_command
from mmedge.errors import ExportError, PackageError
from mmedge.exporters.trace_cache import ENV
from mmedge.manifest import load_manifest


def loadable_packages(root):
    found = []
    for d in [root, *root.rglob("*")]:
        if d.is_dir():
            try:
                load_manifest(d)
                found.append(d)
            except PackageError:
                pass
    return found


def test_killed_export_leaves_no_package(checkpoints, tmp_path):
    out = tmp_path / "out" / "pkg"
    proc = subprocess.Popen(
        [*mmedge_command(), "export", "--model", str(checkpoints["paligemma-mqa"]), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != ENV},  # traced for real: slow enough to be killed
    )
    deadline = time.time() + 300
    try:
        # wait until at least one graph is on disk in the staging directory, then kill -9
        while time.time() < deadline and proc.poll() is None:
            if any(out.parent.glob(".pkg.partial-*/*.onnx")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "export finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not out.exists()
    assert loadable_packages(tmp_path) == []


def test_failed_verification_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    from mmedge.exporters import onnxruntime_target
    from mmedge.exporters.export import ExportOptions, export

    real = onnxruntime_target.verify_graph
    # an impossible tolerance for the decoder: the real check runs and reports failure
    monkeypatch.setattr(
        onnxruntime_target, "verify_graph",
        lambda job, path, rtol=1e-3: real(job, path, rtol=0.0 if job.name == "decoder" else rtol),
    )
    out = tmp_path / "pkg"
    with pytest.raises(ExportError, match="decoder does not match PyTorch"):
        export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=out, progress=False))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_package(packages, checkpoints, tmp_path):
    from mmedge.exporters.export import ExportOptions, export

    out = tmp_path / "pkg"
    export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=out, max_context=64, progress=False))
    export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=out, max_context=80, overwrite=True,
                         progress=False))
    assert load_manifest(out).kv_cache.max_context == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
