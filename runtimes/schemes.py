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
POSITION_SCHEMES = ("linear",)
IMAGE_PLACEMENTS = ("replace_image_tokens",)


def check_schemes(schemes: SchemeSpec) -> None:
    for value, known, what in (
        (schemes.attention, ATTENTION_PATTERNS, "attention pattern"),
        (schemes.positions, POSITION_SCHEMES, "position scheme"),
        (schemes.image_placement, IMAGE_PLACEMENTS, "image placement"),
    ):
        if value not in known:
            raise PackageError(f"this mmedge does not know the {what} {value!r} the package needs; upgrade mmedge")


def position_ids(schemes: SchemeSpec, start: int, length: int, pad: int = 0) -> np.ndarray:
    """Position ids [1, length] for the tokens in cache slots start..start+length-1, `pad` slots of left padding
    first (their positions are the first token's: they are masked out)."""
    return (np.maximum(np.arange(start - pad, start - pad + length, dtype=np.int64), 0) + schemes.position_offset)[None]


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
