"""Tiny random checkpoints, built offline from configs: for tests and first runs.

Each is a real transformers checkpoint (config.json, safetensors, tokenizer,
preprocessor config) saved with save_pretrained, with random weights from a
fixed seed, so export exercises the same loading path as a downloaded model.
Their output is gibberish by construction; the trained demo model is the one
that answers questions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
IMAGE_TOKEN = "<image>"
# PaliGemma's processor expects these in the vocabulary (detection / segmentation tokens)
PALIGEMMA_EXTRA = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]

_WORDS = (
    "a an the this that is are was on in under over left right of with and or what where how many which "
    "color shape red orange yellow green blue cyan purple pink white black gray brown circle square triangle "
    "star cat dog car tree house person sky cloud road water boat plane bird flower table chair cup "
    "caption describe answer detect segment en fr de es question image picture photo small big large tiny "
    "one two three four five six seven eight nine ten yes no there here near far top bottom middle"
).split()


@dataclass
class TinyShape:
    description: str
    vision: dict
    text: dict
    image_size: int
    patch_size: int
    seed: int = 0
    extra: dict = field(default_factory=dict)
    vocab_size: int | None = None  # default: the tokenizer's size rounded up to 64
    sharp_init: bool = True  # False: transformers' own init (std 0.02), for sizes where sharp weights blow up


SHAPES = {
    # Gemma decoder, grouped-query attention (4 heads, 2 KV heads), 16 image tokens
    "paligemma-gqa": TinyShape(
        "tiny random PaliGemma (Gemma decoder, GQA)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        image_size=32, patch_size=8,
    ),
    # Gemma decoder, multi-query attention like the real 3B (1 KV head), wider heads, 36 image tokens
    "paligemma-mqa": TinyShape(
        "tiny random PaliGemma (Gemma decoder, MQA)",
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3),
        text=dict(model_type="gemma", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        image_size=48, patch_size=8, seed=1,
    ),
    # PaliGemma 2: Gemma 2 decoder with sliding-window layers and logit soft-capping
    "paligemma2-sliding": TinyShape(
        "tiny random PaliGemma 2 (Gemma 2 decoder, sliding window 24)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24,
                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16),
        image_size=32, patch_size=8, seed=2,
    ),
}

# name -> shape, for `mmedge export --model <name>`
BUILTIN = {
    "tiny-paligemma": SHAPES["paligemma-gqa"],
    # for speed measurements: a decoder of SmolLM2-135M's size and vocabulary (random weights, ~190M
    # parameters with the untied LM head) behind a small vision tower; its outputs mean nothing
    "paligemma-135m-shaped": TinyShape(
        "random PaliGemma with a SmolLM2-135M-sized decoder (for speed measurements)",
        vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3),
        text=dict(model_type="gemma", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64),
        image_size=224, patch_size=14, seed=3, vocab_size=49152, sharp_init=False,
    ),
}


def build_tokenizer(extra_tokens: list[str], vocab_size: int = 384, corpus: list[str] | None = None):
    """A byte-level BPE trained on `corpus` (default: a small fixed word salad); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if corpus is None:
        corpus = [" ".join(_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(12)) for i in range(400)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([IMAGE_TOKEN])
    tok.add_tokens(extra_tokens)
    return tok


def paligemma_config(shape: TinyShape, tok):
    """A PaliGemmaConfig of `shape` whose vocabulary and special ids fit tokenizer `tok`."""
    from transformers import PaliGemmaConfig

    vocab = shape.vocab_size or (tok.get_vocab_size() + 63) // 64 * 64
    ids = {t: tok.token_to_id(t) for t in [*SPECIAL, IMAGE_TOKEN]}
    text = dict(
        dict(max_position_embeddings=512, tie_word_embeddings=False),
        **shape.text,
        vocab_size=vocab,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
    )
    return PaliGemmaConfig(
        vision_config=dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size,
                           projection_dim=text["hidden_size"], model_type="siglip_vision_model",
                           vision_use_head=False),  # as in PaliGemma: the pooling head is unused
        text_config=text,
        image_token_index=ids[IMAGE_TOKEN],
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
    )


def save_paligemma_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with a PaliGemma processor (tokenizer + image settings) beside it."""
    from transformers import PaliGemmaProcessor, PreTrainedTokenizerFast, SiglipImageProcessorPil

    vision = model.config.vision_config
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(model.config.text_config, key))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf_tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_paligemma(shape: TinyShape, out: Path) -> Path:
    """Build and save a random PaliGemma checkpoint of `shape` to `out`."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    tok = build_tokenizer(PALIGEMMA_EXTRA)
    torch.manual_seed(shape.seed)
    model = PaliGemmaForConditionalGeneration(paligemma_config(shape, tok)).eval()
    with torch.no_grad():
        if not shape.sharp_init:
            return save_paligemma_checkpoint(model, tok, out)
        # Default init gives near-uniform logits and a model that repeats one token.
        # Sharp attention and small embeddings make the output depend on the whole
        # context, so a wrong position, mask or cache entry changes the tokens.
        for name, p in model.named_parameters():
            if p.dim() > 1:
                std = 0.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.2
                p.normal_(0.0, 0.02 if "embed_tokens" in name else std)
    return save_paligemma_checkpoint(model, tok, out)


def cache_dir() -> Path:
    return Path(os.environ.get("MMEDGE_CACHE", Path.home() / ".cache" / "mmedge"))


def materialize(name: str) -> Path:
    """The checkpoint of built-in model `name`, built on first use."""
    out = cache_dir() / "builtin" / name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        save_paligemma(BUILTIN[name], stage)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
