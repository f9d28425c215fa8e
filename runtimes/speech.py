"""Pipeline's methods for packages that take audio (scheme encoder "audio": Whisper), mixed into Pipeline: each
window of the audio through the encoder once, the decoder from the start tokens with the call's language (given,
or detected) and task, the package's suppressed tokens never generated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from mmedge.errors import InputError
from mmedge.runtimes.audio import AudioInput
from mmedge.runtimes.sampling import GenerationOptions

if TYPE_CHECKING:
    from mmedge.runtimes.pipeline import _Sequence


class Transcription:
    def transcribe(self, audio: AudioInput, language: str | None = None, task: str | None = None,
                   sampling_rate: int | None = None, **options: Any) -> str:
        """The text spoken in `audio`: a file (WAV; FLAC, MP3, ... with PyAV) or samples ([n] or [n, channels]) at
        `sampling_rate` (default: the model's), resampled to the model's rate, transcribed window by window (30 s
        for Whisper) and joined. language: a code the model knows ("en", "de", ...; None: detected in each window,
        as transformers detects it); task: "transcribe" (default) or "translate" (into English)."""
        return "".join(self.stream_transcription(audio, language, task, sampling_rate, **options))

    def stream_transcription(self, audio: AudioInput, language: str | None = None, task: str | None = None,
                             sampling_rate: int | None = None, **options: Any) -> Iterator[str]:
        """transcribe() as its text becomes final."""
        opts = self.options(**options)
        for window in self._audio_windows(audio, language, task, sampling_rate):
            yield from self._pieces(self._audio_tokens(window, opts, language, task), opts)

    def transcribe_ids(self, audio: AudioInput, language: str | None = None, task: str | None = None,
                       sampling_rate: int | None = None, **options: Any) -> list[list[int]]:
        """The generated token ids of each window (EOS not included)."""
        opts = self.options(**options)
        return [list(self._audio_tokens(window, opts, language, task))
                for window in self._audio_windows(audio, language, task, sampling_rate)]

    def _audio_windows(self, audio, language, task, sampling_rate) -> list[np.ndarray]:
        from mmedge.runtimes import audio as sound

        spec = self.manifest.audio
        if spec is None:
            raise InputError(f"this {self.manifest.model_type} package takes images, not audio: use generate() "
                             "(CLI: --image and --prompt)")
        p = self.manifest.prompt
        if language is not None and language not in p.languages:
            known = ", ".join(p.languages) or "none: an English-only model"
            raise InputError(f"this model knows no language {language!r}; it knows {known}")
        if task is not None and task not in p.speech_tasks:
            raise InputError(f"task must be one of {', '.join(p.speech_tasks) or 'none (a model without tasks)'}, "
                             f"got {task!r}")
        if sampling_rate is not None and (isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int)
                                          or sampling_rate < 1):
            raise InputError(f"sampling_rate must be a whole number of Hz, got {sampling_rate!r}")
        return sound.windows(sound.load_audio(audio, spec.sampling_rate, sampling_rate), spec)

    def _audio_tokens(self, window: np.ndarray, opts: GenerationOptions, language: str | None,
                      task: str | None) -> Iterator[int]:
        from mmedge.runtimes.audio import log_mel

        with self._exclusive():
            yield from self._generate(lambda: self._prepare_audio(log_mel(window, self.manifest.audio), language,
                                                                  task), opts)

    def _prepare_audio(self, features: np.ndarray, language: str | None, task: str | None) -> _Sequence:
        """A window's sequence: the encoder run over its features, the decoder's start tokens with the language
        (given, or the likeliest after the start token) and task put in."""
        from mmedge.runtimes.pipeline import _Sequence

        p = self.manifest.prompt
        ids = list(p.decoder_start_ids)
        seq = _Sequence(np.asarray(ids[:1], np.int64), [], [], [], np.full(1, -1, np.int64), features=features)
        self._encode({"input_features": features[None]}, seq)
        seq.cross_sees = np.ones((1, 1), bool)
        swap = {}
        if p.languages:
            if language is None:  # one decoder step after the start token, over the language tokens
                self._held = None
                self.cache.reset()
                logits = self._cached_step(self._embed(seq.ids[None]), seq)[0, -1]
                codes = list(p.languages)
                language = codes[int(np.argmax(logits[[p.languages[c] for c in codes]]))]
                self.cache.reset()
            swap.update(dict.fromkeys(p.languages.values(), p.languages[language]))
        if task is not None:
            swap.update(dict.fromkeys(p.speech_tasks.values(), p.speech_tasks[task]))
        seq.ids = np.asarray([swap.get(t, t) for t in ids], np.int64)
        seq.block_of = np.full(len(seq.ids), -1, np.int64)
        seq.cross_sees = np.ones((len(seq.ids), 1), bool)
        seq.spans = None
        self.language = language
        return seq
