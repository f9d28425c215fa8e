"""The `mmedge` command line: export, build, run, chat, serve, inspect, eval, bench, list-models.

Errors in the user's input print one line on stderr and exit with status 2;
anything unexpected prints one line too (MMEDGE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from mmedge import __version__
from mmedge.errors import InputError, MmedgeError, first_line

log = logging.getLogger("mmedge")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmedge", description="Vision-language models on edge devices.")
    p.add_argument("--version", action="version", version=f"mmedge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export a Hugging Face checkpoint to a package")
    e.add_argument("--model", required=True, help="checkpoint directory, alias (see list-models) or Hub id")
    e.add_argument("--target", default="onnxruntime",
                   help="runtime to export for: onnxruntime (default), openvino, tensorrt or coreml")
    e.add_argument("--quant", default="fp32",
                   help="fp32, fp16, int8 or int4 (int4: decoder int4, the rest int8), optionally followed by "
                        "per-graph overrides, e.g. int4,vision_encoder=fp32 or vision_encoder=int8,decoder=int4; "
                        "coreml also takes pal4, pal6 or pal8 per graph (palettized weights), e.g. fp16,decoder=pal4")
    e.add_argument("--calib", default="builtin",
                   help="calibration data: an image folder, a JSONL of {image, prompt}, or builtin (default)")
    e.add_argument("--calib-samples", type=int, help="calibration samples (default: 64; fewer for a model over "
                   "1B parameters, at least 16)")
    e.add_argument("--calib-method", default="minmax", help="INT8 activation ranges: minmax, entropy or percentile")
    e.add_argument("--int4-method", default="awq", help="INT4 decoder weights: awq (activation-aware) or rtn")
    e.add_argument("--int4-block-size", type=int,
                   help="INT4 block size: 32, 64 or 128 (default: 32; tensorrt: 64 or 128, default 64)")
    e.add_argument("--int4-ratio", type=float, default=1.0,
                   help="openvino: share of decoder layers in INT4, the rest INT8, chosen by NNCF (default: 1.0)")
    e.add_argument("-o", "--output", type=Path, help="package directory to write (default: <model>-<quant>-<target>)")
    e.add_argument("--max-context", type=int, help="KV cache length in tokens (default: image tokens + 512)")
    e.add_argument("--max-pixels", type=int, help="dynamic-resolution models (Qwen-VL): the most pixels an image is "
                   "resized to, the package's token budget (default: the checkpoint's processor's)")
    e.add_argument("--min-pixels", type=int, help="dynamic-resolution models: the fewest pixels (default: the "
                   "checkpoint's processor's)")
    e.add_argument("--kv-cache", choices=("state", "buffer", "in_place"),
                   help="how the decoder holds its KV cache: state (in the engine; openvino default), "
                        "in_place (buffers the decoder writes itself, built on GroupQueryAttention; onnxruntime "
                        "default where the decoder allows it) or buffer (explicit inputs/outputs, traced decoder)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing package at --output")
    e.add_argument("--trace-cache", metavar="DIR",
                   help="keep traced graphs in DIR and reuse them when the same model is exported again, for "
                        "another target or precision (default: $MMEDGE_TRACE_CACHE; none)")
    e.add_argument("--build-engines", action="store_true",
                   help="tensorrt: build the engines right away (this machine needs TensorRT and the GPU that will "
                        "run them); otherwise `mmedge build` or the first load on the device does it")

    bd = sub.add_parser("build", help="build a TensorRT package's engines on this device")
    bd.add_argument("package", type=Path)
    bd.add_argument("--workspace", type=float, help="GiB of GPU memory TensorRT may use for tactics (default: its own)")
    bd.add_argument("--typing", default="auto", choices=("auto", "strong", "weak"),
                    help="strong: the graph's types (TensorRT >= 10.12 default); weak: precision flags "
                         "(TensorRT 10.3, JetPack 6.2); auto picks by version")
    bd.add_argument("--force", action="store_true", help="rebuild even if this device's engines are current")

    r = sub.add_parser("run", help="answer a prompt about an image with a package (or transcribe audio: Whisper)")
    r.add_argument("package", type=Path)
    r.add_argument("--image", action="append", default=[],
                   help="image file (PNG, JPEG, ...); repeat for several images, in the order the prompt takes them")
    r.add_argument("--video", help="video file (MP4, WebM, MKV, ...; read with PyAV), for families that take video "
                                   "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL); frames are sampled at the package's rate")
    r.add_argument("--prompt", help='the question or task, e.g. "caption en"')
    r.add_argument("--audio", help="speech to transcribe, for packages that take audio (Whisper): WAV (PCM or float, "
                                   "any rate: resampled), or FLAC/MP3/... with PyAV; longer than the model's "
                                   "window (30 s), transcribed window by window")
    r.add_argument("--language", help='--audio: the language spoken, a code the model knows ("en", "de", ...); '
                                      "default: detected")
    r.add_argument("--task", choices=("transcribe", "translate"),
                   help="--audio: transcribe (default), or translate into English")
    r.add_argument("--detect", metavar="OBJECTS", help='boxes around these objects ("cat ; dog"), asked in the '
                   "family's detection prompt (PaliGemma, Qwen-VL, Florence-2), or a detection task of the family's "
                   '("<OD>" on Florence-2); printed a box a line, in the image\'s pixels')
    r.add_argument("--draw", metavar="OUT.png", help="write the image with the answer's boxes drawn on it")
    r.add_argument("--stream", action="store_true", help="print text as it is generated")
    r.add_argument("--raw-prompt", action="store_true", help="pass --prompt through as the full formatted prompt")
    _generation_args(r)
    _engine_args(r)

    c = sub.add_parser("chat", help="a conversation about images with a package: questions from stdin, one a line",
                       description="Each line read from stdin is a question; the answer streams to stdout, and the "
                       "next question extends the conversation (the KV cache keeps the earlier turns). Lines "
                       "starting with / are commands: /image PATH (show an image with the next question), /reset "
                       "(forget the conversation), /quit. Interactive when stdin is a terminal; piped input runs "
                       "every line and exits 2 at the first error.")
    c.add_argument("package", type=Path)
    c.add_argument("--image", action="append", default=[], help="image file for the first question (repeatable)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--drop-oldest", action="store_true",
                   help="when the conversation outgrows the context, leave out its oldest exchanges (default: stop "
                   "with an error)")
    _generation_args(c)
    _engine_args(c)

    s = sub.add_parser("serve", help="serve packages over HTTP: the OpenAI chat-completions API",
                       description="POST /v1/chat/completions (OpenAI's format: image_url parts as data URIs, "
                       "stream, max_tokens, temperature, top_p, seed, stop), GET /v1/models, GET /health. Each "
                       "package runs its requests one at a time, in arrival order, from a bounded queue; a "
                       "client that sends its conversation again finds the earlier turns in the KV cache.")
    s.add_argument("package", nargs="+", metavar="[NAME=]PACKAGE",
                   help="package directory, served as NAME (default: its directory's name, without .pkg)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface, with --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=16, help="requests that may wait per package (default 16); "
                   "more are answered 429")
    s.add_argument("--max-image-mb", type=float, default=20.0, help="the most one image may weigh (default 20)")
    s.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may take, waiting and generating (default 300); then 504")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MMEDGE_API_KEY, else none)")
    s.add_argument("--allow-local-files", action="store_true",
                   help="image_url may be a path (or file:// URL) on this machine")
    s.add_argument("--ray", action="store_true", help="serve on Ray Serve: the cluster at $RAY_ADDRESS, or a local "
                   "Ray instance (pip install 'ray[serve]')")
    s.add_argument("--replicas", type=int, default=2, help="with --ray: processes each holding the packages "
                   "(default 2)")
    _engine_args(s)

    m = sub.add_parser("embed", help="image or text embeddings from an embedding package (CLIP, SigLIP)")
    m.add_argument("package", type=Path)
    m.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    m.add_argument("--text", action="append", default=[], help="text; repeat for several")
    m.add_argument("--out", type=Path, help="write the embeddings to OUT.json or OUT.npy (one array: images or "
                   "texts, a row each) instead of printing JSON")
    _embedder_args(m)

    c = sub.add_parser("classify", help="zero-shot classification of an image with an embedding package")
    c.add_argument("package", type=Path)
    c.add_argument("--image", required=True, help="image file")
    c.add_argument("--labels", required=True, help="comma-separated labels, e.g. cat,dog,cup")
    c.add_argument("--template", help='how a label is written before it is embedded, {} the label (default: the '
                   'package\'s, e.g. "a photo of a {}.")')
    c.add_argument("--json", action="store_true", help="print one JSON object")
    _embedder_args(c)

    i = sub.add_parser("inspect", help="show a package's graphs, sizes and export verification")
    i.add_argument("package", type=Path)
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    v = sub.add_parser("eval", help="score a package (or a PyTorch checkpoint) on a task by exact match")
    v.add_argument("package", type=Path, help="package directory, or a Hugging Face checkpoint directory")
    v.add_argument("--task", default="shapes", help="task (default: shapes)")
    v.add_argument("-n", type=int, default=500, help="number of examples (default: 500)")
    v.add_argument("--seed", type=int, help="data seed (default: the held-out seed 12345)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--backend", help="engine to run a package on (default: the package's target)")
    v.add_argument("--device", help="OpenVINO device: CPU (default), GPU, NPU, AUTO, ...")
    v.add_argument("--inference-precision", choices=("f32", "bf16", "f16"),
                   help="OpenVINO on CPU: compute precision, f32 (default: the package's numbers), bf16 or f16 "
                   "(faster where the CPU has AVX512-BF16/AMX or FP16; results move slightly)")
    v.add_argument("--threads", type=int, default=0, help="intra-op threads (default: engine's choice)")
    v.add_argument("--batch", type=int, default=16,
                   help="examples generated together (default: 16). A package runs them through "
                   "Pipeline.generate_batch (prompts of similar length together; 1 where its decoder takes one "
                   "sequence: TensorRT, Core ML); a PyTorch checkpoint batches only examples of the same input "
                   "shapes, so nothing is padded")

    b = sub.add_parser("bench", help="time and memory of a package's stages, median and spread over runs")
    b.add_argument("package", type=Path)
    b.add_argument("--image", help="image file (default: a fixed shapes-task scene)")
    b.add_argument("--prompt", default="caption", help="prompt (default: caption)")
    b.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run, EOS ignored (default: 64)")
    b.add_argument("--runs", type=int, default=5, help="timed runs (default: 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    b.add_argument("--threads", type=int, default=0, help="intra-op threads (default: engine's choice)")
    b.add_argument("--backend", help="engine to run on (default: the package's target)")
    b.add_argument("--device", help="OpenVINO device: CPU (default), GPU, NPU, AUTO, ...")
    b.add_argument("--inference-precision", choices=("f32", "bf16", "f16"),
                   help="OpenVINO on CPU: compute precision, f32 (default: the package's numbers), bf16 or f16 "
                   "(faster where the CPU has AVX512-BF16/AMX or FP16; results move slightly)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    sub.add_parser("list-models", help="aliases, built-in models and supported families")
    return p


def _generation_args(r) -> None:
    r.add_argument("--max-new-tokens", type=int)
    r.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--temperature", type=float)
    r.add_argument("--top-k", type=int)
    r.add_argument("--top-p", type=float)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    r.add_argument("--max-pixels", type=int, help="dynamic-resolution packages: the most pixels per image "
                   "(default: the package's)")
    r.add_argument("--min-pixels", type=int, help="dynamic-resolution packages: the fewest pixels per image")
    r.add_argument("--max-image-tokens", type=int, help="dynamic-resolution packages: the most image tokens "
                   "the prompt's images take together (shared equally)")
    r.add_argument("--max-video-tokens", type=int, help="the most tokens the video takes (its frames resized "
                   "down, or fewer frames sampled where each has a fixed size)")


def _engine_args(r) -> None:
    r.add_argument("--backend", help="engine to run on (default: the package's target)")
    r.add_argument("--providers", help="ONNX Runtime execution providers in priority order, comma-separated "
                   "(default: CPUExecutionProvider)")
    r.add_argument("--device", help="OpenVINO device: CPU (default), GPU, NPU, AUTO, ...; Core ML compute units: "
                                    "ALL (default; the decoder CPU_AND_GPU), CPU_ONLY, CPU_AND_GPU, CPU_AND_NE")
    r.add_argument("--inference-precision", choices=("f32", "bf16", "f16"),
                   help="OpenVINO on CPU: compute precision, f32 (default: the package's numbers), bf16 or f16 "
                   "(faster where the CPU has AVX512-BF16/AMX or FP16; results move slightly)")
    r.add_argument("--kv-cache-precision", choices=("f32", "f16", "u8"),
                   help="OpenVINO: the KV cache's precision, f32 (default) or f16 / u8 (faster decode; answers may "
                   "change: u8 cost the int4 demo packages 1-1.2 points)")
    r.add_argument("--threads", type=int, default=0, help="intra-op threads (default: engine's choice)")
    r.add_argument("--low-memory", action="store_true",
                   help="ONNX Runtime: keep weights memory-mapped, no repacked copies (less memory, slower fp32)")
    verify = r.add_mutually_exclusive_group()
    verify.add_argument("--no-verify", action="store_true", help="skip checking file hashes at load")
    verify.add_argument("--verify-full", action="store_true",
                        help="hash every file at load, even those that are the very files verified before")


def _embedder_args(r) -> None:
    r.add_argument("--backend", help="engine to run on (default: the package's target)")
    r.add_argument("--device", help="OpenVINO device: CPU (default), GPU, NPU, AUTO, ...")
    r.add_argument("--threads", type=int, default=0, help="intra-op threads (default: engine's choice)")
    r.add_argument("--no-verify", action="store_true", help="skip checking file hashes at load")


def _embedder(args):
    from mmedge.runtimes import Embedder

    return Embedder.load(args.package, backend=args.backend, device=args.device, threads=args.threads,
                         verify=not args.no_verify)


def _load_options(args) -> dict:
    """Pipeline.load's engine options from the arguments of `run`, `chat` and `serve`."""
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    return dict(backend=args.backend, providers=providers, threads=args.threads,
                verify="full" if args.verify_full else not args.no_verify, device=args.device,
                inference_precision=args.inference_precision, kv_cache_precision=args.kv_cache_precision,
                low_memory=args.low_memory)


def _load(args):
    """The package's Pipeline, with the engine options of `run` and `chat`."""
    from mmedge.runtimes import Pipeline

    return Pipeline.load(args.package, **_load_options(args))


def _generation_options(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=True if args.sample else None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or None,
        max_pixels=args.max_pixels,
        min_pixels=args.min_pixels,
        max_image_tokens=args.max_image_tokens,
        max_video_tokens=args.max_video_tokens,
    )


def cmd_export(args) -> int:
    from mmedge.exporters.export import ExportOptions, export

    output = args.output or Path(f"{Path(args.model).name}-{args.quant}-{args.target}")
    manifest = export(
        ExportOptions(
            model=args.model,
            output=output,
            target=args.target,
            quant=args.quant,
            max_context=args.max_context,
            max_pixels=args.max_pixels,
            min_pixels=args.min_pixels,
            overwrite=args.overwrite,
            calib=args.calib,
            calib_samples=args.calib_samples,
            calib_method=args.calib_method,
            int4_method=args.int4_method,
            int4_block_size=args.int4_block_size,
            int4_ratio=args.int4_ratio,
            kv_cache=args.kv_cache,
            trace_cache=args.trace_cache,
            build_engines=args.build_engines,
        )
    )
    size = sum(f.bytes for f in manifest.files.values())
    if manifest.quantization:
        _print_quantization(manifest.quantization)
    print(f"wrote {output} ({manifest.family}, {manifest.target}, {_mb(size)})")
    return 0


def cmd_build(args) -> int:
    from mmedge.manifest import load_manifest
    from mmedge.runtimes.backends.tensorrt_build import build_package, engine_dir, import_tensorrt

    manifest = load_manifest(args.package)
    done = build_package(args.package, manifest, workspace_gb=args.workspace, typing=args.typing, force=args.force)
    for part, seconds in done.items():
        print(f"  {part:<16} {'current' if seconds == 'current' else f'built in {seconds} s'}")
    print(f"engines in {engine_dir(args.package, import_tensorrt())}")
    return 0


def _print_quantization(q: dict) -> None:
    if "embedding_cosine" in q:  # an embedding package (CLIP, SigLIP): embeddings against fp32
        cal = q["calibration"]
        used = f"calibrated on {cal['calibration_samples']} images and {cal['texts']} texts, " if cal["used"] else ""
        print(f"quantization {q['name']}: {used}measured on {q['held_out_images']} held-out images and "
              f"{q['texts']} texts from {cal['source']}")
        print(f"{'graph':<16}{'precision':<11}{'fp32':>10}{'now':>10}{'cosine mean':>13}{'worst':>10}")
        for name, g in q["graphs"].items():
            cos = q["embedding_cosine"][name]
            print(f"{name:<16}{g['precision']:<11}{_mb(g['bytes_fp32']):>10}{_mb(g['bytes']):>10}"
                  f"{cos['cosine_mean']:>13.5f}{cos['cosine_min']:>10.5f}")
        print(f"held-out images whose most similar text is fp32's: {100 * q['top1_agreement']:.1f}%")
        return
    if "teacher_forced_top1_agreement" not in q:  # Core ML: compressed at export, not run there
        print(f"weights {q['name']}: {q['calibration']['why']}")
        print(f"{'graph':<16}{'precision':<11}{'before':>10}{'now':>10}  scheme")
        for name, g in q["graphs"].items():
            detail = ", ".join(f"{k} {v}" for k, v in g.items() if k in ("block_size", "bits", "group_size", "method"))
            print(f"{name:<16}{g['precision']:<11}{_mb(g['bytes_before']):>10}{_mb(g['bytes']):>10}  "
                  f"{g['scheme']}{' (' + detail + ')' if detail else ''}")
        print(f"{'total':<27}{_mb(q['bytes_before']):>10}{_mb(q['bytes']):>10}")
        if q.get("int4_clip"):
            c = q["int4_clip"]
            print(f"int4 ranges chosen on {q['calibration']['calibration_samples']} calibration samples: "
                  f"activation-weighted error {c['error_ratio']:.2f}x round-to-nearest's over {c['layers']} layers")
        return
    cal = q["calibration"]
    used = f"calibrated on {cal['calibration_samples']} samples, " if cal.get("used", True) else ""
    print(f"quantization {q['name']}: {used}measured on {cal['held_out_samples']} held-out samples "
          f"from {cal['source']}")
    print(f"{'graph':<16}{'precision':<11}{'fp32':>10}{'now':>10}{'max abs err':>13}{'rel L2 err':>12}")
    for name, g in q["graphs"].items():
        err = f"{g['held_out_max_abs_err']:>13.3g}{g['held_out_rel_l2_err']:>12.3g}" if "held_out_max_abs_err" in g else ""
        print(f"{name:<16}{g['precision']:<11}{_mb(g['bytes_fp32']):>10}{_mb(g['bytes']):>10}{err}")
    print(f"{'total':<27}{_mb(q['bytes_fp32']):>10}{_mb(q['bytes']):>10}"
          f"   ({q['bytes_fp32'] / max(1, q['bytes']):.1f}x smaller)")
    print(f"decoder logits, teacher-forced: top-1 agreement {q['teacher_forced_top1_agreement']:.1%}, "
          f"KL {q['teacher_forced_kl']:.2e} over {q['teacher_forced_positions']} positions; "
          f"greedy answers identical to fp32: {q['greedy_agreement']:.1%}")


def cmd_run(args) -> int:
    pipe = _load(args)
    options = dict(_generation_options(args), raw_prompt=args.raw_prompt or None)
    if args.audio is not None:
        return _transcribe(pipe, args, options)
    if args.language is not None or args.task is not None:
        raise InputError("--language and --task are for --audio (packages that take speech: Whisper)")
    if not args.image and not args.video:
        raise InputError("give an image (--image) or, for families that take video, --video")
    if (args.prompt is None) == (args.detect is None):
        raise InputError("give --prompt (a question) or --detect (objects to box), one of them")
    image = args.image[0] if len(args.image) == 1 else (args.image or None)
    if args.detect is not None or args.draw:
        return _detect(pipe, args, image, options)
    if args.stream:
        _write_stream(pipe.stream(image, args.prompt, video=args.video, **options))
    else:
        print(pipe.generate(image, args.prompt, video=args.video, **options))
    return 0


def _write_stream(pieces) -> None:
    """Text pieces to stdout as they come, then a newline."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _detect(pipe, args, image, options: dict) -> int:
    """`run --detect` / `--draw`: the boxes found, a line each, and drawn on a copy of the image."""
    if len(args.image) != 1 or args.video:
        raise InputError("--detect and --draw take one --image")
    if args.stream:
        raise InputError("--detect and --draw print the boxes once the answer is complete; drop --stream")
    if args.detect is None:
        pipe.boxes(image, "")  # a family that writes no boxes is refused before generating
    found = (pipe.detect(image, args.detect, **options) if args.detect is not None
             else pipe.boxes(image, pipe.generate(image, args.prompt, **options)))
    print(found.text)
    for box in found.boxes:
        print(f"{box.label or '-'}: {box.x0:.0f} {box.y0:.0f} {box.x1:.0f} {box.y1:.0f}")
    if found.segments:
        print(f"mask tokens for {', '.join(found.segments)}: not decoded (PaliGemma's mask decoder is a model of "
              "its own)")
    if args.draw:
        from mmedge.runtimes.boxes import draw
        from mmedge.runtimes.preprocess import load_image

        draw(load_image(image), found.boxes, args.draw)
        log.info("drew %d box(es) on %s", len(found.boxes), args.draw)
    return 0


def _transcribe(pipe, args, options: dict) -> int:
    """`run --audio`: the text spoken, streamed or at once."""
    for flag, given in (("--image", args.image), ("--video", args.video), ("--prompt", args.prompt),
                        ("--detect", args.detect), ("--draw", args.draw), ("--raw-prompt", args.raw_prompt)):
        if given:
            raise InputError(f"--audio takes no {flag}: a speech package transcribes what it hears")
    if args.stream:
        _write_stream(pipe.stream_transcription(args.audio, language=args.language, task=args.task, **options))
    else:
        print(pipe.transcribe(args.audio, language=args.language, task=args.task, **options))
    return 0


def cmd_chat(args) -> int:
    """Questions from stdin, a line each, answers streamed to stdout; see the `chat` command's help."""
    pipe = _load(args)
    chat = pipe.chat(system=args.system, overflow="drop_oldest" if args.drop_oldest else "error")
    options = _generation_options(args)
    pipe.options(**options)  # a bad option fails before the first question
    interactive = sys.stdin.isatty()
    images = list(args.image)
    status = 0
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/quit":
                break
            if command == "/reset":
                chat.reset()
            elif command == "/image" and rest.strip():
                images.append(rest.strip())
            else:
                error = InputError(f"unknown command {line!r}: /image PATH, /reset or /quit")
                if not interactive:
                    raise error
                print(f"mmedge: error: {error}", file=sys.stderr)
            continue
        try:
            _write_stream(chat.stream(images or None, line, **options))
            images = []
        except MmedgeError as exc:
            if not interactive:
                raise
            print(f"mmedge: error: {exc}", file=sys.stderr)
            status = exc.exit_code
    if images:
        raise InputError(f"{len(images)} image(s) given but no question after them")
    return status if not interactive else 0


def cmd_serve(args) -> int:
    try:
        from mmedge.serve import ServeConfig, parse_packages, serve
    except ImportError as exc:
        raise InputError(f"mmedge serve needs its web stack ({exc.name} is missing): pip install 'mmedge[serve]'")
    for name, value, low in (("--max-queue", args.max_queue, 0), ("--max-image-mb", args.max_image_mb, 0.001),
                             ("--timeout", args.timeout, 0.001), ("--port", args.port, 0)):
        if not value >= low or (name == "--port" and value > 65535):
            raise InputError(f"{name} {value} is out of range")
    config = ServeConfig(max_queue=args.max_queue, max_image_mb=args.max_image_mb, timeout=args.timeout,
                         api_key=args.api_key or os.environ.get("MMEDGE_API_KEY") or None,
                         allow_local_files=args.allow_local_files)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the models", args.host)
    packages = parse_packages(args.package)
    if args.ray:
        if args.replicas < 1:
            raise InputError(f"--replicas {args.replicas}: at least 1")
        try:
            from mmedge.serve import serve_ray
            import ray  # noqa: F401
        except ImportError:
            raise InputError("--ray needs Ray Serve: pip install 'ray[serve]'") from None
        serve_ray(packages, host=args.host, port=args.port, config=config, replicas=args.replicas,
                  **_load_options(args))
        return 0
    serve(packages, host=args.host, port=args.port, config=config, **_load_options(args))
    return 0


def _prompt_line(m) -> str:
    """How many image tokens a generative package's images take (what an audio package hears); an encoder-
    decoder's prompt goes through its encoder."""
    pre, encoder = m.preprocess, {"prompt": "; through the encoder (encoder-decoder)"}.get(m.schemes.encoder, "")
    if m.audio is not None:
        a = m.audio
        return (f"audio at {a.sampling_rate} Hz, {a.chunk_length}-s windows of {a.feature_size} mel bins; "
                f"{len(m.prompt.languages)} languages, tasks {', '.join(m.prompt.speech_tasks) or 'none'}")
    return _image_line(m, pre) + encoder


def _image_line(m, pre) -> str:
    if pre.resize_mode == "smart_resize":  # dynamic resolution: the budget, not a count
        most = pre.max_pixels // pre.token_pixels()
        video = f"; video at {pre.video_fps:g} frames/s" if m.prompt.video_marker else ""
        return f"up to {most} image tokens an image ({pre.min_pixels}-{pre.max_pixels} pixels){video}"
    if pre.frames_per_image() > 1:
        return f"{m.prompt.image_seq_len} image tokens a tile, up to {pre.frames_per_image()} tiles an image"
    return f"{m.prompt.image_seq_len} image tokens"


def cmd_inspect(args) -> int:
    from mmedge.manifest import load_manifest

    m = load_manifest(args.package)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    total = sum(f.bytes for f in m.files.values())
    print(f"package     {args.package}")
    print(f"family      {m.family} ({m.model_type})    target {m.target}    format {m.format_version}")
    if m.kind == "embedding":
        e = m.embedding
        bias = f" + {e.logit_bias:g}" if e.logit_bias else ""
        print(f"embedding   {e.dim} dims; logit {e.logit_scale:g} x cosine{bias}, {e.activation}; texts up to "
              f"{e.text_length} tokens ({e.text_padding}); batches up to {e.max_batch}; template {e.template!r}")
    else:
        print(f"context     {m.kv_cache.max_context} tokens; KV {m.kv_cache.num_layers} layers x "
              f"{m.kv_cache.num_kv_heads} heads x {m.kv_cache.head_dim} ({m.kv_cache.dtype}, {m.kv_cache.storage})")
        print(f"prompt      {_prompt_line(m)}; attention {m.schemes.attention}; positions {m.schemes.positions}")
    print(f"size        {_mb(total)} in {len(m.files)} files (sha256 verified)")
    print()
    print(f"{'graph':<16}{'precision':<11}{'size':>10}  inputs -> outputs")
    for name, g in m.graphs.items():
        weights = (g.file + ".data", str(Path(g.file).with_suffix(".bin")))  # ONNX external data, OpenVINO weights
        size = sum(f.bytes for fname, f in m.files.items()
                   if fname == g.file or fname in weights or fname.startswith(g.file + "/"))  # Core ML: a directory
        ins = ", ".join(_short(n, s.shape) for n, s in g.inputs.items() if not n.startswith("past."))
        outs = ", ".join(_short(n, s.shape) for n, s in g.outputs.items() if not n.startswith("present."))
        kv = " (+ past/present k,v per layer)" if any(n.startswith("past.") for n in g.inputs) else ""
        kv = kv or (" (k,v per layer held as engine state)" if name == "decoder" and m.kv_cache.storage == "state"
                    else "")
        print(f"{name:<16}{g.precision:<11}{_mb(size):>10}  {ins} -> {outs}{kv}")
    report = m.verification.get("graphs", {})
    if report:
        print()
        print(f"export parity vs {m.verification.get('reference', 'reference')} (inputs not used for tracing)")
        print(f"{'graph':<16}{'output':<18}{'max abs err':>12}{'max |ref|':>12}  result")
        for name, r in report.items():
            for key, what in (("torch_stateful_wrapper", "the stateful module, fp32 cache, vs the traced decoder"),
                              ("torch_fp16_state", "the stateful module, fp16 cache, vs the traced decoder"),
                              ("torch_traced", "the TorchScript trace converted, vs the module")):
                for out, v in r.get(key, {}).get("outputs", {}).items():
                    print(f"{name:<16}{out:<18}{v['max_abs_err']:>12.2e}{v['max_abs_ref']:>12.3g}  "
                          f"{'ok' if r[key]['passed'] else 'FAIL'}: {what} (PyTorch)")
            if r["passed"] is None:
                print(f"{name:<16}{'':<18}{'':>24}  not run: {r.get('not_run', 'no engine here')}")
                continue
            outputs = r["outputs"]
            shown = {k: v for k, v in outputs.items() if not k.startswith("present.")}
            presents = [v for k, v in outputs.items() if k.startswith("present.")]
            if presents:
                shown["present.* (worst)"] = max(presents, key=lambda v: v["max_abs_err"])
            for out, v in shown.items():
                status = "ok" if r["passed"] else "FAIL"
                print(f"{name:<16}{out:<18}{v['max_abs_err']:>12.2e}{v['max_abs_ref']:>12.3g}  {status}")
    generation = m.verification.get("generation")
    if generation:
        print()
        if generation["passed"]:
            print(f"generation through the runtime at export: ok ({generation['prompt_tokens']} prompt tokens, "
                  f"{generation['new_tokens']} new, {generation['backend']})")
        else:
            print(f"generation through the runtime at export: not run: {generation.get('not_run', '')}")
    if m.quantization:
        print()
        _print_quantization(m.quantization)
    if m.tensorrt:
        print()
        _print_tensorrt(args.package, m)
    if m.coreml:
        print()
        print(f"Core ML: deployment target {m.coreml['deployment_target']} (specification "
              f"{m.coreml['specification_version']}); decoder states:")
        for name, st in m.coreml["states"].items():
            print(f"  {name:<14}{st['dtype']} [{','.join(map(str, st['shape']))}]")
    return 0


def _print_tensorrt(package: Path, m) -> None:
    """A TensorRT package's optimization profiles (the decoder's sequence range) and the engines built so far."""
    print("TensorRT optimization profiles (min / opt / max)")
    for graph, profiles in m.tensorrt.get("profiles", {}).items():
        first = next(iter(m.graphs[graph].inputs))
        ranges = "; ".join(f"{first} {p[first]['min']} / {p[first]['opt']} / {p[first]['max']}" for p in profiles)
        print(f"  {graph:<16}{ranges}")
    engines = sorted(p.parent.name for p in (package / "engines").glob("*/built.json"))
    print(f"engines built for: {', '.join(engines) if engines else 'none yet (mmedge build, on the device)'}")


def cmd_eval(args) -> int:
    from mmedge.evaluate import DEFAULT_SEED, evaluate, package_answerer, reference_answerer
    from mmedge.manifest import MANIFEST_NAME

    path = args.package
    if not path.exists() and "/" not in str(path):
        from mmedge.exporters.checkpoint import shipped_models

        path = shipped_models().get(str(path), path)  # a shipped demo model by name
    seed = DEFAULT_SEED if args.seed is None else args.seed
    package = (path / MANIFEST_NAME).exists() or not (path / "config.json").exists()
    if _embedding(path, package):  # a dual encoder: the zero-shot form of the task
        from mmedge.evaluate import ReferenceEmbedder, evaluate_zero_shot
        from mmedge.runtimes import Embedder

        embedder = Embedder.load(path, backend=args.backend, threads=args.threads, device=args.device,
                                 inference_precision=args.inference_precision) if package else ReferenceEmbedder(path)
        what = "package, zero-shot" if package else "PyTorch checkpoint, zero-shot"
        result = evaluate_zero_shot(embedder, n=args.n, seed=seed, task=args.task, progress=not args.json)
    else:
        if package:
            answer = package_answerer(path, batch=args.batch, backend=args.backend, threads=args.threads,
                                      device=args.device, inference_precision=args.inference_precision)
            what = "package"
        else:
            answer = reference_answerer(path, batch=args.batch)
            what = "PyTorch checkpoint"
        result = evaluate(answer, n=args.n, seed=seed, task=args.task, progress=not args.json)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.task} on {path} ({what}), {result['n']} examples, seed {seed}")
    for kind, acc in result["per_kind"].items():
        print(f"  {kind:<10}{100 * acc:6.1f}%")
    print(f"  {'all':<10}{100 * result['accuracy']:6.1f}%")
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    if not args.image and not args.text:
        raise InputError("give --image and/or --text to embed")
    out = args.out
    if out is not None and out.suffix.lower() not in (".json", ".npy"):
        raise InputError(f"--out must end in .json or .npy, got {out.name}")
    if out is not None and out.suffix.lower() == ".npy" and args.image and args.text:
        raise InputError("an .npy file holds one array: give --image or --text, not both (or write .json)")
    for path in args.image:
        if not Path(path).is_file():
            raise InputError(f"image not found: {path}")
    embedder = _embedder(args)
    result = {}
    if args.image:
        result["images"] = embedder.embed_images(args.image)
    if args.text:
        result["texts"] = embedder.embed_texts(args.text)
    if out is not None and out.suffix.lower() == ".npy":
        np.save(out, next(iter(result.values())))
        log.info("wrote %s (%d x %d)", out, *next(iter(result.values())).shape)
        return 0
    doc = {"model_type": embedder.manifest.model_type, "dim": embedder.spec.dim}
    doc.update({key: [{"input": str(src), "embedding": row.tolist()} for src, row in
                      zip(args.image if key == "images" else args.text, rows)] for key, rows in result.items()})
    if out is None:
        print(json.dumps(doc))
    else:
        out.write_text(json.dumps(doc) + "\n")
        log.info("wrote %s", out)
    return 0


def cmd_classify(args) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise InputError("--labels is empty; give comma-separated labels, e.g. cat,dog,cup")
    if not Path(args.image).is_file():
        raise InputError(f"image not found: {args.image}")
    embedder = _embedder(args)
    ranked = embedder.classify(args.image, labels, template=args.template)
    if args.json:
        print(json.dumps({"labels": [{"label": label, "probability": p} for label, p in ranked],
                          "activation": embedder.spec.activation}))
        return 0
    width = max(len(label) for label, _ in ranked)
    for label, p in ranked:
        print(f"{label:<{width}}  {p:.4f}")
    return 0


def _embedding(path: Path, package: bool) -> bool:
    """Whether `path` (a package, else a checkpoint) is an embedding model's."""
    if package:
        from mmedge.manifest import load_manifest

        return (path / "mmedge.json").is_file() and load_manifest(path, verify_files=False).kind == "embedding"
    from mmedge.exporters import checkpoint as ckpt

    family = ckpt.family_for(ckpt.read_config(path).get("model_type", ""))
    return getattr(family, "KIND", "generative") == "embedding"


def cmd_bench(args) -> int:
    from mmedge.bench import bench, table

    result = bench(args.package, image=args.image, prompt=args.prompt, new_tokens=args.new_tokens, runs=args.runs,
                   warmup=args.warmup, threads=args.threads, backend=args.backend, device=args.device,
                   inference_precision=args.inference_precision, progress=not args.json)
    print(json.dumps(result) if args.json else table(result))
    return 0


def cmd_list_models(args) -> int:
    from mmedge.exporters.checkpoint import builtin_models
    from mmedge.calibration.plan import PRECISIONS
    from mmedge.exporters.export import TARGETS
    from mmedge.exporters.family import aliases, families

    print(f"families (every one on every target: {', '.join(TARGETS)}; precisions: {', '.join(PRECISIONS)}, "
          "embedding models up to int8)")
    by_family: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for model_type, module in families().items():
        name = module.__name__.rsplit(".", 1)[-1]
        by_family.setdefault(name, []).append(model_type)
        kinds[name] = getattr(module, "KIND", "generative")
    for family, types in sorted(by_family.items()):
        kind = " (embedding: mmedge embed / classify)" if kinds[family] == "embedding" else ""
        print(f"  {family:<20} model types: {', '.join(sorted(types))}{kind}")
    print("aliases (resolved through the Hugging Face cache)")
    for alias, hub_id in sorted(aliases().items()):
        print(f"  {alias:<20} {hub_id}")
    print("built-in (shipped with mmedge or made here; no download)")
    for name, description in sorted(builtin_models().items()):
        print(f"  {name:<20} {description}")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _short(name: str, shape) -> str:
    return f"{name}[{','.join(str(d) for d in shape)}]"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("mmedge").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


COMMANDS = {
    "export": cmd_export,
    "build": cmd_build,
    "run": cmd_run,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "inspect": cmd_inspect,
    "eval": cmd_eval,
    "embed": cmd_embed,
    "classify": cmd_classify,
    "bench": cmd_bench,
    "list-models": cmd_list_models,
}


def _terminated(signum, frame):
    """SIGTERM unwinds like an error, so an export removes its staging folder and frees its output's lock."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args)
    except MmedgeError as exc:
        print(f"mmedge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mmedge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmedge inspect pkg | head -1`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if os.environ.get("MMEDGE_DEBUG"):
            raise
        print(f"mmedge: internal error: {type(exc).__name__}: {first_line(exc)} (MMEDGE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
