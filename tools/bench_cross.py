"""How a cross-attention decoder takes its images' keys and values, measured on this machine.

    python tools/bench_cross.py [--work /tmp/bench-cross] [--tokens 32] [--runs 5] [--threads 0]

The model is `mllama-cross-shaped` (Llama 3.2 Vision's text geometry at width 1024: 8 layers with
cross-attention in 3 and 7, 8 KV heads of 128; 4 tiles of 448 px, so one image is 4100 positions; random
weights, built locally). Its fp32 packages for ONNX Runtime (keys and values fed as inputs every step) and
OpenVINO (KV cache as state and as buffer; the image keys and values fed as inputs) decode --tokens tokens
after a prompt with one image, and after a text-only prompt (one empty position) for comparison; OpenVINO's
graphs run with their inputs read in place (`share_inputs`, the default) and, for comparison, copied into the
request each call as before. Prints median decode ms per token over --runs runs, the variants taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

MODEL = "mllama-cross-shaped"
PACKAGES = {"onnxruntime": dict(target="onnxruntime"), "openvino": dict(target="openvino"),
            "openvino-buffer": dict(target="openvino", kv_cache="buffer")}


def packages(work: Path) -> dict[str, Path]:
    from mmedge.exporters import tiny
    from mmedge.exporters.export import ExportOptions, export

    checkpoint = tiny.materialize(MODEL)
    out = {}
    for name, options in PACKAGES.items():
        path = work / name
        if not (path / "mmedge.json").exists():
            export(ExportOptions(model=str(checkpoint), output=path, overwrite=True, **options))
        out[name] = path
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-cross"))
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)

    from mmedge.runtimes import Pipeline

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (896, 896, 3), dtype=np.uint8))
    variants = []  # (label, pipe, image or None, share inputs)
    for name, path in packages(args.work).items():
        for share in ((True, False) if name.startswith("openvino") else (None,)):
            # a Pipeline each (a request that has shared an array cannot go back to copying into it)
            pipe = Pipeline.load(path, threads=args.threads, image_cache_mb=1024)  # the image encoded once
            if share is not None:
                for graph in pipe.graphs.values():
                    graph.share_inputs = share
            for picture in (image, None):
                label = f"{name}{'' if share is None else ' shared' if share else ' copied'}"
                variants.append((label, pipe, picture, share))
    times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    positions = {}
    for run in range(args.runs + 1):  # variants take turns; run 0 warms up
        for i, (label, pipe, picture, share) in enumerate(variants):
            n = sum(1 for _ in pipe.generate_ids(picture, "describe the image", max_new_tokens=args.tokens,
                                                 ignore_eos=True))
            if run:
                times[i].append(pipe.timings.decode / (n - 1) * 1e3)
            seq = pipe._prepare(picture, "describe the image", pipe.options())
            pipe._prompt_embeddings(seq)
            positions[i] = seq.cross[pipe.cross_names[0]].shape[2]
            mb = sum(a.nbytes for a in seq.cross.values()) / 2**20
            positions[i] = (positions[i], mb)
    print(f"{'package':<28}{'prompt':<11}{'image positions':>16}{'image K/V MB':>14}{'decode ms/token':>17}")
    for i, (label, _, picture, _) in enumerate(variants):
        count, mb = positions[i]
        print(f"{label:<28}{'image' if picture is not None else 'text-only':<11}{count:>16}{mb:>14.1f}"
              f"{statistics.median(times[i]):>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
