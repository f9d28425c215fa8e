"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense): a ViT over any number of patches with 2-D rotary positions, a 2x2
patch merger, a decoder with 3-D multimodal rotary positions (M-RoPE).

Split:
    vision_encoder  patch embedding (Conv3d over temporal x patch x patch) and the ViT blocks over all patches of
                    all images of a prompt: [N, 3*T*p*p] -> [N, Dv]. Attention stays within a frame; Qwen2.5-VL's
                    blocks attend within windows of `window_size` pixels except the `fullatt_block_indexes`
                    ones. The per-patch indices (rotary row/column, frame and window membership, the window
                    order) are inputs the runtime computes from each image's grid (schemes.vision_inputs), so
                    the graph takes any patch count. Qwen3-VL adds a learned position table resampled to the
                    grid (its rows and weights are inputs too) and DeepStack: the listed blocks' features,
                    merged by their own mergers, come out as `deepstack_embeds` [k, N/4, hidden].
    projector       the patch merger (norm, 2x2 neighbours concatenated, MLP) -> [N/4, hidden]
    embed_tokens    language_model.embed_tokens
    decoder         language_model (Qwen2; Qwen3 with the rotary sections interleaved) + lm_head; Qwen3-VL's also
                    takes `deepstack_embeds` [k, B, S, hidden], added to the hidden states after each of its first
                    k layers (zero but at image tokens)

Preprocessing ("smart_resize"): each side to a multiple of patch x merge with the area in
[min_pixels, max_pixels], bicubic, CLIP normalisation, patches in merge-block order. Prompt: the
checkpoint's chat template; each "<|image_pad|>" becomes one per merged token of its image. Positions
"mrope": text counts up on all three rows, image tokens take (frame, row, column) from where the text
stopped, and the text after an image resumes at the largest of them + 1 (schemes.prompt_positions).
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

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ALIASES = {
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
}
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _dense_deepstack(text_model, hidden_states, visual_pos_masks, visual_embeds):
    """Qwen3-VL's DeepStack step as a dense add: the exported decoder takes the visual features as [B, S, hidden],
    zero but at image tokens, instead of gathering the image positions with a boolean mask (data-dependent
    shapes that TensorRT and Core ML do not take). The same sum at every position."""
    return hidden_states + visual_embeds.to(hidden_states.dtype)


def _interleaved_sections(rotary, freq):
    """Qwen3-VL's interleaved M-RoPE layout (frequency j from row H where j % 3 == 1, W where j % 3 == 2, within
    their sections; T elsewhere) as selections: the upstream strided in-place assignment is the same values,
    but coremltools mis-converts it."""
    j = torch.arange(freq.shape[-1])
    h = (j % 3 == 1) & (j < rotary.mrope_section[1] * 3)
    w = (j % 3 == 2) & (j < rotary.mrope_section[2] * 3)
    out = torch.where(h, freq[1], torch.where(w, freq[2], freq[0]))
    return torch.cat((out, out), dim=-1)


def split(model) -> Parts:
    import types

    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    windowed = cfg.model_type == "qwen2_5_vl"
    full_blocks = tuple(vision.fullatt_block_indexes) if windowed else None
    deepstack = tuple(getattr(vision, "deepstack_visual_indexes", None) or ())
    language = model.model.language_model
    if deepstack:  # explicit patches of the loaded model's instance (export owns it)
        language._deepstack_process = types.MethodType(_dense_deepstack, language)
    if cfg.model_type == "qwen3_vl":
        language.rotary_emb.recomposition_frequencies = types.MethodType(_interleaved_sections, language.rotary_emb)
    visual = model.model.visual
    return Parts(
        vision_encoder=PatchGridEncoder(visual, full_blocks, getattr(visual, "pos_embed", None), deepstack),
        projector=visual.merger,
        head=model.lm_head,
        image_size=(0, 0),
        **decoder_fields(language, text),
        # Qwen2/2.5-VL's decoder takes the masks by layer type; Qwen3-VL's a 4-D mask as it is
        mask_arg=(lambda m: m[0]) if cfg.model_type == "qwen3_vl" else (lambda m: {"full_attention": m[0]}),
        position_rows=3,
        patch_grid=dict(
            patch_dim=vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2,
            merge_size=vision.spatial_merge_size,
            window=_window(vision) if windowed else None,
            pos_grid=_pos_grid(visual),
            deepstack=len(deepstack),
        ),
        deepstack_layers=len(deepstack),
    )


def _pos_grid(visual) -> int | None:
    """Qwen3-VL's learned position table, in rows a side (None: the encoder has none)."""
    return int(visual.num_grid_per_side) if hasattr(visual, "pos_embed") else None


# how each generation writes boxes (runtimes/boxes.py) and a prompt that asks for them: Qwen2-VL's box tokens over
# [0, 1000); Qwen2.5-VL's JSON in pixels of the resized image; Qwen3-VL's JSON over [0, 1000] (the Qwen cookbooks)
_JSON_PROMPT = ('Locate every instance that belongs to the following categories: "{objects}". '
                "Report bbox coordinates in JSON format.")
DETECTION = {
    "qwen2_vl": dict(boxes="box_1000", detect_prompt="Find the bounding box of each of: {objects}."),
    "qwen2_5_vl": dict(boxes="json_pixels", detect_prompt=_JSON_PROMPT),
    "qwen3_vl": dict(boxes="json_1000", detect_prompt=_JSON_PROMPT),
}


def _window(vision) -> int:
    """Qwen2.5-VL's attention window, in merged tokens a side."""
    return vision.window_size // vision.spatial_merge_size // vision.patch_size


def _video_config(checkpoint: Path) -> dict:
    """The checkpoint's video processor settings ({}: it has none, and the package takes no video)."""
    path = checkpoint / "video_preprocessor_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    vision = cfg.vision_config
    pre = image_processor_config(checkpoint)
    video = _video_config(checkpoint)
    video_size = video.get("size") or {}
    video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
    size = pre.get("size") or {}
    template = chat_template(checkpoint)
    image = getattr(tokenizer, "image_token", None) or IMAGE_PAD
    patch, merge = pre.get("patch_size", vision.patch_size), pre.get("merge_size", vision.spatial_merge_size)
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
            temporal_patch_size=pre.get("temporal_patch_size", vision.temporal_patch_size),
            min_pixels=pre.get("min_pixels") or size.get("shortest_edge", 56 * 56),
            max_pixels=pre.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280),
            video_fps=float(video.get("fps") or 2.0) if video else None,
            video_min_frames=video.get("min_frames", 4) if video else None,
            video_max_frames=video.get("max_frames", 768) if video else None,
            video_min_pixels=(video.get("min_pixels") or video_size.get("shortest_edge", 128 * 28 * 28)) if video else None,
            video_max_pixels=(video.get("max_pixels") or video_size.get("longest_edge", 768 * 28 * 28)) if video else None,
        ),
        prompt=PromptSpec(
            # Qwen2-VL's turn format, for a checkpoint without a chat template
            template=IM_START + "system\nYou are a helpful assistant." + IM_END + "\n" + IM_START + "user\n"
                     + VISION_START + "{image}" + VISION_END + "{prompt}" + IM_END + "\n" + IM_START + "assistant\n",
            image_token=image,
            image_token_id=cfg.image_token_id,
            image_seq_len=1,  # the fewest: each image gets one token per merged patch (image_layout "patch_grid")
            mode="chat" if template else "template",
            image_marker=image,
            image_expansion="{image}",
            image_layout="patch_grid",
            video_token=video_token if video else None,
            video_token_id=cfg.video_token_id if video else None,
            video_marker=video_token if video else None,
            # Qwen3-VL stamps each temporal patch with its time, as Qwen3VLProcessor expands a video
            video_frame_expansion=f"<{{seconds}} seconds>{VISION_START}{{video}}{VISION_END}"
            if video and cfg.model_type == "qwen3_vl" else None,
        ),
        schemes=SchemeSpec(positions="mrope", attention="causal", vision="patch_grid",
                           vision_window=_window(vision) if cfg.model_type == "qwen2_5_vl" else None,
                           vision_pos_grid=_pos_grid(model.model.visual),
                           video_tokens_per_second=getattr(vision, "tokens_per_second", None)
                           if cfg.model_type == "qwen2_5_vl" else None,
                           **DETECTION[cfg.model_type]),
        chat_template=template,
    )


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # patch 4, merge 2: images resized to multiples of 8 px, 16..256 patches; GQA; M-RoPE sections 2/3/3
    "qwen2vl-gqa": tiny.TinyShape(
        "tiny random Qwen2-VL (dynamic resolution, M-RoPE, GQA)",
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        image_size=32, patch_size=4, extra=dict(model_type="qwen2_vl", min_pixels=16 * 16, max_pixels=64 * 64),
    ),
    # window attention over 2x2 merged tokens (smaller than most grids) with one full-attention block; MQA
    "qwen2.5vl-window": tiny.TinyShape(
        "tiny random Qwen2.5-VL (window attention + a full block, M-RoPE, MQA)",
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, window_size=16,
                    fullatt_block_indexes=[1]),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, mrope_section=[4, 6, 2]),
        image_size=32, patch_size=4, seed=2,
        extra=dict(model_type="qwen2_5_vl", min_pixels=16 * 16, max_pixels=64 * 64),
    ),
    # a learned 6x6 position table resampled to each grid, DeepStack features from 2 of 3 vision blocks into the
    # first 2 decoder layers, interleaved M-RoPE sections, QK-norm decoder
    "qwen3vl-deepstack": tiny.TinyShape(
        "tiny random Qwen3-VL (DeepStack, interleaved M-RoPE, learned position table, GQA)",
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=36,
                    deepstack_visual_indexes=[0, 1]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3], mrope_interleaved=True),
        image_size=32, patch_size=4, seed=4,
        extra=dict(model_type="qwen3_vl", min_pixels=16 * 16, max_pixels=64 * 64),
    ),
}

# Qwen/Qwen2-VL-2B-Instruct's chat template (images and videos; no vision ids)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    tok.add_special_tokens([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, IM_START, IM_END])
    return tok


def tiny_config(shape: tiny.TinyShape, tok):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    text = dict(shape.text)
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 10000.0),
            "mrope_section": text.pop("mrope_section")}
    if text.pop("mrope_interleaved", False):
        rope["mrope_interleaved"] = True
    text = tiny.text_config(shape, tok, text, rope_parameters=rope)
    kind = shape.extra["model_type"]
    # Qwen2-VL names the vision width embed_dim and the merger's output hidden_size; the later ones hidden_size
    # and out_hidden_size
    out = {"hidden_size": text["hidden_size"]} if kind == "qwen2_vl" else {"out_hidden_size": text["hidden_size"]}
    vision = dict(shape.vision, patch_size=shape.patch_size, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, **out)
    config = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}[kind]
    return config(vision_config=vision, text_config=text, image_token_id=tok.token_to_id(IMAGE_PAD),
                  video_token_id=tok.token_to_id(VIDEO_PAD), vision_start_token_id=tok.token_to_id(VISION_START),
                  vision_end_token_id=tok.token_to_id(VISION_END),
                  tie_word_embeddings=text["tie_word_embeddings"])


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(tiny_config(shape, tok))
    model._mmedge_tiny = shape.extra  # how save_checkpoint sizes the image processor
    return model


def ckpt_model_type(checkpoint: Path) -> str:
    from mmedge.exporters.checkpoint import read_config

    return read_config(checkpoint)["model_type"]


def reference_processor(checkpoint: Path):
    """The checkpoint's processor for reference inputs: transformers' Qwen2VLProcessor with the PIL backend's
    image processor (the one the runtime matches bit for bit; the torchvision backend resizes differently) and
    without the video processor, which transformers builds on torchvision."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen3VLProcessor

    qwen3 = ckpt_model_type(checkpoint) == "qwen3_vl"

    ImageOnlyProcessor = image_only(Qwen3VLProcessor if qwen3 else Qwen2VLProcessor)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(checkpoint),
                              tokenizer=tokenizer, chat_template=chat_template(checkpoint))


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with its image processor (the PIL backend's), tokenizer and chat template.

    The published checkpoints also carry a video processor, which transformers builds on torchvision; the tiny
    ones leave it out so that they load where torchvision does not."""
    from transformers import Qwen2VLImageProcessorPil

    cfg = model.config
    extra = getattr(model, "_mmedge_tiny", {}) or {}
    tiny.copy_special_ids(model)
    hf_tok = tiny.hf_tokenizer(tok, extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD})
    hf_tok.chat_template = CHAT_TEMPLATE
    vision = cfg.vision_config
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=extra.get("min_pixels", 56 * 56), max_pixels=extra.get("max_pixels", 28 * 28 * 1280),
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    # the video processor's settings, as transformers saves them (it builds the processor itself on torchvision);
    # a tiny clip's frames get the images' pixel bounds
    kind = "Qwen3VLVideoProcessor" if cfg.model_type == "qwen3_vl" else "Qwen2VLVideoProcessor"
    settings = dict(video_processor_type=kind, do_sample_frames=True, fps=2.0, min_frames=4,
                    max_frames=16, size={"shortest_edge": image_processor.size["shortest_edge"],
                                         "longest_edge": image_processor.size["longest_edge"]},
                    patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                    temporal_patch_size=vision.temporal_patch_size, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                    resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                    do_convert_rgb=True)
    (out / "video_preprocessor_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out
