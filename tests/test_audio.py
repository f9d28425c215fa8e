"""Speech families (scheme encoder "audio": Whisper): log-mel features against WhisperFeatureExtractor, WAV reading
and resampling, greedy tokens against transformers' generate() on every target for two audio lengths and three
language/task settings (detection included), audio longer than a window, the cache against recomputing, and bad
input."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import AUDIO_SHAPES, BACKEND, PARITY_TARGETS, run_cli_in_process as run_cli, slow
from mmedge import Pipeline
from mmedge.manifest import AudioSpec
from mmedge.runtimes import audio
from test_errors import assert_one_line_error

RATE = 16000
NEW = 12
SETTINGS = [("en", "transcribe"), ("de", "translate"), (None, None)]  # None: the language detected


def speech_like(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    """A chirp with noise: broadband and changing, as speech is (the tiny models' tokens mean nothing anyway)."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


CLIPS = {"2 s": speech_like(2, 2), "7 s": speech_like(7, 7)}


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> Path:
    """PCM WAV of `width` bytes a sample (1: unsigned 8-bit) through the standard library."""
    data = np.repeat(samples[:, None], channels, axis=1) if channels > 1 else samples[:, None]
    if width == 1:
        raw = np.clip(np.round(data * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    else:
        ints = np.clip(np.round(data * (2 ** (8 * width - 1) - 1)), -(2 ** (8 * width - 1)), 2 ** (8 * width - 1) - 1)
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.astype(np.int64).ravel())
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def write_float_wav(path: Path, samples: np.ndarray, rate: int, code: int = 3, bits: int = 32) -> Path:
    """A WAV of format `code` (3: IEEE float) written by hand (the wave module writes PCM only)."""
    body = samples.astype("<f4" if bits == 32 else "<f8").tobytes() if code == 3 else bytes(len(samples))
    fmt = struct.pack("<HHIIHH", code, 1, rate, rate * bits // 8, bits // 8, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)
    return path


def test_features_equal_the_feature_extractor():
    """The runtime's numpy log-mel (and its mel filters) against WhisperFeatureExtractor's, on a short clip, a
    clip of exactly one window and one longer than it (cut)."""
    from transformers import WhisperFeatureExtractor

    for mels in (80, 128):  # Whisper large-v3 has 128
        fe, spec = WhisperFeatureExtractor(feature_size=mels), AudioSpec(feature_size=mels)
        np.testing.assert_allclose(audio.mel_filters(spec), fe.mel_filters.T, rtol=0, atol=1e-12)
        for clip in (CLIPS["2 s"], speech_like(30, 30), speech_like(31, 31)):
            ref = fe(clip, sampling_rate=RATE, return_tensors="np")["input_features"][0]
            ours = audio.log_mel(clip, spec)
            assert ours.shape == ref.shape == (mels, spec.frames())
            err = float(np.abs(ours - ref).max())
            print(f"log-mel max abs error vs WhisperFeatureExtractor ({mels} mels, {len(clip) / RATE:.0f} s): {err:.2e}")
            assert err < 1e-4


def test_wav_formats_and_resampling(tmp_path):
    """8/16/24/32-bit PCM, 32/64-bit float and stereo WAV read back to their samples; a 44.1 kHz tone resampled to
    16 kHz equals the tone drawn at 16 kHz (away from the ends)."""
    clip = speech_like(0.5, 1) * 0.5
    for width, tol in ((1, 1e-2), (2, 1e-4), (3, 1e-6), (4, 1e-6)):
        got = audio.load_audio(write_wav(tmp_path / f"pcm{width}.wav", clip, RATE, width), RATE)
        np.testing.assert_allclose(got, clip, atol=tol)
    for bits in (32, 64):
        got = audio.load_audio(write_float_wav(tmp_path / f"float{bits}.wav", clip, RATE, bits=bits), RATE)
        np.testing.assert_allclose(got, clip, atol=1e-7)
    got = audio.load_audio(write_wav(tmp_path / "stereo.wav", clip, RATE, 2, channels=2), RATE)
    np.testing.assert_allclose(got, clip, atol=1e-4)
    for source in (44100, 8000, 48000):
        t = np.arange(source) / source
        tone = 0.5 * np.sin(2 * np.pi * 440 * t)
        got = audio.load_audio(write_wav(tmp_path / f"tone{source}.wav", tone, source), RATE)
        want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(got)) / RATE)
        inner = slice(200, len(got) - 200)
        assert len(got) == RATE and np.abs(got[inner] - want[inner]).max() < 2e-3, source


@pytest.fixture(scope="module")
def reference(hf_model, shared):
    """shape -> {(clip, language, task): transformers' greedy NEW tokens}, computed once."""
    import torch

    def get(shape):
        def compute():
            model, _ = hf_model(shape)
            from transformers import WhisperFeatureExtractor

            fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
            out = []
            for name, clip in {**CLIPS, "35 s": speech_like(35, 35)}.items():
                pieces = [clip] if len(clip) <= 30 * RATE else [clip[: 30 * RATE], clip[30 * RATE :]]
                for language, task in SETTINGS if name != "35 s" else SETTINGS[:1]:
                    tokens = []
                    for piece in pieces:
                        features = fe(piece, sampling_rate=RATE, return_tensors="pt")["input_features"]
                        with torch.no_grad():
                            ids = model.generate(features, language=language, task=task, max_new_tokens=NEW,
                                                 min_new_tokens=NEW, do_sample=False)
                        tokens.append(ids[0, :NEW].tolist())
                    out.append([name, language, task, tokens])
            return out

        return {(n, lang, task): tokens for n, lang, task, tokens in shared.value(f"reference/{shape}", compute)}

    return get


@pytest.mark.parametrize("shape,target", [pytest.param(s, t, marks=() if t == "onnxruntime" else slow)
                                          for s in AUDIO_SHAPES for t in PARITY_TARGETS])
def test_greedy_tokens_match_transformers(shape, target, packages, reference):
    pipe = Pipeline.load(packages(shape, target), backend=BACKEND.get(target))
    for (name, language, task), expected in reference(shape).items():
        clip = CLIPS.get(name)
        if clip is None:
            continue
        got = pipe.transcribe_ids(clip, language=language, task=task, max_new_tokens=NEW, ignore_eos=True)
        assert got == expected, (name, language, task)


@pytest.mark.parametrize("shape", AUDIO_SHAPES)
def test_coreml_decoder_in_pytorch(shape, packages, reference):
    """The Core ML package's torch modules (its decoder over float16 state buffers, as Core ML holds them)."""
    from mmedge.exporters import coreml_target

    pipe, _ = coreml_target.simulated_pipeline(packages(shape, "coreml"), stored_weights=False)
    for (name, language, task), expected in reference(shape).items():
        if name in CLIPS:
            assert pipe.transcribe_ids(CLIPS[name], language=language, task=task, max_new_tokens=NEW,
                                       ignore_eos=True) == expected, (name, language, task)


@pytest.mark.parametrize("shape", AUDIO_SHAPES)
def test_long_audio_windows_and_cache(shape, packages, reference, tmp_path):
    """35 s of audio at 44.1 kHz from a WAV file: two windows, each as transformers transcribes its 30 s (the
    file's samples resampled, so the same clip drawn at 16 kHz is the reference); a window recomputed without the
    cache gives the same tokens; the CLI prints the text."""
    pipe = Pipeline.load(packages(shape, "onnxruntime"))
    expected = reference(shape)[("35 s", "en", "transcribe")]
    got = pipe.transcribe_ids(speech_like(35, 35), language="en", task="transcribe", max_new_tokens=NEW,
                              ignore_eos=True)
    assert got == expected
    assert pipe.transcribe_ids(CLIPS["2 s"], language="en", max_new_tokens=NEW, ignore_eos=True, use_cache=False) \
        == reference(shape)[("2 s", "en", "transcribe")]
    path = write_wav(tmp_path / "speech.wav", speech_like(3, 3), RATE)
    result = run_cli("run", str(pipe.path), "--audio", str(path), "--language", "en", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == pipe.transcribe(str(path), language="en", max_new_tokens=5)
    streamed = run_cli("run", str(pipe.path), "--audio", str(path), "--language", "en", "--max-new-tokens", "5",
                       "--stream")
    assert streamed.returncode == 0 and streamed.stdout == result.stdout, streamed.stderr
    shown = run_cli("inspect", str(pipe.path))
    assert shown.returncode == 0 and "audio at 16000 Hz, 30-s windows of 80 mel bins" in shown.stdout


@pytest.mark.parametrize("shape", AUDIO_SHAPES)
def test_bad_input(shape, packages, tmp_path):
    path = str(packages(shape, "onnxruntime"))
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    silent = write_wav(tmp_path / "silent.wav", np.zeros(RATE, np.float32), RATE)
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), RATE)
    alaw = write_float_wav(tmp_path / "alaw.wav", np.zeros(100, np.float32), RATE, code=6, bits=8)
    speech = write_wav(tmp_path / "speech.wav", speech_like(1, 1), RATE)
    cases = [
        (("--audio", str(text)), "not audio"),
        (("--audio", str(silent)), "silent"),
        (("--audio", str(empty)), "empty"),
        (("--audio", str(alaw)), "unsupported WAV sample format"),
        (("--audio", str(tmp_path / "missing.wav")), "cannot read"),
        (("--audio", str(speech), "--language", "xx"), "no language 'xx'"),
        (("--audio", str(speech), "--image", str(image)), "--audio takes no --image"),
        (("--image", str(image), "--prompt", "hi"), "takes audio, not images"),
        (("--image", str(image), "--prompt", "hi", "--language", "en"), "--language and --task are for --audio"),
    ]
    for args, needle in cases:
        assert_one_line_error(run_cli("run", path, *args), needle)


def test_audio_on_an_image_family(packages, tmp_path):
    from conftest import FIRST_SHAPES

    speech = write_wav(tmp_path / "speech.wav", speech_like(1, 1), RATE)
    result = run_cli("run", str(packages(FIRST_SHAPES[0], "onnxruntime")), "--audio", str(speech))
    assert_one_line_error(result, "takes images, not audio")


@pytest.mark.parametrize("shape,target,quant", [
    pytest.param(s, t, q, marks=() if (t, q) == ("onnxruntime", "int4") else slow)
    for s in AUDIO_SHAPES for t in ("onnxruntime", "openvino", "tensorrt", "coreml") for q in ("int8", "int4")])
def test_quantized_packages_calibrate_on_speech(shape, target, quant, packages):
    """INT8 / INT4 packages calibrated through the real pipeline on the shipped speech (espeak-ng clips): the
    encoder's static INT8 takes its recorded features, the report measures them against fp32, and the package
    transcribes (Core ML: through its torch modules with the weights its .mlpackage files store; only its INT4
    ranges use the speech)."""
    if target == "coreml":
        from mmedge.exporters import coreml_target

        pipe, _ = coreml_target.simulated_pipeline(packages(shape, target, quant))
    else:
        pipe = Pipeline.load(packages(shape, target, quant), backend=BACKEND.get(target))
    report = pipe.manifest.quantization
    if target != "coreml" or quant == "int4":
        assert report["calibration"]["source"].startswith("builtin (espeak-ng speech")
        assert "held_out_max_abs_err" in report["graphs"]["encoder"] or target == "coreml"
    assert report["plan"]["encoder"] == "int8" and report["plan"]["decoder"] == quant
    assert set(report["plan"]) == {"embed_tokens", "decoder", "encoder"}
    assert len(pipe.transcribe_ids(CLIPS["2 s"], language="en", max_new_tokens=4, ignore_eos=True)[0]) == 4
