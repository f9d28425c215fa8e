"""The shapes task generator and the demo trainer: seeded, balanced, answers consistent with scenes."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmedge.tasks import shapes

ROOT = Path(__file__).resolve().parents[1]


def test_same_seed_same_examples_other_seed_other_examples():
    a = list(shapes.examples(30, seed=3))
    b = list(shapes.examples(30, seed=3))
    c = list(shapes.examples(30, seed=4))
    key = lambda ex: (ex.prompt, ex.answer, np.asarray(ex.image).tobytes())  # noqa: E731
    assert [key(x) for x in a] == [key(x) for x in b]
    assert [key(x) for x in a] != [key(x) for x in c]


def test_examples_of_chosen_kinds_and_unknown_kinds():
    exs = list(shapes.examples(6, seed=2, kinds=("exists", "count")))
    assert [e.kind for e in exs] == ["exists", "count"] * 3
    with pytest.raises(ValueError, match="unknown question kinds"):
        next(shapes.examples(1, seed=0, kinds=("colour",)))


def test_kinds_rotate_and_answers_are_balanced():
    exs = list(shapes.examples(1200, seed=11))
    assert Counter(e.kind for e in exs) == {k: 200 for k in shapes.KINDS}
    answers = {k: Counter(e.answer for e in exs if e.kind == k) for k in shapes.KINDS}
    assert 0.4 < answers["exists"]["yes"] / 200 < 0.6
    assert 0.35 < answers["left_of"]["nothing"] / 200 < 0.65
    assert set(answers["color"]) == set(shapes.COLORS)
    assert set(answers["where"]) == set(shapes.CELLS)
    assert {"zero", "one", "two"} <= set(answers["count"])


def test_answers_follow_from_the_scene():
    objs = [shapes.Obj("circle", "red", 0), shapes.Obj("square", "blue", 2), shapes.Obj("circle", "orange", 4)]
    rng = np.random.default_rng(0)
    assert shapes.caption(objs) == "a red circle, a blue square and an orange circle"
    assert shapes._question("color", objs, rng, True) == ("what color is the square?", "blue")
    assert shapes._question("left_of", objs, rng, True) == ("what is left of the square?", "a red circle")
    assert shapes._question("left_of", objs, rng, False) is None  # the square is the only unique shape
    q, a = shapes._question("where", [objs[1]], rng, True)
    assert (q, a) == ("where is the blue square?", "top right")


def test_normalize():
    assert shapes.normalize("  A Red  Circle. ") == "a red circle"


def _trainer():
    sys.path.insert(0, str(ROOT / "tools"))
    import train_shapes

    return train_shapes


@pytest.mark.parametrize("family", ["paligemma"])
def test_training_is_deterministic(family):
    """Same seed, same weights after a few steps; another seed, other weights."""
    train_shapes = _trainer()
    recipe = train_shapes.RECIPES[family]()
    torch.set_num_threads(2)
    run = dict(steps=3, batch_size=4, lr=1e-3, progress=False, vision_steps=2)
    a = train_shapes.train(recipe, seed=5, **run).state_dict()
    b = train_shapes.train(recipe, seed=5, **run).state_dict()
    c = train_shapes.train(recipe, seed=6, **run).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_batch_matches_processor_layout(tmp_path):
    """The trainer lays out sequences exactly as PaliGemmaProcessor does at inference (prefix) + answer."""
    from transformers import AutoProcessor

    train_shapes = _trainer()
    recipe = train_shapes.RECIPES["paligemma"]()
    recipe.save(recipe.model(), tmp_path / "ck")
    processor = AutoProcessor.from_pretrained(tmp_path / "ck")
    ex = next(shapes.examples(1, seed=0))
    batch = recipe.batch([ex])
    inputs = processor(images=ex.image, text=ex.prompt, suffix=ex.answer, return_tensors="pt")
    assert batch["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert batch["token_type_ids"].tolist() == inputs["token_type_ids"].tolist()
    assert torch.allclose(batch["pixel_values"], inputs["pixel_values"], atol=1e-6)
