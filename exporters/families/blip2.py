"""BLIP-2 with OPT: a ViT, the Q-Former (learned queries cross-attending to the image), a language projection, and
OPT reading the queries' outputs as the prompt's first embeddings.

Split (today's contract, image placement "replace_image_tokens"):
    vision_encoder  vision_model -> last hidden state (after its post-LayerNorm) [B, patches + 1, vision_hidden]
    projector       the Q-Former over the learned query tokens, cross-attending to those states, then
                    language_projection -> image_embeds [B, num_query_tokens, hidden]
    embed_tokens    OPT's token table (BLIP-2's OPTs are as wide as their tables: no project_in)
    decoder         OPT's decoder (learned positions, offset 2 inside, from position_ids) + lm_head

Prompt: "<image>" x num_query_tokens, then the text as the tokenizer encodes it (with OPT's BOS, "</s>"), as
Blip2Processor builds it. BLIP-2 with Flan-T5 (an encoder-decoder language model: the queries and the prompt go
through the T5 encoder) is refused with one line: its decoder's relative position bias is not written yet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmedge.errors import ExportError
from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import CLIP_MEAN, CLIP_STD, image_processor_config, pixel_fields, processor_config
from mmedge.exporters.family import Description, LastHiddenState, Parts, description
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("blip-2",)
ALIASES = {"blip2-opt": "Salesforce/blip2-opt-2.7b"}


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
    if not model.config.use_decoder_only_language_model:
        raise ExportError(f"BLIP-2 with {model.config.text_config.model_type} (an encoder-decoder language model) is "
                          "not supported yet; BLIP-2 with OPT is")


def split(model) -> Parts:
    _check(model)
    cfg, text = model.config, model.config.text_config
    decoder = model.language_model.model.decoder
    size = cfg.vision_config.image_size
    return Parts(
        vision_encoder=LastHiddenState(model.vision_model),
        projector=QFormerProjector(model),
        embed_tokens=decoder.embed_tokens,
        text_model=OPTStack(decoder),
        head=model.language_model.lm_head,
        image_size=(size, size),
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
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(**pixel_fields(pre, mean=CLIP_MEAN, std=CLIP_STD),
                                  height=size.get("height", side), width=size.get("width", side)),
        prompt=PromptSpec(
            template="{image}{bos}{prompt}",
            image_token=tokenizer.convert_ids_to_tokens(cfg.image_token_index),
            image_token_id=cfg.image_token_index,
            image_seq_len=proc.get("num_query_tokens", cfg.num_query_tokens),
        ),
        schemes=SchemeSpec(positions="linear", attention="causal"),
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
}


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A byte-level BPE with OPT's BOS convention: the tokenizer puts "<bos>" first, as GPT2Tokenizer with
    add_bos_token does for OPT."""
    from tokenizers import processors

    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    ids = tiny.token_ids(tok)
    text = tiny.text_config(shape, tok)
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
    hf_tok = tiny.hf_tokenizer(tok)  # Blip2Processor adds "<image>" (already in the vocabulary) as its own token
    side = model.config.vision_config.image_size
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": side, "width": side}),
                               tokenizer=hf_tok, num_query_tokens=model.config.num_query_tokens)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
