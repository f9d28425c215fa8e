"""Runtime pieces on their own: masks, sampling, streaming text with stop strings, manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmedge.errors import PackageError
from mmedge.manifest import SchemeSpec, load_manifest
from mmedge.runtimes import schemes
from mmedge.runtimes.sampling import GenerationOptions, choose
from mmedge.runtimes.text import StreamDecoder


def visible(mask):
    return mask[0, 0] == 0


def test_prefix_bidirectional_then_causal():
    s = SchemeSpec(attention="prefix_bidirectional")
    # prefill of a 4-token prompt into an empty 6-slot cache: all 4 see each other, no slot is written
    m = schemes.attention_masks(s, ["attention_mask"], 0, 4, 6, block_of=np.zeros(4, np.int64))["attention_mask"]
    assert m.shape == (1, 1, 4, 10)
    assert not visible(m)[:, :6].any() and visible(m)[:, 6:].all()
    # decode step for token 5: sees slots 0..4 and itself, not slot 5
    m = schemes.attention_masks(s, ["attention_mask"], 5, 1, 6, block_of=np.zeros(4, np.int64))["attention_mask"]
    assert visible(m)[0].tolist() == [True] * 5 + [False] + [True]


def test_causal_and_sliding_window():
    s = SchemeSpec(attention="prefix_bidirectional", sliding_window=2)
    m = schemes.attention_masks(s, ["full", "sliding"], 0, 5, 0, block_of=np.zeros(2, np.int64))
    full, sliding = visible(m["full"]), visible(m["sliding"])
    assert full.tolist()[4] == [True] * 5
    assert full.tolist()[0] == [True, True, False, False, False]  # prefix sees itself whole
    assert sliding.tolist()[4] == [False, False, False, True, True]  # window of 2 after the prefix
    assert sliding.tolist()[1] == [True, True, False, False, False]  # the prefix block ignores the window


def test_image_blocks_bidirectional_inside_the_window():
    """Gemma 3: each run of image tokens sees itself whole; with a window, the window still applies."""
    s = SchemeSpec(attention="image_bidirectional", sliding_window=3)
    ids = np.array([7, 9, 9, 9, 9, 7, 7])  # text, 4 image tokens (id 9), text
    block_of = schemes.blocks(s, ids, image_token_id=9)
    assert block_of.tolist() == [-1, 0, 0, 0, 0, -1, -1]
    assert schemes.blocks(s, np.array([9, 9, 7, 9]), 9).tolist() == [0, 0, -1, 1]
    m = schemes.attention_masks(s, ["full", "sliding"], 0, 7, 0, block_of)
    full, sliding = visible(m["full"]), visible(m["sliding"])
    assert full.tolist()[1] == [True, True, True, True, True, False, False]  # image token sees its whole run
    assert full.tolist()[0] == [True] + [False] * 6  # text before the image stays causal
    assert sliding.tolist()[1] == [True, True, True, True, True, False, False]  # ahead is inside the window
    assert sliding.tolist()[4] == [False, False, True, True, True, False, False]  # 3 back at most
    assert sliding.tolist()[6] == [False, False, False, False, True, True, True]


def test_positions_offset():
    assert schemes.position_ids(SchemeSpec(position_offset=1), 3, 2).tolist() == [[4, 5]]
    # two slots of left padding: the first token is at slot 2; padding takes the first token's position
    assert schemes.position_ids(SchemeSpec(position_offset=1), 0, 4, pad=2).tolist() == [[1, 1, 1, 2]]


def test_left_padding_is_masked_and_shifts_nothing_else():
    """A row padded by 2 slots: its masks are the unpadded row's, shifted by 2, padding seen by no token."""
    spec = SchemeSpec(attention="prefix_bidirectional")
    block_of = np.zeros(3, np.int64)
    plain = schemes.attention_masks(spec, ["attention_mask"], 0, 3, 0, block_of)["attention_mask"][0, 0] == 0
    padded = schemes.attention_masks(spec, ["attention_mask"], 0, 5, 0, block_of, pad=2)["attention_mask"][0, 0] == 0
    np.testing.assert_array_equal(padded[2:, 2:], plain)
    assert not padded[2:, :2].any() and padded[:2, :2].tolist() == [[True, False], [False, True]]
    step = schemes.attention_masks(spec, ["attention_mask"], 5, 1, 8, block_of, pad=2)["attention_mask"][0, 0] == 0
    assert step.tolist() == [[False, False, True, True, True, False, False, False, True]]


def test_greedy_top_k_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    assert choose(logits, GenerationOptions(), rng) == 0
    assert choose(logits, GenerationOptions(), rng, banned=[0]) == 1
    top1 = GenerationOptions(do_sample=True, top_k=1)
    assert {choose(logits, top1, rng) for _ in range(50)} == {0}
    nucleus = GenerationOptions(do_sample=True, top_p=0.7)  # 0.5 + 0.3 covers it
    assert {choose(logits, nucleus, rng) for _ in range(300)} == {0, 1}
    with pytest.raises(Exception, match="temperature"):
        GenerationOptions(do_sample=True, temperature=0).check()


class _Codec:
    """Decodes ids as characters: enough to drive StreamDecoder."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_stream_decoder_stops_before_stop_string_and_never_retracts():
    dec = StreamDecoder(_Codec(), stop=["END"])
    out = "".join(dec.push(ord(c)) for c in "abcENxEND tail")
    assert dec.stopped and out == "abcENx"
    dec = StreamDecoder(_Codec(), stop=["END"])
    pieces = [dec.push(ord(c)) for c in "abEN"]
    assert "".join(pieces) == "ab"  # "EN" could start "END": held back
    assert dec.finish() == "EN"


def test_manifest_refuses_newer_format(packages, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(packages("paligemma-gqa"), pkg)
    data = json.loads((pkg / "mmedge.json").read_text())
    data["format_version"] = 99
    (pkg / "mmedge.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="newer"):
        load_manifest(pkg)
    (pkg / "mmedge.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_manifest(pkg)


def test_manifest_round_trip(packages):
    from mmedge.manifest import Manifest

    m = load_manifest(packages("paligemma-gqa"))
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert set(m.graphs) == {"vision_encoder", "projector", "embed_tokens", "decoder"}
    assert all(r["passed"] for r in m.verification["graphs"].values())


def test_state_cache_needs_a_stateful_engine_and_a_known_storage(packages):
    """A package whose KV cache is engine state cannot run on a graph without state; unknown storage is refused."""
    import dataclasses

    from mmedge.runtimes.kv_cache import make_cache

    spec = load_manifest(packages("paligemma-gqa")).kv_cache

    class Stateless:
        def run(self, feeds):
            return {}

    with pytest.raises(PackageError, match="engine state"):
        make_cache(dataclasses.replace(spec, storage="state"), Stateless())
    with pytest.raises(PackageError, match="upgrade mmedge"):
        make_cache(dataclasses.replace(spec, storage="paged"), Stateless())


def test_openvino_kv_cache_precision_is_opt_in(packages):
    """f32 unless asked (parity); u8 reaches the compiled decoder; other backends and values are refused."""
    from conftest import sample_images
    from mmedge import Pipeline
    from mmedge.errors import InputError, MmedgeError

    package = packages("paligemma-gqa", "openvino")
    default = Pipeline.load(package)
    u8 = Pipeline.load(package, kv_cache_precision="u8")
    assert "float32" in str(default.graphs["decoder"].compiled.get_property("KV_CACHE_PRECISION"))
    assert "uint8" in str(u8.graphs["decoder"].compiled.get_property("KV_CACHE_PRECISION"))
    image = sample_images()["shapes"]
    assert len(list(u8.generate_ids(image, "caption en", max_new_tokens=6, ignore_eos=True))) == 6
    with pytest.raises(InputError, match="kv_cache_precision is for the openvino backend"):
        Pipeline.load(packages("paligemma-gqa"), kv_cache_precision="u8")
    with pytest.raises(MmedgeError, match="unknown KV-cache precision"):
        Pipeline.load(package, kv_cache_precision="int3")
