"""How the openvino target shapes its graphs for OpenVINO's CPU plugin (exporters/openvino_target.py). Token-exact
parity of the packages made this way is tests/test_parity.py's."""

from __future__ import annotations

import numpy as np
import pytest

DEMO = "shapes-paligemma"  # the shipped demo model

ov = pytest.importorskip("openvino")


def _constant_matmuls_by_input(model) -> dict:
    shared = {}
    for node in model.get_ordered_ops():
        weight = node.input_value(1).get_node() if node.get_type_name() == "MatMul" else None
        if weight is not None and weight.get_type_name() in ("Constant", "Convert", "Multiply", "Reshape"):
            source = node.input_value(0)
            shared.setdefault((source.get_node().get_instance_id(), source.get_index()), []).append(node)
    return shared


def test_projections_of_one_input_become_one_matmul_with_the_same_outputs():
    import openvino.opset13 as ops

    from mmedge.exporters.openvino_target import fuse_projections

    rng = np.random.default_rng(0)
    x = ops.parameter([1, -1, 8], np.float32, name="x")
    normed = ops.multiply(x, ops.constant(np.float32(2)))
    q = ops.matmul(normed, ops.constant(rng.normal(size=(8, 8)).astype(np.float32)), False, False)  # [in, out]
    k = ops.matmul(normed, ops.constant(rng.normal(size=(8, 4)).astype(np.float32)), False, False)
    gate = ops.matmul(x, ops.constant(rng.normal(size=(6, 8)).astype(np.float32)), False, True)  # [out, in]
    up = ops.matmul(x, ops.constant(rng.normal(size=(6, 8)).astype(np.float32)), False, True)
    alone = ops.matmul(x, ops.constant(rng.normal(size=(8, 3)).astype(np.float32)), False, False)  # other layout
    scores = ops.matmul(q, q, False, True)  # activation x activation: not a projection
    model = ov.Model([ops.concat([q, k, ops.multiply(gate, up), alone], -1), scores], [x])
    feed = rng.normal(size=(1, 5, 8)).astype(np.float32)
    before = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: feed})
    fused = fuse_projections(model)
    types = [op.get_type_name() for op in fused.get_ordered_ops()]
    assert types.count("MatMul") == 4 and types.count("VariadicSplit") == 2  # q|k, gate|up, alone, scores
    after = ov.Core().compile_model(fused, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: feed})
    for i in range(2):
        np.testing.assert_allclose(after[i], before[i], rtol=1e-6, atol=1e-6)


def test_compressed_projections_of_one_input_are_joined_integers_and_scales_side_by_side(tmp_path):
    """Weights converted from ONNX DequantizeLinear (INT4 blocks along the input axis, INT8 per output channel: a big
    decoder's, calibration/openvino.py) are joined too: one MatMul over the joined integers and scales, still
    compressed, the same outputs."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmedge.exporters.openvino_target import fuse_projections

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def weight(name, k, n, four):
        w = rng.integers(-7 if four else -127, 8 if four else 128, (k, n))
        q = numpy_helper.from_array(w.astype(ml_dtypes.int4 if four else np.int8), name + "_q")
        scale = rng.uniform(0.01, 0.1, (k // 16, n) if four else (n,)).astype(np.float32)
        inits.extend([q, numpy_helper.from_array(scale, name + "_s")])
        attrs = dict(axis=0, block_size=16) if four else dict(axis=1)
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s"], [name], **attrs))
        return name

    outputs = []
    for x, specs in (("x", [("q", 64, True), ("k", 32, True), ("v", 32, True)]),
                     ("y", [("gate", 48, False), ("up", 48, False)])):
        for name, n, four in specs:
            nodes.append(helper.make_node("MatMul", [x, weight(name + "_w", 64, n, four)], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "s", 64])
                                           for x in "xy"], outputs, inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
                    str(tmp_path / "g.onnx"))
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    feed = {"x": rng.normal(size=(1, 5, 64)).astype(np.float32), "y": rng.normal(size=(1, 5, 64)).astype(np.float32)}
    before = ov.Core().compile_model(ov.convert_model(str(tmp_path / "g.onnx")), "CPU", config)(feed)
    fused = fuse_projections(ov.convert_model(str(tmp_path / "g.onnx")))
    types = [op.get_type_name() for op in fused.get_ordered_ops()]
    assert types.count("MatMul") == 2 and types.count("VariadicSplit") == 2
    kinds = sorted(op.get_element_type().get_type_name() for op in fused.get_ordered_ops()
                   if op.get_type_name() == "Constant" and op.get_element_type() in (ov.Type.i4, ov.Type.i8))
    assert kinds == ["i4", "i8"]  # one joined weight each, still compressed
    after = ov.Core().compile_model(fused, "CPU", config)(feed)
    for i in range(5):
        np.testing.assert_allclose(after[i], before[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_the_demo_decoders_projections_are_fused_at_every_precision(demo_packages, quant):
    """No two weight MatMuls of the shipped demo's openvino decoder read the same input, fp32 or INT4-compressed
    (NNCF compresses the joined weights: the compressed weights feed the one MatMul)."""
    package, _ = demo_packages(DEMO, "openvino", quant)
    model = ov.Core().read_model(str(package / "decoder.xml"))
    shared = {k: len(v) for k, v in _constant_matmuls_by_input(model).items() if len(v) > 1}
    assert not shared, shared
    assert sum(op.get_type_name() == "VariadicSplit" for op in model.get_ordered_ops()) >= 2


_STATISTICS_RUN = r"""
import hashlib, sys
import numpy as np, nncf, openvino as ov, openvino.opset13 as ops, psutil
from nncf.openvino import engine
from mmedge.calibration.openvino import _statistics_run_as_they_come

rng = np.random.default_rng(0)
x = ops.parameter([-1, 512], np.float32, name="x")
h = x
for _ in range(32):  # a chain of 32 projections: 8 MB activations at 4,096 rows
    h = ops.relu(ops.matmul(h, ops.constant(rng.normal(0, 0.05, (512, 512)).astype(np.float32)), False, False))
model = ov.Model([ops.result(h)], [x], "chain")
held = []
run = engine.OVCompiledModelEngine.infer
def infer(self, feed):
    before = psutil.Process().memory_info().rss
    out = run(self, feed)
    held.append(psutil.Process().memory_info().rss - before)  # what the run kept (its buffers stay allocated)
    return out
engine.OVCompiledModelEngine.infer = infer
feeds = [{"x": rng.normal(size=(4096, 512)).astype(np.float32)}]
if sys.argv[1] == "reordered":
    with _statistics_run_as_they_come(model):
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=1, model_type=nncf.ModelType.TRANSFORMER)
else:
    quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=1, model_type=nncf.ModelType.TRANSFORMER)
ov.save_model(quantized, sys.argv[2], compress_to_fp16=False)
print(max(held), hashlib.sha256(open(sys.argv[2].replace(".xml", ".bin"), "rb").read()).hexdigest())
"""


def test_nncf_statistics_run_each_reduction_as_its_tensor_is_made_with_the_same_result(tmp_path):
    """calibration/openvino._statistics_run_as_they_come: NNCF's statistics graphs listed with their reductions
    first, so OpenVINO's CPU plugin runs each as soon as the tensor it measures is made instead of holding every
    measured tensor until the graph's end (a 32-projection chain of 8 MB activations: 307 MB kept by the runs as
    NNCF builds them, 68 MB reordered, on 2026-12-06); the quantized graph the same byte for byte. Each run its own process: what a
    run keeps is its RSS."""
    import subprocess
    import sys

    got = {}
    for way in ("as_built", "reordered"):
        done = subprocess.run([sys.executable, "-c", _STATISTICS_RUN, way, str(tmp_path / f"{way}.xml")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        held, digest = done.stdout.split()[-2:]
        got[way] = int(held), digest
    assert got["as_built"][1] == got["reordered"][1]  # the same quantized weights and ranges
    assert got["as_built"][0] > 100 * 2**20, got  # the measured tensors held (what the reordering is for)
    assert got["reordered"][0] < got["as_built"][0] / 3, got


def test_a_static_int8_graph_quantized_as_onnx_is_converted_and_checked(tmp_path, monkeypatch):
    """A big vision encoder's path (calibration/openvino._quantize_onnx_static): the ONNX quantizer's static INT8
    converted to IR runs in INT8 on OpenVINO's CPU plugin and lands about as near float32 as the QDQ graph does; a
    conversion that negates the weight scales is refused."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmedge.calibration import openvino as ov_quant
    from mmedge.calibration.package import QuantOptions, Recorded
    from mmedge.errors import ExportError

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate([(64, 128), (128, 128), (128, 32)]):
        inits.append(numpy_helper.from_array((rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 32])], inits)
    src = tmp_path / "vision_encoder.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    feeds = Recorded({"x": rng.normal(size=(40, 64)).astype(np.float32)} for _ in range(8))

    report = ov_quant._quantize_onnx_static("vision_encoder", src, tmp_path / "vision_encoder.xml", QuantOptions(),
                                            feeds)
    check = report["conversion_check"]
    assert check["passed"] and 0 < check["rel_l2_err"] < 0.05, check
    compiled = ov.Core().compile_model(str(tmp_path / "vision_encoder.xml"), "CPU")
    kernels = {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"}
    assert kernels & {"i8", "u8"}, kernels
    assert not list(tmp_path.glob(".quantized-*"))  # the QDQ graph is not left behind

    convert = ov_quant.convert

    def broken(path, dst, *args, **kwargs):
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            if init.name.endswith("_scale") and init.dims:  # the per-channel weight scales
                init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        onnx.save_model(model, str(tmp_path / "broken.onnx"))
        convert(tmp_path / "broken.onnx", dst, *args, **kwargs)

    monkeypatch.setattr(ov_quant, "convert", broken)
    with pytest.raises(ExportError, match="vision_encoder converted to OpenVINO does not match"):
        ov_quant._quantize_onnx_static("vision_encoder", src, tmp_path / "again.xml", QuantOptions(), feeds)
