"""Train a small VLM from scratch on the shapes task (mmedge/tasks/shapes.py), on CPU.

    python tools/train_shapes.py --family paligemma --out mmedge/models/shapes-paligemma

The model is the family's real transformers class at small dimensions; the
tokenizer is a byte-level BPE trained on the task's words with `tokenizers`.
Everything is drawn from --seed (weights, data stream), so the same command
gives the same model. After training it scores the checkpoint with the same
code as `mmedge eval` on a held-out seed and writes the model card.

A family is a recipe here: how to build the model and how to lay out a
training sequence the way its processor does at inference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmedge.tasks import shapes

from shapes_recipes import HELD_OUT_SEED, RECIPES  # tools/, this script's folder, is on the path

log = logging.getLogger("train_shapes")


# Stage 2 opens with the questions that match a word of the question against the
# image tokens; mixed with the other kinds from the start, `exists` stayed at
# chance for thousands of steps, while on its own it is learnt in ~500.
CURRICULUM = (("color", "count", "exists"), 1000)


def train(recipe, steps: int, batch_size: int, lr: float, seed: int, progress: bool = True, device: str = "cpu",
          vision_steps: int = 0, curriculum: tuple[tuple[str, ...], int] = CURRICULUM, init: Path | None = None):
    """Stage 1 (vision_steps): align the vision tower with the word embeddings; stage 2: train the VLM on the task.

    In stage 2 the vision tower is frozen (the projector and decoder train).
    The first curriculum[1] steps draw only curriculum[0]'s question kinds.
    init: a checkpoint this script wrote, trained further (stage 2 only, the recipe's freezing as after stage 1).
    """
    torch.manual_seed(seed)
    model = recipe.model() if init is None else recipe.model().from_pretrained(init)
    model = model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2fM parameters; %d alignment steps, then %d steps of %d",
             type(recipe).__name__, params / 1e6, vision_steps, steps, batch_size)
    if vision_steps:
        recipe.align_vision(model, vision_steps, batch_size, 1e-3, seed, device=device, progress=progress)
    if vision_steps or init is not None:
        tower, projector = recipe.vision_parts(model)
        tower.requires_grad_(not recipe.freeze_tower)
        if recipe.train_projector != "all":
            projector.requires_grad_(False)
        if recipe.train_projector == "last":
            for p in recipe.projector_output(model):
                p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tower, projector = recipe.vision_parts(model)
    in_projector = {id(p) for p in projector.parameters()}
    in_tower = {id(p) for p in tower.parameters()} - in_projector
    groups = [{"params": [p for p in trainable if id(p) not in in_projector | in_tower], "lr": lr},
              {"params": [p for p in trainable if id(p) in in_projector], "lr": lr * recipe.projector_lr},
              {"params": [p for p in trainable if id(p) in in_tower], "lr": lr * recipe.tower_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    first_kinds, first_steps = curriculum
    first_steps = min(first_steps, steps)
    early = shapes.examples(first_steps * batch_size, seed=seed, kinds=first_kinds)
    rest = shapes.examples((steps - first_steps) * batch_size, seed=seed + 1, kinds=recipe.kinds)
    bar = tqdm(range(steps), desc="train", disable=not progress, mininterval=2)
    ema = None
    for step in bar:
        data = early if step < first_steps else rest
        batch = {k: v.to(device) for k, v in recipe.batch([next(data) for _ in range(batch_size)]).items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
    model.requires_grad_(True)
    return model.cpu().eval()


MODEL_CARD = """# {name}

A {params:.2f}M-parameter {family} model trained from scratch by mmedge on the
procedurally generated *shapes* task, for testing exports end to end: it
answers questions about images of one to four coloured shapes on a 3x3 grid.
Not a general-purpose model.

- Task and generator: `mmedge/tasks/shapes.py` (six question kinds: caption,
  color, count, where, exists, left_of; colours include red/orange and blue/cyan)
- Architecture: transformers `{arch}`; vision {vision}; decoder {text};
  {n_image} image tokens at {image_size}x{image_size}
- Tokenizer: byte-level BPE trained with `tokenizers` on the task's words
- Training: `{command}` ({vision_steps} vision-alignment steps, then {steps} steps of {batch}, seed {seed};
  {minutes:.1f} min on {machine})

## Accuracy

Exact match of the greedy answer on {n} held-out examples (seed {eval_seed},
not used in training), scored by `mmedge eval {name_or_path} --task shapes -n {n} --seed {eval_seed}`
on this PyTorch checkpoint:

| kind | accuracy |
|---|---|
{rows}
| **all** | **{accuracy:.1%}** |

Use it: `mmedge export --model {name} -o pkg && mmedge run pkg --image examples/images/shapes.png --prompt "what color is the circle?"`
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="paligemma", choices=sorted(RECIPES))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vision-steps", type=int, default=1500, help="vision-alignment steps (stage 1)")
    p.add_argument("--align", choices=("dot", "cosine"), help="stage-1 scoring (default: the recipe's)")
    p.add_argument("--train-projector", choices=("all", "last", "none"),
                   help="stage 2: train the whole projector, its last linear map, or none of it (default: the recipe's)")
    p.add_argument("--projector-lr", type=float, help="the projector's learning rate as a multiple of --lr")
    p.add_argument("--kinds", help="stage 2's question kinds in rotation, comma-separated; a kind named twice is "
                   "drawn twice as often (default: the recipe's)")
    p.add_argument("--init", type=Path, help="train this checkpoint (one this script wrote) further: stage 2 only")
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="torch device; the shipped model is trained on cpu")
    p.add_argument("--image-size", type=int, help="override the recipe's input size")
    p.add_argument("--patch-size", type=int, help="override the recipe's patch size")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    recipe = RECIPES[args.family](image_size=args.image_size, patch_size=args.patch_size)
    if args.align:
        recipe.align_cosine = args.align == "cosine"
    if args.train_projector:
        recipe.train_projector = args.train_projector
    if args.kinds:
        recipe.kinds = tuple(k.strip() for k in args.kinds.split(","))
        unknown = set(recipe.kinds) - set(shapes.KINDS)
        if unknown:
            p.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(shapes.KINDS)}")
    if args.projector_lr:
        recipe.projector_lr = args.projector_lr
    vision_steps = 0 if args.init else args.vision_steps  # a checkpoint trained further is aligned already
    start = time.perf_counter()
    model = train(recipe, args.steps, args.batch_size, args.lr, args.seed, device=args.device,
                  vision_steps=vision_steps, init=args.init,
                  curriculum=(shapes.KINDS, 0) if args.init else CURRICULUM)
    minutes = (time.perf_counter() - start) / 60
    log.info("trained in %.1f min", minutes)
    recipe.save(model, args.out)

    from mmedge.evaluate import evaluate, reference_answerer

    result = evaluate(reference_answerer(args.out), n=args.eval_n, seed=HELD_OUT_SEED)
    log.info("held-out accuracy %.2f%% %s", 100 * result["accuracy"], json.dumps(result["per_kind"]))
    import platform

    cfg = model.config
    card = MODEL_CARD.format(
        name=args.out.name,
        name_or_path=args.out.name,
        params=sum(p.numel() for p in model.parameters()) / 1e6,
        family=args.family,
        arch=type(model).__name__,
        vision=recipe.card_dims(cfg)[0],
        text=recipe.card_dims(cfg)[1],
        n_image=recipe.n_image,
        image_size=recipe.dims.image_size,
        command="python tools/train_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        steps=args.steps,
        vision_steps=vision_steps,
        batch=args.batch_size,
        seed=args.seed,
        minutes=minutes,
        machine=f"{args.threads} thread{'s' if args.threads != 1 else ''}, {platform.processor() or platform.machine()}",
        n=result["n"],
        eval_seed=HELD_OUT_SEED,
        rows="\n".join(f"| {k} | {v:.1%} |" for k, v in result["per_kind"].items()),
        accuracy=result["accuracy"],
    )
    (args.out / "README.md").write_text(card)
    (args.out / "eval.json").write_text(json.dumps({**result, "seed": HELD_OUT_SEED}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
