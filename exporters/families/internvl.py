"""InternVL 2.5 / 3 (transformers model type internvl): InternViT over 448-px tiles, pixel-unshuffle MLP connector,
Qwen2 decoder.

Split:
    vision_encoder  vision_tower -> the selected layer's features, CLS dropped, pixel shuffle by downsample_ratio
                    (0.5: 2x2 neighbours concatenated): [tiles, 256, 4 * Dv] for 448-px tiles of 14-px patches
    projector       multi_modal_projector (LayerNorm, Linear, GELU, Linear) -> [tiles, 256, hidden]
    embed_tokens    language_model.embed_tokens
    decoder         language_model (Qwen2) + lm_head

Preprocessing ("aspect_tiles", GotOcr2ImageProcessor with crop_to_patches): the (columns, rows) grid with
min_patches <= columns x rows <= max_patches whose aspect ratio is closest to the image's, the image resized to
that many tiles and cut row by row, then the whole image resized to one tile when there is more than one;
bicubic, ImageNet normalisation. Prompt: the checkpoint's chat template; each "<IMG_CONTEXT>" it writes becomes
"<img>" + the image tokens of all its tiles in one run + "</img>" (layout "tile_run"), as InternVLProcessor
expands it; each "<video>" becomes "Frame1: <img>...</img>\nFrame2: ..." with each frame one tile, encoded and
spliced as images are (`video_as_images`). Attention causal, positions from 0.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import chat_template, image_processor_config, pixel_fields, processor_config
from mmedge.exporters.family import Description, Parts, decoder_fields, description, image_only
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("internvl",)
ALIASES = {
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
}
CONTEXT, START, END, VIDEO = "<IMG_CONTEXT>", "<img>", "</img>", "<video>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VIDEO_FRAMES = 8  # frames sampled from a video file
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class _VisionEncoder(torch.nn.Module):
    """Tiles -> the selected layer's patch features, CLS dropped, pixel-shuffled, as
    InternVLModel.get_image_features computes them before its projector."""

    def __init__(self, model, layer: int, strategy: str, ratio: float):
        super().__init__()
        self.tower, self.shuffle = model.vision_tower, model.pixel_shuffle
        self.layer, self.drop_cls, self.ratio = layer, strategy == "default", ratio

    def forward(self, pixel_values):
        out = self.tower(pixel_values=pixel_values, output_hidden_states=self.layer != -1)
        features = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        if self.drop_cls:
            features = features[:, 1:]
        side = int(features.shape[1] ** 0.5)
        features = self.shuffle(features.reshape(features.shape[0], side, side, -1), scale_factor=self.ratio)
        return features.reshape(features.shape[0], -1, features.shape[-1])


def _tile_positions(self, embeddings, height: int, width: int):
    """The position table as it is: every tile has the checkpoint's image size. (transformers resamples it with a
    bicubic interpolate whenever it is traced, an identity here that Core ML cannot convert.)"""
    if embeddings.shape[1] - 1 != self.position_embeddings.shape[1] - 1:
        raise ValueError(f"InternVL tiles have {self.position_embeddings.shape[1] - 1} patches, not "
                         f"{embeddings.shape[1] - 1}")
    return self.position_embeddings


def split(model) -> Parts:
    cfg = model.config
    embeddings = model.model.vision_tower.embeddings
    if embeddings.position_embeddings is not None:  # explicit patch of the loaded model's instance (export owns it)
        embeddings.interpolate_pos_encoding = types.MethodType(_tile_positions, embeddings)
    size = cfg.vision_config.image_size
    return Parts(
        vision_encoder=_VisionEncoder(model.model, cfg.vision_feature_layer, cfg.vision_feature_select_strategy,
                                      cfg.downsample_ratio),
        projector=model.model.multi_modal_projector,
        head=model.lm_head,
        image_size=tuple(size) if isinstance(size, (list, tuple)) else (size, size),
        **decoder_fields(model.model.language_model, cfg.text_config),
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    proc = processor_config(checkpoint)
    vision = cfg.vision_config
    size = vision.image_size if isinstance(vision.image_size, (list, tuple)) else (vision.image_size,) * 2
    tile = pre.get("size") or {"height": size[0], "width": size[1]}
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    n_image = proc.get("image_seq_length") or int((tile["height"] // patch) ** 2 * cfg.downsample_ratio ** 2)
    context = getattr(tokenizer, "context_image_token", None) or CONTEXT
    start = getattr(tokenizer, "start_image_token", None) or START
    end = getattr(tokenizer, "end_image_token", None) or END
    template = chat_template(checkpoint)
    if tile["height"] != tile["width"]:
        raise ValueError(f"InternVL tiles are square; this checkpoint's are {tile['height']}x{tile['width']}")
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre, mean=IMAGENET_MEAN, std=IMAGENET_STD),
            height=tile["height"],
            width=tile["width"],
            resize_mode="aspect_tiles",
            tile_size=tile["height"],
            do_image_splitting=bool(pre.get("crop_to_patches", True)) and pre.get("max_patches", 12) > 1,
            min_tiles=pre.get("min_patches", 1),
            max_tiles=pre.get("max_patches", 12),
            # InternVL's video processor takes the frames it is given; from a file mmedge samples VIDEO_FRAMES
            # evenly (at most one a second), each resized to one tile as an unsplit image is
            video_fps=1.0,
            video_min_frames=1,
            video_max_frames=VIDEO_FRAMES,
        ),
        prompt=PromptSpec(
            # InternVL's turn format, for a checkpoint without a chat template
            template=IM_START + "user\n" + CONTEXT + "\n{prompt}" + IM_END + "\n" + IM_START + "assistant\n",
            image_token=context,
            image_token_id=cfg.image_token_id,
            image_seq_len=n_image,
            mode="chat" if template else "template",
            image_marker=context,
            image_expansion=f"{start}{{image}}{end}",
            image_layout="tile_run",
            # a video's frames, each one tile, as InternVLProcessor expands its "<video>": "Frame1: <img>...</img>"
            video_marker=getattr(tokenizer, "video_token", None) or VIDEO,
            video_as_images=True,
            video_frame_expansion=f"Frame{{index}}: {start}{{video}}{end}",
            video_frame_separator="\n",
        ),
        schemes=SchemeSpec(positions="linear", position_offset=0, attention="causal"),
        chat_template=template,
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # 32-px tiles of 4-px patches -> 64 patches, shuffled to 16 tokens a tile; up to 6 tiles + the thumbnail;
    # GQA Qwen2 with q/k/v biases (the fused ONNX Runtime decoder)
    "internvl-tiles": tiny.TinyShape(
        "tiny random InternVL (aspect-ratio tiles + thumbnail, pixel shuffle, Qwen2 GQA)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        image_size=32, patch_size=4, extra=dict(max_patches=6),
    ),
    # one tile (crop_to_patches off), the second-to-last layer's features with QK norm, MQA
    "internvl-single": tiny.TinyShape(
        "tiny random InternVL (one tile, layer -2, QK norm, Qwen2 MQA)",
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                    use_qk_norm=True, norm_type="rms_norm"),
        text=dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=16),
        image_size=48, patch_size=8, seed=1, extra=dict(max_patches=1, vision_feature_layer=-2),
    ),
}

# OpenGVLab/InternVL3-*-hf's chat template (transformers' conversion script): each image "<IMG_CONTEXT>\n", each
# video "<video>\n", then the text
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_NAMES = {"context_image_token": CONTEXT, "start_image_token": START, "end_image_token": END,
                 "video_token": VIDEO}


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.add_special_tokens([CONTEXT, START, END, VIDEO, IM_START, IM_END])
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import InternVLConfig

    extra = dict(shape.extra)
    extra.pop("max_patches", None)
    text = tiny.text_config(shape, tok)
    vision = dict(shape.vision, image_size=[shape.image_size] * 2, patch_size=[shape.patch_size] * 2)
    n_image = (shape.image_size // shape.patch_size) ** 2 // 4
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.token_to_id(CONTEXT),
                          image_seq_length=n_image, downsample_ratio=0.5,
                          tie_word_embeddings=text["tie_word_embeddings"], **extra)


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration(tiny_config(shape, tok))
    model._mmedge_tiny = shape.extra  # how save_checkpoint sizes the image processor
    return model


def reference_processor(checkpoint: Path):
    """transformers' InternVLProcessor for reference inputs, without its video processor (transformers builds that
    on torchvision): the PIL backend's GotOcr2 image processor, the tokenizer and the chat template."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLProcessor

    ImageOnlyProcessor = image_only(InternVLProcessor)

    return ImageOnlyProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(checkpoint),
                              tokenizer=AutoTokenizer.from_pretrained(checkpoint),
                              chat_template=chat_template(checkpoint),
                              image_seq_length=processor_config(checkpoint).get("image_seq_length", 256))


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with its image processor (GotOcr2's PIL backend), tokenizer, processor settings
    and chat template; the published checkpoints' video processor (torchvision) is left out."""
    import json

    from transformers import GotOcr2ImageProcessorPil

    cfg = model.config
    extra = getattr(model, "_mmedge_tiny", {}) or {}
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok, extra_special_tokens=SPECIAL_NAMES)
    side = cfg.vision_config.image_size[0]
    max_patches = extra.get("max_patches", 12)
    image_processor = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=max_patches > 1,
                                               min_patches=1, max_patches=max_patches, image_mean=IMAGENET_MEAN,
                                               image_std=IMAGENET_STD)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": cfg.image_seq_length}, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out
