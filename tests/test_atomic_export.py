"""Export is all or nothing: a killed or failed export leaves nothing that loads as a package."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import mmedge_command, run_cli
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


def _wait_for_a_staged_graph(proc, out) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(out.parent.glob(f".{out.name}.partial-*/*.onnx")):
            return
        time.sleep(0.05)
    raise AssertionError("export finished or failed before it could be interrupted")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_export_leaves_no_package(checkpoints, tmp_path, sig):
    out = tmp_path / "out" / "pkg"
    # the shape most tests export: the later export below reads its traces from the run's cache
    model = ["--model", str(checkpoints["paligemma-gqa"])]
    proc = subprocess.Popen(
        [*mmedge_command(), "export", *model, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != ENV},  # traced for real: slow enough to be interrupted
    )
    try:
        _wait_for_a_staged_graph(proc, out)
        if sig == signal.SIGTERM:  # meanwhile, a second export to the same path is refused at once
            second = run_cli("export", *model, "-o", str(out))
            assert second.returncode == 2 and "another export is writing" in second.stderr, second.stderr
            assert proc.poll() is None
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not out.exists()
    assert loadable_packages(tmp_path) == []
    stale = list(out.parent.glob(".pkg.partial-*"))
    if sig == signal.SIGTERM:  # unwound: its staging folder and its lock are gone
        assert stale == [] and not (out.parent / ".pkg.export-lock").exists()
        return
    assert len(stale) == 1  # kill -9 leaves it; the next export into the same folder removes it and says so
    later = run_cli("export", *model, "-o", str(out.parent / "other"))
    assert later.returncode == 0, later.stderr
    assert "removed 1 staging folder(s) left by interrupted exports" in later.stderr
    assert not stale[0].exists() and sorted(p.name for p in out.parent.iterdir()) == ["other"]


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


def test_a_package_that_cannot_generate_is_not_written(checkpoints, tmp_path, monkeypatch):
    """A manifest whose image token count disagrees with the projector's output (as Gemma 3 configs with a
    non-square mm_tokens_per_image once gave): every graph verifies on its own, the package cannot generate."""
    from mmedge.exporters.export import ExportOptions, export
    from mmedge.exporters.families import paligemma

    real = paligemma.describe

    def off_by_one(*args):
        described = real(*args)
        described.prompt.image_seq_len += 1
        return described

    monkeypatch.setattr(paligemma, "describe", off_by_one)
    out = tmp_path / "pkg"
    with pytest.raises(ExportError, match="cannot generate through the runtime"):
        export(ExportOptions(model=str(checkpoints["paligemma-gqa"]), output=out, progress=False))
    assert list(tmp_path.iterdir()) == []


# a stand-in for a long engine call (one OpenVINO run of a 3B vision encoder: ~35 s), in the export's own process:
# ONNX Runtime running a Loop that never ends, a native call Python cannot interrupt to run a signal handler
_ENDLESS_VERIFY = '''
import sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from mmedge import cli
from mmedge.exporters import onnxruntime_target

def endless(job, path, rtol=1e-3):
    scalar = lambda name, kind: helper.make_tensor_value_info(name, kind, [])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["x", "one"], ["x_out"])],
        "body", [scalar("i", TensorProto.INT64), scalar("cond", TensorProto.BOOL), scalar("x", TensorProto.FLOAT)],
        [scalar("cond_out", TensorProto.BOOL), scalar("x_out", TensorProto.FLOAT)],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x0"], ["x"], body=body)], "endless",
        [scalar("trips", TensorProto.INT64), scalar("cond", TensorProto.BOOL), scalar("x0", TensorProto.FLOAT)],
        [scalar("x", TensorProto.FLOAT)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    print("engine call", flush=True)
    session.run(None, {"trips": np.array(2**62), "cond": np.array(True), "x0": np.array(0.0, np.float32)})

onnxruntime_target.verify_graph = endless
sys.exit(cli.main())
'''


def test_sigterm_inside_an_engine_call_stops_the_export_within_the_grace(checkpoints, tmp_path):
    """Python would run the SIGTERM handler only when the engine call returns (here: never); the export's stop
    thread removes the staging folder and ends the process STOP_GRACE_S after the signal."""
    import sys

    from mmedge.cli import STOP_GRACE_S

    out, log = tmp_path / "pkg", tmp_path.parent / f"{tmp_path.name}-stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _ENDLESS_VERIFY, "export", "--model",
                                 str(checkpoints["paligemma-gqa"]), "-o", str(out)],
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        assert any(line.strip() == "engine call" for line in iter(proc.stdout.readline, "")), log.read_text()
        assert len(list(tmp_path.glob(".pkg.partial-*"))) == 1
        time.sleep(0.5)  # inside session.run by now
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_GRACE_S + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert code == 128 + signal.SIGTERM, stderr
    assert "mmedge: stopped (SIGTERM" in stderr and "Traceback" not in stderr, stderr
    assert STOP_GRACE_S <= took < STOP_GRACE_S + 10
    assert not out.exists() and not list(tmp_path.glob(".pkg.partial-*"))
    # the lock ended with the process: the next export to the same path goes ahead
    again = run_cli("export", "--model", str(checkpoints["paligemma-gqa"]), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
