"""LLaVA-1.5: CLIP vision tower (a selected hidden layer), two-layer MLP projector, Llama decoder.

Split:
    vision_encoder  CLIP vision tower -> hidden state(s) of `vision_feature_layer` (several layers are
                    concatenated), CLS dropped with the "default" select strategy: [B, 576, 1024]
    projector       multi_modal_projector (Linear, GELU, Linear) -> [B, 576, hidden]
    embed_tokens    language_model.embed_tokens
    decoder         language_model (Llama) + lm_head

Prompt: the checkpoint's chat template ("USER: <image>\\n{text} ASSISTANT:" for llava-1.5-hf), with
the tokenizer's BOS added; each "<image>" becomes the image token repeated once per image
embedding, as LlavaProcessor expands it. Attention is causal over the whole sequence; positions
start at 0. Preprocessing: CLIP's shortest-edge resize and centre crop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import (
    CLIP_MEAN, CLIP_STD, chat_template, image_processor_config, pixel_fields, processor_config,
)
from mmedge.exporters.family import Description, Parts, decoder_fields, description
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("llava",)
ALIASES = {"llava-1.5": "llava-hf/llava-1.5-7b-hf"}


class _VisionEncoder(torch.nn.Module):
    """pixel_values -> the selected hidden layer(s) of the tower, as LlavaModel.get_image_features selects them."""

    def __init__(self, tower, layer, strategy: str):
        super().__init__()
        self.tower, self.layers, self.drop_cls = tower, [layer] if isinstance(layer, int) else list(layer), strategy == "default"

    def forward(self, pixel_values):
        states = self.tower(pixel_values, output_hidden_states=True).hidden_states
        chosen = [states[i][:, 1:] if self.drop_cls else states[i] for i in self.layers]
        return chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)


def split(model) -> Parts:
    cfg = model.config
    text = cfg.text_config
    crop = cfg.vision_config.image_size
    return Parts(
        vision_encoder=_VisionEncoder(model.model.vision_tower, cfg.vision_feature_layer,
                                      cfg.vision_feature_select_strategy),
        projector=model.model.multi_modal_projector,
        head=model.lm_head,
        image_size=(crop, crop),
        **decoder_fields(model.model.language_model, text),
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    proc = processor_config(checkpoint)
    vision = cfg.vision_config
    crop = pre.get("crop_size") or {"height": vision.image_size, "width": vision.image_size}
    shortest = (pre.get("size") or {}).get("shortest_edge", vision.image_size)
    patch = proc.get("patch_size", vision.patch_size)
    n_image = (crop["height"] // patch) * (crop["width"] // patch) + proc.get("num_additional_image_tokens", 0)
    if cfg.vision_feature_select_strategy == "default":
        n_image -= 1
    image_token = proc.get("image_token", "<image>")
    template = chat_template(checkpoint)
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre, mean=CLIP_MEAN, std=CLIP_STD),
            height=crop["height"],
            width=crop["width"],
            resize_mode="shortest_edge",
            shortest_edge=shortest,
            do_center_crop=pre.get("do_center_crop", True),
        ),
        prompt=PromptSpec(
            template="{bos}USER: {image}\n{prompt} ASSISTANT:",  # LLaVA-1.5's format, if the checkpoint has no template
            image_token=image_token,
            image_token_id=cfg.image_token_id,
            image_seq_len=n_image,
            mode="chat" if template else "template",
            image_marker=image_token,
        ),
        schemes=SchemeSpec(positions="linear", position_offset=0, attention="causal"),
        chat_template=template,
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # llava-1.5's layout: penultimate layer, CLS dropped, one extra token counted then removed; GQA Llama
    "llava-gqa": tiny.TinyShape(
        "tiny random LLaVA-1.5 (CLIP layer -2, Llama decoder, GQA)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2),
        text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
        image_size=32, patch_size=8, extra=dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    ),
    # two feature layers concatenated, CLS kept ("full"), multi-head attention, non-square inputs cropped
    "llava-full-multilayer": tiny.TinyShape(
        "tiny random LLaVA (CLIP layers -3 and -1 with CLS, Llama decoder, MHA)",
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3),
        text=dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=3, num_key_value_heads=3),
        image_size=40, patch_size=8, seed=1,
        extra=dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"),
    ),
}

# llava-hf/llava-1.5-*-hf's chat template (images first, then the text; "ASSISTANT:" as generation prompt)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A BPE whose post-processor adds BOS, as Llama's tokenizer does."""
    from tokenizers import processors

    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import LlavaConfig

    ids = tiny.token_ids(tok)
    text = tiny.text_config(shape, tok)
    vision = dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size,
                  model_type="clip_vision_model", projection_dim=text["hidden_size"])
    n_patches = (shape.image_size // shape.patch_size) ** 2
    strategy = shape.extra.get("vision_feature_select_strategy", "default")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids[tiny.IMAGE_TOKEN],
                       projector_hidden_act="gelu", image_seq_length=n_patches + (strategy == "full"),
                       pad_token_id=ids["<pad>"], **shape.extra)


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(tiny_config(shape, tok))


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with a LlavaProcessor (CLIP preprocessing, chat template) beside it."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    cfg = model.config
    vision = cfg.vision_config
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": vision.image_size},
                                            crop_size={"height": vision.image_size, "width": vision.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=vision.patch_size,
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                               chat_template=CHAT_TEMPLATE, image_token=tiny.IMAGE_TOKEN, num_additional_image_tokens=1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
