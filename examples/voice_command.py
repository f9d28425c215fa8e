"""Spoken commands for a robot with a Whisper package: each recording transcribed, then matched to an action.

    python examples/voice_command.py PACKAGE command1.wav command2.wav --language en
    python examples/voice_command.py PACKAGE recordings/

Each recording (WAV, any rate; FLAC/MP3 with PyAV) is transcribed on the device; the first command word found in
the text picks the action. Prints the text, the action and the time per recording.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import mmedge

# command word -> the robot's action (replace with calls into your robot's API)
ACTIONS = {"forward": "drive forward", "back": "drive backward", "left": "turn left", "right": "turn right",
           "stop": "stop", "pick": "close the gripper", "open": "open the gripper", "home": "go to the charger"}


def action(text: str) -> str | None:
    """The action of the first command word in `text`, or None."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in ACTIONS:
            return ACTIONS[word]
    return None


def recordings(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(f for f in p.iterdir() if f.suffix.lower() in (".wav", ".flac", ".mp3")) if p.is_dir() else [p]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("audio", nargs="+", help="recordings, or folders of them")
    ap.add_argument("--language", help='the language spoken ("en", ...); default: detected per recording')
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        pipe = mmedge.Pipeline.load(args.package)
        for path in recordings(args.audio):
            start = time.perf_counter()
            text = pipe.transcribe(path, language=args.language, max_new_tokens=args.max_new_tokens)
            ms = (time.perf_counter() - start) * 1e3
            print(f"{path.name}: {text.strip()!r} -> {action(text) or 'no command'} ({ms:.0f} ms, {pipe.language})")
    except mmedge.MmedgeError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
