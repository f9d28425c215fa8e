"""Decode speed of packages on this machine: prefill time and tokens/s, median over a few examples.

    python tools/decode_speed.py PKG [PKG ...] [--tokens 32] [--runs 10] [--threads 0]

Each run answers "caption" about a shapes-task image with EOS banned, so every
run decodes exactly --tokens tokens; the packages take turns on each image.
Prints one line per package.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from mmedge.runtimes import Pipeline
from mmedge.tasks import shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("packages", nargs="+")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    images = [ex.image for ex in shapes.examples(args.runs + 1, seed=4242)]
    pipes = [Pipeline.load(path, threads=args.threads) for path in args.packages]
    prefill: list[list[float]] = [[] for _ in pipes]
    speed: list[list[float]] = [[] for _ in pipes]
    for i, image in enumerate(images):  # packages take turns, so drifting machine load hits all alike
        for pipe, pre, spd in zip(pipes, prefill, speed):
            n = sum(1 for _ in pipe.generate_ids(image, "caption", max_new_tokens=args.tokens, ignore_eos=True))
            if i == 0:
                continue  # warm-up
            pre.append(pipe.timings.prefill * 1e3)
            spd.append((n - 1) / pipe.timings.decode)
    print(f"{'package':<40}{'target':<13}{'precision':<11}{'kv cache':<10}{'prefill ms':>11}{'decode tok/s':>14}")
    for path, pipe, pre, spd in zip(args.packages, pipes, prefill, speed):
        m = pipe.manifest
        precisions = sorted({g.precision for g in m.graphs.values()})
        print(f"{path:<40}{m.target:<13}{'/'.join(precisions):<11}{m.kv_cache.storage:<10}"
              f"{statistics.median(pre):>11.2f}{statistics.median(spd):>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
