"""Llama 3.2 Vision (mllama): a tiled ViT whose image reaches the language model through cross-attention layers.

Split (image placement "cross_attention", docs/package-format.md):
    vision_encoder  vision_model over one image's tiles: pixel_values [B, max_tiles, 3, 560, 560] with
                    aspect_ratio_ids [B] and aspect_ratio_mask [B, max_tiles] (vision scheme "tile_canvas")
                    -> [B, max_tiles, 1601, 7680]: the last global layer's states and the listed
                    intermediate layers' concatenated, as the model does
    projector       multi_modal_projector, then each cross-attention layer's k_proj / v_proj (and k_norm):
                    cross_key_{j} / cross_value_{j} [B, kv_heads, max_tiles x 1601, head_dim], computed once per
                    image and held by the runtime for the whole conversation
    embed_tokens    language_model.embed_tokens (the <|image|> token's row is past the LM head's vocabulary)
    decoder         language_model + lm_head: self-attention layers over the KV cache, cross-attention layers
                    over the images' keys and values, with cross_mask [B, 1, S, L] and cross_rows [B, 1, S, 1]

Prompt: the checkpoint's chat template; each image is one "<|image|>" token. A token sees an image from that
image's token up to the next image's token (scheme cross_mask "image_spans", as MllamaProcessor builds its
cross_attention_mask); tokens before the first image see none: their cross-attention MLP output is zeroed and
their attention, as in transformers, spreads evenly over every image position. A prompt with no image runs
the cross-attention layers over one empty position that no token sees, which adds exactly nothing: what
transformers' skipping of those layers gives. Preprocessing matches MllamaImageProcessorPil bit for bit
(canvas choice, resize, black padding, tiles of 560, empty tiles up to max_image_tiles).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import chat_template, image_processor_config, pixel_fields
from mmedge.exporters.family import Description, Parts, description
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("mllama",)
ALIASES = {"llama-3.2-vision": "meta-llama/Llama-3.2-11B-Vision-Instruct"}
IMAGE = "<|image|>"


def _aspect_ratio_attention_mask(aspect_ratio_mask, num_patches: int, target_length: int, dtype):
    """transformers' _prepare_aspect_ratio_attention_mask written without in-place assignment (which Core ML's
    converter does not take): the same values, including its quirk that with no padding positions
    (`mask[:, :, -0:] = 0`) every position of every tile is masked."""
    batch, tiles = aspect_ratio_mask.shape
    keep = aspect_ratio_mask.view(batch, tiles, 1, 1).to(dtype).repeat(1, 1, target_length, 1)
    pad = target_length - num_patches
    content = (torch.arange(target_length) < (num_patches if pad else 0)).to(dtype).view(1, 1, target_length, 1)
    inverted = (1 - keep * content).reshape(batch, tiles * target_length, 1)
    return (inverted @ inverted.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


@contextmanager
def out_of_place_masks():
    """While tracing: the vision model's tile mask built by `_aspect_ratio_attention_mask`."""
    from transformers.models.mllama import modeling_mllama

    original = modeling_mllama._prepare_aspect_ratio_attention_mask
    modeling_mllama._prepare_aspect_ratio_attention_mask = _aspect_ratio_attention_mask
    try:
        yield
    finally:
        modeling_mllama._prepare_aspect_ratio_attention_mask = original


class _OneImageEach:
    """Tiles [B, T, 3, H, W] as the vision model reads a batch of one image per row, [B, 1, T, 3, H, W]: it takes
    the shape, then reshapes to [B x T, 3, H, W]. No rank-6 tensor is made (Core ML has rank 5 at most)."""

    def __init__(self, tiles):
        self.tiles = tiles

    @property
    def shape(self):
        b, t, c, h, w = self.tiles.shape
        return (b, 1, t, c, h, w)

    def reshape(self, *shape):
        return self.tiles.reshape(*shape)


class TileVision(torch.nn.Module):
    """One image a row: tiles [B, T, 3, H, W], aspect_ratio_ids [B], aspect_ratio_mask [B, T] -> [B, T, P, D]."""

    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        with out_of_place_masks():
            out = self.vision_model(pixel_values=_OneImageEach(pixel_values), aspect_ratio_ids=aspect_ratio_ids[:, None],
                                    aspect_ratio_mask=aspect_ratio_mask[:, None]).last_hidden_state
        return out[:, 0]


class CrossKV(torch.nn.Module):
    """Image features [B, T, P, D] -> projected states [B, T x P, hidden] -> each cross-attention layer's keys
    (k_proj, then k_norm per head) and values (v_proj), [B, kv_heads, T x P, head_dim]."""

    def __init__(self, projector, cross_attentions, hidden: int):
        super().__init__()
        self.projector, self.attentions, self.hidden = projector, torch.nn.ModuleList(cross_attentions), hidden

    def forward(self, image_features):
        batch = image_features.shape[0]
        states = self.projector(image_features).reshape(batch, -1, self.hidden)
        out = []
        for attn in self.attentions:
            keys = attn.k_proj(states).view(batch, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
            values = attn.v_proj(states).view(batch, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
            out += [attn.k_norm(keys), values]
        return tuple(out)


def _cross_arg(mask, rows, kv):
    """The runtime's cross mask and rows as MllamaTextModel takes them: rows that see no image attend evenly
    (their mask zeroed, as _prepare_cross_attention_mask does) and their MLP output is masked. The keys and
    values reach the layers through the cache (Parts.cross_layers)."""
    return {"cross_attention_mask": mask * rows, "full_text_row_masked_out_mask": rows}


def split(model) -> Parts:
    cfg, text = model.config, model.config.text_config
    language = model.model.language_model
    cross = tuple(text.cross_attention_layers)
    size = cfg.vision_config.image_size
    return Parts(
        vision_encoder=TileVision(model.model.vision_model),
        projector=CrossKV(model.model.multi_modal_projector, [language.layers[i].cross_attn for i in cross],
                          text.hidden_size),
        embed_tokens=language.embed_tokens,
        text_model=language,
        head=model.lm_head,
        image_size=(size, size),
        num_layers=text.num_hidden_layers - len(cross),
        num_kv_heads=text.num_key_value_heads,
        head_dim=text.hidden_size // text.num_attention_heads,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        cross_attention=len(cross),
        cross_layers=cross,
        cross_arg=_cross_arg,
        tile_canvas={"max_tiles": cfg.vision_config.max_num_tiles},
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    tile = (pre.get("size") or {}).get("height", cfg.vision_config.image_size)
    template = chat_template(checkpoint)
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre, resample=2),
            height=tile, width=tile, resize_mode="tile_canvas", tile_size=tile, do_image_splitting=True,
            max_tiles=pre.get("max_image_tiles", cfg.vision_config.max_num_tiles),
        ),
        prompt=PromptSpec(
            # Llama 3's turn format, for a checkpoint without a chat template
            template="{bos}<|start_header_id|>user<|end_header_id|>\n\n{image}{prompt}<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n",
            image_token=IMAGE,
            image_token_id=cfg.image_token_index,
            image_seq_len=1,
            mode="chat" if template else "template",
            image_marker=IMAGE,
        ),
        schemes=SchemeSpec(positions="linear", attention="causal", image_placement="cross_attention",
                           cross_mask="image_spans", vision="tile_canvas"),
        chat_template=template,
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # cross-attention in layers 1 and 3 of 5, GQA; 4 tiles of 32 px, 17 positions a tile (16 patches + class
    # embedding, padded to 24 inside the vision model), two intermediate layers concatenated
    "mllama-tiles": tiny.TinyShape(
        "tiny random Llama 3.2 Vision (cross-attention layers, 4 tiles)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_global_layers=2,
                    attention_heads=2, max_num_tiles=4, vision_output_dim=96, intermediate_layers_indices=[0, 2]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, cross_attention_layers=[1, 3]),
        image_size=32, patch_size=8,
    ),
}

# The user-turn part of meta-llama/Llama-3.2-11B-Vision-Instruct's chat template (no system prompt, no tools)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"])
    tok.add_special_tokens([IMAGE])  # last: its id is the text vocabulary's size, past the LM head as in the model
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import MllamaConfig

    image = tok.token_to_id(IMAGE)
    text = tiny.text_config(shape, tok)
    text["vocab_size"] = image
    vision = dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image, **shape.extra)


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration(tiny_config(shape, tok))
    with torch.no_grad():  # transformers starts every gate at 0: the image would change nothing
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate",
                                                            "cross_attn_mlp_gate"):
                p.uniform_(0.5, 1.5)
    return model


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with an MllamaProcessor (PIL image processor, tokenizer, chat template)."""
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    cfg = model.config
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok, extra_special_tokens={"image_token": IMAGE})
    size = cfg.vision_config.image_size
    image_processor = MllamaImageProcessorPil(size={"height": size, "width": size},
                                              max_image_tiles=cfg.vision_config.max_num_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=hf_tok, chat_template=CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
