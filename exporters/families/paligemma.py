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

import torch

from mmedge.exporters.checkpoint import image_processor_config
from mmedge.exporters.family import Description, Parts
from mmedge.manifest import GenerationDefaults, PreprocessSpec, PromptSpec, SchemeSpec, SpecialTokens
from mmedge.runtimes.preprocess import RESAMPLE_FROM_INT

MODEL_TYPES = ("paligemma",)
ALIASES = {
    "paligemma": "google/paligemma-3b-mix-224",
    "paligemma-448": "google/paligemma-3b-mix-448",
    "paligemma2": "google/paligemma2-3b-mix-224",
}


def load(checkpoint: Path):
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()


class _VisionEncoder(torch.nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values):
        return self.tower(pixel_values=pixel_values).last_hidden_state


class _Head(torch.nn.Module):
    def __init__(self, lm_head, softcap: float | None):
        super().__init__()
        self.lm_head = lm_head
        self.softcap = softcap

    def forward(self, hidden):
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def split(model) -> Parts:
    cfg = model.config
    text = cfg.text_config
    size = cfg.vision_config.image_size
    sliding = getattr(text, "sliding_window", None) is not None
    return Parts(
        vision_encoder=_VisionEncoder(model.model.vision_tower),
        projector=model.model.multi_modal_projector,
        embed_tokens=model.model.language_model.embed_tokens,
        text_model=model.model.language_model,
        head=_Head(model.lm_head, getattr(text, "final_logit_softcapping", None)),
        image_size=(size, size),
        num_layers=text.num_hidden_layers,
        num_kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        mask_names=("attention_mask", "sliding_attention_mask") if sliding else ("attention_mask",),
        mask_arg=(lambda m: {"full_attention": m[0], "sliding_attention": m[1]}) if sliding else (lambda m: m[0]),
    )


def describe(model, checkpoint: Path, tokenizer) -> Description:
    cfg = model.config
    pre = image_processor_config(checkpoint)
    size = pre.get("size", {})
    height = size.get("height", cfg.vision_config.image_size)
    width = size.get("width", cfg.vision_config.image_size)
    resample = pre.get("resample", 3)
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    image_token = "<image>"
    image_token_id = cfg.image_token_id
    if tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
        image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    return Description(
        preprocess=PreprocessSpec(
            height=height,
            width=width,
            resample=RESAMPLE_FROM_INT.get(resample, resample) if isinstance(resample, int) else resample,
            rescale=pre.get("rescale_factor", 1 / 255),
            mean=list(pre.get("image_mean", [0.5, 0.5, 0.5])),
            std=list(pre.get("image_std", [0.5, 0.5, 0.5])),
            convert_rgb=pre.get("do_convert_rgb", True) is not False,
            do_resize=pre.get("do_resize", True),
            do_rescale=pre.get("do_rescale", True),
            do_normalize=pre.get("do_normalize", True),
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
        ),
        special_tokens=SpecialTokens(
            bos_id=tokenizer.bos_token_id,
            bos=tokenizer.bos_token,
            eos_ids=[eos] if isinstance(eos, int) else list(eos or []),
            pad_id=tokenizer.pad_token_id,
        ),
        generation=GenerationDefaults(max_new_tokens=min(64, getattr(gen, "max_new_tokens", None) or 64)),
        max_position_embeddings=cfg.text_config.max_position_embeddings,
    )
