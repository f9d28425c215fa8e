"""The demo trainer's recipes, one per family: how to build the small model, lay out a training sequence
the way the family's processor does at inference, and align its vision side with the word embeddings
(stage 1). tools/train_shapes.py trains them."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmedge.exporters import tiny
from mmedge.exporters.families import paligemma
from mmedge.manifest import PreprocessSpec
from mmedge.runtimes.preprocess import preprocess
from mmedge.tasks import shapes

log = logging.getLogger("train_shapes")

HELD_OUT_SEED = 12345  # `mmedge eval --task shapes` default; never used for training


class PaliGemmaRecipe:
    """PaliGemma at 1.6M parameters: 72x72 input, 24-pixel patches, Gemma decoder.

    One patch per cell of the task's 3x3 grid (9 image tokens) keeps each
    example cheap (~300 examples/s on 2 cores), so the CPU budget buys many
    examples. Trained from scratch end to end, the decoder never learnt to
    match a question's shape word to an image token; `align_vision` (stage 1)
    and the curriculum in `train` are what make it learn (docs/evaluation.md).
    """

    dims = tiny.TinyShape(
        "shapes demo PaliGemma",
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        text=dict(model_type="gemma", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                  max_position_embeddings=256),
        image_size=72,
        patch_size=24,
    )

    # Stage 1 scores image tokens against word embeddings by dot product (False; the shipped
    # PaliGemma demo) or by cosine, the projector then scaled to the words' norm (True).
    align_cosine = False
    # Stage 1 also aligns each cell's token with its row word (top/center/bottom) and column word
    # (left/center/right): cross-attention families, whose decoder gives image states no positions
    align_positions = False
    # Stage 2 keeps the aligned vision tower as it is (True), or trains it with the rest (False) at tower_lr x lr
    freeze_tower = True
    tower_lr = 1.0
    # Stage 2 trains the whole projector with the decoder ("all"), only its last linear map
    # (projector_output: "last"), or keeps stage 1's ("none"); projector_lr scales its learning rate.
    train_projector = "all"
    projector_lr = 1.0
    # Stage 2's question kinds after the curriculum, in rotation: a kind named twice is drawn twice as often
    kinds = shapes.KINDS

    def __init__(self, image_size: int | None = None, patch_size: int | None = None):
        if image_size or patch_size:
            self.dims = dataclasses.replace(
                self.dims, image_size=image_size or self.dims.image_size, patch_size=patch_size or self.dims.patch_size
            )
        self.tok = paligemma.tiny_tokenizer(corpus=shapes.corpus(), vocab_size=512)
        self.config = paligemma.tiny_config(self.dims, self.tok)
        size = self.dims.image_size
        self.pre = PreprocessSpec(height=size, width=size)  # SigLIP: bicubic, 1/255, mean/std 0.5
        self.n_image = (size // self.dims.patch_size) ** 2
        self.ids = {t: self.tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<image>")}

    def model(self):
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration(self.config)

    def batch(self, examples: list[shapes.Example]) -> dict[str, torch.Tensor]:
        """The processor's layout: image tokens, <bos>, prompt, "\\n" | answer, <eos>; loss on the answer."""
        seqs, types = [], []
        for ex in examples:
            prefix = [self.ids["<image>"]] * self.n_image + [self.ids["<bos>"]]
            prefix += self.tok.encode(ex.prompt + "\n", add_special_tokens=False).ids
            suffix = self.tok.encode(ex.answer, add_special_tokens=False).ids + [self.ids["<eos>"]]
            seqs.append(prefix + suffix)
            types.append([0] * len(prefix) + [1] * len(suffix))  # padding below is typed 1: never prefix
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.ids["<pad>"], dtype=torch.long)
        tt = torch.ones((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, t) in enumerate(zip(seqs, types)):
            ids[i, : len(s)] = torch.tensor(s)
            tt[i, : len(t)] = torch.tensor(t)
            mask[i, : len(s)] = 1
        labels = torch.where((tt == 1) & (mask == 1), ids, torch.full_like(ids, -100))
        pixels = torch.from_numpy(np.concatenate([preprocess(ex.image, self.pre) for ex in examples]))
        return dict(input_ids=ids, token_type_ids=tt, attention_mask=mask, pixel_values=pixels, labels=labels)

    def cell_targets(self, examples: list[shapes.Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per cell of the 3x3 grid (one image token each): the index of its shape and colour word, or of "nothing"."""
        assert self.cells == 9, "one image token per cell of the 3x3 grid"
        colors = list(shapes.COLORS)
        shape_t = torch.full((len(examples), 9), len(shapes.SHAPES))
        color_t = torch.full((len(examples), 9), len(colors))
        for i, ex in enumerate(examples):
            for o in ex.objects:
                shape_t[i, o.cell] = shapes.SHAPES.index(o.shape)
                color_t[i, o.cell] = colors.index(o.color)
        return shape_t, color_t

    @property
    def cells(self) -> int:
        """The image tokens stage 1 aligns, one per cell of the grid (the first ones of the projector's output)."""
        return self.n_image

    def card_dims(self, cfg) -> tuple[str, str]:
        """The model card's vision and decoder sizes."""
        text = cfg.text_config
        return (f"{cfg.vision_config.num_hidden_layers}x{cfg.vision_config.hidden_size}",
                f"{text.num_hidden_layers}x{text.hidden_size} ({text.num_attention_heads} heads, "
                f"{text.num_key_value_heads} KV)")

    def word_ids(self, words) -> list[int]:
        ids = [self.tok.token_to_id("\u0120" + w) for w in words]  # the word as it occurs mid-sentence
        assert None not in ids, f"the tokenizer has no single token for one of {list(words)}"
        return ids

    def align_vision(self, model, steps: int, batch_size: int, lr: float, seed: int, device: str = "cpu",
                     progress: bool = True) -> None:
        """Stage 1: train the vision tower and projector to put each cell's contents into the decoder's word space.

        Real VLMs start from a pre-trained vision encoder and first align its
        outputs with the language model's embeddings (LLaVA's stage 1). Here
        each cell's image token is scored against the (frozen, randomly
        initialised) embeddings of the shape words and the colour words, plus
        "nothing" for an empty cell, and trained to pick its own shape and
        colour. Trained end to end from scratch instead, the decoder learnt
        colours but never learnt to match a question's shape word to the image.
        """
        tower, projector = self.vision_parts(model)
        table = model.get_input_embeddings().weight
        shape_words = self.word_ids([*shapes.SHAPES, "nothing"])
        color_words = self.word_ids([*shapes.COLORS, "nothing"])
        scale = torch.nn.Parameter(torch.full((), 10.0 if self.align_cosine else 1.0, device=device))
        opt = torch.optim.AdamW([*tower.parameters(), *projector.parameters(), scale], lr=lr, weight_decay=0.0)
        data = shapes.examples(steps * batch_size, seed=seed + 1_000_003)
        bar = tqdm(range(steps), desc="align vision", disable=not progress, mininterval=2)
        normalize = torch.nn.functional.normalize if self.align_cosine else (lambda t: t)
        for _ in bar:
            exs = [next(data) for _ in range(batch_size)]
            shape_t, color_t = (t.to(device) for t in self.cell_targets(exs))
            pixels = torch.from_numpy(np.concatenate([preprocess(ex.image, self.pre) for ex in exs])).to(device)
            states = projector(tower(pixels))
            tokens = normalize(states) * scale
            words = normalize(table.detach())
            ce = torch.nn.functional.cross_entropy
            loss = ce((tokens @ words[shape_words].T).flatten(0, 1), shape_t.flatten()) + ce(
                (tokens @ words[color_words].T).flatten(0, 1), color_t.flatten())
            for group, target in self.position_targets(len(exs), device):
                loss = loss + ce((tokens @ words[group].T).flatten(0, 1), target.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if self.align_cosine:
            self.rescale_projector(model)
        log.info("stage 1 held-out per-cell accuracy: %s", json.dumps(self.alignment_accuracy(model)))

    ROW_WORDS = ("top", "center", "bottom")
    COLUMN_WORDS = ("left", "center", "right")

    def position_targets(self, n: int, device: str = "cpu") -> list[tuple[list[int], torch.Tensor]]:
        """With align_positions: (word ids, per-cell target [n, 9]) for the row words and for the column words."""
        if not self.align_positions:
            return []
        cells = torch.arange(9, device=device).expand(n, 9)
        return [(self.word_ids(self.ROW_WORDS), cells // 3), (self.word_ids(self.COLUMN_WORDS), cells % 3)]

    @torch.no_grad()
    def rescale_projector(self, model, n: int = 256) -> None:
        """Scale the projector's last linear map so that image tokens have the norm of the decoder's word embeddings.

        The decoder sees image tokens beside its (scaled, where the family scales them) word
        embeddings; tokens hundreds of times longer drown the words in the residual stream.
        """
        tower, projector = self.vision_parts(model)
        exs = list(shapes.examples(n, seed=HELD_OUT_SEED + 2))
        pixels = torch.from_numpy(np.concatenate([preprocess(ex.image, self.pre) for ex in exs]))
        token_norm = projector(tower(pixels)).norm(dim=-1).mean()
        words = torch.tensor(self.word_ids([*shapes.SHAPES, *shapes.COLORS]))
        word_norm = model.get_input_embeddings()(words).norm(dim=-1).mean()
        for p in self.projector_output(model):
            p.mul_(word_norm / token_norm)

    @torch.no_grad()
    def alignment_accuracy(self, model, n: int = 512, device: str = "cpu") -> dict[str, float]:
        """How often each cell's image token is nearest to its own shape word and colour word (held-out scenes)."""
        tower, projector = self.vision_parts(model)
        table = model.get_input_embeddings().weight
        shape_words = self.word_ids([*shapes.SHAPES, "nothing"])
        color_words = self.word_ids([*shapes.COLORS, "nothing"])
        exs = list(shapes.examples(n, seed=HELD_OUT_SEED + 1))
        shape_t, color_t = self.cell_targets(exs)
        pixels = torch.from_numpy(np.concatenate([preprocess(ex.image, self.pre) for ex in exs])).to(device)
        tokens = projector(tower(pixels)).cpu()
        table = torch.nn.functional.normalize(table) if self.align_cosine else table
        shape_hit = (tokens @ table[shape_words].T).argmax(-1) == shape_t
        color_hit = (tokens @ table[color_words].T).argmax(-1) == color_t
        occupied = shape_t < len(shapes.SHAPES)
        where = {name: round(((tokens @ table[group].T).argmax(-1) == target).float().mean().item(), 4)
                 for name, (group, target) in zip(("row", "column"), self.position_targets(n))}
        return {"shape": round(shape_hit[occupied].float().mean().item(), 4),
                "color": round(color_hit[occupied].float().mean().item(), 4),
                "empty": round(shape_hit[~occupied].float().mean().item(), 4), **where,
                "token_norm": round(tokens.norm(dim=-1).mean().item(), 3),
                "word_norm": round(model.get_input_embeddings()(torch.tensor(shape_words + color_words))
                                   .norm(dim=-1).mean().item(), 3)}

    def vision_parts(self, model):
        """The vision encoder and projector as the export splits them: pixels -> image tokens."""
        parts = paligemma.split(model)
        return parts.vision_encoder, parts.projector

    def projector_output(self, model) -> list[torch.Tensor]:
        """The parameters the projector's output is linear in (its last linear map's weight and bias)."""
        layer = model.model.multi_modal_projector.linear
        return [layer.weight, layer.bias]

    def save(self, model, out: Path) -> None:
        paligemma.save_checkpoint(model.eval(), self.tok, out)


class ChatRecipe(PaliGemmaRecipe):
    """A family whose checkpoints carry a chat template (LLaVA, Gemma 3), at the same small size.

    A training sequence is exactly what the family's processor gives for
    (image, question) through its chat template, then the answer and EOS;
    the loss is on the answer. The processor's ids (and token types, where
    the family has them) are cached per question text; pixels come from the
    runtime's preprocessing, which the parity tests prove equal to the
    processor's. Stage 1 aligns the family's own vision encoder + projector
    parts (the modules the export uses) with the word embeddings.
    """

    family_name = ""
    chat_template = ""  # the demo checkpoint's own template (see the subclasses)

    def __init__(self, image_size: int | None = None, patch_size: int | None = None):
        import importlib
        import tempfile

        from mmedge.evaluate import load_processor

        if image_size or patch_size:
            self.dims = dataclasses.replace(
                self.dims, image_size=image_size or self.dims.image_size, patch_size=patch_size or self.dims.patch_size
            )
        self.family = importlib.import_module(f"mmedge.exporters.families.{self.family_name}")
        self.tok = self.family.tiny_tokenizer(corpus=shapes.corpus(), vocab_size=512)
        self.config = self.family.tiny_config(self.dims, self.tok)
        with tempfile.TemporaryDirectory() as tmp:
            self.family.save_checkpoint(self.model(), self.tok, Path(tmp))
            self.processor = load_processor(Path(tmp))
            self.processor.chat_template = self.chat_template
            desc = self.family.describe(self.family.load(Path(tmp)), Path(tmp), self.processor.tokenizer)
        self.pre = desc.preprocess
        self.n_image = desc.prompt.image_seq_len
        self.ids = {t: self.tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")}
        self._prompts: dict[str, dict[str, list[int]]] = {}

    def model(self):
        return self.family.tiny_model(self.dims, self.tok)

    def _prompt(self, prompt: str, image) -> dict[str, list[int]]:
        if prompt not in self._prompts:
            from mmedge.evaluate import reference_inputs

            inputs = reference_inputs(self.processor, image, prompt)
            self._prompts[prompt] = {k: inputs[k][0].tolist() for k in ("input_ids", "token_type_ids") if k in inputs}
        return self._prompts[prompt]

    def batch(self, examples: list[shapes.Example]) -> dict[str, torch.Tensor]:
        seqs, types, starts = [], [], []
        for ex in examples:
            prefix = self._prompt(ex.prompt, ex.image)
            suffix = self.tok.encode(ex.answer, add_special_tokens=False).ids + [self.ids["<eos>"]]
            seqs.append(prefix["input_ids"] + suffix)
            types.append(prefix.get("token_type_ids", []) + [0] * len(suffix))
            starts.append(len(prefix["input_ids"]))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.ids["<pad>"], dtype=torch.long)
        tt = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, t, start) in enumerate(zip(seqs, types, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, start : len(s)] = torch.tensor(s[start:])
            if t:
                tt[i, : len(t)] = torch.tensor(t)
        pixels = torch.from_numpy(np.concatenate([preprocess(ex.image, self.pre) for ex in examples]))
        batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        if any(types):
            batch["token_type_ids"] = tt
        return batch

    def vision_parts(self, model):
        parts = self.family.split(model)
        return parts.vision_encoder, parts.projector

    def save(self, model, out: Path) -> None:
        self.family.save_checkpoint(model.eval(), self.tok, out)
        (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")


class LlavaRecipe(ChatRecipe):
    """LLaVA-1.5 at the demo size: CLIP (penultimate layer, CLS dropped), MLP projector, Llama; 9 image tokens."""

    family_name = "llava"
    # LLaVA-1.5's turn format with the text before the image, so that in the causal decoder the image
    # tokens see the question, as PaliGemma's bidirectional prefix lets them. Stage 2 trains only the
    # projector's last Linear: trained whole, the Linear-GELU-Linear projector drifted (image tokens
    # ~20-40x the words' norm, all shapes read as one) and frozen it could not follow the word
    # embeddings as they grew (0.22 -> 1.6); docs/evaluation.md has the runs.
    chat_template = (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + '\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{{ ' ' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    dims = tiny.TinyShape(
        "shapes demo LLaVA",
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        text=dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                  max_position_embeddings=256),
        image_size=72, patch_size=24, extra=dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    )
    align_cosine = True
    train_projector = "last"

    def projector_output(self, model):
        layer = model.model.multi_modal_projector.linear_2
        return [layer.weight, layer.bias]


class Gemma3Recipe(ChatRecipe):
    """Gemma 3 at the demo size: SigLIP 6x6 patches pooled to 9 soft tokens, Gemma 3 decoder."""

    family_name = "gemma3"
    # Gemma 3's turn format with the text before the image (as LlavaRecipe). The shipped demo:
    # --vision-steps 4000, 98.4% held-out; with 1500 alignment steps the vision tower told shapes
    # apart in 92% of cells (99.3% after 4000) and the model stopped at 94.9% (docs/evaluation.md).
    chat_template = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' }}"
        "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] | trim }}"
        "{% endfor %}{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<start_of_image>' }}{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
    dims = tiny.TinyShape(
        "shapes demo Gemma 3",
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, tie_word_embeddings=True,
                  max_position_embeddings=256, sliding_window=64,
                  layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
        image_size=72, patch_size=12, extra=dict(mm_tokens_per_image=9),
    )

    def projector_output(self, model):
        return [model.model.multi_modal_projector.mm_input_projection_weight]


class SmolVLMRecipe(ChatRecipe):
    """SmolVLM2 at the demo size: SigLIP 6x6 patches, pixel shuffle 2 -> 9 tokens (one per cell), Llama.

    Image splitting is off (the task's images are small squares: one 72x72 tile); the
    prompt still carries SmolVLM's image block (<fake_token_around_image><global-img> ...).
    """

    family_name = "idefics3"
    # SmolVLM's turn format with the text before the image (as LlavaRecipe). The shipped demo:
    # --vision-steps 4000, cosine alignment, projector trained in stage 2: 97.3% held-out.
    chat_template = (
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
        "{% for line in message['content'] | selectattr('type', 'equalto', 'text') %}{{ line['text'] }}{% endfor %}"
        "{% for line in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    dims = tiny.TinyShape(
        "shapes demo SmolVLM",
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        text=dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                  max_position_embeddings=256),
        image_size=72, patch_size=12,
        extra=dict(model_type="smolvlm", scale_factor=2, longest_edge=72, splitting=False),
    )
    align_cosine = True

    def projector_output(self, model):
        return [model.model.connector.modality_projection.proj.weight]

    def batch(self, examples):
        batch = super().batch(examples)
        batch["pixel_values"] = batch["pixel_values"][:, None]  # [batch, images (one tile each), 3, H, W]
        return batch


class _PatchGridTower(torch.nn.Module):
    """A "patch_grid" vision encoder (Qwen-VL) called with the patches of a batch of same-sized images only: the
    per-patch indices come from the runtime's code, as at inference."""

    def __init__(self, encoder, grid: tuple[int, int, int], schemes, merge: int):
        super().__init__()
        self.encoder, self.grid, self.schemes, self.merge = encoder, grid, schemes, merge

    def _inputs(self, images: int, device) -> list:
        from mmedge.exporters.patch_grid import PatchGridEncoder
        from mmedge.runtimes.schemes import vision_inputs

        extra = vision_inputs(self.schemes, self.merge, [self.grid] * images)
        return [torch.from_numpy(extra[name]).to(device) for name in PatchGridEncoder.takes(extra)]

    def forward(self, pixels, chunk: int = 32):
        """The images `chunk` at a time: the encoder masks attention across all patches of a call, so one call
        over hundreds of images would cost their patch count squared."""
        per = math.prod(self.grid)
        extra = self._inputs(chunk, pixels.device)
        outs = []
        for start in range(0, pixels.shape[0], chunk * per):
            part = pixels[start : start + chunk * per]
            n = part.shape[0] // per
            if n != chunk:
                extra = self._inputs(n, pixels.device)
            outs.append(self.encoder(part, *extra))
        return torch.cat(outs)


class _PerImage(torch.nn.Module):
    """The patch merger's tokens [images x tokens, hidden] as [images, tokens, hidden]."""

    def __init__(self, merger, tokens: int):
        super().__init__()
        self.merger, self.tokens = merger, tokens

    def forward(self, features):
        out = self.merger(features)
        return out.reshape(-1, self.tokens, out.shape[-1])


class Qwen2VLRecipe(ChatRecipe):
    """Qwen2.5-VL at the demo size: 12-pixel patches, 2x2 merge -> 9 tokens (one per cell), window attention over
    2x2 tokens with a full-attention block, M-RoPE Qwen2 decoder. Every image is resized to 72x72 (min_pixels =
    max_pixels), as the task's images are."""

    family_name = "qwen2_vl"
    # Qwen2-VL's turn format (no system turn) with the text before the image (as LlavaRecipe)
    chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    dims = tiny.TinyShape(
        "shapes demo Qwen2.5-VL",
        vision=dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, window_size=48,
                    fullatt_block_indexes=[2]),
        # rope_theta 3: M-RoPE gives the width section the lowest frequencies. At head_dim 32 and theta 1e4 a
        # column step turned them by under 0.003 rad, so the decoder could not tell columns apart (where 66%,
        # left_of 58%); at theta 3 every section turns 0.36-1 rad a step.
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, mrope_section=[4, 6, 6], rope_theta=3.0, tie_word_embeddings=True,
                  max_position_embeddings=256),
        image_size=72, patch_size=12, extra=dict(model_type="qwen2_5_vl", min_pixels=72 * 72, max_pixels=72 * 72),
    )
    align_cosine = True
    # stage 2 trains only the merger's last Linear (as LLaVA's and InternVL's MLP connectors need): with the
    # whole merger trained, caption stayed at 75-87%; with the last Linear only it reached 100% (97.4% overall)
    train_projector = "last"

    def __init__(self, image_size: int | None = None, patch_size: int | None = None):
        super().__init__(image_size, patch_size)
        size, patch = self.dims.image_size, self.dims.patch_size
        self.grid = (1, size // patch, size // patch)
        self.n_image = size // patch // 2 * (size // patch // 2)
        self.image_token = self.tok.token_to_id(self.family.IMAGE_PAD)

    def batch(self, examples):
        batch = super().batch(examples)
        batch["image_grid_thw"] = torch.tensor([self.grid] * len(examples))
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token).long()
        return batch

    def vision_parts(self, model):
        from mmedge.manifest import SchemeSpec

        parts = self.family.split(model)
        grid = parts.patch_grid
        schemes = SchemeSpec(vision="patch_grid", vision_window=grid["window"])
        return (_PatchGridTower(parts.vision_encoder, self.grid, schemes, grid["merge_size"]),
                _PerImage(parts.projector, self.n_image))

    def projector_output(self, model):
        layer = model.model.visual.merger.mlp[2]
        return [layer.weight, layer.bias]


class InternVLRecipe(ChatRecipe):
    """InternVL at the demo size: InternViT 6x6 patches, pixel shuffle 0.5 -> 9 tokens (one per cell), LayerNorm-MLP
    connector, Qwen2 decoder. Every image is one 72x72 tile (max_patches 1: the task's images are small squares)."""

    family_name = "internvl"
    # InternVL's turn format with the text before the image (as LlavaRecipe). Stage 2 trains only the connector's
    # last Linear, as LLaVA's MLP projector needs (see LlavaRecipe).
    chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "\n<IMG_CONTEXT>{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    dims = tiny.TinyShape(
        "shapes demo InternVL",
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        text=dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                  max_position_embeddings=256),
        image_size=72, patch_size=12, extra=dict(max_patches=1),
    )
    align_cosine = True
    train_projector = "last"

    def projector_output(self, model):
        layer = model.model.multi_modal_projector.linear_2
        return [layer.weight, layer.bias]


class _OneTile(torch.nn.Module):
    """Llama 3.2 Vision's tiled encoder over one-tile images [B, 3, H, W] (aspect ratio (1, 1))."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels):
        ones = torch.ones(pixels.shape[0], dtype=torch.long, device=pixels.device)
        return self.encoder(pixels[:, None], ones, ones[:, None])


class _CellStates(torch.nn.Module):
    """The multi-modal projector's states of the patches (the class position dropped): one per grid cell."""

    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def forward(self, features):
        return self.projector(features[:, 0, 1:])


class MllamaRecipe(ChatRecipe):
    """Llama 3.2 Vision at the demo size: one 72x72 tile, 24-pixel patches (9 patches, one per cell, and the class
    position), 3 local + 1 global vision layers, a Llama decoder of 4 self-attention layers with cross-attention
    layers between them (1, 3, 5). Stage 1 aligns the projected patch states (what the cross-attention layers read)
    with the word embeddings of each cell's shape, colour, row and column; stage 2 trains the decoder, its
    cross-attention layers and the projector."""

    family_name = "mllama"
    chat_template = (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<|image|>' }}{% endfor %}"
        "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] | trim }}"
        "{% endfor %}{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    dims = tiny.TinyShape(
        "shapes demo Llama 3.2 Vision",
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_global_layers=1,
                    attention_heads=4, max_num_tiles=1, supported_aspect_ratios=[[1, 1]], vision_output_dim=256,
                    intermediate_layers_indices=[1]),
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=7, num_attention_heads=4,
                  num_key_value_heads=1, cross_attention_layers=[1, 3, 5], max_position_embeddings=256),
        image_size=72, patch_size=24,
    )
    align_cosine = True
    # Cross-attention gives the image states no positions: where a shape is must be in its state. The first run
    # (5 layers, cross-attention in 1 and 3; 4000 + 8000 steps, tower frozen in stage 2) scored 63.4% held-out,
    # `where` 7.8%, left_of 40%, caption 36%: the aligned states said what was in a cell, not where. A linear
    # cell-index probe in stage 1 made it worse (54.9%; shapes per cell 95% instead of 99.6%). Here stage 1 puts
    # the row and column words into each state, beside the shape and colour words, so that the decoder can copy
    # where as it copies what: 83.8% held-out (4000 + 10000 steps, tower frozen; where 68.9%, its errors mostly the
    # column word (top left <-> top), left_of 51.2% (chance), caption 86.8%, the rest 96-100%). Training the tower
    # in stage 2 too, at a fifth of the rate, for 14000 steps, learnt slower (loss 0.43 at step 7600 against 0.19
    # at step 5000 with the tower frozen) and was stopped. The relations (left_of) are what cross-attention without
    # positions finds hard at this size; they needed more examples: 20000 steps with where, left_of and caption drawn
    # more often (--kinds) scored 95.8% (where 92.2, left_of 85.5), and 3000 more steps on a fresh stream weighted
    # to where and left_of (--init) 97.8% (where 92.8, left_of 97.6): the shipped shapes-mllama (its card has both
    # commands).
    align_positions = True
    freeze_tower = True

    def __init__(self, image_size: int | None = None, patch_size: int | None = None):
        super().__init__(image_size, patch_size)
        self.n_image = (self.dims.image_size // self.dims.patch_size) ** 2  # patch states, one per cell

    def model(self):
        from transformers import MllamaForConditionalGeneration

        return MllamaForConditionalGeneration(self.config)  # gates at 0, as transformers starts them

    def batch(self, examples):
        batch = super().batch(examples)
        n = len(examples)
        batch["pixel_values"] = batch["pixel_values"][:, None, None]  # [batch, images, tiles, 3, H, W]
        batch["aspect_ratio_ids"] = torch.ones(n, 1, dtype=torch.long)
        batch["aspect_ratio_mask"] = torch.ones(n, 1, 1, dtype=torch.long)
        image = self.tok.token_to_id(self.family.IMAGE)
        seen = (batch["input_ids"] == image).long().cumsum(1) > 0  # from the image's token on (one image)
        batch["cross_attention_mask"] = (seen & (batch["attention_mask"] == 1)).long()[:, :, None, None]
        return batch

    def vision_parts(self, model):
        parts = self.family.split(model)
        return _OneTile(parts.vision_encoder), _CellStates(model.model.multi_modal_projector)

    def projector_output(self, model):
        layer = model.model.multi_modal_projector
        return [layer.weight, layer.bias]


class _CellTokens(torch.nn.Module):
    """Florence-2's projector output without its last, pooled token: one token per grid cell, row by row."""

    def __init__(self, projector, cells: int):
        super().__init__()
        self.projector, self.cells = projector, cells

    def forward(self, features):
        return self.projector(features)[:, : self.cells]


class Florence2Recipe(ChatRecipe):
    """Florence-2 at the demo size: a two-stage DaViT whose 72x72 input becomes a 3x3 feature map (8- then 3-pixel
    strides: one position per cell), the projector's 9 cell tokens and one pooled token; a BART encoder-decoder of
    3 + 3 layers. The encoder reads [image tokens, <s>, question, </s>] with its own positions; the decoder
    generates the answer from <\s><s> (decoder start, forced BOS) over cross-attention. Stage 1 aligns the cell
    tokens with the (shared, tied) word embeddings of each cell's shape and colour."""

    family_name = "florence2"
    chat_template = ""  # none: the processor's fixed format
    # The first run (1500 + 7000 steps, cells aligned with shape and colour words only) scored 90.9% held-out:
    # where 75.4%, left_of 89.2%, caption 92.2%, count 92.8%, colour 98.2%, exists 97.6% (loss still falling). As
    # for Llama 3.2 Vision, stage 1 here also aligns each cell with its row and column words, and stage 2 runs longer
    # (14000 steps): 98.9% held-out (where 100%, left_of 99.4%, caption 96.4%), the shipped shapes-florence2.
    align_positions = True
    dims = tiny.TinyShape(
        "shapes demo Florence-2",
        vision=dict(depths=[1, 2], patch_size=[8, 3], patch_stride=[8, 3], patch_padding=[0, 0],
                    patch_prenorm=[False, True], embed_dim=[64, 128], num_heads=[2, 4], num_groups=[2, 4],
                    window_size=3, drop_path_rate=0.0, max_position_embeddings=3, max_temporal_embeddings=1),
        text=dict(d_model=128, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=384, decoder_ffn_dim=384, max_position_embeddings=128),
        image_size=72, patch_size=24,
    )

    def __init__(self, image_size: int | None = None, patch_size: int | None = None):
        super().__init__(image_size, patch_size)
        self.ids = {"<pad>": self.tok.token_to_id("<pad>"), "<bos>": self.tok.token_to_id("<s>"),
                    "<eos>": self.tok.token_to_id("</s>")}

    @property
    def cells(self) -> int:
        return (self.dims.image_size // self.dims.patch_size) ** 2

    def card_dims(self, cfg) -> tuple[str, str]:
        v, t = cfg.vision_config, cfg.text_config
        return (f"DaViT depths {list(v.depths)}, widths {list(v.embed_dim)}",
                f"BART {t.encoder_layers}+{t.decoder_layers} layers x {t.d_model} ({t.decoder_attention_heads} heads)")

    def batch(self, examples):
        """The encoder's source as the processor gives it; labels <s> answer </s>, from which the model makes the
        decoder's input (decoder start first), so that it learns the answer after <\s><s> as it generates."""
        sources = [self._prompt(ex.prompt, ex.image)["input_ids"] for ex in examples]
        answers = [[self.ids["<bos>"], *self.tok.encode(ex.answer, add_special_tokens=False).ids, self.ids["<eos>"]]
                   for ex in examples]
        ids = torch.full((len(sources), max(map(len, sources))), self.ids["<pad>"], dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full((len(answers), max(map(len, answers))), -100, dtype=torch.long)
        for i, (src, ans) in enumerate(zip(sources, answers)):
            ids[i, : len(src)] = torch.tensor(src)
            mask[i, : len(src)] = 1
            labels[i, : len(ans)] = torch.tensor(ans)
        pixels = torch.from_numpy(np.concatenate([preprocess(ex.image, self.pre) for ex in examples]))
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)

    def vision_parts(self, model):
        parts = self.family.split(model)
        return parts.vision_encoder, _CellTokens(parts.projector, self.cells)

    def projector_output(self, model):
        norm = model.model.multi_modal_projector.image_proj_norm  # the projector ends in a LayerNorm
        return [norm.weight, norm.bias]

    def save(self, model, out: Path) -> None:
        self.family.save_checkpoint(model.eval(), self.tok, out)


RECIPES = {"paligemma": PaliGemmaRecipe, "llava": LlavaRecipe, "gemma3": Gemma3Recipe, "smolvlm": SmolVLMRecipe,
           "qwen2_vl": Qwen2VLRecipe, "internvl": InternVLRecipe, "mllama": MllamaRecipe, "florence2": Florence2Recipe}
