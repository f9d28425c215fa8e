"""What TensorRT's ONNX parser accepts: ops and the types it takes them in, and a check over a graph.

The table is onnx-tensorrt's docs/operators.md (TABLE_VERSION); an op or a
type outside it fails `trt.OnnxParser` on the device, minutes into a build,
so export checks every graph against it first (tensorrt_target.finalize) and
a test asserts the exported graphs pass.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto


TABLE_VERSION = "10.3"
F, H, B = "FP32", "FP16", "BF16"

# onnx-tensorrt docs/operators.md as of TensorRT 10.15 (opsets 9-24), less the ops added after 10.3 (Attention,
# RMSNormalization, RotaryEmbedding, TensorScatter, the window functions, STFT): the types each op takes.
_TABLE = {
    ('FP32', 'FP16', 'BF16'): (
        "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose "
        "Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor GRU Gemm GlobalAveragePool GlobalLpPool "
        "GlobalMaxPool GroupNormalization HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization "
        "IsInf LRN LSTM LayerNormalization LeakyRelu Log LogSoftmax LpNormalization LpPool MatMul MaxPool "
        "MeanVarianceNormalization PRelu ParametricSoftplus QuantizeLinear RNN RandomNormal RandomNormalLike "
        "RandomUniform RandomUniformLike Reciprocal Resize Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
        "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"
    ),
    ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'): (
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min "
        "Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean "
        "ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign "
        "SpaceToDepth Sub Sum TopK"
    ),
    ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'): (
        "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape "
        "ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"
    ),
    ('FP32', 'FP16'): (
        "DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign"
    ),
    ('BOOL',): (
        "And Not Or Xor"
    ),
    ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'UINT8', 'BOOL'): (
        "Cast CastLike"
    ),
    ('FP32', 'FP16', 'BF16', 'FP8', 'FP4', 'INT4', 'INT32', 'INT64', 'BOOL'): (
        "Constant ConstantOfShape"
    ),
    ('INT8', 'FP8', 'FP4', 'INT4'): (
        "DequantizeLinear"
    ),
    ('FP32', 'FP16', 'BF16', 'INT8', 'INT32', 'INT64'): (
        "Gelu"
    ),
    ('FP32', 'FP16', 'BF16', 'FP8', 'INT32', 'INT64'): (
        "Mean"
    ),
}

SUPPORTED: dict[str, set[str]] = {op: set(types) for types, ops in _TABLE.items() for op in ops.split()}
# Q/DQ: the table gives the type of the data input; the other side is a float type
QDQ_FLOAT = {F, H, B}
# comparisons: the table gives the inputs' types; the output is BOOL by definition
COMPARISONS = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "IsNaN", "IsInf"}

_ONNX_TYPES = {
    TensorProto.FLOAT: F, TensorProto.FLOAT16: H, TensorProto.BFLOAT16: B, TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.INT4: "INT4", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE", TensorProto.UINT4: "UINT4",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT16: "INT16", TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32", TensorProto.UINT64: "UINT64", TensorProto.STRING: "STRING",
}


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's ONNX element type, inferred afresh (converters leave stale types in value_info)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def unsupported(model: onnx.ModelProto) -> list[str]:
    """Each op (with the node that uses it) or op-and-type in `model` that the parser does not accept."""
    types = tensor_types(model)
    found: dict[str, str] = {}
    for node in model.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        allowed = SUPPORTED.get(op)
        if allowed is None:
            found.setdefault(op, f"{op} (node {node.name})")
            continue
        checked = [(name, allowed) for name in [*node.input, *([] if op in COMPARISONS else node.output)]]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):  # data input, then scale, zero point, output
            checked = [(node.input[0], allowed), (node.input[1], QDQ_FLOAT)]
        for name, allowed in checked:
            kind = _ONNX_TYPES.get(types.get(name, 0))
            if name and kind and kind not in allowed:
                found.setdefault(f"{op}/{kind}", f"{op} on {kind} (node {node.name}, tensor {name})")
    return sorted(found.values())
