"""What a family file provides, and how families are found.

A family is one module in mmedge/exporters/families/ with:

    MODEL_TYPES = ("paligemma",)          # config.json model_type values it handles
    ALIASES = {"paligemma": "google/..."}  # short names -> Hub ids (optional)
    def split(model) -> Parts
    def describe(model, checkpoint: Path, tokenizer) -> Description
    def load(checkpoint: Path) -> torch model   # optional: `load_pretrained` when absent
    KIND = "embedding"                     # optional: a dual encoder (CLIP, SigLIP), whose split() gives
                                           # EncoderParts and describe() an EmbeddingDescription
    def has_encoder(config: dict) -> bool  # optional: whether this checkpoint (its config.json) is an
                                           # encoder-decoder (Parts.encoder: an `encoder` graph): Florence-2,
                                           # Whisper; BLIP-2 with Flan-T5, not with OPT. Absent: it is not
    TAKES = "audio"                        # optional: the packages read audio, not images (Whisper)

The exporter turns `Parts` into graphs and `Description` into manifest
fields; the runtime never sees the family code. Families are discovered by
scanning this package, so adding one is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType, SimpleNamespace
from typing import Callable

import torch

from mmedge.manifest import (AudioSpec, EmbeddingSpec, GenerationDefaults, PreprocessSpec, PromptSpec, SchemeSpec,
                             SpecialTokens)


@dataclass
class Parts:
    """The torch modules of a VLM, each exported as its own graph.

    vision_encoder: pixel_values [B,3,H,W] -> image_features
    projector: image_features -> image_embeds [B, n_img_tokens, hidden]
    embed_tokens: input_ids [B,S] -> inputs_embeds [B,S,hidden]
    text_model: a transformers decoder stack called with inputs_embeds, a
        ready-made 4-D additive mask (or what `mask_arg` builds from the masks),
        position_ids and a cache object; returns last_hidden_state
    head: hidden states -> logits (lm_head plus any final soft-capping)
    """

    vision_encoder: object
    projector: object
    embed_tokens: object
    text_model: object
    head: object
    image_size: tuple[int, int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    mask_names: tuple[str, ...] = ("attention_mask",)
    mask_arg: Callable = field(default=lambda masks: masks[0])
    position_rows: int = 1  # 3: position_ids [3, B, S] (multimodal rotary, scheme "mrope"), else [B, S]
    # the vision scheme "patch_grid": the vision encoder takes patches [N, patch_dim] and the per-patch indices
    # of runtimes/schemes.vision_inputs; {"patch_dim": int, "merge_size": int, "window": int | None}
    patch_grid: dict | None = None
    deepstack_layers: int = 0  # k > 0: the decoder takes deepstack_embeds [k, B, S, hidden] (Qwen3-VL's DeepStack)
    # cross-attention families (image placement "cross_attention": Llama 3.2 Vision, IDEFICS): how many layers
    # attend to the images. The projector then returns each one's image keys and values, [B, kv_heads, image
    # positions, head_dim] (cross_key_{j} / cross_value_{j}), which the decoder takes as inputs
    cross_attention: int = 0
    # where the text model reads them from its cache (Llama 3.2 Vision): the indices, in the model's layer
    # numbering, of its cross-attention layers; every other layer is a self-attention layer with a slot in the
    # KV cache (num_layers counts those). Empty: the text model takes them through `cross_arg` (IDEFICS)
    cross_layers: tuple[int, ...] = ()
    # the text model's keyword arguments for the runtime's cross mask [B, 1, S, L] (additive: 0 where a token sees
    # an image position), rows [B, 1, S, 1] (1 where a token sees any image, else 0) and the keys and values
    # (key_0, value_0, key_1, ...)
    cross_arg: Callable | None = None
    # vision inputs beyond pixel_values, computed by the runtime from each image's grid (scheme "tile_canvas":
    # aspect_ratio_ids [B] and aspect_ratio_mask [B, tiles])
    tile_canvas: dict | None = None
    # encoder-decoder families (scheme encoder "prompt": Florence-2): inputs_embeds [B, S, hidden] of the spliced
    # prompt -> each decoder layer's cross-attention keys and values (cross_key_{j} / cross_value_{j}, [B, heads,
    # S, head_dim]), run once per prompt; the decoder takes them as a cross-attention family's do. encoder_length:
    # the most tokens it takes (its positions)
    encoder: object = None
    encoder_length: int = 0
    # an encoder over features instead of embeddings (scheme encoder "audio": Whisper): their fixed shape beside the
    # batch, (mels, frames); the encoder graph then takes input_features [B, mels, frames]
    encoder_input: tuple | None = None


class EncoderKV(torch.nn.Module):
    """An encoder stack over inputs_embeds (or audio features: `input_name`), then each decoder layer's cross-attention k_proj / v_proj over its
    output, [B, heads, S, head_dim] (BART-style attention modules: Florence-2, Whisper)."""

    def __init__(self, encoder, cross_attentions, input_name: str = "inputs_embeds"):
        super().__init__()
        self.encoder, self.attentions = encoder, torch.nn.ModuleList(cross_attentions)
        self.input_name = input_name

    def forward(self, inputs):
        states = self.encoder(**{self.input_name: inputs}).last_hidden_state
        out = []
        for attn in self.attentions:
            shape = (*states.shape[:-1], -1, attn.head_dim)
            out += [attn.k_proj(states).view(shape).transpose(1, 2), attn.v_proj(states).view(shape).transpose(1, 2)]
        return tuple(out)


def mask_and_kv(mask, rows, kv) -> dict:
    """Parts.cross_arg of a text model that takes the cross mask and the keys and values as `cross_mask` /
    `cross_kv` and derives whether a token sees anything from the mask (no `rows`): IDEFICS, and the encoder-
    decoder stacks, whose every token sees the whole source."""
    return {"cross_mask": mask, "cross_kv": kv}


class _GivenLayer:
    def __init__(self, keys, values):
        self.keys, self.values, self.is_initialized = keys, values, True


def encoder_decoder_cache(self_cache, cross_kv: tuple):
    """A transformers EncoderDecoderCache as an encoder-decoder's layers read it after the first step: the self-
    attention part is `self_cache` (graphs' duck-typed caches), the cross-attention part holds the given keys and
    values (key_0, value_0, key_1, ...) and is marked filled, so no layer projects the encoder's states again."""
    from transformers.cache_utils import EncoderDecoderCache

    class Given(EncoderDecoderCache):
        def __init__(self):  # no super().__init__: nothing of a real cache is made
            self.self_attention_cache = self_cache
            self.cross_attention_cache = SimpleNamespace(layers=[_GivenLayer(cross_kv[i], cross_kv[i + 1])
                                                                 for i in range(0, len(cross_kv), 2)])
            self.is_updated = dict.fromkeys(range(len(cross_kv) // 2), True)

        def get_seq_length(self, layer_idx: int = 0):
            return self_cache.get_seq_length(layer_idx)

    return Given()


class LastHiddenState(torch.nn.Module):
    """A vision tower called with pixel_values, its last hidden state out (SigLIP towers: PaliGemma, Gemma 3)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values):
        return self.tower(pixel_values=pixel_values).last_hidden_state


class SoftcapHead(torch.nn.Module):
    """lm_head, then Gemma 2/3's final logit soft-capping (tanh(x / cap) * cap) when the config sets a cap."""

    def __init__(self, lm_head, softcap: float | None):
        super().__init__()
        self.lm_head, self.softcap = lm_head, softcap

    def forward(self, hidden):
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def load_pretrained(checkpoint):
    """The checkpoint's transformers model in fp32 with eager attention (what export traces and verifies against)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def decoder_fields(language_model, text) -> dict:
    """The Parts fields a transformers decoder stack and its text config give: the token embedding, the stack,
    layers, KV heads, head size, width and vocabulary."""
    return dict(embed_tokens=language_model.embed_tokens, text_model=language_model,
                num_layers=text.num_hidden_layers, num_kv_heads=text.num_key_value_heads,
                head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                hidden_size=text.hidden_size, vocab_size=text.vocab_size)


def image_only(processor_class):
    """`processor_class` built without its video processor (transformers builds those on torchvision, which does
    not import beside the CPU torch): the image path and the prompt expansion as they are."""

    class ImageOnlyProcessor(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyProcessor


def special_tokens(model, tokenizer) -> SpecialTokens:
    """BOS / EOS / PAD as the checkpoint generates: EOS from generation_config, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return SpecialTokens(bos_id=tokenizer.bos_token_id, bos=tokenizer.bos_token,
                         eos_ids=[eos] if isinstance(eos, int) else list(eos or []), pad_id=tokenizer.pad_token_id)


def decoder_start_ids(model) -> list[int]:
    """An encoder-decoder's first decoder tokens: decoder_start_token_id, then the BOS that generation forces (the
    generation config's forced_bos_token_id), if it does."""
    gen = model.generation_config
    start = gen.decoder_start_token_id
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.text_config.decoder_start_token_id
    forced = getattr(gen, "forced_bos_token_id", None)
    return [int(start)] + ([int(forced)] if forced is not None else [])


def generation_defaults(model) -> GenerationDefaults:
    return GenerationDefaults(max_new_tokens=min(64, getattr(model.generation_config, "max_new_tokens", None) or 64))


@dataclass
class EncoderParts:
    """The torch modules of a dual encoder (package kind "embedding"), each exported as its own graph.

    vision_encoder: pixel_values [B,3,H,W] -> image_embeds [B, dim], L2-normalised
    text_encoder: input_ids [B,S] -> text_embeds [B, dim], L2-normalised
    """

    vision_encoder: object
    text_encoder: object
    image_size: tuple[int, int]
    dim: int
    vocab_size: int
    text_length: int  # the most tokens a text takes (the text model's positions)
    eos_id: int | None = None  # a token the text encoder pools at (CLIP), placed in the traced and checked ids


class Normalized(torch.nn.Module):
    """A module's output (a tensor, or a transformers output's pooler_output), through `projection` if given,
    divided by its L2 norm over the last axis: an embedding as CLIP and SigLIP compare them."""

    def __init__(self, module, projection=None):
        super().__init__()
        self.module, self.projection = module, projection

    def forward(self, x):
        out = self.module(x)
        out = getattr(out, "pooler_output", out)
        if self.projection is not None:
            out = self.projection(out)
        return out / out.norm(p=2, dim=-1, keepdim=True)


@dataclass
class EmbeddingDescription:
    """Run-time facts a dual-encoder family hands to the manifest."""

    preprocess: PreprocessSpec
    embedding: EmbeddingSpec


@dataclass
class Description:
    """Run-time facts a family hands to the manifest."""

    preprocess: PreprocessSpec | None  # None: a family that reads audio (`audio`)
    prompt: PromptSpec
    schemes: SchemeSpec
    special_tokens: SpecialTokens
    generation: GenerationDefaults
    max_position_embeddings: int
    chat_template: str | None = None  # Jinja source, written into the package when prompt.mode is "chat"
    audio: AudioSpec | None = None  # scheme encoder "audio": the features the runtime computes


def description(model, tokenizer, **fields) -> Description:
    """A Description whose special tokens, generation defaults and context length come from the model as every
    family takes them; `fields` are the family's own (preprocess, prompt, schemes, chat_template; a
    max_position_embeddings for a decoder whose config has none: relative positions)."""
    if "max_position_embeddings" not in fields:
        fields["max_position_embeddings"] = model.config.text_config.max_position_embeddings
    return Description(special_tokens=special_tokens(model, tokenizer), generation=generation_defaults(model),
                       **fields)


@cache
def families() -> dict[str, ModuleType]:
    """model_type -> family module, for every file in mmedge.exporters.families."""
    from mmedge.exporters import families as package

    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if not hasattr(module, "load"):
            module.load = load_pretrained
        for model_type in getattr(module, "MODEL_TYPES", ()):
            found[model_type] = module
    return found


def family_for(model_type: str) -> ModuleType | None:
    return families().get(model_type)


def aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for module in set(families().values()):
        out.update(getattr(module, "ALIASES", {}))
    return out
