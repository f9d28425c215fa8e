"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmedge.errors import InputError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # never pick EOS: exactly max_new_tokens (benchmarks; transformers' min_new_tokens)
    use_cache: bool = True  # False recomputes the whole sequence each step (slow; for checking)
    raw_prompt: bool = False  # pass the prompt through untouched (already fully formatted)
    # the visual token budget of dynamic-resolution packages (preprocess "smart_resize"); None: the package's
    max_pixels: int | None = None  # the most pixels an image is resized to
    min_pixels: int | None = None  # the fewest
    max_image_tokens: int | None = None  # the most image tokens one prompt's images take together
    max_video_tokens: int | None = None  # the most tokens a prompt's video takes (its frames resized, or fewer taken)
    suppress_ids: list[int] = field(default_factory=list)  # tokens never picked (the package's, e.g. Whisper's)
    begin_suppress_ids: list[int] = field(default_factory=list)  # never picked as the first token

    def check(self) -> None:
        """Every option of the right type and range (sampling ones too when greedy: a wrong value is a mistake
        whether or not it is used this time)."""
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"{name} must be a whole number, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InputError(f"seed must be a whole number >= 0, got {self.seed!r}")
        for name in ("suppress_ids", "begin_suppress_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise InputError(f"{name} must be a list of token ids (whole numbers >= 0), got {ids!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise InputError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for name in ("do_sample", "ignore_eos", "use_cache", "raw_prompt"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_pixels", "min_pixels", "max_image_tokens", "max_video_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")


def choose(
    logits: np.ndarray, opts: GenerationOptions, rng: np.random.Generator, banned: list[int] | None = None
) -> int:
    """Pick the next token from logits [vocab], never one of `banned`."""
    if banned:
        logits = logits.copy()
        logits[banned] = -np.inf
    if not opts.do_sample:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / opts.temperature
    if 0 < opts.top_k < scores.size:
        kth = np.partition(scores, -opts.top_k)[-opts.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if opts.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, opts.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))
