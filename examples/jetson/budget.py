"""An estimate of the memory a package needs on a Jetson, computed from its manifest (not measured).

    python examples/jetson/budget.py PACKAGE [--device orin-nano-8gb] [--context N]

Jetson memory is one pool the CPU and the GPU share, so everything below comes out of the same 8 GB on an Orin
Nano. The parts:
  weights    the graphs' files: TensorRT engines hold the weights at the precision the ONNX graphs give them
             (int4 stays int4, fp16 stays fp16), so the engines weigh about what the graphs do
  KV cache   2 x layers x KV heads x head dim x context x bytes per value, at the package's cache precision
  runtime    CUDA context, cuBLAS/cuDNN and TensorRT's libraries and the Python runtime: a fixed ~1.2 GB,
             an assumption until measured on the device (JetPack 6.2; varies with the libraries loaded)
  work       TensorRT's activation memory per engine, ~10% of the weights (an assumption)
The system (Ubuntu without a desktop) keeps ~1 GB for itself; with the desktop, ~2 GB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEVICES = {"orin-nano-8gb": 8.0, "orin-nano-4gb": 4.0, "orin-nx-8gb": 8.0, "orin-nx-16gb": 16.0,
           "agx-orin-32gb": 32.0, "agx-orin-64gb": 64.0}  # GB of shared memory
RUNTIME_GB = 1.2  # assumed: CUDA + TensorRT + Python, before any engine
SYSTEM_GB = 1.0  # assumed: headless Ubuntu (JetPack 6.2)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}
SIDE_FILES = (".json", ".jinja", ".txt", ".model", ".md")


def budget(package: Path, context: int | None = None) -> dict[str, float]:
    """The estimate's parts, in bytes."""
    manifest = json.loads((package / "mmedge.json").read_text())
    weights = sum(f["bytes"] for name, f in manifest["files"].items() if not name.endswith(SIDE_FILES))
    kv = manifest["kv_cache"]
    n = context or kv["max_context"]
    cache = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * n * BYTES.get(kv["dtype"], 4)
    return {"weights": weights, "kv_cache": cache, "work": 0.1 * weights, "runtime": RUNTIME_GB * 1e9,
            "context": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", type=Path)
    p.add_argument("--device", default="orin-nano-8gb", choices=sorted(DEVICES))
    p.add_argument("--context", type=int, help="tokens of context to hold (default: the package's max_context)")
    args = p.parse_args(argv)
    if not (args.package / "mmedge.json").is_file():
        print(f"budget.py: error: {args.package} is not an mmedge package (no mmedge.json)", file=sys.stderr)
        return 2
    b = budget(args.package, args.context)
    total = b["weights"] + b["kv_cache"] + b["work"] + b["runtime"]
    free = DEVICES[args.device] * 1e9 - SYSTEM_GB * 1e9
    print(f"{args.package} on {args.device} (an estimate, not a measurement)")
    for name in ("weights", "kv_cache", "work", "runtime"):
        extra = f" ({b['context']} tokens)" if name == "kv_cache" else ""
        print(f"  {name:<9} {b[name] / 1e9:8.3f} GB{extra}")
    print(f"  {'total':<9} {total / 1e9:8.3f} GB of {free / 1e9:.1f} GB left by the system: "
          f"{'fits' if total <= free else 'does not fit'} ({total / free:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
