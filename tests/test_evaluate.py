"""`mmedge eval`: the scorer, and the command on a package and on a PyTorch checkpoint."""

from __future__ import annotations

import json

import numpy as np

from conftest import run_cli
from mmedge.evaluate import evaluate
from mmedge.tasks import shapes


def test_scorer_counts_exact_matches_per_kind():
    truth = {}
    for ex in shapes.examples(60, seed=3):
        truth[np.asarray(ex.image).tobytes(), ex.prompt] = ex.answer
    oracle = evaluate(lambda im, p: truth[np.asarray(im).tobytes(), p].upper() + ".", n=60, seed=3)
    assert oracle["accuracy"] == 1.0 and set(oracle["per_kind"]) == set(shapes.KINDS)
    always_no = evaluate(lambda im, p: "no", n=60, seed=3)
    expected = sum(a == "no" for a in truth.values()) / 60
    assert always_no["accuracy"] == expected and 0 < expected < 0.5
    assert always_no["per_kind"]["caption"] == 0.0


def test_eval_command_on_package_and_checkpoint(packages, checkpoints, tmp_path):
    pkg = packages("paligemma-gqa")
    results = []
    for target in (pkg, checkpoints["paligemma-gqa"]):
        result = run_cli("eval", str(target), "--task", "shapes", "-n", "12", "--seed", "7", "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        results.append(json.loads(result.stdout))
    for r in results:
        assert r["n"] == 12 and r["seed"] == 7 and set(r["per_kind"]) == set(shapes.KINDS)
        assert 0.0 <= r["accuracy"] <= 1.0
    # the package and its PyTorch source agree answer by answer, so their scores agree
    assert results[0]["per_kind"] == results[1]["per_kind"]
    bad = run_cli("eval", str(pkg), "--task", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown task" in bad.stderr
