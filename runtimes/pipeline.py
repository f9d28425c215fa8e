"""Pipeline: load a package, run image + prompt through its graphs, stream text.

    pipe = Pipeline.load("pkg/")
    print(pipe.generate("cat.jpg", "caption en"))
    for piece in pipe.stream("cat.jpg", "caption en"):
        print(piece, end="")

Uses numpy, tokenizers, Pillow and one backend; never torch or transformers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mmedge.errors import InputError
from mmedge.runtimes import schemes
from mmedge.runtimes.batch import RowBatching, Timings
from mmedge.runtimes.loading import PackageGraphs
from mmedge.runtimes.speech import Transcription
from mmedge.runtimes.audio import AudioInput
from mmedge.runtimes.media_cache import media_key
from mmedge.runtimes.preprocess import ImageInput, load_image, preprocess_with_grid, smart_resize
from mmedge.runtimes.sampling import GenerationOptions, choose
from mmedge.runtimes.text import StreamDecoder
from mmedge.runtimes.video import Video, VideoInput, prepare_video, video_units

if TYPE_CHECKING:
    from mmedge.runtimes.boxes import Detections
    from mmedge.runtimes.chat import Chat

log = logging.getLogger(__name__)

@dataclass
class _Sequence:
    """One prompt made ready for the graphs: its token ids, its images' pixels (and grids), the attention blocks
    and, where the position scheme gives each prompt token its own, the prompt's positions."""

    ids: np.ndarray
    pixels: list[np.ndarray]  # per image: [frames, 3, H, W], or [patches, patch_dim] (vision "patch_grid")
    grids: list[tuple]  # per image: (rows, cols) of tiles, or (t, h, w) patches
    videos: list[Video]  # after the images, in prompt order
    block_of: np.ndarray
    positions: np.ndarray | None = None  # [3, len(ids)] for "mrope"
    deepstack: np.ndarray | None = None  # [k, 1, len(ids), hidden]: visual features for the decoder's first layers
    cross: dict | None = None  # image placement "cross_attention": the images' keys and values per cross layer
    cross_sees: np.ndarray | None = None  # [len(ids), images]: which images each prompt token sees
    source: np.ndarray | None = None  # an encoder-decoder's encoder input ids (then `ids` are the decoder's)
    features: np.ndarray | None = None  # an audio package's: one window's log-mel features [mels, frames]
    keys: list[bytes] = field(default_factory=list)  # per image, then per video: its pixels' content key
    spans: list[tuple] = field(default_factory=list)  # (first, last + 1, key) of each image's and video's tokens


@dataclass
class PreparedImage:
    """An image as preprocessing left it (pixels, grid) and its content key: a conversation keeps its images so,
    and hands them back on every turn."""

    pixels: np.ndarray
    grid: tuple
    key: bytes


@dataclass
class _Held:
    """The sequence whose keys and values the Pipeline's KV cache holds: its prompt (ids, attention blocks, media
    spans) and the generated tokens fed after it."""

    ids: np.ndarray
    blocks: np.ndarray
    spans: list
    fed: list[int] = field(default_factory=list)

    def all_ids(self) -> np.ndarray:
        return np.concatenate([self.ids, np.asarray(self.fed, np.int64)])

    def all_blocks(self) -> np.ndarray:
        return np.concatenate([self.blocks, np.full(len(self.fed), -1, np.int64)])  # generated: in no block


class Pipeline(PackageGraphs, RowBatching, Transcription):
    """A package's graphs stitched together for generation (loading and what the decoder takes: runtimes/loading.py)."""

    @contextmanager
    def _exclusive(self):
        """Hold the Pipeline for one generation. Other threads wait their turn; the same thread starting a second
        generation before finishing the first (two interleaved streams) would corrupt the shared cache, so it
        is refused."""
        me = threading.get_ident()
        if self._owner == me:
            raise InputError("this Pipeline is already generating in this thread: finish or close() the first "
                             "stream before starting another, or use pipe.clone()")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    # -- public API --------------------------------------------------------

    def generate(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str,
                 video: VideoInput | None = None, **options: Any) -> str:
        """The answer to `prompt` about `image` (or a list of images, in the order the prompt takes them, or None)
        and, for families that take video, `video`: a file path (read with PyAV, frames sampled at the
        package's rate) or a list of frames sampled at that rate."""
        return "".join(self.stream(image, prompt, video=video, **options))

    def stream(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str, video: VideoInput | None = None,
               **options: Any) -> Iterator[str]:
        opts = self.options(**options)
        yield from self._pieces(self._tokens(image, prompt, opts, video), opts)

    def encode_media(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str = "",
                     video: VideoInput | None = None, **options: Any) -> None:
        """Run the vision encoder and projector on `image` (and `video`) now, keeping what they make in the image
        cache (`image_cache_mb`, `self.media`): a later generate() about the same media starts at its prompt (a
        robot encodes a camera frame while the question is still being asked). `prompt` and `options` as
        generate() takes them: they decide how many images a prompt holds and how a dynamic-resolution image is
        cut. Media over the cache's budget is computed and not kept."""
        if self.encoder:
            raise InputError(f"this {self.manifest.model_type} package's encoder reads the prompt with the "
                             f"{'audio' if self.encoder == 'audio' else 'image'}: nothing of it can be computed "
                             "ahead; call generate()")
        with self._exclusive():
            seq = self._prepare(image, prompt, self.options(**options), video)
            if self.cross_names:
                self._with_cross_states(seq)
            else:
                self._image_embeddings([seq])

    def prompt_tokens(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str,
                      video: VideoInput | None = None, **options: Any) -> int:
        """How many tokens the prompt is with its media (image tokens included) as generate() would give it: what
        its prefill costs (an encoder-decoder's: what its encoder reads), and how much of the context it takes."""
        with self._exclusive():
            seq = self._prepare(image, prompt, self.options(**options), video)
        return len(seq.source if seq.source is not None else seq.ids)

    def _pieces(self, tokens, opts: GenerationOptions) -> Iterator[str]:
        """Text of `tokens` as it becomes final, up to the first stop string."""
        decoder = StreamDecoder(self.codec, opts.stop)
        for token in tokens:
            piece = decoder.push(token)
            if piece:
                yield piece
            if decoder.stopped:
                return
        tail = decoder.finish()
        if tail:
            yield tail

    def chat(self, system: str | None = None, overflow: str = "error") -> "Chat":
        """A conversation (runtimes/chat.py): `chat.ask(image_or_None, text)` turn after turn, each extending the
        KV cache the turns before left instead of computing the whole history again."""
        from mmedge.runtimes.chat import Chat

        if self.encoder:
            raise InputError(f"this {self.manifest.model_type} package's model answers one prompt at a time (an "
                             "encoder-decoder, not a chat model): use generate() per question")
        return Chat(self, system, overflow)

    def detect(self, image: ImageInput, objects: str | Sequence[str], **options: Any) -> "Detections":
        """Boxes around `objects` ("cat ; dog", or a list) in `image`, asked with the family's detection prompt and
        read from the answer in its box format (runtimes/boxes.py), in the original image's pixels. `objects` may
        instead be one of the family's task tokens (Florence-2: "<OD>" for every object it knows,
        "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>a red circle"), asked as it is."""
        from mmedge.runtimes import boxes

        s = self.manifest.schemes
        self._box_format()
        if isinstance(image, (list, tuple)):
            raise InputError("detect() looks at one image")
        picture = load_image(image)
        asked = objects.strip() if isinstance(objects, str) else ""
        task = any(asked.startswith(token) for token in self.manifest.prompt.tasks)  # a task of the family's
        prompt = asked if task else boxes.detect_prompt(s.detect_prompt, s.boxes, objects)
        text = self.generate(picture, prompt, **options)
        return boxes.parse(s.boxes, text, picture.size, self._seen_size(picture, options))

    def boxes(self, image: ImageInput, text: str) -> "Detections":
        """The boxes in an answer about `image` (say, to a detection prompt of one's own), as detect() reads them."""
        from mmedge.runtimes import boxes

        fmt = self._box_format()
        picture = load_image(image)
        return boxes.parse(fmt, text, picture.size, self._seen_size(picture, {}))

    def _box_format(self) -> str:
        s = self.manifest.schemes
        if not s.boxes or not s.detect_prompt:
            raise InputError(f"this {self.manifest.model_type} package's model writes no boxes mmedge reads "
                             "(PaliGemma, Qwen-VL and Florence-2 do); ask with generate() instead")
        return s.boxes

    def _seen_size(self, picture, options: dict) -> tuple[int, int]:
        """(width, height) of the image as the vision encoder sees it."""
        spec = self._image_spec(self.options(**{k: v for k, v in options.items()
                                                if k in ("max_pixels", "min_pixels", "max_image_tokens")}), 1)
        if spec.resize_mode == "smart_resize":
            h, w = smart_resize(picture.size[1], picture.size[0], spec)
            return w, h
        return spec.width, spec.height

    def generate_batch(self, requests: Sequence[tuple[ImageInput, str]], **options: Any) -> list[str]:
        """Answers to several (image, prompt) pairs, generated together: one vision encoder call for all their
        images and one decoder call per step for all of them. Each answer is the one generate() gives for its
        pair alone (up to the order of floating-point sums in batched kernels). Options apply to every row."""
        opts = self.options(**options)
        return ["".join(self._pieces(tokens, opts)) for tokens in self._batch_tokens(requests, opts)]

    def generate_ids_batch(self, requests: Sequence[tuple[ImageInput, str]], **options: Any) -> list[list[int]]:
        """generate_ids for several (image, prompt) pairs at once (see generate_batch): a list per pair."""
        return self._batch_tokens(requests, self.options(**options))

    def options(self, **options: Any) -> GenerationOptions:
        """The package's generation defaults with `options` applied on top."""
        base = {**dataclasses.asdict(self.manifest.generation), **self.defaults}
        known = {f.name for f in dataclasses.fields(GenerationOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        opts = GenerationOptions(**{**base, **{k: v for k, v in options.items() if v is not None}})
        opts.check()
        if opts.max_video_tokens is not None and self.manifest.prompt.video_marker is None:
            raise InputError(f"max_video_tokens is the token budget of a video; this {self.manifest.model_type} "
                             "package's model takes none")
        return opts

    def encode_prompt(self, prompt: str, raw: bool = False, grid: tuple = (0, 0), grids: list | None = None
                      ) -> np.ndarray:
        """Token ids of the prompt; `grid`: the image's (rows, cols) of tiles or (t, h, w) patches, as
        preprocessing gives it (`grids`: one per image, for several)."""
        return self.codec.encode(self.codec.render(prompt, raw=raw, grid=grid, grids=grids))

    def generate_ids(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str,
                     video: VideoInput | None = None, **options: Any) -> Iterator[int]:
        """Yield generated token ids (EOS is not yielded)."""
        return self._tokens(image, prompt, self.options(**options), video)

    def teacher_forced_logits(self, image: ImageInput, prompt: str, tokens: Sequence[int],
                              audio: AudioInput | None = None) -> np.ndarray:
        """Next-token logits after the prompt and after each of `tokens` fed in turn: [len(tokens) + 1, vocab].
        An audio package takes `audio` instead (its first window, the language detected) and no image or prompt.

        Runs the same cached prefill and decode steps as generation, so two
        packages of one model (fp32 and quantized) can be compared position by
        position on the same token sequence.
        """
        with self._exclusive():
            return self._teacher_forced_logits(image, prompt, tokens, audio)

    def _teacher_forced_logits(self, image: ImageInput, prompt: str, tokens: Sequence[int], audio=None) -> np.ndarray:
        if audio is not None:
            from mmedge.runtimes.audio import log_mel

            window = self._audio_windows(audio, None, None, None)[0]
            seq = self._prepare_audio(log_mel(window, self.manifest.audio), None, None)
        else:
            seq = self._prepare(image, prompt, self.options())
        if len(seq.ids) + len(tokens) > self.cache.capacity:
            raise InputError(f"{len(seq.ids)} prompt and {len(tokens)} forced tokens exceed this package's context "
                             f"of {self.cache.capacity}")
        embeds = self._prompt_embeddings(seq)
        self._held = None
        self.cache.reset()
        rows = [self._cached_step(embeds, seq)[0, -1].copy()]
        for token in tokens:
            rows.append(self._cached_step(self._embed(np.array([[token]], dtype=np.int64)), seq)[0, -1].copy())
        return np.stack(rows)

    # -- internals ---------------------------------------------------------

    def _tokens(self, image, prompt: str, opts: GenerationOptions, video=None) -> Iterator[int]:
        with self._exclusive():
            yield from self._generate(lambda: self._prepare(image, prompt, opts, video), opts)

    def _generate(self, prepare, opts: GenerationOptions, too_long: str = "shorten the prompt") -> Iterator[int]:
        """Tokens for the sequence `prepare()` makes. The prompt's leading tokens whose keys and values the cache
        still holds from the call before (the same tokens and images: a fixed instruction before a new frame, the
        earlier turns of a conversation) are not computed again (`timings.reused_tokens`)."""
        rng = np.random.default_rng(opts.seed)
        t = self.timings = Timings()
        start = time.perf_counter()
        seq = prepare()
        ids = seq.ids
        t.preprocess = time.perf_counter() - start
        capacity = self.cache.capacity
        if len(ids) >= capacity:
            raise InputError(f"the prompt is {len(ids)} tokens but this package's context holds {capacity} "
                             f"(max_context); {too_long} or re-export with a larger --max-context")
        t.prompt_tokens = len(ids)
        embeds = self._prompt_embeddings(seq)
        held, self._held = self._held, None  # from here the cache holds this sequence, once its prefill is in
        if opts.use_cache:
            keep = self.cache.truncate(self._reusable(held, seq) if self.reuse_prefix else 0)
            if not keep:
                self.cache.reset()
            step = self._cached_step
        else:
            keep, step = 0, self._uncached_step(embeds)
            self.cache.reset()
        t.reused_tokens = keep
        start = time.perf_counter()
        logits = step(embeds[:, keep:] if keep else embeds, seq)
        t.prefill = time.perf_counter() - start
        if self.logits_out is not None:
            self.logits_out.append(logits[0, -1].copy())
        if opts.use_cache and seq.spans is not None:
            self._held = held = _Held(ids, seq.block_of, seq.spans)
        eos = self.manifest.special_tokens.eos_ids
        budget = min(opts.max_new_tokens, capacity - len(ids))
        if budget < opts.max_new_tokens:
            log.warning("max_new_tokens %d is more than the %d tokens this package's context (max_context %d) has "
                        "left after the %d-token prompt: generating at most %d", opts.max_new_tokens, budget,
                        capacity, len(ids), budget)
        first, banned = self._banned(opts, logits.shape[-1])  # once, not per step
        for i in range(budget):
            token = choose(logits[0, -1], opts, rng, banned if i else first)
            if token in eos:
                return
            t.new_tokens += 1
            yield token
            if i + 1 == budget:
                return
            start = time.perf_counter()
            logits = step(self._embed(np.array([[token]], dtype=np.int64)), seq)
            t.steps.append(time.perf_counter() - start)
            if self.logits_out is not None:
                self.logits_out.append(logits[0, -1].copy())
            t.decode += t.steps[-1]
            if self._held is not None:
                held.fed.append(token)

    def _banned(self, opts: GenerationOptions, vocab: int) -> tuple[list[int] | None, list[int] | None]:
        """The tokens generation's first new token may not be, and those the later ones may not be (None: any);
        an id outside the `vocab` logits is refused, once, before the decode loop."""
        never = [*(self.manifest.special_tokens.eos_ids if opts.ignore_eos else []), *opts.suppress_ids]
        first = never + opts.begin_suppress_ids
        if first and max(first) >= vocab:
            raise InputError(f"token id {max(first)} is not in the model's vocabulary of {vocab} "
                             "(suppress_ids / begin_suppress_ids)")
        return first or None, never or None

    def greedy_along(self, logits: np.ndarray) -> list[int]:
        """The tokens greedy generation (the package's default options) picks from each row of teacher-forced
        `logits` [positions, vocab], up to the first end of sequence (not included). Generation makes the same
        cached steps (teacher_forced_logits), so while its tokens are the forced ones it sees these very rows:
        the result equals `generate_ids` wherever it reproduces the forced tokens, and differs from them
        wherever generation would."""
        opts = self.options()
        if opts.do_sample:
            raise ValueError("greedy_along needs greedy default options")
        eos = self.manifest.special_tokens.eos_ids
        out, (first, banned) = [], self._banned(opts, logits.shape[-1])
        for i, row in enumerate(logits):
            token = choose(row, opts, None, banned if i else first)
            if token in eos:
                break
            out.append(token)
        return out

    def _reusable(self, held: _Held | None, seq: _Sequence) -> int:
        """The prompt's leading tokens whose keys and values the cache holds (0: none, or unknown)."""
        if held is None or seq.spans is None:
            return 0
        old = held.all_ids()
        if len(old) != self.cache.length:
            return 0
        if self.cross_names and [s[2] for s in held.spans] != [s[2] for s in seq.spans]:
            return 0  # tokens that see no image attend over every image: other images change them all
        return schemes.reusable_prefix(old, held.all_blocks(), held.spans, seq.ids, seq.block_of, seq.spans)

    def _batch_tokens(self, requests: Sequence[tuple[ImageInput, str]], opts: GenerationOptions) -> list[list[int]]:
        requests = list(requests)
        if not requests:
            return []
        bad = [i for i, r in enumerate(requests) if not (isinstance(r, (tuple, list)) and len(r) == 2)]
        if bad:
            raise InputError(f"generate_batch takes (image, prompt) pairs; item {bad[0]} is {requests[bad[0]]!r}")
        limit = self.max_batch
        if limit is not None and len(requests) > limit:
            raise InputError(f"this {self.manifest.target} package's decoder runs {limit} sequence at a time, not "
                             f"{len(requests)}: call generate() per pair, or export for onnxruntime or openvino")
        if not opts.use_cache:
            raise InputError("generate_batch always uses the KV cache; use generate() for use_cache=False")
        with self._exclusive():
            self._held = None  # an engine-held cache serves the batch too
            return self._generate_rows(requests, opts)

    def _prompt_embeddings_many(self, seqs: list[_Sequence]) -> list[np.ndarray]:
        """Each sequence's prompt embeddings [1, len, hidden], with its images' (and videos') embeddings in their
        tokens (and, for a DeepStack decoder, their visual features at the same tokens in `seq.deepstack`)."""
        if self.encoder:  # (an audio window's encoder ran as it was prepared)
            return [self._with_encoder_states(seq) for seq in seqs]
        if self.cross_names:
            return [self._with_cross_states(seq) for seq in seqs]
        rows = []
        prompt = self.manifest.prompt
        for seq, (images, videos) in zip(seqs, self._image_embeddings(seqs)):
            embeds = self._embed(seq.ids[None])
            if self.deepstack_shape:
                k, hidden, dtype = self.deepstack_shape
                seq.deepstack = np.zeros((k, 1, len(seq.ids), hidden), dtype)
            for token, (media, extra) in ((prompt.image_token_id, images), (prompt.video_token_id, videos)):
                if media is None:
                    continue
                embeds = schemes.place_image(self.manifest.schemes, embeds, seq.ids[None], media, token)
                if self.deepstack_shape:
                    seq.deepstack[:, 0, seq.ids == token] = extra["deepstack_embeds"]
            rows.append(embeds)
        return rows

    def _with_encoder_states(self, seq: _Sequence) -> np.ndarray:
        """An encoder-decoder's decoder-prompt embeddings, with the encoder run once over the source (its images'
        embeddings in their tokens) for the decoder's cross-attention keys and values in `seq.cross`, which
        every decoder token sees whole."""
        if seq.cross is None:  # (an audio window's were computed as it was prepared)
            (images, _), _ = self._image_embeddings([seq])[0]
            embeds = self._embed(seq.source[None])
            if images is not None:
                embeds = schemes.place_image(self.manifest.schemes, embeds, seq.source[None], images,
                                             self.manifest.prompt.image_token_id)
            self._encode({"inputs_embeds": embeds}, seq)
        seq.cross_sees = np.ones((len(seq.ids), 1), bool)
        return self._embed(seq.ids[None])

    def _encode(self, feeds: dict[str, np.ndarray], seq: _Sequence) -> None:
        start = time.perf_counter()
        seq.cross = self.graphs["encoder"].run(feeds)
        self.timings.encoder = time.perf_counter() - start

    def _with_cross_states(self, seq: _Sequence) -> np.ndarray:
        """A cross-attention prompt's embeddings (its tokens' own), with its images' keys and values for the
        cross-attention layers in `seq.cross` (each image's computed once: an image seen before takes them from
        `self.media`) and which images each token sees in `seq.cross_sees`."""
        vision, projector = self.graphs["vision_encoder"], self.graphs["projector"]
        self.timings.vision = self.timings.projector = 0.0
        states = []
        for key, pixels, grid in zip(seq.keys, seq.pixels, seq.grids):
            found = self.media.get(key)
            if found is None:
                start = time.perf_counter()
                features = vision.run(schemes.vision_feeds(self.manifest.schemes, pixels, grid))["image_features"]
                self.timings.vision += time.perf_counter() - start
                start = time.perf_counter()
                found = (None, projector.run({"image_features": features}))
                self.timings.projector += time.perf_counter() - start
                self.media.put(key, found)
            states.append(found[1])
        if states:
            seq.cross = {name: np.concatenate([s[name] for s in states], axis=2) for name in self.cross_names}
        else:  # no image: one empty position, which no token sees
            spec = self.manifest.graphs["decoder"].inputs[self.cross_names[0]]
            empty = np.zeros((1, spec.shape[1], 1, spec.shape[3]), np.dtype(spec.dtype))
            seq.cross = {name: empty for name in self.cross_names}
        seq.cross_sees = schemes.cross_visibility(self.manifest.schemes, seq.ids, self.manifest.prompt.image_token_id,
                                                  len(seq.pixels), self.manifest.special_tokens.eos_ids)
        return self._embed(seq.ids[None])

    def _cross_feeds(self, seq: _Sequence, start: int, n: int) -> dict[str, np.ndarray]:
        """The cross-attention decoder's image (or encoder) inputs for the tokens in slots start..start+n-1."""
        if self.encoder:
            lengths = visible = [next(iter(seq.cross.values())).shape[2]]
        else:
            lengths = [self.image_positions] * len(seq.pixels)
            tiles = [int(np.prod(g)) if self.manifest.schemes.vision == "tile_canvas" else len(p)  # rest: padding
                     for p, g in zip(seq.pixels, seq.grids)]
            visible = [n * self.tile_positions for n in tiles]
        mask, rows = schemes.cross_masks(seq.cross_sees, start, n, lengths, visible, dtype=self.cross_dtype)
        takes = self.manifest.graphs["decoder"].inputs  # a model that derives the rows from the mask takes no rows
        return {name: value for name, value in (("cross_mask", mask), ("cross_rows", rows), *seq.cross.items())
                if name in takes}

    def _positions(self, seq: _Sequence, start: int, n: int, pad: int = 0) -> np.ndarray:
        return schemes.position_ids(self.manifest.schemes, start, n, pad, seq.positions)

    def _deepstack(self, seq: _Sequence, start: int, n: int, pad: int = 0) -> np.ndarray:
        """The DeepStack features for the tokens in slots start..start+n-1 (`pad` slots of left padding first):
        the prompt's image tokens carry theirs, every other token zeros."""
        k, hidden, dtype = self.deepstack_shape
        out = np.zeros((k, 1, n, hidden), dtype)
        index = np.arange(start - pad, start - pad + n)
        inside = (index >= 0) & (index < len(seq.ids))
        if seq.deepstack is not None and inside.any():
            out[:, :, inside] = seq.deepstack[:, :, index[inside]]
        return out

    def _image_embeddings(self, seqs: list[_Sequence]) -> list[tuple[np.ndarray, dict]]:
        """Per sequence, (images, videos): each the embeddings in prompt order, [tokens, hidden] (or [frames,
        tokens, hidden]), and the vision encoder's other outputs for them (DeepStack features [k, tokens,
        hidden]); (None, {}) where the sequence has none.

        Fixed-size images and tiles of all sequences go through the vision encoder and projector together,
        `vision_batch` a call; "patch_grid" encoders take one image a call (attention over its patches alone, so
        memory follows the largest image, not the sum of them). An image seen before (the same preprocessed
        pixels) takes its embeddings from `self.media` instead."""
        vision, projector = self.graphs["vision_encoder"], self.graphs["projector"]
        seconds = {"vision": 0.0, "projector": 0.0}

        def encode(feeds):
            start = time.perf_counter()
            out = vision.run(feeds)
            seconds["vision"] += time.perf_counter() - start
            start = time.perf_counter()
            embeds = projector.run({"image_features": out.pop("image_features")})["image_embeds"]
            seconds["projector"] += time.perf_counter() - start
            return embeds, out

        def joined(parts):
            """[tokens, hidden] and the other outputs of several images, or (None, {}) for none."""
            if not parts:
                return None, {}
            return (np.concatenate([e for e, _ in parts]),
                    {name: np.concatenate([x[name] for _, x in parts], axis=1) for name in parts[0][1]})

        # every image and video of these sequences, once per content, from the cache where it was seen before
        media: dict[bytes, tuple] = {}
        for seq in seqs:
            for key, item in zip(seq.keys, [*zip(seq.pixels, seq.grids), *((v.patches, v.grid) for v in seq.videos)]):
                media.setdefault(key, item)
        done = {key: self.media.get(key) for key in media}
        todo = [key for key, value in done.items() if value is None]
        if self.manifest.schemes.vision == "patch_grid":
            takes = self.manifest.graphs["vision_encoder"].inputs
            merge = self.manifest.preprocess.merge_size
            for key in todo:
                pixels, grid = media[key]
                feeds = schemes.vision_inputs(self.manifest.schemes, merge, [grid])
                done[key] = encode({"pixel_values": pixels, **{k: v for k, v in feeds.items() if k in takes}})
        elif todo:
            pixels = np.concatenate([media[key][0] for key in todo])
            embeds = np.concatenate([encode({"pixel_values": pixels[i : i + self.vision_batch]})[0]
                                     for i in range(0, len(pixels), self.vision_batch)])
            for key, e in zip(todo, np.split(embeds, np.cumsum([len(media[key][0]) for key in todo])[:-1])):
                done[key] = (e, {})
        for key in todo:
            self.media.put(key, done[key])
        out = [(joined([done[k] for k in seq.keys[: len(seq.pixels)]]),
                joined([done[k] for k in seq.keys[len(seq.pixels):]])) for seq in seqs]
        self.timings.vision, self.timings.projector = seconds["vision"], seconds["projector"]
        return out

    def _image_spec(self, opts: GenerationOptions, n_images: int):
        """The preprocessing for this call: the package's, with the call's visual token budget applied. With
        max_image_tokens, each of the prompt's images may take an equal share of it."""
        spec = self.manifest.preprocess
        asked = {k: getattr(opts, k) for k in ("max_pixels", "min_pixels", "max_image_tokens")
                 if getattr(opts, k) is not None}
        if not asked:
            return spec
        if spec.resize_mode != "smart_resize":
            raise InputError(f"{', '.join(asked)} set the token budget of dynamic-resolution packages (Qwen-VL); "
                             f"this {self.manifest.model_type} package takes images at a fixed size")
        high = opts.max_pixels or spec.max_pixels
        if high > spec.max_pixels and self.manifest.target in ("tensorrt", "coreml"):
            raise InputError(f"max_pixels {high} is more than this {self.manifest.target} package's engines take "
                             f"({spec.max_pixels}); re-export with a larger --max-pixels")
        token = spec.token_pixels()  # pixels of the budget per image token
        if opts.max_image_tokens is not None:
            share = opts.max_image_tokens // n_images
            if share < 1:
                raise InputError(f"max_image_tokens {opts.max_image_tokens} leaves less than one token for each of "
                                 f"{n_images} images")
            high = min(high, share * token)
        low = min(opts.min_pixels or spec.min_pixels, high)
        return dataclasses.replace(spec, max_pixels=high, min_pixels=low)

    def _prepare_image(self, image: ImageInput, spec) -> PreparedImage:
        pixels, grid = preprocess_with_grid(image, spec)
        return PreparedImage(pixels, grid, media_key(pixels, grid))

    def _prepare(self, image, prompt: str, opts: GenerationOptions, video: VideoInput | None = None,
                 conversation: list[dict] | None = None) -> _Sequence:
        """Prompt ids, each image's pixels (one row per tile where the family splits images, or its patches),
        the video's patches, attention blocks and positions. `conversation`: the messages of a chat
        (runtimes/chat.py), rendered instead of `prompt`, its images (given as `image`) where they mark them."""
        if self.encoder == "audio":
            raise InputError(f"this {self.manifest.model_type} package takes audio, not images: use "
                             "transcribe(audio) (CLI: mmedge run PKG --audio speech.wav)")
        images = list(image) if isinstance(image, (list, tuple)) else [] if image is None else [image]
        if not images and video is None and conversation is None and not (self.cross_names and not self.encoder):
            raise InputError("no image given: pass one image, or a list of them")
        if video is not None and not self.manifest.prompt.video_marker:
            raise InputError(f"this {self.manifest.model_type} package takes images, not video")
        raw = opts.raw_prompt
        spec = self._image_spec(opts, max(1, len(images)))
        prepared = [im if isinstance(im, PreparedImage) else self._prepare_image(im, spec) for im in images]
        grids = [im.grid for im in prepared]
        videos = [] if video is None else [prepare_video(video, self.manifest.preprocess,
                                                         max_tokens=opts.max_video_tokens,
                                                         tokens_per_frame=self.manifest.prompt.image_seq_len)]
        if conversation is not None:
            text = self.codec.render_conversation(conversation, grids)
        else:
            text = self.codec.render(prompt, raw=raw, grids=grids, videos=[v.grid for v in videos],
                                     seconds=[v.seconds for v in videos], starts=[v.starts for v in videos])
        if self.manifest.prompt.video_as_images:  # after the images, each frame (or temporal patch) one more image
            prepared += [PreparedImage(pixels, g, media_key(pixels, g)) for v in videos for pixels, g in video_units(v)]
            grids, videos = [im.grid for im in prepared], []
        ids = self.codec.encode(text)
        token = self.manifest.prompt.image_token_id
        if raw and images and not (ids == token).any():
            p = self.manifest.prompt
            where = (f"{p.image_marker!r} (expanded to the image tokens)" if p.image_marker
                     else f"{p.image_token!r} x {p.image_seq_len} where the family's format puts them")
            raise InputError(f"a raw prompt must say where the image goes and this one has no image tokens: write "
                             f"{where}, or drop --raw-prompt")
        s = self.manifest.schemes
        step = spec.temporal_patch_size
        # a video stamped per temporal patch (Qwen3-VL) is as many one-patch videos, each its own run of tokens
        split = bool(self.manifest.prompt.video_frame_expansion)
        items = [(g, step / v.fps) for v in videos
                 for g in ([(1, v.grid[1], v.grid[2])] * v.grid[0] if split else [v.grid])]
        positions = schemes.prompt_positions(s, ids, grids, token, spec.merge_size, items,
                                             self.manifest.prompt.video_token_id)
        keys = [im.key for im in prepared] + [media_key(v.patches, v.grid) for v in videos]
        seq = _Sequence(ids, [im.pixels for im in prepared], grids, videos, schemes.blocks(s, ids, token), positions,
                        keys=keys)
        seq.spans = self._spans(seq)
        if self.encoder:
            self._to_decoder(seq)
        return seq

    def _to_decoder(self, seq: _Sequence) -> None:
        """An encoder-decoder's prompt: what was rendered becomes the encoder's source, and the decoder starts
        from the family's own first tokens. Nothing of the KV cache is reused (the source changes it all)."""
        limit = self.manifest.schemes.encoder_length
        if limit and len(seq.ids) > limit:
            raise InputError(f"the prompt is {len(seq.ids)} tokens with its image's, but this model's encoder takes "
                             f"{limit}: shorten the prompt")
        seq.source, seq.ids = seq.ids, np.asarray(self.manifest.prompt.decoder_start_ids, np.int64)
        seq.block_of = schemes.blocks(self.manifest.schemes, seq.ids, self.manifest.prompt.image_token_id)
        seq.spans = None

    def _spans(self, seq: _Sequence) -> list[tuple] | None:
        """Where each image's and video's tokens lie, for matching a cached prefix (None: not known, so nothing
        of the cache is reused: a raw prompt whose image tokens do not add up)."""
        p, merge = self.manifest.prompt, self.manifest.preprocess.merge_size or 1
        if self.manifest.schemes.vision == "patch_grid":
            counts = [int(np.prod(g)) // merge ** 2 for g in seq.grids]
        elif self.cross_names:  # the image's tokens in the prompt, not its positions for cross-attention
            counts = [p.image_seq_len] * len(seq.pixels)
        else:
            counts = [len(pixels) * p.image_seq_len for pixels in seq.pixels]
        try:
            spans = schemes.media_spans(seq.ids, p.image_token_id, counts, seq.keys[: len(seq.pixels)])
            return spans + schemes.media_spans(seq.ids, p.video_token_id,
                                               [int(np.prod(v.grid)) // merge ** 2 for v in seq.videos],
                                               seq.keys[len(seq.pixels):])
        except InputError:
            return None

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.graphs["embed_tokens"].run({"input_ids": ids})["inputs_embeds"]

    def _prompt_embeddings(self, seq: _Sequence) -> np.ndarray:
        return self._prompt_embeddings_many([seq])[0]

    def _decode(self, embeds: np.ndarray, start: int, cache_feeds: dict, mask_slots: int, seq: _Sequence,
                into: dict | None = None) -> dict:
        n = embeds.shape[1]
        if self.takes_lengths:
            batch = embeds.shape[0]
            positions = {"seqlens_k": np.full(batch, start + n - 1, np.int32),
                         "total_sequence_length": np.array(start + n, np.int32)}
            if self.lengths_and_positions:
                positions["position_ids"] = self._positions(seq, start, n)
            positions.update(self._masks(seq, start, n, mask_slots))
        else:
            positions = {
                "position_ids": schemes.position_ids(self.manifest.schemes, start, n, prompt=seq.positions),
                **self._masks(seq, start, n, mask_slots),
            }
            if self.deepstack_shape:
                positions["deepstack_embeds"] = self._deepstack(seq, start, n)
        if self.cross_names:
            positions.update(self._cross_feeds(seq, start, n))
        return self.graphs["decoder"].run({"inputs_embeds": embeds, **positions, **cache_feeds}, into=into)

    def _masks(self, seq: _Sequence, start: int, n: int, cache_len: int) -> dict[str, np.ndarray]:
        """The step's masks where the decoder takes them, else none."""
        if not self.mask_names:
            return {}
        return schemes.attention_masks(self.manifest.schemes, self.mask_names, start, n, cache_len, seq.block_of,
                                       self.mask_dtype)

    def _cached_step(self, embeds: np.ndarray, seq: _Sequence) -> np.ndarray:
        out = self._decode(embeds, self.cache.length, self.cache.feeds(), self.cache.mask_slots, seq, self._into)
        self.cache.write(out, embeds.shape[1])
        return out["logits"] if "logits" in out else self._into["logits"]  # the latter is overwritten next step

    def _uncached_step(self, prompt_embeds: np.ndarray):
        """A step function that re-runs the whole sequence each time (reference path)."""
        seq = [prompt_embeds]

        def step(embeds: np.ndarray, prepared: _Sequence) -> np.ndarray:
            if embeds is not prompt_embeds:
                seq.append(embeds)
            full = np.concatenate(seq, axis=1)
            return self._decode(full, 0, self.cache.fresh(), 0, prepared)["logits"]

        return step
