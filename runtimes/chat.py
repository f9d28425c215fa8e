"""Conversations: turns about images, each turn computing only what the turns before did not.

    chat = pipe.chat(system="You answer in one sentence.")
    print(chat.ask("photo.jpg", "What is on the table?"))
    print(chat.ask(None, "And left of it?"))  # turn 1 stays in the KV cache: only turn 2's new tokens are computed

Every turn renders the whole history with the package's chat template, as transformers does, and the Pipeline
compares the new token sequence with what its KV cache holds: the common prefix (the same tokens and the same
images) is kept and the rest computed, so a template that rewrites earlier turns costs a recomputation from the
first token that differs, never a wrong answer. The images of earlier turns are kept preprocessed, and their
embeddings stay in the Pipeline's image cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from mmedge.errors import InputError
from mmedge.runtimes.preprocess import ImageInput

if TYPE_CHECKING:
    from mmedge.runtimes.pipeline import Pipeline, PreparedImage

log = logging.getLogger(__name__)

OVERFLOW = ("error", "drop_oldest")


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str
    images: list["PreparedImage"] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # an answer's generated token ids


class Chat:
    """A conversation with one Pipeline (`pipe.chat()`). Not for several threads at once; each thread can hold a
    chat of its own over `pipe.clone()`. Another call on the same Pipeline between two turns is fine: the next
    turn finds less of itself in the cache and computes more.

    overflow: what a turn that no longer fits the package's context does: "error" (one clear error; the
    history is kept, `reset()` starts over) or "drop_oldest" (the oldest exchanges are left out of the prompt,
    and out of `history`, until it fits; the system prompt stays).
    """

    def __init__(self, pipe: "Pipeline", system: str | None = None, overflow: str = "error"):
        if pipe.codec.chat is None:
            raise InputError(f"this {pipe.manifest.model_type} package takes its prompt in a fixed format, not as a "
                             "conversation (it has no chat template): ask each question with generate()")
        if overflow not in OVERFLOW:
            raise InputError(f"overflow must be one of {', '.join(OVERFLOW)}, not {overflow!r}")
        if system is not None and not isinstance(system, str):
            raise InputError(f"system must be text, not {type(system).__name__}")
        self.pipe, self.system, self.overflow = pipe, system, overflow
        self.history: list[Turn] = []
        # what the error of a turn that does not fit tells the caller to do (the CLI names its own commands)
        self.overflow_advice = "start a new conversation (reset()), open it with overflow='drop_oldest'"

    def ask(self, image: ImageInput | Sequence[ImageInput] | None, text: str, **options: Any) -> str:
        """The answer to `text`, about `image` (one, a list, or None: the images of earlier turns stay in view),
        after the turns before; the question and answer join `history`."""
        return "".join(self.stream(image, text, **options))

    def stream(self, image: ImageInput | Sequence[ImageInput] | None, text: str, **options: Any) -> Iterator[str]:
        """As ask(), in pieces as they are generated. A stream closed early leaves what it gave as the answer."""
        if not isinstance(text, str):
            raise InputError(f"the question must be text, not {type(text).__name__}")
        pipe = self.pipe
        opts = pipe.options(**options)
        if opts.raw_prompt:
            raise InputError("a chat renders its prompt from its history with the chat template: raw_prompt does not "
                             "apply; use generate() for a prompt typed in full")
        if not opts.use_cache:
            raise InputError("a chat keeps its earlier turns in the KV cache: use_cache=False does not apply")
        images = list(image) if isinstance(image, (list, tuple)) else [] if image is None else [image]
        spec = pipe._image_spec(opts, max(1, len(images) + sum(len(t.images) for t in self.history)))
        user = Turn("user", text, [pipe._prepare_image(im, spec) for im in images])
        pieces: list[str] = []
        ids: list[int] = []
        answered = False

        def recorded(tokens):
            for token in tokens:
                ids.append(token)
                yield token

        with pipe._exclusive():
            tokens = pipe._generate(lambda: self._sequence(user, opts), opts, too_long=self.overflow_advice)
            try:
                for piece in pipe._pieces(recorded(tokens), opts):
                    pieces.append(piece)
                    yield piece
                answered = True
            except GeneratorExit:
                answered = True
                raise
            finally:
                if answered:
                    self.history += [user, Turn("assistant", "".join(pieces), tokens=ids)]

    def add(self, role: str, text: str, images: Sequence[ImageInput] = (), **options: Any) -> None:
        """Put a turn into the history without generating: a conversation held elsewhere (a client that sends
        the whole history with each question, as the OpenAI API does) replayed here. The next turn then finds
        in the KV cache whatever of that history this Pipeline computed last time."""
        if role not in ("user", "assistant"):
            raise InputError(f"a turn's role is 'user' or 'assistant', not {role!r}")
        if not isinstance(text, str):
            raise InputError(f"a turn's text must be text, not {type(text).__name__}")
        if role == "assistant" and images:
            raise InputError("an assistant turn holds text only: images go with the user's turns")
        prepared = []
        if images:
            pipe = self.pipe
            spec = pipe._image_spec(pipe.options(**options),
                                    len(images) + sum(len(t.images) for t in self.history))
            prepared = [pipe._prepare_image(im, spec) for im in images]
        self.history.append(Turn(role, text, prepared))

    def reset(self) -> None:
        """Forget the history (the system prompt stays). The cache is not cleared: the next turn reuses what
        still matches, the system prompt at least."""
        self.history = []

    def messages(self, turns: list[Turn] | None = None) -> list[dict]:
        """The history (or `turns`) as chat-template messages, as transformers' apply_chat_template takes them."""
        out = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system is not None else []
        for turn in self.history if turns is None else turns:
            out.append({"role": turn.role,
                        "content": [{"type": "image"} for _ in turn.images] + [{"type": "text", "text": turn.text}]})
        return out

    def _sequence(self, user: Turn, opts):
        turns = [*self.history, user]
        capacity = self.pipe.cache.capacity
        while True:
            seq = self.pipe._prepare([im for t in turns for im in t.images], "", opts, conversation=self.messages(turns))
            if len(seq.ids) < capacity or self.overflow == "error" or len(turns) == 1:
                return seq
            turns = turns[2:]  # the oldest question and its answer
            self.history = self.history[2:]
            log.info("the conversation outgrew the context (%d tokens of %d): left out its oldest exchange",
                     len(seq.ids), capacity)
