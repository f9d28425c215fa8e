"""`mmedge eval`: score a package (any target, any precision) or a PyTorch checkpoint on a task.

The same examples (a seed names them) and the same exact-match rule for
everything, so fp32 / int8 / int4 and every backend are compared on equal terms.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from mmedge.errors import MmedgeError, first_line

TASKS = ("shapes",)
DEFAULT_SEED = 12345  # held out: the demo models never train on this seed's examples

Answerer = Callable[[object, str], str]  # (PIL image, prompt) -> answer text


def evaluate(answer: Answerer, n: int = 500, seed: int = DEFAULT_SEED, task: str = "shapes",
             progress: bool = False) -> dict:
    """Exact-match accuracy overall and per question kind."""
    from mmedge.tasks import shapes

    if task not in TASKS:
        raise MmedgeError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if n < 1:
        raise MmedgeError(f"-n must be at least 1, got {n}")
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for ex in tqdm(shapes.examples(n, seed), total=n, desc="eval", disable=not progress, mininterval=1):
        total[ex.kind] += 1
        right[ex.kind] += shapes.normalize(answer(ex.image, ex.prompt)) == shapes.normalize(ex.answer)
    per_kind = {k: right[k] / total[k] for k in shapes.KINDS if total[k]}
    return {"task": task, "accuracy": sum(right.values()) / n, "per_kind": per_kind, "n": n, "seed": seed}


def package_answerer(path: Path, **load_options) -> Answerer:
    from mmedge.runtimes import Pipeline

    pipe = Pipeline.load(path, **load_options)
    return lambda image, prompt: pipe.generate(image, prompt, max_new_tokens=32)


def reference_answerer(checkpoint: Path) -> Answerer:
    """transformers' own greedy generate() on a checkpoint (needs torch): the reference numbers."""
    import torch
    import transformers
    from transformers import AutoProcessor

    transformers.logging.set_verbosity_error()
    from mmedge.exporters import checkpoint as ckpt

    family = ckpt.family_for(ckpt.read_config(checkpoint)["model_type"])
    try:
        model = family.load(checkpoint)
        processor = AutoProcessor.from_pretrained(checkpoint)
    except MmedgeError:
        raise
    except Exception as exc:  # a damaged checkpoint, as export reports it
        raise MmedgeError(f"could not load the model from {checkpoint}: {first_line(exc)}") from exc

    def answer(image, prompt):
        inputs = reference_inputs(processor, image, prompt)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return answer


def reference_inputs(processor, image, prompt: str) -> dict:
    """transformers' own model inputs for one image and the user's text, the way the runtime formats it:
    through the processor's chat template (one user turn: the image, then the text; generation prompt
    added) when the checkpoint has one, otherwise the processor's fixed format."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    return processor(images=image, text=prompt, return_tensors="pt")
