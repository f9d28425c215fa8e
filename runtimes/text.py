"""Tokenizer, prompt rendering and streaming detokenization (tokenizers library only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmedge.errors import PackageError
from mmedge.manifest import PromptSpec, SpecialTokens


class TextCodec:
    def __init__(self, tokenizer_path: Path, prompt: PromptSpec, special: SpecialTokens):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise PackageError(f"cannot read {tokenizer_path.name}: {exc}") from None
        self.prompt = prompt
        self.special = special

    def render(self, prompt: str, raw: bool = False) -> str:
        """The full prompt text: the family's format around the user's text, or `prompt` as is."""
        if raw:
            return prompt
        image = self.prompt.image_token * self.prompt.image_seq_len
        text = self.prompt.template
        # placeholders replaced one by one, so braces in the user's text are safe
        text = text.replace("{image}", image).replace("{bos}", self.special.bos or "")
        return text.replace("{prompt}", prompt)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces.

    Holds back an incomplete UTF-8 sequence and any tail that could be the
    start of a stop string, so what it yields never has to be taken back.
    """

    def __init__(self, codec: TextCodec, stop: list[str] | None = None):
        self.codec = codec
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._release(text, final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self.codec.decode(self.ids), final=True)

    def _release(self, text: str, final: bool) -> str:
        cut = len(text)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1 and at < cut:
                cut = at
                self.stopped = True
        if not self.stopped and not final:
            cut -= self._held_back(text)
        piece = text[self.emitted : max(cut, self.emitted)]
        self.emitted = max(cut, self.emitted)
        return piece

    def _held_back(self, text: str) -> int:
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
