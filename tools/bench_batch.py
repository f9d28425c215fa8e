"""Throughput of generate_batch at several batch sizes against the same requests one generate() at a time.

    python tools/bench_batch.py PACKAGE [PACKAGE ...] --image photo.jpg [--sizes 1,2,4,8] [--new-tokens 32]
                                [--runs 3] [--threads 2]

B requests (B different frames: the image shifted sideways, one question) with --new-tokens greedy tokens
each (EOS suppressed, so every row runs to the end): wall time of one generate_batch call against B
generate() calls in a row, median over --runs, as new tokens a second. The image cache and prefix reuse
are off in both, so each request computes its whole prompt and image either way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("packages", type=Path, nargs="+")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--sizes", default="1,2,4,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from PIL import Image

    from mmedge.runtimes import Pipeline

    sizes = [int(s) for s in args.sizes.split(",")]
    base = np.asarray(Image.open(args.image).convert("RGB"))
    frames = [Image.fromarray(np.roll(base, 5 * i, axis=1)) for i in range(max(sizes))]
    opts = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    for package in args.packages:
        pipe = Pipeline.load(package, threads=args.threads, image_cache_mb=0)
        pipe.reuse_prefix = False
        pipe.generate_batch([(frames[0], args.prompt)] * 2, **opts)  # warm up
        print(f"{package} ({pipe.manifest.model_type}, {pipe.manifest.target}, {pipe.manifest.kv_cache.storage} "
              f"cache): new tokens/s, median of {args.runs}")
        print(f"{'B':>3} {'batched':>9} {'one by one':>11} {'ratio':>6}")
        for b in sizes:
            if pipe.max_batch is not None and b > pipe.max_batch:
                continue
            requests = [(frames[i], args.prompt) for i in range(b)]
            batched, single = [], []
            for _ in range(args.runs):
                start = time.perf_counter()
                pipe.generate_batch(requests, **opts)
                batched.append(time.perf_counter() - start)
                start = time.perf_counter()
                for image, prompt in requests:
                    pipe.generate(image, prompt, **opts)
                single.append(time.perf_counter() - start)
            tokens = b * args.new_tokens
            a, s = tokens / statistics.median(batched), tokens / statistics.median(single)
            print(f"{b:>3} {a:>9.1f} {s:>11.1f} {a / s:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
