"""Train a small CLIP from scratch, contrastively, for the zero-shot form of the shapes task, on CPU.

    python tools/train_shapes_clip.py --out mmedge/models/shapes-clip

The model is transformers' `CLIPModel` (model_type "clip") at small dimensions
with random init; the tokenizer is a byte-level BPE trained on the task's words
with `tokenizers`, wrapping every text as "<bos> ... <eos>" (CLIP pools the text
at the first EOS). Training is symmetric InfoNCE with a learnable logit scale
over single-shape scenes (the zero-shot form) and a few multi-shape ones; the
text side of every step holds each text true of some scene in the batch plus
every zero-shot label text (so close colours, red/orange and blue/cyan, are
always there as negatives), and targets are multi-positive: an image matches
every text true of it, a text every image it is true of. Some scenes come with
a twin that differs in one attribute (the close colour, or another shape). A
second loss (--kind-weight) scores each single-shape image against its kind's
label texts only, the zero-shot decision itself.

Everything is drawn from --seed (weights, data stream); the held-out seed
(12345) is never trained on. After training it reloads the saved checkpoint
with transformers' processor, scores zero-shot accuracy on 1000 held-out
examples and writes eval.json and the model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmedge.tasks import shapes

log = logging.getLogger("train_shapes_clip")

HELD_OUT_SEED = 12345
VAL_SEED = 777  # a small monitoring set during training; neither the training seed nor the held-out one
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
MAX_TEXT = 32  # text positions; the longest caption (four objects) is ~20 tokens
CLOSE = {"red": "orange", "orange": "red", "blue": "cyan", "cyan": "blue"}  # hard-negative partners


# ---------------------------------------------------------------- tokenizer, model, processor

def zero_shot_texts() -> list[str]:
    return [template.format(label) for template, labels in shapes.ZERO_SHOT.values() for label in labels]


def single_captions() -> list[str]:
    return [shapes.Obj(s, c, 0).phrase for c in shapes.COLORS for s in shapes.SHAPES]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE on the task's sentences and the zero-shot texts; "<bos> $A <eos>" around every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = shapes.corpus() + zero_shot_texts() * 4 + single_captions() * 2
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", bos),
                                                                                               ("<eos>", eos)])
    return tok


def hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=MAX_TEXT)


def build_model(tok, image_size: int, patch_size: int, seed: int):
    from transformers import CLIPConfig, CLIPModel

    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    text = dict(vocab_size=(tok.get_vocab_size() + 63) // 64 * 64, hidden_size=128, intermediate_size=512,
                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TEXT,
                pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=128, intermediate_size=512,
                  num_hidden_layers=4, num_attention_heads=4, num_channels=3)
    # the towers' own projection_dim too (CLIPModel reads the top level's; CLIP*ModelWithProjection the tower's)
    config = CLIPConfig(text_config=dict(text, projection_dim=128), vision_config=dict(vision, projection_dim=128),
                        projection_dim=128)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    assert model.config.text_config.eos_token_id == ids["<eos>"] != 2  # 2 would select transformers' legacy pooling
    return model


def build_processor(tok, image_size: int):
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return CLIPProcessor(image_processor=images, tokenizer=hf_tokenizer(tok))


# ---------------------------------------------------------------- data

def _twin(obj: shapes.Obj, rng: np.random.Generator) -> shapes.Obj:
    """The same object with one attribute changed: the close colour where there is one, else any other."""
    if rng.integers(2):
        others = [c for c in shapes.COLORS if c != obj.color]
        close = obj.color in CLOSE and rng.random() < 0.75
        color = CLOSE[obj.color] if close else others[rng.integers(len(others))]
        return shapes.Obj(obj.shape, color, obj.cell)
    others = [s for s in shapes.SHAPES if s != obj.shape]
    return shapes.Obj(others[rng.integers(len(others))], obj.color, obj.cell)


def true_texts(objs) -> set[str]:
    """Every training text that is true of a scene: for one shape its zero-shot texts and caption, else the caption."""
    if len(objs) == 1:
        o = objs[0]
        (ct, _), (st, _) = shapes.ZERO_SHOT["color"], shapes.ZERO_SHOT["shape"]
        return {ct.format(o.color), st.format(o.shape), o.phrase}
    return {shapes.caption(objs)}


def scenes(rng: np.random.Generator, batch: int, multi_frac: float, twin_frac: float):
    """`batch` scenes (lists of Obj in reading order), single shapes as zero_shot_examples draws them."""
    out = []
    while len(out) < batch:
        if rng.random() < multi_frac:
            objs = shapes._scene(rng)
            if len(objs) > 1:
                out.append(objs)
                continue
        obj = shapes.Obj(shapes.SHAPES[rng.integers(len(shapes.SHAPES))],
                         list(shapes.COLORS)[rng.integers(len(shapes.COLORS))], int(rng.integers(9)))
        out.append([obj])
        if len(out) < batch and rng.random() < twin_frac:
            out.append([_twin(obj, rng)])
    return out


def make_batch(rng, batch, multi_frac, twin_frac, processor, label_texts):
    objs = scenes(rng, batch, multi_frac, twin_frac)
    images = [shapes.draw(o, rng, shapes.IMAGE_SIZE) for o in objs]
    truths = [true_texts(o) for o in objs]
    texts = list(dict.fromkeys([*label_texts, *sorted(set().union(*truths))]))
    assert texts[:len(label_texts)] == list(label_texts)  # per_kind_loss reads the label texts' columns by position
    match = torch.tensor([[t in tr for t in texts] for tr in truths], dtype=torch.float32)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    # per single-shape scene, the index of its colour and its shape among the label texts (-1: a multi-shape scene)
    colors, kinds = list(shapes.COLORS), torch.tensor([[-1, -1]] * len(objs))
    for i, o in enumerate(objs):
        if len(o) == 1:
            kinds[i] = torch.tensor([colors.index(o[0].color), shapes.SHAPES.index(o[0].shape)])
    return pixels, enc["input_ids"], enc["attention_mask"], match, kinds


def features(out) -> torch.Tensor:
    """get_*_features return a tensor in transformers 4 and a ModelOutput (pooler_output) in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def multi_positive_loss(img, txt, scale, match):
    """Symmetric InfoNCE with soft targets: each row/column's positives share the target mass equally."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # images x texts
    i2t = -(match / match.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    has = match.sum(0) > 0  # texts with an image in this batch (every label text need not have one)
    m = match[:, has]
    t2i = -(m / m.sum(0, keepdim=True) * F.log_softmax(logits[:, has], dim=0)).sum(0).mean()
    return (i2t + t2i) / 2, logits


def per_kind_loss(logits, kinds):
    """The zero-shot decision itself: each single-shape image against its kind's label texts only (the first
    len(COLORS) columns are the colour texts, the next len(SHAPES) the shape texts; ignore_index -1)."""
    nc, ns = len(shapes.COLORS), len(shapes.SHAPES)
    return (F.cross_entropy(logits[:, :nc], kinds[:, 0], ignore_index=-1)
            + F.cross_entropy(logits[:, nc:nc + ns], kinds[:, 1], ignore_index=-1)) / 2


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def zero_shot_eval(model, processor, n: int, seed: int, batch: int = 100) -> dict:
    """Zero-shot accuracy on shapes.zero_shot_examples(n, seed): argmax cosine over the kind's filled templates."""
    model.eval()
    label_emb = {}
    for kind, (template, labels) in shapes.ZERO_SHOT.items():
        enc = processor(text=[template.format(lab) for lab in labels], padding=True, return_tensors="pt")
        label_emb[kind] = F.normalize(features(model.get_text_features(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])), dim=-1)
    right = {k: 0 for k in shapes.ZERO_SHOT}
    total = {k: 0 for k in shapes.ZERO_SHOT}
    chunk = []

    def flush():
        pix = processor(images=[ex.image for ex in chunk], return_tensors="pt")["pixel_values"]
        emb = F.normalize(features(model.get_image_features(pixel_values=pix)), dim=-1)
        for e, ex in zip(emb, chunk):
            pick = ex.labels[int((label_emb[ex.kind] @ e).argmax())]
            right[ex.kind] += pick == ex.answer
            total[ex.kind] += 1
        chunk.clear()

    for ex in shapes.zero_shot_examples(n, seed):
        chunk.append(ex)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())),
            "per_kind": {k: right[k] / max(1, total[k]) for k in right}, "n": sum(total.values())}


# ---------------------------------------------------------------- training

def train(model, processor, steps, batch_size, lr, seed, multi_frac, twin_frac, val_every, kind_weight=1.0,
          progress=True):
    assert seed != HELD_OUT_SEED, "the held-out seed is never trained on"
    rng = np.random.default_rng(seed)
    label_texts = zero_shot_texts()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, min(200, steps // 10))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    bar = tqdm(range(steps), desc="train", disable=not progress, mininterval=2)
    avg = None
    for step in bar:
        model.train()
        pixels, ids, mask, match, kinds = make_batch(rng, batch_size, multi_frac, twin_frac, processor, label_texts)
        img = features(model.get_image_features(pixel_values=pixels))
        txt = features(model.get_text_features(input_ids=ids, attention_mask=mask))
        loss, logits = multi_positive_loss(img, txt, model.logit_scale.exp(), match)
        if kind_weight:
            loss = loss + kind_weight * per_kind_loss(logits, kinds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP does
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.3f}", scale=f"{model.logit_scale.exp().item():.1f}", refresh=False)
        if (step + 1) % val_every == 0 or step + 1 == steps:
            val = zero_shot_eval(model, processor, 200, VAL_SEED)
            log.info("step %d: loss %.3f, logit scale %.1f, lr %.2e, val (seed %d, n 200) %.1f%% %s", step + 1, avg,
                     model.logit_scale.exp().item(), sched.get_last_lr()[0], VAL_SEED, 100 * val["accuracy"],
                     {k: round(100 * v, 1) for k, v in val["per_kind"].items()})
    return model.eval()


MODEL_CARD = """\
# {name}

A {params:.2f}M-parameter CLIP (transformers `CLIPModel`) trained from scratch by
mmedge, contrastively, on the procedurally generated *shapes* task, for testing
embedding-model exports end to end. It is a demo trained on synthetic images of
coloured shapes on a plain background: its embeddings mean nothing on real photos.

- Task and generator: `mmedge/tasks/shapes.py`; zero-shot form: one shape on a 3x3 grid,
  its colour picked among {n_colors} by "a {{}} shape" or its shape among {n_shapes} by "a {{}}",
  by cosine similarity of the image and text embeddings (colours include red/orange and blue/cyan)
- Architecture: vision ViT {vision_layers}x{vision_hidden} ({vision_heads} heads), {image_size}x{image_size} input
  (resized from 96 by the processor), patch {patch_size}; text {text_layers}x{text_hidden} ({text_heads} heads),
  {text_positions} positions, vocab {vocab}; projection {proj}; {params_exact:,} parameters
- Tokenizer: byte-level BPE trained with `tokenizers` on the task's words; every text is
  written "<bos> ... <eos>" and pooled at the first "<eos>"
- Training: `{command}` ({steps} steps of {batch} scenes, seed {seed}, symmetric multi-positive InfoNCE with a
  learnable logit scale, plus a per-kind cross-entropy of each image against its kind's label texts; {minutes:.1f} min on {machine})

## Zero-shot accuracy

On {n} held-out examples of `shapes.zero_shot_examples(n={n}, seed={eval_seed})` (a seed not used in
training), scored on this saved checkpoint by `mmedge eval {name} -n {n}` (transformers' processor and
`get_image_features` / `get_text_features`; the exported packages score the same, tests/test_demo_model.py):

| kind | accuracy |
|---|---|
| color | {color:.1%} |
| shape | {shape:.1%} |
| **all** | **{all:.1%}** |
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("mmedge/models/shapes-clip"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--multi-frac", type=float, default=0.1, help="share of multi-shape scenes")
    p.add_argument("--twin-frac", type=float, default=0.5,
                   help="share of single-shape scenes followed by a twin differing in one attribute")
    p.add_argument("--kind-weight", type=float, default=1.0,
                   help="weight of the per-kind loss (each image against its kind's label texts only)")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.seed == HELD_OUT_SEED:
        p.error(f"--seed {HELD_OUT_SEED} is the held-out seed")

    tok = build_tokenizer()
    processor = build_processor(tok, args.image_size)
    model = build_model(tok, args.image_size, args.patch_size, args.seed)
    params = sum(p.numel() for p in model.parameters())
    log.info("CLIPModel: %.2fM parameters; %d steps of %d scenes", params / 1e6, args.steps, args.batch_size)

    start = time.perf_counter()
    model = train(model, processor, args.steps, args.batch_size, args.lr, args.seed, args.multi_frac,
                  args.twin_frac, args.val_every, args.kind_weight, progress=not args.no_progress)
    minutes = (time.perf_counter() - start) / 60
    log.info("trained in %.1f min", minutes)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)

    from mmedge.evaluate import ReferenceEmbedder, evaluate_zero_shot

    reference = ReferenceEmbedder(args.out)  # the saved checkpoint, scored as `mmedge eval` scores it
    result = evaluate_zero_shot(reference, n=args.eval_n, seed=HELD_OUT_SEED)
    log.info("held-out accuracy %.2f%% %s", 100 * result["accuracy"], json.dumps(result["per_kind"]))
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")

    cfg = reference.model.config
    tc, vc = cfg.text_config, cfg.vision_config
    card = MODEL_CARD.format(
        name=args.out.name, params=params / 1e6, params_exact=params,
        n_colors=len(shapes.COLORS), n_shapes=len(shapes.SHAPES),
        vision_layers=vc.num_hidden_layers, vision_hidden=vc.hidden_size, vision_heads=vc.num_attention_heads,
        image_size=vc.image_size, patch_size=vc.patch_size,
        text_layers=tc.num_hidden_layers, text_hidden=tc.hidden_size, text_heads=tc.num_attention_heads,
        text_positions=tc.max_position_embeddings, vocab=tc.vocab_size, proj=cfg.projection_dim,
        command="python tools/train_shapes_clip.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        steps=args.steps, batch=args.batch_size, seed=args.seed, minutes=minutes,
        machine=f"{args.threads} thread{'s' if args.threads != 1 else ''}, {platform.processor() or platform.machine()}",
        n=result["n"], eval_seed=HELD_OUT_SEED, color=result["per_kind"]["color"], shape=result["per_kind"]["shape"],
        all=result["accuracy"],
    )
    (args.out / "README.md").write_text(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
