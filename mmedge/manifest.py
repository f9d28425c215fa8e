"""The package format: a directory of graphs, tokenizer.json and mmedge.json.

This module is shared by the exporter (which writes manifests) and the runtime
(which reads them), so it must stay free of torch and transformers. The
manifest is a tree of small dataclasses; `Manifest.to_dict()` /
`Manifest.from_dict()` map it to and from JSON. See docs/package-format.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmedge.errors import PackageError

FORMAT_VERSION = 1
MANIFEST_NAME = "mmedge.json"

Dim = typing.Union[int, str]  # a fixed size, or the name of a dynamic axis


@dataclass
class TensorSpec:
    dtype: str
    shape: list[Dim]


@dataclass
class GraphSpec:
    file: str
    precision: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass
class KVCacheSpec:
    """How the decoder's cache is held, laid out and named.

    storage "buffer": the runtime preallocates one key and one value buffer
    per layer of shape [batch, num_kv_heads, max_context, head_dim], feeds
    them as the `past` inputs and writes each step's `present` outputs (the
    new positions only) into them at their positions.
    storage "state": the engine keeps past + new keys and values inside the
    graph between calls (OpenVINO stateful models); the decoder has no cache
    inputs or outputs and the runtime only tracks the length and resets the
    state for each new sequence. `max_context` still bounds the sequence.
    storage "in_place": the same preallocated buffers, but each `present`
    output has the buffer's shape and is bound to its `past` buffer, so the
    decoder writes the new keys and values into their slots itself (ONNX
    Runtime IO binding, GroupQueryAttention); its position inputs are then
    `seqlens_k` / `total_sequence_length` instead of masks and position ids.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    max_context: int
    storage: str = "buffer"  # or "state", "in_place"
    layout: str = "batch,kv_heads,time,head_dim"
    past_key: str = "past.{layer}.key"
    past_value: str = "past.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"


@dataclass
class PreprocessSpec:
    """Numbers of the image processor; the runtime reproduces it with Pillow + numpy.

    resize_mode "exact": resize to height x width. "shortest_edge": resize so
    the shorter side is `shortest_edge` (aspect kept, the longer side
    truncated as transformers does), then, with do_center_crop, crop the
    centre height x width (CLIP, LLaVA). "longest_edge" (Idefics3, SmolVLM):
    the longer side to `longest_edge`, then with do_image_splitting tiles of
    `tile_size` (= height = width) row by row plus the whole image as a last
    tile, or without it one tile-sized square. "smart_resize" (Qwen2-VL and
    its kind): each side to a multiple of patch_size x merge_size with the
    area between min_pixels and max_pixels (aspect kept), then cut into
    patches flattened as the processor does ([patches, 3 x temporal x
    patch x patch], merge-block order) with their grid (t, h, w) in patches;
    height x width is then only the size export traced at. "aspect_tiles"
    (InternVL, GOT-OCR2): the (columns, rows) grid with min_tiles <= columns x
    rows <= max_tiles whose aspect ratio is closest to the image's, the image
    resized to it and cut into tiles of `tile_size` row by row, then, when
    there is more than one, the whole image resized to one tile; with
    do_image_splitting off, one tile-sized square. "tile_canvas" (Llama 3.2
    Vision): the canvas of at most max_tiles tiles of `tile_size` that fits the
    image best, the image resized into it (aspect kept) and padded, cut into
    tiles row by row and padded with empty tiles to max_tiles.
    """

    height: int
    width: int
    resample: str = "bicubic"
    resize_mode: str = "exact"
    shortest_edge: int | None = None
    do_center_crop: bool = False
    longest_edge: int | None = None
    tile_size: int | None = None
    do_image_splitting: bool = False
    min_tiles: int | None = None  # "aspect_tiles": the bounds of columns x rows
    max_tiles: int | None = None
    patch_size: int | None = None  # "smart_resize": pixels per patch side
    merge_size: int | None = None  # "smart_resize": patches per side merged into one token
    temporal_patch_size: int | None = None  # "smart_resize": frames per patch (an image is repeated to fill it)
    min_pixels: int | None = None  # "smart_resize": the area bounds of the resized image (the token budget)
    max_pixels: int | None = None
    # "smart_resize" as GLM-4V's processor does it: the bounds count this many frames of the image's area (its
    # temporal patch size; 1: Qwen-VL), and sides shorter than one token are first scaled up to one
    smart_resize_frames: int = 1
    smart_resize_upscale: bool = False
    # video ("smart_resize" families whose processor takes video): frames sampled at video_fps from a file,
    # between video_min_frames and video_max_frames, each frame resized within [video_min_pixels, video_max_pixels]
    video_fps: float | None = None
    video_min_frames: int | None = None
    video_max_frames: int | None = None
    # how a file's frames are picked: "uniform" (Qwen2-VL's: n at video_fps, within the frame bounds, evenly spread);
    # "per_second" (GLM-4V's: frame ceil(i x native fps / video_fps) for each i under the duration x video_fps,
    # repeats dropped, an even count)
    video_sampling: str = "uniform"
    # GLM-4V: the video's pixel bounds count the area of all its sampled frames, not one frame's
    video_budget_per_clip: bool = False
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    rescale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def token_pixels(self) -> int:
        """"smart_resize": the pixels of the min/max_pixels budget one image token takes."""
        return (self.patch_size * self.merge_size) ** 2 * self.smart_resize_frames

    def frames_per_image(self) -> int:
        """The most vision-encoder inputs one image becomes: its tiles and the whole image, or 1 (for
        "smart_resize", one call of patches)."""
        if not (self.do_image_splitting and self.tile_size):
            return 1
        if self.resize_mode == "longest_edge":
            side = math.ceil((self.longest_edge or self.tile_size) / self.tile_size)
            return side * side + 1
        if self.resize_mode == "aspect_tiles":
            return (self.max_tiles or 1) + ((self.max_tiles or 1) > 1)
        if self.resize_mode == "tile_canvas":
            return self.max_tiles or 1
        return 1


@dataclass
class PromptSpec:
    """How the user's text becomes the token sequence.

    mode "template": the family's fixed format; `template` uses {image} (the
    image token repeated image_seq_len times), {bos} and {prompt}.
    mode "chat": the checkpoint's chat template (the file `chat_template` in
    the package, Jinja) rendered for one user turn (the image, then the
    text) with the generation prompt, as transformers' apply_chat_template
    does, with `template_vars` (the tokenizer's special tokens) in scope.
    Then, in both modes and for raw prompts, each `image_marker` in the text
    becomes `image_expansion`, whose {image} is the image token repeated
    image_seq_len times; with image_layout "tiles" and an image split into
    tiles, preceded by one `tile_expansion` per tile (rows of tiles, each
    row ending in a newline, then a newline), as Idefics3 / SmolVLM do; with
    image_layout "tile_run", {image} is the image tokens of all the image's
    tiles and its whole-image tile in one run (InternVL).
    """

    template: str
    image_token: str
    image_token_id: int
    image_seq_len: int
    mode: str = "template"
    chat_template: str | None = None
    template_vars: dict[str, Any] = field(default_factory=dict)
    image_marker: str | None = None
    image_expansion: str = "{image}"
    image_layout: str = "single"  # or "tiles", "tile_run", "patch_grid": see runtimes/text.py
    tile_expansion: str | None = None  # "tiles": one tile's text, with {row}, {col} (1-based) and {image}
    video_token: str | None = None  # families that take video: its token, repeated once per merged patch
    video_token_id: int | None = None
    video_marker: str | None = None  # the chat template's per-video text, expanded as image markers are
    # with timestamps (Qwen3-VL): each temporal patch's text, with {seconds} (its time, one decimal), {second} (its
    # first frame's time in whole seconds, truncated), {index} (1-based) and {video} (its tokens); None: the video's
    # tokens in one run
    video_frame_expansion: str | None = None
    video_frame_separator: str = ""  # between those texts (InternVL: a newline)
    # a video as a run of images (InternVL: each frame one tile; GLM-4V: each temporal patch a (1, h, w) grid): each
    # one's tokens are the image token, and it is encoded, spliced and positioned as the images are
    video_as_images: bool = False
    # after expansion, this text twice in a row becomes once (IDEFICS: images in a row share the
    # <fake_token_around_image> between them, as IdeficsProcessor writes them)
    merge_adjacent: str | None = None
    # the user's text stripped of these characters at both ends, as the family's processor strips a text item
    strip_prompt: str | None = None
    # task tokens the family's processor turns into its own sentence (Florence-2's "<OD>"); a task's sentence with
    # {input} takes the text after the token there ("<CAPTION_TO_PHRASE_GROUNDING>a red circle")
    tasks: dict[str, str] = field(default_factory=dict)
    # scheme encoder "prompt": the decoder's own first tokens (decoder_start_token_id, a forced BOS), from which it
    # generates while the rendered prompt goes through the encoder
    decoder_start_ids: list[int] | None = None
    # scheme encoder "audio" (Whisper): language code -> its token, task (transcribe, translate) -> its token; the
    # runtime swaps them in decoder_start_ids for the call's language and task
    languages: dict[str, int] = field(default_factory=dict)
    speech_tasks: dict[str, int] = field(default_factory=dict)


@dataclass
class SchemeSpec:
    """The named run-time schemes a family selects (see mmedge/runtimes/schemes.py)."""

    positions: str = "linear"  # position id = sequence index + position_offset; or "mrope" (3-D, Qwen2-VL)
    position_offset: int = 0
    attention: str = "causal"  # or "prefix_bidirectional"
    image_placement: str = "replace_image_tokens"  # or "cross_attention" (Llama 3.2 Vision, IDEFICS)
    cross_mask: str | None = None  # "cross_attention": which images each token sees ("image_spans")
    sliding_window: int | None = None  # set when the decoder takes a sliding-window mask too
    vision: str = "images"  # or "patch_grid": the vision encoder takes patches and per-patch indices (Qwen2-VL)
    vision_window: int | None = None  # "patch_grid" with window attention: window side, in merged tokens
    vision_pos_grid: int | None = None  # "patch_grid" with a learned side x side position table (Qwen3-VL, GLM-4V)
    # how that table is resampled to a frame's grid: None, bilinear with aligned corners (Qwen3-VL); "bicubic_border",
    # torch grid_sample's bicubic at patch centres, borders clamped (GLM-4V)
    vision_pos_resample: str | None = None
    # "mrope" video positions: None, a video's frame index on the temporal row (Qwen2-VL); else its time, at this
    # many positions a second (Qwen2.5-VL)
    video_tokens_per_second: float | None = None
    # how the model writes boxes (runtimes/boxes.py: "loc1024_yxyx", "box_1000", "json_pixels", "json_1000") and the
    # prompt that asks for them, with {objects}; None: the family has no box output mmedge reads
    boxes: str | None = None
    detect_prompt: str | None = None
    # None: a decoder-only model. "prompt": an encoder-decoder (Florence-2): the rendered prompt, images spliced as
    # image_placement says, runs once through the `encoder` graph, whose outputs are the decoder's cross-attention
    # keys and values; the decoder generates from prompt.decoder_start_ids. encoder_length: the most tokens the
    # encoder takes
    encoder: str | None = None
    encoder_length: int | None = None


@dataclass
class SpecialTokens:
    bos_id: int | None
    bos: str | None
    eos_ids: list[int]
    pad_id: int | None = None


@dataclass
class GenerationDefaults:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_ids: list[int] = field(default_factory=list)  # tokens never generated (Whisper's suppress_tokens)
    begin_suppress_ids: list[int] = field(default_factory=list)  # nor as the first token (begin_suppress_tokens)


@dataclass
class AudioSpec:
    """An audio package's (scheme encoder "audio": Whisper) features: the runtime's log-mel spectrogram
    (runtimes/audio.py) of each `chunk_length`-second window at `sampling_rate`, `feature_size` mel bins from
    an `n_fft` STFT every `hop_length` samples, as the family's feature extractor computes it."""

    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30
    feature_size: int = 80

    def frames(self) -> int:
        return self.chunk_length * self.sampling_rate // self.hop_length


@dataclass
class EmbeddingSpec:
    """An embedding package's (kind "embedding": CLIP, SigLIP) run-time facts.

    Its graphs are `vision_encoder` (pixel_values [B, 3, H, W] -> image_embeds [B, dim]) and `text_encoder`
    (input_ids [B, S] -> text_embeds [B, dim]), both L2-normalised. An image-text logit is
    logit_scale x cosine + logit_bias; "softmax" turns a row of them into probabilities over the labels (CLIP),
    "sigmoid" each into a probability of its own (SigLIP).
    """

    dim: int
    logit_scale: float
    logit_bias: float = 0.0
    activation: str = "softmax"  # or "sigmoid"
    template: str = "a photo of a {}."  # classify's default prompt, {} the label
    text_length: int = 77  # the most tokens of a text; longer ones are cut (keeping the tokenizer's end token)
    text_padding: str = "longest"  # a batch padded to its longest text; "max_length": every text to text_length
    pad_id: int = 0
    # how a text is written before tokenizing: None as given; "siglip": lowercased, punctuation removed, runs of
    # spaces made one (SiglipTokenizer's canonicalize_text)
    text_normalize: str | None = None
    max_batch: int = 8  # images or texts per graph call (the static targets' profiles and flexible shapes)


@dataclass
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class Manifest:
    family: str
    model_type: str
    target: str
    graphs: dict[str, GraphSpec]
    preprocess: PreprocessSpec | None = None  # images' (None: a package that takes audio, `audio`)
    # "generative" (a VLM: the fields below to generation) or "embedding" (a dual encoder: `embedding`)
    kind: str = "generative"
    kv_cache: KVCacheSpec | None = None
    prompt: PromptSpec | None = None
    schemes: SchemeSpec | None = None
    special_tokens: SpecialTokens | None = None
    generation: GenerationDefaults | None = None
    embedding: EmbeddingSpec | None = None
    audio: AudioSpec | None = None
    tokenizer: str = "tokenizer.json"
    source: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)  # plan, calibration and the accuracy report
    tensorrt: dict[str, Any] = field(default_factory=dict)  # target tensorrt: optimization profiles per graph
    coreml: dict[str, Any] = field(default_factory=dict)  # target coreml: deployment target, the decoder's states
    format_version: int = FORMAT_VERSION
    mmedge_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise PackageError(f"{MANIFEST_NAME} holds a JSON {type(data).__name__}, not an object; re-export the package")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PackageError(f"{MANIFEST_NAME} has no format_version (a whole number from 1); this is not an mmedge "
                               "package")
        if version > FORMAT_VERSION:
            raise PackageError(
                f"package format {version} is newer than this mmedge reads ({FORMAT_VERSION}); upgrade mmedge"
            )
        try:
            manifest = _build(cls, data)
            _check_kind(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # _Malformed names the field
            raise PackageError(f"{MANIFEST_NAME} is malformed: {exc}; re-export the package") from None
        return manifest

    def graph_of(self, file: str) -> str | None:
        """The graph (part name) stored in `file`, if any."""
        return next((part for part, g in self.graphs.items() if g.file == file), None)

    def save(self, directory: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        (Path(directory) / MANIFEST_NAME).write_text(text + "\n")


class _Malformed(ValueError):
    """A manifest field of the wrong type or out of range; the message names the field."""


# what each package kind must state
KIND_FIELDS = {"generative": ("kv_cache", "prompt", "schemes", "special_tokens", "generation"),
               "embedding": ("embedding",)}
ACTIVATIONS = ("softmax", "sigmoid")


def _check_kind(manifest: "Manifest") -> None:
    if manifest.kind not in KIND_FIELDS:
        raise _Malformed(f"kind must be one of {', '.join(KIND_FIELDS)}, got {manifest.kind!r}")
    for name in KIND_FIELDS[manifest.kind]:
        if getattr(manifest, name) is None:
            raise _Malformed(f"missing field {name} (a {manifest.kind} package states it)")
    if manifest.kind == "generative":  # what it reads: images (preprocess), or audio (scheme encoder "audio")
        takes = "audio" if manifest.schemes.encoder == "audio" else "preprocess"
        if getattr(manifest, takes) is None:
            raise _Malformed(f"missing field {takes} (a package of scheme encoder {manifest.schemes.encoder!r} states "
                             "it)")
        _check_cache(manifest)
    elif manifest.preprocess is None:
        raise _Malformed("missing field preprocess (an embedding package states it)")
    _check_pixels(manifest)
    spec = manifest.embedding
    if manifest.kind == "embedding":
        if spec.activation not in ACTIVATIONS:
            raise _Malformed(f"embedding.activation must be one of {', '.join(ACTIVATIONS)}, got {spec.activation!r}")
        if spec.text_padding not in ("longest", "max_length"):
            raise _Malformed(f"embedding.text_padding must be longest or max_length, got {spec.text_padding!r}")
        if spec.text_normalize not in (None, "siglip"):
            raise _Malformed(f"embedding.text_normalize must be null or siglip, got {spec.text_normalize!r}")
        _check_embedding_dim(manifest)


def _check_pixels(manifest: "Manifest") -> None:
    """preprocess's image (or tile) size against the vision encoder's pixel input, where the graph fixes it: a
    damaged height was the engine's shape error at the first image (exit 1)."""
    spec, graph = manifest.preprocess, manifest.graphs.get("vision_encoder")
    if spec is None or graph is None or spec.resize_mode == "smart_resize":  # patches, not an image, go in
        return
    for name, tensor in graph.inputs.items():
        size = tensor.shape[-2:] if len(tensor.shape) >= 4 else None
        if size and all(isinstance(d, int) for d in size) and list(size) != [spec.height, spec.width]:
            raise _Malformed(f"preprocess.height x width is {spec.height} x {spec.width}, but the vision_encoder's "
                             f"{name} is {size[0]} x {size[1]}")


def _check_embedding_dim(manifest: "Manifest") -> None:
    """embedding.dim against the encoders' outputs, where the package states their width."""
    for part, output in (("vision_encoder", "image_embeds"), ("text_encoder", "text_embeds")):
        graph = manifest.graphs.get(part)
        tensor = graph.outputs.get(output) if graph else None
        width = tensor.shape[-1] if tensor and tensor.shape else None
        if isinstance(width, int) and width != manifest.embedding.dim:
            raise _Malformed(f"embedding.dim is {manifest.embedding.dim}, but the {part}'s {output} has {width}")


KV_DTYPES = ("float32", "float16")


def _check_cache(manifest: "Manifest") -> None:
    """The KV cache against the decoder it feeds: where the runtime holds the buffers (storage buffer, in_place),
    each layer's past inputs are the decoder's, of its heads and head size, so a damaged manifest cannot make the
    runtime allocate what the graph never takes."""
    kv = manifest.kv_cache
    if kv.dtype not in KV_DTYPES:
        raise _Malformed(f"kv_cache.dtype must be one of {', '.join(KV_DTYPES)}, got {kv.dtype!r}")
    decoder = manifest.graphs.get("decoder")
    if kv.storage == "state" or decoder is None:
        return
    if 2 * kv.num_layers > len(decoder.inputs):
        raise _Malformed(f"kv_cache.num_layers is {kv.num_layers}, but the decoder takes {len(decoder.inputs)} inputs")
    sizes = {"kv_heads": ("num_kv_heads", kv.num_kv_heads), "head_dim": ("head_dim", kv.head_dim)}
    for layer in range(kv.num_layers):
        for name in (kv.past_key.format(layer=layer), kv.past_value.format(layer=layer)):
            spec = decoder.inputs.get(name)
            if spec is None:
                raise _Malformed(f"kv_cache names the decoder input {name}, which the decoder does not take")
            for axis, dim in zip(kv.layout.split(","), spec.shape):
                if axis in sizes and isinstance(dim, int) and dim != sizes[axis][1]:
                    raise _Malformed(f"kv_cache.{sizes[axis][0]} is {sizes[axis][1]}, but the decoder's {name} has "
                                     f"{dim}")


# the smallest value a count may take (a manifest with a zero or negative one cannot run)
MINIMUM = {"embedding.dim": 1, "embedding.text_length": 2, "embedding.max_batch": 1, "embedding.pad_id": 0,
           "kv_cache.max_context": 2, "kv_cache.num_layers": 1, "kv_cache.num_kv_heads": 1, "kv_cache.head_dim": 1,
           "preprocess.height": 1, "preprocess.width": 1, "prompt.image_seq_len": 0, "prompt.image_token_id": -1,
           "generation.max_new_tokens": 1}
# the largest a size may be (a damaged manifest's 2**70 or 1e9 made allocations of terabytes); far above any model's
MAXIMUM = {"embedding.text_length": 1 << 16, "embedding.max_batch": 1 << 12, "embedding.pad_id": (1 << 31) - 1,
           "embedding.dim": 1 << 16, "kv_cache.max_context": 1 << 24, "kv_cache.num_kv_heads": 1 << 12,
           "kv_cache.head_dim": 1 << 12, "kv_cache.num_layers": 1 << 12, "preprocess.height": 1 << 14,
           "preprocess.width": 1 << 14, "preprocess.shortest_edge": 1 << 14, "generation.max_new_tokens": 1 << 24}


def _build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain JSON data, checking every typed field's type (and MINIMUM)."""
    if not isinstance(data, dict):
        raise _Malformed(f"{where.rstrip('.') or 'the manifest'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Malformed(f"missing field {where}{f.name}")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], where + f.name)
        low = MINIMUM.get(where + f.name)
        if low is not None and kwargs[f.name] is not None and kwargs[f.name] < low:
            raise _Malformed(f"{where}{f.name} must be at least {low}, got {kwargs[f.name]}")
        high = MAXIMUM.get(where + f.name)
        if high is not None and kwargs[f.name] is not None and kwargs[f.name] > high:
            raise _Malformed(f"{where}{f.name} must be at most {high}, got {kwargs[f.name]}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise _Malformed(f"{where} must be an object, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {k: _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise _Malformed(f"{where} must be a list, got {value!r:.40}")
        (it,) = typing.get_args(tp)
        return [_convert(it, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # an optional field: its own type's message names the field at fault
            return _convert(options[0], value, where)
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, where)
            except _Malformed:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))
        raise _Malformed(f"{where} must be {names}, got {value!r:.40}")
    simple = {bool: (bool,), int: (int,), float: (int, float), str: (str,), type(None): (type(None),)}
    if tp in simple:
        if not isinstance(value, simple[tp]) or (tp is not bool and isinstance(value, bool)):
            raise _Malformed(f"{where} must be {tp.__name__ if tp is not type(None) else 'null'}, got {value!r:.40}")
        if tp is float and not math.isfinite(value):
            raise _Malformed(f"{where} must be a finite number, got {value!r}")
    return value


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def user_cache_dir() -> Path:
    """mmedge's cache folder: $MMEDGE_CACHE, else ~/.cache/mmedge (built-in checkpoints, verification records,
    compiled-model caches)."""
    return Path(os.environ.get("MMEDGE_CACHE", Path.home() / ".cache" / "mmedge"))


VERIFY = (True, False, "full")


def load_manifest(directory: str | Path, verify_files: bool | str = True) -> Manifest:
    """Read and check a package's manifest.

    With `verify_files`, every file listed in the manifest must exist with its
    recorded size and sha256, so a truncated copy or a swapped graph is caught
    at load time with one clear message. True hashes a file only when it is
    not the very file hashed before (verify_package_files); "full" hashes every
    byte every time.
    """
    if verify_files not in VERIFY:
        raise PackageError(f"verify must be True, False or 'full', got {verify_files!r}")
    directory = Path(directory)
    if not directory.exists():
        raise PackageError(f"package not found: {directory}")
    if not directory.is_dir():
        raise PackageError(f"{directory} is a file, not a package directory (export writes a directory)")
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise PackageError(f"{directory} is not an mmedge package (no {MANIFEST_NAME}); create one with `mmedge export`")
    if not path.resolve().is_relative_to(directory.resolve()):
        raise PackageError(f"{path} is a link to a file outside the package directory; refusing to read it (a package "
                           "may only hold its own files): re-export the package or copy the file in")
    if not path.is_file():
        raise PackageError(f"{path} is not a file; re-export the package")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not valid JSON ({exc}); re-export the package") from None
    manifest = Manifest.from_dict(data)
    for name in sorted(named_files(manifest) | set(manifest.files)):
        confined(directory, name)
    if verify_files:
        verify_package_files(directory, manifest, remember=verify_files != "full",
                             manifest_digest=hashlib.sha256(raw).hexdigest())
    return manifest


def named_files(manifest: Manifest) -> set[str]:
    """The files (or Core ML folders) the manifest points the runtime at."""
    needed = {g.file for g in manifest.graphs.values()} | {manifest.tokenizer}
    if manifest.prompt is not None and manifest.prompt.chat_template:
        needed.add(manifest.prompt.chat_template)
    return needed


def confined(directory: Path, name: str) -> Path:
    """`directory / name`, refused unless it stays inside the package once symlinks are resolved: a package must
    not make the runtime read anything outside its own directory."""
    if not isinstance(name, str) or not name:
        raise PackageError(f"{MANIFEST_NAME} names a file {name!r}; file names must be non-empty paths in the package")
    root = Path(directory).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise PackageError(f"{MANIFEST_NAME} names {name!r}, which is outside the package directory; refusing to "
                           "read it (a package may only name its own files)")
    return path


def _identity(stat) -> list[int]:
    """What changes whenever a file's bytes do: a write updates mtime and ctime (ctime cannot be set back from user
    space), a replacement is another inode, a copy another inode or device."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def package_key(directory: Path) -> str:
    """A package directory's name in mmedge's caches: a hash of its resolved path."""
    return hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:32]


def _record_path(directory: Path) -> Path:
    return user_cache_dir() / "verified" / f"{package_key(directory)}.json"


def _read_record(directory: Path, manifest_digest: str) -> dict[str, list[int]]:
    try:
        record = json.loads(_record_path(directory).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("manifest") != manifest_digest:
        return {}
    files = record.get("files")
    return files if isinstance(files, dict) else {}


def _write_record(directory: Path, manifest_digest: str, files: dict[str, list[int]]) -> None:
    path = _record_path(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"package": str(Path(directory).resolve()), "manifest": manifest_digest,
                                   "files": files}))
        os.replace(tmp, path)
    except OSError:
        return  # a read-only home: every load hashes, as before
    global _records_pruned
    if not _records_pruned:
        _records_pruned = True
        _prune_records(path.parent)


_records_pruned = False


def _prune_records(folder: Path) -> None:
    """Drop the verification records of packages that are no longer there (once per process, at the first record
    written): temporary and moved packages would otherwise leave one file each, forever."""
    for record in folder.glob("*.json"):
        try:
            package = json.loads(record.read_text()).get("package")
            if isinstance(package, str) and not Path(package, MANIFEST_NAME).is_file():
                record.unlink()
        except (OSError, ValueError, AttributeError):
            continue


def verify_package_files(directory: Path, manifest: Manifest, remember: bool = True, manifest_digest: str = ""
                         ) -> None:
    """Every listed file exists with its size and sha256. With `remember`, a file is hashed only when it is not
    the file hashed at an earlier load (same device, inode, size, mtime and ctime, recorded under
    user_cache_dir()/verified for the manifest of sha256 `manifest_digest`); the record is written after a full
    pass."""
    needed = named_files(manifest)
    listed = set(manifest.files)
    # a graph may be a directory (Core ML's .mlpackage): its files are listed one by one
    listed |= {name for name in needed if any(f.startswith(name + "/") for f in manifest.files)}
    missing_entries = sorted(needed - listed)
    if missing_entries:
        raise PackageError(f"{MANIFEST_NAME} lists no hash for {', '.join(missing_entries)}; re-export the package")
    digest = manifest_digest or hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest()
    known = _read_record(directory, digest) if remember else {}
    seen: dict[str, list[int]] = {}
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise PackageError(f"package file missing: {path}; the package is incomplete, re-export or re-copy it")
        stat = path.stat()
        seen[name] = _identity(stat)
        size = stat.st_size
        if known.get(name) == seen[name] and size == entry.bytes:
            continue  # the very file that matched before
        if size != entry.bytes:
            raise PackageError(
                f"package file {name} has {size} bytes, manifest says {entry.bytes}: the copy is damaged, re-copy or re-export"
            )
        if sha256_file(path) != entry.sha256:
            raise PackageError(
                f"package file {name} does not match its sha256 in {MANIFEST_NAME}: it was changed or damaged, re-copy or re-export"
            )
    if remember and seen != known:
        _write_record(directory, digest, seen)
