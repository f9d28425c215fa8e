"""The onnxruntime target's encoders: each unmasked attention as one MultiHeadAttention (flash attention on CPU),
computing what the traced nodes computed; anything else left as traced."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SHAPES, each_shape
from mmedge.exporters import encoder_attention

TOKENS, HEADS, SIZE = 48, 4, 16
WIDTH = HEADS * SIZE


def attention_graph(mask: bool = False, leak: bool = False, keys_order=(0, 2, 3, 1), divide: bool = False):
    """One eager attention as torch's exporter writes it: q/k/v projections, heads split and transposed,
    queries x keys, scaled, (masked,) softmax, x values, heads merged, an output projection."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 8, f"w{p}")
             for p in "qkvo"]
    inits += [numpy_helper.from_array(np.array([-1, TOKENS, HEADS, SIZE], np.int64), "heads"),
              numpy_helper.from_array(np.array([-1, TOKENS, WIDTH], np.int64), "merged"),
              numpy_helper.from_array(np.array(SIZE ** 0.5 if divide else SIZE ** -0.5, np.float32), "scale"),
              numpy_helper.from_array(np.triu(np.full((TOKENS, TOKENS), -1e4, np.float32), 1), "mask")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"]
    nodes += [n("Reshape", [p, "heads"], [f"{p}4"]) for p in "qkv"]
    nodes += [n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]), n("Transpose", ["k4"], ["kt"], perm=list(keys_order)),
              n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]), n("MatMul", ["qh", "kt"], ["s"]),
              n("Div" if divide else "Mul", ["s", "scale"], ["ss"])]
    nodes += [n("Add", ["ss", "mask"], ["sm"]), n("Softmax", ["sm"], ["p"], axis=-1)] if mask else \
        [n("Softmax", ["ss"], ["p"], axis=-1)]
    nodes += [n("MatMul", ["p", "vh"], ["o"]), n("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              n("Reshape", ["ot", "merged"], ["om"]), n("MatMul", ["om", "wo"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])]
    if leak:  # the probabilities are read elsewhere too: they must stay
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["batch", TOKENS, WIDTH])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("divide", [False, True])
def test_an_unmasked_attention_becomes_one_node_computing_the_same(divide):
    traced = attention_graph(divide=divide)
    fused = onnx.ModelProto()
    fused.CopyFrom(traced)
    assert encoder_attention.fuse(fused) == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and not {"Softmax", "Transpose", "Reshape"} & set(ops), ops
    assert len(fused.graph.node) == 5  # q, k, v, the attention, the output projection
    assert not {"heads", "merged", "scale"} & {i.name for i in fused.graph.initializer}  # read by nothing now
    x = np.random.default_rng(1).standard_normal((3, TOKENS, WIDTH)).astype(np.float32)
    ref, got = run(traced, x), run(fused, x)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()


@pytest.mark.parametrize("case", ["mask", "leak", "keys"])
def test_an_attention_the_node_cannot_compute_is_left_as_traced(case):
    model = attention_graph(mask=case == "mask", leak=case == "leak",
                            keys_order=(0, 2, 1, 3) if case == "keys" else (0, 2, 3, 1))
    before = [n.op_type for n in model.graph.node]
    assert encoder_attention.fuse(model) == 0
    assert [n.op_type for n in model.graph.node] == before


@pytest.mark.parametrize("shape", each_shape())
def test_onnxruntime_encoders_run_their_unmasked_attention_fused_and_still_match_pytorch(shape, packages):
    """Every tiny family's onnxruntime package: where its vision encoder's attention is unmasked eager attention
    (SigLIP, CLIP, ...), every layer's is one MultiHeadAttention; what was fused or not, the export's check
    against PyTorch passed on the graph as shipped."""
    package = packages(shape, "onnxruntime")
    manifest = json.loads((package / "mmedge.json").read_text())
    for part, graph in manifest["graphs"].items():
        if part == "decoder" or not graph["file"].endswith(".onnx"):
            continue
        ops = [n.op_type for n in onnx.load(str(package / graph["file"]), load_external_data=False).graph.node]
        fused = ops.count("MultiHeadAttention")
        checked = manifest["verification"]["graphs"][part]
        assert checked["passed"] is True, (part, checked)
        if part == "vision_encoder" and SHAPES[shape].family in UNMASKED_VISION:
            assert fused > 0 and "Softmax" not in ops, (shape, part, fused, ops.count("Softmax"))


# families whose vision encoders attend without a mask or rotary positions (SigLIP, CLIP, InternViT); the others
# (BLIP-2 and Qwen-VL: rotary or packed heads; Florence-2: windows; Llama 3.2 Vision: masked tiles) keep theirs
UNMASKED_VISION = {"paligemma", "llava", "idefics", "idefics3", "gemma3", "internvl"}
