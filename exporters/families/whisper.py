"""Whisper: log-mel features -> audio encoder -> a decoder that reads it through cross-attention (speech to text).

Split (scheme encoder "audio", docs/package-format.md; no vision encoder or projector):
    encoder         the audio encoder over one 30-s window's log-mel features [B, mels, frames] (the runtime
                    computes them, runtimes/audio.py, equal to WhisperFeatureExtractor's), then each decoder layer's
                    cross-attention key and value projections -> cross_key_{j} / cross_value_{j}
                    [B, heads, frames / 2, head_dim]: once per window
    embed_tokens    the decoder's token table
    decoder         the decoder (learned positions from position_ids, pre-norm layers, final LayerNorm) + proj_out

Generation as WhisperForConditionalGeneration.generate without timestamps: the decoder starts from
<|startoftranscript|>, the language token, the task token and <|notimestamps|> (prompt.decoder_start_ids, whose
language and task tokens the runtime swaps for --language / --task; with no language given it picks the likeliest
language token after <|startoftranscript|>, as transformers detects it); the generation config's suppress_tokens
never come out, its begin_suppress_tokens not as the first token. Audio longer than a window is transcribed
window by window, the texts joined (no timestamp-based seeking).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from mmedge.exporters import family, tiny
from mmedge.exporters.family import Description, EncoderKV, Parts, encoder_decoder_cache, generation_defaults, \
    special_tokens
from mmedge.manifest import AudioSpec, PromptSpec, SchemeSpec

MODEL_TYPES = ("whisper",)
ALIASES = {"whisper-tiny": "openai/whisper-tiny", "whisper-base": "openai/whisper-base",
           "whisper-small": "openai/whisper-small"}
TAKES = "audio"  # what the family's packages read instead of images


def has_encoder(config: dict) -> bool:
    return True  # every Whisper: its encoder reads the log-mel features


class WhisperDecoderStack(torch.nn.Module):
    """WhisperDecoder's forward over the runtime's inputs: positions from position_ids, the ready-made masks, the
    cross-attention keys and values given (read from the cache, as transformers' layers do after the first step)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, cross_mask, cross_kv):
        d = self.decoder
        hidden = inputs_embeds + d.embed_positions(None, 0, position_ids=position_ids)
        both = encoder_decoder_cache(cache, cross_kv)
        for layer in d.layers:  # encoder_hidden_states: any tensor, to take the cross-attention path; not read
            hidden = layer(hidden, attention_mask, cross_kv[0], encoder_attention_mask=cross_mask, cache=both,
                           use_cache=True)
        return SimpleNamespace(last_hidden_state=d.layer_norm(hidden))


def split(model) -> Parts:
    cfg = model.config
    decoder = model.model.decoder
    return Parts(
        vision_encoder=None,
        projector=None,
        embed_tokens=decoder.embed_tokens,
        text_model=WhisperDecoderStack(decoder),
        head=model.proj_out,
        image_size=(0, 0),
        num_layers=cfg.decoder_layers,
        num_kv_heads=cfg.decoder_attention_heads,
        head_dim=cfg.d_model // cfg.decoder_attention_heads,
        hidden_size=cfg.d_model,
        vocab_size=cfg.vocab_size,
        cross_attention=cfg.decoder_layers,
        cross_arg=family.mask_and_kv,
        encoder=EncoderKV(model.model.encoder, [layer.encoder_attn for layer in decoder.layers],
                          input_name="input_features"),
        encoder_length=cfg.max_source_positions,
        encoder_input=(cfg.num_mel_bins, cfg.max_source_positions * 2),
    )


def audio_spec(checkpoint: Path, model) -> AudioSpec:
    path = Path(checkpoint) / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.exists() else {}
    return AudioSpec(sampling_rate=pre.get("sampling_rate", 16000), n_fft=pre.get("n_fft", 400),
                     hop_length=pre.get("hop_length", 160), chunk_length=pre.get("chunk_length", 30),
                     feature_size=pre.get("feature_size", model.config.num_mel_bins))


def describe(model, checkpoint: Path, tokenizer) -> Description:
    gen = model.generation_config
    languages = {code.strip("<|>"): int(i) for code, i in (getattr(gen, "lang_to_id", None) or {}).items()}
    tasks = {name: int(i) for name, i in (getattr(gen, "task_to_id", None) or {}).items()}
    start = [int(gen.decoder_start_token_id)]
    if languages:
        default = "en" if "en" in languages else next(iter(languages))
        start.append(languages[default])
    if tasks:
        start.append(tasks.get("transcribe", next(iter(tasks.values()))))
    if getattr(gen, "no_timestamps_token_id", None) is not None:
        start.append(int(gen.no_timestamps_token_id))
    generation = generation_defaults(model)
    generation.suppress_ids = [int(t) for t in (getattr(gen, "suppress_tokens", None) or [])]
    generation.begin_suppress_ids = [int(t) for t in (getattr(gen, "begin_suppress_tokens", None) or [])]
    return Description(
        preprocess=None,
        prompt=PromptSpec(template="{prompt}", image_token="", image_token_id=-1, image_seq_len=0,
                          decoder_start_ids=start, languages=languages, speech_tasks=tasks),
        schemes=SchemeSpec(positions="linear", attention="causal", encoder="audio",
                           encoder_length=model.config.max_source_positions),
        special_tokens=special_tokens(model, tokenizer),
        generation=generation,
        max_position_embeddings=model.config.max_target_positions,
        audio=audio_spec(checkpoint, model),
    )


def load(checkpoint: Path):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


# -- tiny random checkpoints (tests, first runs) -------------------------------------------------

TINY_SHAPES = {
    # 80 mel bins, 2 + 2 layers of 64 (4 heads): the encoder over a whole 30-s window (1500 positions)
    "whisper-tiny-random": tiny.TinyShape(
        "tiny random Whisper (audio encoder, decoder with cross-attention)",
        vision={},
        text=dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                  max_source_positions=1500, max_target_positions=64),
        image_size=0, patch_size=0,
    ),
}

LANGUAGES = ("en", "de", "fr", "es")
SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), "<|translate|>",
           "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A byte-level BPE whose special tokens are Whisper's (a few languages), after the text tokens as in the
    published vocabulary."""
    tok = tiny.build_tokenizer([], vocab_size=vocab_size, corpus=corpus, special=[])
    tok.add_special_tokens(SPECIAL)
    return tok


def tiny_model(shape: tiny.TinyShape, tok):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    eos, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    vocab = (tok.get_vocab_size() + 63) // 64 * 64
    space = tok.encode(" ").ids
    cfg = WhisperConfig(vocab_size=vocab, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos,
                        decoder_start_token_id=sot, **shape.text)
    model = WhisperForConditionalGeneration(cfg)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = sot, eos, eos, eos
    gen.lang_to_id = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES}
    gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    gen.no_timestamps_token_id = ids["<|notimestamps|>"]
    gen.forced_decoder_ids = [[1, None], [2, ids["<|transcribe|>"]]]  # the published configs': language detected
    gen.is_multilingual = True
    # as the published configs: the task tokens and the rest of the special ones never come out; a space or the
    # end not first
    gen.suppress_tokens = [ids[t] for t in ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                                            "<|nospeech|>")] + [vocab - 1]
    gen.begin_suppress_tokens = [*space[:1], eos]
    gen.max_length = shape.text["max_target_positions"]
    gen._from_model_config = False  # else from_pretrained drops the Whisper-only fields (lang_to_id, ...)
    return model


def save_checkpoint(model, tok, out: Path) -> Path:
    """save_pretrained the model with a WhisperFeatureExtractor and the tokenizer."""
    from transformers import WhisperFeatureExtractor

    hf_tok = _hf_tokenizer(tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def _hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def reference_processor(checkpoint: Path):
    """transformers' side of the features, for tests and evaluation: the checkpoint's WhisperFeatureExtractor."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(checkpoint)
