"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def assert_one_line_error(result, *needles: str):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err  # progress lines may precede it
    assert errors[0].startswith("mmedge: error: ")
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def package(packages):
    return packages("paligemma-gqa")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_missing_image(package, tmp_path):
    assert_one_line_error(run_cli("run", str(package), "--image", str(tmp_path / "nope.png"), "--prompt", "x"),
                          "image not found")


def test_non_image_file(package, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not pixels")
    assert_one_line_error(run_cli("run", str(package), "--image", str(bad), "--prompt", "x"), "not an image")


def test_truncated_image(package, image_file, tmp_path):
    cut = tmp_path / "cut.png"
    cut.write_bytes(image_file.read_bytes()[:200])
    assert_one_line_error(run_cli("run", str(package), "--image", str(cut), "--prompt", "x"), "damaged or truncated")


def test_prompt_longer_than_context(package, image_file):
    prompt = "describe " * 2000
    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", prompt),
                          "context holds", "--max-context")


def test_not_a_package(tmp_path, image_file):
    assert_one_line_error(run_cli("run", str(tmp_path), "--image", str(image_file), "--prompt", "x"),
                          "not an mmedge package")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "missing")), "package not found")


def test_hash_mismatch_is_refused(package, image_file, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    assert_one_line_error(run_cli("run", str(copy), "--image", str(image_file), "--prompt", "x"),
                          "decoder.onnx", "sha256")
    assert_one_line_error(run_cli("inspect", str(copy)), "sha256")


def test_missing_graph_file(package, image_file, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    (copy / "projector.onnx").unlink()
    assert_one_line_error(run_cli("run", str(copy), "--image", str(image_file), "--prompt", "x"),
                          "projector.onnx", "missing")


def test_export_refuses_existing_output(package):
    assert_one_line_error(run_cli("export", "--model", "tiny-paligemma", "-o", str(package)),
                          "already exists", "--overwrite")


def test_unknown_model_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("export", "--model", str(empty), "-o", str(tmp_path / "o")), "no config.json")
    assert_one_line_error(run_cli("export", "--model", "no-such-model", "-o", str(tmp_path / "o")),
                          "not a directory, a known alias")


def test_export_refuses_at_once_what_memory_or_disk_clearly_cannot_hold(checkpoints, tmp_path, monkeypatch):
    """Counted from the weight files' headers before anything loads: 10^13 parameters fit nowhere."""
    import struct

    from mmedge.errors import ExportError
    from mmedge.exporters import resources
    from mmedge.exporters.export import ExportOptions, export

    model = tmp_path / "huge"
    shutil.copytree(checkpoints["paligemma-gqa"], model)
    header = json.dumps({"extra": {"dtype": "F16", "shape": [10**7, 10**6], "data_offsets": [0, 0]}}).encode()
    (model / "extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    result = run_cli("export", "--model", str(model), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "not enough memory", "float32", "GB is available")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(resources, "available_memory", lambda: 2**62)  # a machine with the memory, not the disk
    with pytest.raises(ExportError, match="not enough disk space in .* GB is free"):
        export(ExportOptions(model=str(model), output=tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


def test_checkpoint_tensors_are_counted_with_the_graph_that_holds_them():
    """The export's memory count groups a checkpoint's tensors by graph from their names: projectors named
    otherwise than "projector" (BLIP-2, Idefics, InternVL's remote code) with the vision side, not the decoder."""
    from mmedge.exporters.resources import graph_group

    vision = ["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "model.visual.blocks.0.attn.qkv.weight",
              "multi_modal_projector.linear_1.weight", "qformer.encoder.layer.0.attention.attention.query.weight",
              "language_projection.weight", "model.perceiver_resampler.latents", "mlp1.1.weight",
              "model.connector.modality_projection.proj.weight"]
    decoder = ["language_model.model.layers.0.mlp.gate_proj.weight", "model.language_model.norm.weight",
               "lm_head.weight", "model.layers.3.mlp1.weight"]
    assert {name: graph_group(name) for name in vision} == dict.fromkeys(vision, "vision")
    assert {name: graph_group(name) for name in decoder} == dict.fromkeys(decoder, "decoder")
    assert graph_group("model.encoder.layers.0.fc1.weight") == "encoder"
    assert graph_group("language_model.model.embed_tokens.weight") is None


def test_core_ml_export_counts_the_converters_copy_of_its_largest_graph(checkpoints, tmp_path, monkeypatch):
    """Core ML converts from the torch model whole, and converting a graph to compute in float16, coremltools
    makes its own copies of the graph's weights beside it: an fp16 (int8, int4) export to it needs the model's
    float32 weights plus its decoder's again (the decoder's layers, norm and head: the largest group of the
    checkpoint's tensors), not the largest tensor again only. A machine with less is told so at once, before
    anything loads; an fp32 export (its program shares the torch model's arrays) is not refused by that count."""
    import re
    import struct

    from mmedge.errors import ExportError
    from mmedge.exporters import resources
    from mmedge.exporters.export import ExportOptions, export
    from mmedge.exporters.lazy import read_header

    model = tmp_path / "deep"
    shutil.copytree(checkpoints["paligemma-gqa"], model)
    # a decoder whose layers outweigh its embedding table, as at real sizes (headers only: refused before loading)
    extra = {f"language_model.model.layers.{i}.mlp.wide.weight": {"dtype": "F16", "shape": [5000, 10000],
                                                                  "data_offsets": [0, 0]} for i in (7, 8)}
    header = json.dumps(extra).encode()
    (model / "extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    sizes = {name: int(np.prod(info["shape"])) for path in sorted(model.glob("*.safetensors"))
             for name, info in read_header(path)[0].items()}
    decoder = sum(n for name, n in sizes.items() if re.search(r"language_model\.(model\.)?(layers|norm)|lm_head", name))
    weights = resources.checkpoint_weights(model)
    assert weights.elements == sum(sizes.values()) and weights.largest_graph == decoder
    whole, _ = resources.needs(weights, quantized=True, whole=True, graph_copied=True)
    assert whole == 4 * (weights.elements + decoder)
    enough_before = 4 * (weights.elements + weights.largest) + 1  # what the model and its largest tensor take
    assert enough_before < whole
    monkeypatch.setattr(resources, "available_memory", lambda: enough_before)
    with pytest.raises(ExportError, match=r"not enough memory: .*its largest graph's again while converting"):
        export(ExportOptions(model=str(model), target="coreml", quant="fp16", output=tmp_path / "coreml",
                             progress=False))
    assert not (tmp_path / "coreml").exists()
    assert resources.needs(weights, quantized=False, whole=True)[0] < enough_before  # fp32: no such copy
    resources.check(model, tmp_path / "coreml", quantized=False, whole=True)


def test_openvino_float_export_counts_its_decoders_copies(checkpoints, tmp_path, monkeypatch):
    """OpenVINO's conversion copies a float decoder's weights, and its CPU plugin repacks them into its own float32
    copy to check it: an fp32 or fp16 export to OpenVINO needs the decoder graph's weights in float32 (a tied head
    is the embedding table again), and where they do not fit it is refused at once, pointing at int8/int4 (whose
    big decoder is quantized before it is converted); the same machine is enough for those by this count."""
    import struct

    from mmedge.errors import ExportError
    from mmedge.exporters import resources
    from mmedge.exporters.export import ExportOptions, export
    from mmedge.exporters.lazy import read_header

    model = tmp_path / "deep"
    shutil.copytree(checkpoints["paligemma-gqa"], model)
    # a 1e9-parameter decoder in tensors of 2.5e7 (headers only: refused before loading)
    extra = {f"language_model.model.layers.{i}.mlp.wide.weight": {"dtype": "F16", "shape": [5000, 5000],
                                                                  "data_offsets": [0, 0]} for i in range(40)}
    header = json.dumps(extra).encode()
    (model / "extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    weights = resources.checkpoint_weights(model)
    header, _ = read_header(model / "model.safetensors")
    assert not any("lm_head" in name for name in header)  # a tied head: the decoder graph holds the table again
    table = int(np.prod(header["language_model.model.embed_tokens.weight"]["shape"]))
    assert weights.decoder_graph == weights.largest_graph + table and weights.decoder_graph > 10**9
    needed = 4 * weights.decoder_graph
    assert resources.needs(weights, quantized=False, whole=False, float_decoder=True)[0] == needed
    monkeypatch.setattr(resources, "available_memory", lambda: needed - 1)
    for quant in ("fp32", "fp16"):
        with pytest.raises(ExportError, match=rf"not enough memory: .* to OpenVINO at {quant} copies its decoder's "
                                              r"weights .* --quant int8 or int4"):
            export(ExportOptions(model=str(model), target="openvino", quant=quant, output=tmp_path / "ov",
                                 progress=False))
        assert not (tmp_path / "ov").exists()
    assert resources.needs(weights, quantized=True, whole=False)[0] < needed - 1  # int8/int4, and other targets
    resources.check(model, tmp_path / "ov", quantized=True, whole=False)


def test_each_target_and_plan_is_counted_for_the_copies_it_makes():
    """export's reading of a target and a plan for resources.check: only OpenVINO's float decoders count as compiled
    whole (a quantized plan, or another target, adds nothing for them), and only a Core ML plan with every graph in
    float16 counts coremltools' copies."""
    from mmedge.calibration.plan import parse_quant
    from mmedge.exporters import coreml_target, onnxruntime_target, openvino_target
    from mmedge.exporters.export import resource_habits

    def habits(target, quant):
        return resource_habits(target, parse_quant(quant, target.__name__.rsplit(".", 1)[1].removesuffix("_target")))

    assert habits(openvino_target, "fp32")["float_decoder"] == "OpenVINO at fp32"
    assert habits(openvino_target, "fp16")["float_decoder"] == "OpenVINO at fp16"
    for target, quant in ((openvino_target, "int8"), (openvino_target, "int4"), (onnxruntime_target, "fp32"),
                          (onnxruntime_target, "int4"), (coreml_target, "fp16")):
        assert habits(target, quant)["float_decoder"] is None, (target.__name__, quant)
    assert habits(coreml_target, "fp16")["graph_copied"] and habits(coreml_target, "int4")["graph_copied"]
    assert not habits(coreml_target, "fp32")["graph_copied"] and habits(coreml_target, "fp32")["whole"]
    assert habits(openvino_target, "fp32") == {"whole": False, "graph_copied": False,
                                               "float_decoder": "OpenVINO at fp32"}


def test_unsupported_model_type(tmp_path):
    ck = tmp_path / "llama"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error(run_cli("export", "--model", str(ck), "-o", str(tmp_path / "o")),
                          "'llama' is not supported", "paligemma")


def test_incomplete_checkpoint(checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["paligemma-gqa"], ck)
    (ck / "model.safetensors").unlink()
    assert_one_line_error(run_cli("export", "--model", str(ck), "-o", str(tmp_path / "o")), "no weights")
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    result = run_cli("export", "--model", str(ck), "-o", str(tmp_path / "o"))
    assert_one_line_error(result, "could not load the model")
    assert not (tmp_path / "o").exists()


def test_alias_not_cached_offline(tmp_path):
    result = run_cli("export", "--model", "paligemma", "-o", str(tmp_path / "o"),
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, "google/paligemma-3b-mix-224", str(tmp_path / "hf"), "--model /path/to/checkpoint")


def test_unknown_target_and_unknown_precision(tmp_path):
    assert_one_line_error(run_cli("export", "--model", "tiny-paligemma", "--target", "tflite",
                                  "-o", str(tmp_path / "o")), "unknown target 'tflite'", "coreml")
    assert_one_line_error(run_cli("export", "--model", "tiny-paligemma", "--quant", "int3",
                                  "-o", str(tmp_path / "o")), "unknown precision 'int3'")
    assert_one_line_error(run_cli("export", "--model", "tiny-paligemma", "--quant", "int8,projector=int4",
                                  "-o", str(tmp_path / "o")), "projector cannot be 'int4'")
    assert_one_line_error(run_cli("export", "--model", "tiny-paligemma", "--kv-cache", "state",
                                  "-o", str(tmp_path / "o")), "--kv-cache state is not available for --target onnxruntime")
    assert not (tmp_path / "o").exists()


def test_in_place_cache_on_a_decoder_the_kernel_cannot_run(checkpoints, tmp_path):
    assert_one_line_error(run_cli("export", "--model", str(checkpoints["glm4v-gqa"]), "--kv-cache", "in_place",
                                  "-o", str(tmp_path / "o")),
                          "--kv-cache in_place needs a decoder GroupQueryAttention can run", "Glm4vTextModel",
                          "--kv-cache buffer")
    assert not (tmp_path / "o").exists()


def test_bad_generation_option(package, image_file):
    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", "x",
                                  "--max-new-tokens", "0"), "max_new_tokens")


def test_unavailable_provider(package, image_file):
    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", "x",
                                  "--providers", "TensorrtExecutionProvider"), "TensorrtExecutionProvider", "available")


@pytest.mark.parametrize("args, needle", [
    (["--sample", "--temperature", "nan"], "temperature must be a finite number"),
    (["--seed", "-1"], "seed must be a whole number >= 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),  # out of range is a mistake even when greedy
    (["--threads", "-3"], "threads must be a whole number >= 0"),
    (["--threads", "99999999999999999999"], "threads must be at most 4096"),
    (["--max-video-tokens", "5"], "max_video_tokens is the token budget of a video"),  # this model takes none
])
def test_bad_generation_values_are_one_line(package, image_file, args, needle):
    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", "x", *args), needle)


def test_threads_from_the_environment(package, image_file, monkeypatch):
    """MMEDGE_THREADS sets every session's threads unless the caller names some; a bad value is one line."""
    from mmedge.runtimes import Pipeline

    monkeypatch.setenv("MMEDGE_THREADS", "1")
    threads = lambda pipe: pipe.graphs["decoder"].session.get_session_options().intra_op_num_threads  # noqa: E731
    assert threads(Pipeline.load(package)) == 1
    assert threads(Pipeline.load(package, threads=2)) == 2
    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", "x",
                                  env={"MMEDGE_THREADS": "two"}), "MMEDGE_THREADS must be a whole number")


def test_generate_batch_takes_pairs_and_the_cache(package, image_file):
    from mmedge import InputError, Pipeline

    pipe = Pipeline.load(package)
    assert pipe.generate_batch([]) == []
    with pytest.raises(InputError, match="takes \\(image, prompt\\) pairs; item 1"):
        pipe.generate_batch([(image_file, "x"), "just a prompt"])
    with pytest.raises(InputError, match="always uses the KV cache"):
        pipe.generate_batch([(image_file, "x")] * 2, use_cache=False)
    with pytest.raises(InputError, match="prompt 1 is .* tokens but this package's context holds"):
        pipe.generate_batch([(image_file, "x"), (image_file, "describe " * 2000)])
    pipe.max_batch = 1  # as a Core ML or TensorRT decoder says
    with pytest.raises(InputError, match="runs 1 sequence at a time, not 2"):
        pipe.generate_batch([(image_file, "x")] * 2)


def test_generation_option_types_through_the_api(package, image_file):
    from mmedge import InputError, Pipeline

    pipe = Pipeline.load(package)
    for options, needle in [({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number"),
                            ({"stop": "x"}, "stop must be a list")]:
        with pytest.raises(InputError, match=needle):
            pipe.generate(image_file, "x", **options)


def test_eval_of_a_damaged_checkpoint_is_one_line(checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["paligemma-gqa"], ck)
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_one_line_error(run_cli("eval", str(ck), "-n", "2"), "could not load the model")


def test_inspect_into_a_closed_pipe_is_quiet(package):
    import subprocess

    from conftest import mmedge_command

    shell = f"{' '.join(mmedge_command())} inspect {package} | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() and "Traceback" not in result.stderr and "error" not in result.stderr, result.stderr


def test_raw_prompt_without_image_tokens_says_where_the_image_goes(package, image_file):
    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", "hello",
                                  "--raw-prompt"), "a raw prompt must say where the image goes", "'<image>' x ")


def test_a_prompt_that_is_not_text_is_one_line(package, image_file):
    """A command-line prompt in another encoding than UTF-8 (Python holds its bytes as unpaired surrogates), and
    prompts or objects that are not str through the API."""
    from mmedge import Pipeline
    from mmedge.errors import InputError

    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", "caption \udcff"),
                          "not valid UTF-8")
    pipe = Pipeline.load(package)
    for prompt in (None, b"caption"):
        with pytest.raises(InputError, match="must be text"):
            pipe.generate(str(image_file), prompt)
    with pytest.raises(InputError, match="objects to detect are text"):
        pipe.detect(str(image_file), None)


def test_run_refuses_flags_that_cannot_go_together_before_loading(image_file, tmp_path):
    """The package named does not exist: the flag mistake is what is reported (found before the load)."""
    missing = str(tmp_path / "no-package")
    assert_one_line_error(run_cli("run", missing, "--image", str(image_file), "--detect", "cat", "--stream"),
                          "drop --stream")
    assert_one_line_error(run_cli("run", missing, "--image", str(image_file), "--detect", "cat", "--draw",
                                  str(tmp_path / "no-folder" / "boxes.png")), "does not exist")
    assert_one_line_error(run_cli("run", missing, "--image", str(image_file), "--detect", "cat", "--draw",
                                  str(tmp_path / "boxes.txt")), "name an image file")


def test_eval_with_a_negative_seed_is_one_line(package):
    assert_one_line_error(run_cli("eval", str(package), "-n", "2", "--seed", "-1"), "--seed must be")


def test_an_in_place_cache_package_on_another_engine_is_one_line(package, image_file):
    """ONNX Runtime's GroupQueryAttention writes the cache into its bound buffers; OpenVINO reads the same graph
    as something else (it crashed with a broadcast error)."""
    pytest.importorskip("openvino")
    assert json.loads((package / "mmedge.json").read_text())["kv_cache"]["storage"] == "in_place"
    assert_one_line_error(run_cli("run", str(package), "--image", str(image_file), "--prompt", "x", "--backend",
                                  "openvino"), "KV cache in_place", "not openvino")


def test_serve_that_cannot_listen_is_one_line_before_loading(tmp_path):
    pytest.importorskip("uvicorn")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("serve", str(tmp_path / "no-package"), "--port", str(port)),
                              f"cannot listen on 127.0.0.1:{port}")
    assert_one_line_error(run_cli("serve", f"={tmp_path}"), "both parts non-empty")


def test_export_into_a_path_it_cannot_make_is_one_line_and_leaves_no_folders(tmp_path):
    blocker = tmp_path / "a-file.png"
    blocker.write_bytes(b"x")
    assert_one_line_error(run_cli("export", "--model", str(tmp_path / "no-model"), "-o", str(blocker / "pkg")),
                          "is a file, not a folder")
    result = run_cli("export", "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "deep" / "a" / "pkg"))
    assert result.returncode == 2 and not (tmp_path / "deep").exists(), result.stderr


def test_load_and_generation_arguments_of_the_wrong_kind_through_the_api(package, image_file):
    from mmedge import Pipeline
    from mmedge.errors import InputError, MmedgeError

    for path in (None, 123):
        with pytest.raises(InputError, match="folder's path"):
            Pipeline.load(path)
    with pytest.raises(MmedgeError, match="list of ONNX Runtime execution provider names"):
        Pipeline.load(package, providers="CPUExecutionProvider")
    pipe = Pipeline.load(package)
    with pytest.raises(InputError, match="not in the model's vocabulary"):
        pipe.generate(str(image_file), "x", suppress_ids=[10 ** 9])
    with pytest.raises(InputError, match="suppress_ids must be a list of token ids"):
        pipe.generate(str(image_file), "x", suppress_ids="x")
