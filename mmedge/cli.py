"""The `mmedge` command line: export, build, run, chat, serve, inspect, eval, bench, list-models.

Errors in the user's input print one line on stderr and exit with status 2;
anything unexpected prints one line too (MMEDGE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from mmedge.arguments import generation_options, load_options, parser
from mmedge.errors import InputError, MmedgeError, first_line

log = logging.getLogger("mmedge")


def _embedder(args):
    from mmedge.runtimes import Embedder

    return Embedder.load(args.package, backend=args.backend, device=args.device, threads=args.threads,
                         verify=not args.no_verify)


def _load(args):
    """The package's Pipeline, with the engine options of `run` and `chat`."""
    from mmedge.runtimes import Pipeline

    return Pipeline.load(args.package, **load_options(args))


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
    budget = (f" ({cal['prompt_tokens']:,} prompt tokens: a big model's default stops at {cal['token_budget']:,}; "
              f"--calib-samples to choose)" if cal.get("token_budget") and cal.get("prompt_tokens") else "")
    used = f"calibrated on {cal['calibration_samples']} samples{budget}, " if cal.get("used", True) else ""
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
          f"greedy answers identical to fp32: {q['greedy_agreement']:.1%}"
          + (f" (first {q['held_out_new_tokens']} token{'s' * (q['held_out_new_tokens'] > 1)} of each)"
             if "held_out_new_tokens" in q else ""))


def cmd_run(args) -> int:
    _check_run_flags(args)  # before the package loads: seconds to minutes for a big one
    pipe = _load(args)
    options = dict(generation_options(args), raw_prompt=args.raw_prompt or None)
    if args.audio is not None:
        return _transcribe(pipe, args, options)
    image = args.image[0] if len(args.image) == 1 else (args.image or None)
    if args.detect is not None or args.draw:
        return _detect(pipe, args, image, options)
    if args.stream:
        _write_stream(pipe.stream(image, args.prompt, video=args.video, **options))
    else:
        print(pipe.generate(image, args.prompt, video=args.video, **options))
    return 0


def _check_run_flags(args) -> None:
    """`run`'s flags that cannot go together, and --draw's file, refused with one line."""
    if args.audio is not None:
        for flag, given in (("--image", args.image), ("--video", args.video), ("--prompt", args.prompt),
                            ("--detect", args.detect), ("--draw", args.draw), ("--raw-prompt", args.raw_prompt)):
            if given:
                raise InputError(f"--audio takes no {flag}: a speech package transcribes what it hears")
        return
    if args.language is not None or args.task is not None:
        raise InputError("--language and --task are for --audio (packages that take speech: Whisper)")
    if not args.image and not args.video:
        raise InputError("give an image (--image) or, for families that take video, --video")
    if (args.prompt is None) == (args.detect is None):
        raise InputError("give --prompt (a question) or --detect (objects to box), one of them")
    if args.detect is not None or args.draw:
        if len(args.image) != 1 or args.video:
            raise InputError("--detect and --draw take one --image")
        if args.stream:
            raise InputError("--detect and --draw print the boxes once the answer is complete; drop --stream")
    if args.draw:
        from mmedge.runtimes.boxes import check_drawing

        check_drawing(args.draw)


def _write_stream(pieces) -> None:
    """Text pieces to stdout as they come, then a newline."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _detect(pipe, args, image, options: dict) -> int:
    """`run --detect` / `--draw`: the boxes found, a line each, and drawn on a copy of the image."""
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
    if args.stream:
        _write_stream(pipe.stream_transcription(args.audio, language=args.language, task=args.task, **options))
    else:
        print(pipe.transcribe(args.audio, language=args.language, task=args.task, **options))
    return 0


def cmd_chat(args) -> int:
    """Questions from stdin, a line each, answers streamed to stdout; see the `chat` command's help."""
    pipe = _load(args)
    chat = pipe.chat(system=args.system, overflow="drop_oldest" if args.drop_oldest else "error")
    chat.overflow_advice = "start a new conversation (/reset), or run mmedge chat with --drop-oldest"
    options = generation_options(args)
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
                  **load_options(args))
        return 0
    serve(packages, host=args.host, port=args.port, config=config, **load_options(args))
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
                  f"{generation['new_tokens']} new, {generation['backend']}"
                  + (f", the decoder in {generation['pieces']} pieces" if "pieces" in generation else "") + ")")
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
    if seed < 0:
        raise InputError(f"--seed must be a whole number >= 0, got {seed}")
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
    if out is not None and not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist")
    for path in args.image:
        if not Path(path).is_file():
            raise InputError(f"image not found: {path}")
    embedder = _embedder(args)
    result = {}
    if args.image:
        result["images"] = embedder.embed_images(args.image)
    if args.text:
        result["texts"] = embedder.embed_texts(args.text)
    try:
        if out is not None and out.suffix.lower() == ".npy":
            with open(out, "wb") as fh:  # the name as given (np.save would add .npy to x.NPY)
                np.save(fh, next(iter(result.values())))
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
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
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


STOP_GRACE_S = 5.0  # how long SIGTERM or Ctrl-C waits for an export to unwind before it is ended by force


def _stop_within(grace: float) -> None:
    """An export asked to stop ends within `grace` seconds even inside one long engine call. Python runs signal
    handlers between bytecodes only, so SIGTERM or Ctrl-C waits for the call to return (one OpenVINO run of
    Qwen2.5-VL-3B's vision encoder over a 4,900-patch image: ~35 s). The C-level handler also writes the
    signal's number to a wakeup pipe; a thread woken by it waits `grace` seconds for the export to unwind as
    usual and, if the process is still there, removes the staging folders itself and ends the process with
    the status the handler would have given (128 + the signal). The output's lock ends with the process."""
    from mmedge.exporters.package import remove_staged

    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            signum = os.read(read, 1)[0]
            if signum in (signal.SIGTERM, signal.SIGINT):
                threading.Event().wait(grace)
                print(f"mmedge: stopped ({signal.Signals(signum).name}; the engine call did not return within "
                      f"{grace:g} s): staging folder removed", file=sys.stderr, flush=True)
                remove_staged()
                os._exit(128 + signum)

    threading.Thread(target=watch, name="mmedge-stop", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
        if argv is None and args.command == "export":  # the process is this command's (not a caller's main())
            _stop_within(STOP_GRACE_S)
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
