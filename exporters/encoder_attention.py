"""An encoder's attention as one ONNX Runtime `MultiHeadAttention` node, for the onnxruntime target.

A traced vision (or text, or audio) encoder computes each layer's attention as PyTorch's eager code does: the
projections reshaped to heads and transposed, queries x keys, a scale, a softmax, x values, transposed and
reshaped back; 11 nodes, and a [heads, tokens, tokens] matrix of scores and one of probabilities written to
memory and read back (48 MB each a layer for SigLIP over 1,024 patches). ONNX Runtime's CPU `MultiHeadAttention`
(com.microsoft) without a mask, bias or cache runs MLAS's flash attention instead: blocks of queries against
blocks of keys with an online softmax, the scores never leaving the cache. `smolvlm-256m-shaped`'s INT8 vision
encoder: 654 -> 589 ms (median of 8, 2 threads; docs/performance.md), outputs within 6e-7 relative L2 in fp32.

Only the exact unmasked pattern is rewritten: an attention with a mask or bias added to its scores, rotary
positions applied after the heads are split, grouped heads or any intermediate read elsewhere keeps its nodes.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

DOMAIN = "com.microsoft"
HEADS_FIRST = [0, 2, 1, 3]  # [batch, tokens, heads, dim] <-> [batch, heads, tokens, dim]
KEYS_TRANSPOSED = [0, 2, 3, 1]  # [batch, tokens, heads, dim] -> [batch, heads, dim, tokens]


def fuse(model: onnx.ModelProto) -> int:
    """Rewrite `model`'s unmasked multi-head attentions in place; returns how many."""
    g = model.graph
    consts = {i.name: i for i in g.initializer}
    consts.update({n.output[0]: a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                   if a.name == "value"})
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    dims = _dims(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    default_axis = -1 if opset >= 13 else 1  # Softmax's axis when the node names none

    def const(name: str):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    def made_by(name: str, op: str):
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    def read_once(node) -> bool:  # its output feeds one node and is no graph output
        return len(readers.get(node.output[0], [])) == 1 and node.output[0] not in outputs

    def perm(node) -> list[int]:
        return [int(p) for a in node.attribute if a.name == "perm" for p in a.ints]

    def split(name: str, order: list[int]):
        """(x, heads, head size, its Reshape and Transpose) where `name` = Transpose(order) of Reshape(x, [., ., heads,
        size]), x [batch, tokens, heads * size] split that way only, each read by the next alone."""
        transpose = made_by(name, "Transpose")
        reshape = made_by(transpose.input[0], "Reshape") if transpose is not None and perm(transpose) == order else None
        shape = const(reshape.input[1]) if reshape is not None and len(reshape.input) > 1 else None
        if shape is None or shape.shape != (4,) or min(shape[2], shape[3]) <= 0 \
                or not read_once(transpose) or not read_once(reshape):
            return None
        heads, size = int(shape[2]), int(shape[3])
        if not _splits(dims.get(reshape.input[0]), [int(s) for s in shape[:2]], heads * size):
            return None
        return reshape.input[0], heads, size, (reshape, transpose)

    def scaled(name: str):
        """(the scores MatMul, scale, the Mul/Div) where `name` = MatMul(...) times or over a constant scalar
        (scale 1, no node, where it is the MatMul itself)."""
        node = producer.get(name)
        if node is None or node.op_type not in ("Mul", "Div") or not read_once(node):
            return (node, 1.0, None) if node is not None and node.op_type == "MatMul" else (None, 0.0, None)
        factors = [const(i) for i in node.input]
        side = 1 if factors[1] is not None and factors[1].size == 1 else \
            0 if node.op_type == "Mul" and factors[0] is not None and factors[0].size == 1 else None
        value = float(factors[side].reshape(())) if side is not None else 0.0
        if value == 0.0:
            return None, 0.0, None
        return made_by(node.input[1 - side], "MatMul"), value if node.op_type == "Mul" else 1.0 / value, node

    # nodes by their first output's name (unique in a graph; protobuf's message wrappers are no stable identity)
    fused: dict[str, onnx.NodeProto] = {}  # the final Reshape's -> the node taking its place
    dropped: list[onnx.NodeProto] = []
    for softmax in [n for n in g.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), default_axis)
        if axis not in (-1, 3) or not read_once(softmax):
            continue
        scores, scale, scaling = scaled(softmax.input[0])
        if scores is None or not read_once(scores):
            continue
        q, k = split(scores.input[0], HEADS_FIRST), split(scores.input[1], KEYS_TRANSPOSED)
        mix = readers[softmax.output[0]][0]
        v = split(mix.input[1], HEADS_FIRST) if mix.op_type == "MatMul" and mix.input[0] == softmax.output[0] else None
        if q is None or k is None or v is None or q[1:3] != k[1:3] or v[1] != q[1] or not read_once(mix):
            continue
        back = readers[mix.output[0]][0]
        merge = readers[back.output[0]][0] if back.op_type == "Transpose" and perm(back) == HEADS_FIRST \
            and read_once(back) else None
        shape = const(merge.input[1]) if merge is not None and merge.op_type == "Reshape" else None
        if shape is None or shape.shape != (3,) or int(shape[2]) != q[1] * v[2] \
                or not _splits(dims.get(q[0]), [int(s) for s in shape[:2]], None):
            continue
        fused[merge.output[0]] = helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [merge.output[0]],
                                            name=f"{softmax.name or merge.output[0]}/MultiHeadAttention",
                                            domain=DOMAIN, num_heads=q[1], scale=scale)
        dropped += [scores, softmax, mix, back, merge, *q[3], *k[3], *v[3]] + ([scaling] if scaling else [])
    if not fused:
        return 0
    gone = {n.output[0] for n in dropped}
    nodes = [fused.get(n.output[0], n) for n in g.node if n.output[0] in fused or n.output[0] not in gone]
    del g.node[:]
    g.node.extend(nodes)
    # the constants only the rewritten nodes read (reshape targets, scales) go with them
    used = {i for n in g.node for i in n.input} | {i.name for i in g.input}
    unread = {i for n in dropped for i in n.input} - used
    kept = [i for i in g.initializer if i.name not in unread]
    del g.initializer[:]
    g.initializer.extend(kept)
    constants = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] in unread)]
    del g.node[:]
    g.node.extend(constants)
    made = {o for n in g.node for o in n.output}
    shapes = [v for v in g.value_info if v.name in made]
    del g.value_info[:]
    g.value_info.extend(shapes)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(fused)


def _splits(shape, leading: list[int], width: int | None) -> bool:
    """Whether Reshape(x of `shape`, leading + [...]) keeps x's batch and token axes as the first two: x is
    [batch, tokens, width] (width None: any), and of `leading` one is -1 and the other that axis's own size, or both
    are the sizes."""
    if shape is None or len(shape) != 3 or (width is not None and shape[2] != width):
        return False
    first, second = leading
    if first == -1:
        return isinstance(shape[1], int) and second == shape[1]
    if second == -1:
        return isinstance(shape[0], int) and first == shape[0]
    return [first, second] == shape[:2] and all(isinstance(s, int) for s in shape[:2])


def _dims(model: onnx.ModelProto) -> dict[str, list]:
    """Each value's dims as the graph records them (an int, a name, or None where unknown), shapes inferred where
    the trace left them out."""
    def read(values) -> dict[str, list]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            if t.HasField("shape"):
                out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        return out

    g = model.graph
    dims = read(list(g.input) + list(g.value_info) + list(g.output))
    if any(i not in dims for n in g.node if n.op_type == "Reshape" for i in n.input[:1]):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            dims.update({k: v for k, v in read(inferred.graph.value_info).items() if k not in dims})
        except Exception:  # inference is a help only: what it cannot tell is left unfused
            pass
    return dims
