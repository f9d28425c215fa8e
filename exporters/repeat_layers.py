"""A deep decoder traced through its first few layers, the rest of its layers repeated in the graph.

torch.export captures and decomposes every layer of a decoder anew: ~2.5 s of one core per layer at
Qwen2.5-VL-3B's width (36 layers: ~90 of the ~130 s its traced decoder takes to export), though every layer
after the first is the same computation over its own weights and cache. When a decoder's layers are alike
(`plan`: the same module classes and settings but the layer's own index, the same weight shapes; a
self-attention text model, no per-layer inputs besides its cache), only its first TRACED layers are traced
(the first can compute what the others share: shapes, masks) and the last traced layer's nodes are repeated
for each further layer (`expand`), each copy reading its own weights (bound from the checkpoint as every
traced weight is), its own past and writing its own present, and the residual stream the copy before it
made. The graph is then what the whole trace gives, node for node up to names, and the export verifies it
against PyTorch like any other graph.

Where anything does not line up (layers that differ, a layer reading a value made after the previous one
outside it, a node with a subgraph), `expand` says why and the decoder is traced whole.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

TRACED = 3  # layers traced: the first may compute what later layers share; the second and third must line up
MIN_LAYERS = 8  # fewer layers trace in seconds: traced whole
_SCOPES = "pkg.torch.onnx.name_scopes"


class NotRepeatable(Exception):
    """The traced layers do not line up; the reason is the message."""


@dataclass
class Plan:
    layers: torch.nn.ModuleList
    owner: torch.nn.Module  # the module whose `layers` the list is
    scope: str  # the list's name within the traced module, as torch.onnx's name scopes give it
    count: int


def plan(job) -> Plan | None:
    """How `job`'s decoder is traced a few layers at a time, or None where it is traced whole: not a
    self-attention decoder over per-layer caches, fewer than MIN_LAYERS layers, or layers that differ."""
    module = job.module
    text = getattr(module, "text_model", None)
    layers = getattr(text, "layers", None)
    if (job.name != "decoder" or job.kv_storage not in ("buffer", "state") or not isinstance(layers, torch.nn.ModuleList)
            or getattr(module, "n_extra", 1) or getattr(module, "n_cross", 1) or getattr(module, "cross_layers", (1,))):
        return None
    count = len(layers)
    pasts = [n for n in job.input_names if n.startswith("past.")]
    if count < MIN_LAYERS or len(pasts) != 2 * count:
        return None
    first = _signature(layers[1])
    if any(_signature(layer) != first for layer in list(layers)[2:]):
        return None
    return Plan(layers, text, "text_model.layers", count)


def _signature(layer: torch.nn.Module) -> list:
    """What a layer's traced graph depends on, but its weights' values and its own index."""
    sig = []
    for name, sub in layer.named_modules(remove_duplicate=False):
        settings = sorted((k, repr(v)) for k, v in vars(sub).items()
                          if k != "layer_idx" and isinstance(v, (str, int, float, bool, type(None), tuple, list)))
        sig.append((name, type(sub), settings))
    sig += [(n, tuple(t.shape), t.dtype) for n, t in layer.named_parameters(remove_duplicate=False)]
    sig += [(n, tuple(t.shape), t.dtype, t.detach().cpu().numpy().tobytes() if t.device.type != "meta" else None)
            for n, t in layer.named_buffers()]
    return sig


def truncated(job, p: Plan):
    """(trace inputs, input names, output names) of `job` with its first TRACED layers' caches only."""
    cut_in = len(job.input_names) - 2 * p.count + 2 * TRACED
    cut_out = len(job.output_names) - 2 * p.count + 2 * TRACED
    return tuple(job.trace_inputs[:cut_in]), job.input_names[:cut_in], job.output_names[:cut_out]


@contextlib.contextmanager
def first_layers(p: Plan):
    """The decoder holding its first TRACED layers only, for the trace."""
    p.owner.layers = torch.nn.ModuleList(list(p.layers)[:TRACED])
    try:
        yield
    finally:
        p.owner.layers = p.layers


def _layer(node, pattern: re.Pattern) -> int | None:
    """The index of the layer whose module made `node` (torch.onnx's name scopes), None outside the layers."""
    text = node.metadata_props.get(_SCOPES)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    for s in scopes:
        m = pattern.match(s)
        if m:
            return int(m.group(1))
    return None


def _same_node(a, b) -> bool:
    if (a.domain, a.op_type, a.overload, len(a.inputs), len(a.outputs)) != \
            (b.domain, b.op_type, b.overload, len(b.inputs), len(b.outputs)):
        return False
    return {k: repr(v.value) for k, v in a.attributes.items()} == {k: repr(v.value) for k, v in b.attributes.items()}


def expand(graph, p: Plan, input_names: list[str], output_names: list[str]) -> int:
    """Repeat the last traced layer's nodes in `graph` (an onnx_ir graph traced under first_layers) for every
    further layer; the graph's inputs and outputs are then `input_names` and `output_names`, in that order.
    Returns the nodes added; raises NotRepeatable (the graph untouched) where the layers do not line up."""
    import onnx_ir as ir

    nodes = list(graph)
    scope = re.compile(re.escape(p.scope) + r"\.(\d+)$")
    layer_of = {id(n): _layer(n, scope) for n in nodes}
    by_layer = {i: [n for n in nodes if layer_of[id(n)] == i] for i in range(TRACED)}
    prev, last = by_layer[TRACED - 2], by_layer[TRACED - 1]
    if not last or len(prev) != len(last) or not all(_same_node(a, b) for a, b in zip(prev, last)):
        raise NotRepeatable(f"layers {TRACED - 2} and {TRACED - 1} traced to different nodes")
    if any(a.type == ir.AttributeType.GRAPH or a.type == ir.AttributeType.GRAPHS
           for n in last for a in n.attributes.values()):
        raise NotRepeatable("a layer node holds a subgraph")
    # layer TRACED-2's values -> the same values of layer TRACED-1
    along = {id(a): b for x, y in zip(prev, last) for a, b in zip(x.outputs, y.outputs)}
    mine = {id(n) for n in last}
    index = {id(n): k for k, n in enumerate(nodes)}
    weight = re.compile(re.escape(p.scope) + rf"\.{TRACED - 1}\.(.+)$")
    any_weight = re.compile(re.escape(p.scope) + r"\.\d+\.")

    def weight_of(v) -> bool:
        return bool(any_weight.match(v.name))
    cache = re.compile(rf"^(past|present)\.{TRACED - 1}\.(key|value)$")
    # values of a particular layer: made in one from its weights, its cache or such values (not a Constant, nor a
    # shape of the graph's inputs, which the exporter makes once where first used and every layer shares)
    particular: set[int] = set()
    for n in nodes:
        own = layer_of[id(n)] is not None and any(
            v is not None and (v.is_initializer() and weight_of(v) or v.is_graph_input() and cache.match(v.name))
            for v in n.inputs)
        if own or any(v is not None and id(v) in particular for v in n.inputs):
            particular.update(id(v) for v in n.outputs)
    for n in last:
        for v in n.inputs:
            if v is None or id(v) not in particular or id(v.producer()) in mine:
                continue
            if layer_of[id(v.producer())] != TRACED - 2:
                raise NotRepeatable(f"layer {TRACED - 1} reads {v.name}, made by neither it nor the layer before")
    end = index[id(last[-1])]
    outside_after = {id(n): n for n in nodes if layer_of[id(n)] is None and index[id(n)] > end}
    for n in nodes:
        if layer_of[id(n)] is not None:
            continue
        for v in n.inputs:
            made_in = layer_of[id(v.producer())] if v is not None and v.producer() is not None else None
            if made_in is None or id(v) not in particular:
                continue
            if made_in != TRACED - 1 or id(n) not in outside_after:
                raise NotRepeatable(f"{v.name} of layer {made_in} is read outside the layers, not after the last")

    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    added, at = 0, last[-1]
    carried = {id(b): b for b in along.values()}  # the layer before's values, for the copy being made
    for i in range(TRACED, p.count):
        made: dict[int, object] = {}  # template value -> this copy's
        own = {**dict(p.layers[i].named_parameters(remove_duplicate=False)), **dict(p.layers[i].named_buffers())}
        copies = []
        for n in last:
            args = []
            for v in n.inputs:
                if v is None:
                    args.append(None)
                elif v.producer() is not None and id(v.producer()) in mine:
                    args.append(made[id(v)])
                elif v.producer() is not None and layer_of[id(v.producer())] == TRACED - 2:
                    args.append(carried[id(along[id(v)])])
                elif v.is_graph_input() and cache.match(v.name):
                    name = cache.sub(lambda m: f"{m.group(1)}.{i}.{m.group(2)}", v.name)
                    if name not in inputs:
                        inputs[name] = ir.Value(name=name, type=v.type, shape=v.shape)
                    args.append(inputs[name])
                elif v.is_initializer() and weight.match(v.name):
                    name = f"{p.scope}.{i}.{weight.match(v.name).group(1)}"
                    if name not in graph.initializers:  # this layer's tensor, as the exporter wraps the traced ones
                        tensor = type(v.const_value)(own[weight.match(v.name).group(1)], name=name)
                        graph.register_initializer(ir.Value(name=name, type=v.type, shape=v.shape, const_value=tensor))
                    args.append(graph.initializers[name])
                else:
                    args.append(v)  # shared: graph inputs, constants, what the first layer computes for all
            attrs = [ir.Attr(a.name, a.type, a.value) for a in n.attributes.values()]
            copy = ir.Node(n.domain, n.op_type, args, attrs, overload=n.overload, num_outputs=len(n.outputs),
                           version=n.version, name=f"{n.name}.layer{i}")
            for new, old in zip(copy.outputs, n.outputs):
                new.name = (cache.sub(lambda m: f"{m.group(1)}.{i}.{m.group(2)}", old.name) if cache.match(old.name)
                            else f"{old.name}.layer{i}")
                new.type, new.shape = old.type, old.shape
                made[id(old)] = new
            copies.append(copy)
        graph.insert_after(at, copies)
        at, added = copies[-1], added + len(copies)
        carried = {id(b): made[id(b)] for b in along.values()}
        for old, new in ((o, made[id(o)]) for n in last for o in n.outputs):
            if cache.match(old.name):
                outputs[new.name] = new
    # what reads the last traced layer after the layers reads the last copy
    for n in outside_after.values():
        for k, v in enumerate(n.inputs):
            if v is not None and v.producer() is not None and id(v.producer()) in mine:
                n.replace_input_with(k, carried[id(v)])
    missing = [n for n in input_names if n not in inputs] + [n for n in output_names if n not in outputs]
    if missing:
        raise RuntimeError(f"repeating layers left {missing[:3]} unmade")
    graph.inputs[:] = [inputs[n] for n in input_names]
    graph.outputs[:] = [outputs[n] for n in output_names]
    return added
