"""The tools behind docs/scale.md. (A graph over the inline limit, streamed to <file>.data as it is written:
tests/test_parity.py::test_external_data_package.)"""

from __future__ import annotations


def test_the_scale_tool_counts_the_memory_of_the_whole_process_tree(tmp_path):
    """tools/scale.py's peak RSS includes children: here a child holds 300 MB that its parent never touches."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[1] / "tools" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    child = "b = bytearray(300 << 20); import time; time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    result = scale.measure([sys.executable, "-c", parent], tmp_path / "log")
    assert result["exit"] == 0 and result["peak_rss_gb"] >= 0.29, result
