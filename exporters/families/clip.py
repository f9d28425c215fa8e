"""CLIP and SigLIP: dual encoders, for image and text embeddings and zero-shot classification.

A package of kind "embedding" (no decoder, no KV cache). Split:
    vision_encoder  pixel_values [B,3,H,W] -> image_embeds [B, dim], L2-normalised
                    CLIP: the vision tower's pooled CLS state, then visual_projection
                    SigLIP: the vision tower's attention-pooling head
    text_encoder    input_ids [B,S] -> text_embeds [B, dim], L2-normalised
                    CLIP: the causal text tower pooled at the first EOS token, then text_projection
                    SigLIP: the bidirectional text tower pooled at the last position (texts padded to 64,
                    as the model was trained), then its head

An image-text logit is exp(logit_scale) x cosine (+ logit_bias, SigLIP); CLIP's labels compete through a
softmax, SigLIP's each get a sigmoid. Both numbers go into the manifest. Preprocessing: CLIP's shortest-edge
resize and centre crop; SigLIP's plain resize, mean and std 0.5. The PIL image processors are matched (the
torchvision ones do not import beside the CPU torch). SigLIP's own tokenizer (SentencePiece, no fast version)
lowercases and strips punctuation before tokenizing: the manifest says so ("text_normalize": "siglip") and the
runtime does the same; a checkpoint with a tokenizer.json is taken as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmedge.errors import ExportError
from mmedge.exporters import lazy, tiny
from mmedge.exporters.checkpoint import CLIP_MEAN, CLIP_STD, image_processor_config, pixel_fields
from mmedge.exporters.family import EmbeddingDescription, EncoderParts, Normalized
from mmedge.manifest import EmbeddingSpec, PreprocessSpec

KIND = "embedding"
MODEL_TYPES = ("clip", "siglip")
ALIASES = {"clip": "openai/clip-vit-base-patch16", "siglip": "google/siglip-base-patch16-224"}
# classify's default prompts: CLIP's paper's, and the one SigLIP's model card uses
TEMPLATES = {"clip": "a photo of a {}.", "siglip": "This is a photo of {}."}


def load(checkpoint: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()


def fast_tokenizer(tok):
    """SiglipTokenizer (SentencePiece, no fast version) as a `tokenizers` Unigram with the same pieces, scores and
    normaliser, and the end token appended; its canonicalisation (lowercase, no punctuation) is the runtime's
    text_normalize "siglip". None for any other tokenizer."""
    if not hasattr(tok, "canonicalize_text") or not hasattr(tok, "vocab_file"):
        return None
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import SpmConverter

    class Converter(SpmConverter):
        def post_processor(self):
            eos = self.original_tokenizer.eos_token
            return processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B", eos],
                                                 special_tokens=[(eos, self.original_tokenizer.eos_token_id)])

    return Converter(tok).converted()


def split(model) -> EncoderParts:
    cfg = model.config
    siglip = cfg.model_type == "siglip"
    vision = Normalized(model.vision_model, None if siglip else model.visual_projection)
    text = Normalized(model.text_model, None if siglip else model.text_projection)
    size = cfg.vision_config.image_size
    return EncoderParts(vision_encoder=vision, text_encoder=text, image_size=(size, size), dim=_dim(cfg),
                        vocab_size=cfg.text_config.vocab_size, text_length=cfg.text_config.max_position_embeddings,
                        eos_id=None if siglip else cfg.text_config.eos_token_id)


def _dim(cfg) -> int:
    """The embedding size: SigLIP's text head's, CLIP's projections'."""
    return cfg.text_config.projection_size if cfg.model_type == "siglip" else cfg.projection_dim


def describe(model, checkpoint: Path, tokenizer) -> EmbeddingDescription:
    cfg = model.config
    siglip = cfg.model_type == "siglip"
    pre = image_processor_config(checkpoint)
    side = cfg.vision_config.image_size
    if siglip:
        size = pre.get("size") or {"height": side, "width": side}
        preprocess = PreprocessSpec(**pixel_fields(pre), height=size["height"], width=size["width"])
    else:
        crop = pre.get("crop_size") or {"height": side, "width": side}
        preprocess = PreprocessSpec(**pixel_fields(pre, mean=CLIP_MEAN, std=CLIP_STD), height=crop["height"],
                                    width=crop["width"], resize_mode="shortest_edge",
                                    shortest_edge=(pre.get("size") or {}).get("shortest_edge", side),
                                    do_center_crop=pre.get("do_center_crop", True))
    length = cfg.text_config.max_position_embeddings
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ExportError(f"the tokenizer in {checkpoint} has no pad token; set one (CLIP pads with its end token)")
    return EmbeddingDescription(preprocess=preprocess, embedding=EmbeddingSpec(
        dim=_dim(cfg),
        logit_scale=float(lazy.value(model.logit_scale).exp()),  # lazy: export may leave weights in the file
        logit_bias=float(lazy.value(model.logit_bias)) if siglip else 0.0,
        activation="sigmoid" if siglip else "softmax",
        template=TEMPLATES[cfg.model_type],
        text_length=min(length, getattr(tokenizer, "model_max_length", length) or length),
        text_padding="max_length" if siglip else "longest",
        pad_id=pad,
        text_normalize="siglip" if hasattr(tokenizer, "canonicalize_text") else None,
    ))


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # openai/clip-vit-*'s layout: pre-LN ViT with CLS, causal text tower pooled at the first EOS, projections
    "clip-tiny": tiny.TinyShape(
        "tiny random CLIP (ViT with CLS pooling, causal text tower pooled at EOS, projections)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=24),
        image_size=32, patch_size=8, extra=dict(projection_dim=24),
    ),
    # google/siglip-*'s layout: attention-pooling head, bidirectional text tower pooled at the last position
    # (texts padded to max_length), logit bias, sigmoid
    "siglip-tiny": tiny.TinyShape(
        "tiny random SigLIP (attention-pooling head, text pooled at the last position, sigmoid)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16, projection_size=32),
        image_size=32, patch_size=8, seed=1, extra=dict(model_type="siglip"),
    ),
}


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A BPE whose post-processor writes <bos> text <eos> (CLIP pools at the end token)."""
    from tokenizers import processors

    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus)
    ids = tiny.token_ids(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", ids["<bos>"]), ("<eos>", ids["<eos>"])])
    return tok


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    ids = tiny.token_ids(tok)
    extra = dict(shape.extra)
    siglip = extra.pop("model_type", "clip") == "siglip"
    text = dict(shape.text, vocab_size=tiny.vocab_size(shape, tok), pad_token_id=ids["<pad>"],
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    vision = dict(shape.vision, image_size=shape.image_size, patch_size=shape.patch_size)
    if siglip:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision, **extra))
    else:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, **extra))
    with torch.no_grad():  # a scale and bias of the published models' size, not the init's
        model.logit_scale.fill_(4.6)
        if siglip:
            model.logit_bias.fill_(-10.0)
    return model


def sentencepiece_tokenizer(folder: Path, max_length: int):
    """SigLIP's kind of tokenizer: a SentencePiece unigram model trained on the tiny corpus (pad 0, end 1, unk 2,
    as the BPE's), in a SiglipTokenizer (which lowercases and strips punctuation before tokenizing)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    from mmedge.tasks import shapes

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([line.replace("\n", " ") for line in shapes.corpus()] + tiny.default_corpus()))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", add_dummy_prefix=False, minloglevel=2,
                                   num_threads=1)
    return SiglipTokenizer(str(folder / "spiece.model"), model_max_length=max_length)


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with its processor (the PIL image processor, the tokenizer) beside it: CLIP's
    with the BPE, SigLIP's with a SentencePiece tokenizer as the published checkpoints have."""
    import tempfile

    from transformers import CLIPImageProcessorPil, CLIPProcessor, SiglipImageProcessorPil, SiglipProcessor

    side = model.config.vision_config.image_size
    length = model.config.text_config.max_position_embeddings
    hf_tok = tiny.hf_tokenizer(tok, model_max_length=length)
    if model.config.model_type == "siglip":
        with tempfile.TemporaryDirectory() as tmp:
            processor = SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": side, "width": side}),
                                        tokenizer=sentencepiece_tokenizer(Path(tmp), length))
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out)
            processor.save_pretrained(out)
        return out
    else:
        processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}), tokenizer=hf_tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
