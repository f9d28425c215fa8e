"""Quantize a staged package graph by graph, calibrated on the real pipeline, and measure it against fp32.

Target-independent; the graph transforms live in one module per target
(calibration/onnxruntime.py, calibration/openvino.py), each providing:

    graph_files(path) -> the files a graph consists of
    decoder_capture(work, fp32_decoder, plan, options) -> (file to run, wrapper) or None
        how the decoder is run during calibration when its quantizer needs data
    BACKEND (optional): the runtime backend that runs the graphs here, if not the target's own
    quantize_graph(part, precision, src, dst, options, feeds, decoder_data) -> report dict
    share_tied_table(embed_src, embed_dst, decoder_src, decoder_dst) (optional) -> report dict or None
        an INT8 embedding that reads the quantized LM head's table when they are one (tied weights)

Flow: the fp32 package runs the calibration samples through the real runtime
(preprocessing, vision encoder, projector, embeddings, prefill and cached
decode steps), recording each graph's inputs as they occur; each graph is
quantized as its plan says; the quantized graphs are measured against fp32
on the held-out samples (per-graph error, teacher-forced top-1 agreement and
KL of the decoder's logits, greedy-answer agreement, bytes before/after).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mmedge.calibration import layered
from mmedge.calibration.data import MIN_SAMPLES, CalibrationSet
from mmedge.calibration.plan import describe
from mmedge.runtimes.loading import graph_parts
from mmedge.errors import ExportError, first_line
from mmedge.exporters.resources import release_freed_memory
from mmedge.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class QuantOptions:
    calib_method: str = "minmax"
    int4_method: str = "awq"
    int4_block_size: int = 32
    int4_ratio: float = 1.0
    decode_steps: int = 16  # max new tokens per calibration / held-out sample


def answer(pipe, sample, max_new_tokens: int) -> list[int]:
    """The greedy tokens of a calibration sample: an (image, prompt) pair's, or a speech clip's (its first window)."""
    if sample.audio is not None:
        return pipe.transcribe_ids(sample.audio, max_new_tokens=max_new_tokens)[0]
    return list(pipe.generate_ids(sample.image, sample.prompt, max_new_tokens=max_new_tokens))


def forced_logits(pipe, sample, tokens: list[int]):
    if sample.audio is not None:
        return pipe.teacher_forced_logits(None, "", tokens, audio=sample.audio)
    return pipe.teacher_forced_logits(sample.image, sample.prompt, tokens)


# Static INT8 weights in 7 bits (-64..63) for the CPU targets. x86 CPUs without VNNI (AVX2, AVX-512 without
# VNNI) multiply uint8 activations by int8 weights with vpmaddubsw, which adds two products into an int16 and
# saturates past 32767 (255 x 127 x 2 = 64770): the package runs fine on a VNNI machine and loses accuracy on an
# AVX2 laptop. Measured on this project's AVX2 test machine (AMD EPYC): the tiny CLIP's INT8 vision encoder at a
# mean cosine of 0.969 against fp32 (0.964 in OpenVINO) with 8-bit weights; the Llama 3.2 Vision demo's INT4
# package (its vision encoder static INT8) at 91.2% held-out against 97.8% fp32. 7-bit weights cannot saturate,
# on any CPU; ONNX Runtime's and NNCF's documented remedy (reduce_range, OverflowFix). TensorRT (symmetric int8
# activations, GPU) keeps 8 bits.
SEVEN_BIT_WEIGHTS = True


# graphs whose inputs calibration records (their static INT8 data): the vision side, an encoder-decoder's encoder
RECORDED = ("vision_encoder", "projector", "encoder")


class Recorded(list):
    """A graph's recorded inputs and, where they were measured as it ran (a target's range_probe), the ranges its
    static INT8 takes (else None: measured from the inputs when it is quantized)."""

    ranges = None


class Recorder:
    """Stands in for one graph of a Pipeline: runs it and keeps copies of its inputs (and, with `outputs`, of what
    it returned for them, in `self.returned`)."""

    def __init__(self, graph, keep: bool = True, outputs: bool = False):
        self.graph, self.keep, self.feeds = graph, keep, Recorded()
        self.returned: list[dict[str, np.ndarray]] | None = [] if outputs else None

    def run(self, inputs: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if not self.keep:
            return self.graph.run(inputs, into=into)
        self.feeds.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        out = self.graph.run(inputs, into=into)
        if self.returned is not None:  # copies: an engine reuses its buffers
            self.returned.append({k: np.array(v, copy=True) for k, v in out.items()})
        return out

    def runs(self) -> list[tuple[dict, dict]]:
        """Each recorded input with what the graph returned for it."""
        return list(zip(self.feeds, self.returned))

    def __getattr__(self, name):  # the rest of the graph's interface (e.g. reset_state of a stateful decoder)
        return getattr(self.graph, name)


def _with_outputs(graph) -> Recorder:
    return Recorder(graph, outputs=True)


def _digest(feeds: dict[str, np.ndarray]) -> tuple:
    """What a graph's inputs are known by, to find a run of them again."""
    return tuple((k, v.dtype.str, v.shape, hashlib.blake2b(np.ascontiguousarray(v).tobytes()).digest())
                 for k, v in sorted(feeds.items()))


@contextlib.contextmanager
def quiet():
    """onnxruntime.quantization logs advice on the root logger and prints; NNCF logs tables on its own
    logger (its handler holds the real stdout); keep the CLI's output ours."""
    loggers = [logging.getLogger(), logging.getLogger("nncf")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- the whole package -------------------------------------------------------


def _pipeline(stage: Path, manifest: Manifest, files: dict[str, Path], wrap: dict | None = None,
              ready: dict | None = None):
    """A runtime Pipeline over `files` (part -> graph path; the graphs of `ready` as given), optionally with wrapped
    graphs. Where the decoder is big, ONNX Runtime runs them low_memory: float32 graphs (the staged ones, or a copy
    reading their data) without prepacking, float16 ones widened weight by weight as they run (a float16 package's
    measurement held a float32 copy of PaliGemma-3B's decoder: 12 GiB anonymous), quantized ones prepacked as
    always."""
    from mmedge.runtimes.pipeline import Pipeline
    from mmedge.runtimes.text import TextCodec

    load = _loader(stage, manifest)
    ready = ready or {}
    graphs = {part: ready[part] if part in ready else load(files[part]) for part in files}
    for part, make in (wrap or {}).items():
        graphs[part] = make(graphs[part])
    codec = TextCodec.from_package(stage, manifest)
    pipe = Pipeline(stage, manifest, graphs, codec)
    pipe.reuse_prefix = False  # each recorded sample runs whole, from an empty cache, as the graphs are replayed
    return pipe


def _loader(stage: Path, manifest: Manifest):
    """How calibration opens a graph file of the staged package: on the engine that runs the package here (the
    target's, or its BACKEND), opened on the package so that it knows what each graph holds (how low_memory opens
    it), or as the target stages it (`load_graph`: OpenVINO's big decoder, as ONNX)."""
    from mmedge.runtimes.backends import open_engine

    name = getattr(_target(manifest), "BACKEND", manifest.target)
    big = _big_staged_decoder(stage, manifest)
    engine = open_engine(stage, manifest, name, low_memory=big and name == "onnxruntime", model_cache=False)
    load = getattr(_target(manifest), "load_graph", None)  # a target with graphs staged for another engine
    return (lambda path: load(engine, path, manifest)) if load else engine.load


# A decoder graph over this many bytes (float32: ~250M parameters) is calibrated on its prefills plus one decode
# step (each step reads every weight for one row of statistics: a second per step for a 3B model here) and run
# by ONNX Runtime without prepacking (a repacked copy of its weights would double the memory). Smaller ones run
# calibration's full decode and prepacked.
BIG_DECODER_BYTES = 1 << 30


def big_decoder(path: Path, target=None) -> bool:
    """Whether the graph at `path` (ONNX, or `target`'s) holds over BIG_DECODER_BYTES of weights (its data files
    included): a decoder checked, calibrated and measured a few layers at a time (calibration/layered.py)."""
    from mmedge.calibration import onnxruntime as ort_quant

    return graph_bytes(target or ort_quant, path) > BIG_DECODER_BYTES


def _big_staged_decoder(stage: Path, manifest: Manifest) -> bool:
    """Whether the staged fp32 decoder is over BIG_DECODER_BYTES."""
    return big_decoder(staged(stage, manifest, "decoder"), _target(manifest))


def _by_layers(stage: Path, manifest: Manifest, decoder: Path) -> bool:
    """Whether the float32 decoder is run layer group by layer group where nothing depends on its answers
    (calibration/layered.py): a big one, as ONNX (ONNX Runtime runs it here on every target that stages it so),
    not a speech model's (its first token, the language, steers how its windows are decoded)."""
    return decoder.suffix == ".onnx" and manifest.audio is None and _big_staged_decoder(stage, manifest)


def _replay(stage: Path, manifest: Manifest, decoder: Path, sequences: list, take, desc: str, progress: bool) -> None:
    """The decoder graph `decoder` over the `sequences` a Deferred decoder recorded, piece by piece (layered.py),
    through ONNX Runtime (what runs a staged ONNX decoder here on every target), its weights mapped."""
    from mmedge.runtimes.backends import get_backend

    pieces = layered.split(decoder)
    try:
        load = get_backend("onnxruntime", low_memory=True, model_cache=False).load
        layered.replay(pieces, sequences, load, manifest.kv_cache, take, desc, progress)
    finally:
        layered.remove(pieces)


def _held_out_steps(stage: Path, manifest: Manifest, options: QuantOptions) -> int:
    """New tokens per held-out sample: options.decode_steps, or 1 where the fp32 decoder's weights are more than
    the memory available. A decode step reads every weight: LLaVA-1.5-7B's 27 GB decoder on a 24 GB machine
    re-read them from disk at ~0.7 GB/s, ~40 s a token, about 14 minutes a held-out sample (2026-12-04)."""
    from mmedge.exporters.resources import available_memory

    free = available_memory()
    size = graph_bytes(_target(manifest), staged(stage, manifest, "decoder"))
    return 1 if free is not None and size > free else options.decode_steps


def _vision_first(stage: Path, manifest: Manifest, pipe) -> list[str]:
    """The vision side's graphs to run on every sample before the decoder runs on any, and let go: where the
    decoder is big, so that its weights and theirs are not resident at once (PaliGemma-3B: a 1.6 GB vision encoder
    beside a 10 GB decoder, every page of both read per sample). Where the image cache keeps what they make, which
    an encoder-decoder's encoder (it reads the prompt too) does not: none there."""
    if pipe.encoder or not _big_staged_decoder(stage, manifest):
        return []
    return [part for part in ("vision_encoder", "projector") if part in pipe.graphs]


class _LetGo:
    """Stands in for a graph whose engine was let go (its weights unmapped)."""

    def __init__(self, part: str):
        self.part = part

    def run(self, inputs, into=None):
        raise RuntimeError(f"the {self.part} graph was let go after every sample's media was encoded, and was run "
                           "again: a sample's media was not in the image cache")


def _encode_media(pipe, samples, desc: str, progress: bool) -> None:
    """Every sample's media through the vision side now (Pipeline.encode_media), all of it kept in the image cache
    for the decoder's passes."""
    from mmedge.runtimes.media_cache import MediaCache

    pipe.media = MediaCache(1 << 62)  # every sample's: a few MB each (LLaVA-1.5-7B: 576 x 4096 float32)
    for sample in tqdm(samples, desc=desc, unit="sample", disable=not progress):
        pipe.encode_media(sample.image, sample.prompt)


def _let_go(pipe, parts: list[str]) -> None:
    """The engines of `parts` (Recorders: what they recorded is kept) let go, their weights unmapped."""
    for part in parts:
        pipe.graphs[part].graph = _LetGo(part)
    release_freed_memory()


def _take_ranges(feeds: dict, probes: dict, parts: list[str]) -> None:
    """The ranges the range probes of `parts` measured, kept with their recorded inputs; the probes let go."""
    for part in parts:
        if part in probes:
            feeds[part].ranges = probes.pop(part).ranges()


def _target(manifest: Manifest):
    return importlib.import_module(f"mmedge.calibration.{manifest.target}")


def quantize_package(stage: Path, manifest: Manifest, plan: dict[str, str], calib: CalibrationSet,
                     options: QuantOptions, progress: bool = True) -> dict:
    """Replace the staged fp32 graphs by their quantized versions; returns the report stored in the manifest."""
    target = _target(manifest)
    work = stage / ".quantize"
    work.mkdir()
    fp32 = {part: staged(stage, manifest, part) for part in graph_parts(manifest)}
    names = {part: manifest.graphs[part].file for part in fp32}  # each quantized graph's file
    try:
        report = _quantize(target, stage, work, manifest, fp32, names, plan, calib, options, progress)
        for part in fp32:
            if plan[part] == "fp32":
                continue
            for old in target.graph_files(fp32[part]):
                old.unlink(missing_ok=True)
            for new in target.graph_files(work / names[part]):
                if new.exists():
                    new.replace(stage / new.name)
            manifest.graphs[part].precision = plan[part]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _quantize(target, stage, work, manifest, fp32, names, plan, calib, options, progress) -> dict:
    recorded = [p for p in RECORDED if p in fp32]
    capture = target.decoder_capture(work, fp32["decoder"], plan, options)
    calibrated = bool(capture) or any(plan[p] == "int8" for p in recorded)
    feeds = {part: Recorded() for part in recorded}
    decoder_data = None
    if calibrated:  # fp16 and weight-only int8 need no calibration data, nor the fp32 package opened for it
        feeds, decoder_data = _calibrate(target, stage, manifest, fp32, recorded, capture, plan, calib, options,
                                         progress)

    graphs = {}
    # the embedding after the decoder: where the LM head is the same table, it may be stored once (share_tied_table)
    parts = sorted((p for p in fp32 if plan[p] != "fp32"), key=lambda p: p == "embed_tokens")
    bar = tqdm(parts, desc="quantize", unit="graph", disable=not progress)
    for part in bar:
        bar.set_postfix_str(f"{part} {plan[part]}")
        src, dst = fp32[part], work / names[part]
        try:
            with quiet():
                graphs[part] = _shared_table(target, part, plan, fp32, work, names) \
                    or target.quantize_graph(part, plan[part], src, dst, options, feeds, decoder_data)
        except ExportError:
            raise
        except Exception as exc:  # the quantization libraries raise whatever they meet
            raise ExportError(f"quantizing {part} to {plan[part]} failed: {first_line(exc)}") from exc
        graphs[part]["precision"] = plan[part]
    bar.close()
    for part in fp32:
        graphs.setdefault(part, {"precision": "fp32"})
        graphs[part]["bytes_fp32"] = graph_bytes(target, fp32[part])
        graphs[part]["bytes"] = (graph_bytes(target, work / names[part]) if plan[part] != "fp32"
                                 else graphs[part]["bytes_fp32"])

    quant_files = {p: (work / names[p] if plan[p] != "fp32" else fp32[p]) for p in fp32}
    measured = measure(stage, manifest, fp32, quant_files, calib, options, progress, plan)
    for part, errors in measured.pop("graphs").items():
        graphs[part].update(errors)
    return {
        "plan": {p: plan[p] for p in fp32},
        "name": describe({p: plan[p] for p in fp32}),
        "options": asdict(options),
        "calibration": {**calib.describe(), "used": calibrated},
        "graphs": graphs,
        "bytes_fp32": sum(g["bytes_fp32"] for g in graphs.values()),
        "bytes": sum(g["bytes"] for g in graphs.values()),
        **measured,
    }


def _calibrate(target, stage, manifest, fp32, recorded, capture, plan, calib, options, progress):
    """The fp32 package run over the calibration samples: each recorded graph's inputs (and, where the target
    measures them so, its static INT8 ranges), and the decoder's activation statistics where `capture` taps them.
    Returns (recorded inputs by part, the decoder's statistics or None)."""
    wrap = {part: Recorder for part in recorded}
    files = dict(fp32)
    if capture:
        files["decoder"], wrap["decoder"] = capture
    # the static INT8 graphs' ranges measured as calibration runs them, where the target measures them so
    probe = getattr(target, "range_probe", lambda part, graph, options: None)
    probes = {part: probe(part, fp32[part], options) for part in recorded if plan[part] == "int8"}
    ready = {part: graph for part, graph in probes.items() if graph is not None}
    probes = dict(ready)
    # a big decoder's prefills recorded as the samples run, then replayed layer group by layer group (layered.py)
    deferred = capture and _by_layers(stage, manifest, capture[0]) and layered.Deferred(manifest)
    if deferred:
        ready["decoder"] = deferred
        del wrap["decoder"]
    pipe = _pipeline(stage, manifest, files, wrap, ready=ready)
    del ready  # (the probes are let go one by one: _take_ranges)
    feeds = {part: pipe.graphs[part].feeds for part in recorded}
    decoder_data = pipe.graphs["decoder"] if capture and not deferred else None
    samples = _within_budget(pipe, calib)
    # a decode step reads every weight for one row of activations: a big decoder is calibrated on its prefills
    steps = 1 if _big_staged_decoder(stage, manifest) else options.decode_steps
    first = _vision_first(stage, manifest, pipe) if samples else []
    if first:
        _encode_media(pipe, samples, "calibrate vision", progress)
        _take_ranges(feeds, probes, first)
        _let_go(pipe, first)
    # the decoder's pass records what the vision side did not: its own statistics, an encoder's inputs (a big
    # decoder's weight-only INT8 needs none: PaliGemma-3B's 22 prefills took 2.4 min for nothing)
    if capture or any(part not in first for part in recorded if plan[part] == "int8"):
        for sample in tqdm(samples, desc="calibrate", unit="sample", disable=not progress):
            if deferred:
                deferred.begin()
            answer(pipe, sample, steps)
    _take_ranges(feeds, probes, list(probes))
    del pipe
    try:
        if deferred:
            release_freed_memory()  # the vision side's and the embedding's engines gone before the decoder's pieces
            decoder_data = capture[1](None)
            _replay(stage, manifest, capture[0], deferred.sequences, lambda s, t, out: decoder_data.take(out),
                    "calibrate decoder by layers", progress)
        elif capture:
            decoder_data.graph = None  # what it recorded is kept; the session is let go
    finally:
        if capture and capture[0] != fp32["decoder"]:
            capture[0].unlink(missing_ok=True)  # a decoder copy that returned its MatMul inputs (ONNX Runtime)
    release_freed_memory()  # the fp32 engines' memory back before the quantizers need theirs
    return feeds, decoder_data


def _within_budget(pipe, calib: CalibrationSet) -> list:
    """The calibration samples up to the set's token budget (CalibrationSet.token_budget: a big model's default),
    at least MIN_SAMPLES, in their order; the set keeps what was used, and how many prompt tokens that was."""
    if not calib.token_budget or any(s.audio is not None for s in calib.calibrate):
        return calib.calibrate
    kept, total = [], 0
    for sample in calib.calibrate:
        n = pipe.prompt_tokens(sample.image, sample.prompt)
        if len(kept) >= MIN_SAMPLES and total + n > calib.token_budget:
            break
        kept.append(sample)
        total += n
    calib.calibrate, calib.prompt_tokens = kept, total
    return kept


def _shared_table(target, part: str, plan: dict, fp32: dict, work: Path, names: dict) -> dict | None:
    """An INT8 embedding that reads the quantized LM head's table, where the target can share it (its
    `share_tied_table`) and the head is that table; None otherwise."""
    share = getattr(target, "share_tied_table", None)
    if share is None or part != "embed_tokens" or plan[part] != "int8" or plan.get("decoder") not in ("int8", "int4"):
        return None
    return share(fp32[part], work / names[part], fp32["decoder"], work / names["decoder"])


def staged(stage: Path, manifest: Manifest, part: str) -> Path:
    """The staged float32 graph of `part`: its manifest file, or what the target stages in its place until it is
    quantized (`staged_source`: OpenVINO's big decoder, as ONNX)."""
    path = stage / manifest.graphs[part].file
    return getattr(_target(manifest), "staged_source", lambda p: p)(path)


def graph_bytes(target, path: Path) -> int:
    return sum(p.stat().st_size for p in target.graph_files(path) if p.exists())


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
            options: QuantOptions, progress: bool = True, plan: dict[str, str] | None = None) -> dict:
    """Quantized vs fp32 on the held-out samples: per-graph error, teacher-forced logits, greedy answers. `plan`
    (part -> precision of quant_files) tells the engine what each quantized graph holds.

    One package runs all samples and is let go before the other loads, so a big model's two packages are never in
    memory together: the fp32 one first, its teacher-forced logits those its greedy generation computed
    (Pipeline.logits_out: forcing its own answer would compute them again), the quantized one forced along its
    answer. A big float32 decoder (`_by_layers`) runs second instead, forced along the quantized package's answer,
    layer group by layer group (calibration/layered.py): whether its greedy answer is the same is read off those
    rows (Pipeline.greedy_along), as it is read off the quantized rows the other way."""
    parts = [p for p in (*RECORDED, "embed_tokens") if p in fp32_files]
    quantized = copy.deepcopy(manifest)
    for part in quant_files:
        quantized.graphs[part].precision = (plan or {}).get(part, quantized.graphs[part].precision)
    if _by_layers(stage, manifest, fp32_files["decoder"]):
        steps = options.decode_steps  # each piece's weights are read once, however many steps
        rows, cases = _compare_by_layers(stage, manifest, quantized, fp32_files, quant_files, parts, calib, steps,
                                         progress)
    else:
        steps = _held_out_steps(stage, manifest, options)
        rows, cases = _compare(stage, manifest, quantized, fp32_files, quant_files, parts, calib, steps, progress)
    graph_err: dict[str, dict | None] = dict.fromkeys(fp32_files)
    agree = top1 = positions = 0
    kl_sum = 0.0
    logits_err = None
    for same, a, b in rows:  # per sample: greedy answers the same, fp32 rows, quantized rows
        agree += same
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += len(a)
        la, lb = _log_softmax(a), _log_softmax(b)
        kl_sum += float((np.exp(la) * (la - lb)).sum())
        logits_err = _worst(logits_err, _err(a, b))
    for part, pairs in cases.items():
        for want, got in pairs:
            for name in manifest.graphs[part].outputs:  # the contract's names (an engine may add aliases)
                graph_err[part] = _worst(graph_err[part], _err(want[name], got[name]))
    graph_err["decoder"] = logits_err
    n = len(calib.held_out)
    return {
        "graphs": {p: {f"held_out_{k}": v for k, v in e.items()} for p, e in graph_err.items() if e},
        "held_out_samples": n,
        "held_out_new_tokens": steps,
        "greedy_agreement": agree / n,
        "teacher_forced_top1_agreement": top1 / max(1, positions),
        "teacher_forced_kl": kl_sum / max(1, positions),
        "teacher_forced_positions": positions,
    }


def _fp32_side(stage, manifest, fp32_files, parts, calib, progress, ready=None):
    """The fp32 package's pipeline with each graph of `parts` recording its held-out inputs and outputs once; where
    the decoder is big, every sample's media encoded first and the vision side let go (_vision_first)."""
    ref = _pipeline(stage, manifest, fp32_files, dict.fromkeys(parts, _with_outputs), ready=ready)
    rec = {p: ref.graphs[p] for p in parts}
    first = _vision_first(stage, manifest, ref)
    if first:  # each held-out input recorded once, as the media is encoded
        for part, r in rec.items():
            r.keep = part in first
        _encode_media(ref, calib.held_out, "measure fp32 vision", progress)
        _let_go(ref, first)
    return ref, rec, first


def _recording(rec: dict, first: list[str], on: bool) -> None:
    """Each held-out input recorded once: in a sample's first pass through the decoder, the vision side's before."""
    for part, r in rec.items():
        r.keep = on and part not in first


def _compare(stage, manifest, quantized, fp32_files, quant_files, parts, calib, steps, progress):
    """fp32 first (greedy, its own logits kept), then the quantized package forced along its answers. Returns per
    sample (greedy answers the same, fp32 rows, quantized rows), and per graph its (fp32, quantized) outputs."""
    ref, rec, first = _fp32_side(stage, manifest, fp32_files, parts, calib, progress)
    expected = []  # per sample: fp32 greedy tokens, the tokens forced, and the fp32 logits along them
    for sample in tqdm(calib.held_out, desc="measure fp32", unit="sample", disable=not progress):
        ref.logits_out = [] if sample.audio is None else None  # (speech: every window's; forced on the first)
        _recording(rec, first, True)
        tokens = answer(ref, sample, steps)
        _recording(rec, first, False)
        if ref.logits_out:  # the generation's own logits: teacher forcing on its answer, up to its last token
            expected.append((tokens, tokens[:len(ref.logits_out) - 1], np.stack(ref.logits_out)))
        else:
            expected.append((tokens, tokens, forced_logits(ref, sample, tokens)))
    graph_feeds = {part: r.runs() for part, r in rec.items()}  # per graph: (recorded inputs, fp32 outputs)
    del ref, rec
    # the fp32 engines' memory handed back before the quantized package loads: PaliGemma-3B's openvino fp16
    # export was killed here, the float32 decoder's 12 GiB still held as the float16 one compiled (2026-12-06)
    release_freed_memory()
    # the quantized graphs' outputs for the same inputs, kept as its pipeline makes them (not run twice)
    quant = _pipeline(stage, quantized, quant_files, dict.fromkeys(graph_feeds, _with_outputs))
    rows = []
    for sample, (tokens, forced, a) in zip(tqdm(calib.held_out, desc="measure", unit="sample", disable=not progress),
                                           expected):
        b = forced_logits(quant, sample, forced)
        # greedy generation would make the forced tokens' own steps while it agrees with them: whether it gives
        # the fp32 answer is read off the forced rows, not generated again (speech: generated, by its windows)
        rows.append((tokens == (quant.greedy_along(b) if sample.audio is None else answer(quant, sample, steps)),
                     a, b))
    cases = {}
    for part, runs in graph_feeds.items():
        seen = {_digest(feeds): out for feeds, out in quant.graphs[part].runs()}
        cases[part] = [(want, seen.get(_digest(feeds)) or quant.graphs[part].graph.run(feeds))
                       for feeds, want in runs]
    return rows, cases


def _compare_by_layers(stage, manifest, quantized, fp32_files, quant_files, parts, calib, steps, progress):
    """The quantized package first (greedy, its own logits kept), then the fp32 one forced along its answers with
    the decoder deferred and replayed by layers. Returns what _compare does."""
    quant = _pipeline(stage, quantized, quant_files, dict.fromkeys(parts, _with_outputs))
    answers = []  # per sample: quantized greedy tokens, the tokens forced, the quantized logits along them
    for sample in tqdm(calib.held_out, desc="measure", unit="sample", disable=not progress):
        quant.logits_out = []
        tokens = answer(quant, sample, steps)
        answers.append((tokens, tokens[:len(quant.logits_out) - 1], np.stack(quant.logits_out)))
    quant_runs = {part: {_digest(feeds): out for feeds, out in quant.graphs[part].runs()} for part in parts}
    del quant
    release_freed_memory()  # the quantized engines' memory back before the fp32 side's
    deferred = layered.Deferred(manifest)
    ref, rec, first = _fp32_side(stage, manifest, fp32_files, parts, calib, progress, ready={"decoder": deferred})
    for sample, (_, forced, _) in zip(tqdm(calib.held_out, desc="measure fp32", unit="sample",
                                           disable=not progress), answers):
        deferred.begin()
        _recording(rec, first, True)
        forced_logits(ref, sample, forced)
        _recording(rec, first, False)
    _let_go(ref, list(rec))  # (ref kept for greedy_along)
    cases = {part: [] for part in parts}
    load = _loader(stage, quantized)
    for part, r in rec.items():
        graph = None
        for feeds, want in r.runs():
            got = quant_runs[part].get(_digest(feeds))
            if got is None:  # inputs of the fp32 side's own making (a projector's: the fp32 vision encoder's)
                graph = load(quant_files[part]) if graph is None else graph
                got = graph.run(feeds)
            cases[part].append((want, got))
        del graph
    logits = [[None] * len(steps_) for steps_ in deferred.sequences]

    def take(s, t, out):
        if "logits" in out:
            logits[s][t] = out["logits"][0, -1]

    _replay(stage, manifest, fp32_files["decoder"], deferred.sequences, take, "measure fp32 decoder by layers",
            progress)
    rows = []
    for (tokens, _, b), got in zip(answers, logits):
        a = np.stack(got)
        rows.append((tokens == ref.greedy_along(a), a, b))
    return rows, cases
