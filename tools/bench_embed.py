"""Images and texts per second of a CLIP ViT-B/16-shaped dual encoder, mmedge packages against transformers.

    python tools/bench_embed.py [--prepare] [--work /tmp/bench-embed] [--rounds 3] [--batch 8] [--threads 2]

The model is `clip-vit-b16-shaped` (openai/clip-vit-base-patch16's architecture, random weights from a fixed
seed, built locally). Rows:

    transformers     eager fp32 on PyTorch CPU: CLIPProcessor, then get_image_features / get_text_features
    mmedge           onnxruntime and openvino packages at fp32 and int8 (static INT8, calibrated on
                     scikit-image's photographs), through mmedge.Embedder (its own preprocessing and tokenizer)

Every row embeds the same 32 photographs and 32 label prompts in batches of --batch, preprocessing and
tokenizing included; the rows take turns --rounds times and each reports the median of its rounds. Writes the
table into docs/benchmarks.md as its section "## Embedding models" (replacing the one there; --out another
page) and prints it. `--prepare` only exports the packages (kept in --work).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_peers import write_section  # tools/, this script's folder, is on the path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "clip-vit-b16-shaped"
PACKAGES = [(t, q) for t in ("onnxruntime", "openvino") for q in ("fp32", "int8")]
N = 32  # images and texts a round

log = logging.getLogger("bench_embed")


def inputs():
    from PIL import Image
    from skimage import data

    from mmedge.calibration.data import SKIMAGE_PHOTOS
    from mmedge.calibration.embedding import PHOTO_LABELS

    folder = Path(data.__file__).parent
    photos = [Image.open(folder / name).convert("RGB") for name in SKIMAGE_PHOTOS if (folder / name).exists()]
    images = [photos[i % len(photos)] for i in range(N)]
    texts = [f"a photo of a {PHOTO_LABELS[i % len(PHOTO_LABELS)]}." for i in range(N)]
    return images, texts


def prepare(work: Path) -> dict[str, Path]:
    """The packages, exported once into `work` (kept across runs)."""
    out = {}
    for target, quant in PACKAGES:
        path = work / f"{MODEL}-{quant}-{target}"
        if not (path / "mmedge.json").exists():
            log.info("exporting %s", path.name)
            subprocess.run([sys.executable, "-m", "mmedge.cli", "export", "--model", MODEL, "--target", target,
                            "--quant", quant, "-o", str(path), "--overwrite"], check=True)
        out[f"mmedge {target} {quant}"] = path
    return out


def one_round(name: str, path: Path | None, batch: int, threads: int) -> dict:
    """images/s and texts/s of one row, in a process of its own (no engine's threads or caches shared)."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import bench_embed as b; " \
           f"b._measure({name!r}, {str(path) if path else None!r}, {batch}, {threads})"
    env = dict(os.environ, MMEDGE_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure(name: str, path: str | None, batch: int, threads: int) -> None:
    images, texts = inputs()
    if path is None:
        import torch
        from transformers import AutoProcessor

        from mmedge.exporters.checkpoint import resolve
        from mmedge.exporters.families import clip

        torch.set_num_threads(threads)
        ckpt = resolve(MODEL)
        model, processor = clip.load(ckpt), AutoProcessor.from_pretrained(ckpt)

        def embed_images(chunk):
            with torch.no_grad():
                model.get_image_features(**processor(images=chunk, return_tensors="pt"))

        def embed_texts(chunk):
            with torch.no_grad():
                model.get_text_features(**processor(text=chunk, padding=True, return_tensors="pt"))
    else:
        from mmedge.runtimes import Embedder

        embedder = Embedder.load(path, threads=threads)
        embed_images, embed_texts = embedder.embed_images, embedder.embed_texts
    out = {}
    for kind, fn, items in (("images", embed_images, images), ("texts", embed_texts, texts)):
        fn(items[:batch])  # warm-up
        started = time.perf_counter()
        for start in range(0, len(items), batch):
            fn(items[start:start + batch])
        out[kind] = len(items) / (time.perf_counter() - started)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-embed"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepare", action="store_true", help="only export the packages")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = {"transformers eager fp32": None, **prepare(args.work)}
    if args.prepare:
        return
    results: dict[str, list[dict]] = {name: [] for name in rows}
    for r in range(args.rounds):
        for name, path in rows.items():
            results[name].append(one_round(name, path, args.batch, args.threads))
            log.info("round %d %s: %s", r + 1, name, results[name][-1])
    base = {k: statistics.median(x[k] for x in results["transformers eager fp32"]) for k in ("images", "texts")}
    lines = [SECTION, "",
             f"`python tools/bench_embed.py`: {MODEL} (openai/clip-vit-base-patch16's architecture, random weights), "
             f"{N} photographs and {N} label prompts in batches of {args.batch}, preprocessing and tokenizing "
             f"included, {args.threads} threads, median of {args.rounds} rounds (rows in turn); "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores. Ratios against transformers "
             "eager fp32 in the same run.", "", "| row | images/s | texts/s |", "|---|---|---|"]
    for name in rows:
        med = {k: statistics.median(x[k] for x in results[name]) for k in ("images", "texts")}
        lines.append(f"| {name} | {med['images']:.1f} ({med['images'] / base['images']:.2f}x) | "
                     f"{med['texts']:.1f} ({med['texts'] / base['texts']:.2f}x) |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(args.out, SECTION, text)
    log.info("wrote %s", args.out)


SECTION = "## Embedding models"


if __name__ == "__main__":
    main()
