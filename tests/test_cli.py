"""`mmedge list-models`: every family file, with the model types it handles, on every target."""

from __future__ import annotations

from conftest import run_cli
from mmedge.exporters.export import TARGETS
from mmedge.exporters.family import families


def test_list_models_shows_every_family_and_target():
    result = run_cli("list-models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(t in lines[0] for t in TARGETS) and "int4" in lines[0]
    for model_type, module in families().items():
        family = module.__name__.rsplit(".", 1)[-1]
        row = next(line for line in lines if line.split()[:1] == [family])
        assert model_type in row
    assert {"llava", "gemma3", "idefics3", "smolvlm", "paligemma"} <= set(families())
