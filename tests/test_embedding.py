"""Dual encoders (CLIP, SigLIP): embedding packages against transformers on every target, quantized ones against
their fp32 packages, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import EMBEDDING_SHAPES, run_cli_in_process, sample_images, slow

from mmedge.errors import InputError, PackageError

# the targets an embedding package is exported for here (a dual encoder has no KV cache, so one variant each);
# tensorrt's graphs run through ONNX Runtime, Core ML's through the torch modules it converted (test_coreml_*)
EMBED_TARGETS = ["onnxruntime", "openvino", "tensorrt"]
TEXTS = ["a red circle", "two blue squares and a cyan diamond", "Is there a CAT, or a dog?", "a",
         " ".join(["a green triangle"] * 12),  # longer than the text encoders' positions: cut as the processor cuts
         "what color is the circle on the left of the square?", "a photo of a {}", "yes", "the sky", "no"]
LABELS = ["circle", "square", "triangle", "diamond", "cat"]
COSINE = 0.99999  # fp32 packages: each embedding against transformers'


def _reference(checkpoint):
    """transformers' model and processor, and its unit-length embeddings of sample_images() and TEXTS."""
    from mmedge.evaluate import ReferenceEmbedder

    ref = ReferenceEmbedder(checkpoint)
    return ref, ref.embed_images(list(sample_images().values())), ref.embed_texts(TEXTS)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _check_against_transformers(embedder, checkpoint):
    import torch

    ref, images, texts = _reference(checkpoint)
    got_images = embedder.embed_images(list(sample_images().values()))
    got_texts = embedder.embed_texts(TEXTS)  # more than max_batch: two batches
    assert got_images.shape == images.shape and got_texts.shape == texts.shape
    assert _cosines(got_images, images).min() >= COSINE, _cosines(got_images, images)
    assert _cosines(got_texts, texts).min() >= COSINE, _cosines(got_texts, texts)
    # classify: the labels transformers' logits_per_image ranks first, with its probabilities
    processor, model = ref.processor, ref.model
    template = embedder.spec.template
    for image in sample_images().values():
        padding = "max_length" if ref.siglip else True
        inputs = processor(images=image, text=[template.format(lb) for lb in LABELS], padding=padding,
                           truncation=True, return_tensors="pt")
        with torch.no_grad():  # SigLIP as trained: no padding mask (the processor's attention_mask left out)
            logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits_per_image[0]
        probs = (logits.sigmoid() if ref.siglip else logits.softmax(-1)).numpy()
        ranked = embedder.classify(image, LABELS)
        assert ranked[0][0] == LABELS[int(probs.argmax())]
        np.testing.assert_allclose([p for _, p in ranked], np.sort(probs)[::-1], atol=1e-4)


@pytest.mark.parametrize("shape", EMBEDDING_SHAPES)
@pytest.mark.parametrize("target", EMBED_TARGETS)
def test_embeddings_match_transformers(shape, target, packages, checkpoints, request):
    if target != "onnxruntime" and shape != EMBEDDING_SHAPES[0]:
        request.applymarker(slow)
    from mmedge.runtimes import Embedder

    package = packages(shape, target)
    manifest = json.loads((package / "mmedge.json").read_text())
    assert manifest["kind"] == "embedding" and set(manifest["graphs"]) == {"vision_encoder", "text_encoder"}
    assert manifest["verification"]["embedding"]["passed"] is True
    if target == "tensorrt":  # a profile for batches up to max_batch, and texts up to text_length
        prof = manifest["tensorrt"]["profiles"]
        assert prof["vision_encoder"][0]["pixel_values"]["max"][0] == manifest["embedding"]["max_batch"]
        assert prof["text_encoder"][0]["input_ids"]["max"] == [manifest["embedding"]["max_batch"],
                                                                manifest["embedding"]["text_length"]]
    embedder = Embedder.load(package, backend={"tensorrt": "onnxruntime"}.get(target))
    _check_against_transformers(embedder, checkpoints[shape])


@pytest.mark.parametrize("shape", EMBEDDING_SHAPES)
def test_coreml_package_through_its_torch_modules(shape, packages, checkpoints):
    pytest.importorskip("coremltools")
    from mmedge.exporters.coreml_target import simulated_embedder

    package = packages(shape, "coreml")
    manifest = json.loads((package / "mmedge.json").read_text())
    assert manifest["coreml"]["flexible_batch"]
    embedder, _ = simulated_embedder(package, checkpoints[shape])
    _check_against_transformers(embedder, checkpoints[shape])


@pytest.mark.parametrize("target", EMBED_TARGETS)
@pytest.mark.parametrize("quant", ["int8", "fp16"])
def test_quantized_embeddings_against_fp32(target, quant, packages, request):
    """INT8 (static, calibrated) and fp16 encoders on every target: the export's report, and the package's
    embeddings against the fp32 package's."""
    if (target, quant) != ("onnxruntime", "int8"):
        request.applymarker(slow)
    from mmedge.runtimes import Embedder

    shape = EMBEDDING_SHAPES[0]
    package = packages(shape, target, quant)
    manifest = json.loads((package / "mmedge.json").read_text())
    report = manifest["quantization"]
    assert {g["precision"] for g in manifest["graphs"].values()} == {quant}
    assert report["calibration"]["used"] is (quant == "int8")
    low = 0.999 if quant == "fp16" else 0.98
    for part, cos in report["embedding_cosine"].items():
        assert cos["cosine_mean"] >= low, (part, cos)
    backend = {"tensorrt": "onnxruntime"}.get(target)
    a = Embedder.load(packages(shape, target), backend=backend)
    b = Embedder.load(package, backend=backend)
    images = list(sample_images().values())
    # fp16: as close on any input; INT8 of a random tiny model: close on average on label prompts as it was
    # calibrated on (a one-word text can move far; the trained demo's INT8 accuracy is tests/test_demo_model.py's)
    texts = TEXTS if quant == "fp16" else [a.spec.template.format(label) for label in LABELS]
    for got in (_cosines(a.embed_images(images), b.embed_images(images)),
                _cosines(a.embed_texts(texts), b.embed_texts(texts))):
        assert (got.min() if quant == "fp16" else got.mean()) >= (0.999 if quant == "fp16" else 0.95), got


@pytest.mark.parametrize("quant", ["int8", "fp16"])
def test_coreml_compresses_embeddings(packages, checkpoints, quant):
    """Core ML's INT8 weights (fp16 compute) and fp16: smaller files whose stored weights, run in their torch
    modules, give embeddings close to the fp32 package's."""
    pytest.importorskip("coremltools")
    from mmedge.exporters.coreml_target import simulated_embedder

    shape = EMBEDDING_SHAPES[0]
    package = packages(shape, "coreml", quant)
    graphs = json.loads((package / "mmedge.json").read_text())["quantization"]["graphs"]
    assert {g["precision"] for g in graphs.values()} == {quant}
    if quant == "int8":
        assert all(g["bytes"] < g["bytes_before"] for g in graphs.values())
    ref, _ = simulated_embedder(packages(shape, "coreml"), checkpoints[shape])
    got, _ = simulated_embedder(package, checkpoints[shape])
    images = list(sample_images().values())
    assert _cosines(ref.embed_images(images), got.embed_images(images)).min() >= 0.99
    assert _cosines(ref.embed_texts(TEXTS), got.embed_texts(TEXTS)).min() >= 0.99


def test_the_cli_embeds_and_classifies(packages, tmp_path):
    package = packages(EMBEDDING_SHAPES[0])
    image = tmp_path / "shapes.png"
    sample_images()["shapes"].save(image)
    from mmedge.runtimes import Embedder

    embedder = Embedder.load(package)
    out = run_cli_in_process("embed", str(package), "--image", str(image), "--text", "a cup", "--text", "a dog")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [t["input"] for t in doc["texts"]] == ["a cup", "a dog"] and doc["dim"] == embedder.spec.dim
    np.testing.assert_allclose(doc["images"][0]["embedding"], embedder.embed_images([image])[0], atol=1e-6)
    npy = tmp_path / "t.npy"
    assert run_cli_in_process("embed", str(package), "--text", "a cup", "--text", "x", "--out", str(npy)).returncode == 0
    np.testing.assert_allclose(np.load(npy), embedder.embed_texts(["a cup", "x"]), atol=1e-6)
    out = run_cli_in_process("classify", str(package), "--image", str(image), "--labels", "cat, dog,cup", "--json")
    assert out.returncode == 0, out.stderr
    ranked = [(x["label"], x["probability"]) for x in json.loads(out.stdout)["labels"]]
    want = embedder.classify(image, ["cat", "dog", "cup"])
    assert [lb for lb, _ in ranked] == [lb for lb, _ in want]
    np.testing.assert_allclose([p for _, p in ranked], [p for _, p in want], atol=1e-6)
    out = run_cli_in_process("inspect", str(package))
    assert out.returncode == 0 and f"embedding   {embedder.spec.dim} dims" in out.stdout, out.stderr


def test_bad_input(packages, checkpoints, tmp_path):
    from mmedge.runtimes import Embedder, Pipeline

    package = packages(EMBEDDING_SHAPES[0])
    embedder = Embedder.load(package)
    with pytest.raises(PackageError, match="embedding package"):
        Pipeline.load(package)
    with pytest.raises(InputError, match="at least one label"):
        embedder.classify(sample_images()["noise"], [])
    with pytest.raises(InputError, match="must contain"):
        embedder.classify(sample_images()["noise"], ["a"], template="a photo")
    with pytest.raises(InputError, match="must be a list"):
        embedder.embed_texts("a cup")
    # templates str.format would fail on, or that would write no label at all
    for template in ("{} and {}", "{} {name}", "{} }", "{{}}", "a {0}"):
        with pytest.raises(InputError, match="template"):
            embedder.classify(sample_images()["noise"], ["a"], template=template)
    for labels, message in ((["red", "red"], "more than once"), ([None, "red"], "must be text"),
                            (["r\udcffed"], "not valid UTF-8")):
        with pytest.raises(InputError, match=message):
            embedder.classify(sample_images()["noise"], labels)
    with pytest.raises(InputError, match="too narrow"):  # resized first, it would have taken 2.4 GB
        embedder.embed_images([Image.new("RGB", (200_000, 1))])
    # the scoring API given what its own calls do not return (numpy's broadcast and type errors before)
    images, texts = embedder.embed_images([sample_images()["noise"]]), embedder.embed_texts(["a", "b"])
    assert embedder.probabilities(embedder.logits(images, texts)).shape == (1, 2)
    for call, message in ((lambda: embedder.logits(images, texts[:, :3]), "text_embeds must be"),
                          (lambda: embedder.logits([[1.0], [2.0, 3.0]], texts), "image_embeds must be"),
                          (lambda: embedder.logits(images, "ab"), "text_embeds must be"),
                          (lambda: embedder.probabilities("ab"), "logits must be numbers"),
                          (lambda: embedder.probabilities(3.0), "single number"),
                          (lambda: embedder.token_ids([1]), "must be text"), (lambda: embedder.token_ids("a"), "list")):
        with pytest.raises(InputError, match=message):
            call()
    image = tmp_path / "x.png"
    sample_images()["noise"].save(image)
    cases = [
        (("embed", str(package)), "give --image and/or --text"),
        (("embed", str(package), "--text", "a", "--out", str(tmp_path / "x.txt")), "must end in .json or .npy"),
        (("embed", str(package), "--text", "a", "--image", str(image), "--out", str(tmp_path / "x.npy")), "one array"),
        (("embed", str(package), "--image", str(tmp_path / "missing.png")), "image not found"),
        (("embed", str(package), "--text", "a", "--out", str(tmp_path / "no-folder" / "x.json")), "does not exist"),
        (("classify", str(package), "--image", str(image), "--labels", " , "), "--labels is empty"),
        (("run", str(package), "--image", str(image), "--prompt", "hi"), "does not generate text"),
        (("export", "--model", str(checkpoints[EMBEDDING_SHAPES[0]]), "--quant", "int4", "-o", str(tmp_path / "p")),
         "embedding model"),
        (("export", "--model", str(checkpoints[EMBEDDING_SHAPES[0]]), "--max-context", "64", "-o", str(tmp_path / "p")),
         "no decoder"),
    ]
    for args, message in cases:
        result = run_cli_in_process(*args)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, (args, result)
    assert not (tmp_path / "p").exists()


def test_a_manifest_must_state_its_kinds_fields(packages, tmp_path):
    import shutil

    package = tmp_path / "pkg"
    shutil.copytree(packages(EMBEDDING_SHAPES[0]), package)
    data = json.loads((package / "mmedge.json").read_text())
    for change, message in (({"embedding": None}, "missing field embedding"),
                            ({"kind": "both"}, "kind must be one of"),
                            ({"embedding": {**data["embedding"], "activation": "relu"}}, "embedding.activation"),
                            ({"embedding": {**data["embedding"], "dim": data["embedding"]["dim"] + 1}},
                             "but the vision_encoder's image_embeds has"),
                            ({"embedding": {**data["embedding"], "pad_id": 10 ** 6}}, "is not a token of its")):
        (package / "mmedge.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(PackageError, match=message):
            from mmedge.runtimes import Embedder

            Embedder.load(package, verify=False)


DEMO = "shapes-clip"


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_demo_int8_keeps_its_zero_shot_accuracy(demo_packages, scores, target):
    """The shipped demo's INT8 packages (static, calibrated on the task's scenes and label prompts) within a point
    of the fp32 ones on the held-out zero-shot task; the fp32 ones at the demo's bar (tests/test_demo_model.py
    holds the checkpoint to it)."""
    fp32, _ = demo_packages(DEMO, target, "fp32")
    int8, _ = demo_packages(DEMO, target, "int8")
    ref, got = scores(fp32), scores(int8)
    assert ref["form"] == "zero-shot" and ref["accuracy"] >= 0.95, ref
    assert got["accuracy"] >= ref["accuracy"] - 0.01, (got, ref)
    report = json.loads((int8 / "mmedge.json").read_text())["quantization"]
    assert report["calibration"]["source"].startswith("builtin (shapes task")
    assert report["bytes"] < report["bytes_fp32"]


def test_siglip_text_normalisation():
    """SiglipTokenizer.canonicalize_text's rule: lowercase, ASCII punctuation removed, whitespace runs made one
    space, ends stripped; other packages take a text as it is."""
    from mmedge.runtimes.embedder import normalize_text

    text = "  Is there a CAT,\tor a dog?! (2 of them)  "
    assert normalize_text(text, "siglip") == "is there a cat or a dog 2 of them"
    assert normalize_text(text, None) == text


def test_classify_takes_more_labels_than_its_cache_holds(packages, monkeypatch):
    """The labels of one call are read before any is evicted (past LABEL_CACHE labels it was a KeyError)."""
    from mmedge.runtimes import Embedder, embedder as module

    embedder = Embedder.load(packages(EMBEDDING_SHAPES[0]))
    labels = [f"shape {i}" for i in range(7)]
    want = dict(embedder.classify(sample_images()["noise"], labels))
    monkeypatch.setattr(module, "LABEL_CACHE", 3)
    embedder._label_cache.clear()
    got = dict(embedder.classify(sample_images()["noise"], labels))
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-6 for k in want)
    assert len(embedder._label_cache) == 3
