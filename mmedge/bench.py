"""`mmedge bench`: where the time and memory of one generate() go, median and spread over runs.

Each run answers the same prompt about the same image with EOS banned, so
every run decodes exactly `new_tokens` tokens. Stages are timed inside the
runtime (runtimes.batch.Timings, as pipe.timings); time to first token and end-to-end time
are taken around the generator, so they include everything a caller waits for.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# metric -> (label, unit); the order of the table
METRICS = {
    "preprocess_ms": ("preprocess (image + prompt)", "ms"),
    "vision_encoder_ms": ("vision encoder", "ms"),
    "projector_ms": ("projector", "ms"),
    "encoder_ms": ("encoder (over the prompt)", "ms"),  # an encoder-decoder's only
    "prefill_ms": ("prefill (decoder over the prompt)", "ms"),
    "ttft_ms": ("time to first token", "ms"),
    "decode_tok_s": ("decode", "tok/s"),
    "e2e_ms": ("end to end", "ms"),
}


def default_image():
    """A fixed scene from the shapes task: no file needed, the same pixels on every machine."""
    from mmedge.tasks import shapes

    return next(shapes.examples(1, seed=7)).image


def bench(package: str | Path, image: Any = None, prompt: str = "caption", new_tokens: int = 64, runs: int = 5,
          warmup: int = 1, threads: int = 0, backend: str | None = None, device: str | None = None,
          inference_precision: str | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from mmedge.errors import InputError
    from mmedge.runtimes import Pipeline

    for flag, value, low in (("--new-tokens", new_tokens, 2), ("--runs", runs, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise InputError(f"image not found: {image}")
    start = time.perf_counter()
    pipe = Pipeline.load(package, backend=backend, threads=threads, device=device,
                         inference_precision=inference_precision, image_cache_mb=0)
    pipe.reuse_prefix = False  # every run computes the whole of one question, as its first asking does
    load_ms = (time.perf_counter() - start) * 1e3
    image = default_image() if image is None else image
    samples: dict[str, list[float]] = {k: [] for k in METRICS if k != "encoder_ms" or pipe.encoder}
    bar = tqdm(total=warmup + runs, desc="bench", unit="run", disable=not progress, file=sys.stderr)
    try:  # the bar closed before any error line, which would otherwise be written on it
        for i in range(warmup + runs):
            start = time.perf_counter()
            tokens = pipe.generate_ids(image, prompt, max_new_tokens=new_tokens, ignore_eos=True)
            next(tokens)
            ttft = time.perf_counter() - start
            n = 1 + sum(1 for _ in tokens)
            e2e = time.perf_counter() - start
            bar.update()
            if n < new_tokens:  # known from the first run, warm-up or not
                raise InputError(f"the context filled after {n} new tokens; pass a smaller --new-tokens")
            if i < warmup:
                continue
            t = pipe.timings
            got = dict(preprocess_ms=t.preprocess * 1e3, vision_encoder_ms=t.vision * 1e3,
                       projector_ms=t.projector * 1e3, prefill_ms=t.prefill * 1e3, ttft_ms=ttft * 1e3,
                       decode_tok_s=(n - 1) / t.decode, e2e_ms=e2e * 1e3,
                       **({"encoder_ms": t.encoder * 1e3} if pipe.encoder else {}))  # an encoder-decoder's encoder
            for k, v in got.items():
                samples[k].append(v)
    finally:
        bar.close()
    manifest = pipe.manifest
    return {
        "package": str(package),
        "target": manifest.target,
        "backend": backend or manifest.target,
        "precisions": {name: g.precision for name, g in manifest.graphs.items()},
        "kv_cache": manifest.kv_cache.storage,
        "prompt": prompt,
        "prompt_tokens": pipe.timings.prompt_tokens,
        "new_tokens": new_tokens,
        "runs": runs,
        "threads": threads,
        "load_ms": load_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: kB; the whole process
        "package_mb": sum(f.bytes for f in manifest.files.values()) / 1e6,
        "metrics": {k: _summary(v) for k, v in samples.items()},
        "samples": samples,  # per metric, one value per timed run, in run order
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(result: dict) -> str:
    precisions = "/".join(sorted(set(result["precisions"].values())))
    lines = [
        f"{result['package']}: {result['target']} ({result['backend']}), {precisions}, KV cache {result['kv_cache']}; "
        f"{result['prompt_tokens']} prompt tokens, {result['new_tokens']} new tokens, "
        f"median of {result['runs']} runs (min - max)",
        f"{'':<40}{'median':>10}{'min':>10}{'max':>10}",
    ]
    for key, m in result["metrics"].items():
        label, unit = METRICS[key]
        lines.append(f"{label + ' (' + unit + ')':<40}{m['median']:>10.2f}{m['min']:>10.2f}{m['max']:>10.2f}")
    lines.append(f"{'load (ms)':<40}{result['load_ms']:>10.1f}")
    lines.append(f"{'peak RSS (MB)':<40}{result['peak_rss_mb']:>10.1f}")
    lines.append(f"{'package on disk (MB)':<40}{result['package_mb']:>10.1f}")
    return "\n".join(lines)
