"""What precision each graph gets: `--quant int4` or `--quant int8,decoder=int4` or `vision_encoder=int8,decoder=int4`."""

from __future__ import annotations

from mmedge.errors import ExportError

PARTS = ("vision_encoder", "projector", "embed_tokens", "decoder")
# an encoder-decoder's (Florence-2, Whisper) graph beside those: in the plans of families that have one
ENCODER = "encoder"
PLAN_PARTS = (*PARTS, ENCODER)
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# What a single precision means for each graph. INT4 is weight-only and pays
# off in the decoder, where the weights are the bytes read per token; the
# vision encoder, projector and an encoder-decoder's encoder run once per image or prompt and stay INT8 there.
PRESETS = {
    "fp32": dict.fromkeys(PLAN_PARTS, "fp32"),
    "fp16": dict.fromkeys(PLAN_PARTS, "fp16"),
    "int8": dict.fromkeys(PLAN_PARTS, "int8"),
    "int4": {"vision_encoder": "int8", "projector": "int8", "embed_tokens": "int8", "decoder": "int4",
             ENCODER: "int8"},
}
# an embedding package's graphs (CLIP, SigLIP): no decoder, so no INT4 (weight-only INT4 pays off where weights
# are the bytes read per token)
EMBEDDING_PARTS = ("vision_encoder", "text_encoder")
KIND_PARTS = {"generative": PARTS, "embedding": EMBEDDING_PARTS}
KIND_PRESETS = {"generative": PRESETS,
                "embedding": {p: dict.fromkeys(EMBEDDING_PARTS, p) for p in ("fp32", "fp16", "int8")}}
ALLOWED = {part: ("fp32", "fp16", "int8") for part in (*PLAN_PARTS, *EMBEDDING_PARTS)} | {"decoder": PRECISIONS}
# What a target cannot hold: TensorRT's ONNX parser takes no INT8 Gather (nor an INT8 Cast), so its
# embedding table is fp16 where a preset says int8; asking for it explicitly is an error.
TARGET_LIMITS = {"tensorrt": {"embed_tokens": ("fp32", "fp16")}}
# What only a target can hold: Core ML's palettized weights (a k-means lookup table per group of channels).
TARGET_EXTRAS = {"coreml": dict.fromkeys((*PLAN_PARTS, *EMBEDDING_PARTS), ("pal4", "pal6", "pal8"))}
CALIB_METHODS = ("minmax", "entropy", "percentile")
INT4_METHODS = ("awq", "rtn")
INT4_BLOCK_SIZES = (32, 64, 128)  # the first is the default
INT4_BLOCK_SIZES_FOR = {"tensorrt": (64, 128)}  # TensorRT's block-quantized INT4 weights


def parse_quant(text: str, target: str | None = None, kind: str | None = "generative",
                encoder: bool = False) -> dict[str, str]:
    """Per-graph precisions from --quant: a preset, `part=precision` pairs, or a preset followed by pairs;
    within what `target` can hold (TARGET_LIMITS), for a package of `kind` ("generative", "embedding"; None:
    either, a check of the text before the model's kind is known); `encoder`: the family has an `encoder` graph
    (an encoder-decoder's), which the plan then covers too."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ExportError(f"--quant is empty; choose one of {', '.join(PRECISIONS)} or part=precision pairs")
    presets = KIND_PRESETS[kind or "generative"]
    parts = (PLAN_PARTS if encoder else KIND_PARTS[kind]) if kind else (*PLAN_PARTS, *EMBEDDING_PARTS)
    plan = {p: presets["fp32"][p] for p in parts} if kind else dict.fromkeys(parts, "fp32")
    if "=" not in items[0]:
        preset = items.pop(0)
        if preset not in presets:
            if preset in PRECISIONS:
                raise ExportError(f"--quant {preset} is for generative models (their decoder); an embedding model "
                                  f"takes {', '.join(presets)}")
            raise ExportError(f"unknown precision {preset!r} in --quant; choose one of {', '.join(PRECISIONS)}")
        plan = {p: presets[preset][p] for p in parts} if kind else dict.fromkeys(parts, preset)
    limits = TARGET_LIMITS.get(target, {})
    for part, allowed in limits.items():
        if part in plan and plan[part] not in allowed:
            plan[part] = "fp16"
    for item in items:
        part, sep, precision = (s.strip() for s in item.partition("="))
        if not sep:
            raise ExportError(f"--quant: expected part=precision after the first item, got {item!r}")
        if part not in parts:
            raise ExportError(f"--quant: unknown graph {part!r}; graphs are {', '.join(parts)}")
        allowed = ALLOWED[part] + TARGET_EXTRAS.get(target, {}).get(part, ())
        if precision not in allowed:
            raise ExportError(f"--quant: {part} cannot be {precision!r}" + (f" for --target {target}" if target else "")
                              + f"; choose one of {', '.join(allowed)}")
        if precision not in limits.get(part, (precision,)):
            raise ExportError(f"--quant: {part} cannot be {precision} for --target {target}; "
                              f"choose one of {', '.join(limits[part])}")
        plan[part] = precision
    return plan


def describe(plan: dict[str, str]) -> str:
    values = set(plan.values())
    if len(values) == 1:
        return values.pop()
    for name, preset in PRESETS.items():
        if all(preset.get(part) == precision for part, precision in plan.items()):  # over the package's graphs
            return name
    return ",".join(f"{p}={precision}" for p, precision in plan.items())
