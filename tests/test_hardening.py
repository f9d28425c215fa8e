"""A package cannot reach outside itself, a shared Pipeline stays correct, photos come out upright, bad images
are one clear line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, sample_images
from mmedge import Pipeline
from mmedge.errors import InputError, PackageError
from mmedge.manifest import MANIFEST_NAME
from mmedge.runtimes.preprocess import load_image, preprocess

SHAPE = "paligemma-gqa"


# -- paths a package names stay inside it ------------------------------------------------------------------


def _copy(packages, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(packages(SHAPE), copy)
    return copy


def _edit(package, change) -> None:
    path = package / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _listed(data, name, path) -> None:
    blob = path.read_bytes()
    data["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def test_graph_tokenizer_and_listed_files_outside_the_package_are_refused(packages, tmp_path):
    outside = tmp_path / "decoder.onnx"
    shutil.copy(packages(SHAPE) / "decoder.onnx", outside)  # a real graph, hash listed: it would load and answer

    def graph_outside(data):
        relative = os.path.relpath(outside, tmp_path / "graph_outside" / "pkg")  # ../../decoder.onnx
        data["graphs"]["decoder"]["file"] = relative
        _listed(data, relative, outside)

    def tokenizer_absolute(data):
        data["tokenizer"] = "/etc/passwd"

    def listed_outside(data):
        _listed(data, str(outside), outside)

    for change in (graph_outside, tokenizer_absolute, listed_outside):
        fresh = _copy(packages, tmp_path / change.__name__)
        _edit(fresh, change)
        for verify in (True, False):
            with pytest.raises(PackageError, match="outside the package directory"):
                Pipeline.load(fresh, verify=verify)
        result = run_cli("inspect", str(fresh))
        assert result.returncode == 2 and "outside the package directory" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_external_weights_named_outside_the_package_are_refused_by_the_engine(packages, tmp_path, target):
    """A graph's own external-data location (inside the .onnx, not in the manifest) pointing out of the package:
    ONNX Runtime (1.32) and OpenVINO (2026.4) refuse to follow it; the runtime reports that in one line."""
    import onnx
    from onnx import numpy_helper

    package = tmp_path / "pkg"
    # OpenVINO reads the ONNX graphs of a package whose KV cache it can hold (not ONNX Runtime's in_place)
    shutil.copytree(packages(SHAPE, "onnxruntime-buffer" if target == "openvino" else "onnxruntime"), package)
    model = onnx.load(str(package / "embed_tokens.onnx"))
    table = max(model.graph.initializer, key=lambda t: t.ByteSize())
    (tmp_path / "table.bin").write_bytes(numpy_helper.to_array(table).tobytes())
    table.ClearField("raw_data")
    table.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../table.bin"), ("offset", "0"), ("length", str((tmp_path / "table.bin")
                                                                                        .stat().st_size))):
        table.external_data.add(key=key, value=value)
    (package / "embed_tokens.onnx").write_bytes(model.SerializeToString())
    _edit(package, lambda data: _listed(data, "embed_tokens.onnx", package / "embed_tokens.onnx"))
    backend = [] if target == "onnxruntime" else ["--backend", "openvino"]
    image = tmp_path / "x.png"
    sample_images()["shapes"].save(image)
    result = run_cli("run", str(package), "--image", str(image), "--prompt", "caption en", *backend)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "escapes" in result.stderr or "resolves to" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_symlink_out_of_the_package_is_refused(packages, tmp_path):
    package = _copy(packages, tmp_path)
    outside = tmp_path / "tokenizer.json"
    shutil.move(package / "tokenizer.json", outside)
    os.symlink(outside, package / "tokenizer.json")  # same bytes, same hash: only the path is wrong
    with pytest.raises(PackageError, match="outside the package directory"):
        Pipeline.load(package)


def test_kv_buffers_larger_than_the_memory_available_are_refused_before_allocation():
    from mmedge.manifest import KVCacheSpec
    from mmedge.runtimes.kv_cache import KVCache

    spec = KVCacheSpec(num_layers=64, num_kv_heads=64, head_dim=128, dtype="float32", max_context=1 << 20)
    with pytest.raises(PackageError, match=r"KV cache takes 4096.0 GiB .* more than the .* GiB of memory available"):
        KVCache(spec)


def test_a_manifest_linked_from_outside_the_package_is_refused(packages, tmp_path):
    package = _copy(packages, tmp_path)
    outside = tmp_path / "elsewhere.json"
    shutil.move(package / MANIFEST_NAME, outside)
    os.symlink(outside, package / MANIFEST_NAME)
    with pytest.raises(PackageError, match="outside the package directory"):
        Pipeline.load(package)
    (package / MANIFEST_NAME).unlink()
    (package / MANIFEST_NAME).mkdir()
    with pytest.raises(PackageError, match="is not a file"):
        Pipeline.load(package)


def test_a_manifest_of_the_wrong_shape_is_one_line(packages, tmp_path):
    package = _copy(packages, tmp_path)
    (package / MANIFEST_NAME).write_text("[1, 2]")
    result = run_cli("inspect", str(package))
    assert result.returncode == 2 and "not an object" in result.stderr, result.stderr
    (package / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "graphs": "decoder.onnx"}))
    result = run_cli("inspect", str(package))
    assert result.returncode == 2 and "malformed" in result.stderr, result.stderr


@pytest.mark.parametrize("field, value, needle", [
    ("kv_cache.max_context", "256", "kv_cache.max_context must be int"),
    ("kv_cache.max_context", -3, "kv_cache.max_context must be at least 2"),
    ("special_tokens.eos_ids", 1, "special_tokens.eos_ids must be a list"),
    ("preprocess.mean", [0.5, "a", 0.5], "preprocess.mean[1] must be float"),
    ("generation.temperature", "NaN", "generation.temperature must be"),
    ("prompt.image_token_id", True, "prompt.image_token_id must be int"),
    # a damaged cache spec is checked against the decoder's inputs before anything is allocated (1e9 layers of
    # buffers filled the machine's memory until the kernel ended the process)
    ("kv_cache.num_layers", 10 ** 9, "kv_cache.num_layers must be at most 4096"),
    ("kv_cache.num_layers", 4000, "kv_cache.num_layers is 4000, but the decoder takes"),
    ("kv_cache.num_kv_heads", 64, "kv_cache.num_kv_heads is 64, but the decoder's past.0.key has"),
    ("kv_cache.dtype", "float99", "kv_cache.dtype must be one of float32, float16"),
    ("kv_cache.max_context", 10 ** 12, "kv_cache.max_context must be at most"),
    ("preprocess.height", 100_000, "preprocess.height must be at most"),
    ("preprocess.height", 40, "preprocess.height x width is 40 x 32, but the vision_encoder's pixel_values is 32 x 32"),
    ("preprocess.resample", "magic", "preprocess.resample is 'magic'"),
    ("preprocess.std", [0, 0, 0], "preprocess.std is [0"),
    ("format_version", -1, "has no format_version"),
])
def test_manifest_fields_of_the_wrong_type_or_range_name_the_field(packages, tmp_path, field, value, needle):
    package = _copy(packages, tmp_path)

    def change(data):
        *parents, last = field.split(".")
        for key in parents:
            data = data[key]
        data[last] = float("nan") if value == "NaN" else value

    _edit(package, change)
    result = run_cli("run", str(package), "--image", "x.png", "--prompt", "x")
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- one Pipeline, several threads -------------------------------------------------------------------------


def test_one_pipeline_shared_by_four_threads_answers_as_one_thread_does(packages):
    pipe = Pipeline.load(packages(SHAPE))
    images = list(sample_images().values())
    jobs = [(images[i % len(images)], f"caption en {i}") for i in range(20)]
    expected = [list(pipe.generate_ids(im, p, max_new_tokens=10, ignore_eos=True)) for im, p in jobs]
    clone = pipe.clone()
    assert clone.graphs["decoder"] is not pipe.graphs["decoder"] and clone.cache is not pipe.cache
    results: dict[tuple[int, int], list[int]] = {}
    errors = []

    def worker(t: int, p: Pipeline) -> None:
        try:
            for i, (image, prompt) in enumerate(jobs):
                results[t, i] = list(p.generate_ids(image, prompt, max_new_tokens=10, ignore_eos=True))
        except Exception as exc:  # reported below, with the thread
            errors.append((t, exc))

    threads = [threading.Thread(target=worker, args=(t, pipe if t < 3 else clone)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (t, i), got in results.items():
        assert got == expected[i], (t, i)
    assert len(results) == 80


def test_two_interleaved_streams_in_one_thread_are_refused(packages):
    pipe = Pipeline.load(packages(SHAPE))
    image = sample_images()["shapes"]
    first = pipe.stream(image, "caption en", max_new_tokens=8, ignore_eos=True)
    next(first)
    with pytest.raises(InputError, match="already generating in this thread"):
        next(pipe.stream(image, "caption en", max_new_tokens=8, ignore_eos=True))
    first.close()  # closing (or finishing) the first frees the Pipeline
    assert pipe.generate(image, "caption en", max_new_tokens=4, ignore_eos=True)


# -- images ------------------------------------------------------------------------------------------------


def _sideways(path, orientation: int = 6) -> Image.Image:
    """An asymmetric image stored rotated, with the EXIF tag that says how to turn it upright."""
    upright = sample_images()["wide"].copy()
    upright.paste((255, 0, 0), (0, 0, 30, 20))  # a red corner, top left once upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 undoes (a 90-degree turn)
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif)
    return upright


def test_exif_orientation_is_applied_to_files_and_bytes_as_transformers_does(packages, tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    path = tmp_path / "phone.png"
    upright = _sideways(path)
    spec = Pipeline.load(packages(SHAPE)).manifest.preprocess
    want = preprocess(upright, spec)
    np.testing.assert_array_equal(preprocess(path, spec), want)
    np.testing.assert_array_equal(preprocess(path.read_bytes(), spec), want)
    assert np.array_equal(np.asarray(hf_load_image(str(path))), np.asarray(upright))
    assert load_image(Image.open(path)).size == (upright.height, upright.width)  # a PIL image is taken as given


@pytest.mark.parametrize("bad, message", [
    ("https://example.com/cat.jpg", "is a URL"),
    (b"not an image", "not an image Pillow can read"),
    (np.zeros((0, 8, 3), np.uint8), "is empty"),
    (Image.new("RGB", (0, 0)), "is empty"),
])
def test_bad_images_are_one_clear_line(bad, message):
    with pytest.raises(InputError, match=message):
        load_image(bad)


def test_decompression_bomb_is_refused_not_decoded(packages, tmp_path):
    big = io.BytesIO()
    Image.new("1", (20000, 20000)).save(big, "PNG")  # 400 MP, a few kB on disk
    path = tmp_path / "bomb.png"
    path.write_bytes(big.getvalue())
    result = run_cli("run", str(packages(SHAPE)), "--image", str(path), "--prompt", "caption en")
    assert result.returncode == 2 and "too large to decode safely" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_checkpoint_index_naming_weights_outside_it_is_refused(checkpoints, tmp_path):
    checkpoint = tmp_path / "ck"
    shutil.copytree(checkpoints[SHAPE], checkpoint)
    (tmp_path / "elsewhere.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}))
    result = run_cli("export", "--model", str(checkpoint), "-o", str(tmp_path / "pkg"))
    assert result.returncode == 2 and "outside the checkpoint" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "pkg").exists()


# -- hashing once per file -----------------------------------------------------------------------------------


def _count_hashed(monkeypatch) -> list[str]:
    from mmedge import manifest

    hashed, plain = [], manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path, *a: hashed.append(path.name) or plain(path, *a))
    return hashed


def test_a_file_verified_before_is_not_read_again_but_any_write_to_it_is_caught(packages, tmp_path, monkeypatch):
    monkeypatch.setenv("MMEDGE_CACHE", str(tmp_path / "cache"))
    package = _copy(packages, tmp_path)
    hashed = _count_hashed(monkeypatch)
    Pipeline.load(package)
    listed = set(json.loads((package / MANIFEST_NAME).read_text())["files"])
    assert set(hashed) == listed  # first load: every file
    hashed.clear()
    Pipeline.load(package)
    assert hashed == []  # the same files: none read
    Pipeline.load(package, verify="full")
    assert set(hashed) == listed  # "full": every byte, every time
    # one byte changed in place, same size, mtime set back: ctime still moves, so the file is hashed and refused
    decoder = package / "decoder.onnx"
    before = decoder.stat()
    with open(decoder, "r+b") as fh:
        fh.seek(before.st_size // 2)
        byte = fh.read(1)
        fh.seek(before.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(decoder, ns=(before.st_atime_ns, before.st_mtime_ns))
    hashed.clear()
    with pytest.raises(PackageError, match="does not match its sha256"):
        Pipeline.load(package)
    assert "decoder.onnx" in hashed


def test_without_a_writable_cache_every_load_hashes_everything(packages, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("MMEDGE_CACHE", str(blocked))
    package = _copy(packages, tmp_path)
    hashed = _count_hashed(monkeypatch)
    Pipeline.load(package)
    first = len(hashed)
    Pipeline.load(package)
    assert first > 0 and len(hashed) == 2 * first


def _tiny_package(where, seed):
    """A folder holding one OpenVINO graph (x @ W) and a manifest file: what the model cache keys on."""
    import openvino as ov
    from openvino import opset13 as ops

    weights = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
    x = ops.parameter([1, 64], np.float32, name="x")
    where.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([ops.matmul(x, ops.constant(weights), False, False)], [x], "g"), str(where / "g.xml"),
                  compress_to_fp16=False)
    (where / MANIFEST_NAME).write_text(json.dumps({"seed": seed}))
    return where / "g.xml", weights


def test_openvino_model_cache_keeps_one_folder_per_package_and_prunes_the_rest(tmp_path, monkeypatch):
    """Entries of deleted or re-exported packages go, the least recently opened go while the cache is over its
    limit, the package being opened stays, and every load still computes its own graph."""
    from mmedge.runtimes.backends.openvino import CACHE_LIMIT_ENV, OpenVinoBackend

    root = tmp_path / "cache"
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)

    def load(graph, weights):
        out = OpenVinoBackend(cache_dir=root).load(graph).run({"x": x})
        np.testing.assert_allclose(next(iter(out.values())), x @ weights, rtol=1e-4, atol=1e-4)

    def folders():
        return {json.loads((f / "package.json").read_text())["package"]: sorted(p.name for p in f.iterdir())
                for f in root.iterdir() if f.is_dir()}

    a, b, c = (_tiny_package(tmp_path / name, seed) for seed, name in enumerate("abc"))
    root.mkdir()
    (root / "1234.blob").write_bytes(b"an entry of the flat layout")
    load(*a)
    load(*b)
    assert set(folders()) == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert not (root / "1234.blob").exists()
    assert all(any(n.endswith(".blob") for n in names) for names in folders().values())
    shutil.rmtree(tmp_path / "a")  # a deleted package: its entry goes at the next load of any package
    load(*b)
    assert set(folders()) == {str(tmp_path / "b")}
    b = _tiny_package(tmp_path / "b", 7)  # re-exported at the same path: compiled afresh, the old entry gone
    load(*b)
    assert len([n for n in folders()[str(tmp_path / "b")] if n.endswith(".blob")]) == 1
    monkeypatch.setenv(CACHE_LIMIT_ENV, "0.001")  # over the limit: the least recently opened goes, never this one
    load(*c)
    assert set(folders()) == {str(tmp_path / "c")}
    monkeypatch.setenv(CACHE_LIMIT_ENV, "lots")
    from mmedge.errors import MmedgeError

    with pytest.raises(MmedgeError, match=CACHE_LIMIT_ENV):
        OpenVinoBackend(cache_dir=root)


def test_verification_records_of_packages_that_are_gone_are_dropped(packages, tmp_path, monkeypatch):
    from mmedge import manifest

    cache = tmp_path / "cache"
    monkeypatch.setenv("MMEDGE_CACHE", str(cache))
    monkeypatch.setattr(manifest, "_records_pruned", False)
    (cache / "verified").mkdir(parents=True)
    gone = cache / "verified" / "gone.json"
    gone.write_text(json.dumps({"package": str(tmp_path / "deleted"), "manifest": "0", "files": {}}))
    kept = _copy(packages, tmp_path)
    manifest.load_manifest(kept)
    assert not gone.exists()
    assert [json.loads(r.read_text())["package"] for r in (cache / "verified").iterdir()] == [str(kept.resolve())]


def test_openvino_compiles_once_and_never_serves_a_stale_graph(packages, tmp_path, monkeypatch):
    """The model cache ($MMEDGE_CACHE/openvino) fills on the first load and is used after; another package
    copied to the same path runs its own graphs, not the cached ones of the path's earlier package."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MMEDGE_CACHE", str(cache))
    image = sample_images()["shapes"]

    def tokens(package, **options):
        return list(Pipeline.load(package, **options).generate_ids(image, "caption en", max_new_tokens=8,
                                                                   ignore_eos=True))

    where = tmp_path / "pkg"
    expected = {}
    for shape in ("paligemma-gqa", "paligemma-mqa"):
        source = packages(shape, "openvino")
        monkeypatch.setenv("MMEDGE_CACHE", str(tmp_path / f"none-{shape}"))
        expected[shape] = tokens(source)  # each package alone, its own fresh cache
        monkeypatch.setenv("MMEDGE_CACHE", str(cache))
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(source, where)
        assert tokens(where) == expected[shape], shape
        blobs = {p: p.stat().st_mtime_ns for p in (cache / "openvino").rglob("*.blob")}
        assert blobs
        assert tokens(where) == expected[shape], shape  # from the cache
        # nothing compiled again, and one folder: the path's entries of the earlier package were dropped
        assert {p: p.stat().st_mtime_ns for p in (cache / "openvino").rglob("*.blob")} == blobs
        assert len([f for f in (cache / "openvino").iterdir() if f.is_dir()]) == 1
    assert expected["paligemma-gqa"] != expected["paligemma-mqa"]
    from mmedge.runtimes.backends.openvino import OpenVinoBackend

    assert OpenVinoBackend(cache_dir=None).cache_dir is None
