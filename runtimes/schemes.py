"""Named run-time schemes: where positions, masks and image embeddings come from.

A family's package selects schemes by name in its manifest (`schemes`); the
runtime calls the functions here. Nothing in the runtime branches on family.

Cache slots are indexed by sequence position: slot j holds the key/value of
token j. The decoder attends over [cache slots | new tokens], so each step's
mask has shape [batch, 1, n_new, cache_len + n_new].
"""

from __future__ import annotations

import numpy as np

from mmedge.errors import InputError, PackageError
from mmedge.manifest import SchemeSpec

ATTENTION_PATTERNS = ("causal", "prefix_bidirectional", "image_bidirectional")
POSITION_SCHEMES = ("linear", "mrope")
# "cross_attention": images are not in the prompt's embeddings; the decoder's cross-attention layers read their
# keys and values (the projector's), each token seeing the images the `cross_mask` rule gives it
IMAGE_PLACEMENTS = ("replace_image_tokens", "cross_attention")
VISION_SCHEMES = ("images", "patch_grid", "tile_canvas")
# which images each token of a cross-attention prompt sees. "image_spans" (Llama 3.2 Vision): an image from its
# token up to the next image token, images in a row all to the end of the text after them, the last image to the
# end; tokens before the first image see none. "last_image" (IDEFICS): the last image whose token is at or before
# the token; none before the first image, nor after an end-of-sequence token until the next image
CROSS_MASKS = ("image_spans", "last_image")
# "prompt": an encoder-decoder; the rendered prompt (images spliced in) goes through the `encoder` graph once and
# every decoder token attends over all of its positions. "audio" (Whisper): the `encoder` graph reads a window's
# log-mel features instead (runtimes/audio.py), and there are no vision graphs
ENCODERS = (None, "prompt", "audio")


def check_schemes(schemes: SchemeSpec) -> None:
    for value, known, what in (
        (schemes.attention, ATTENTION_PATTERNS, "attention pattern"),
        (schemes.positions, POSITION_SCHEMES, "position scheme"),
        (schemes.image_placement, IMAGE_PLACEMENTS, "image placement"),
        (schemes.vision, VISION_SCHEMES, "vision input scheme"),
        (schemes.encoder, ENCODERS, "encoder scheme"),
        *([(schemes.cross_mask, CROSS_MASKS, "cross-attention mask rule")]
          if schemes.image_placement == "cross_attention" else []),
    ):
        if value not in known:
            raise PackageError(f"this mmedge does not know the {what} {value!r} the package needs; upgrade mmedge")


def position_ids(schemes: SchemeSpec, start: int, length: int, pad: int = 0,
                 prompt: np.ndarray | None = None) -> np.ndarray:
    """Position ids for the tokens in cache slots start..start+length-1, `pad` slots of left padding first (their
    positions are the first token's: they are masked out).

    "linear": [1, length], token index + position_offset.
    "mrope": [3, 1, length] (temporal, height, width): the prompt's own from `prompt_positions` (pass them as
    `prompt`), and after the prompt every row continues from the prompt's largest position + 1.
    """
    index = np.arange(start - pad, start - pad + length, dtype=np.int64)
    if schemes.positions != "mrope":
        return (np.maximum(index, 0) + schemes.position_offset)[None]
    if prompt is None:
        raise ValueError("mrope positions need the prompt's positions (prompt_positions)")
    n = prompt.shape[1]
    after = index + (int(prompt.max()) + 1 - n)
    out = np.where(index < n, prompt[:, np.clip(index, 0, n - 1)], after)
    return np.ascontiguousarray(out[:, None, :])


def prompt_positions(schemes: SchemeSpec, ids: np.ndarray, grids: list, image_token_id: int,
                     merge_size: int | None, videos: list | None = None, video_token_id: int | None = None
                     ) -> np.ndarray | None:
    """The prompt's positions where the scheme gives each token its own ("mrope": [3, len(ids)]), else None.

    Qwen2-VL's multimodal rotary positions, as its `get_rope_index` computes them: text tokens count up on all
    three rows; the tokens of an image or video with grid (t, h, w) patches (h/m x w/m tokens per frame, m =
    `merge_size`) take (start + temporal, start + row, start + column); the text after it continues from
    start + max(h, w) / m. An image's temporal position is its frame index; a video's too (Qwen2-VL), or with
    `video_tokens_per_second` its time: trunc(index x tokens_per_second x seconds per temporal patch)
    (Qwen2.5-VL). `grids` (images) and `videos` ((grid, seconds per temporal patch) each) are matched to the
    runs of their tokens in order.
    """
    if schemes.positions != "mrope":
        return None
    videos = list(videos or [])
    kind = np.where(ids == image_token_id, 1, 0)
    if video_token_id is not None:
        kind = np.where(ids == video_token_id, 2, kind)
    queues = {1: [(tuple(g), None) for g in grids], 2: [(tuple(g), s) for g, s in videos]}
    names = {1: "image", 2: "video"}
    out = np.empty((3, len(ids)), np.int64)
    pos, i = 0, 0
    while i < len(ids):
        k = kind[i]
        if k == 0:
            end = i + int(np.argmax(kind[i:] != 0)) if (kind[i:] != 0).any() else len(ids)
            out[:, i:end] = np.arange(pos, pos + end - i)
            pos, i = pos + end - i, end
            continue
        if not queues[k]:
            raise InputError(f"the prompt has more {names[k]} tokens than the {names[k]}s given fill; do not type "
                             f"the {names[k]} token yourself")
        (t, h, w), seconds = queues[k].pop(0)
        h, w = h // merge_size, w // merge_size
        n = t * h * w
        if not (kind[i : i + n] == k).all() or i + n > len(ids):
            raise InputError(f"an {names[k]} of {n} tokens does not fit its place in the prompt; do not type the "
                             f"{names[k]} token yourself")
        frames = np.arange(t)
        if seconds is not None and schemes.video_tokens_per_second is not None:  # float32, as torch computes it
            step = np.float32(schemes.video_tokens_per_second) * np.float32(seconds)
            frames = (frames.astype(np.float32) * step).astype(np.int64)
        rows, cols = np.arange(h), np.arange(w)
        out[0, i : i + n] = np.repeat(frames, h * w) + pos
        out[1, i : i + n] = np.tile(np.repeat(rows, w), t) + pos
        out[2, i : i + n] = np.tile(cols, t * h) + pos
        pos, i = pos + max(h, w), i + n
    left = [names[k] for k in (1, 2) if queues[k]]
    if left:
        raise InputError(f"{' and '.join(left)}(s) given have no place in the prompt (it has fewer tokens for them "
                         "than they need)")
    return out


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position along one axis (of `size` positions), the two rows of a `side`-long table that bilinear
    resampling with aligned corners reads, and their weights (float32, the order of transformers' arithmetic)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0)
    return taps, weights.astype(np.float32)


def _bicubic_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position along one axis (of `size` positions), the four rows of a `side`-long table that torch's
    grid_sample reads in bicubic mode (align_corners False, border padding) at the position's centre, and their
    cubic-convolution weights (A = -0.75), in float32 as torch computes them."""
    one, two = np.float32(1), np.float32(2)
    norm = (index.astype(np.float32) + np.float32(0.5)) / size.astype(np.float32) * two - one
    src = ((norm + one) * np.float32(side) - one) / two
    floor = np.floor(src)
    t = (src - floor)[:, None]
    a = np.float32(-0.75)
    near = lambda x: ((a + two) * x - (a + np.float32(3))) * x * x + one  # noqa: E731
    far = lambda x: ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a  # noqa: E731
    weights = np.concatenate([far(t + one), near(t), near(one - t), far(two - t)], axis=1)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(-1, 3), 0, side - 1)
    return taps, weights.astype(np.float32)


TABLE_RESAMPLERS = {None: _bilinear_taps, "bicubic_border": _bicubic_taps}


def vision_inputs(schemes: SchemeSpec, merge_size: int, grids: list) -> dict[str, np.ndarray]:
    """The per-patch indices a "patch_grid" vision encoder takes beside the patches of `grids` ((t, h, w) each,
    in patches, as the preprocessing cut them, concatenated in order):

    vision_positions [N, 2]: each patch's (row, column) in its frame, in merge-block order (the rotary input);
    frame_segments [N]: which frame each patch is in (attention stays within a frame);
    with a window (`schemes.vision_window` merged tokens a side, Qwen2.5-VL):
    window_index [N / m^2]: the merged tokens regrouped window by window (the order the blocks run in);
    window_slots [windows, side^2 m^2]: each window's patches, in that order (-1 pads a window at a frame's
    edge), so a windowed block attends window by window rather than over a mask of the whole image;
    window_slot_of [N]: where each patch sits in window_slots flattened (the way back);
    window_segments [N]: which window each patch is in, in window order (what packages exported before
    window_slots masked attention with);
    with a learned position table (`schemes.vision_pos_grid` a side, Qwen3-VL, GLM-4V):
    pos_indices, pos_weights [N, k]: the table rows and weights that resample it to the frame's grid, in
    float32 as transformers computes them: bilinearly with aligned corners (k = 4, Qwen3-VL) or, with
    `vision_pos_resample` "bicubic_border", as grid_sample's bicubic mode (k = 16, GLM-4V).
    """
    m = merge_size
    positions, frames, order, windows = [], [], [], []
    frame, window, offset = 0, 0, 0
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        positions.append(np.tile(np.stack([block(rows), block(cols)], axis=1), (t, 1)))
        frames.append(np.repeat(np.arange(frame, frame + t), h * w))
        frame += t
        if schemes.vision_window:
            side, lh, lw = schemes.vision_window, h // m, w // m
            index = np.arange(t * lh * lw).reshape(t, lh, lw)
            ph, pw = -lh % side, -lw % side
            padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
            nh, nw = (lh + ph) // side, (lw + pw) // side
            padded = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
            sizes = (padded >= 0).sum(1)
            order.append(padded[padded >= 0] + offset)
            windows.append(np.repeat(np.arange(window, window + len(sizes)), sizes * m * m))
            window += len(sizes)
        offset += t * (h // m) * (w // m)
    out = {"vision_positions": np.concatenate(positions).astype(np.int64),
           "frame_segments": np.concatenate(frames).astype(np.int64)}
    if schemes.vision_pos_grid:
        sizes = np.concatenate([np.tile([[h, w]], (t * h * w, 1)) for t, h, w in grids])
        resample = TABLE_RESAMPLERS.get(schemes.vision_pos_resample)
        if resample is None:
            raise PackageError(f"this mmedge does not know the position table resampling "
                               f"{schemes.vision_pos_resample!r} the package needs; upgrade mmedge")
        taps = [resample(out["vision_positions"][:, a], sizes[:, a], schemes.vision_pos_grid) for a in (0, 1)]
        (rows, row_w), (cols, col_w) = taps
        k = rows.shape[1] * cols.shape[1]
        out["pos_indices"] = (rows[:, :, None] * schemes.vision_pos_grid + cols[:, None, :]).reshape(-1, k)
        out["pos_weights"] = (row_w[:, :, None] * col_w[:, None, :]).reshape(-1, k)
    if schemes.vision_window:
        segments = np.concatenate(windows).astype(np.int64)
        counts = np.bincount(segments)
        at = np.arange(len(segments)) - (np.cumsum(counts) - counts)[segments]  # each patch's place in its window
        width = schemes.vision_window ** 2 * m * m
        slots = np.full((len(counts), width), -1, np.int64)
        slots[segments, at] = np.arange(len(segments))
        out["window_index"] = np.concatenate(order).astype(np.int64)
        out["window_slots"], out["window_slot_of"] = slots, segments * width + at
        out["window_segments"] = segments
    return out


def tile_canvas_inputs(max_tiles: int, grids: list) -> dict[str, np.ndarray]:
    """Vision scheme "tile_canvas": per image of (rows, cols) tiles, its aspect_ratio_ids (the arrangement's index
    + 1 among every (rows, cols) of at most max_tiles tiles, in MllamaImageProcessor's order) and its
    aspect_ratio_mask [max_tiles] (1 for the tiles it has)."""
    arrangements = [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]
    ids = np.array([arrangements.index(tuple(grid)) + 1 for grid in grids], np.int64)
    mask = np.zeros((len(grids), max_tiles), np.int64)
    for i, (rows, cols) in enumerate(grids):
        mask[i, : rows * cols] = 1
    return {"aspect_ratio_ids": ids, "aspect_ratio_mask": mask}


def vision_feeds(schemes: SchemeSpec, pixels: np.ndarray, grid: tuple) -> dict[str, np.ndarray]:
    """The vision encoder's inputs for one image's pixels, [frames, 3, H, W], where the scheme is "images" or
    "tile_canvas" (a batch of one image, its tiles, and their aspect-ratio inputs)."""
    if schemes.vision == "tile_canvas":
        return {"pixel_values": pixels[None], **tile_canvas_inputs(len(pixels), [grid])}
    return {"pixel_values": pixels}


def cross_visibility(schemes: SchemeSpec, ids: np.ndarray, image_token_id: int, n_images: int,
                     eos_ids=()) -> np.ndarray:
    """[len(ids), n_images] bool: which images each prompt token sees (rule `schemes.cross_mask`); a token
    generated after the prompt sees what the prompt's last token sees."""
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != n_images:
        raise InputError(f"the prompt has {len(where)} image tokens for {n_images} images: write one per image")
    sees = np.zeros((len(ids), n_images), bool)
    if schemes.cross_mask == "last_image":
        last, ended = -1, False
        for i, token in enumerate(ids.tolist()):
            if token == image_token_id:
                last, ended = last + 1, False
            if last >= 0 and not ended:
                sees[i, last] = True
            ended = ended or token in eos_ids
        return sees
    ends = [int(b) for b in where[1:]] + [len(ids)]
    last = len(ids)
    for i in range(n_images - 1, -1, -1):  # images in a row all see to the end of the text after them
        if ends[i] == where[i] + 1:
            ends[i] = last
        last = ends[i]
        sees[where[i] : ends[i], i] = True
    return sees


def cross_masks(sees: np.ndarray, start: int, n: int, lengths: list[int], visible: list[int], pad: int = 0,
                dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's cross_mask [1, 1, n, sum(lengths)] (additive: 0 where the token may attend, the dtype's
    lowest elsewhere) and cross_rows [1, 1, n, 1] (1 where it sees any image) for the tokens in slots
    start..start+n-1 (`pad` slots of left padding first), given `sees` from cross_visibility, each image's
    positions (`lengths`) and how many of them are its content (`visible`; the rest are padding tiles). No image
    at all: one position, seen by none (the decoder's cross layers add nothing then)."""
    total = sum(lengths)
    if not total:
        return np.full((1, 1, n, 1), np.finfo(dtype).min, dtype), np.zeros((1, 1, n, 1), dtype)
    index = np.clip(np.arange(start - pad, start - pad + n), 0, len(sees) - 1)
    rows_sees = sees[index] & (np.arange(start - pad, start - pad + n) >= 0)[:, None]
    columns = np.zeros((len(lengths), total), bool)  # image i's content positions
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    for i, (offset, count) in enumerate(zip(offsets, visible)):
        columns[i, offset : offset + count] = True
    keep = rows_sees.astype(np.int64) @ columns.astype(np.int64) > 0  # [n, total]
    mask = np.where(keep, 0, np.finfo(dtype).min).astype(dtype)[None, None]
    rows = keep.any(-1).astype(dtype)[None, None, :, None]
    return mask, rows


def blocks(schemes: SchemeSpec, input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Per prompt position, the bidirectional block it belongs to (-1: none), as the attention pattern says.

    "prefix_bidirectional" (PaliGemma): the whole prompt is one block.
    "image_bidirectional" (Gemma 3): each run of image tokens is a block.
    "causal": no blocks.
    """
    if schemes.attention == "prefix_bidirectional":
        return np.zeros(len(input_ids), dtype=np.int64)
    if schemes.attention == "image_bidirectional":
        image = input_ids == image_token_id
        starts = image & ~np.concatenate([[False], image[:-1]])
        return np.where(image, np.cumsum(starts) - 1, -1)
    return np.full(len(input_ids), -1, dtype=np.int64)


def allowed(
    schemes: SchemeSpec, q: np.ndarray, k: np.ndarray, block_of: np.ndarray, window: int | None = None
) -> np.ndarray:
    """Boolean [len(q), len(k)]: may the token at index q attend to the token at index k.

    Causal, and tokens of one bidirectional block (`block_of`, per prompt
    position) see each other whole. With a sliding `window`, transformers
    composes the two differently per pattern, and so do we: PaliGemma 2's
    prefix block ignores the window ((causal AND window) OR block), Gemma 3's
    image blocks stay inside it ((causal OR block) AND window). Generated
    tokens belong to no block.
    """
    def block(i):
        return np.where(i < len(block_of), block_of[np.minimum(i, len(block_of) - 1)], -1) if len(block_of) else -np.ones_like(i)

    bq, bk = block(q), block(k)
    same = (bq[:, None] == bk[None, :]) & (bq[:, None] >= 0)
    ok = k[None, :] <= q[:, None]
    near = (q[:, None] - k[None, :] < window) if window is not None else True
    if schemes.attention == "image_bidirectional":
        return (ok | same) & near
    return (ok & near) | same


def attention_masks(
    schemes: SchemeSpec,
    mask_names: list[str],
    start: int,
    n_new: int,
    cache_len: int,
    block_of: np.ndarray,
    dtype: np.dtype = np.float32,
    pad: int = 0,
) -> dict[str, np.ndarray]:
    """Additive masks for a step that feeds the tokens in cache slots start..start+n_new-1.

    `cache_len` is the number of cache slots before the new tokens: the
    length of the past buffers fed (slots >= start are not yet written and
    are masked out), or of the engine-held state (then equal to start).
    `block_of` comes from `blocks`. A second mask name, when the decoder has
    one, gets the sliding-window variant. `pad`: slots of left padding
    before the sequence's first token (a row of a batch with longer
    prompts): token index = slot - pad; no token sees them, and each of them
    sees only itself.
    """
    q_slot = np.arange(start, start + n_new)
    k_slot = np.concatenate([np.arange(cache_len), q_slot])
    written = np.concatenate([np.arange(cache_len) < start, np.ones(n_new, dtype=bool)]) & (k_slot >= pad)
    q, keys = np.maximum(q_slot - pad, 0), np.maximum(k_slot - pad, 0)
    padding_self = (q_slot < pad)[:, None] & (k_slot[None, :] == q_slot[:, None])
    neg = np.finfo(dtype).min
    masks = {}
    for i, name in enumerate(mask_names):
        ok = allowed(schemes, q, keys, block_of, schemes.sliding_window if i else None) & written[None, :]
        masks[name] = np.where(ok | padding_self, 0.0, neg).astype(dtype)[None, None]
    return masks


def place_image(
    schemes: SchemeSpec, inputs_embeds: np.ndarray, input_ids: np.ndarray, image_embeds: np.ndarray, image_token_id: int
) -> np.ndarray:
    """Put image embeddings where the prompt has image tokens (in order)."""
    slots = input_ids[0] == image_token_id
    flat = image_embeds.reshape(-1, image_embeds.shape[-1])
    if int(slots.sum()) != flat.shape[0]:
        raise InputError(
            f"the prompt has {int(slots.sum())} image tokens but the image gives {flat.shape[0]} embeddings; "
            "do not type the image token yourself"
        )
    out = inputs_embeds.copy()
    out[0, slots] = flat.astype(out.dtype, copy=False)
    return out


def media_spans(ids: np.ndarray, token_id: int | None, counts: list[int], keys: list[bytes]) -> list[tuple]:
    """(first, last + 1, key) of each image's (or video's) tokens in `ids`, in order: `counts[i]` tokens each (the
    tokens of one image need not be contiguous: tiles are separated by text)."""
    if token_id is None or not counts:
        return []
    where = np.flatnonzero(ids == token_id)
    if len(where) != sum(counts):
        raise InputError(f"the prompt holds {len(where)} media tokens for {sum(counts)} media embeddings")
    ends = np.cumsum(counts)
    return [(int(where[end - n]), int(where[end - 1]) + 1, key) for n, end, key in zip(counts, ends, keys)]


def reusable_prefix(old_ids: np.ndarray, old_blocks: np.ndarray, old_spans: list, new_ids: np.ndarray,
                    new_blocks: np.ndarray, new_spans: list) -> int:
    """How many leading tokens of a new sequence have the keys and values a cache holds for an old one (never the
    whole new sequence: one token at least is fed, for its logits). They must be the same token ids, with the same
    image (by content) wherever media tokens lie among them, and the cut must not split a bidirectional attention
    block of either sequence (`blocks`; the old one's generated tokens are in no block), whose every token's keys
    and values depend on the whole block."""
    n = min(len(old_ids), len(new_ids) - 1)
    differ = np.flatnonzero(old_ids[:n] != new_ids[:n])
    cut = int(differ[0]) if differ.size else max(n, 0)
    old = set(old_spans)
    for span in new_spans:
        if span[0] < cut and span not in old:
            cut = span[0]
    for span in old_spans:  # an old image cut in two is not the new one's either
        if span[0] < cut < span[1]:
            cut = span[0]
    moved = True
    while moved and cut > 0:
        moved = False
        for blocks in (old_blocks, new_blocks):
            if 0 < cut < len(blocks) and blocks[cut - 1] >= 0 and blocks[cut - 1] == blocks[cut]:
                cut = int(np.flatnonzero(blocks[:cut] == blocks[cut])[0])
                moved = True
    return cut
