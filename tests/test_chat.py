"""What apps do around one generate(): conversations that extend the KV cache, prompts that start as the last one
did (a fixed question about new camera frames), images seen before, and threads. Every answer is checked against
transformers (a conversation's turn against generate() over the whole history) or against the answer computed
from scratch."""

from __future__ import annotations

import threading
from importlib import import_module

import numpy as np
import pytest
import torch

from conftest import BACKEND, FIRST_SHAPES, NEW_TOKENS, PARITY_TARGETS, SHAPES, each_shape, matrix, sample_images, slow
from conftest import run_cli_in_process as run_cli
from mmedge import Pipeline
from mmedge.errors import InputError
from mmedge.runtimes.media_cache import MediaCache
from test_errors import assert_one_line_error

# every family whose checkpoints carry a chat template; fixed prompt formats (PaliGemma, IDEFICS) take one question
# at a time
CHAT_SHAPES = [name for name, shape in SHAPES.items()
               if hasattr(import_module(f"mmedge.exporters.families.{shape.family}"), "CHAT_TEMPLATE")]
FIXED_FORMAT = next(name for name, shape in SHAPES.items() if shape.family == "paligemma")
TURN_TOKENS = 10
# a conversation: (new images, question) per turn; turn 2 shows no new image, turn 3 a second one
TURNS = [(["shapes"], "what is on the left?"), ([], "and its color?"), (["noise"], "and in this one?")]


class Counting:
    """A graph that counts its runs."""

    def __init__(self, graph):
        self.graph, self.calls = graph, 0

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def run(self, inputs, into=None):
        self.calls += 1
        return self.graph.run(inputs, into)


def hf_turn(model, processor, messages: list[dict], n: int = TURN_TOKENS) -> list[int]:
    """transformers' greedy tokens after a whole conversation rendered by its processor's chat template."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def with_images(messages: list[dict], images: list) -> list[dict]:
    """The chat's messages with its images in their {"type": "image"} entries, as processors take them."""
    queue = iter(images)
    return [{**m, "content": [{**c, "image": next(queue)} if c["type"] == "image" else c for c in m["content"]]}
            for m in messages]


# each family's first shape on every target (every KV-cache storage); its other shapes on onnxruntime and
# openvino (state), where their decoders differ
CHAT_CASES = [(s, t) for s in CHAT_SHAPES for t in PARITY_TARGETS
              if s in FIRST_SHAPES or t in ("onnxruntime", "openvino")]


@pytest.mark.parametrize("shape,target", matrix(CHAT_CASES))
def test_each_turn_extends_the_cache_and_matches_transformers(shape, target, packages, hf_model):
    """Each turn's tokens equal transformers' generate() over the whole history so far; a follow-up computes
    only its new tokens (the earlier turns' keys and values stay in the cache) and runs no vision encoder
    unless it brings a new image."""
    pipe = Pipeline.load(packages(shape, target), backend=BACKEND.get(target))
    vision = pipe.graphs["vision_encoder"] = Counting(pipe.graphs["vision_encoder"])
    model, processor = hf_model(shape)
    chat = pipe.chat()
    shown, before = [], 0
    for i, (names, question) in enumerate(TURNS):
        shown += [sample_images()[n] for n in names]
        expected = hf_turn(model, processor, with_images(chat.messages() + [
            {"role": "user", "content": [{"type": "image"}] * len(names) + [{"type": "text", "text": question}]}],
            shown))
        calls = vision.calls
        answer = chat.ask([sample_images()[n] for n in names] or None, question, max_new_tokens=TURN_TOKENS,
                          ignore_eos=True)
        assert chat.history[-1].tokens == expected, f"{shape}/{target} turn {i + 1}"
        assert chat.history[-1].text == answer == pipe.codec.decode(expected)
        assert (vision.calls > calls) == bool(names)  # images of earlier turns come from the image cache
        if i and not (names and pipe.cross_names):
            # the turns before are not computed again (a retokenized answer may give back its last tokens)
            assert pipe.timings.reused_tokens >= before, (pipe.timings.reused_tokens, before)
        elif i:  # cross-attention: tokens that see no image attend over all of them, so a new image changes them all
            assert pipe.timings.reused_tokens == 0
        before = pipe.timings.prompt_tokens
    assert [t.role for t in chat.history] == ["user", "assistant"] * len(TURNS)
    assert len(chat.history[4].images) == 1


# a shape whose random weights answer with visible text (Gemma 3's tiny one repeats an invisible token)
@pytest.mark.parametrize("shape", each_shape(CHAT_SHAPES))
def test_several_images_in_one_question_match_transformers(shape, packages, hf_model):
    """generate([a, b], prompt): both images in one user turn, in order, as each family's template places them."""
    pipe = Pipeline.load(packages(shape))
    model, processor = hf_model(shape)
    images = [sample_images()["wide"], sample_images()["shapes"]]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what changed?"}]
    expected = hf_turn(model, processor, with_images([{"role": "user", "content": content}], images))
    assert list(pipe.generate_ids(images, "what changed?", max_new_tokens=TURN_TOKENS, ignore_eos=True)) == expected


@pytest.mark.parametrize("shape", [next(s for s in CHAT_SHAPES if SHAPES[s].family == "idefics3")])
def test_a_stream_closed_early_keeps_its_part_and_reset_forgets(shape, packages):
    pipe = Pipeline.load(packages(shape))
    chat = pipe.chat(system="answer briefly")
    stream = chat.stream(sample_images()["shapes"], "what is this?", max_new_tokens=8, ignore_eos=True)
    first = next(stream)
    stream.close()
    assert [t.text for t in chat.history] == ["what is this?", first]
    again = chat.ask(None, "more?", max_new_tokens=4)  # the Pipeline is free again
    assert isinstance(again, str) and len(chat.history) == 4
    chat.reset()
    assert chat.history == [] and chat.system == "answer briefly"
    assert [m["role"] for m in chat.messages()] == ["system"]


def test_the_context_limit_is_one_clear_error_or_drops_the_oldest_turns(packages):
    pipe = Pipeline.load(packages(CHAT_SHAPES[0]))
    capacity = pipe.cache.capacity
    chat = pipe.chat()
    chat.ask(sample_images()["shapes"], "what is this?", max_new_tokens=4, ignore_eos=True)
    kept = list(chat.history)
    long = "tell me more " * capacity
    with pytest.raises(InputError, match=rf"context holds {capacity} \(max_context\); start a new conversation"):
        chat.ask(None, long)
    assert chat.history == kept  # the failed turn left nothing behind
    rolling = pipe.chat(overflow="drop_oldest")
    question = "and then what happened next there? " * max(1, capacity // 40)
    for _ in range(6):
        rolling.ask(sample_images()["noise"], question, max_new_tokens=4, ignore_eos=True)
        assert pipe.timings.prompt_tokens < capacity
    assert len(rolling.history) < 12  # older exchanges were left out
    with pytest.raises(InputError, match="overflow must be one of error, drop_oldest"):
        pipe.chat(overflow="rotate")
    with pytest.raises(InputError, match="raw_prompt does not apply"):
        chat.ask(None, "x", raw_prompt=True)


def test_a_fixed_format_model_refuses_a_chat_in_one_line(packages, tmp_path):
    pipe = Pipeline.load(packages(FIXED_FORMAT))
    with pytest.raises(InputError, match="fixed format, not as a conversation"):
        pipe.chat()
    image = tmp_path / "im.png"
    sample_images()["shapes"].save(image)
    result = run_cli("chat", str(packages(FIXED_FORMAT)), "--image", str(image))
    assert_one_line_error(result, "fixed format, not as a conversation")


def test_chat_command_reads_questions_from_stdin(packages, tmp_path, monkeypatch):
    """Piped questions, a line each: the answers are the chat's, one line each; a bad line is one error, exit 2."""
    import io

    package = packages(CHAT_SHAPES[0])
    image = tmp_path / "im.png"
    sample_images()["shapes"].save(image)
    chat = Pipeline.load(package).chat()
    expected = [chat.ask(str(image), "what is this?", max_new_tokens=6), chat.ask(None, "why?", max_new_tokens=6)]
    monkeypatch.setattr("sys.stdin", io.StringIO("what is this?\n\nwhy?\n"))
    result = run_cli("chat", str(package), "--image", str(image), "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/teleport\n"))
    assert_one_line_error(run_cli("chat", str(package), "--max-new-tokens", "2"), "unknown command '/teleport'")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert_one_line_error(run_cli("chat", str(package), "--image", str(tmp_path / "none.png")), "not found")
    # a turn past the context names the command's own ways out, not the API's
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me more " * Pipeline.load(package).cache.capacity + "\n"))
    assert_one_line_error(run_cli("chat", str(package), "--image", str(image)), "(/reset)", "--drop-oldest")


# -- a prompt that starts as the last one did -------------------------------------------------------------------


@pytest.mark.parametrize("shape", each_shape([FIXED_FORMAT, *CHAT_SHAPES]))
def test_a_prompt_starting_as_the_last_one_reuses_its_cache(shape, packages, reference_tokens):
    """The same question about a new frame reuses the text before the image; a new question about the same image
    reuses the image too (PaliGemma's prompt attends both ways, so none of it); every answer equals
    transformers'."""
    pipe = Pipeline.load(packages(shape))
    expected = reference_tokens(shape)
    ask = lambda name, prompt: list(pipe.generate_ids(sample_images()[name], prompt,  # noqa: E731
                                                       max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert ask("noise", "caption en") == expected["noise", "caption en"]
    assert pipe.timings.reused_tokens == 0
    assert ask("shapes", "caption en") == expected["shapes", "caption en"]
    new_frame = pipe.timings.reused_tokens
    question = "what color is the circle on the left of the square?"
    assert ask("shapes", question) == expected["shapes", question]
    same_image = pipe.timings.reused_tokens
    if pipe.manifest.schemes.attention == "prefix_bidirectional":
        assert new_frame == same_image == 0
    elif pipe.cross_names:  # cross-attention: tokens that see no image attend over all of it; a new frame changes them
        first_image = int(np.flatnonzero(pipe._held.ids == pipe.manifest.prompt.image_token_id)[0])
        assert new_frame == 0 and same_image > first_image
    else:
        first_image = int(np.flatnonzero(pipe._held.ids == pipe.manifest.prompt.image_token_id)[0])
        assert 0 < new_frame <= first_image  # up to the image (or to the tile markers before it)
        assert same_image > first_image  # the image too
    assert pipe._held.spans is not None


# -- images seen before ----------------------------------------------------------------------------------------


def test_an_image_seen_before_skips_the_vision_encoder(packages):
    shape = CHAT_SHAPES[0]
    pipe = Pipeline.load(packages(shape))
    vision = pipe.graphs["vision_encoder"] = Counting(pipe.graphs["vision_encoder"])
    image = sample_images()["shapes"]
    first = pipe.generate(image, "what is this?", max_new_tokens=6)
    runs = vision.calls
    assert pipe.generate(np.asarray(image), "what is this?", max_new_tokens=6) == first  # same pixels, as an array
    assert pipe.generate(image, "and this?", max_new_tokens=6) is not None
    assert vision.calls == runs and pipe.media.hits == 2
    pipe.generate(sample_images()["noise"], "what is this?", max_new_tokens=6)
    assert vision.calls > runs
    off = Pipeline.load(packages(shape), image_cache_mb=0)
    off.graphs["vision_encoder"] = Counting(off.graphs["vision_encoder"])
    assert off.generate(image, "what is this?", max_new_tokens=6) == first
    off.generate(image, "what is this?", max_new_tokens=6)
    assert off.graphs["vision_encoder"].calls == 2 * runs and len(off.media) == 0
    with pytest.raises(InputError, match="image_cache_mb must be a number of megabytes >= 0"):
        Pipeline.load(packages(shape), image_cache_mb=-1)
    # a frame encoded ahead (while the question is still being asked): generate() starts at the prompt
    ahead = Pipeline.load(packages(shape))
    ahead.graphs["vision_encoder"] = Counting(ahead.graphs["vision_encoder"])
    ahead.encode_media(image)
    assert ahead.graphs["vision_encoder"].calls == runs and len(ahead.media) == 1
    assert ahead.generate(image, "what is this?", max_new_tokens=6) == first
    assert ahead.graphs["vision_encoder"].calls == runs and ahead.media.hits == 1


def test_media_cache_keeps_the_most_recent_within_its_bytes():
    cache = MediaCache(max_bytes=3 * 400)
    item = lambda: (np.zeros((10, 10), np.float32), {})  # noqa: E731 (400 bytes)
    for key in (b"a", b"b", b"c"):
        cache.put(key, item())
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", item())  # evicts b, the least recently used
    assert cache.get(b"b") is None and all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    assert cache.bytes == 1200 and len(cache) == 3
    cache.put(b"big", (np.zeros((40, 10), np.float32), {}))  # larger than the whole budget: not kept
    assert cache.get(b"big") is None and len(cache) == 3


# -- threads ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["one Pipeline", "clones"])
def test_threads_each_get_their_own_answers(mode, packages):
    """4 threads x 10 prompts on one Pipeline (callers take turns) or on clones (one cache each, in parallel):
    every answer is the one a single thread gets."""
    pipe = Pipeline.load(packages(CHAT_SHAPES[0]))
    images = list(sample_images().values())
    work = [(images[i % 3], f"question {i}: what is this?") for i in range(10)]
    expected = [pipe.generate(im, q, max_new_tokens=8) for im, q in work]
    results: dict[tuple[int, int], str] = {}
    errors = []

    def worker(t, p):
        try:
            for i in (list(range(10)) if t % 2 else list(range(9, -1, -1))):  # different orders
                results[t, i] = p.generate(*work[i], max_new_tokens=8)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    pipes = [pipe.clone() for _ in range(4)] if mode == "clones" else [pipe] * 4
    threads = [threading.Thread(target=worker, args=(t, pipes[t])) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(results[t, i] == expected[i] for t in range(4) for i in range(10))


# -- batches ---------------------------------------------------------------------------------------------------


# the contributors' loop keeps the default demo's (exported there anyway); CI runs all three
@pytest.mark.parametrize("model,target", [pytest.param("shapes-smolvlm", "onnxruntime", id="in_place", marks=slow),
                                          pytest.param("shapes-smolvlm", "openvino", id="state", marks=slow),
                                          pytest.param("shapes-paligemma", "onnxruntime", id="buffer")])
def test_finished_rows_leave_the_batch_and_the_rest_answer_as_alone(model, target, demo_packages):
    """A trained demo model's answers end at their own lengths (a colour after a word or two, a caption after
    several): each row's tokens equal generate()'s alone, and the batch shrinks as rows end (KV cache rows
    removed, so later steps run only the rows still answering)."""
    from mmedge.tasks import shapes

    package, _ = demo_packages(model, target)
    pipe = Pipeline.load(package)
    pairs = [(e.image, e.prompt) for e in shapes.examples(6, seed=3, kinds=("caption", "color", "count"))]
    alone = [list(pipe.generate_ids(image, prompt, max_new_tokens=24)) for image, prompt in pairs]
    assert len({len(a) for a in alone}) > 1, alone  # rows do end at different steps
    shrank = []
    keep_rows = type(pipe.cache).keep_rows

    def watch(cache, rows):
        shrank.append(len(rows))
        return keep_rows(cache, rows)

    import unittest.mock

    with unittest.mock.patch.object(type(pipe.cache), "keep_rows", watch):
        batched = pipe.generate_ids_batch(pairs, max_new_tokens=24)
    assert batched == alone
    assert shrank and shrank == sorted(shrank, reverse=True) and shrank[-1] < len(pairs)
