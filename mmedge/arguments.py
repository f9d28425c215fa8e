"""The `mmedge` command line's arguments: the parser, and the options its commands hand the runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmedge import __version__


def parser() -> argparse.ArgumentParser:
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
    e.add_argument("--calib-samples", type=int, help="calibration samples (default: 64; for a model over 1B "
                   "parameters fewer, at least 16, and on onnxruntime/openvino/tensorrt no more than their prompts' share of a "
                   "token budget, at least 8)")
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
                                   "(Qwen-VL, InternVL, GLM-4.1V); frames are sampled at the package's rate")
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
    generation_args(r)
    engine_args(r)

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
    generation_args(c)
    engine_args(c)

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
    engine_args(s)

    m = sub.add_parser("embed", help="image or text embeddings from an embedding package (CLIP, SigLIP)")
    m.add_argument("package", type=Path)
    m.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    m.add_argument("--text", action="append", default=[], help="text; repeat for several")
    m.add_argument("--out", type=Path, help="write the embeddings to OUT.json or OUT.npy (one array: images or "
                   "texts, a row each) instead of printing JSON")
    embedder_args(m)

    c = sub.add_parser("classify", help="zero-shot classification of an image with an embedding package")
    c.add_argument("package", type=Path)
    c.add_argument("--image", required=True, help="image file")
    c.add_argument("--labels", required=True, help="comma-separated labels, e.g. cat,dog,cup")
    c.add_argument("--template", help='how a label is written before it is embedded, {} the label (default: the '
                   'package\'s, e.g. "a photo of a {}.")')
    c.add_argument("--json", action="store_true", help="print one JSON object")
    embedder_args(c)

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
    inference_precision_arg(v)
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
    inference_precision_arg(b)
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    sub.add_parser("list-models", help="aliases, built-in models and supported families")
    return p


def generation_args(r) -> None:
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


def engine_args(r) -> None:
    r.add_argument("--backend", help="engine to run on (default: the package's target)")
    r.add_argument("--providers", help="ONNX Runtime execution providers in priority order, comma-separated "
                   "(default: CPUExecutionProvider)")
    r.add_argument("--device", help="OpenVINO device: CPU (default), GPU, NPU, AUTO, ...; Core ML compute units: "
                                    "ALL (default; the decoder CPU_AND_GPU), CPU_ONLY, CPU_AND_GPU, CPU_AND_NE")
    inference_precision_arg(r)
    r.add_argument("--kv-cache-precision", choices=("f32", "f16", "u8"),
                   help="OpenVINO: the KV cache's precision, f32 (default) or f16 / u8 (faster decode; answers may "
                   "change: u8 cost the int4 demo packages 1-1.2 points)")
    r.add_argument("--threads", type=int, default=0, help="intra-op threads (default: engine's choice)")
    r.add_argument("--low-memory", action="store_true",
                   help="ONNX Runtime: keep weights memory-mapped, no repacked copies; on the CPU, fp16 weights "
                   "widened as each is used, not all at load (less memory; slower fp32 and fp16)")
    verify = r.add_mutually_exclusive_group()
    verify.add_argument("--no-verify", action="store_true", help="skip checking file hashes at load")
    verify.add_argument("--verify-full", action="store_true",
                        help="hash every file at load, even those that are the very files verified before")


def embedder_args(r) -> None:
    r.add_argument("--backend", help="engine to run on (default: the package's target)")
    r.add_argument("--device", help="OpenVINO device: CPU (default), GPU, NPU, AUTO, ...")
    r.add_argument("--threads", type=int, default=0, help="intra-op threads (default: engine's choice)")
    r.add_argument("--no-verify", action="store_true", help="skip checking file hashes at load")


def load_options(args) -> dict:
    """Pipeline.load's engine options from the arguments of `run`, `chat` and `serve`."""
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    return dict(backend=args.backend, providers=providers, threads=args.threads,
                verify="full" if args.verify_full else not args.no_verify, device=args.device,
                inference_precision=args.inference_precision, kv_cache_precision=args.kv_cache_precision,
                low_memory=args.low_memory)


def generation_options(args) -> dict:
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




def inference_precision_arg(p) -> None:
    p.add_argument("--inference-precision", choices=("f32", "bf16", "f16"),
                   help="OpenVINO on CPU: compute precision of every graph, f32, bf16 or f16 (faster where the CPU "
                   "has AVX512-BF16/AMX or FP16; results move slightly). Default: f32 for float graphs, bf16 for "
                   "int8/int4 graphs where that is OpenVINO's CPU default (else f32)")
