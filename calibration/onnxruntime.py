"""Quantize an exported ONNX package graph by graph, calibrated on the real pipeline, and measure the result.

Flow (all on the staged package, before it is renamed into place):

1. The fp32 package runs the calibration samples through the real runtime
   (preprocessing, vision encoder, projector, embeddings, prefill and cached
   decode steps). Each graph's inputs are recorded as they occur; the decoder
   runs a copy that also returns the input of every weight MatMul, from which
   per-channel activation statistics and a sample of rows are kept.
2. Each graph is quantized as its plan says:
   - vision encoder, projector: INT8 QDQ, activations and weights, ranges
     calibrated (MinMax / Entropy / Percentile) on their recorded inputs;
   - embedding table: INT8 per row (a scale per token), dequantized by Gather;
   - decoder INT8: per-channel INT8 weights, activations quantized at run
     time (dynamic), since a decoder's activation ranges move with the text;
   - decoder INT4: block-wise INT4 MatMulNBits for every weight MatMul but
     the LM head (INT8), with activation-aware scaling (AWQ style: a scale
     per input channel, searched per MatMul on the recorded activations,
     folded into the weight and undone by a Mul on the activation) or plain
     round-to-nearest;
   - fp16: weights and compute in float16, inputs and outputs kept float32.
3. The quantized graphs are measured against fp32 on the held-out samples:
   output error per graph, teacher-forced top-1 agreement and KL of the
   decoder's logits, greedy-answer agreement end to end, bytes before/after.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm.auto import tqdm

from mmedge.calibration.data import CalibrationSet
from mmedge.calibration.plan import PARTS, describe
from mmedge.errors import ExportError, first_line
from mmedge.manifest import Manifest

log = logging.getLogger(__name__)

ROW_SAMPLE = 512  # activation rows kept per MatMul for the INT4 scale search
AWQ_GRID = np.linspace(0.0, 1.0, 11)


@dataclass
class QuantOptions:
    calib_method: str = "minmax"
    int4_method: str = "awq"
    int4_block_size: int = 32
    decode_steps: int = 16  # max new tokens per calibration / held-out sample


# -- recording the real pipeline ---------------------------------------------


class _Recorder:
    """Stands in for one graph of a Pipeline: runs it and keeps copies of its inputs."""

    def __init__(self, graph, keep: bool = True):
        self.graph, self.keep, self.feeds = graph, keep, []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.keep:
            self.feeds.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return self.graph.run(inputs)


class _ActivationStats:
    """Runs the decoder copy that exposes MatMul inputs; keeps mean |x| per channel and a sample of rows."""

    def __init__(self, graph, taps: list[str], seed: int = 0):
        self.graph, self.taps = graph, taps
        self.abs_sum: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}
        self.rows: dict[str, list[np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.graph.run(inputs)
        for tap in self.taps:
            x = out.pop(tap)
            x = x.reshape(-1, x.shape[-1]).astype(np.float32)
            self.abs_sum[tap] = self.abs_sum.get(tap, 0) + np.abs(x).sum(0)
            self.count[tap] = self.count.get(tap, 0) + x.shape[0]
            keep = self.rows.setdefault(tap, [])
            have = sum(len(r) for r in keep)
            if have < ROW_SAMPLE:
                take = min(len(x), ROW_SAMPLE - have, 32)  # spread the sample over many steps and samples
                keep.append(x[self.rng.choice(len(x), take, replace=False)])
        return out

    def stats(self, tap: str) -> tuple[np.ndarray, np.ndarray]:
        return self.abs_sum[tap] / max(1, self.count[tap]), np.concatenate(self.rows[tap])


def _weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def _name_nodes(model: onnx.ModelProto) -> None:
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _tapped_copy(path: Path, out: Path) -> list[str]:
    """Write a decoder copy whose extra outputs are the inputs of its weight MatMuls; returns their names."""
    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    taps = []
    for node in _weight_matmuls(model):
        tap = node.input[0]
        if tap not in taps and tap not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
            taps.append(tap)
    _save(model, out)
    return taps


# -- graph transforms ----------------------------------------------------------


def _big(model: onnx.ModelProto) -> bool:
    return sum(t.ByteSize() for t in model.graph.initializer) > (2 << 30) - (64 << 20)


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=_big(model), all_tensors_to_one_file=True,
                    location=path.name + ".data")


def _has_external_data(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists()


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice on the root logger and prints; keep the CLI's output ours."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _FeedReader:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def quantize_static_int8(src: Path, dst: Path, feeds: list[dict], method: str) -> dict:
    """INT8 QDQ: activations uint8 with calibrated ranges, weights int8 symmetric per output channel."""
    import os

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the calibrator writes its augmented model to the working directory
        try:
            quantize_static(
                str(src), str(dst), _FeedReader(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Conv", "Gemm"],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                use_external_data_format=_has_external_data(src),
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        finally:
            os.chdir(cwd)
    return {"scheme": "int8 QDQ: activations uint8 (calibrated), weights int8 per channel",
            "calibration": method, "calibration_batches": len(feeds)}


def quantize_dynamic_int8(src: Path, dst: Path, nodes: list[str] | None = None) -> dict:
    """INT8 weights per output channel; activations quantized per tensor at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    _name_nodes(model)
    names = nodes if nodes is not None else [n.name for n in _weight_matmuls(model)]
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / src.name
        _save(model, named)
        quantize_dynamic(str(named), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=names,
                         use_external_data_format=_has_external_data(named))
    return {"scheme": "int8 dynamic: weights int8 per channel, activations quantized at run time",
            "matmuls": len(names)}


def quantize_embedding_int8(src: Path, dst: Path) -> dict:
    """The embedding table as int8 with one scale per row; Gather picks rows and scales, a Mul dequantizes."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        base = node.input[0]
        model.graph.initializer.remove(inits[base])
        model.graph.initializer.extend([numpy_helper.from_array(q, base + "_int8"),
                                        numpy_helper.from_array(scale.astype(np.float32), base + "_scale")])
        out, ids = node.output[0], node.input[1]
        at = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        new = [
            helper.make_node("Gather", [base + "_int8", ids], [out + "_q"], name=node.name + "_q", axis=0),
            helper.make_node("Cast", [out + "_q"], [out + "_f"], name=node.name + "_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [base + "_scale", ids], [out + "_s"], name=node.name + "_scale", axis=0),
            helper.make_node("Mul", [out + "_f", out + "_s"], [out], name=node.name + "_dequant"),
        ]
        for i, n in enumerate(new):
            model.graph.node.insert(at + i, n)
        done += 1
    if not done:
        raise ExportError(f"{src.name} has no embedding table (Gather on a 2-D initializer) to quantize")
    _save(model, dst)
    return {"scheme": "int8 weight-only, one scale per row"}


def convert_fp16(src: Path, dst: Path) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _save(model, dst)
    return {"scheme": "fp16 weights and compute, fp32 inputs and outputs"}


def _fake_int4(w: np.ndarray, block: int) -> np.ndarray:
    """Symmetric block-wise INT4 round trip along K (rows of a [K, N] MatMul weight), as MatMulNBits stores it.

    onnxruntime's symmetric blocks map the block's largest-magnitude value to -8
    (scale = that value / -8, zero point 8) and clamp the other side at +7.
    """
    k, n = w.shape
    pad = (-k) % block
    wp = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block, n)
    idx = np.abs(wp).argmax(axis=1)[:, None, :]
    scale = np.take_along_axis(wp, idx, axis=1) / -8.0
    scale[scale == 0] = 1.0
    return (np.clip(np.round(wp / scale), -8, 7) * scale).reshape(-1, n)[:k]


def awq_scales(w: np.ndarray, act_mean: np.ndarray, rows: np.ndarray, block: int) -> tuple[np.ndarray, float, float]:
    """Search s = mean|x|^alpha per input channel so that (x / s) @ Q(diag(s) W) best matches x @ W on `rows`."""
    ref = rows @ w
    best = (None, 0.0, np.inf)
    base = np.maximum(act_mean, 1e-8)
    for alpha in AWQ_GRID:
        s = base ** alpha
        s = s / np.sqrt(s.max() * s.min())
        err = float(np.mean((ref - (rows / s) @ _fake_int4(w * s[:, None], block)) ** 2))
        if err < best[2]:
            best = (s, float(alpha), err)
    rtn_err = float(np.mean((ref - rows @ _fake_int4(w, block)) ** 2))
    return best[0], best[1], best[2] / max(rtn_err, 1e-30)


def quantize_decoder_int4(src: Path, dst: Path, block: int, method: str, stats: _ActivationStats | None,
                          lm_head_vocab: int) -> dict:
    """Block-wise INT4 (MatMulNBits) for every weight MatMul but the LM head, which gets INT8."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src))
    _name_nodes(model)
    inits = {i.name: i for i in model.graph.initializer}
    matmuls = _weight_matmuls(model)
    heads = [n.name for n in matmuls if inits[n.input[1]].dims[1] == lm_head_vocab]
    alphas, gains = {}, []
    if method == "awq":
        if stats is None:
            raise ExportError("activation-aware INT4 needs decoder calibration data")
        for node in matmuls:
            if node.name in heads or node.input[0] not in stats.abs_sum:
                continue
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            act, rows = stats.stats(node.input[0])
            s, alpha, gain = awq_scales(w, act, rows, block)
            alphas[node.name], gains = alpha, gains + [gain]
            if alpha == 0.0:
                continue
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
            inv = node.name + "_awq_inv_scale"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            scaled = node.input[0] + "_awq_" + node.name
            at = list(model.graph.node).index(node)
            model.graph.node.insert(at, helper.make_node("Mul", [node.input[0], inv], [scaled], name=node.name + "_awq"))
            node.input[0] = scaled
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=4)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True, nodes_to_exclude=heads,
                                     algo_config=config)
    quantizer.process()
    with tempfile.TemporaryDirectory() as tmp:
        mid = Path(tmp) / "decoder_int4.onnx"
        _save(quantizer.model.model, mid)
        if heads:
            quantize_dynamic_int8(mid, dst, nodes=heads)
        else:
            shutil.copy(mid, dst)
    report = {"scheme": f"int4 block-wise (MatMulNBits, block {block}, symmetric) weights; LM head int8 dynamic",
              "int4_method": method, "int4_matmuls": len(matmuls) - len(heads)}
    if alphas:
        report["awq_alpha"] = {k: round(v, 2) for k, v in alphas.items()}
        report["awq_error_vs_rtn"] = round(float(np.mean(gains)), 4)  # mean over MatMuls of AWQ MSE / RTN MSE
    return report


# -- the whole package -------------------------------------------------------


def _pipeline(stage: Path, manifest: Manifest, files: dict[str, Path], wrap: dict | None = None):
    """A runtime Pipeline over `files` (part -> graph path), optionally with wrapped graphs."""
    from mmedge.runtimes.backends import get_backend
    from mmedge.runtimes.pipeline import Pipeline
    from mmedge.runtimes.text import TextCodec

    engine = get_backend("onnxruntime")
    graphs = {part: engine.load(files[part]) for part in PARTS}
    for part, make in (wrap or {}).items():
        graphs[part] = make(graphs[part])
    codec = TextCodec(stage / manifest.tokenizer, manifest.prompt, manifest.special_tokens)
    return Pipeline(stage, manifest, graphs, codec)


def quantize_package(stage: Path, manifest: Manifest, plan: dict[str, str], calib: CalibrationSet,
                     options: QuantOptions, progress: bool = True) -> dict:
    """Replace the staged fp32 graphs by their quantized versions; returns the report stored in the manifest."""
    work = stage / ".quantize"
    work.mkdir()
    fp32 = {part: stage / manifest.graphs[part].file for part in PARTS}
    try:
        report = _quantize(stage, work, manifest, fp32, plan, calib, options, progress)
        for part in PARTS:
            if plan[part] == "fp32":
                continue
            for suffix in ("", ".data"):
                old = fp32[part].with_name(fp32[part].name + suffix)
                new = (work / fp32[part].name).with_name(fp32[part].name + suffix)
                old.unlink(missing_ok=True)
                if new.exists():
                    new.replace(old)
            manifest.graphs[part].precision = plan[part]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _quantize(stage, work, manifest, fp32, plan, calib, options, progress) -> dict:
    need_stats = plan["decoder"] == "int4" and options.int4_method == "awq"
    wrap = {part: _Recorder for part in ("vision_encoder", "projector")}
    files = dict(fp32)
    if need_stats:
        tapped = work / "decoder_tapped.onnx"
        taps = _tapped_copy(fp32["decoder"], tapped)
        files["decoder"] = tapped
        wrap["decoder"] = lambda g: _ActivationStats(g, taps)
    pipe = _pipeline(stage, manifest, files, wrap)
    recorders = {part: pipe.graphs[part] for part in ("vision_encoder", "projector")}
    stats = pipe.graphs["decoder"] if need_stats else None
    calibrated = need_stats or any(plan[p] == "int8" for p in recorders)
    samples = calib.calibrate if calibrated else []  # fp16 and weight-only int8 need no calibration data
    for sample in tqdm(samples, desc="calibrate", unit="sample", disable=not progress):
        for _ in pipe.generate_ids(sample.image, sample.prompt, max_new_tokens=options.decode_steps):
            pass
    del pipe

    graphs = {}
    bar = tqdm([p for p in PARTS if plan[p] != "fp32"], desc="quantize", unit="graph", disable=not progress)
    for part in bar:
        bar.set_postfix_str(f"{part} {plan[part]}")
        src, dst = fp32[part], work / fp32[part].name
        try:
            with _quiet():
                graphs[part] = _quantize_graph(part, plan[part], src, dst, options, recorders, stats, fp32)
        except ExportError:
            raise
        except Exception as exc:  # onnxruntime.quantization raises whatever it meets
            raise ExportError(f"quantizing {part} to {plan[part]} failed: {first_line(exc)}") from exc
        graphs[part]["precision"] = plan[part]
    bar.close()
    for part in PARTS:
        graphs.setdefault(part, {"precision": "fp32"})
        graphs[part]["bytes_fp32"] = _bytes(fp32[part])
        graphs[part]["bytes"] = _bytes(work / fp32[part].name) if plan[part] != "fp32" else graphs[part]["bytes_fp32"]

    quant_files = {p: (work / fp32[p].name if plan[p] != "fp32" else fp32[p]) for p in PARTS}
    measured = measure(stage, manifest, fp32, quant_files, calib, options, progress)
    for part, errors in measured.pop("graphs").items():
        graphs[part].update(errors)
    return {
        "plan": dict(plan),
        "name": describe(plan),
        "options": asdict(options),
        "calibration": {**calib.describe(), "used": calibrated},
        "graphs": graphs,
        "bytes_fp32": sum(g["bytes_fp32"] for g in graphs.values()),
        "bytes": sum(g["bytes"] for g in graphs.values()),
        **measured,
    }


def _quantize_graph(part, precision, src, dst, options, recorders, stats, fp32) -> dict:
    if precision == "fp16":
        return convert_fp16(src, dst)
    if part == "embed_tokens":
        return quantize_embedding_int8(src, dst)
    if part == "decoder" and precision == "int8":
        return quantize_dynamic_int8(src, dst)
    if part == "decoder":
        return quantize_decoder_int4(src, dst, options.int4_block_size, options.int4_method, stats,
                                     _lm_head_vocab(fp32["decoder"]))
    return quantize_static_int8(src, dst, recorders[part].feeds, options.calib_method)


def _lm_head_vocab(decoder: Path) -> int:
    out = onnx.load(str(decoder), load_external_data=False).graph.output
    logits = next(o for o in out if o.name == "logits")
    return int(logits.type.tensor_type.shape.dim[-1].dim_value)


def _bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# -- measuring ---------------------------------------------------------------


def _err(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return {"max_abs_err": float(np.max(np.abs(ref - got))),
            "rel_l2_err": float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-30))}


def _worst(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: max(a[k], b[k]) for k in b}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure(stage: Path, manifest: Manifest, fp32_files: dict, quant_files: dict, calib: CalibrationSet,
            options: QuantOptions, progress: bool = True) -> dict:
    """Quantized vs fp32 on the held-out samples: per-graph error, teacher-forced logits, greedy answers."""
    ref = _pipeline(stage, manifest, fp32_files, dict.fromkeys(("vision_encoder", "projector", "embed_tokens"), _Recorder))
    rec = {p: ref.graphs[p] for p in ("vision_encoder", "projector", "embed_tokens")}
    quant = _pipeline(stage, manifest, quant_files)
    graph_err: dict[str, dict | None] = dict.fromkeys(PARTS)
    agree = top1 = positions = 0
    kl_sum = 0.0
    logits_err = None
    for sample in tqdm(calib.held_out, desc="measure", unit="sample", disable=not progress):
        tokens = list(ref.generate_ids(sample.image, sample.prompt, max_new_tokens=options.decode_steps))
        answer = list(quant.generate_ids(sample.image, sample.prompt, max_new_tokens=options.decode_steps))
        agree += tokens == answer
        a = ref.teacher_forced_logits(sample.image, sample.prompt, tokens)
        b = quant.teacher_forced_logits(sample.image, sample.prompt, tokens)
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += len(a)
        la, lb = _log_softmax(a), _log_softmax(b)
        kl_sum += float((np.exp(la) * (la - lb)).sum())
        logits_err = _worst(logits_err, _err(a, b))
    for part, r in rec.items():
        for feeds in r.feeds:
            got = quant.graphs[part].run(feeds)
            want = r.graph.run(feeds)
            for name in want:
                graph_err[part] = _worst(graph_err[part], _err(want[name], got[name]))
    graph_err["decoder"] = logits_err
    n = len(calib.held_out)
    return {
        "graphs": {p: {f"held_out_{k}": v for k, v in e.items()} for p, e in graph_err.items() if e},
        "held_out_samples": n,
        "greedy_agreement": agree / n,
        "teacher_forced_top1_agreement": top1 / max(1, positions),
        "teacher_forced_kl": kl_sum / max(1, positions),
        "teacher_forced_positions": positions,
    }
