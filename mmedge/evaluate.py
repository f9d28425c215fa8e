"""`mmedge eval`: score a package (any target, any precision) or a PyTorch checkpoint on a task.

The same examples (a seed names them) and the same exact-match rule for
everything, so fp32 / int8 / int4 and every backend are compared on equal terms.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from mmedge.errors import MmedgeError, first_line

TASKS = ("shapes",)
DEFAULT_SEED = 12345  # held out: the demo models never train on this seed's examples
MAX_NEW_TOKENS = 32  # longer than any answer of the task

Answerer = Callable[[object, str], str]  # (PIL image, prompt) -> answer text


def evaluate(answer: Answerer, n: int = 500, seed: int = DEFAULT_SEED, task: str = "shapes",
             progress: bool = False) -> dict:
    """Exact-match accuracy overall and per question kind. An answerer with a `many(pairs)` method (the
    PyTorch reference, a package) is handed the examples WINDOW at a time, to batch them as it can."""
    from mmedge.tasks import shapes

    if task not in TASKS:
        raise MmedgeError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if n < 1:
        raise MmedgeError(f"-n must be at least 1, got {n}")
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    many = getattr(answer, "many", None)
    window = WINDOW if many else 1
    many = many or (lambda pairs: [answer(image, prompt) for image, prompt in pairs])
    with tqdm(total=n, desc="eval", disable=not progress, mininterval=1) as bar:
        for chunk in _chunks(shapes.examples(n, seed), window):
            for ex, got in zip(chunk, many([(ex.image, ex.prompt) for ex in chunk])):
                total[ex.kind] += 1
                right[ex.kind] += shapes.normalize(got) == shapes.normalize(ex.answer)
            bar.update(len(chunk))
    per_kind = {k: right[k] / total[k] for k in shapes.KINDS if total[k]}
    return {"task": task, "accuracy": sum(right.values()) / n, "per_kind": per_kind, "n": n, "seed": seed}


WINDOW = 256  # examples the reference groups into batches at a time


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def package_answerer(path: Path, batch: int = 16, **load_options) -> "PackageAnswerer":
    from mmedge.runtimes import Pipeline

    if batch < 1:
        raise MmedgeError(f"--batch must be at least 1, got {batch}")
    return PackageAnswerer(Pipeline.load(path, **load_options), batch)


class PackageAnswerer:
    """Greedy answers of up to MAX_NEW_TOKENS from a package, `batch` examples per Pipeline.generate_batch call
    (prompts of similar length together, so little is padded), or one by one where the decoder runs one
    sequence at a time. A batched row answers what it would alone (tests/test_parity.py)."""

    def __init__(self, pipe, batch: int = 16):
        self.pipe = pipe
        self.batch = min(batch, pipe.max_batch or batch)

    def __call__(self, image, prompt: str) -> str:
        return self.pipe.generate(image, prompt, max_new_tokens=MAX_NEW_TOKENS)

    def many(self, pairs: list) -> list[str]:
        if self.batch == 1:
            return [self(image, prompt) for image, prompt in pairs]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
        answers: list[str] = [""] * len(pairs)
        for start in range(0, len(order), self.batch):
            rows = order[start : start + self.batch]
            for i, text in zip(rows, self.pipe.generate_batch([pairs[i] for i in rows],
                                                              max_new_tokens=MAX_NEW_TOKENS)):
                answers[i] = text
        return answers


def load_processor(checkpoint: Path):
    """transformers' processor for a checkpoint: the family's `reference_processor` where it has one (a
    processor transformers builds with parts that need more than the image path does), else AutoProcessor."""
    from transformers import AutoProcessor

    from mmedge.exporters import checkpoint as ckpt

    family = ckpt.family_for(ckpt.read_config(checkpoint)["model_type"])
    own = getattr(family, "reference_processor", None)
    return own(checkpoint) if own else AutoProcessor.from_pretrained(checkpoint)


def reference_answerer(checkpoint: Path, batch: int = 16) -> "ReferenceAnswerer":
    """transformers' own greedy generate() on a checkpoint (needs torch): the reference numbers."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from mmedge.exporters import checkpoint as ckpt
    from mmedge.runtimes.backends import default_threads

    if default_threads():
        import torch

        torch.set_num_threads(default_threads())
    family = ckpt.family_for(ckpt.read_config(checkpoint)["model_type"])
    try:
        model = family.load(checkpoint)
        processor = load_processor(checkpoint)
    except MmedgeError:
        raise
    except Exception as exc:  # a damaged checkpoint, as export reports it
        raise MmedgeError(f"could not load the model from {checkpoint}: {first_line(exc)}") from exc
    return ReferenceAnswerer(model, processor, batch)


class ReferenceAnswerer:
    """Greedy generate() of up to MAX_NEW_TOKENS, `batch` examples per call. Only examples whose model inputs
    have the same shapes share a call, so nothing is padded: each row computes what it would alone (up to the
    order of floating-point sums in batched matmuls), and each answer ends at its first end-of-sequence token
    as a one-example generate() would stop there."""

    def __init__(self, model, processor, batch: int = 16):
        if batch < 1:
            raise MmedgeError(f"--batch must be at least 1, got {batch}")
        self.model, self.processor, self.batch = model, processor, batch
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def __call__(self, image, prompt: str) -> str:
        return self.many([(image, prompt)])[0]

    def many(self, pairs: list) -> list[str]:
        import torch

        inputs = [reference_inputs(self.processor, image, prompt) for image, prompt in pairs]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, one in enumerate(inputs):
            groups[tuple((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in sorted(one.items()))].append(i)
        answers: list[str] = [""] * len(pairs)
        for members in groups.values():
            for start in range(0, len(members), self.batch):
                rows = members[start : start + self.batch]
                feed = {k: torch.cat([inputs[i][k] for i in rows]) for k in inputs[rows[0]].keys()}
                start, forced = generated_from(self.model, feed)
                with torch.no_grad():
                    out = self.model.generate(**feed, max_new_tokens=MAX_NEW_TOKENS + forced, do_sample=False)
                for i, tokens in zip(rows, out[:, start:].tolist()):
                    ends = [j for j, t in enumerate(tokens) if t in self.eos]
                    answers[i] = self.processor.tokenizer.decode(tokens[: ends[0] + 1] if ends else tokens,
                                                                 skip_special_tokens=True)
        return answers


def generated_from(model, inputs) -> tuple[int, int]:
    """(where generate()'s output stops repeating the prompt, how many tokens generate() makes past it that mmedge
    counts as prompt): the input ids and 0 for a decoder-only model; for an encoder-decoder the decoder's start
    tokens, of which generate() makes all but decoder_start_token_id (a forced BOS)."""
    if getattr(model.config, "is_encoder_decoder", False):
        from mmedge.exporters.family import decoder_start_ids

        start = len(decoder_start_ids(model))
        return start, start - 1
    return inputs["input_ids"].shape[1], 0


def reference_inputs(processor, image, prompt: str) -> dict:
    """transformers' own model inputs for one image and the user's text, the way the runtime formats it:
    through the processor's chat template (one user turn: the image, then the text; generation prompt
    added) when the checkpoint has one, otherwise the processor's fixed format."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    return processor(images=image, text=prompt, return_tensors="pt")


# -- embedding packages (CLIP, SigLIP): the zero-shot form of the task ------------------------------------------

ZERO_SHOT_BATCH = 64  # images embedded per call of an embedder (it splits them into its own batches)


def evaluate_zero_shot(embedder, n: int = 500, seed: int = DEFAULT_SEED, task: str = "shapes",
                       progress: bool = False) -> dict:
    """Zero-shot accuracy of an embedder (embed_images, embed_texts) on single-shape scenes: each scene's colour
    or shape is the label whose templated text is most similar to the image (shapes.ZERO_SHOT)."""
    from mmedge.tasks import shapes

    if task not in TASKS:
        raise MmedgeError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if n < 1:
        raise MmedgeError(f"-n must be at least 1, got {n}")
    labels = {kind: embedder.embed_texts([template.format(label) for label in names])
              for kind, (template, names) in shapes.ZERO_SHOT.items()}
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    with tqdm(total=n, desc="eval", disable=not progress, mininterval=1) as bar:
        for chunk in _chunks(shapes.zero_shot_examples(n, seed), ZERO_SHOT_BATCH):
            images = embedder.embed_images([ex.image for ex in chunk])
            for ex, row in zip(chunk, images):
                total[ex.kind] += 1
                right[ex.kind] += ex.labels[int(np.argmax(labels[ex.kind] @ row))] == ex.answer
            bar.update(len(chunk))
    per_kind = {k: right[k] / total[k] for k in shapes.ZERO_SHOT if total[k]}
    return {"task": task, "form": "zero-shot", "accuracy": sum(right.values()) / n, "per_kind": per_kind, "n": n,
            "seed": seed}


class ReferenceEmbedder:
    """transformers' CLIP / SigLIP model and processor as an embedder (unit-length rows, as a package's): the
    reference numbers of the zero-shot task."""

    def __init__(self, checkpoint: Path):
        import transformers
        from transformers import AutoProcessor

        from mmedge.exporters import checkpoint as ckpt

        transformers.logging.set_verbosity_error()
        family = ckpt.family_for(ckpt.read_config(checkpoint)["model_type"])
        try:
            self.model = family.load(checkpoint)
            self.processor = AutoProcessor.from_pretrained(checkpoint)
        except Exception as exc:
            raise MmedgeError(f"could not load the model from {checkpoint}: {first_line(exc)}") from exc
        self.siglip = self.model.config.model_type == "siglip"

    def _unit(self, out):
        x = getattr(out, "pooler_output", out).detach().numpy()
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def embed_images(self, images):
        import torch

        with torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return self._unit(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts):
        import torch

        padding = "max_length" if self.siglip else True
        with torch.no_grad():
            ids = self.processor(text=list(texts), padding=padding, truncation=True, return_tensors="pt")["input_ids"]
            return self._unit(self.model.get_text_features(input_ids=ids))
