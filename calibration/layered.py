"""A big float32 decoder run layer group by layer group over many sequences, each group's weights read once.

Calibration and the held-out measurement run a 3B model's float32 decoder over
every sample. Run whole, sample after sample, every weight is read for every
sample and every page of the 12 GB graph is mapped at once (Qwen2.5-VL-3B:
peak RSS 17 GiB in calibration; the kernel can drop the pages, but a machine
with less memory than the decoder then reads it from disk again per sample).

Here the decoder's ONNX graph is cut into pieces of about PIECE_BYTES of
weights each (`split`: the graph's own nodes in their order, each piece a small
graph file beside the decoder reading the same data file; cut where the fewest
tensors cross). A Pipeline runs the samples with `Deferred` standing in for
the decoder: it keeps each call's inputs and answers zeros, which is enough
where the decoder's answers steer nothing: prefills (calibration) and teacher
forcing along known tokens (the measurement). `replay` then runs piece by
piece over every recorded sequence, each piece's cache slots its own, the
tensors crossing to the next piece kept per step, and lets each piece's
session go before opening the next: at most one piece's weights mapped, every
weight read once. Its outputs are the whole graph's (the same nodes and
weights; ONNX Runtime may fuse across a cut differently: float32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper
from tqdm.auto import tqdm

from mmedge.exporters.resources import release_freed_memory

# weights per piece: what is mapped at once (the LM head, one weight of 1.2 GB at Qwen2.5-VL-3B's size, is a piece
# of its own however small this is); each piece is a session opened and optimized once
PIECE_BYTES = 1 << 30


@dataclass
class Piece:
    path: Path
    inputs: list[str]  # graph inputs and tensors made by earlier pieces
    outputs: list[str]  # the whole graph's outputs made here, then tensors later pieces take
    graph_outputs: list[str] = field(default_factory=list)


def _initializer_bytes(init: onnx.TensorProto) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(init.raw_data) or int(np.prod(init.dims, dtype=np.int64)) * 4


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If, Loop, Scan) read from the graph around them."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            made = {i.name for i in graph.input} | {i.name for i in graph.initializer}
            for inner in graph.node:
                names |= {n for n in (*inner.input, *_subgraph_names(inner)) if n and n not in made}
                made |= set(inner.output)
    return names


def _reads(node: onnx.NodeProto) -> list[str]:
    return [n for n in node.input if n] + sorted(_subgraph_names(node))


def _beside_their_use(nodes: list, inits) -> list:
    """The nodes in an order where each one computed from weights alone (a quantized weight's DequantizeLinear, a
    Constant) stands just before the first node that computes from activations with it. A quantizer that puts
    every DequantizeLinear at the graph's top would otherwise leave every dequantized weight crossing every cut
    (Qwen2.5-VL-3B's INT8 decoder: 23 GiB of float32 weights kept between pieces)."""
    made_from_weights: set[str] = set()
    static = []
    for node in nodes:
        alone = all(name in inits or name in made_from_weights for name in _reads(node))
        static.append(alone)
        if alone:
            made_from_weights.update(node.output)
    producer = {out: i for i, node in enumerate(nodes) if static[i] for out in node.output}
    order: list[int] = []
    placed: set[int] = set()

    def place(i: int) -> None:  # a node after the weight-only nodes it reads
        if i not in placed:
            placed.add(i)
            for name in _reads(nodes[i]):
                if name in producer:
                    place(producer[name])
            order.append(i)

    for i in range(len(nodes)):
        if not static[i]:
            place(i)
    for i in range(len(nodes)):  # what only graph outputs read, last
        place(i)
    return [nodes[i] for i in order]


def _cuts(nodes, inits: dict[str, int], last_use: dict[str, int], budget: int, apart: np.ndarray) -> list[int]:
    """Node indices to cut before: once a piece holds `budget` bytes of weights, the position within the next
    quarter budget's nodes where the fewest tensors cross (a layer's edge: its residual stream), at a node that
    brings weights in and not where `apart[i]` (a layer's cache read on both sides); no cut leaving less than a
    quarter budget after it."""
    fresh, seen = [], set()
    for node in nodes:
        new = {w for w in node.input if w in inits and w not in seen}
        seen |= new
        fresh.append(sum(inits[w] for w in new))
    crossing = np.zeros(len(nodes) + 2, np.int64)  # crossing[i]: tensors made before node i and read from it on
    for i, node in enumerate(nodes):
        for o in node.output:
            if o and last_use.get(o, -1) > i:
                crossing[i + 1] += 1
                crossing[min(last_use[o], len(nodes)) + 1] -= 1
    crossing = np.cumsum(crossing)
    tail = np.cumsum(fresh[::-1])[::-1]  # weight bytes from node i to the end
    cuts, start = [], 0
    while True:
        held, i = 0, start
        while i < len(nodes) and held < budget:
            held, i = held + fresh[i], i + 1
        best, window = None, 0
        while i < len(nodes) and (window < budget // 4 or best is None):
            if fresh[i] and not apart[i] and (best is None or crossing[i] < crossing[best]):
                best = i
            window, i = window + fresh[i], i + 1
        if best is None or tail[best] < budget // 4:
            return cuts
        cuts.append(best)
        start = best


def split(path: Path, budget: int | None = None, outputs: list[str] | None = None) -> list[Piece]:
    """Cut the graph at `path` into pieces of about `budget` (PIECE_BYTES) bytes of weights, written beside it
    (reading its data file; `remove` them after). `outputs`: the whole graph's outputs wanted (default all)."""
    budget = budget or PIECE_BYTES
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {i.name: _initializer_bytes(i) for i in graph.initializer}
    nodes = _beside_their_use(list(graph.node), inits)
    wanted = list(outputs) if outputs is not None else [o.name for o in graph.output]
    last_read: dict[str, int] = {}  # what the cuts weigh: a graph output crosses only where a later node reads it
    for i, node in enumerate(nodes):
        for name in _reads(node):
            last_read[name] = i
    # a layer's cache is read and written within one piece (its present made and read there too): the replay holds
    # each piece's slots as its own, and a piece reading a past whose present a later piece makes would see it a
    # step behind. Only its shape read elsewhere (a traced graph's sequence length, from whichever layer's cache the
    # tracer took it: Qwen2.5-VL-3B's from layers 3 and 20, at the top) is what the replay feeds there (_PieceCache)
    apart = np.zeros(len(nodes) + 1, bool)
    for past in (i.name for i in graph.input if i.name.startswith("past.")):
        present = past.replace("past.", "present.", 1)
        touch = [i for i, node in enumerate(nodes) if present in {*_reads(node), *node.output}
                 or (past in _reads(node) and node.op_type != "Shape")]
        if touch:
            apart[touch[0] + 1:touch[-1] + 1] = True
    cuts = _cuts(nodes, inits, last_read, budget, apart)
    bounds = list(zip([0, *cuts], [*cuts, len(nodes)]))
    made_in: dict[str, int] = {}
    for k, (a, b) in enumerate(bounds):
        for node in nodes[a:b]:
            for o in node.output:
                made_in[o] = k
    read_in: dict[str, set[int]] = {}
    for k, (a, b) in enumerate(bounds):
        for node in nodes[a:b]:
            for name in _reads(node):
                read_in.setdefault(name, set()).add(k)
    pieces: list[Piece] = []
    try:
        _write_pieces(path, model, nodes, bounds, wanted, made_in, read_in, pieces)
    except BaseException:
        remove(pieces)
        raise
    return pieces


def _write_pieces(path, model, nodes, bounds, wanted, made_in, read_in, pieces) -> None:
    """Each piece's graph written beside `path`, appended to `pieces` as it is."""
    graph = model.graph
    types = _tensor_types(model)
    graph_inputs = {i.name: i for i in graph.input}
    by_name = {i.name: i for i in graph.initializer}
    for k, (a, b) in enumerate(bounds):
        part = nodes[a:b]
        reads = list(dict.fromkeys(n for node in part for n in _reads(node)))
        ins = [n for n in reads if n in graph_inputs or (n in made_in and made_in[n] < k)]
        mine = [n for n in reads if n in by_name and n not in made_in]
        made_here = [o for node in part for o in node.output if o]
        outs_graph = [o for o in wanted if made_in.get(o) == k]
        later = [o for o in made_here if any(j > k for j in read_in.get(o, ())) and o not in outs_graph]
        sub = helper.make_graph(
            part, f"{graph.name}_piece{k}",
            [graph_inputs[n] if n in graph_inputs else _value_info(n, types) for n in ins],
            [_value_info(n, types) for n in (*outs_graph, *later)],
            [by_name[n] for n in mine])
        piece_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        piece_model.functions.extend(model.functions)
        out = path.with_name(f".piece{k}-{path.name}")  # beside the graph: its weights' location holds
        onnx.save_model(piece_model, str(out))
        pieces.append(Piece(out, ins, [*outs_graph, *later], outs_graph))


def remove(pieces: list[Piece]) -> None:
    for piece in pieces:
        piece.path.unlink(missing_ok=True)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor: ONNX's shape inference where it knows the op, else its first input's (the
    contrib ops a fused decoder is built of keep their input's float type)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        inferred = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input, *inferred.output)
             if v.type.tensor_type.elem_type}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        for o in node.output:
            if o and o not in types:
                types[o] = next((types[i] for i in node.input if i in types), onnx.TensorProto.FLOAT)
    return types


def _value_info(name: str, types: dict[str, int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)


# -- recording and replaying -----------------------------------------------------


def cache_names(spec) -> list[tuple[str, str, str, str]]:
    """Per layer: (past key, past value, present key, present value) names of a KVCacheSpec."""
    return [(spec.past_key.format(layer=i), spec.past_value.format(layer=i), spec.present_key.format(layer=i),
             spec.present_value.format(layer=i)) for i in range(spec.num_layers)]


class Deferred:
    """Stands in for the decoder in a Pipeline: keeps each call's inputs but the cache's (one list of steps per
    `begin()`), and answers zero logits, which is all a prefill or a teacher-forced run needs of it."""

    def __init__(self, manifest):
        spec = manifest.kv_cache
        self.vocab = manifest.graphs["decoder"].outputs["logits"].shape[-1]
        self.past = {name for names in cache_names(spec) for name in names[:2]}
        self.presents = [name for names in cache_names(spec) for name in names[2:]]
        self.sequences: list[list[dict[str, np.ndarray]]] = []
        if spec.storage == "state":  # the Pipeline's StateCache resets it (the replay holds each piece's state)
            self.reset_state = lambda: None
            self.truncate_state = lambda length: None

    def begin(self) -> None:
        self.sequences.append([])
        self._last: dict[str, tuple] = {}

    def run(self, inputs: dict[str, np.ndarray], into=None) -> dict[str, np.ndarray]:
        step = {}
        for name, value in inputs.items():
            if name in self.past:
                continue
            fed, kept = self._last.get(name, (None, None))
            # an array fed again (a cross-attention decoder's image keys, every step) is kept once
            step[name] = kept if fed is value and np.array_equal(kept, value) else np.array(value, copy=True)
            self._last[name] = (value, step[name])
        self.sequences[-1].append(step)
        batch = inputs["inputs_embeds"].shape[0]
        out = {"logits": np.zeros((batch, 1, self.vocab), np.float32)}
        out.update((name, np.float32(0)) for name in self.presents)  # a "buffer" cache writes them: zeros
        for name in into or {}:
            out.pop(name, None)
        return out


class ByLayers:
    """Stands in for the decoder in a Pipeline that generates: each call runs the pieces in turn, each piece's
    session opened, run and let go, the tensors crossing between pieces kept for the call. Its cache is the
    Pipeline's own (every past is the whole graph's input; presents bound where the Pipeline binds them), so it
    answers each step as the whole graph does with one piece's weights mapped at a time; every weight is read once
    a step, as the whole graph reads them. For the export's generation check of a big float32 decoder ("buffer" and
    "in_place" caches), where a few steps' session openings cost less than mapping the whole graph."""

    def __init__(self, pieces: list[Piece], load: Callable[[Path], object]):
        self.pieces, self.load = pieces, load
        self.calls = 0

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        _through(self.pieces, [[inputs]], self.load,
                 lambda piece: {name: into[name] for name in piece.outputs if into and name in into},
                 lambda graph, bound, run, n_new: graph.run(run, into=bound or None),
                 lambda s, t, made: out.update(made), "decoder by layers", False)
        self.calls += 1
        return out


def replay(pieces: list[Piece], sequences: list[list[dict]], load: Callable[[Path], object], spec,
           take: Callable[[int, int, dict], None], desc: str = "decoder by layers", progress: bool = True) -> None:
    """Run every recorded sequence through the pieces, piece after piece (`load` opens one; it is let go before the
    next opens), each sequence's steps in order over its own cache slots as the package holds them (`spec`);
    `take(sequence, step, outputs)` gets the whole graph's outputs as each piece makes them (its own arrays)."""
    def begin(piece):
        return _PieceCache(spec, set(piece.inputs), set(piece.outputs))

    def step(graph, cache, run, n_new):
        run.update(cache.feeds())
        out = graph.run(run, into=cache.into())
        cache.write(out, n_new)
        return out

    _through(pieces, sequences, load, begin, step, take, desc, progress)


def run_cases(pieces: list[Piece], cases: list[dict], load: Callable[[Path], object], in_place: bool = False,
              desc: str = "check by layers", progress: bool = False) -> list[dict]:
    """The whole graph's outputs for each of `cases` (every input given, the past included), run piece by piece;
    `in_place`: each present bound to a copy of its past, as the runtime binds GroupQueryAttention's cache."""
    results: list[dict] = [{} for _ in cases]

    def step(graph, made, run, n_new):
        into = {}
        if in_place:  # (a past whose present the piece makes: it may read another's shape)
            for name in [n for n in run if n.startswith("past.") and n.replace("past.", "present.", 1) in made]:
                run[name] = into[name.replace("past.", "present.", 1)] = run[name].copy()
        out = graph.run(run, into=into or None)
        out.update(into)
        return out

    _through(pieces, [[case] for case in cases], load, lambda piece: set(piece.outputs), step,
             lambda s, t, out: results[s].update(out), desc, progress)
    return results


def _through(pieces, sequences, load, begin, step, take, desc, progress) -> None:
    """The loop of replay and run_cases: each piece opened in turn, every sequence's steps through it (`begin` its
    state per sequence, `step` one run), the tensors crossing to later pieces kept per step; the piece let go."""
    crossing: list[list[dict]] = [[{} for _ in steps] for steps in sequences]
    for k, piece in enumerate(tqdm(pieces, desc=desc, unit="piece", disable=not progress)):
        later = {n for p in pieces[k + 1:] for n in p.inputs}
        graph = load(piece.path)
        for s, steps in enumerate(sequences):
            state = begin(piece)
            for t, feeds in enumerate(steps):
                have = crossing[s][t]
                run = {n: have[n] if n in have else feeds[n] for n in piece.inputs if n in have or n in feeds}
                out = step(graph, state, run, feeds["inputs_embeds"].shape[1])
                for name in [n for n in have if n not in later]:
                    del have[name]
                have.update((name, out[name]) for name in piece.outputs if name in out and name in later)
                made = {n: (np.array(out[n], copy=True) if n in have else out[n])
                        for n in piece.graph_outputs if n in out}
                if made:
                    take(s, t, made)
            del state
        del graph
        release_freed_memory()


class _PieceCache:
    """One sequence's cache for the layers one piece makes presents of, held as the package holds it: "buffer"
    (max_context buffers, the new slots written by position), "in_place" (those buffers bound as the presents),
    "state" (the graph takes the past and returns past + new: kept here, as OpenVINO keeps its state). A past the
    piece reads only for its shape (a traced graph's sequence length, at its top) is fed zeros of that shape."""

    def __init__(self, spec, inputs: set[str], outputs: set[str]):
        self.spec, self.length, self.dtype = spec, 0, np.dtype(spec.dtype)
        self.own = [names for names in cache_names(spec) if {names[2], names[3]} & outputs]
        owned = {name for names in self.own for name in names[:2]}
        self.foreign = [name for names in cache_names(spec) for name in names[:2]
                        if name in inputs and name not in owned]
        full = (1, spec.num_kv_heads, spec.max_context, spec.head_dim)
        self.past = {name: self._empty() if spec.storage == "state" else np.zeros(full, self.dtype) for name in owned}
        self.blank = np.zeros(full, self.dtype) if self.foreign and spec.storage != "state" else None

    def _empty(self) -> np.ndarray:
        return np.zeros((1, self.spec.num_kv_heads, self.length, self.spec.head_dim), self.dtype)

    def feeds(self) -> dict[str, np.ndarray]:
        feeds = dict(self.past)
        feeds.update((name, self._empty() if self.blank is None else self.blank) for name in self.foreign)
        return feeds

    def into(self) -> dict[str, np.ndarray] | None:
        if self.spec.storage != "in_place":
            return None
        return {present: self.past[past] for pk, pv, rk, rv in self.own for past, present in ((pk, rk), (pv, rv))}

    def write(self, out: dict[str, np.ndarray], n_new: int) -> None:
        start, self.length = self.length, self.length + n_new
        for pk, pv, rk, rv in self.own:
            for past, present in ((pk, rk), (pv, rv)):
                if self.spec.storage == "buffer":
                    self.past[past][:, :, start:self.length] = out[present]
                elif self.spec.storage == "state":
                    self.past[past] = out[present]  # past + new
