"""Tiny random checkpoints, built offline from configs: for tests and first runs.

Each is a real transformers checkpoint (config.json, safetensors, tokenizer,
preprocessor config) saved with save_pretrained, with random weights from a
fixed seed, so export exercises the same loading path as a downloaded model.
Their output is gibberish by construction; the trained demo model is the one
that answers questions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
IMAGE_TOKEN = "<image>"

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
    family: str = "paligemma"  # the family file that builds it (set from where the shape is declared)
    dtype: str = "float32"  # the weights' type in the saved checkpoint ("float16": as 7B checkpoints ship)


def shapes() -> dict[str, TinyShape]:
    """Every family's tiny test shapes (a family file's TINY_SHAPES), by name."""
    from mmedge.exporters.family import families

    out: dict[str, TinyShape] = {}
    for module in dict.fromkeys(families().values()):
        for name, shape in getattr(module, "TINY_SHAPES", {}).items():
            out[name] = dataclasses.replace(shape, family=module.__name__.rsplit(".", 1)[-1])
    return out


# name -> shape, for `mmedge export --model <name>`
BUILTIN = {
    "tiny-paligemma": "paligemma-gqa",
    "tiny-clip": "clip-tiny",
    "tiny-siglip": "siglip-tiny",
    # for speed measurements: a decoder of SmolLM2-135M's size and vocabulary (random weights, ~190M
    # parameters with the untied LM head) behind a small vision tower; its outputs mean nothing
    "paligemma-135m-shaped": TinyShape(
        "random PaliGemma with a SmolLM2-135M-sized decoder (for speed measurements)",
        vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3),
        text=dict(model_type="gemma", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64),
        image_size=224, patch_size=14, seed=3, vocab_size=49152, sharp_init=False,
    ),
    # for benchmarks (tools/bench_peers.py): the published SmolVLM-256M-Instruct architecture (SigLIP
    # 768x12 at 512 px, patch 16, pixel shuffle 4 -> 64 image tokens; SmolLM2-135M decoder, untied LM
    # head, vocab 49280), random weights, one 512 x 512 tile (splitting off)
    "smolvlm-256m-shaped": TinyShape(
        "random SmolVLM-256M-Instruct architecture, image splitting off (for benchmarks)",
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                  max_position_embeddings=8192, tie_word_embeddings=False),
        image_size=512, patch_size=16, seed=3, vocab_size=49280, sharp_init=False,
        extra=dict(scale_factor=4, longest_edge=512, splitting=False), family="idefics3",
    ),
    # for speed measurements of the 3-D-position decoders: a Qwen2-VL with a SmolLM2-135M-sized decoder (random
    # weights, ~190M parameters) behind a small vision tower, images up to 448 x 448 (256 tokens)
    "qwen2vl-135m-shaped": TinyShape(
        "random Qwen2-VL with a SmolLM2-135M-sized decoder (for speed measurements)",
        vision=dict(depth=4, embed_dim=192, num_heads=3, mlp_ratio=4),
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, mrope_section=[8, 12, 12], max_position_embeddings=4096),
        image_size=448, patch_size=14, seed=3, vocab_size=49152, sharp_init=False, family="qwen2_vl",
        extra=dict(model_type="qwen2_vl", min_pixels=56 * 56, max_pixels=448 * 448),
    ),
    # for scale (tools/scale.py, docs/scale.md): google/paligemma-3b-mix-224's architecture, 2.92B parameters
    # (SigLIP-So400m 1152x27 at 224 px, 256 image tokens; Gemma-2B decoder, 18 layers, MQA, head 256, vocab
    # 257216, tied LM head), random weights, saved in float32 (11.7 GB on disk, built on first use)
    "paligemma-3b-shaped": TinyShape(
        "random PaliGemma-3B architecture, 2.9B parameters, float32 (for scale measurements)",
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
        text=dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                  num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192),
        image_size=224, patch_size=14, seed=3, vocab_size=257216, sharp_init=False,
    ),
    # Qwen/Qwen2.5-VL-3B-Instruct's architecture, 3.75B parameters (ViT 1280x32, window attention over 112-pixel
    # windows with full attention in blocks 7/15/23/31, 2x2 merger; Qwen2.5-3B decoder, 36 layers, 16 heads, 2 KV
    # heads, vocab 151936, tied LM head), random weights, saved in bfloat16 as the published checkpoint is (7.5 GB
    # on disk, built on first use); images up to 1280 tokens as export allows by default
    "qwen2.5-vl-3b-shaped": TinyShape(
        "random Qwen2.5-VL-3B-Instruct architecture, 3.8B parameters, bfloat16 (for scale measurements)",
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], rope_theta=1000000.0,
                  max_position_embeddings=128000, tie_word_embeddings=True, rms_norm_eps=1e-6),
        image_size=448, patch_size=14, seed=3, vocab_size=151936, sharp_init=False, family="qwen2_vl",
        extra=dict(model_type="qwen2_5_vl", min_pixels=56 * 56, max_pixels=1280 * 28 * 28), dtype="bfloat16",
    ),
    # for benchmarks (tools/bench_peers.py --model qwen2-vl-2b-shaped): Qwen/Qwen2-VL-2B-Instruct's architecture,
    # 2.2B parameters (ViT 1280x32, 2x2 merger to 1536; Qwen2-1.5B decoder, 28 layers, 12 heads, 2 KV heads, vocab
    # 151936, tied LM head), random weights, saved in bfloat16 as the published checkpoint is (4.4 GB on disk, built
    # on first use); images up to 448 x 448 (256 tokens) to keep the export's checks at several sizes short
    "qwen2-vl-2b-shaped": TinyShape(
        "random Qwen2-VL-2B-Instruct architecture, 2.2B parameters, bfloat16 (for benchmarks)",
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], rope_theta=1000000.0,
                  max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6),
        image_size=448, patch_size=14, seed=3, vocab_size=151936, sharp_init=False, family="qwen2_vl",
        extra=dict(model_type="qwen2_vl", min_pixels=56 * 56, max_pixels=448 * 448), dtype="bfloat16",
    ),
    # for measuring how a cross-attention decoder takes its image keys and values (tools/bench_cross.py): Llama 3.2
    # Vision's text geometry at a smaller width (8 layers, cross-attention in 3 and 7, 8 heads of 128, as 11B has
    # 8 KV heads of 128) and its image size (4 tiles of 448 px / 14: 4100 image positions) behind a small tower
    "mllama-cross-shaped": TinyShape(
        "random Llama 3.2 Vision geometry, 8 x 1024 decoder, 4 tiles of 448 px (for cross-attention measurements)",
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                    attention_heads=2, max_num_tiles=4, vision_output_dim=128, intermediate_layers_indices=[0]),
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, cross_attention_layers=[3, 7], max_position_embeddings=2048),
        image_size=448, patch_size=14, sharp_init=False, family="mllama",
    ),
    # for benchmarks (tools/bench_embed.py): openai/clip-vit-base-patch16's architecture, 150M parameters (ViT-B/16
    # at 224 px, 768 x 12; text tower 512 x 12, 77 positions, vocab 49408; projections to 512), random weights
    "clip-vit-b16-shaped": TinyShape(
        "random CLIP ViT-B/16 architecture, 150M parameters (for benchmarks)",
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                  max_position_embeddings=77),
        image_size=224, patch_size=16, seed=3, vocab_size=49408, sharp_init=False, family="clip",
        extra=dict(projection_dim=512),
    ),
    # llava-hf/llava-1.5-7b-hf's architecture, 7.06B parameters (CLIP ViT-L/14 at 336 px, layer -2, 576 image
    # tokens; Llama-2-7B decoder, 32 layers, MHA, vocab 32064), random weights, saved in float16 as the
    # published checkpoint is (14.1 GB on disk, built on first use)
    "llava-1.5-7b-shaped": TinyShape(
        "random LLaVA-1.5-7B architecture, 7.1B parameters, float16 (for scale measurements)",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        image_size=336, patch_size=14, seed=3, vocab_size=32064, sharp_init=False, family="llava",
        extra=dict(vision_feature_layer=-2, vision_feature_select_strategy="default"), dtype="float16",
    ),
}


def default_corpus() -> list[str]:
    """The default corpus tiny tokenizers are trained on: a small fixed word salad."""
    return [" ".join(_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(12)) for i in range(400)]


def build_tokenizer(extra_tokens: list[str], vocab_size: int = 384, corpus: list[str] | None = None,
                    special: list[str] = SPECIAL):
    """A byte-level BPE trained on `corpus` (default: a small fixed word salad), `special` its first ids;
    deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if corpus is None:
        corpus = default_corpus()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([IMAGE_TOKEN])
    tok.add_tokens(extra_tokens)
    return tok


def vocab_size(shape: TinyShape, tok) -> int:
    return shape.vocab_size or (tok.get_vocab_size() + 63) // 64 * 64


def token_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in [*SPECIAL, IMAGE_TOKEN]}


def text_config(shape: TinyShape, tok, text: dict | None = None, **fields) -> dict:
    """The text config of `shape` (or of `text`, a family's edited copy of shape.text) with a vocabulary and
    special ids that fit tokenizer `tok`; untied, 512 positions unless the shape says otherwise."""
    ids = token_ids(tok)
    return dict(dict(max_position_embeddings=512, tie_word_embeddings=False), **(shape.text if text is None else text),
                vocab_size=vocab_size(shape, tok), pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                eos_token_id=ids["<eos>"], **fields)


def hf_tokenizer(tok, **extra):
    """`tok` as a transformers fast tokenizer with the shared special tokens named."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", **extra)


def copy_special_ids(model) -> None:
    """generate() stops and pads with the text config's ids."""
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(model.config.text_config, key))


def save(shape: TinyShape | str, out: Path) -> Path:
    """Build and save a random checkpoint of `shape` (or a shape's name) with its family's builder."""
    import torch

    from mmedge.exporters.family import families

    if isinstance(shape, str):
        shape = shapes()[shape]
    family = next(m for m in families().values() if m.__name__.endswith("." + shape.family))
    tok = family.tiny_tokenizer()
    torch.manual_seed(shape.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, shape.dtype))  # built in the saved type: a 7B model never in fp32
    try:
        model = family.tiny_model(shape, tok).eval()
    finally:
        torch.set_default_dtype(default)
    if shape.sharp_init:
        sharpen(model)
    return family.save_checkpoint(model, tok, out)


def sharpen(model) -> None:
    """Default init gives near-uniform logits and a model that repeats one token. Sharp attention and
    small embeddings make the output depend on the whole context, so a wrong position, mask or cache
    entry changes the tokens."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                std = 0.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.2
                p.normal_(0.0, 0.02 if "embed_tokens" in name else std)


def builtin_shape(name: str) -> TinyShape:
    spec = BUILTIN[name]
    return shapes()[spec] if isinstance(spec, str) else spec


def cache_dir() -> Path:
    from mmedge.manifest import user_cache_dir

    return user_cache_dir()


def materialize(name: str) -> Path:
    """The checkpoint of built-in model `name`, built on first use."""
    out = cache_dir() / "builtin" / name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger(__name__).info("building the random checkpoint %s into %s (first use only)", name, out)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        save(builtin_shape(name), stage)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
