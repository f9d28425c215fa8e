"""IDEFICS (the open Flamingo): a CLIP tower, a perceiver resampler, and gated cross-attention layers every N
decoder layers.

Split (image placement "cross_attention", docs/package-format.md):
    vision_encoder  vision_model: pixel_values [B, 3, 224, 224] -> last_hidden_state [B, 257, vision_dim]
    projector       perceiver_resampler (where the config uses it: -> [B, n_latents, vision_dim]), then each
                    gated cross-attention layer's k_proj / v_proj: cross_key_{j} / cross_value_{j}
                    [B, heads, image positions, head_dim], once per image
    embed_tokens    the decoupled embedding (text vocabulary + the extra image tokens' rows)
    decoder         IdeficsModel's decoder layers with their gated cross-attention layers + the decoupled
                    lm_head; the cross-attention layers read the given keys and values (patched in while the
                    decoder is traced: IdeficsAttention computes them from the image states on every call in
                    transformers) under the model's own key norm, mask and gates

Prompt: IDEFICS has no chat template. Its instruct format is the default, "User:" + the image + the text +
"<end_of_utterance>\\nAssistant:", as IdeficsProcessor builds it from ["User:", image, text...]: each image is
"<fake_token_around_image><image><fake_token_around_image>", images in a row sharing the fake token between
them, the user's text stripped of spaces at both ends. A raw prompt places each image at its "<image>" marker.
A token sees only the last image before it (cross mask "last_image", IdeficsProcessor's
image_attention_mask), none after an end-of-sequence token until the next image; tokens that see none get no
cross-attention output (the model's gate). Preprocessing: IdeficsImageProcessorPil (bicubic resize to the
square image size, CLIP normalisation).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from mmedge.exporters import family, tiny
from mmedge.exporters.checkpoint import image_processor_config, pixel_fields
from mmedge.exporters.family import Description, LastHiddenState, Parts, generation_defaults, special_tokens
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("idefics",)
ALIASES = {"idefics-9b": "HuggingFaceM4/idefics-9b-instruct"}
FAKE, IMAGE, END = "<fake_token_around_image>", "<image>", "<end_of_utterance>"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class CrossKV(torch.nn.Module):
    """Image states [B, 257, D] -> (perceiver ->) each gated cross-attention layer's keys and values
    [B, heads, positions, head_dim], before the key norm (the model applies it to what it reads)."""

    def __init__(self, resampler, cross_attentions):
        super().__init__()
        self.resampler, self.attentions = resampler, torch.nn.ModuleList(cross_attentions)

    def forward(self, image_features):
        with matmul_perceiver():
            states = self.resampler(image_features) if self.resampler is not None else image_features
        batch = states.shape[0]
        out = []
        for attn in self.attentions:
            for proj in (attn.k_proj, attn.v_proj):
                out.append(proj(states).view(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2))
        return tuple(out)


def _perceiver_attention(self, context, latents):
    """IdeficsPerceiverAttention.forward with its two einsums as matmuls (coremltools mis-converts the
    ellipsis einsum); the same products."""
    context = self.context_layer_norm(context)
    latents = self.latents_layer_norm(latents)
    batch = context.shape[0]
    q = self.q_proj(latents)
    k = self.k_proj(torch.cat([context, latents], dim=-2))
    v = self.v_proj(torch.cat([context, latents], dim=-2))
    q, k, v = [x.reshape(batch, x.shape[1], self.n_heads, self.head_dim).transpose(1, 2) for x in (q, k, v)]
    if self.qk_layer_norms:
        q = self.q_layer_norm(q)
        k = self.k_layer_norm(k)
    scores = torch.matmul(q * self.qk_scale, k.transpose(-1, -2))
    attn = (scores - scores.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
    return self.output_proj(torch.matmul(attn, v).transpose(1, 2).flatten(-2))


@contextmanager
def matmul_perceiver():
    """While the projector runs: the perceiver's attention as `_perceiver_attention`."""
    from transformers.models.idefics import perceiver

    original = perceiver.IdeficsPerceiverAttention.forward
    perceiver.IdeficsPerceiverAttention.forward = _perceiver_attention
    try:
        yield
    finally:
        perceiver.IdeficsPerceiverAttention.forward = original


class _Given(torch.nn.Module):
    """Stands in for a cross-attention k_proj / v_proj: returns the given [B, heads, L, head_dim] laid out as the
    projection's output [B, L, heads x head_dim], whatever it is called with."""

    def __init__(self, states):
        super().__init__()
        self.states = states

    def forward(self, _):
        batch, heads, length, dim = self.states.shape
        return self.states.transpose(1, 2).reshape(batch, length, heads * dim)


@contextmanager
def given_keys_and_values(attentions, kv):
    """Each cross-attention's k_proj / v_proj replaced by the given keys and values while the model runs."""
    saved = [(attn.k_proj, attn.v_proj) for attn in attentions]
    try:
        for attn, key, value in zip(attentions, kv[0::2], kv[1::2]):
            attn.k_proj, attn.v_proj = _Given(key), _Given(value)
        yield
    finally:
        for attn, (k, v) in zip(attentions, saved):
            attn.k_proj, attn.v_proj = k, v


@contextmanager
def broadcast_where():
    """torch.where with 0-d value tensors broadcast to the condition's shape first (the same result): coremltools
    takes the rank of IdeficsModel's `torch.where(mask, torch.full((), 0.0), min)` from its 0-d value and then
    fails on the reduction over the mask's last axis."""
    where = torch.where

    def broadcast(condition, *values, **kwargs):
        if len(values) == 2:
            values = tuple(v.expand(condition.shape) if isinstance(v, torch.Tensor) and v.dim() == 0 else v
                           for v in values)
        return where(condition, *values, **kwargs)

    torch.where = broadcast
    try:
        yield
    finally:
        torch.where = where


class TextModel(torch.nn.Module):
    """IdeficsModel as a decoder stack over given image keys and values: the image states it would project are
    a stand-in of the right length (one "image" of one position per key position, so the runtime's mask maps one
    to one), and the projections return the given keys and values."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.attentions = [layer.cross_attn for layer in model.gated_cross_attn_layers]
        self.config = model.config

    def forward(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, cross_mask, cross_kv):
        key = cross_kv[0]
        batch, length = key.shape[0], key.shape[2]
        stand_in = key.new_zeros(batch * length, 1, 1)  # [images (= positions), positions per image, width]
        states = {"perceiver_embeddings" if self.config.use_resampler else "image_encoder_embeddings": stand_in}
        with given_keys_and_values(self.attentions, cross_kv), broadcast_where():
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=use_cache, image_attention_mask=(cross_mask[:, 0] == 0).long(),
                              **states)


def split(model) -> Parts:
    cfg = model.config
    inner = model.model
    attentions = [layer.cross_attn for layer in inner.gated_cross_attn_layers]
    size = cfg.vision_config.image_size
    return Parts(
        vision_encoder=LastHiddenState(inner.vision_model),
        projector=CrossKV(inner.perceiver_resampler if cfg.use_resampler else None, attentions),
        embed_tokens=inner.embed_tokens,
        text_model=TextModel(inner),
        head=model.lm_head,
        image_size=(size, size),
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size + cfg.additional_vocab_size,
        cross_attention=len(attentions),
        cross_arg=family.mask_and_kv,
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    size = (pre.get("size") or {}).get("height") or pre.get("image_size") or cfg.vision_config.image_size
    return Description(
        preprocess=PreprocessSpec(**pixel_fields(pre, resample=3, mean=CLIP_MEAN, std=CLIP_STD),
                                  height=size, width=size),
        prompt=PromptSpec(
            template="{bos}User:{image}{prompt}" + END + "\nAssistant:",
            image_token=IMAGE,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
            image_seq_len=1,
            image_marker=IMAGE,
            image_expansion=f"{FAKE}{IMAGE}{FAKE}",
            merge_adjacent=FAKE,
            strip_prompt=" ",
        ),
        schemes=SchemeSpec(positions="linear", attention="causal", image_placement="cross_attention",
                           cross_mask="last_image"),
        special_tokens=special_tokens(model, tokenizer),
        generation=generation_defaults(model),
        max_position_embeddings=cfg.max_position_embeddings,
    )


def reference_processor(checkpoint: Path):
    """IdeficsProcessor called as the runtime formats a prompt: processor(images=..., text=...) builds
    ["User:", *images, text + "<end_of_utterance>\\nAssistant:"] (its own images-and-text call would put the text
    after the image with no turn format)."""
    from transformers import AutoProcessor

    return _InstructProcessor(AutoProcessor.from_pretrained(checkpoint))


class _InstructProcessor:
    def __init__(self, processor):
        self.processor, self.tokenizer, self.image_processor = processor, processor.tokenizer, processor.image_processor
        self.chat_template = None

    def __call__(self, images=None, text="", return_tensors="pt", **kwargs):
        pictures = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        turn = text.strip(" ") + END + "\nAssistant:"
        items = ["User:", *pictures, turn] if pictures else ["User:" + turn]  # no image: one text item
        return self.processor(text=[items], return_tensors=return_tensors, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # a perceiver of 4 latents, gated cross-attention before layers 0 and 2 of 4, key/query norms
    "idefics-perceiver": tiny.TinyShape(
        "tiny random IDEFICS (perceiver resampler, cross-attention every 2 layers)",
        vision=dict(embed_dim=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        image_size=32, patch_size=8,
        extra=dict(cross_layer_interval=2, qk_layer_norms=True, use_resampler=True,
                   perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1,
                                         resampler_n_heads=2, resampler_head_dim=16)),
    ),
}


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.add_special_tokens([FAKE, END])
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import IdeficsConfig

    ids = tiny.token_ids(tok)
    text = dict(shape.text, vocab_size=tiny.vocab_size(shape, tok), pad_token_id=ids["<pad>"],
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], max_position_embeddings=512)
    vision = dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size)
    return IdeficsConfig(vision_config=vision, **text, **shape.extra)


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import IdeficsForVisionText2Text

    model = IdeficsForVisionText2Text(tiny_config(shape, tok))
    with torch.no_grad():  # the gates start at 0: the image would change nothing
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("alpha_cross_attn", "alpha_dense"):
                p.uniform_(0.5, 1.5)
    return model


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with an IdeficsProcessor (PIL image processor, tokenizer)."""
    from transformers import IdeficsImageProcessorPil, IdeficsProcessor, PreTrainedTokenizerFast

    cfg = model.config
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(cfg, key))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                     unk_token="<unk>", additional_special_tokens=[FAKE, IMAGE, END])
    size = cfg.vision_config.image_size
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(size={"height": size, "width": size},
                                                                          image_mean=list(CLIP_MEAN),
                                                                          image_std=list(CLIP_STD)),
                                 tokenizer=hf_tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
