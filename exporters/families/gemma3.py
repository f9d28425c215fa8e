"""Gemma 3 (4B and up, with vision): SigLIP, average-pool projector with soft tokens, Gemma 3 decoder.

Split:
    vision_encoder  SigLIP vision tower -> last_hidden_state [B, 4096, 1152] (896 px, patch 14)
    projector       multi_modal_projector: average pool to mm_tokens_per_image (256) soft tokens,
                    RMSNorm, projection -> [B, 256, hidden]
    embed_tokens    language_model.embed_tokens (scaled by sqrt(hidden) inside)
    decoder         language_model (sliding-window and global layers, two RoPE bases) + lm_head
                    (+ final logit soft-capping when the config sets it)

Prompt: the checkpoint's chat template ("<bos><start_of_turn>user\\n<start_of_image>{text}<end_of_turn>\\n
<start_of_turn>model\\n"); each "<start_of_image>" becomes "\\n\\n<start_of_image>" + 256 image soft
tokens + "<end_of_image>\\n\\n", as Gemma3Processor expands it. Attention: causal, except that the
image soft tokens of one image see each other whole ("image_bidirectional"); on sliding layers the
window still applies. Positions start at 0.
"""

from __future__ import annotations

from pathlib import Path


from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import chat_template, image_processor_config, pixel_fields
from mmedge.exporters.family import Description, LastHiddenState, Parts, SoftcapHead, decoder_fields, description
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("gemma3",)
ALIASES = {"gemma3-4b": "google/gemma-3-4b-it"}
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


def split(model) -> Parts:
    cfg = model.config
    text = cfg.text_config
    size = cfg.vision_config.image_size
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or [])
    return Parts(
        vision_encoder=LastHiddenState(model.model.vision_tower),
        projector=model.model.multi_modal_projector,
        head=SoftcapHead(model.lm_head, getattr(text, "final_logit_softcapping", None)),
        image_size=(size, size),
        **decoder_fields(model.model.language_model, text),
        mask_names=("attention_mask", "sliding_attention_mask") if sliding else ("attention_mask",),
        mask_arg=(lambda m: {"full_attention": m[0], "sliding_attention": m[1]}) if sliding
        else (lambda m: {"full_attention": m[0]}),
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    size = pre.get("size") or {}
    template = chat_template(checkpoint)
    boi = getattr(tokenizer, "boi_token", None) or BOI
    eoi = getattr(tokenizer, "eoi_token", None) or EOI
    sliding = "sliding_attention" in (getattr(cfg.text_config, "layer_types", None) or [])
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre, resample=2),
            height=size.get("height", cfg.vision_config.image_size),
            width=size.get("width", cfg.vision_config.image_size),
        ),
        prompt=PromptSpec(
            # Gemma 3's turn format, for a checkpoint without a chat template
            template="{bos}<start_of_turn>user\n\n\n" + boi + "{image}" + eoi + "\n\n{prompt}<end_of_turn>\n"
                     "<start_of_turn>model\n",
            image_token=tokenizer.convert_ids_to_tokens(cfg.image_token_id),
            image_token_id=cfg.image_token_id,
            image_seq_len=cfg.mm_tokens_per_image,
            mode="chat" if template else "template",
            image_marker=boi,
            image_expansion=f"\n\n{boi}{{image}}{eoi}\n\n",
        ),
        schemes=SchemeSpec(positions="linear", position_offset=0, attention="image_bidirectional",
                           sliding_window=cfg.text_config.sliding_window if sliding else None),
        chat_template=template,
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # sliding and global layers (window 20 < prompt length), GQA, 16 soft tokens pooled from 64 patches
    "gemma3-sliding": tiny.TinyShape(
        "tiny random Gemma 3 (sliding + global layers, GQA)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=20, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
        image_size=32, patch_size=4, extra=dict(mm_tokens_per_image=16),
    ),
    # global layers only, multi-query attention, soft-capped logits, 4 soft tokens
    "gemma3-global-mqa": tiny.TinyShape(
        "tiny random Gemma 3 (global layers, MQA, logit soft-capping)",
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, final_logit_softcapping=30.0,
                  layer_types=["full_attention"] * 3),
        image_size=24, patch_size=4, seed=5, extra=dict(mm_tokens_per_image=4),
    ),
}

# The user-turn part of google/gemma-3-*-it's chat template
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.add_special_tokens([BOI, EOI, SOFT, "<start_of_turn>", "<end_of_turn>"])
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import Gemma3Config

    ids = tiny.token_ids(tok)
    text = tiny.text_config(shape, tok)
    vision = dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size,
                  model_type="siglip_vision_model", vision_use_head=False)
    return Gemma3Config(vision_config=vision, text_config=text, image_token_id=tok.token_to_id(SOFT),
                        boi_token_id=tok.token_to_id(BOI), eoi_token_id=tok.token_to_id(EOI),
                        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], **shape.extra)


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration(tiny_config(shape, tok))


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with a Gemma3Processor (tokenizer with image tokens, chat template) beside it."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    cfg = model.config
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok, extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})
    size = cfg.vision_config.image_size
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=hf_tok, chat_template=CHAT_TEMPLATE,
                                image_seq_length=cfg.mm_tokens_per_image)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
