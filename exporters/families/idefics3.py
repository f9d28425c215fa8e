"""Idefics3 and SmolVLM (v1: model type idefics3; SmolVLM2: smolvlm): SigLIP-style vision with image
splitting, pixel-shuffle connector, Llama decoder.

Split:
    vision_encoder  vision_model (one tile per batch row, every patch real) -> last_hidden_state
                    [tiles, (M/p)^2, Dv]; M = the tile size (512 for SmolVLM-256M/500M)
    projector       connector: pixel shuffle by scale_factor, then a bias-free Linear -> [tiles, 64, hidden]
    embed_tokens    text_model.embed_tokens
    decoder         text_model (Llama) + lm_head

Preprocessing ("longest_edge"): the longer side to size.longest_edge, then with do_image_splitting
tiles of M x M row by row plus the whole image squashed to one tile, else one M x M square; Lanczos.
Prompt: the checkpoint's chat template; each "<image>" becomes, per tile,
"<fake_token_around_image><row_r_col_c>" + image tokens, a newline after each row of tiles, then
"\\n<fake_token_around_image><global-img>" + image tokens + "<fake_token_around_image>" (layout "tiles").
Attention causal, positions from 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import chat_template, image_processor_config, pixel_fields, processor_config
from mmedge.exporters.family import Description, Parts, decoder_fields, description
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("idefics3", "smolvlm")
ALIASES = {
    "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "smolvlm-500m": "HuggingFaceTB/SmolVLM-500M-Instruct",
    "smolvlm2-256m": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "idefics3-8b": "HuggingFaceM4/Idefics3-8B-Llama3",
}
FAKE, GLOBAL, IMAGE, END = "<fake_token_around_image>", "<global-img>", "<image>", "<end_of_utterance>"


class _VisionEncoder(torch.nn.Module):
    """The vision model for full tiles.

    The runtime never pads a tile, so every patch is real and the upstream
    position ids (bucketized fractional coordinates, for NaViT-style padded
    inputs) are exactly 0..n_patches-1: added here directly. The upstream
    bucketize over `arange(1/n, 1, 1/n)` also traces to a boundary tensor
    whose length ONNX recomputes differently when 1/n is inexact (n = 6).
    """

    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values):
        vm = self.vision_model
        patches = vm.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        # the embedding module called (not its weight read): export reads weights module by module (lazy.py)
        ids = torch.arange(patches.shape[1], device=patches.device)
        hidden = patches + vm.embeddings.position_embedding(ids)[None]
        hidden = vm.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return vm.post_layernorm(hidden)


def split(model) -> Parts:
    cfg = model.config
    text = cfg.text_config
    size = cfg.vision_config.image_size
    return Parts(
        vision_encoder=_VisionEncoder(model.model.vision_model),
        projector=model.model.connector,
        head=model.lm_head,
        image_size=(size, size),
        **decoder_fields(model.model.text_model, text),
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    proc = processor_config(checkpoint)
    vision = cfg.vision_config
    tile = (pre.get("max_image_size") or {}).get("longest_edge", vision.image_size)
    n_image = proc.get("image_seq_len") or int((vision.image_size // vision.patch_size) ** 2 / cfg.scale_factor ** 2)
    fake = getattr(tokenizer, "fake_image_token", None) or FAKE
    glob = getattr(tokenizer, "global_image_token", None) or GLOBAL
    image = getattr(tokenizer, "image_token", None) or IMAGE
    template = chat_template(checkpoint)
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre, resample=1),
            height=tile,
            width=tile,
            resize_mode="longest_edge",
            longest_edge=(pre.get("size") or {}).get("longest_edge", 4 * tile),
            tile_size=tile,
            do_image_splitting=pre.get("do_image_splitting", True),
        ),
        prompt=PromptSpec(
            # SmolVLM's turn format, for a checkpoint without a chat template
            template="<|im_start|>User:" + IMAGE + "{prompt}" + END + "\nAssistant:",
            image_token=image,
            image_token_id=cfg.image_token_id,
            image_seq_len=n_image,
            mode="chat" if template else "template",
            image_marker=image,
            image_expansion=f"{fake}{glob}{{image}}{fake}",
            image_layout="tiles",
            tile_expansion=fake + "<row_{row}_col_{col}>{image}",
        ),
        schemes=SchemeSpec(positions="linear", position_offset=0, attention="causal"),
        chat_template=template,
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # SmolVLM2 with image splitting: longest edge 64, tiles of 32 -> up to 2x2 tiles + the global image
    "smolvlm-tiles": tiny.TinyShape(
        "tiny random SmolVLM (image splitting on, pixel shuffle 2, Llama GQA)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
        image_size=32, patch_size=8, extra=dict(model_type="smolvlm", scale_factor=2, longest_edge=64, splitting=True),
    ),
    # Idefics3 / SmolVLM v1 without splitting: one 48 x 48 square (6 x 6 patches), pixel shuffle 3 -> 4 tokens, MQA
    "idefics3-single": tiny.TinyShape(
        "tiny random Idefics3 (image splitting off, pixel shuffle 3, Llama MQA)",
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3),
        text=dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1),
        image_size=48, patch_size=8, seed=1, extra=dict(scale_factor=3, longest_edge=96, splitting=False),
    ),
}

# HuggingFaceTB/SmolVLM-*-Instruct's chat template
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.add_special_tokens([FAKE, GLOBAL, END, "<|im_start|>", *ROW_COL])
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import Idefics3Config, SmolVLMConfig

    ids = tiny.token_ids(tok)
    text = tiny.text_config(shape, tok)
    vision = dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size)
    config = SmolVLMConfig if shape.extra.get("model_type") == "smolvlm" else Idefics3Config
    return config(vision_config=vision, text_config=text, scale_factor=shape.extra["scale_factor"],
                  image_token_id=ids[tiny.IMAGE_TOKEN], pad_token_id=ids["<pad>"])


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(tiny_config(shape, tok))
    model._mmedge_tiny = shape.extra  # how save_checkpoint sizes the image processor
    return model


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with an Idefics3Processor beside it.

    SmolVLM2 checkpoints come with SmolVLMProcessor, which needs num2words and
    torchvision (for its video processor); the Idefics3 processor does the same
    image splitting and prompt expansion, so the tiny checkpoints of both
    model types use it.
    """
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    cfg = model.config
    extra = getattr(model, "_mmedge_tiny", {}) or {}
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok)
    tile = cfg.vision_config.image_size
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": extra.get("longest_edge", 4 * tile)}, max_image_size={"longest_edge": tile},
        do_image_splitting=extra.get("splitting", True))
    n_image = int((tile // cfg.vision_config.patch_size) ** 2 / cfg.scale_factor ** 2)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=hf_tok, image_seq_len=n_image,
                                  chat_template=CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
