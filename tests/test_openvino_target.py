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


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_the_demo_decoders_projections_are_fused_at_every_precision(demo_packages, quant):
    """No two weight MatMuls of the shipped demo's openvino decoder read the same input, fp32 or INT4-compressed
    (NNCF compresses the joined weights: the compressed weights feed the one MatMul)."""
    package, _ = demo_packages(DEMO, "openvino", quant)
    model = ov.Core().read_model(str(package / "decoder.xml"))
    shared = {k: len(v) for k, v in _constant_matmuls_by_input(model).items() if len(v) > 1}
    assert not shared, shared
    assert sum(op.get_type_name() == "VariadicSplit" for op in model.get_ordered_ops()) >= 2
