"""The four graph contracts, target-independent: wrappers, names, axes, sample inputs.

Every target exporter (ONNX today; OpenVINO, Core ML, TensorRT build on the
same jobs) gets a `GraphJob` per part: the torch module to trace, its input and
output names, the dynamic axes, inputs to trace with and different inputs to
verify with. Sizes used for tracing differ from every size used for checking
and from every fixed dimension, so nothing gets specialised silently.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from mmedge.exporters.family import Parts

TRACE = dict(batch=2, seq=5, cache=7)
CHECKS = (dict(batch=1, seq=3, cache=4), dict(batch=3, seq=1, cache=9), dict(batch=1, seq=6, cache=0))
# "patch_grid" vision encoders: the (t, h, w) patch grids of the images in one call, traced at one and checked at
# others: portrait, landscape, the smallest, two images of different grids, a two-frame clip (in merge units of 2)
PATCH_GRIDS_TRACE = [(1, 6, 8)]
PATCH_GRIDS_CHECKS = ([(1, 10, 4)], [(1, 4, 12)], [(1, 2, 2)], [(1, 4, 4), (1, 6, 2)], [(2, 4, 6)])


@dataclass
class GraphJob:
    name: str
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]  # input name -> {axis: dim name}
    trace_inputs: tuple
    check_inputs: list[tuple]
    output_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # names for derived output dims
    kv_storage: str | None = None  # decoder only: "buffer", "in_place" (explicit cache I/O) or "state" (engine-held)
    precision: str = "fp32"  # the plan's precision, for targets that set it at conversion (Core ML's compute type)
    bounds: dict[str, int] = field(default_factory=dict)  # upper bound of each named axis, for static-shape targets
    reference: object = None  # a module the traced one must match in PyTorch (the stateful decoder's contract)
    traced: object = None  # the torch.jit.trace of `module`, for targets that convert a TorchScript trace
    trace_cache: object = None  # a folder of traced graphs to reuse (exporters/trace_cache.py), or None
    # a deep decoder's layers made by repeating traced ones (exporters/repeat_layers.py): how many were (a record),
    # and whether it must be traced whole instead (export_jobs' fallback where the repeated graph did not verify)
    repeated_layers: int = 0
    trace_whole: bool = False


class _Layer:
    """A cache layer as transformers' cross-attention layers read it: keys, values, initialised or not."""

    def __init__(self, keys=None, values=None):
        self.keys, self.values, self.is_initialized = keys, values, keys is not None


def _slots(num_self: int, cross_layers: tuple) -> dict[int, int]:
    """The text model's layer index -> its KV-cache slot, for the self-attention layers (cross layers have none)."""
    layers = [i for i in range(num_self + len(cross_layers)) if i not in cross_layers]
    return {layer: slot for slot, layer in enumerate(layers)}


def _cross_cache_layers(num_self: int, cross_layers: tuple, cross: tuple) -> list[_Layer]:
    """Every layer's cache entry: a cross-attention layer's holds its image keys and values (cross: key, value per
    cross layer), as transformers' cache does after the first step (Llama 3.2 Vision reads them from there); a
    self-attention layer's is left uninitialised (its keys and values go through update())."""
    return [_Layer(*cross[2 * cross_layers.index(i) : 2 * cross_layers.index(i) + 2]) if i in cross_layers
            else _Layer() for i in range(num_self + len(cross_layers))]


class _PastKV:
    """Duck-typed transformers cache: past comes in as tensors, the graph's present keys/values are kept.

    Attention layers call update(k, v, layer_idx); we return past+new for
    attention and keep either the new part only (storage "buffer": the runtime
    writes it into its preallocated cache) or past+new (storage "state": the
    engine keeps it as in-graph state for the next call).
    """

    def __init__(self, past: tuple, keep_all: bool, cross_layers: tuple = (), cross: tuple = ()):
        self.past, self.keep_all = past, keep_all
        self.present: list = [None] * (len(past) // 2)
        self.slot = _slots(len(past) // 2, cross_layers)
        if cross_layers:
            self.layers = _cross_cache_layers(len(self.slot), cross_layers, cross)

    def update(self, key, value, layer_idx, *args, **kwargs):
        slot = self.slot[layer_idx]
        full = (
            torch.cat([self.past[2 * slot], key], dim=2),
            torch.cat([self.past[2 * slot + 1], value], dim=2),
        )
        self.present[slot] = full if self.keep_all else (key, value)
        return full

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[0].shape[2]


class DecoderGraph(torch.nn.Module):
    """inputs_embeds, masks, position_ids, past k/v per layer -> last logits, present k/v per layer.

    present = the new positions only (kv_storage "buffer") or past + new ("state").
    """

    def __init__(self, parts: Parts, kv_storage: str = "buffer"):
        super().__init__()
        self.keep_all = kv_storage == "state"
        self.text_model = parts.text_model
        self.head = parts.head
        self.n_masks = len(parts.mask_names)
        self.mask_arg = parts.mask_arg
        self.n_extra = 1 if parts.deepstack_layers else 0  # deepstack_embeds after position_ids
        self.cross_layers, self.cross_arg = tuple(parts.cross_layers), parts.cross_arg
        # after them: cross_mask, cross_rows and each cross-attention layer's key and value
        self.n_cross = 2 + 2 * parts.cross_attention if parts.cross_attention else 0

    def forward(self, inputs_embeds, *rest):
        masks, position_ids = rest[: self.n_masks], rest[self.n_masks]
        rest = rest[self.n_masks + 1 :]
        extra, cross, past = rest[: self.n_extra], rest[self.n_extra : self.n_extra + self.n_cross], \
            rest[self.n_extra + self.n_cross :]
        cache = _PastKV(past, self.keep_all, self.cross_layers, cross[2:] if self.cross_layers else ())
        logits = self.last_logits(inputs_embeds, masks, position_ids, cache, *extra, cross=cross)
        flat = [t for pair in cache.present for t in pair]
        return (logits, *flat)

    def last_logits(self, inputs_embeds, masks, position_ids, cache, deepstack_embeds=None, cross=()):
        """The decoder stack over `cache` (a duck-typed transformers cache), then the head on the last position;
        `cross`: the cross mask, rows, keys and values, for a cross-attention text model."""
        extra = {} if deepstack_embeds is None else {"deepstack_visual_embeds": list(deepstack_embeds.unbind(0)),
                                                      "visual_pos_masks": None}
        if cross:
            extra.update(self.cross_arg(cross[0], cross[1], tuple(cross[2:])))
        out = self.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=self.mask_arg(list(masks)),
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **extra,
        )
        return self.head(out.last_hidden_state[:, -1:, :])


class _StateKV:
    """Duck-typed transformers cache over two fixed buffers [layers, batch, kv_heads, max_context, head_dim].

    update() writes the new keys/values at [begin, end) and returns the buffer up to `end`, so attention
    sees exactly the tokens so far; the buffers hold the state's dtype (Core ML states are fp16) and
    attention computes in the model's.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, begin, cross_layers: tuple = (), cross: tuple = ()):
        self.keys, self.values, self.begin = keys, values, begin
        self.slot = _slots(keys.shape[0], cross_layers)
        if cross_layers:
            self.layers = _cross_cache_layers(len(self.slot), cross_layers, cross)

    def update(self, key, value, layer_idx, *args, **kwargs):
        end = self.begin + key.shape[2]
        slot = self.slot[layer_idx]
        self.keys[slot, :, :, self.begin : end] = key.to(self.keys.dtype)
        self.values[slot, :, :, self.begin : end] = value.to(self.values.dtype)
        return self.keys[slot, :, :, :end].to(key.dtype), self.values[slot, :, :, :end].to(value.dtype)

    def get_seq_length(self, layer_idx: int = 0):
        return self.begin


class StatefulDecoder(DecoderGraph):
    """inputs_embeds, masks [batch, 1, n, end], position_ids -> last logits; the KV cache lives in two buffers.

    The buffers `key_cache` / `value_cache` ([layers, batch, kv_heads, max_context, head_dim]) are
    what a converter turns into graph state (Core ML's StateType). Where the new tokens go is read
    from the shapes, as the mask covers exactly the tokens so far: begin = end - n. So the caller
    passes nothing but the usual decoder inputs, and one module serves prefill and decode.
    """

    def __init__(self, parts: Parts, max_context: int, batch: int = 1, state_dtype=torch.float16):
        super().__init__(parts, kv_storage="state")
        shape = (parts.num_layers, batch, parts.num_kv_heads, max_context, parts.head_dim)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=state_dtype), persistent=False)
        self.register_buffer("value_cache", torch.zeros(shape, dtype=state_dtype), persistent=False)

    def with_state_dtype(self, dtype, batch: int | None = None) -> "StatefulDecoder":
        """The same module (shared weights) over new, empty buffers of `dtype` (and of `batch` sequences)."""
        other = copy.copy(self)
        other._buffers = dict(self._buffers)
        shape = list(self.key_cache.shape)
        shape[1] = batch or shape[1]
        other.register_buffer("key_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        other.register_buffer("value_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        return other

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def forward(self, inputs_embeds, *rest):
        masks, position_ids, rest = rest[: self.n_masks], rest[self.n_masks], rest[self.n_masks + 1 :]
        extra, cross = rest[: self.n_extra], rest[self.n_extra :]
        begin = masks[0].shape[-1] - inputs_embeds.shape[1]
        cache = _StateKV(self.key_cache, self.value_cache, begin, self.cross_layers,
                         cross[2:] if self.cross_layers else ())
        return self.last_logits(inputs_embeds, masks, position_ids, cache, *extra, cross=cross)


def with_kv_storage(job: GraphJob, kv_storage: str) -> GraphJob:
    """The traced decoder's job for the other KV storage ("buffer" <-> "state"): the same weights, inputs, checks
    and names; only what the present outputs hold changes (the new slots, or past + new)."""
    module = copy.copy(job.module)  # shares every submodule and weight
    module.keep_all = kv_storage == "state"
    present_len = "total_len" if kv_storage == "state" else "seq"
    output_axes = {name: {**axes, 2: present_len} if name.startswith("present.") else axes
                   for name, axes in job.output_axes.items()}
    return dataclasses.replace(job, module=module, kv_storage=kv_storage, output_axes=output_axes)


def kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def cross_names(num_cross_layers: int) -> list[str]:
    """The projector's outputs and the decoder's inputs holding each cross-attention layer's image keys and values
    (no dots: Core ML renames names with them)."""
    return [f"cross_{kind}_{j}" for j in range(num_cross_layers) for kind in ("key", "value")]


# image positions of the cross-attention decoder's inputs at TRACE and each of CHECKS ((batch, seq, cache) ->
# length): all different, and 1 (a text-only prompt's one empty position)
CROSS_LENGTHS = {(2, 5, 7): 6, (1, 3, 4): 9, (3, 1, 9): 4, (1, 6, 0): 1}


def _cross_inputs(parts: Parts, batch: int, seq: int, length: int, g: torch.Generator) -> list[torch.Tensor]:
    """cross_mask [B, 1, S, L] (a random visible subset per token, none for some tokens), cross_rows [B, 1, S, 1]
    (whether the token sees any) and each cross layer's keys and values [B, kv_heads, L, head_dim]."""
    sees = torch.rand(batch, 1, seq, length, generator=g) > 0.4
    sees[..., 0] |= torch.rand(batch, 1, seq, generator=g) > 0.3
    rows = sees.any(-1, keepdim=True)
    mask = torch.where(sees, 0.0, torch.finfo(torch.float32).min)
    kv = [torch.randn(batch, parts.num_kv_heads, length, parts.head_dim, generator=g)
          for _ in range(2 * parts.cross_attention)]
    return [mask, rows.float(), *kv]


def _mask(batch: int, seq: int, cache: int, generator: torch.Generator) -> torch.Tensor:
    """A valid additive mask: causal over [cache | new] with random holes in the cache."""
    keep = torch.ones(batch, 1, seq, cache + seq, dtype=torch.bool)
    keep[..., cache:] = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    if cache:
        keep[..., :cache] = torch.rand(batch, 1, seq, cache, generator=generator) > 0.3
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)


def _image_jobs(parts: Parts, g: torch.Generator) -> tuple[GraphJob, GraphJob]:
    """Vision encoder and projector over batches of fixed-size images [B, 3, H, W]."""
    h, w = parts.image_size

    def pixels(b):
        return (torch.rand(b, 3, h, w, generator=g) * 2 - 1,)

    vision = GraphJob(
        "vision_encoder",
        parts.vision_encoder,
        ["pixel_values"],
        ["image_features"],
        {"pixel_values": {0: "batch"}},
        pixels(TRACE["batch"]),
        [pixels(c["batch"]) for c in CHECKS[:2]],
    )
    return vision, _projector_job(parts, vision, g)


def _tile_canvas_jobs(parts: Parts, g: torch.Generator) -> tuple[GraphJob, GraphJob]:
    """Vision scheme "tile_canvas" (Llama 3.2 Vision): each image's tiles [B, tiles, 3, H, W] (padded with empty
    tiles to the most an image takes) with its aspect_ratio_ids [B] and aspect_ratio_mask [B, tiles], as the
    runtime computes them from each image's (rows, cols) of tiles; and the projector over their features."""
    from mmedge.runtimes.schemes import tile_canvas_inputs

    h, w = parts.image_size
    tiles = parts.tile_canvas["max_tiles"]

    def inputs(grids):
        pixels = torch.rand(len(grids), tiles, 3, h, w, generator=g) * 2 - 1
        extra = tile_canvas_inputs(tiles, grids)
        return (pixels, *(torch.from_numpy(a) for a in extra.values())), list(extra)

    arrangements = [(r, c) for r in range(1, tiles + 1) for c in range(1, tiles + 1) if r * c <= tiles]
    trace, names = inputs([arrangements[-1], arrangements[0]])
    vision = GraphJob(
        "vision_encoder",
        parts.vision_encoder,
        ["pixel_values", *names],
        ["image_features"],
        {"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in names}},
        trace,
        # other arrangements than traced, where the model has them (one-tile models have one: other batch sizes)
        [inputs([arrangements[min(1, len(arrangements) - 1)]])[0],
         inputs([arrangements[len(arrangements) // 2], (1, 1), arrangements[max(-2, -len(arrangements))]])[0]],
    )
    return vision, _projector_job(parts, vision, g)


def _projector_job(parts: Parts, vision: GraphJob, g: torch.Generator) -> GraphJob:
    """The projector over features of the vision encoder's shape; a cross-attention family's returns each cross
    layer's image keys and values instead of embeddings."""
    with torch.no_grad():
        feature_shape = parts.vision_encoder(*[x[:1] for x in vision.trace_inputs]).shape[1:]

    def features(b):
        return (torch.randn(b, *feature_shape, generator=g),)

    if parts.cross_attention and parts.encoder is None:
        outputs = cross_names(parts.cross_attention)
        output_axes = {name: {0: "batch"} for name in outputs}
    else:
        outputs, output_axes = ["image_embeds"], {}
    return GraphJob(
        "projector",
        parts.projector,
        ["image_features"],
        outputs,
        {"image_features": {0: "batch"}},
        features(TRACE["batch"]),
        [features(c["batch"]) for c in CHECKS[:2]],
        output_axes=output_axes,
    )


def _patch_grid_jobs(parts: Parts, g: torch.Generator) -> tuple[GraphJob, GraphJob]:
    """Vision encoder over the patches of any images (scheme "patch_grid"), with the per-patch indices the
    runtime computes (the runtime's own code makes them here), and the projector (patch merger) over its
    features; traced at one grid, checked at PATCH_GRIDS_CHECKS."""
    from mmedge.exporters.patch_grid import PatchGridEncoder
    from mmedge.manifest import SchemeSpec
    from mmedge.runtimes.schemes import vision_inputs

    grid = parts.patch_grid
    scheme = SchemeSpec(vision="patch_grid", vision_window=grid["window"], vision_pos_grid=grid.get("pos_grid"),
                        vision_pos_resample=grid.get("pos_resample"))

    def inputs(grids):
        extra = vision_inputs(scheme, grid["merge_size"], grids)
        names = PatchGridEncoder.takes(extra)
        pixels = torch.rand(len(extra["frame_segments"]), grid["patch_dim"], generator=g) * 2 - 1
        return (pixels, *(torch.from_numpy(extra[name]) for name in names)), names

    trace, names = inputs(PATCH_GRIDS_TRACE)
    axes = {"pixel_values": {0: "patches"}, "vision_positions": {0: "patches"}, "frame_segments": {0: "patches"},
            "window_index": {0: "tokens"}, "window_slots": {0: "windows"}, "window_slot_of": {0: "patches"},
            "pos_indices": {0: "patches"},
            "pos_weights": {0: "patches"}}
    deepstack = ["deepstack_embeds"] if grid.get("deepstack") else []
    vision = GraphJob(
        "vision_encoder",
        parts.vision_encoder,
        ["pixel_values", *names],
        ["image_features", *deepstack],
        {name: axes[name] for name in ["pixel_values", *names]},
        trace,
        [inputs(grids)[0] for grids in PATCH_GRIDS_CHECKS],
        output_axes={"image_features": {0: "patches"}, **{name: {1: "tokens"} for name in deepstack}},
    )
    with torch.no_grad():
        outs = [parts.vision_encoder(*args) for args in [trace, *vision.check_inputs]]
        features = [(out[0] if deepstack else out,) for out in outs]
    projector = GraphJob(
        "projector",
        parts.projector,
        ["image_features"],
        ["image_embeds"],
        {"image_features": {0: "patches"}},
        features[0],
        features[1:3],
        output_axes={"image_embeds": {0: "tokens"}},
    )
    return vision, projector


def build_jobs(parts: Parts, seed: int = 0, kv_storage: str = "buffer", max_context: int = 0,
               attention: str = "causal", position_offset: int = 0) -> list[GraphJob]:
    """The four jobs; the decoder's for kv_cache storage "in_place" is built, not traced (fused_decoder), for
    the scheme's `attention` pattern and `position_offset` (the traced decoder takes masks and positions)."""
    g = torch.Generator().manual_seed(seed)
    jobs = _patch_grid_jobs if parts.patch_grid else _tile_canvas_jobs if parts.tile_canvas else _image_jobs
    vision_jobs = list(jobs(parts, g)) if parts.vision_encoder is not None else []  # none: an audio family

    def ids(c):
        return (torch.randint(0, parts.vocab_size, (c["batch"], c["seq"]), generator=g),)

    embed = GraphJob(
        "embed_tokens",
        parts.embed_tokens,
        ["input_ids"],
        ["inputs_embeds"],
        {"input_ids": {0: "batch", 1: "seq"}},
        ids(TRACE),
        [ids(c) for c in CHECKS],
    )

    encoder = [encoder_job(parts, g)] if parts.encoder is not None else []
    if kv_storage == "in_place":
        from mmedge.exporters import fused_decoder

        return [*vision_jobs, embed, *encoder,
                fused_decoder.decoder_job(parts, max_context, g, attention, position_offset)]

    kv_shape = (parts.num_kv_heads, parts.head_dim)

    def decoder_inputs(c):
        b, s, p = c["batch"], c["seq"], c["cache"]
        embeds = torch.randn(b, s, parts.hidden_size, generator=g)
        masks = [_mask(b, s, p, g) for _ in parts.mask_names]
        positions = (torch.arange(p, p + s) + 1).repeat(b, 1)
        if parts.position_rows > 1:  # rows that differ, as an image's (frame, row, column) do
            positions = torch.stack([positions + torch.randint(-1, 2, positions.shape, generator=g)
                                     for _ in range(parts.position_rows)]).clamp(min=0)
        extra = [torch.randn(parts.deepstack_layers, b, s, parts.hidden_size, generator=g)] if parts.deepstack_layers else []
        if parts.cross_attention:
            extra += _cross_inputs(parts, b, s, CROSS_LENGTHS[c["batch"], c["seq"], c["cache"]], g)
        past = [torch.randn(b, kv_shape[0], p, kv_shape[1], generator=g) for _ in range(2 * parts.num_layers)]
        return (embeds, *masks, positions, *extra, *past)

    past_names = kv_names("past", parts.num_layers)
    present_names = kv_names("present", parts.num_layers)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"} if parts.position_rows == 1 else {1: "batch", 2: "seq"}}
    axes.update({m: {0: "batch", 2: "seq", 3: "total_len"} for m in parts.mask_names})
    extra_names = ["deepstack_embeds"] if parts.deepstack_layers else []
    axes.update({n: {1: "batch", 2: "seq"} for n in extra_names})
    if parts.cross_attention:
        image_kv = cross_names(parts.cross_attention)
        extra_names += ["cross_mask", "cross_rows", *image_kv]
        axes.update({"cross_mask": {0: "batch", 2: "seq", 3: "cross_len"}, "cross_rows": {0: "batch", 2: "seq"}})
        axes.update({n: {0: "batch", 2: "cross_len"} for n in image_kv})
    axes.update({n: {0: "batch", 2: "cache_len"} for n in past_names})
    present_len = "total_len" if kv_storage == "state" else "seq"
    decoder = GraphJob(
        "decoder",
        DecoderGraph(parts, kv_storage),
        ["inputs_embeds", *parts.mask_names, "position_ids", *extra_names, *past_names],
        ["logits", *present_names],
        axes,
        decoder_inputs(TRACE),
        [decoder_inputs(c) for c in CHECKS],
        output_axes={"logits": {0: "batch"}, **{n: {0: "batch", 2: present_len} for n in present_names}},
        kv_storage=kv_storage,
    )
    return [*vision_jobs, embed, *encoder, decoder]


# source lengths (image tokens + prompt) the encoder is traced at and checked at
ENCODER_TRACE, ENCODER_CHECKS = (2, 11), ((1, 7), (3, 16))


def encoder_job(parts: Parts, g: torch.Generator) -> GraphJob:
    """An encoder-decoder's encoder (scheme encoder "prompt"): inputs_embeds [B, S, hidden] -> each decoder
    layer's cross-attention keys and values [B, heads, S, head_dim]; an audio encoder's (scheme "audio"):
    input_features [B, mels, frames] of a fixed size -> the same, over its fixed positions."""
    outputs = cross_names(parts.cross_attention)
    if parts.encoder_input is not None:
        def features(batch):
            return (torch.randn(batch, *parts.encoder_input, generator=g),)

        return GraphJob("encoder", parts.encoder, ["input_features"], outputs, {"input_features": {0: "batch"}},
                        features(2), [features(1), features(3)],
                        output_axes={name: {0: "batch"} for name in outputs})

    def embeds(batch, seq):
        return (torch.randn(batch, seq, parts.hidden_size, generator=g),)

    return GraphJob(
        "encoder",
        parts.encoder,
        ["inputs_embeds"],
        outputs,
        {"inputs_embeds": {0: "batch", 1: "source_len"}},
        embeds(*ENCODER_TRACE),
        [embeds(*c) for c in ENCODER_CHECKS],
        output_axes={name: {0: "batch", 2: "source_len"} for name in outputs},
        bounds={"source_len": parts.encoder_length},
    )
