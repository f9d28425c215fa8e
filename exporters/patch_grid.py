"""The vision encoder of the "patch_grid" scheme, shared by the families whose ViT takes any number of patches
with 2-D rotary positions (runtimes/schemes.vision_inputs computes its per-patch inputs)."""

from __future__ import annotations

import torch


def _segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Additive [1, 1, N, N]: patches attend to patches of the same segment only."""
    same = segments[:, None] == segments[None, :]
    return torch.where(same, 0.0, torch.finfo(torch.float32).min)[None, None]


def _by_token(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of `x` regrouped by merged token: the tokens in `index` order, each token's `unit` patches together."""
    return x.reshape(-1, unit, x.shape[-1])[index].reshape(-1, x.shape[-1])


class PatchGridEncoder(torch.nn.Module):
    """A "patch_grid" ViT (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V): its blocks with masked attention instead of
    the upstream per-image split (`cu_seqlens`), so one graph runs any number of images of any grid; the same
    arithmetic per block, the patches in the same order out as in. Inputs after the patches, as
    schemes.vision_inputs names them (`takes` picks them): vision_positions, frame_segments, then pos_indices,
    pos_weights (a learned position table) and window_index, window_slots, window_slot_of (windows: the windowed
    blocks attend window by window, [windows, heads, w, w] scores instead of a [patches, patches] mask)."""

    INPUTS = ("vision_positions", "frame_segments", "pos_indices", "pos_weights", "window_index", "window_slots",
              "window_slot_of")

    def __init__(self, visual, full_blocks: tuple[int, ...] | None, pos_table, deepstack: tuple[int, ...],
                 embed_norm=None):
        super().__init__()
        from importlib import import_module

        self.visual = visual
        self.full_blocks = full_blocks  # None: every block attends within frames
        # the learned position table (an Embedding, resampled by the taps the runtime computes) or None; the norm
        # after the patch embedding (GLM-4V's post_conv_layernorm) or None
        self.pos_table, self.embed_norm, self.deepstack = pos_table, embed_norm, deepstack
        self.unit = visual.spatial_merge_size ** 2
        self.rotary = import_module(type(visual).__module__).apply_rotary_pos_emb_vision

    @classmethod
    def takes(cls, names) -> list[str]:
        """Of the inputs schemes.vision_inputs computes, those this graph reads, in their order."""
        return [name for name in names if name in cls.INPUTS]

    def forward(self, pixel_values, vision_positions, frame_segments, *rest):
        vm = self.visual
        hidden = vm.patch_embed(pixel_values)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        if self.pos_table is not None:
            indices, weights, *rest = rest
            hidden = hidden + (self.pos_table(indices) * weights[:, :, None]).sum(1).to(hidden.dtype)
        cos, sin = vm.rotary_pos_emb(hidden, vision_positions)
        full = (_segment_mask(frame_segments), None)
        window = None
        if self.full_blocks is not None:
            window_index, slots, slot_of = rest
            # the blocks run in window order; the frames are whole in it, so `full` (by frame) holds there too
            hidden, cos, sin = (_by_token(t, window_index, self.unit) for t in (hidden, cos, sin))
            # padded slots read patch 0 and are masked as keys; their query rows are never read back (a product,
            # not torch.where: coremltools types a where of two scalars as a scalar)
            keys = ((slots < 0).float() * torch.finfo(torch.float32).min)[:, None, None, :]
            window = (keys, (torch.where(slots >= 0, slots, 0), slot_of))
        stacked = []
        for i, block in enumerate(vm.blocks):
            mask, windows = full if window is None or i in self.full_blocks else window
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, mask, windows)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if i in self.deepstack:
                stacked.append(vm.deepstack_merger_list[self.deepstack.index(i)](hidden))
        if window is not None:
            back = torch.empty_like(window_index).scatter_(0, window_index, torch.arange(window_index.shape[0]))
            hidden = _by_token(hidden, back, self.unit)
        return (hidden, torch.stack(stacked)) if self.deepstack else hidden

    def _attention(self, attn, x, cos, sin, mask, windows=None):
        """Attention over all patches under `mask` [1, 1, N, N], or, with `windows` (slots [W, w], slot_of [N]),
        within each window under `mask` [W, 1, 1, w] (its padding)."""
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self.rotary(q, k, cos, sin)
        if windows is None:
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        else:
            q, k, v = (t[windows[0]].transpose(1, 2) for t in (q, k, v))
        weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask
        weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).flatten(0, 1).flatten(1)  # [N or W * w, hidden]
        return attn.proj(out if windows is None else out[windows[1]])
