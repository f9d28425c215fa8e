"""NNCF quantizers for the OpenVINO target (driven by calibration/package.py).

Fed by the same calibration samples and the same recording through the
runtime pipeline as the ONNX Runtime target:

- vision encoder, projector: static INT8 (nncf.quantize: activations and
  weights) on their recorded inputs; the vision encoder as a transformer
  (NNCF keeps normalisations and softmax in float);
- embedding table and decoder INT8: INT8 weight compression (asymmetric,
  per output channel), activations stay float;
- decoder INT4: INT4 weight compression (symmetric, group size
  --int4-block-size; --int4-ratio of the layers, the rest INT8, NNCF
  ranking them by sensitivity, default 1.0: every layer) with NNCF's AWQ and scale
  estimation on the decoder inputs recorded during prefill and cached decode
  steps (--int4-method awq), or data-free round-to-nearest (rtn); NNCF keeps
  the LM head in INT8;
- fp16: weights stored in float16.
"""

from __future__ import annotations

from pathlib import Path

from mmedge.calibration.package import SEVEN_BIT_WEIGHTS, QuantOptions, Recorder

MAX_DECODER_STEPS = 256  # recorded decoder calls kept for the data-aware INT4 compression
CPU_ACTIVATION_GROUP = 32  # OpenVINO's CPU default for DYNAMIC_QUANTIZATION_GROUP_SIZE


def graph_files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")]


class _CappedRecorder(Recorder):
    """Keeps the first MAX_DECODER_STEPS decoder calls.

    For a stateful decoder each recorded call also says whether the state was
    reset before it (NNCF's reset flag), so NNCF replays the recorded
    sequences with the same cache contents the runtime had.
    """

    def __init__(self, graph):
        super().__init__(graph)
        self.reset_before = False
        if callable(getattr(graph, "reset_state", None)):
            self.reset_state = self._reset_state

    def _reset_state(self):
        self.graph.reset_state()
        self.reset_before = True

    def run(self, inputs, into=None):
        self.keep = len(self.feeds) < MAX_DECODER_STEPS
        out = super().run(inputs, into=into)
        if self.keep and "reset_state" in vars(self):
            from nncf.definitions import NNCF_DATASET_RESET_STATE_KEY

            self.feeds[-1][NNCF_DATASET_RESET_STATE_KEY] = self.reset_before
        self.reset_before = False
        return out


def decoder_capture(work: Path, decoder: Path, plan: dict, options: QuantOptions):
    if plan["decoder"] != "int4" or options.int4_method != "awq":
        return None
    return decoder, _CappedRecorder


def quantize_graph(part, precision, src, dst, options, feeds, decoder_data) -> dict:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src))
    if precision == "fp16":
        ov.save_model(model, str(dst), compress_to_fp16=True)
        return {"scheme": "fp16 weights"}
    # text_encoder: a dual encoder's (CLIP, SigLIP); encoder: an encoder-decoder's (Florence-2)
    if part in ("vision_encoder", "projector", "text_encoder", "encoder"):
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        kind = None if part == "projector" else nncf.ModelType.TRANSFORMER
        # SEVEN_BIT_WEIGHTS: in every layer (NNCF's default overflow fix covers the first only)
        advanced = AdvancedQuantizationParameters(
            overflow_fix=OverflowFix.ENABLE if SEVEN_BIT_WEIGHTS else OverflowFix.FIRST_LAYER)
        quantized = nncf.quantize(model, nncf.Dataset(feeds[part]), subset_size=len(feeds[part]), model_type=kind,
                                  advanced_parameters=advanced)
        ov.save_model(quantized, str(dst), compress_to_fp16=False)
        weights = "weights in 7 bits" if SEVEN_BIT_WEIGHTS else "weights"
        return {"scheme": f"int8 static (nncf.quantize): activations and {weights}",
                "calibration_batches": len(feeds[part])}
    if precision == "int8":
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        group = set_activation_group(compressed)
        ov.save_model(compressed, str(dst), compress_to_fp16=False)
        report = {"scheme": "int8 weight compression (asymmetric, per channel)"}
        return {**report, "activation_group": group} if group else report
    data_aware = options.int4_method == "awq"
    kwargs = {}
    if data_aware:
        kwargs = dict(dataset=nncf.Dataset(decoder_data.feeds), awq=True, scale_estimation=True,
                      subset_size=len(decoder_data.feeds))
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    # a layer whose input size the group size does not divide gets the largest group size that does (>= 8)
    advanced = AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST,
                                             min_adjusted_group_size=8)
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM,
                                       group_size=options.int4_block_size, ratio=options.int4_ratio,
                                       advanced_parameters=advanced,
                                       **kwargs)
    group = set_activation_group(compressed)
    ov.save_model(compressed, str(dst), compress_to_fp16=False)
    share = "" if options.int4_ratio == 1.0 else f", {options.int4_ratio:.0%} of layers (the rest int8)"
    report = {"scheme": f"int4 weight compression (symmetric, group {options.int4_block_size}{share}); LM head int8",
              "int4_method": options.int4_method, "activation_group": group}
    if data_aware:
        report["decoder_calibration_steps"] = len(decoder_data.feeds)
    return report


def set_activation_group(model) -> int | None:
    """How many activations OpenVINO's CPU plugin quantizes to int8 together (one scale) when it multiplies
    them with these compressed weights; written into the graph as a runtime option, where OpenVINO reads it
    when it compiles (a setting given at load still wins). None where no compressed weight is multiplied.

    The plugin's default, 32, serves any weights; a group must divide every weight's group (an int4 weight's
    group size; an int8 weight is per output channel, so its whole input width), or the plugin computes that
    layer without int8 activations. Taking the largest such group cut Qwen2-VL-2B's prefill of 122 tokens by a
    quarter (int4 groups of 128: 867 -> 638 ms; int8: 876 -> 673 ms at 256), decode unchanged
    (docs/performance.md). Below the default (a layer whose width forced a smaller group) the default stays.
    """
    import math

    import openvino as ov

    def into_matmul(node, depth=6) -> bool:  # through the decompression: Convert, Subtract, Multiply, Reshape
        for target in node.output(0).get_target_inputs():
            user = target.get_node()
            kind = user.get_type_name()
            if kind == "MatMul" or (depth and kind in ("Convert", "Subtract", "Multiply", "Reshape")
                                    and into_matmul(user, depth - 1)):
                return True
        return False

    groups = []
    for op in model.get_ordered_ops():
        if (op.get_type_name() != "Constant" or op.get_output_partial_shape(0).is_dynamic
                or op.get_element_type() not in (ov.Type.i4, ov.Type.u4, ov.Type.i8, ov.Type.u8)
                or not into_matmul(op)):  # an embedding table is gathered from, not multiplied
            continue
        shape = list(op.get_output_shape(0))
        kind = op.get_element_type()
        # weights only: [out, groups, group] for int4, [out, in] for int8; zero points and scales end in 1
        if kind in (ov.Type.i4, ov.Type.u4) and len(shape) == 3 and shape[2] > 1:
            groups.append(shape[2])
        elif kind in (ov.Type.i8, ov.Type.u8) and len(shape) == 2 and shape[1] > 1:
            groups.append(shape[1])
    if not groups:
        return None  # no compressed weight is multiplied (an embedding table)
    group = math.gcd(*groups)
    if group <= CPU_ACTIVATION_GROUP:
        return CPU_ACTIVATION_GROUP
    model.set_rt_info(str(group), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    return group
