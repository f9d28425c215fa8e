"""`mmedge export`: checkpoint -> verified graphs -> package directory."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mmedge import __version__
from mmedge.calibration.plan import parse_quant
from mmedge.errors import ExportError, first_line
from mmedge.manifest import GraphSpec, KVCacheSpec, Manifest

log = logging.getLogger(__name__)

TARGETS = ("onnxruntime", "openvino", "tensorrt", "coreml")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# what each target needs installed beyond the [export] extra: (module, extra)
TARGET_NEEDS = {"openvino": [("openvino", "openvino")], "coreml": [("coremltools", "coreml")]}


@dataclass
class ExportOptions:
    model: str
    output: Path
    target: str = "onnxruntime"
    quant: str = "fp32"  # a preset (fp32, fp16, int8, int4) and/or part=precision pairs
    max_context: int | None = None  # default: image tokens + 512, within the model's limit
    max_pixels: int | None = None  # dynamic-resolution models: the package's image area cap (default: the processor's)
    min_pixels: int | None = None
    overwrite: bool = False
    progress: bool = True
    calib: str = "builtin"  # image folder, JSONL of {image, prompt}, or builtin
    calib_samples: int | None = None  # default: calibration.data.default_samples (64, fewer for big models)
    calib_method: str = "minmax"
    int4_method: str = "awq"
    int4_block_size: int | None = None  # default: 32, or 64 for tensorrt (TensorRT's INT4 blocks are 64 or 128)
    int4_ratio: float = 1.0  # openvino: share of decoder layers in INT4, the rest INT8 (NNCF picks by sensitivity)
    kv_cache: str | None = None  # "state" or "buffer"; default: the target's first choice
    trace_cache: str | None = None  # folder of traced graphs reused across exports (default: $MMEDGE_TRACE_CACHE)
    build_engines: bool = False  # tensorrt: build this machine's engines into the package after export


def check_options(opts: ExportOptions) -> None:
    if opts.target not in TARGETS:
        raise ExportError(f"unknown target {opts.target!r}; choose one of: {', '.join(TARGETS)}")
    from mmedge.calibration import plan as qplan

    plan = qplan.parse_quant(opts.quant, opts.target, kind=None)  # the syntax; the model's kind decides the rest
    needs = list(TARGET_NEEDS.get(opts.target, []))
    if opts.target == "openvino" and set(plan.values()) != {"fp32"}:
        needs.append(("nncf", "openvino"))
    if any(p.startswith("pal") for p in plan.values()):
        needs.append(("sklearn", "coreml"))  # coremltools clusters palettes with scikit-learn's KMeans
    missing = [m for m, _ in needs if importlib.util.find_spec(m) is None]
    if missing:
        pip = {"sklearn": "scikit-learn"}
        raise ExportError(f"--target {opts.target} needs {' and '.join(missing)}: pip install \"mmedge[{needs[0][1]}]\" "
                          f"(or pip install {' '.join(pip.get(m, m) for m in missing)})")
    if opts.calib_method not in qplan.CALIB_METHODS:
        raise ExportError(f"unknown --calib-method {opts.calib_method!r}; choose one of {', '.join(qplan.CALIB_METHODS)}")
    if opts.int4_method not in qplan.INT4_METHODS:
        raise ExportError(f"unknown --int4-method {opts.int4_method!r}; choose one of {', '.join(qplan.INT4_METHODS)}")
    sizes = qplan.INT4_BLOCK_SIZES_FOR.get(opts.target, qplan.INT4_BLOCK_SIZES)
    if opts.int4_block_size is None:
        opts.int4_block_size = sizes[0]
    if opts.int4_block_size not in sizes:
        raise ExportError(f"--int4-block-size must be one of {', '.join(map(str, sizes))}"
                          + (f" for --target {opts.target}" if sizes != qplan.INT4_BLOCK_SIZES else ""))
    if not 0.0 < opts.int4_ratio <= 1.0:
        raise ExportError(f"--int4-ratio must be in (0, 1], got {opts.int4_ratio}")
    if opts.int4_ratio != 1.0 and opts.target != "openvino":
        raise ExportError("--int4-ratio is available for --target openvino only (NNCF's mixed INT4/INT8)")
    if opts.kv_cache is not None:
        storage = importlib.import_module(f"mmedge.exporters.{opts.target}_target").KV_STORAGE
        if opts.kv_cache not in storage:
            raise ExportError(f"--kv-cache {opts.kv_cache} is not available for --target {opts.target}; "
                              f"choose {' or '.join(storage)}")
    if opts.build_engines:
        if opts.target != "tensorrt":
            raise ExportError("--build-engines is for --target tensorrt (other targets need no build step)")
        from mmedge.runtimes.backends.tensorrt_build import import_tensorrt

        import_tensorrt()  # no TensorRT or no GPU: say so before minutes of export
    if opts.calib != "builtin" and set(plan.values()) == {"fp32"}:
        log.warning("--calib %s is not used: calibration data is for quantized exports (--quant int8, int4, ...)",
                    opts.calib)
    if opts.max_context is not None and opts.max_context < 2:
        raise ExportError(f"--max-context must be at least 2, got {opts.max_context}")
    for name in ("max_pixels", "min_pixels"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ExportError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if opts.max_pixels and opts.min_pixels and opts.min_pixels > opts.max_pixels:
        raise ExportError(f"--min-pixels {opts.min_pixels} is more than --max-pixels {opts.max_pixels}")


def export(opts: ExportOptions) -> Manifest:
    """Export `opts.model` to a package at `opts.output`; returns its manifest."""
    from mmedge.exporters.package import check_output, output_lock

    check_options(opts)  # before importing torch: a mistyped option is answered at once
    check_output(Path(opts.output).resolve(), opts.overwrite)  # fail before minutes of loading
    with output_lock(Path(opts.output)):
        return _locked_export(opts)


def _locked_export(opts: ExportOptions) -> Manifest:
    from mmedge.exporters import checkpoint as ckpt
    from mmedge.exporters import resources

    path = ckpt.resolve(opts.model)
    config = ckpt.read_config(path)
    family = ckpt.family_for(config["model_type"])
    calib = None
    encoder = family.has_encoder(config) if hasattr(family, "has_encoder") else False
    plan = parse_quant(opts.quant, opts.target, kind=getattr(family, "KIND", "generative"), encoder=encoder)
    target = _target_module(opts.target)
    resources.check(path, Path(opts.output).resolve(), quantized=set(plan.values()) != {"fp32"},
                    **resource_habits(target, plan))
    needs = getattr(target, "needs_calibration", lambda plan, opts: set(plan.values()) != {"fp32"})
    if needs(plan, opts):
        from mmedge.calibration.data import load_calibration

        from mmedge.calibration.data import default_samples, token_budget

        weights = resources.checkpoint_weights(path)
        samples = opts.calib_samples if opts.calib_samples is not None else default_samples(weights)
        rate = getattr(family, "TAKES", "images") == "audio" and _audio_rate(path)
        calib = load_calibration(opts.calib, samples, checkpoint=path, audio_rate=rate or None)  # fails before export
        if opts.calib_samples is None:
            calib.token_budget = token_budget(weights)
    manifest = _export(opts, path, family, plan, calib)
    if opts.build_engines:
        from mmedge.runtimes.backends.tensorrt_build import build_package

        build_package(Path(opts.output), manifest, progress=opts.progress)
    return manifest


def _export(opts: ExportOptions, checkpoint: Path, family, plan: dict[str, str], calib=None) -> Manifest:
    import torch

    from mmedge.exporters.graphs import build_jobs
    from mmedge.exporters.package import staged_package

    import transformers

    from mmedge.runtimes.backends import default_threads

    transformers.utils.logging.disable_progress_bar()
    if default_threads():
        torch.set_num_threads(default_threads())
    target = _target_module(opts.target)
    log.info("loading %s", checkpoint)
    model = _load(family, checkpoint, lazily=getattr(target, "LAZY_WEIGHTS", False))
    tokenizer = _load_tokenizer(checkpoint, family)
    if getattr(family, "KIND", "generative") == "embedding":
        from mmedge.exporters.embedding import export_package

        return export_package(opts, checkpoint, family, model, tokenizer, target, plan, calib)
    parts = family.split(model)
    desc = family.describe(model, checkpoint, tokenizer)
    if desc.preprocess is None:  # a family that reads audio, not images
        if opts.max_pixels is not None or opts.min_pixels is not None:
            raise ExportError("--max-pixels / --min-pixels are for models that take images; this one takes audio")
    else:
        _apply_pixel_budget(opts, desc.preprocess)
    max_context = opts.max_context or min(desc.max_position_embeddings, _image_tokens(desc.preprocess,
                                                                                    desc.prompt) + 512)
    if max_context > desc.max_position_embeddings:
        raise ExportError(
            f"--max-context {max_context} exceeds the model's {desc.max_position_embeddings} positions"
        )
    image_tokens = _image_tokens(desc.preprocess, desc.prompt)
    if max_context <= image_tokens + 1:
        budget = " an image within --max-pixels takes" if desc.preprocess.resize_mode == "smart_resize" else ""
        raise ExportError(f"--max-context {max_context} leaves no room after the {image_tokens} image tokens{budget}"
                          + ("; lower --max-pixels" if budget else ""))

    choose = getattr(target, "kv_storage", lambda parts, attention, requested: requested or target.KV_STORAGE[0])
    storage = choose(parts, desc.schemes.attention, opts.kv_cache)
    started = time.perf_counter()
    with staged_package(Path(opts.output), opts.overwrite) as stage:
        if hasattr(target, "build_jobs"):
            jobs = target.build_jobs(parts, storage, max_context, desc.preprocess)
        else:
            jobs = build_jobs(parts, kv_storage=storage, max_context=max_context, attention=desc.schemes.attention,
                              position_offset=desc.schemes.position_offset)
        graphs, report = export_jobs(target, jobs, plan, stage, opts)
        getattr(target, "finish", lambda stage: None)(stage)
        tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
        if desc.prompt.mode == "chat":
            desc.prompt.chat_template = CHAT_TEMPLATE_FILE
            desc.prompt.template_vars = _template_vars(tokenizer)
            (stage / CHAT_TEMPLATE_FILE).write_text(desc.chat_template, encoding="utf-8")
        manifest = Manifest(
            family=family.__name__.rsplit(".", 1)[-1],
            model_type=model.config.model_type,
            target=opts.target,
            graphs=graphs,
            kv_cache=KVCacheSpec(
                num_layers=parts.num_layers,
                num_kv_heads=parts.num_kv_heads,
                head_dim=parts.head_dim,
                dtype="float32",
                max_context=max_context,
                storage=storage,
            ),
            preprocess=desc.preprocess,
            audio=desc.audio,
            prompt=desc.prompt,
            schemes=desc.schemes,
            special_tokens=desc.special_tokens,
            generation=desc.generation,
            source=source_info(opts, checkpoint),
            verification={"reference": "pytorch fp32", "graphs": report},
            mmedge_version=__version__,
        )
        if hasattr(target, "compress"):  # the target compresses its own converted graphs (Core ML)
            if set(plan.values()) != {"fp32"}:
                manifest.quantization = target.compress(stage, manifest, plan, opts, jobs, calib)
        else:
            del model, parts, jobs  # nothing reads the torch model from here on: free it before quantizing
            if calib is not None:
                from mmedge.exporters.resources import release_freed_memory

                release_freed_memory()
                from mmedge.calibration.package import QuantOptions, quantize_package

                options = QuantOptions(calib_method=opts.calib_method, int4_method=opts.int4_method,
                                       int4_block_size=opts.int4_block_size, int4_ratio=opts.int4_ratio)
                manifest.quantization = quantize_package(stage, manifest, plan, calib, options, opts.progress)
        finish_package(target, stage, manifest, "generation", generate_once)
    log.info("exported %s in %.1f s", opts.output, time.perf_counter() - started)
    return manifest


def finish_package(target, stage: Path, manifest: Manifest, check: str, run_once) -> None:
    """The target's last word on the staged package, the file list and hashes, the manifest written; then the
    package run once through the runtime (`run_once(stage, manifest)`, recorded as verification[check])."""
    from mmedge.exporters.package import file_entries

    getattr(target, "finalize", lambda stage, manifest: None)(stage, manifest)
    manifest.files = file_entries(stage)
    manifest.save(stage)
    manifest.verification[check] = run_once(stage, manifest)
    manifest.save(stage)


def resource_habits(target, plan: dict[str, str]) -> dict:
    """What `target` holds in memory for this plan, as resources.check counts it: the torch model whole (else read
    from the checkpoint as graphs are written), each graph's weights copied by its converter (Core ML with every
    graph in float16), a float decoder compiled whole ("OpenVINO at fp32"; None otherwise)."""
    whole = not getattr(target, "LAZY_WEIGHTS", False)
    compiles = getattr(target, "COMPILES_FLOAT_DECODER", None)
    decoder = plan.get("decoder")
    return {"whole": whole, "graph_copied": whole and "fp32" not in plan.values(),
            "float_decoder": f"{compiles} at {decoder}" if compiles and decoder in ("fp32", "fp16") else None}


def export_jobs(target, jobs: list, plan: dict[str, str], stage: Path, opts: ExportOptions
                ) -> tuple[dict[str, GraphSpec], dict[str, dict]]:
    """Each job's graph exported to `stage` and verified against PyTorch (an ExportError on a mismatch):
    the graphs' specs and the verification report, by part."""
    from tqdm.auto import tqdm

    from mmedge.exporters import trace_cache

    cache = trace_cache.directory(opts.trace_cache)
    for job in jobs:
        job.precision = plan[job.name]
        job.trace_cache = cache
    graphs, report = {}, {}
    bar = tqdm(jobs, desc="export", unit="graph", disable=not opts.progress)
    for job in bar:
        bar.set_postfix_str(job.name)
        file = f"{job.name}{target.SUFFIX}"
        target.export_graph(job, stage / file)
        result = target.verify_graph(job, stage / file)
        if result["passed"] is False and job.repeated_layers:
            # a decoder whose layers looked alike but whose repeated graph does not match: traced whole instead
            log.warning("%s: its layers traced once and repeated do not match PyTorch; tracing it whole",
                        job.name)
            job.trace_whole = True  # (its own trace-cache entry)
            target.export_graph(job, stage / file)
            result = target.verify_graph(job, stage / file)
        report[job.name] = result
        if result["passed"] is False:  # None: the target cannot run the graph here (Core ML off macOS)
            worst = max(result["outputs"].items(), key=lambda kv: kv[1]["max_abs_err"])
            raise ExportError(
                f"{job.name} does not match PyTorch: {worst[0]} max abs error {worst[1]['max_abs_err']:.3g} "
                f"(tolerance {result['rtol']} x max(1, |ref|)); nothing was written"
            )
        inputs, outputs = target.io_specs(stage / file, job)
        graphs[job.name] = GraphSpec(file=file, precision="fp32", inputs=inputs, outputs=outputs)
    bar.close()
    return graphs, report


def source_info(opts: ExportOptions, checkpoint: Path) -> dict:
    """What the manifest records of where a package came from."""
    import torch

    return {"model": opts.model, "checkpoint": str(checkpoint), "torch": torch.__version__,
            "transformers": _version("transformers"), "onnx": _version("onnx")}


# a dynamic-resolution package's default image budget, in tokens per image: Qwen's own advice for devices short
# of memory (max_pixels = 1280 x 28 x 28); the processors' defaults allow 16384 tokens (a minute-long prefill on
# a Jetson, gigabytes of KV cache). --max-pixels sets any other.
DEFAULT_IMAGE_TOKENS = 1280


def _apply_pixel_budget(opts: ExportOptions, spec) -> None:
    """--max-pixels / --min-pixels into a dynamic-resolution package's preprocessing (refused for others); by
    default the processor's max_pixels, at most DEFAULT_IMAGE_TOKENS tokens' worth."""
    if spec.resize_mode != "smart_resize":
        if opts.max_pixels is not None or opts.min_pixels is not None:
            raise ExportError("--max-pixels / --min-pixels are for dynamic-resolution models (Qwen-VL); this model "
                              f"takes images at a fixed {spec.height}x{spec.width}")
        return
    token = spec.token_pixels()
    if opts.max_pixels is not None:
        spec.max_pixels = opts.max_pixels
    elif spec.max_pixels > DEFAULT_IMAGE_TOKENS * token:
        log.info("images up to %d pixels (%d tokens) by default, not the processor's %d: pass --max-pixels to "
                 "change it", DEFAULT_IMAGE_TOKENS * token, DEFAULT_IMAGE_TOKENS, spec.max_pixels)
        spec.max_pixels = DEFAULT_IMAGE_TOKENS * token
    if spec.max_pixels < token:
        raise ExportError(f"--max-pixels {spec.max_pixels} is less than one image token ({token} pixels)")
    spec.min_pixels = min(opts.min_pixels or spec.min_pixels, spec.max_pixels)


def _image_tokens(spec, prompt) -> int:
    """The most image tokens one image takes: the fixed count, or what max_pixels allows (dynamic resolution);
    none where the model takes no images (`spec` None)."""
    if spec is None:
        return 0
    if spec.resize_mode == "smart_resize":
        return spec.max_pixels // spec.token_pixels()
    return prompt.image_seq_len * spec.frames_per_image()


# backends a target's packages are checked with at export, where not the target's own (TensorRT needs the GPU
# the engines are built for; its graphs run as they are in ONNX Runtime)
CHECK_BACKEND = {"tensorrt": "onnxruntime"}


def generate_once(package: Path, manifest: Manifest) -> dict:
    """Run the finished package through the runtime's own Pipeline once (a sample image and prompt, a few
    tokens: every part, every scheme the manifest names, the counts it states against the graphs' shapes);
    a package that cannot generate is not written. A big float32 decoder runs a few layers at a time
    (`_decoder_by_layers`)."""
    import sys

    import numpy as np
    from PIL import Image

    from mmedge.runtimes import Pipeline

    if manifest.target == "coreml" and sys.platform != "darwin":
        return {"passed": None, "not_run": "Core ML runs models on macOS only"}
    backend = CHECK_BACKEND.get(manifest.target, manifest.target)
    ramp = np.linspace(0, 255, 96 * 64 * 3).reshape(64, 96, 3).astype(np.uint8)  # not square: resizing is exercised
    pieces: list = []
    try:
        pipe = Pipeline.load(package, backend=backend, verify=False, low_memory=backend == "onnxruntime",
                             model_cache=False)
        pieces = _decoder_by_layers(pipe, package, manifest, backend)
        if manifest.audio is not None:  # a second of a 440 Hz tone
            rate = manifest.audio.sampling_rate
            tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
            tokens = pipe.transcribe_ids(tone.astype(np.float32), max_new_tokens=3, ignore_eos=True)[0]
        else:
            tokens = list(pipe.generate_ids(Image.fromarray(ramp), "describe the image", max_new_tokens=3,
                                            ignore_eos=True))
    except Exception as exc:
        raise ExportError(f"the exported package cannot generate through the runtime ({first_line(exc)}); "
                          "nothing was written") from exc
    finally:
        if pieces:
            from mmedge.calibration import layered

            layered.remove(pieces)
    return {"passed": True, "backend": backend, "prompt_tokens": pipe.timings.prompt_tokens,
            "new_tokens": len(tokens), "tokens": [int(t) for t in tokens],
            **({"pieces": len(pieces)} if pieces else {})}


def _decoder_by_layers(pipe, package: Path, manifest: Manifest, backend: str) -> list:
    """Where the package's decoder is a big float32 ONNX graph that ONNX Runtime runs here, the Pipeline's decoder
    swapped for one run a few layers at a time (calibration/layered.ByLayers: the same nodes and weights, one piece's
    read at a time, not a 3B model's 12 GB resident at once; the whole graph's session, opened by the load without
    reading its weights, is let go unrun). Returns the pieces written beside the decoder (removed after the check), or
    [] where the decoder runs whole."""
    from mmedge.calibration.package import big_decoder

    spec = manifest.graphs["decoder"]
    path = package / spec.file
    if backend != "onnxruntime" or path.suffix != ".onnx" or spec.precision != "fp32" \
            or manifest.kv_cache.storage not in ("buffer", "in_place") or not big_decoder(path):
        return []
    from mmedge.calibration import layered
    from mmedge.runtimes.backends import get_backend

    load = get_backend("onnxruntime", low_memory=True, model_cache=False).load
    pieces = layered.split(path)
    pipe.graphs["decoder"] = layered.ByLayers(pieces, load)
    return pieces


def _audio_rate(checkpoint: Path) -> int:
    """The sampling rate an audio checkpoint's feature extractor takes."""
    path = Path(checkpoint) / "preprocessor_config.json"
    return json.loads(path.read_text()).get("sampling_rate", 16000) if path.exists() else 16000


def _target_module(name: str):
    try:
        return importlib.import_module(f"mmedge.exporters.{name}_target")
    except ImportError as exc:
        raise ExportError(f"target {name} needs {exc.name}: `pip install {exc.name}`") from None


def _template_vars(tokenizer) -> dict:
    """What transformers puts in a chat template's scope besides the messages: the special tokens."""
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, (str, list))}


def _load(family, checkpoint: Path, lazily: bool = False):
    """The torch model; `lazily`: its weights left in the checkpoint until needed (exporters/lazy.py), where the
    checkpoint allows."""
    try:
        if lazily:
            from mmedge.exporters import lazy

            model = lazy.load(checkpoint)
            if model is not None:
                return model
        return family.load(checkpoint)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"could not load the model from {checkpoint}: {first_line(exc)}") from exc


def _load_tokenizer(checkpoint: Path, family=None):
    """The checkpoint's transformers tokenizer, with a `tokenizers` version (what a package holds): its own, or
    the family's conversion of a SentencePiece-only one (`fast_tokenizer(tok)`: SigLIP)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    except Exception as exc:
        raise ExportError(f"could not load the tokenizer from {checkpoint}: {first_line(exc)}") from exc
    if getattr(tok, "backend_tokenizer", None) is None and hasattr(family, "fast_tokenizer"):
        tok.backend_tokenizer = family.fast_tokenizer(tok)
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ExportError(f"the tokenizer in {checkpoint} has no fast (tokenizers) version; mmedge needs tokenizer.json")
    return tok


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
