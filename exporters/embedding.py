"""Export of a dual encoder (package kind "embedding": CLIP, SigLIP): two graphs, no decoder.

    vision_encoder  pixel_values [B, 3, H, W] -> image_embeds [B, dim]
    text_encoder    input_ids [B, S] -> text_embeds [B, dim]

Both take a batch; the static-shape targets bound it at EmbeddingSpec.max_batch (TensorRT's profiles,
Core ML's flexible shapes) and the text length at the package's text_length. The graphs go through the
targets' own export and verification, as a VLM's do; quantization is calibration/embedding.py.
"""

from __future__ import annotations

import torch

from mmedge.exporters.family import EncoderParts
from mmedge.exporters.graphs import GraphJob

# (batch, text length) traced, then checked: all different, within a max_batch of 8 and the shortest text length
TRACE = (3, 7)
CHECKS = ((1, 5), (5, 2), (2, 9))


def build_jobs(parts: EncoderParts, max_batch: int, seed: int = 0) -> list[GraphJob]:
    """The vision and text encoders' jobs, traced and checked at batch and text sizes of their own."""
    g = torch.Generator().manual_seed(seed)
    h, w = parts.image_size

    def pixels(b):
        return (torch.rand(b, 3, h, w, generator=g) * 2 - 1,)

    def ids(b, s):
        s = min(s, parts.text_length)
        x = torch.randint(0, parts.vocab_size, (b, s), generator=g)
        if parts.eos_id is not None:  # the token a CLIP text tower pools at: once or more in some rows, not in one
            x[x == parts.eos_id] = (parts.eos_id + 1) % parts.vocab_size
            for row in range(b - 1):
                x[row, int(torch.randint(1, s + 1, (1,), generator=g)) - 1:] = parts.eos_id
        return (x,)

    vision = GraphJob("vision_encoder", parts.vision_encoder, ["pixel_values"], ["image_embeds"],
                      {"pixel_values": {0: "batch"}}, pixels(TRACE[0]), [pixels(b) for b, _ in CHECKS],
                      output_axes={"image_embeds": {0: "batch"}})
    text = GraphJob("text_encoder", parts.text_encoder, ["input_ids"], ["text_embeds"],
                    {"input_ids": {0: "batch", 1: "seq"}}, ids(*TRACE), [ids(b, s) for b, s in CHECKS],
                    output_axes={"text_embeds": {0: "batch"}})
    for job in (vision, text):
        job.bounds = {"batch": max_batch, "seq": parts.text_length}
    return [vision, text]


def check_options(opts) -> None:
    """Export options a dual encoder has no use for are refused, not ignored."""
    from mmedge.errors import ExportError

    unused = [flag for flag, value in (("--max-context", opts.max_context), ("--max-pixels", opts.max_pixels),
                                       ("--min-pixels", opts.min_pixels), ("--kv-cache", opts.kv_cache))
              if value is not None]
    if opts.int4_ratio != 1.0:
        unused.append("--int4-ratio")
    if unused:
        raise ExportError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for generative models; an "
                          "embedding model (CLIP, SigLIP) has no decoder")


def export_package(opts, checkpoint, family, model, tokenizer, target, plan: dict[str, str], calib=None):
    """Export dual encoder `model` to a package at opts.output (staged, then renamed); returns its manifest."""
    import logging
    import time
    from pathlib import Path

    from mmedge import __version__
    from mmedge.exporters.export import export_jobs, finish_package, source_info
    from mmedge.exporters.package import staged_package
    from mmedge.manifest import Manifest

    check_options(opts)
    parts = family.split(model)
    desc = family.describe(model, checkpoint, tokenizer)
    started = time.perf_counter()
    with staged_package(Path(opts.output), opts.overwrite) as stage:
        jobs = build_jobs(parts, desc.embedding.max_batch)
        graphs, report = export_jobs(target, jobs, plan, stage, opts)
        getattr(target, "finish", lambda stage: None)(stage)
        tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
        manifest = Manifest(family=family.__name__.rsplit(".", 1)[-1], model_type=model.config.model_type,
                            target=opts.target, graphs=graphs, preprocess=desc.preprocess, kind="embedding",
                            embedding=desc.embedding, source=source_info(opts, checkpoint),
                            verification={"reference": "pytorch fp32", "graphs": report}, mmedge_version=__version__)
        if set(plan.values()) != {"fp32"}:
            if hasattr(target, "compress"):  # the target compresses its own converted graphs (Core ML)
                manifest.quantization = target.compress(stage, manifest, plan, opts, jobs, calib)
            else:
                from mmedge.calibration.embedding import quantize_package
                from mmedge.calibration.package import QuantOptions

                del model, parts, jobs
                options = QuantOptions(calib_method=opts.calib_method)
                manifest.quantization = quantize_package(stage, manifest, plan, calib, options, opts.progress)
        finish_package(target, stage, manifest, "embedding", embed_once)
    logging.getLogger(__name__).info("exported %s in %.1f s", opts.output, time.perf_counter() - started)
    return manifest


def embed_once(package, manifest) -> dict:
    """The finished package through the runtime's Embedder once (a sample image, two texts of different lengths,
    a batch of each): a package that cannot embed is not written."""
    import sys

    import numpy as np
    from PIL import Image

    from mmedge.errors import ExportError, first_line
    from mmedge.exporters.export import CHECK_BACKEND
    from mmedge.runtimes.embedder import Embedder

    if manifest.target == "coreml" and sys.platform != "darwin":
        return {"passed": None, "not_run": "Core ML runs models on macOS only"}
    backend = CHECK_BACKEND.get(manifest.target, manifest.target)
    ramp = np.linspace(0, 255, 96 * 64 * 3).reshape(64, 96, 3).astype(np.uint8)
    try:
        embedder = Embedder.load(package, backend=backend, verify=False, model_cache=False)
        images = embedder.embed_images([Image.fromarray(ramp), Image.fromarray(ramp[:, ::-1])])
        texts = embedder.embed_texts(["a photo", "a photo of two red circles and a blue square"])
    except Exception as exc:
        raise ExportError(f"the exported package cannot embed through the runtime ({first_line(exc)}); "
                          "nothing was written") from exc
    norms = np.linalg.norm(np.concatenate([images, texts]), axis=1)
    if images.shape != (2, manifest.embedding.dim) or texts.shape != (2, manifest.embedding.dim) \
            or not np.allclose(norms, 1.0, atol=1e-2):
        raise ExportError(f"the exported package embeds to shapes {images.shape} / {texts.shape} with norms "
                          f"{norms.round(3).tolist()}, not unit vectors of {manifest.embedding.dim}; nothing was written")
    return {"passed": True, "backend": backend, "dim": int(images.shape[1])}
