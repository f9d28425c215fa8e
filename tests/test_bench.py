"""`mmedge bench`: the stages it times add up, every run decodes the forced length, bad input is one line."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_bench_reports_every_stage(packages, target):
    package = packages("paligemma-gqa", target)
    result = run_cli("bench", str(package), "--runs", "3", "--warmup", "1", "--new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["runs"] == 3 and r["new_tokens"] == 6 and r["target"] == target
    for k, v in r["metrics"].items():
        assert 0 <= v["min"] <= v["median"] <= v["max"] and len(r["samples"][k]) == 3, k
    for run in zip(*(r["samples"][k] for k in r["metrics"])):
        s = dict(zip(r["metrics"], run))
        # each run: the stages happen inside the time to first token, which with 5 decode steps is inside the run
        assert s["preprocess_ms"] + s["vision_encoder_ms"] + s["projector_ms"] + s["prefill_ms"] <= s["ttft_ms"]
        assert s["ttft_ms"] + 5 / s["decode_tok_s"] * 1e3 <= s["e2e_ms"] + 1e-6
    on_disk = sum(p.stat().st_size for p in package.rglob("*") if p.is_file() and p.name != "mmedge.json")
    assert abs(r["package_mb"] - on_disk / 1e6) < 1e-6
    assert r["peak_rss_mb"] > 20 and r["load_ms"] > 0

    table = run_cli("bench", str(package), "--runs", "1", "--warmup", "0", "--new-tokens", "3")
    assert table.returncode == 0, table.stderr
    assert "time to first token" in table.stdout and "decode (tok/s)" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--image", "missing.png"], "image not found"),
])
def test_bench_bad_input_is_one_line(packages, args, message):
    result = run_cli("bench", str(packages("paligemma-gqa")), *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_more_new_tokens_than_the_context_holds_stops_after_the_first_run(packages):
    """Found on the first run, warm-up or not, and the error is a line of its own (not written onto the bar)."""
    result = run_cli("bench", str(packages("paligemma-gqa")), "--new-tokens", "100000", "--warmup", "2", "--runs", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mmedge: error: the context filled after"), result.stderr
    assert "1/5" in result.stderr and "2/5" not in result.stderr  # one run, not the warm-ups and a timed one
