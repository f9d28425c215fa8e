"""BLIP-2: a ViT, the Q-Former (learned queries cross-attending to the image), a language projection, then OPT
reading the queries' outputs as the prompt's first embeddings, or Flan-T5 reading them, with the prompt, in its
encoder (an encoder-decoder: scheme encoder "prompt").

Split with OPT (today's contract, image placement "replace_image_tokens"):
    vision_encoder  vision_model -> last hidden state (after its post-LayerNorm) [B, patches + 1, vision_hidden]
    projector       the Q-Former over the learned query tokens, cross-attending to those states, then
                    language_projection -> image_embeds [B, num_query_tokens, hidden]
    embed_tokens    OPT's token table (BLIP-2's OPTs are as wide as their tables: no project_in)
    decoder         OPT's decoder (learned positions, offset 2 inside, from position_ids) + lm_head

Prompt: "<image>" x num_query_tokens, then the text as the tokenizer encodes it (with OPT's BOS, "</s>"), as
Blip2Processor builds it.

With Flan-T5 the same vision encoder and projector; then
    encoder         the T5 encoder over [query embeddings + the prompt's tokens + "</s>"] (relative position bias,
                    bidirectional), then each decoder block's cross-attention k / v -> cross keys and values
    decoder         the T5 decoder stack: its relative position bias computed from position_ids (queries at their
                    positions, keys at the cache's slots then the new tokens), cross-attention over the given keys
                    and values, final norm; lm_head (after the tied embeddings' d_model ** -0.5 scaling)
and the decoder starts from decoder_start_token_id (the pad token).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from mmedge.errors import ExportError
from mmedge.exporters import family, tiny
from mmedge.exporters.checkpoint import CLIP_MEAN, CLIP_STD, image_processor_config, pixel_fields, processor_config
from mmedge.exporters.family import (Description, EncoderKV, LastHiddenState, Parts, decoder_start_ids, description,
                                     encoder_decoder_cache)
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("blip-2",)
ALIASES = {"blip2-opt": "Salesforce/blip2-opt-2.7b", "blip2-flan-t5": "Salesforce/blip2-flan-t5-xl"}


def has_encoder(config: dict) -> bool:
    """An encoder-decoder (an `encoder` graph the quantization plan covers) with Flan-T5, not with OPT."""
    return config.get("text_config", {}).get("model_type") == "t5"


class QFormerProjector(torch.nn.Module):
    """Vision states [B, N, D] -> the Q-Former's query outputs (the learned queries attending to the states) ->
    language_projection: [B, num_query_tokens, hidden]."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens, self.qformer = model.query_tokens, model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_features):
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        # no masks: every query sees every state, as with transformers' all-ones masks (whose construction
        # coremltools cannot convert)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_features,
                           return_dict=True).last_hidden_state
        return self.language_projection(out)


class OPTStack(torch.nn.Module):
    """OPTDecoder called with position ids (it would otherwise count them from a 2-D mask) and the runtime's 4-D
    mask."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, attention_mask, position_ids, cache, use_cache):
        return self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=use_cache)


def _check(model) -> None:
    text = model.config.text_config.model_type
    if text not in ("opt", "t5"):
        raise ExportError(f"BLIP-2 with {text} is not supported; BLIP-2 with OPT or Flan-T5 is")


class _T5Cross(torch.nn.Module):
    """A T5 cross-attention's key and value projections under the names EncoderKV reads."""

    def __init__(self, attn):
        super().__init__()
        self.k_proj, self.v_proj, self.head_dim = attn.k, attn.v, attn.key_value_proj_dim


class T5DecoderStack(torch.nn.Module):
    """T5's decoder stack over the runtime's inputs. The self-attention's relative position bias is computed here from
    position_ids: the keys are the cache's slots (slot i holds position i) then the new tokens at their positions,
    which holds for a preallocated buffer (whose length says nothing of the position) and for engine state alike."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, cross_mask, cross_kv):
        s = self.stack
        first = s.block[0].layer[0].SelfAttention
        n, keys = inputs_embeds.shape[1], attention_mask.shape[-1]
        slots = torch.arange(keys - n, device=position_ids.device).expand(position_ids.shape[0], -1)
        relative = torch.cat([slots, position_ids], 1)[:, None, :] - position_ids[:, :, None]  # [B, n, keys]
        bucket = first._relative_position_bucket(relative, bidirectional=False,
                                                 num_buckets=first.relative_attention_num_buckets,
                                                 max_distance=first.relative_attention_max_distance)
        bias = first.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # [B, heads, n, keys]
        both = encoder_decoder_cache(cache, cross_kv)
        hidden = inputs_embeds
        for block in s.block:  # encoder_hidden_states: any tensor, to take the cross-attention path; not read
            hidden = block(hidden, attention_mask=attention_mask, position_bias=bias, encoder_hidden_states=cross_kv[0],
                           encoder_attention_mask=cross_mask, cache=both)[0]
        return SimpleNamespace(last_hidden_state=s.final_layer_norm(hidden))


class _ScaledHead(torch.nn.Module):
    def __init__(self, lm_head, scale: float):
        super().__init__()
        self.lm_head, self.scale = lm_head, scale

    def forward(self, hidden):
        return self.lm_head(hidden * self.scale)


def _t5_split(model, parts: dict) -> Parts:
    t5 = model.language_model
    text = model.config.text_config
    scale = text.d_model ** -0.5 if getattr(text, "scale_decoder_outputs", text.tie_word_embeddings) else 1.0
    return Parts(
        **parts,
        embed_tokens=t5.shared,
        text_model=T5DecoderStack(t5.decoder),
        head=_ScaledHead(t5.lm_head, scale),
        num_layers=text.num_decoder_layers,
        num_kv_heads=text.num_heads,
        head_dim=text.d_kv,
        hidden_size=text.d_model,
        vocab_size=text.vocab_size,
        cross_attention=text.num_decoder_layers,
        cross_arg=family.mask_and_kv,
        encoder=EncoderKV(t5.encoder, [_T5Cross(block.layer[1].EncDecAttention) for block in t5.decoder.block]),
        encoder_length=T5_SOURCE,
    )


# the most tokens the T5 encoder takes (relative positions have no table to bound it; Flan-T5 was trained at 512)
T5_SOURCE = 512


def split(model) -> Parts:
    _check(model)
    cfg, text = model.config, model.config.text_config
    size = cfg.vision_config.image_size
    vision = dict(vision_encoder=LastHiddenState(model.vision_model), projector=QFormerProjector(model),
                  image_size=(size, size))
    if text.model_type == "t5":
        return _t5_split(model, vision)
    decoder = model.language_model.model.decoder
    return Parts(
        **vision,
        embed_tokens=decoder.embed_tokens,
        text_model=OPTStack(decoder),
        head=model.language_model.lm_head,
        num_layers=text.num_hidden_layers,
        num_kv_heads=text.num_attention_heads,
        head_dim=text.hidden_size // text.num_attention_heads,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    _check(model)
    cfg = model.config
    pre = image_processor_config(checkpoint)
    proc = processor_config(checkpoint)
    size = pre.get("size") or {}
    side = cfg.vision_config.image_size
    t5 = cfg.text_config.model_type == "t5"
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(**pixel_fields(pre, mean=CLIP_MEAN, std=CLIP_STD),
                                  height=size.get("height", side), width=size.get("width", side)),
        prompt=PromptSpec(
            # T5's tokenizer ends a text with EOS; OPT's starts it with BOS
            template="{image}{prompt}" + tokenizer.eos_token if t5 else "{image}{bos}{prompt}",
            image_token=tokenizer.convert_ids_to_tokens(cfg.image_token_index),
            image_token_id=cfg.image_token_index,
            image_seq_len=proc.get("num_query_tokens", cfg.num_query_tokens),
            decoder_start_ids=decoder_start_ids(model.language_model) if t5 else None,
        ),
        schemes=SchemeSpec(positions="linear", attention="causal", encoder="prompt" if t5 else None,
                           encoder_length=T5_SOURCE if t5 else None),
        **({"max_position_embeddings": T5_SOURCE} if t5 else {}),  # relative positions: no table bounds them
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # ViT 2 x 32 at 32 px (16 patches), Q-Former 2 layers with 8 queries, OPT 2 x 64
    "blip2-opt": tiny.TinyShape(
        "tiny random BLIP-2 with OPT (Q-Former, learned queries)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                  word_embed_proj_dim=64, max_position_embeddings=256),
        image_size=32, patch_size=8,
        extra=dict(qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                encoder_hidden_size=32), num_query_tokens=8),
    ),
    # the same vision side and 6 queries; Flan-T5's gated-GELU T5, 2 + 2 blocks of 64, 8 relative-position buckets
    # (max distance 16: positions beyond it share buckets), untied LM head
    "blip2-flan-t5": tiny.TinyShape(
        "tiny random BLIP-2 with Flan-T5 (Q-Former; T5 encoder-decoder)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        image_size=32, patch_size=8, seed=1,
        extra=dict(qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                encoder_hidden_size=32), num_query_tokens=6),
    ),
}


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A byte-level BPE (<pad> 0, <eos> 1 as T5 numbers them); save_checkpoint gives it the language model's
    convention for special tokens."""
    return tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)


def _conventions(tok, text_type: str) -> None:
    """OPT's tokenizer puts BOS first (GPT2Tokenizer with add_bos_token); T5's puts EOS last."""
    from tokenizers import processors

    token = "<bos>" if text_type == "opt" else "<eos>"
    single = f"{token} $A" if text_type == "opt" else f"$A {token}"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(token, tok.token_to_id(token))])


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    ids = tiny.token_ids(tok)
    text = tiny.text_config(shape, tok)
    if text["model_type"] == "t5":  # T5 starts its decoder from the pad token
        text = {k: v for k, v in text.items() if k != "max_position_embeddings"}
        text.update(decoder_start_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    extra = dict(shape.extra)
    cfg = Blip2Config(vision_config=dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size),
                      qformer_config=extra.pop("qformer"), text_config=text, image_token_index=ids[tiny.IMAGE_TOKEN],
                      **extra)
    model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers starts the queries at zero: every query would read the image alike
        model.query_tokens.normal_(0.0, 1.0)
    return model


def save_checkpoint(model, tok, out: Path) -> Path:
    from transformers import Blip2Processor, BlipImageProcessorPil

    tiny.copy_special_ids(model)
    _conventions(tok, model.config.text_config.model_type)
    hf_tok = tiny.hf_tokenizer(tok)  # Blip2Processor adds "<image>" (already in the vocabulary) as its own token
    side = model.config.vision_config.image_size
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": side, "width": side}),
                               tokenizer=hf_tok, num_query_tokens=model.config.num_query_tokens)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
