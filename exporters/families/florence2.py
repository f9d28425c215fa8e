"""Florence-2: a DaViT vision tower, a projection, then a BART encoder-decoder (detection, grounding, OCR).

Split (scheme encoder "prompt", docs/package-format.md):
    vision_encoder  vision_tower -> its last stage's feature map [B, C, h, w]
    projector       multi_modal_projector: 2-D position and temporal embeddings, the spatial tokens and one
                    pooled token, projected and normalised -> image_embeds [B, h x w + 1, d_model]
    embed_tokens    the shared BART token table (scaled inside where the config says so), for the encoder's
                    prompt and the decoder's tokens alike
    encoder         the BART encoder over [image tokens + prompt] -> each decoder layer's cross-attention keys
                    and values [B, heads, source, head_dim]: run once per prompt
    decoder         the BART decoder + lm_head: self-attention over the KV cache, cross-attention over those keys
                    and values; learned positions (offset 2 inside the table) from position_ids

Prompt: "<image>" x image_seq_len, then "<s>", the task's text, "</s>", as Florence2Processor builds it; a task
token ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>red circle") becomes the processor's own sentence for it
(prompt.tasks). The decoder starts from decoder_start_token_id and, where the generation config forces one,
the BOS token. Answers with boxes are "label<loc_x0><loc_y0><loc_x1><loc_y1>..." in 1000 bins over the image
(box format "loc1000_xyxy", runtimes/boxes.py). Greedy only: the published generation config's beam search
(num_beams 3) and no_repeat_ngram_size are not applied.
Preprocessing: CLIPImageProcessorPil's resize to a fixed square (bicubic), no crop, ImageNet mean and std.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from mmedge.exporters import family, tiny
from mmedge.exporters.checkpoint import image_processor_config, pixel_fields
from mmedge.exporters.family import (Description, EncoderKV, Parts, decoder_start_ids, description,
                                     encoder_decoder_cache)
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("florence2",)
ALIASES = {"florence-2": "florence-community/Florence-2-base", "florence-2-large": "florence-community/Florence-2-large"}
IMAGE = "<image>"
PUBLISHED_SIZE = 768

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def has_encoder(config: dict) -> bool:
    return True  # every Florence-2: its BART encoder reads the image features and the prompt


# Florence2Processor's task tokens: those taking no text become its sentence; those taking text put it at {input}
TASKS = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}


class FeatureMap(torch.nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values):
        return self.tower(pixel_values).last_hidden_state


class BartDecoderStack(torch.nn.Module):
    """BartDecoder's forward over the runtime's inputs: positions from position_ids (the cache is preallocated, so
    its length says nothing), the ready-made causal and cross masks, and the cross-attention keys and values
    given (the layers read them from the cache, as they do after transformers' first step)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, cross_mask, cross_kv):
        d = self.decoder
        hidden = d.layernorm_embedding(inputs_embeds + d.embed_positions(None, 0, position_ids=position_ids)[0])
        both = encoder_decoder_cache(cache, cross_kv)
        for layer in d.layers:  # encoder_hidden_states: any tensor, to take the cross-attention path; not read
            hidden = layer(hidden, attention_mask, cross_kv[0], encoder_attention_mask=cross_mask, cache=both,
                           use_cache=True)
        return SimpleNamespace(last_hidden_state=hidden)


def split(model) -> Parts:
    cfg, text = model.config, model.config.text_config
    language = model.model.language_model
    size = _image_size(cfg)
    return Parts(
        vision_encoder=FeatureMap(model.model.vision_tower),
        projector=model.model.multi_modal_projector,
        embed_tokens=language.shared,
        text_model=BartDecoderStack(language.decoder),
        head=model.lm_head,
        image_size=(size, size),
        num_layers=text.decoder_layers,
        num_kv_heads=text.decoder_attention_heads,
        head_dim=text.d_model // text.decoder_attention_heads,
        hidden_size=text.d_model,
        vocab_size=text.vocab_size,
        cross_attention=text.decoder_layers,
        cross_arg=family.mask_and_kv,
        encoder=EncoderKV(language.encoder, [layer.encoder_attn for layer in language.decoder.layers]),
        encoder_length=text.max_position_embeddings,
    )


def _image_size(cfg) -> int:
    """The square image side: the published 768 (what the checkpoints' processors resize to), or less where the
    tower's position table (max_position_embeddings a side of its feature map) holds less."""
    stride = 1
    for s in cfg.vision_config.patch_stride:
        stride *= s
    return min(PUBLISHED_SIZE, stride * cfg.vision_config.max_position_embeddings)


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    size = pre.get("size") or {}
    height, width = size.get("height", _image_size(cfg)), size.get("width", _image_size(cfg))
    image_token = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
    desc = description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre, mean=IMAGENET_MEAN, std=IMAGENET_STD),
            height=height,
            width=width,
            do_center_crop=False,
        ),
        prompt=PromptSpec(
            template="{image}{bos}{prompt}" + tokenizer.eos_token,
            image_token=image_token,
            image_token_id=cfg.image_token_id,
            image_seq_len=pre.get("image_seq_length") or _image_tokens(model, height, width),
            tasks=dict(TASKS),
            decoder_start_ids=decoder_start_ids(model),
        ),
        schemes=SchemeSpec(positions="linear", attention="causal", encoder="prompt",
                           encoder_length=cfg.text_config.max_position_embeddings, boxes="loc1000_xyxy",
                           detect_prompt="<OPEN_VOCABULARY_DETECTION>{objects}"),
    )
    return desc


def _image_tokens(model, height: int, width: int) -> int:
    with torch.no_grad():
        features = model.model.vision_tower(torch.zeros(1, 3, height, width)).last_hidden_state
    return features.shape[2] * features.shape[3] + 1


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # a two-stage DaViT (window 3) at 48 px: a 6 x 6 feature map, 37 image tokens; BART 2 + 2 layers, 4 heads
    "florence2-tiny": tiny.TinyShape(
        "tiny random Florence-2 (DaViT, BART encoder-decoder)",
        vision=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                    patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                    window_size=3, drop_path_rate=0.0, max_position_embeddings=6, max_temporal_embeddings=4),
        text=dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128),
        image_size=48, patch_size=8,
    ),
}

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids 0-3
EXTRA_TOKENS = ["<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>"] + [f"<loc_{i}>" for i in range(1000)]


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A byte-level BPE with BART's special tokens, Florence-2's location tokens and the image token; like the
    published tokenizer, it wraps a text in <s> ... </s> (which the processor's prompt then has twice)."""
    from tokenizers import processors

    tok = tiny.build_tokenizer(EXTRA_TOKENS, vocab_size=vocab_size, corpus=corpus, special=SPECIAL)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import Florence2Config

    vocab = shape.vocab_size or (tok.get_vocab_size() + 63) // 64 * 64
    text = dict(shape.text, vocab_size=vocab, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                decoder_start_token_id=2, forced_eos_token_id=None)
    vision = dict(shape.vision, projection_dim=text["d_model"])
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.token_to_id(IMAGE),
                           **shape.extra)


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration(tiny_config(shape, tok))
    model.generation_config.forced_bos_token_id = 0  # as the published checkpoints generate
    model.generation_config.forced_eos_token_id = None
    return model


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with a Florence2Processor (CLIP PIL image processor at a fixed size, no crop)."""
    from transformers import CLIPImageProcessorPil, Florence2Processor

    hf_tok = tiny.hf_tokenizer(tok, extra_special_tokens={"image_token": IMAGE})
    hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token = "<s>", "</s>", "<pad>", "<unk>"
    side = _image_size(model.config)
    image_processor = CLIPImageProcessorPil(size={"height": side, "width": side},
                                            crop_size={"height": side, "width": side}, do_center_crop=False,
                                            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                                            image_seq_length=_image_tokens(model, side, side))
    processor = Florence2Processor(image_processor=image_processor, tokenizer=hf_tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
