"""PaliGemma (1 and 2): SigLIP vision tower, linear projector, Gemma / Gemma 2 decoder.

Split:
    vision_encoder  model.model.vision_tower -> last_hidden_state [B, 256, 1152]
    projector       model.model.multi_modal_projector (Linear) -> [B, 256, hidden]
    embed_tokens    language_model.embed_tokens (Gemma scales by sqrt(hidden) inside)
    decoder         language_model + lm_head (+ final logit soft-capping on Gemma 2)

Prompt: "<image>" * 256 + "<bos>" + prompt + "\\n", as PaliGemmaProcessor builds it.
The whole prompt (image and text) attends bidirectionally; generated tokens
are causal. Positions are 1-indexed.
"""

from __future__ import annotations

from pathlib import Path


from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import image_processor_config, pixel_fields
from mmedge.exporters.family import Description, LastHiddenState, Parts, SoftcapHead, decoder_fields, description
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("paligemma",)
ALIASES = {
    "paligemma": "google/paligemma-3b-mix-224",
    "paligemma-448": "google/paligemma-3b-mix-448",
    "paligemma2": "google/paligemma2-3b-mix-224",
}


def split(model) -> Parts:
    cfg = model.config
    text = cfg.text_config
    size = cfg.vision_config.image_size
    sliding = getattr(text, "sliding_window", None) is not None
    return Parts(
        vision_encoder=LastHiddenState(model.model.vision_tower),
        projector=model.model.multi_modal_projector,
        head=SoftcapHead(model.lm_head, getattr(text, "final_logit_softcapping", None)),
        image_size=(size, size),
        **decoder_fields(model.model.language_model, text),
        mask_names=("attention_mask", "sliding_attention_mask") if sliding else ("attention_mask",),
        mask_arg=(lambda m: {"full_attention": m[0], "sliding_attention": m[1]}) if sliding else (lambda m: m[0]),
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    size = pre.get("size", {})
    height = size.get("height", cfg.vision_config.image_size)
    width = size.get("width", cfg.vision_config.image_size)
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    image_token = "<image>"
    image_token_id = cfg.image_token_id
    if tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
        image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre),
            height=height,
            width=width,
        ),
        prompt=PromptSpec(
            template="{image}{bos}{prompt}\n",
            image_token=image_token,
            image_token_id=image_token_id,
            image_seq_len=pre.get("image_seq_length", patches),
        ),
        schemes=SchemeSpec(
            positions="linear",
            position_offset=1,
            attention="prefix_bidirectional",
            image_placement="replace_image_tokens",
            sliding_window=getattr(cfg.text_config, "sliding_window", None),
            boxes="loc1024_yxyx",  # "detect cat ; dog" -> <loc..>x4 cat ; <loc..>x4 dog
            detect_prompt="detect {objects}",
        ),
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # Gemma decoder, grouped-query attention (4 heads, 2 KV heads), 16 image tokens
    "paligemma-gqa": tiny.TinyShape(
        "tiny random PaliGemma (Gemma decoder, GQA)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        image_size=32, patch_size=8,
    ),
    # Gemma decoder, multi-query attention like the real 3B (1 KV head), wider heads, 36 image tokens
    "paligemma-mqa": tiny.TinyShape(
        "tiny random PaliGemma (Gemma decoder, MQA)",
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3),
        text=dict(model_type="gemma", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        image_size=48, patch_size=8, seed=1,
    ),
    # PaliGemma 2: Gemma 2 decoder with sliding-window layers and logit soft-capping
    "paligemma2-sliding": tiny.TinyShape(
        "tiny random PaliGemma 2 (Gemma 2 decoder, sliding window 24)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24,
                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16),
        image_size=32, patch_size=8, seed=2,
    ),
}

# PaliGemma's processor expects these in the vocabulary (detection / segmentation tokens)
EXTRA_TOKENS = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    return tiny.build_tokenizer(EXTRA_TOKENS, vocab_size=vocab_size, corpus=corpus)


def tiny_config(shape: tiny.TinyShape, tok):
    """A PaliGemmaConfig of `shape` whose vocabulary and special ids fit tokenizer `tok`."""
    from transformers import PaliGemmaConfig

    ids = tiny.token_ids(tok)
    text = tiny.text_config(shape, tok)
    return PaliGemmaConfig(
        vision_config=dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size,
                           projection_dim=text["hidden_size"], model_type="siglip_vision_model",
                           vision_use_head=False),  # as in PaliGemma: the pooling head is unused
        text_config=text,
        image_token_index=ids[tiny.IMAGE_TOKEN],
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
    )


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration(tiny_config(shape, tok))


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with a PaliGemma processor (tokenizer + image settings) beside it."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    vision = model.config.vision_config
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok)
    image_processor = SiglipImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf_tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
