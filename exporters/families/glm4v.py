"""GLM-4.1V (transformers model type glm4v, dense): a ViT over any number of patches with 2-D rotary positions and a
learned position table resampled bicubically to each grid, a 2x2 convolution + gated-MLP merger, and the GLM-4
decoder with 3-D multimodal rotary positions (M-RoPE, partial rotary, pairs interleaved).

Split:
    vision_encoder  the shared "patch_grid" ViT (exporters/patch_grid.py): patch embedding (Conv3d over temporal x
                    patch x patch), its RMSNorm, the position table resampled at each patch's centre (grid_sample's
                    bicubic, borders clamped: 16 taps whose rows and weights the runtime computes from the grid,
                    schemes.vision_inputs), the blocks attending within each frame: [N, 3*T*p*p] -> [N, Dv]
    projector       post-layernorm, the 2x2 downsampling convolution over each merge block, the merger (Linear,
                    LayerNorm, GELU, gated MLP) -> [N/4, hidden]
    embed_tokens    language_model.embed_tokens
    decoder         language_model (GLM-4 blocks: extra norms after attention and MLP) + lm_head

Preprocessing ("smart_resize", GLM-4V's variant): sides below one token scaled up first, then each side to a
multiple of patch x merge with the area of the image's temporal patch (2 frames of it) within [min_pixels,
max_pixels]; bicubic, CLIP normalisation, patches in merge-block order. Prompt: the checkpoint's chat template;
each "<|image|>" becomes one per merged token of its image, each "<|video|>" one
"<|begin_of_image|>" + tokens + "<|end_of_image|>" + whole seconds per temporal patch, each patch encoded, spliced
and positioned as an image of one frame (`video_as_images`). Positions "mrope", as Qwen2-VL's for images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmedge.exporters import tiny
from mmedge.exporters.checkpoint import CLIP_MEAN, CLIP_STD, chat_template, image_processor_config, pixel_fields
from mmedge.exporters.family import Description, Parts, decoder_fields, description, image_only
from mmedge.exporters.patch_grid import PatchGridEncoder
from mmedge.manifest import PreprocessSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("glm4v",)
ALIASES = {"glm-4.1v-9b": "zai-org/GLM-4.1V-9B-Thinking"}
IMAGE, BEGIN_IMAGE, END_IMAGE = "<|image|>", "<|begin_of_image|>", "<|end_of_image|>"
VIDEO, BEGIN_VIDEO, END_VIDEO = "<|video|>", "<|begin_of_video|>", "<|end_of_video|>"
TURNS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>")


class _Merger(torch.nn.Module):
    """Patch features [N, Dv] in merge-block order -> tokens [N/m^2, hidden], as Glm4vVisionModel ends."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, features):
        vm = self.visual
        m = vm.spatial_merge_size
        hidden = vm.post_layernorm(features).view(-1, m, m, features.shape[-1]).permute(0, 3, 1, 2)
        return vm.merger(vm.downsample(hidden).view(-1, vm.config.out_hidden_size))


def split(model) -> Parts:
    cfg = model.config
    vision = cfg.vision_config
    visual = model.model.visual
    return Parts(
        vision_encoder=PatchGridEncoder(visual, None, visual.embeddings.position_embedding, (),
                                        embed_norm=visual.post_conv_layernorm),
        projector=_Merger(visual),
        head=model.lm_head,
        image_size=(0, 0),
        **decoder_fields(model.model.language_model, cfg.text_config),
        position_rows=3,
        patch_grid=dict(
            patch_dim=vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2,
            merge_size=vision.spatial_merge_size,
            window=None,
            pos_grid=_pos_grid(visual),
            pos_resample="bicubic_border",
            deepstack=0,
        ),
    )


def _pos_grid(visual) -> int:
    """The learned position table's side, in rows."""
    return int(round(visual.embeddings.position_embedding.num_embeddings ** 0.5))


def _video_config(checkpoint: Path) -> dict:
    """The checkpoint's video processor settings ({}: Glm4vVideoProcessor's defaults)."""
    path = checkpoint / "video_preprocessor_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    vision = cfg.vision_config
    pre = image_processor_config(checkpoint)
    size = pre.get("size") or {}
    template = chat_template(checkpoint)
    image = getattr(tokenizer, "image_token", None) or IMAGE
    patch, merge = pre.get("patch_size", vision.patch_size), pre.get("merge_size", vision.spatial_merge_size)
    temporal = pre.get("temporal_patch_size", vision.temporal_patch_size)
    video = _video_config(checkpoint)
    video_size = video.get("size") or {}
    return description(
        model,
        tokenizer,
        preprocess=PreprocessSpec(
            **pixel_fields(pre, mean=CLIP_MEAN, std=CLIP_STD),
            height=patch * merge,
            width=patch * merge,
            resize_mode="smart_resize",
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=temporal,
            min_pixels=size.get("shortest_edge", 112 * 112),
            max_pixels=size.get("longest_edge", 28 * 28 * 15000),
            smart_resize_frames=temporal,
            smart_resize_upscale=True,
            # Glm4vVideoProcessor: 2 frames a second of the clip, its pixel bounds over all of them
            video_fps=float(video.get("fps") or 2.0),
            video_min_frames=temporal,
            video_max_frames=int(video.get("max_duration") or 300) * int(video.get("fps") or 2),
            video_min_pixels=video_size.get("shortest_edge", 112 * 112),
            video_max_pixels=video_size.get("longest_edge", 28 * 28 * 2 * 30000),
            video_sampling="per_second",
            video_budget_per_clip=True,
        ),
        prompt=PromptSpec(
            # GLM-4.1V's turn format, for a checkpoint without a chat template
            template="[gMASK]<sop><|user|>\n" + BEGIN_IMAGE + "{image}" + END_IMAGE + "{prompt}<|assistant|>\n",
            image_token=image,
            image_token_id=cfg.image_token_id,
            image_seq_len=1,  # the fewest: each image gets one token per merged patch (image_layout "patch_grid")
            mode="chat" if template else "template",
            image_marker=image,
            image_expansion="{image}",
            image_layout="patch_grid",
            # each temporal patch as an image, stamped with its first frame's second, as Glm4vProcessor expands
            # "<|video|>"; spliced and positioned as images are (`video_as_images`)
            video_marker=getattr(tokenizer, "video_token", None) or VIDEO,
            video_as_images=True,
            video_frame_expansion=BEGIN_IMAGE + "{video}" + END_IMAGE + "{second}",
        ),
        schemes=SchemeSpec(positions="mrope", attention="causal", vision="patch_grid",
                           vision_pos_grid=_pos_grid(model.model.visual), vision_pos_resample="bicubic_border"),
        chat_template=template,
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # patch 4, merge 2: images resized to multiples of 8 px within 2 x 16*16..2 x 64*64 pixels; a 6x6 position
    # table resampled bicubically to every grid; GQA decoder with half its head rotated (M-RoPE sections 2/3/3)
    "glm4v-gqa": tiny.TinyShape(
        "tiny random GLM-4.1V (dynamic resolution, bicubic position table, M-RoPE, GQA)",
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, mrope_section=[2, 3, 3]),
        image_size=24, patch_size=4, extra=dict(min_pixels=2 * 16 * 16, max_pixels=2 * 64 * 64),
    ),
}

# zai-org/GLM-4.1V's turn format as its chat template writes it (images and videos wrapped in their begin/end
# tokens), without the thinking and tool parts
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for item in m['content'] %}{% if item['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for item in m['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.add_special_tokens([IMAGE, BEGIN_IMAGE, END_IMAGE, VIDEO, BEGIN_VIDEO, END_VIDEO, *TURNS])
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import Glm4vConfig

    text = dict(shape.text)
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 10000.0),
            "mrope_section": text.pop("mrope_section"), "partial_rotary_factor": 0.5}
    text = tiny.text_config(shape, tok, text, rope_parameters=rope)
    vision = dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"])
    ids = {name: tok.token_to_id(token) for name, token in (
        ("image_token_id", IMAGE), ("video_token_id", VIDEO), ("image_start_token_id", BEGIN_IMAGE),
        ("image_end_token_id", END_IMAGE), ("video_start_token_id", BEGIN_VIDEO), ("video_end_token_id", END_VIDEO))}
    return Glm4vConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import Glm4vForConditionalGeneration

    model = Glm4vForConditionalGeneration(tiny_config(shape, tok))
    model._mmedge_tiny = shape.extra  # how save_checkpoint sizes the image processor
    return model


def reference_processor(checkpoint: Path):
    """transformers' Glm4vProcessor for reference inputs, with its image processor's PIL backend and without the
    video processor, which transformers builds on torchvision."""
    from transformers import AutoTokenizer, Glm4vImageProcessorPil, Glm4vProcessor

    ImageOnlyProcessor = image_only(Glm4vProcessor)

    return ImageOnlyProcessor(image_processor=Glm4vImageProcessorPil.from_pretrained(checkpoint),
                              tokenizer=AutoTokenizer.from_pretrained(checkpoint),
                              chat_template=chat_template(checkpoint))


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with its image processor (the PIL backend's), tokenizer and chat template; the
    published checkpoints' video processor (torchvision) is left out."""
    from transformers import Glm4vImageProcessorPil

    cfg = model.config
    extra = getattr(model, "_mmedge_tiny", {}) or {}
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok)
    vision = cfg.vision_config
    image_processor = Glm4vImageProcessorPil(
        size={"shortest_edge": extra.get("min_pixels", 112 * 112), "longest_edge": extra.get("max_pixels", 28 * 28 * 15000)},
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out
