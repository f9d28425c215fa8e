"""What each family costs the test suite, from pytest's own timings.

    pytest -q -n 2 --durations=0 > durations.txt
    python tools/test_costs.py durations.txt

Every test whose id names a tiny shape (or a demo model) is charged to that shape's family; a shared export
is charged to the first test that asked for it (pytest reports setup and call separately; both count). Test
time is summed over both xdist workers, so the wall-clock cost of a family is about half its sum.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINE = re.compile(r"^\s*([\d.]+)s\s+(setup|call|teardown)\s+(\S+)")
DEMOS = {"shapes-paligemma": "paligemma", "shapes-llava": "llava", "shapes-gemma3": "gemma3",
         "shapes-smolvlm": "idefics3", "shapes-internvl": "internvl", "shapes-qwen2vl": "qwen2_vl",
         "shapes-clip": "clip"}
# tests of the default demo (shapes-paligemma) whose ids do not name it: the quantization and target checks
PALIGEMMA_DEMO_TESTS = ("test_quantized_demo_model", "test_activation_aware_int4", "test_per_graph_overrides",
                        "test_openvino_int4_ratio", "test_demo_model_fp16_on_the_tensorrt",
                        "test_demo_model_converts_at_every_preset")


def family_of_shapes() -> dict[str, str]:
    from mmedge.exporters import tiny

    return {name: shape.family for name, shape in tiny.shapes().items()}


def costs(lines, shapes: dict[str, str]) -> tuple[dict[str, float], float, float]:
    """family -> seconds, shared seconds (tests of no one family), total."""
    per_family: dict[str, float] = defaultdict(float)
    shared = total = 0.0
    names = sorted({**shapes, **DEMOS}.items(), key=lambda kv: -len(kv[0]))  # longest first: paligemma2 > paligemma
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        seconds, test = float(m.group(1)), m.group(3)
        total += seconds
        params = test.partition("[")[2]
        owner = next((family for name, family in names if name in params), None)
        if owner is None and any(t in test for t in PALIGEMMA_DEMO_TESTS):
            owner = "paligemma"
        if owner:
            per_family[owner] += seconds
        else:
            shared += seconds
    return dict(per_family), shared, total


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    per_family, shared, total = costs(Path(argv[0]).read_text().splitlines(), family_of_shapes())
    print(f"{'family':<12}{'test s':>9}{'share':>8}")
    for family, seconds in sorted(per_family.items(), key=lambda kv: -kv[1]):
        print(f"{family:<12}{seconds:9.0f}{100 * seconds / total:7.1f}%")
    print(f"{'(shared)':<12}{shared:9.0f}{100 * shared / total:7.1f}%")
    print(f"{'all':<12}{total:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
