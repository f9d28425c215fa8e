"""Benchmark mmedge against what users would pick instead, on this machine, in one run.

    python tools/bench_peers.py [--model smolvlm-256m-shaped] [--prepare] [--work /tmp/bench-peers] [--new-tokens 64] [--runs 5] [--rounds 3]
                                [--threads 2]

The model (--model) is `smolvlm-256m-shaped` (the published SmolVLM-256M-Instruct
architecture, random weights from a fixed seed, built locally; one 512 x 512
image, splitting off), the page's head table, or `qwen2-vl-2b-shaped` (the
published Qwen2-VL-2B-Instruct architecture; one 224 x 224 image), its section
"## Qwen2-VL-2B". Every system answers the same prompt about the same
image, greedy, with exactly --new-tokens new tokens (EOS suppressed), each in
its own process:

    transformers      eager fp32 on PyTorch CPU (this environment)
    optimum-intel     OpenVINO at fp32, int8 and int4 weight-only, exported by optimum-cli;
                      installed by this tool into its own virtual environment (--work/optimum-venv)
                      with transformers 4.57.6, the newest its idefics3 export accepts
    mmedge            onnxruntime and openvino packages at fp32, int8, int4 (`mmedge bench`)

Systems take turns, --rounds times (default 3), and each row pools its runs
over the rounds, so a slow minute on a shared machine hits every system alike.
It also measures the memory bandwidth each round (an ONNX Runtime ReduceSum
over 512 MB at --threads for reads; a numpy copy for reference) and divides
the read bandwidth by the bytes each mmedge decoder reads per new token (its
weights, minus the embedding table, plus the KV cache at the final length):
the roofline. `--prepare` only exports (optimum-intel's venv and models,
mmedge's packages), so that part can share the machine with other work.
Writes docs/benchmarks.md (table, machine, versions; the other sections kept) and a chart beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe this image."
# optimum-intel 2.2 installs transformers 5.5 but refuses to export idefics3 with anything newer than
# 4.57.6 ("Maximum required is 4.57.6"), so that is pinned; torch stays at this environment's build
OPTIMUM = ["optimum-intel[openvino]==2.2.0", "transformers==4.57.6"]
MMEDGE_PACKAGES = [(t, q) for t in ("onnxruntime", "openvino") for q in ("fp32", "int8", "int4")]


@dataclass(frozen=True)
class Bench:
    """A model the benchmark runs: built-in checkpoint, image, INT4 group, and where its table goes."""

    model: str
    about: str  # the table's model line
    image_size: int
    # INT4 group size for both systems (mmedge's --int4-block-size, optimum-cli's --group-size)
    int4_group: int
    section: str | None = None  # None: the page's head table; else its own "## ..." section of the page
    chart: str = "benchmarks.png"


BENCHES = {b.model: b for b in (
    # optimum-intel's default group, 128, does not divide SmolLM2's hidden size (576) and NNCF refuses it; 64 does
    Bench("smolvlm-256m-shaped", "the SmolVLM-256M-Instruct architecture with random weights: SigLIP 768x12 at "
          "512 px, 64 image tokens, SmolLM2-135M decoder, untied LM head; one 512 x 512 image, splitting off", 512, 64),
    # the smallest published Qwen2-VL; optimum-intel's default group (128) divides its widths (1280, 1536, 8960)
    Bench("qwen2-vl-2b-shaped", "the Qwen2-VL-2B-Instruct architecture with random weights (2.2B parameters, stored "
          "in bfloat16 as published): ViT 1280x32, 2x2 merger, Qwen2-1.5B decoder (28 layers, 12 heads, 2 KV heads, "
          "tied LM head), multimodal rotary positions; one 224 x 224 image (256 patches, 64 image tokens)", 224, 128,
          section="## Qwen2-VL-2B", chart="benchmarks-qwen2vl.png"),
)}
OPTIMUM_FORMATS = ("fp32", "int8", "int4")


# -- workers: each runs in its own process and prints one JSON line ---------------------------------

def _hf_generate_timings(model, processor, image, new_tokens: int, runs: int, warmup: int, vision_parts=()) -> dict:
    """Time HF-style generate(): a logits processor stamps each step, so TTFT and decode rate come from one run."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    stamps: list[float] = []
    vision: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    for part in vision_parts:  # wrap the vision encoder's forward (or each of its parts') to time it

        def timed(*args, forward=part.forward, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            vision.append(time.perf_counter() - start)
            return out

        part.forward = timed
    samples: dict[str, list[float]] = {k: [] for k in ("preprocess_ms", "vision_encoder_ms", "ttft_ms", "decode_tok_s",
                                                       "e2e_ms")}
    prompt_tokens = 0
    for i in range(warmup + runs):
        stamps.clear()
        vision.clear()
        start = time.perf_counter()
        inputs = processor(text=text, images=[image], return_tensors="pt")
        prepared = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([Stamp()]))
        end = time.perf_counter()
        prompt_tokens = inputs["input_ids"].shape[1]
        assert out.shape[1] - prompt_tokens == new_tokens, "generate() stopped early"
        if i < warmup:
            continue
        samples["preprocess_ms"].append((prepared - start) * 1e3)
        samples["vision_encoder_ms"].append(sum(vision) * 1e3 if vision else float("nan"))
        samples["ttft_ms"].append((stamps[0] - start) * 1e3)
        samples["decode_tok_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        samples["e2e_ms"].append((end - start) * 1e3)
    return {"prompt_tokens": prompt_tokens, "samples": samples}


def worker_transformers(args) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(args.model_dir)
    load_ms = (time.perf_counter() - start) * 1e3
    result = _hf_generate_timings(model, processor, Image.open(args.image), args.new_tokens, args.runs, args.warmup,
                                  vision_parts=[getattr(model.model, "vision_model", None) or model.model.visual])
    return {**result, "load_ms": load_ms, "version": f"transformers {_version('transformers')}, "
                                                     f"torch {_version('torch')}"}


def worker_optimum(args) -> dict:
    from PIL import Image
    from transformers import AutoProcessor

    from optimum.intel.openvino import OVModelForVisualCausalLM

    start = time.perf_counter()
    config = {"INFERENCE_NUM_THREADS": args.threads} if args.threads else {}
    if args.compute:  # its fp32 package timed in f32 as well, like with like for mmedge's f32-compute rows
        config["INFERENCE_PRECISION_HINT"] = args.compute
    model = OVModelForVisualCausalLM.from_pretrained(args.model_dir, ov_config=config)
    try:
        processor = AutoProcessor.from_pretrained(args.model_dir)
    except ImportError:  # its video processor needs torchvision, which does not load beside the CPU torch
        processor = _image_only_processor(args.model_dir)
    load_ms = (time.perf_counter() - start) * 1e3
    result = _hf_generate_timings(model, processor, Image.open(args.image), args.new_tokens, args.runs, args.warmup,
                                  # Qwen2-VL's patch embedding, then its blocks and merger, are two models there
                                  vision_parts=[p for p in (model.vision_embeddings,
                                                            getattr(model, "vision_embeddings_merger", None)) if p is not None])
    return {**result, "load_ms": load_ms, "version": f"optimum-intel {_version('optimum-intel')}, "
                                                     f"openvino {_version('openvino')}, "
                                                     f"transformers {_version('transformers')}"}


def _image_only_processor(model_dir: Path):
    """The checkpoint's processor (transformers 4.57) without its video processor: images and text as they are."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[AutoConfig.from_pretrained(model_dir).model_type])
    names = cls.tokenizer_class if isinstance(cls.tokenizer_class, tuple) else (cls.tokenizer_class,)
    tokenizer = getattr(transformers, names[-1]).from_pretrained(model_dir)  # the fast one where there are two
    template = Path(model_dir) / "chat_template.jinja"

    class ImageOnly(cls):
        def check_argument_for_proper_class(self, name, argument):  # video_processor None: no video is given
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, argument)

    return ImageOnly(image_processor=AutoImageProcessor.from_pretrained(model_dir), tokenizer=tokenizer,
                     video_processor=None, chat_template=template.read_text() if template.exists() else None)


def worker_bandwidth(args) -> dict:
    """Memory bandwidth two ways, best of 10 over a 512 MB buffer: numpy copy (bytes read + written per
    second, one thread) and an ONNX Runtime ReduceSum at --threads (bytes read per second: what a decoder
    streaming its weights does)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    src = np.ones(128 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "read",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [src.size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    read = best(lambda: session.run(None, {"x": src}))
    copy = best(lambda: np.copyto(dst, src))
    return {"read_gb_s": src.nbytes / read / 1e9, "copy_gb_s": 2 * src.nbytes / copy / 1e9}


WORKERS = {"transformers": worker_transformers, "optimum": worker_optimum, "bandwidth": worker_bandwidth}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# -- the driver -----------------------------------------------------------------------------------

def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench_peers: {what} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _worker(python: str, kind: str, args, model_dir: Path, image: Path, compute: str | None = None) -> dict:
    cmd = [python, __file__, "--worker", kind, "--model-dir", str(model_dir), "--image", str(image),
           "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--threads", str(args.threads), *(["--compute", compute] if compute else [])]
    out = _run(cmd, f"{kind}: {model_dir.name}")
    return json.loads(out.strip().splitlines()[-1])


def optimum_python(work: Path) -> str:
    """The optimum-intel virtual environment's python, created on first use.

    optimum-intel pins an older transformers than mmedge uses, so it lives in its
    own environment; torch is held at this environment's build (a plain install
    would pull a CUDA build), and PyPI's torchvision, built for that CUDA torch,
    is removed (transformers imports it when present, and it fails to load).
    """
    venv = work / "optimum-venv"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        import torch

        _run([sys.executable, "-m", "venv", "--clear", str(venv)], "creating the optimum-intel environment")
        constraints = work / "optimum-constraints.txt"
        constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
        pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
        _run(pip + [f"torch=={torch.__version__.split('+')[0]}"], "installing torch into it")
        _run(pip + OPTIMUM, f"installing {' '.join(OPTIMUM)}")
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], capture_output=True)
        (venv / ".complete").touch()
    return str(python)


def legacy_processor(checkpoint: Path, out: Path) -> None:
    """Write the checkpoint's processor into `out` in the form transformers 4.x reads.

    optimum-cli copies only the image processor, and transformers 4.57 cannot read the
    tokenizer_config transformers 5 writes (tokenizer_class "TokenizersBackend").
    """
    import shutil

    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(checkpoint / name, out / name)
    tok = json.loads((checkpoint / "tokenizer_config.json").read_text())
    extra = tok.pop("extra_special_tokens", [])
    tok.pop("backend", None)
    tok.update(tokenizer_class="PreTrainedTokenizerFast", additional_special_tokens=extra)
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    if (checkpoint / "processor_config.json").exists():  # the processor's settings and its image processor's
        proc = json.loads((checkpoint / "processor_config.json").read_text())
        (out / "preprocessor_config.json").write_text(json.dumps(proc.pop("image_processor"), indent=2))
        (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    else:
        shutil.copy(checkpoint / "preprocessor_config.json", out / "preprocessor_config.json")


def legacy_config(config: dict) -> dict:
    """A transformers 5 config.json as transformers 4.57 reads it: `rope_parameters` back to `rope_theta` and,
    for multimodal rotary positions, `rope_scaling` {"type": "mrope", "mrope_section": ...} (4.57 ignores
    `rope_parameters`, and its Qwen2-VL attention reads the sections from `rope_scaling`)."""
    config = dict(config)
    rope = config.pop("rope_parameters", None)
    if rope is not None and "model_type" in config and not config["model_type"].endswith("_vision"):
        config["rope_theta"] = rope.get("rope_theta", 10000.0)
        if "mrope_section" in rope:
            config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        elif rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            config[key] = legacy_config(value)
    return config


def legacy_checkpoint(checkpoint: Path, out: Path) -> Path:
    """The checkpoint as transformers 4.57 (optimum-intel's) reads it: its weight files linked, its config and
    processor rewritten (legacy_config, legacy_processor). The same weights, so both systems run one model."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name.endswith((".safetensors", ".safetensors.index.json")) and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    if (checkpoint / "generation_config.json").exists():
        shutil.copy(checkpoint / "generation_config.json", out / "generation_config.json")
    config = legacy_config(json.loads((checkpoint / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    legacy_processor(checkpoint, out)
    return out


def decoder_bytes_per_token(package: Path, kv_positions: int, weight_scale: float = 1.0) -> int:
    """Bytes the decoder reads per new token: its weight files (the LM head included, the embedding table not:
    mmedge keeps it in its own graph and reads one row) plus the K and V cache at `kv_positions`.
    weight_scale: 0.5 where OpenVINO computes fp32 weights in bf16 (it converts them when compiling)."""
    manifest = json.loads((package / "mmedge.json").read_text())
    graph = manifest["graphs"]["decoder"]["file"]
    stem = graph.rsplit(".", 1)[0]
    weights = sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith(stem))
    kv = manifest["kv_cache"]
    return int(weights * weight_scale) + 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * kv_positions * 4


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    from mmedge.bench import _summary  # the same median / min / max as `mmedge bench`

    return {k: _summary(v) for k, v in samples.items() if v}


def chart(rows: list[dict], out: Path) -> None:
    """Horizontal bars of decode tokens/s and time to first token per system (Pillow only)."""
    from PIL import Image, ImageDraw

    width, bar_h, left = 900, 22, 260
    panels = [("decode tokens/s (higher is better)", "decode_tok_s"), ("time to first token, ms (lower is better)",
                                                                       "ttft_ms")]
    height = 40 + len(panels) * (40 + len(rows) * (bar_h + 6))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    y = 10
    for title, key in panels:
        d.text((10, y), title, fill="black")
        y += 24
        top = max(r["metrics"][key]["median"] for r in rows)
        for r in rows:
            v = r["metrics"][key]["median"]
            color = (40, 110, 200) if r["system"].startswith("mmedge") else (150, 150, 150)
            d.text((10, y + 5), r["name"], fill="black")
            d.rectangle((left, y, left + int((width - left - 80) * v / top), y + bar_h), fill=color)
            d.text((left + int((width - left - 80) * v / top) + 6, y + 5), f"{v:.0f}", fill="black")
            y += bar_h + 6
        y += 16
    img.save(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smolvlm-256m-shaped", choices=sorted(BENCHES),
                   help="the built-in checkpoint to run (default: smolvlm-256m-shaped, the page's head table)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-peers"),
                   help="the optimum-intel venv, and per model its exports and packages")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5, help="timed runs per system per round (default: 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all systems, samples pooled (default: 3): a slow minute hits every system")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--skip", action="append", default=[], help="transformers, optimum or mmedge (repeatable)")
    p.add_argument("--target", action="append", choices=("onnxruntime", "openvino"),
                   help="mmedge's packages for this target only (repeatable; default: both)")
    p.add_argument("--prepare", action="store_true",
                   help="only export what is missing (the venv, optimum's and mmedge's packages), time nothing: "
                        "exports may share the machine, timings should not")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--compute", help=argparse.SUPPRESS)  # optimum's worker: OpenVINO's INFERENCE_PRECISION_HINT
    args = p.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0

    import numpy as np

    from mmedge.exporters import tiny
    from mmedge.tasks import shapes

    bench = BENCHES[args.model]
    work = args.work / bench.model
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny.materialize(bench.model)
    image = work / "image.png"
    rng = np.random.default_rng(0)
    shapes.draw(shapes._scene(rng), rng, bench.image_size).save(image)
    dir_size = lambda d: sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())  # noqa: E731

    # 1. everything to time, exported first (optimum's venv and exports, mmedge's packages)
    jobs: list[tuple] = []  # (system, name, run() -> result dict, size in bytes, decoder bytes per token or None)
    if "transformers" not in args.skip:
        jobs.append(("transformers", "transformers eager fp32",
                     lambda: _worker(sys.executable, "transformers", args, checkpoint, image), dir_size(checkpoint), None))
    if "optimum" not in args.skip:
        python = optimum_python(args.work)
        cli = str(Path(python).parent / "optimum-cli")
        source = legacy_checkpoint(checkpoint, work / "checkpoint-4.x")
        for fmt in OPTIMUM_FORMATS:
            out = work / f"optimum-{fmt}"
            if not (out / ".complete").exists():
                group = ["--group-size", str(bench.int4_group)] if fmt == "int4" else []
                _run([cli, "export", "openvino", "--model", str(source), "--task", "image-text-to-text",
                      "--weight-format", fmt, *group, str(out)], f"optimum-cli export openvino --weight-format {fmt}")
                legacy_processor(checkpoint, out)
                (out / ".complete").touch()
            jobs.append(("optimum-intel", f"optimum-intel openvino {fmt}",
                         lambda out=out: _worker(python, "optimum", args, out, image), dir_size(out), None))
            if _ov_cpu_default() != "f32":  # its default computes in bf16 here: timed in f32 too, like with like
                # for mmedge's f32-compute rows (onnxruntime has no bf16 arithmetic on x86 CPUs)
                jobs.append(("optimum-intel", f"optimum-intel openvino {fmt} (f32 compute)",
                             lambda out=out: _worker(python, "optimum", args, out, image, "f32"), dir_size(out), None))
    if "mmedge" not in args.skip:
        mmedge = [sys.executable, "-m", "mmedge.cli"]
        for target, quant in [(t, q) for t, q in MMEDGE_PACKAGES if t in (args.target or (t,))]:
            pkg = work / f"mmedge-{target}-{quant}"
            if not (pkg / "mmedge.json").exists():
                block = ["--int4-block-size", str(bench.int4_group)] if quant == "int4" else []
                # calibration size sets accuracy, not speed: 16 samples keep the exports short
                calib = ["--calib-samples", "16"] if quant != "fp32" else []
                _run(mmedge + ["export", "--model", bench.model, "--target", target, "--quant", quant, *block, *calib,
                               "-o", str(pkg), "--overwrite"], f"mmedge export --target {target} --quant {quant}")
            # optimum-intel leaves OpenVINO's CPU default compute precision, bf16 on CPUs that have it, so its
            # "fp32" runs in bf16; mmedge's openvino packages compute float graphs in f32 and quantized graphs'
            # float parts in bf16 there unless asked (runtimes/backends/openvino.py), and are timed both ways
            bf16 = target == "openvino" and _ov_cpu_default() == "bf16"
            for compute in ([None, "bf16"] if quant == "fp32" else [None, "f32"]) if bf16 else [None]:
                extra = ["--inference-precision", compute] if compute else []

                def run(pkg=pkg, extra=extra, target=target) -> dict:
                    out = _run(mmedge + ["bench", str(pkg), "--image", str(image), "--prompt", PROMPT, "--new-tokens",
                                         str(args.new_tokens), "--runs", str(args.runs), "--warmup", str(args.warmup),
                                         "--threads", str(args.threads), "--json", *extra], f"mmedge bench {pkg.name} {extra}")
                    r = json.loads(out)
                    r["version"] = f"mmedge, {target} {_version(target)}"
                    return r

                jobs.append(("mmedge", f"mmedge {target} {quant}" + (f" ({compute} compute)" if compute else ""), run,
                             dir_size(pkg), (pkg, 0.5 if compute == "bf16" else 1.0)))
    if args.prepare:
        print(f"prepared {work}; run again without --prepare on a quiet machine to time it")
        return 0

    # 2. rounds: every system once per round, in the same order, so drifting machine load hits all alike
    bandwidths: list[dict] = []
    results: dict[str, list[dict]] = {}
    for i in range(args.rounds):
        print(f"round {i + 1} of {args.rounds}", flush=True)
        bandwidths.append(_worker(sys.executable, "bandwidth", args, checkpoint, image))
        print(f"    memory bandwidth: read {bandwidths[-1]['read_gb_s']:.1f} GB/s, "
              f"copy {bandwidths[-1]['copy_gb_s']:.1f} GB/s", flush=True)
        for system, name, run, _, _ in jobs:
            r = run()
            results.setdefault(name, []).append(r)
            m = summarize(r["samples"])
            print(f"    TTFT {m['ttft_ms']['median']:.0f} ms, decode {m['decode_tok_s']['median']:.1f} tok/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    bandwidth = {k: float(np.median([b[k] for b in bandwidths])) for k in bandwidths[0]}
    rows = []
    for system, name, _, size, decoder in jobs:
        rs = results[name]
        samples = {k: [x for r in rs for x in r["samples"].get(k, [])] for k in rs[0]["samples"]}
        prompt_tokens = rs[0].get("prompt_tokens")
        per_token = decoder_bytes_per_token(decoder[0], prompt_tokens + args.new_tokens, decoder[1]) if decoder else None
        rows.append({"system": system, "name": name, "metrics": summarize(samples), "prompt_tokens": prompt_tokens,
                     "load_ms": float(np.median([r["load_ms"] for r in rs])),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "size_mb": size / 1e6,
                     "bytes_per_token": per_token, "version": rs[0].get("version", "")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({"bandwidth_gb_s": bandwidth, "rows": rows}, indent=2))
    chart(rows, args.out.parent / bench.chart)
    write_section(args.out, bench.section, report(rows, bandwidth, args, bench))
    print(f"wrote {args.out} and {args.out.parent / bench.chart}")
    return 0


def _ov_cpu_default() -> str:
    """OpenVINO's default compute precision on this CPU (bf16 where AVX512-BF16 / AMX exist)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", "f16"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        mem_s = f", {mem / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem_s = ""
    return f"{cpu}, {os.cpu_count()} cores{mem_s}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def write_section(page: Path, section: str | None, text: str) -> None:
    """Write `text` into the benchmark page: as its head (section None: the title and the head table, up to the
    first "## " section), or as the section titled `section` (replacing it, or appended); the rest is kept."""
    old = page.read_text() if page.exists() else "# Benchmarks\n"
    cut = old.find("\n## ")
    head, sections = (old, "") if cut < 0 else (old[:cut + 1], old[cut + 1:])
    if section is None:
        head = text
    else:
        parts = [p for p in ("\n" + sections).split("\n## ") if p.strip()]
        parts = ["## " + p.strip("\n") + "\n" for p in parts]
        mine = text.strip("\n") + "\n"
        at = [i for i, p in enumerate(parts) if p.splitlines()[0] == section]
        if at:
            parts[at[0]] = mine
        else:
            parts.append(mine)
        sections = "\n".join(parts)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(head.rstrip("\n") + "\n" + ("\n" + sections if sections else ""))


def report(rows: list[dict], bandwidth: dict, args, bench: Bench) -> str:
    def cell(r, key, fmt="{:.0f}"):
        m = r["metrics"].get(key)
        return f"{fmt.format(m['median'])} ({fmt.format(m['min'])}-{fmt.format(m['max'])})" if m else "-"

    lines = [
        bench.section or "# Benchmarks",
        "",
        f"`python tools/bench_peers.py` on {time.strftime('%Y-%m-%d')}: {_machine()}; memory bandwidth "
        f"{bandwidth['read_gb_s']:.1f} GB/s read (ONNX Runtime ReduceSum over 512 MB, {args.threads} threads), "
        f"{bandwidth['copy_gb_s']:.1f} GB/s copy (numpy, read + write), best of 10, median over rounds.",
        "",
        f"Model: `{bench.model}` ({bench.about}); INT4 in groups of {bench.int4_group} for both systems; prompt"
        f" \"{PROMPT}\" through the chat template; greedy, {args.new_tokens} new tokens forced (EOS suppressed);"
        f" {args.threads} threads; each system in its own process, {args.rounds} rounds over all systems in turn;"
        f" {args.runs} runs per round after {args.warmup} warm-up; median of the {args.rounds * args.runs} runs"
        " (min-max in brackets), peak RSS the highest of the rounds. TTFT runs from the call with the image and text to the"
        " first token's logits, preprocessing included.",
        "",
        "| system | TTFT ms | vision encoder ms | decode tok/s | end to end ms | load ms | peak RSS MB | on disk MB "
        "| roofline tok/s | of roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        roof = bandwidth["read_gb_s"] * 1e9 / r["bytes_per_token"] if r["bytes_per_token"] else None
        frac = f"{r['metrics']['decode_tok_s']['median'] / roof:.0%}" if roof else "-"
        lines.append(f"| {r['name']} | {cell(r, 'ttft_ms')} | {cell(r, 'vision_encoder_ms')} | "
                     f"{cell(r, 'decode_tok_s', '{:.1f}')} | {cell(r, 'e2e_ms')} | {r['load_ms']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['size_mb']:.0f} | {f'{roof:.0f}' if roof else '-'} | {frac} |")
    lines += ["", f"![decode tokens/s and time to first token]({bench.chart})", "",
              f"Compute precision: optimum-intel runs OpenVINO with its CPU default, {_ov_cpu_default()} on this"
              " machine, unless a row says otherwise. mmedge's openvino packages compute fp32 graphs in f32 and the"
              " float parts of int8/int4 graphs in bf16 where that is OpenVINO's CPU default (f32 elsewhere), unless"
              " a row says otherwise (`--inference-precision`); onnxruntime computes in f32 (no bf16 arithmetic in"
              " its x86 CPU kernels). Weights are what the row names.", "",
              "Roofline: read bandwidth / bytes the decoder reads per new token (its weights without the"
              " embedding table, plus the KV cache at the final length), for the mmedge packages, whose"
              " decoder bytes are known exactly from the package (halved for bf16 compute: OpenVINO converts"
              " fp32 weights to bf16 when it compiles).", "",
              "What bounds each row, with profiles: [performance.md](performance.md).", "",
              "Versions: " + "; ".join(sorted({r["version"] for r in rows if r["version"]})) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
