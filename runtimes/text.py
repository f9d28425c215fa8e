"""Tokenizer, prompt rendering and streaming detokenization (tokenizers library only)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from mmedge.errors import InputError, PackageError, first_line
from mmedge.manifest import PromptSpec, SpecialTokens


class TextCodec:
    def __init__(self, tokenizer_path: Path, prompt: PromptSpec, special: SpecialTokens, chat_template: str | None = None,
                 merge_size: int | None = None):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise PackageError(f"cannot read {tokenizer_path.name}: {exc}") from None
        self.prompt = prompt
        self.special = special
        self.merge_size = merge_size or 1  # image_layout "patch_grid": patches per side merged into one token
        self.chat = _compile(chat_template) if prompt.mode == "chat" else None
        if prompt.mode == "chat" and self.chat is None:
            raise PackageError("the package's prompt mode is chat but it has no chat template; re-export it")

    @classmethod
    def from_package(cls, directory: Path, manifest) -> "TextCodec":
        template = None
        if manifest.prompt.chat_template:
            path = Path(directory) / manifest.prompt.chat_template
            try:
                template = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise PackageError(f"cannot read the chat template {path}: {exc}; re-export the package") from None
        return cls(Path(directory) / manifest.tokenizer, manifest.prompt, manifest.special_tokens, template,
                   manifest.preprocess.merge_size if manifest.preprocess else None)

    def render(self, prompt: str, raw: bool = False, grid: tuple = (0, 0), grids: list | None = None,
               videos: list | None = None, seconds: list | None = None, starts: list | None = None) -> str:
        """The full prompt text: the family's format or chat template around the user's text, or `prompt` as is.

        Image markers (the chat template's per-image text, or those typed in a
        raw prompt) are then expanded into each image's tokens, in order;
        `grids` holds one entry per image (or `grid` the one image's): the
        (rows, cols) of tiles the preprocessing cut it into, or its (t, h, w)
        patch grid (image_layout "patch_grid"); `videos` the (t, h, w) grid of each video, whose markers
        (`video_marker`) become one video token per merged patch, or with `video_frame_expansion` one such
        text per temporal patch, stamped with its time from `seconds` / `starts` (a list per video).
        """
        checked_text(prompt)
        grids = [tuple(grid)] if grids is None else [tuple(g) for g in grids]
        videos = [tuple(v) for v in videos or []]
        if not raw and self.prompt.tasks:
            prompt = self.task_text(prompt)
        if videos and not self.prompt.video_marker:
            raise InputError("this package's model takes no video")
        if raw:
            text = prompt
        elif self.chat is not None:
            content = ([{"type": "image"} for _ in grids] + [{"type": "video"} for _ in videos]
                       + [{"type": "text", "text": prompt}])
            text = self._apply_template([{"role": "user", "content": content}])
        elif self.prompt.image_marker:  # a fixed format with image markers: each image's text where they are
            return self._format_with_markers(prompt, grids)
        else:
            if len(grids) != 1 or videos:
                raise InputError(f"this package's prompt format takes one image, not {len(grids)}"
                                 + (f" and {len(videos)} video(s)" if videos else ""))
            p = self.prompt
            image = self.image_text(grids[0]) if p.image_layout == "patch_grid" else p.image_token * p.image_seq_len
            text = self.prompt.template
            # placeholders replaced one by one, so braces in the user's text are safe
            text = text.replace("{image}", image).replace("{bos}", self.special.bos or "")
            return text.replace("{prompt}", prompt)
        text = self._merged(_expand(text, self.prompt.image_marker, grids, self.image_text, "image"))
        if videos:
            none = [None] * len(videos)
            text = _expand(text, self.prompt.video_marker, list(zip(videos, seconds or none, starts or none)),
                           lambda item: self.video_text(*item), "video")
        return text

    def task_text(self, prompt: str) -> str:
        """`prompt` with a task token of the family's (prompt.tasks: Florence-2's "<OD>") made its sentence, the
        text after a token that takes one in its {input}, as the family's processor does."""
        for token, sentence in self.prompt.tasks.items():
            if token not in prompt:
                continue
            rest = prompt.replace(token, "").strip()
            if "{input}" in sentence:
                return sentence.replace("{input}", rest)
            if rest:
                raise InputError(f"the task {token} takes no text: ask {token} alone, or a task that takes text "
                                 f"({', '.join(t for t, v in self.prompt.tasks.items() if '{input}' in v)})")
            return sentence
        return prompt

    def _format_with_markers(self, prompt: str, grids: list) -> str:
        """The fixed format with {image} as one image marker per image (none for a text-only prompt), each
        expanded into its image's text; the user's text goes in as typed (a marker in it is not an image)."""
        p = self.prompt
        if p.strip_prompt:
            prompt = prompt.strip(p.strip_prompt)
        before, _, after = p.template.partition("{prompt}")
        parts = [part.replace("{image}", p.image_marker * len(grids)).replace("{bos}", self.special.bos or "")
                 for part in (before, after)]
        count = parts[0].count(p.image_marker)
        head = _expand(parts[0], p.image_marker, grids[:count], self.image_text, "image")
        tail = _expand(parts[1], p.image_marker, grids[count:], self.image_text, "image")
        return self._merged(head) + prompt + self._merged(tail)

    def _merged(self, text: str) -> str:
        """`merge_adjacent` twice in a row written once."""
        twice = self.prompt.merge_adjacent and self.prompt.merge_adjacent * 2
        while twice and twice in text:
            text = text.replace(twice, self.prompt.merge_adjacent)
        return text

    def render_conversation(self, messages: list[dict], grids: list) -> str:
        """A whole conversation through the chat template, with the generation prompt: `messages` as
        transformers' apply_chat_template takes them (system, user and assistant turns; content a list of
        {"type": "text", "text": ...} and, in user turns, {"type": "image"} entries), then each image marker
        expanded into the next of `grids`' images, in order."""
        if self.chat is None:
            raise InputError("this package's model takes its prompt in a fixed format, not as a conversation (it has "
                             "no chat template): ask each question on its own with generate()")
        for message in messages:
            for item in message["content"]:
                if "text" in item:
                    checked_text(item["text"], f"the {message['role']} message")
        return _expand(self._apply_template(messages), self.prompt.image_marker, [tuple(g) for g in grids],
                       self.image_text, "image")

    def _apply_template(self, messages: list[dict]) -> str:
        try:
            return self.chat.render(messages=messages, add_generation_prompt=True, **self.prompt.template_vars)
        except Exception as exc:  # a template's raise_exception() or a broken template
            raise InputError(f"the package's chat template refused the prompt: {first_line(exc)}") from None

    def video_text(self, grid: tuple, seconds: list | None = None, starts: list | None = None) -> str:
        """The tokens of a video of (t, h, w) patches (or, taken as images by a fixed-size family, t frames): one
        run, or with `video_frame_expansion` one stamped text per temporal patch (or frame), joined by
        `video_frame_separator`; `seconds` / `starts` the times of each (their mean and first frame's)."""
        p = self.prompt
        t, h, w = grid
        if p.video_as_images:
            token = p.image_token
            per = h * w // self.merge_size ** 2 if p.image_layout == "patch_grid" else p.image_seq_len
        else:
            token, per = p.video_token, h * w // self.merge_size ** 2
        frame = token * per
        if not p.video_frame_expansion:
            return frame * t
        seconds = seconds if seconds is not None else [float(i) for i in range(t)]
        starts = starts if starts is not None else seconds
        return p.video_frame_separator.join(
            p.video_frame_expansion.replace("{seconds}", f"{s:.1f}").replace("{second}", str(int(first)))
            .replace("{index}", str(i + 1)).replace("{video}", frame)
            for i, (s, first) in enumerate(zip(seconds, starts)))

    def image_text(self, grid: tuple = (0, 0)) -> str:
        """The text one image becomes: `image_expansion`, after one `tile_expansion` per tile when the
        layout is "tiles" and the image was split (row by row, a newline after each row, then one more);
        with layout "tile_run", `image_expansion` around the tokens of all its tiles and the whole image in one
        run; with layout "patch_grid", one image token per merged patch of its (t, h, w) grid."""
        p = self.prompt
        if p.image_layout == "patch_grid":
            t, h, w = grid
            return p.image_expansion.replace("{image}", p.image_token * (t * h * w // self.merge_size ** 2))
        image = p.image_token * p.image_seq_len
        whole = p.image_expansion.replace("{image}", image)
        rows, cols = grid
        if p.image_layout == "single" or not rows:
            return whole
        if p.image_layout == "tile_run":  # every tile's tokens, then the whole image's, in one run
            return p.image_expansion.replace("{image}", image * (rows * cols + 1))
        if p.image_layout != "tiles" or not p.tile_expansion:
            raise PackageError(f"this mmedge does not know the image layout {p.image_layout!r}; upgrade mmedge")
        tile = p.tile_expansion.replace("{image}", image)
        lines = ["".join(tile.replace("{row}", str(r)).replace("{col}", str(c)) for c in range(1, cols + 1)) + "\n"
                 for r in range(1, rows + 1)]
        return "".join(lines) + "\n" + whole

    def encode(self, text: str) -> np.ndarray:
        """Token ids of a rendered prompt.

        Chat-mode packages let the tokenizer add its special tokens (e.g. a
        leading BOS) unless the text already starts with BOS, which is what
        transformers' processors do; the fixed formats carry their own.
        """
        bos = self.special.bos
        add = self.prompt.mode == "chat" and not (bos and text.startswith(bos))
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=add).ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def checked_text(text, what: str = "the prompt") -> str:
    """`text`, if it is text a tokenizer takes: a str of valid Unicode. (A command-line argument in another encoding
    than UTF-8 reaches Python with unpaired surrogates, which the tokenizer refuses with a TypeError.)"""
    if not isinstance(text, str):
        raise InputError(f"{what} must be text (a str), not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8 text (bytes in another encoding?): pass it as UTF-8") from None
    return text


def _expand(text: str, marker: str | None, items: list, expand, what: str) -> str:
    """Each `marker` in `text` replaced by `expand(item)` of the next of `items`, in order (no markers: `text` as
    it is, and nothing is expanded)."""
    pieces = text.split(marker) if marker else [text]
    if len(pieces) == 1:
        return text
    if len(pieces) - 1 != len(items):
        raise InputError(f"the prompt has {len(pieces) - 1} {what} markers ({marker!r}) for {len(items)} "
                         f"{what}(s): give one {what} per marker")
    return pieces[0] + "".join(expand(item) + rest for item, rest in zip(items, pieces[1:]))


def _compile(source: str | None):
    """A chat template compiled the way transformers compiles it (sandboxed Jinja, same options and helpers)."""
    if source is None:
        return None
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PackageError("this package renders a chat template, which needs jinja2: pip install jinja2") from None

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for training masks; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise PackageError(f"the package's chat template does not parse: {exc}; re-export the package") from None


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
