"""Time to first token of a conversation's follow-up questions, against asking each one fresh with the whole history.

    python tools/bench_chat.py PACKAGE --image photo.jpg [--turns 4] [--new-tokens 16] [--runs 3] [--threads 2]

A conversation about one image (turn 1 shows it, the later turns ask about it); each turn's answer is
--new-tokens greedy tokens. For every turn it prints the prompt's tokens, how many of them the KV cache held
from the turns before, and the time to the first token (preprocessing, vision encoder, projector, prefill):
  chat    pipe.chat(): the earlier turns' keys and values kept; the image's embeddings from the image cache
  fresh   the same whole history through a Pipeline that has seen nothing (what a stateless runtime does:
          the image encoded again, every token of the history computed again)
and the same for the robot loop: one fixed question about new frames (the text before the image reused), and
a new question about the same frame (the image reused). Median over --runs; one Pipeline each, loaded once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

QUESTIONS = ["Describe the image.", "What is the largest object?", "What color is it?", "Is there anything left of it?",
             "How many objects are there?", "Which one is nearest the top?"]


def ttft(pipe) -> float:
    t = pipe.timings
    return t.preprocess + t.vision + t.projector + t.prefill


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", type=Path)
    p.add_argument("--image", required=True)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from PIL import Image

    from mmedge.runtimes import Pipeline

    pipe = Pipeline.load(args.package, threads=args.threads)
    opts = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for run in range(args.runs):
        pipe.media.clear()  # each run a conversation about a photo not seen before
        pipe._held = None
        chat = pipe.chat()
        for turn in range(args.turns):
            question = QUESTIONS[turn % len(QUESTIONS)]
            image = args.image if turn == 0 else None
            history = chat.messages() + [{"role": "user", "content": [{"type": "image"}] * (turn == 0)
                                          + [{"type": "text", "text": question}]}]
            chat.ask(image, question, **opts)
            t_chat, n, reused = ttft(pipe), pipe.timings.prompt_tokens, pipe.timings.reused_tokens
            fresh = Pipeline.load(args.package, threads=args.threads, verify=False)
            text = fresh.codec._apply_template(history)
            fresh.generate([args.image], text, raw_prompt=True, **opts)
            assert fresh.timings.prompt_tokens == n, (fresh.timings.prompt_tokens, n)
            rows.append(("chat", turn + 1, n, reused, t_chat, ttft(fresh)))
    print(f"package {args.package} ({pipe.manifest.model_type}, {pipe.manifest.target}); {args.runs} runs, median ms")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'chat TTFT':>10} {'fresh TTFT':>11} {'speedup':>8}")
    for turn in range(1, args.turns + 1):
        mine = [r for r in rows if r[1] == turn]
        a = statistics.median(r[4] for r in mine) * 1e3
        b = statistics.median(r[5] for r in mine) * 1e3
        print(f"{turn:>4} {mine[0][2]:>7} {mine[0][3]:>7} {a:>10.1f} {b:>11.1f} {b / a:>7.2f}x")

    base = Image.open(args.image).convert("RGB")
    frames = [Image.fromarray(np.roll(np.asarray(base), 7 * i, axis=1)) for i in range(args.runs + 1)]
    loop, same = [], []
    pipe.generate(frames[0], QUESTIONS[0], **opts)
    for frame in frames[1:]:
        pipe.generate(frame, QUESTIONS[0], **opts)
        loop.append((ttft(pipe), pipe.timings.reused_tokens, pipe.timings.prompt_tokens))
        pipe.generate(frame, QUESTIONS[1], **opts)
        same.append((ttft(pipe), pipe.timings.reused_tokens, pipe.timings.prompt_tokens))
    cold = Pipeline.load(args.package, threads=args.threads, verify=False)
    cold_times = []
    for frame in frames[1:]:
        cold.media.clear()
        cold._held = None
        cold.generate(frame, QUESTIONS[1], **opts)
        cold_times.append(ttft(cold))
    print("robot loop (median ms):")
    for name, data in (("same question, new frame", loop), ("new question, same frame", same)):
        print(f"  {name}: TTFT {statistics.median(d[0] for d in data) * 1e3:.1f} ms, "
              f"{data[0][1]} of {data[0][2]} prompt tokens reused")
    print(f"  nothing reused: TTFT {statistics.median(cold_times) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
