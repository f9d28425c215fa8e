"""Open-vocabulary recognition with a CLIP or SigLIP package: "is this a cup?" on every image or video frame.

    python examples/zero_shot.py PACKAGE --labels cup,bottle,keyboard photo1.jpg photo2.jpg
    python examples/zero_shot.py PACKAGE --labels person,empty --video clip.mp4 --every 10

The labels are embedded once (the Embedder keeps their embeddings), so each image costs one vision-encoder
call. Prints the best label, its probability and the time per image; with --video (OpenCV), every Nth frame.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mmedge


def frames(video: str, every: int):
    """(name, RGB array) of every `every`-th frame of a video file, read with OpenCV."""
    import cv2

    cap = cv2.VideoCapture(video)
    if not cap.isOpened():
        raise SystemExit(f"cannot open {video!r} (a video file OpenCV can read)")
    index = 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if index % every == 0:
            yield f"frame {index}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        index += 1
    cap.release()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("images", nargs="*", help="image files")
    ap.add_argument("--labels", required=True, help="comma-separated labels")
    ap.add_argument("--template", help='how a label is written, e.g. "a photo of a {}." (default: the package\'s)')
    ap.add_argument("--video", help="a video file instead of images")
    ap.add_argument("--every", type=int, default=1, help="with --video: every Nth frame (default 1)")
    args = ap.parse_intermixed_args(argv)  # images before or after the options
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    emb = mmedge.Embedder.load(args.package)
    inputs = frames(args.video, args.every) if args.video else ((path, path) for path in args.images)
    times = []
    for name, image in inputs:
        start = time.perf_counter()
        (label, p), *_ = emb.classify(image, labels, template=args.template)
        times.append(time.perf_counter() - start)
        print(f"{name}: {label} ({p:.2f}), {times[-1] * 1e3:.1f} ms")
    if times:
        print(f"{len(times)} images, {statistics.median(times) * 1e3:.1f} ms each (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
