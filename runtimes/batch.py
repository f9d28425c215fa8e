"""Several (image, prompt) pairs through one decoder at once: the Pipeline's row batching.

`Pipeline.generate_batch` checks the requests and calls `_generate_rows`: every
row's prompt through the decoder, then one decoder call per new token for all
rows still answering. Two ways to lay the rows out, by what the decoder takes:
left-padded rows with their own masks and positions (`_decode_rows`), or, for a
decoder built on GroupQueryAttention (KV cache written in place), each prompt
prefilled into its own rows of the cache and then stepped at its own length
(`_prefill_rows_in_place`). Rows that have answered leave the batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from mmedge.errors import InputError
from mmedge.runtimes import schemes
from mmedge.runtimes.kv_cache import make_cache
from mmedge.runtimes.sampling import GenerationOptions, choose

log = logging.getLogger("mmedge.runtimes.pipeline")


@dataclass
class Timings:
    """Seconds spent in each stage of the last generate call."""

    preprocess: float = 0.0  # image and prompt
    vision: float = 0.0  # vision encoder
    projector: float = 0.0
    encoder: float = 0.0  # an encoder-decoder's encoder over the prompt
    prefill: float = 0.0  # the decoder over the prompt
    decode: float = 0.0
    new_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # of the prompt's, whose keys and values the cache held from the call before
    steps: list[float] = field(default_factory=list, repr=False)


class RowBatching:
    """Pipeline's methods for a batch of sequences (mixed into Pipeline; they use its graphs, cache spec, prompt
    preparation and decoder feeds)."""

    def _generate_rows(self, requests: list, opts: GenerationOptions) -> list[list[int]]:
        """Every row's prompt through the decoder, then one step per new token for all rows. Rows are left-padded
        to the longest prompt (masked out, positions per row) where the decoder takes masks; a decoder that takes
        sequence lengths instead (GroupQueryAttention, cache written in place) prefills each row into its own
        rows of the cache and then steps them all with their own lengths."""
        t = self.timings = Timings()
        start = time.perf_counter()
        prepared = [self._prepare(image, prompt, opts) for image, prompt in requests]
        t.preprocess = time.perf_counter() - start
        capacity = self.cache.capacity
        lengths = np.array([len(seq.ids) for seq in prepared])
        for i, n in enumerate(lengths):
            if n >= capacity:
                raise InputError(f"prompt {i} is {n} tokens but this package's context holds {capacity}; "
                                 "shorten it or re-export with a larger --max-context")
        t.prompt_tokens = int(lengths.sum())
        rows = self._prompt_embeddings_many(prepared)
        batch, longest = len(rows), int(lengths.max())
        cache = make_cache(self.manifest.kv_cache, self.graphs["decoder"], batch)
        start = time.perf_counter()
        if self.takes_lengths:
            logits, step, drop = self._prefill_rows_in_place(cache, rows, lengths, prepared)
        else:
            live = {"pads": longest - lengths, "seqs": prepared}
            embeds = np.zeros((batch, longest, rows[0].shape[-1]), rows[0].dtype)
            for i, row in enumerate(rows):
                embeds[i, live["pads"][i]:] = row[0]
            cache.reset()

            def step(embeds):
                out = self._decode_rows(embeds, cache, live["pads"], live["seqs"])
                cache.write(out, embeds.shape[1])
                return out["logits"]

            def drop(keep):
                live["pads"], live["seqs"] = live["pads"][keep], [live["seqs"][k] for k in keep]

            logits = step(embeds)
        t.prefill = time.perf_counter() - start
        budget = min(opts.max_new_tokens, capacity - longest)
        if budget < opts.max_new_tokens:
            log.warning("max_new_tokens %d is more than the %d tokens this package's context (max_context %d) has "
                        "left after the batch's longest (%d-token) prompt: generating at most %d",
                        opts.max_new_tokens, budget, capacity, longest, budget)
        eos = self.manifest.special_tokens.eos_ids
        first, banned = self._banned(opts, logits.shape[-1])
        rngs = [np.random.default_rng(opts.seed) for _ in rows]  # as each row would draw alone
        out: list[list[int]] = [[] for _ in rows]
        order = np.arange(batch)  # the request each row of the running batch answers
        alive = np.ones(batch, bool)
        for i in range(budget):
            fed = np.zeros((len(order), 1), np.int64)  # a finished row still in the batch is fed token 0
            for j in np.flatnonzero(alive):
                token = choose(logits[j, -1], opts, rngs[order[j]], banned if i else first)
                if token in eos:
                    alive[j] = False
                    continue
                out[order[j]].append(token)
                fed[j, 0] = token
            t.new_tokens += int(alive.sum())
            if not alive.any() or i + 1 == budget:
                break
            if not alive.all() and cache.keep_rows(np.flatnonzero(alive)):  # finished rows leave the batch
                keep = np.flatnonzero(alive)
                drop(keep)
                order, fed, alive = order[keep], fed[keep], alive[keep]
            start = time.perf_counter()
            logits = step(self._embed(fed))
            t.steps.append(time.perf_counter() - start)
            t.decode += t.steps[-1]
        return out

    def _decode_rows(self, embeds: np.ndarray, cache, pads: np.ndarray, seqs: list) -> dict:
        """One decoder call for left-padded rows: each row's positions and masks from its own padding."""
        start, n = cache.length, embeds.shape[1]
        positions = np.concatenate([schemes.position_ids(self.manifest.schemes, start, n, int(pad), seq.positions)
                                    for pad, seq in zip(pads, seqs)], axis=-2)
        masks = [schemes.attention_masks(self.manifest.schemes, self.mask_names, start, n, cache.mask_slots,
                                         seq.block_of, self.mask_dtype, int(pad)) for pad, seq in zip(pads, seqs)]
        feeds = {name: np.concatenate([m[name] for m in masks]) for name in self.mask_names}
        if self.deepstack_shape:
            feeds["deepstack_embeds"] = np.concatenate([self._deepstack(seq, start, n, int(pad))
                                                        for pad, seq in zip(pads, seqs)], axis=1)
        return self.graphs["decoder"].run({"inputs_embeds": embeds, "position_ids": positions, **feeds,
                                           **cache.feeds()})

    def _prefill_rows_in_place(self, cache, rows: list, lengths: np.ndarray, seqs: list):
        """GroupQueryAttention: each prompt alone into its own rows of the batch's buffers (bound in place), then
        steps of all rows, each at its own length."""
        decoder, into, feeds = self.graphs["decoder"], cache.into(), cache.feeds()
        vocab = self._into["logits"].shape[-1]
        live = {"seqs": list(seqs)}
        firsts = []
        for r, row in enumerate(rows):
            n = row.shape[1]
            past = {name: array[r : r + 1] for name, array in feeds.items()}  # views: written where they lie
            present = {name: array[r : r + 1] for name, array in into.items()}
            logits = np.empty((1, 1, vocab), self._into["logits"].dtype)
            extra = {"position_ids": self._positions(seqs[r], 0, n)} if self.lengths_and_positions else {}
            extra.update(self._masks(seqs[r], 0, n, 0))
            decoder.run({"inputs_embeds": row, "seqlens_k": np.array([n - 1], np.int32),
                         "total_sequence_length": np.array(n, np.int32), **extra, **past},
                        into={**present, "logits": logits})
            firsts.append(logits)
        live["seen"] = lengths.astype(np.int32).copy()  # tokens in each row's cache
        live["logits"] = np.empty((len(rows), 1, vocab), self._into["logits"].dtype)

        def step(embeds):
            seen = live["seen"]
            if int(seen.max()) + 1 > cache.capacity:
                raise ValueError(f"KV cache overflow: {int(seen.max()) + 1} > {cache.capacity}")
            extra = {}
            if self.lengths_and_positions:
                extra["position_ids"] = np.concatenate([self._positions(seq, int(at), 1)
                                                        for seq, at in zip(live["seqs"], seen)], axis=-2)
            if self.mask_names:  # each row's masks over its own tokens, padded (masked) to the longest row's
                total = int(seen.max()) + 1
                rows = [self._masks(seq, int(at), 1, int(at)) for seq, at in zip(live["seqs"], seen)]
                neg = np.finfo(self.mask_dtype).min
                extra.update({name: np.concatenate([np.pad(m[name], [(0, 0)] * 3 + [(0, total - m[name].shape[-1])],
                                                           constant_values=neg) for m in rows])
                              for name in self.mask_names})
            decoder.run({"inputs_embeds": embeds, "seqlens_k": seen.copy(),
                         "total_sequence_length": np.array(seen.max() + 1, np.int32), **extra, **cache.feeds()},
                        into={**cache.into(), "logits": live["logits"]})
            seen[:] += 1
            return live["logits"]

        def drop(keep):
            live["seqs"], live["seen"] = [live["seqs"][k] for k in keep], live["seen"][keep]
            live["logits"] = np.empty((len(keep), 1, vocab), live["logits"].dtype)

        return np.concatenate(firsts), step, drop
