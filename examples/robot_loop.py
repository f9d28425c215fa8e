"""A robot's perception loop: one fixed question about the newest camera frame, at a target rate.

    python examples/robot_loop.py PACKAGE --video clip.mp4 --question "how many circles?" --rate 2
    python examples/robot_loop.py PACKAGE --camera 0 --question "is there a person?" --rate 5

Frames come from OpenCV (`pip install opencv-python-headless`): a camera index, or a video file played at its own
frame rate as a camera would deliver it. A capture thread keeps only the newest frame: when the model is slower
than the camera, the frames in between are dropped (counted), never queued, so the answer is always about the
latest view and memory stays flat. The question is the same every time, so each call reuses the prompt's text
before the image from the KV cache, and a frame identical to an earlier one takes its image embeddings from the
image cache. Prints one line per answer, then latency p50/p95 and the frame counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import cv2
import numpy as np

import mmedge


class LatestFrame:
    """A capture thread that holds only the newest frame (RGB), its index, and counts of what it dropped."""

    def __init__(self, source: str | int):
        self.cap = cv2.VideoCapture(source)
        if not self.cap.isOpened():
            raise SystemExit(f"cannot open {source!r} (a camera index or a video file OpenCV can read)")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.period = 1 / fps if isinstance(source, str) and fps > 0 else 0.0  # a file plays in real time
        self.lock = threading.Lock()
        self.frame: np.ndarray | None = None
        self.index = -1  # of the frame held
        self.captured = 0
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self.ended.is_set():
            ok, bgr = self.cap.read()
            if not ok:
                break
            if self.period:
                time.sleep(max(0.0, start + self.captured * self.period - time.perf_counter()))
            with self.lock:
                self.frame, self.index = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.captured
            self.captured += 1
        self.ended.set()
        self.cap.release()

    def newest(self, after: int) -> tuple[int, np.ndarray | None]:
        """The newest frame if it is newer than frame `after`, else (after, None)."""
        with self.lock:
            return (self.index, self.frame) if self.index > after else (after, None)

    def stop(self) -> None:
        self.ended.set()
        self.thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a video file, played at its frame rate")
    source.add_argument("--camera", type=int, help="a camera index (0: the first camera)")
    p.add_argument("--question", default="caption")
    p.add_argument("--rate", type=float, default=2.0, help="questions a second at most (default 2)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after answering this many frames (0: until the "
                   "video ends or Ctrl-C)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)

    pipe = mmedge.Pipeline.load(args.package)
    camera = LatestFrame(args.video if args.video is not None else args.camera)
    latencies, reused, seen, answered = [], [], -1, 0
    try:
        while not args.max_frames or answered < args.max_frames:
            tick = time.perf_counter()
            seen, frame = camera.newest(seen)
            if frame is None:
                if camera.ended.is_set() and camera.newest(seen)[1] is None:
                    break
                time.sleep(0.005)
                continue
            answer = pipe.generate(frame, args.question, max_new_tokens=args.max_new_tokens)
            latency = time.perf_counter() - tick
            latencies.append(latency)
            reused.append(pipe.timings.reused_tokens)
            answered += 1
            print(f"frame {seen:>5}: {answer!r} ({latency * 1e3:.0f} ms, {pipe.timings.reused_tokens} of "
                  f"{pipe.timings.prompt_tokens} prompt tokens reused)", flush=True)
            time.sleep(max(0.0, tick + 1 / args.rate - time.perf_counter()))
    except KeyboardInterrupt:
        pass
    finally:
        camera.stop()
    if not latencies:
        print("no frame answered", file=sys.stderr)
        return 1
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    print(f"answered {answered} frames of {camera.captured} captured ({camera.captured - answered} dropped); "
          f"latency p50 {statistics.median(lat) * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms; "
          f"prompt tokens reused per call after the first: {statistics.median(reused[1:] or [0]):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
