"""Quantize an embedding package's (CLIP, SigLIP) two encoders, calibrated through the runtime's Embedder, and
measure the result against fp32.

Calibration: the calibration set's images through the vision encoder, and texts through the text encoder: the
label prompts of the task the checkpoint was trained on (the shapes demo: every zero-shot text), else the
package's template over PHOTO_LABELS (what the bundled photographs show) plus the set's own prompts when they
are captions (a JSONL set). Each graph is then quantized by the target's own quantize_graph, as a VLM's
vision encoder is (ONNX Runtime: static INT8 QDQ; OpenVINO: nncf.quantize; TensorRT: symmetric INT8 Q/DQ with
fp16 elsewhere). Measured on the held-out images and on every text: the cosine of each embedding with its
fp32 one (mean and worst), and the share of held-out images whose most similar text is the same.
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mmedge.calibration.data import CalibrationSet
from mmedge.calibration.package import QuantOptions, Recorder, graph_bytes, quiet
from mmedge.calibration.plan import describe
from mmedge.errors import ExportError, first_line
from mmedge.manifest import Manifest

# what scikit-image's bundled photographs (the builtin calibration set) show, and everyday objects besides
PHOTO_LABELS = ("astronaut", "cat", "cup of coffee", "rocket", "motorcycle", "galaxy", "retina", "microscope slide",
                "brick wall", "gravel", "grass", "coins", "camera", "moon", "page of text", "horse", "cell", "clock",
                "logo", "dog", "car", "person", "tree", "chair", "bottle", "robot", "door", "keyboard")


def calibration_texts(calib: CalibrationSet, template: str) -> list[str]:
    """The texts the text encoder is calibrated and measured on (see the module's doc)."""
    if calib.source.startswith("builtin (shapes"):
        from mmedge.tasks import shapes

        texts = [t.format(label) for t, labels in shapes.ZERO_SHOT.values() for label in labels]
        return texts + sorted({s.answer for s in calib.calibrate + calib.held_out if s.answer and " " in s.answer})
    texts = [template.format(label) for label in PHOTO_LABELS]
    if calib.source.endswith((".jsonl", ".json")):
        texts += [s.prompt for s in calib.calibrate if s.prompt]
    return list(dict.fromkeys(texts))


def _embedder(stage: Path, manifest: Manifest, files: dict[str, Path], record: bool = False):
    from mmedge.runtimes.backends import get_backend
    from mmedge.runtimes.embedder import Embedder
    from tokenizers import Tokenizer

    target = importlib.import_module(f"mmedge.calibration.{manifest.target}")
    engine = get_backend(getattr(target, "BACKEND", manifest.target), model_cache=False)
    graphs = {part: engine.load(path) for part, path in files.items()}
    if record:
        graphs = {part: Recorder(graph) for part, graph in graphs.items()}
    return Embedder(stage, manifest, graphs, Tokenizer.from_file(str(stage / manifest.tokenizer)))


def quantize_package(stage: Path, manifest: Manifest, plan: dict[str, str], calib: CalibrationSet,
                     options: QuantOptions, progress: bool = True) -> dict:
    """Replace the staged fp32 encoders by their quantized versions; returns the report stored in the manifest."""
    target = importlib.import_module(f"mmedge.calibration.{manifest.target}")
    parts = list(manifest.graphs)
    fp32 = {part: stage / manifest.graphs[part].file for part in parts}
    texts = calibration_texts(calib, manifest.embedding.template)
    calibrated = any(p == "int8" for p in plan.values())
    work = stage / ".quantize"
    work.mkdir()
    try:
        feeds = {part: [] for part in parts}
        if calibrated:
            emb = _embedder(stage, manifest, fp32, record=True)
            batch = manifest.embedding.max_batch
            images = [s.image for s in calib.calibrate]
            for start in tqdm(range(0, len(images), batch), desc="calibrate", unit="batch", disable=not progress):
                emb.embed_images(images[start:start + batch])
            emb.embed_texts(texts)
            feeds = {part: emb.graphs[part].feeds for part in parts}
            del emb
        graphs = {}
        for part in tqdm([p for p in parts if plan[p] != "fp32"], desc="quantize", unit="graph", disable=not progress):
            try:
                with quiet():
                    graphs[part] = target.quantize_graph(part, plan[part], fp32[part], work / fp32[part].name,
                                                         options, feeds, None)
            except ExportError:
                raise
            except Exception as exc:  # the quantization libraries raise whatever they meet
                raise ExportError(f"quantizing {part} to {plan[part]} failed: {first_line(exc)}") from exc
        quant = {p: work / fp32[p].name if plan[p] != "fp32" else fp32[p] for p in parts}
        for part in parts:
            size = graph_bytes(target, fp32[part])
            graphs[part] = {"precision": plan[part], **graphs.get(part, {}), "bytes_fp32": size,
                            "bytes": graph_bytes(target, quant[part]) if plan[part] != "fp32" else size}
        measured = measure(stage, manifest, fp32, quant, [s.image for s in calib.held_out], texts)
        for part in parts:
            if plan[part] == "fp32":
                continue
            for old in target.graph_files(fp32[part]):
                old.unlink(missing_ok=True)
            for new in target.graph_files(quant[part]):
                if new.exists():
                    new.replace(stage / new.name)
            manifest.graphs[part].precision = plan[part]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"plan": dict(plan), "name": describe(plan), "options": asdict(options),
            "calibration": {**calib.describe(), "texts": len(texts), "used": calibrated}, "graphs": graphs,
            "bytes_fp32": sum(g["bytes_fp32"] for g in graphs.values()),
            "bytes": sum(g["bytes"] for g in graphs.values()), **measured}


def measure(stage: Path, manifest: Manifest, fp32: dict, quant: dict, images: list, texts: list[str]) -> dict:
    """Quantized vs fp32 embeddings of the held-out images and of `texts`, and top-1 text agreement."""
    ref = _embedder(stage, manifest, fp32)
    a_img, a_txt = ref.embed_images(images), ref.embed_texts(texts)
    del ref
    got = _embedder(stage, manifest, quant)
    b_img, b_txt = got.embed_images(images), got.embed_texts(texts)

    def cosines(a, b):
        c = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}

    same = (a_img @ a_txt.T).argmax(-1) == (b_img @ b_txt.T).argmax(-1)
    return {"held_out_images": len(images), "texts": len(texts),
            "embedding_cosine": {"vision_encoder": cosines(a_img, b_img), "text_encoder": cosines(a_txt, b_txt)},
            "top1_agreement": float(same.mean())}
