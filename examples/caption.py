"""Answer a prompt about an image with an exported package, streaming the answer.

    python examples/caption.py PACKAGE_DIR examples/images/shapes.png "caption"
"""

import sys

import mmedge


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    package, image, prompt = sys.argv[1:]
    pipe = mmedge.Pipeline.load(package)
    for piece in pipe.stream(image, prompt, max_new_tokens=32):
        print(piece, end="", flush=True)
    print(flush=True)
    t = pipe.timings
    print(
        f"[{t.prompt_tokens} prompt tokens, {t.new_tokens} new; vision {t.vision * 1e3:.0f} ms, "
        f"prefill {t.prefill * 1e3:.0f} ms, decode {len(t.steps) / max(t.decode, 1e-9):.1f} tok/s]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
