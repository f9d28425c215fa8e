"""Audio in: reading sound files, resampling, and Whisper's log-mel features, in numpy (no torch, no librosa).

    audio = load_audio("speech.wav", 16000)            # float32 mono at 16 kHz
    for window in windows(audio, spec):                 # 30-s pieces
        features = log_mel(window, spec)                # [feature_size, frames], as WhisperFeatureExtractor

WAV files (PCM 8/16/24/32-bit, float 32/64, any rate, any channel count: averaged to mono) are read here; other
containers (FLAC, MP3, Ogg, M4A) through PyAV where it is installed (the `video` extra). Other rates are
resampled with a windowed-sinc (Kaiser) filter.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Union

import numpy as np

from mmedge.errors import InputError
from mmedge.manifest import AudioSpec

AudioInput = Union[str, Path, np.ndarray]
SILENCE = 1e-5  # peak amplitude (full scale 1.0) below which a recording holds nothing to transcribe


def load_audio(audio: AudioInput, rate: int, given_rate: int | None = None) -> np.ndarray:
    """float32 mono samples at `rate` Hz, in [-1, 1]: from a file, or from an array of samples at `given_rate`
    (default `rate`; [samples] or [samples, channels]). Empty or silent audio is refused."""
    if isinstance(audio, (str, Path)):
        samples, source_rate = read_audio_file(Path(audio))
    elif isinstance(audio, np.ndarray):
        if audio.ndim not in (1, 2) or not np.issubdtype(audio.dtype, np.number):
            raise InputError(f"audio samples must be a 1-D (or [samples, channels]) numeric array, got "
                             f"{audio.dtype} of shape {audio.shape}")
        samples, source_rate = audio.astype(np.float32), given_rate or rate
    else:
        raise InputError(f"audio must be a file path or an array of samples, not {type(audio).__name__}")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise InputError("the audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise InputError("the audio holds NaN or infinite samples")
    if np.abs(samples).max() < SILENCE:
        raise InputError("the audio is silent: nothing to transcribe")
    return resample(samples, source_rate, rate)


def read_audio_file(path: Path) -> tuple[np.ndarray, int]:
    """(samples [n] or [n, channels] float32, rate) of a WAV file, or of another container through PyAV."""
    try:
        head = path.open("rb").read(12)
    except OSError as exc:
        raise InputError(f"cannot read the audio file {path}: {exc.strerror or exc}") from None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _read_wav(path)
    return _read_with_pyav(path)


_WAV_FORMATS = {1: "pcm", 3: "float"}


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    data = path.read_bytes()
    fmt, pcm = None, None
    at = 12
    while at + 8 <= len(data):
        kind, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        body = data[at + 8 : at + 8 + size]
        if kind == b"fmt ":
            if len(body) < 16:
                raise InputError(f"{path} is not a valid WAV file (its format chunk is cut short)")
            code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if code == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's first two bytes
                code = struct.unpack("<H", body[24:26])[0]
            fmt = (code, channels, rate, bits)
        elif kind == b"data":
            pcm = body
        at += 8 + size + (size & 1)
    if fmt is None or pcm is None:
        raise InputError(f"{path} is not a valid WAV file (no format or data chunk)")
    code, channels, rate, bits = fmt
    kind = _WAV_FORMATS.get(code)
    if channels < 1 or rate < 1:
        raise InputError(f"{path} is not a valid WAV file ({channels} channels at {rate} Hz)")
    if kind == "pcm" and bits in (8, 16, 24, 32):
        width = bits // 8
        raw = np.frombuffer(pcm[: len(pcm) // width * width], np.uint8).reshape(-1, width)
        if bits == 8:  # unsigned, centred at 128
            samples = (raw[:, 0].astype(np.float32) - 128.0) / 128.0
        else:
            padded = np.zeros((len(raw), 4), np.uint8)
            padded[:, 4 - width :] = raw  # little-endian bytes into the top of an int32
            samples = padded.view("<i4")[:, 0].astype(np.float32) / 2.0 ** 31
    elif kind == "float" and bits in (32, 64):
        dtype = "<f4" if bits == 32 else "<f8"
        width = bits // 8
        samples = np.frombuffer(pcm[: len(pcm) // width * width], dtype).astype(np.float32)
    else:
        name = kind or f"format code {code}"
        raise InputError(f"{path}: unsupported WAV sample format ({name}, {bits} bits); use 8/16/24/32-bit PCM or "
                         "32/64-bit float")
    frames = len(samples) // channels
    return samples[: frames * channels].reshape(frames, channels), rate


def _read_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    try:
        import av
    except ImportError:
        raise InputError(f"{path} is not a WAV file, and reading other audio formats needs PyAV "
                         "(pip install 'mmedge[video]'); or convert it to WAV") from None
    try:
        with av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise InputError(f"{path} has no audio stream")
            rate = streams[0].rate
            chunks = [frame.to_ndarray() for frame in container.decode(streams[0])]
    except InputError:
        raise
    except Exception as exc:  # PyAV raises its own errors for anything it cannot read
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise InputError(f"{path} is not audio mmedge can read ({why})") from None
    if not chunks:
        raise InputError(f"the audio in {path} is empty (0 samples)")
    samples = np.concatenate([c.T if c.shape[0] <= 8 and c.ndim == 2 else c.reshape(-1, 1) for c in chunks])
    if np.issubdtype(samples.dtype, np.integer):
        samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    return samples.astype(np.float32), int(rate)


def resample(samples: np.ndarray, source: int, target: int, half_width: int = 16, beta: float = 8.6) -> np.ndarray:
    """`samples` at `source` Hz as `target` Hz: a Kaiser-windowed sinc low-pass at the lower Nyquist frequency,
    `half_width` zero crossings a side."""
    samples = np.asarray(samples, np.float32)
    if source == target:
        return samples
    n_out = int(np.ceil(len(samples) * target / source))
    cutoff = min(1.0, target / source)  # of the source's Nyquist frequency
    reach = half_width / cutoff  # source samples a side within the filter
    out = np.empty(n_out, np.float32)
    taps = np.arange(-int(np.ceil(reach)), int(np.ceil(reach)) + 1)
    padded = np.concatenate([np.zeros(len(taps), np.float32), samples, np.zeros(len(taps), np.float32)])
    step = 4096
    for begin in range(0, n_out, step):
        times = np.arange(begin, min(begin + step, n_out)) * (source / target)
        base = np.floor(times).astype(np.int64)
        index = base[:, None] + taps[None, :]  # source samples around each output time
        offset = times[:, None] - index
        window = np.kaiser(2 * len(taps) + 1, beta)  # sampled below at the offset's place
        where = np.clip(offset / reach, -1.0, 1.0)
        kaiser = np.interp(where, np.linspace(-1.0, 1.0, len(window)), window)
        weights = cutoff * np.sinc(cutoff * offset) * kaiser * (np.abs(offset) <= reach)
        out[begin : begin + len(times)] = (padded[index + len(taps)] * weights).sum(axis=1)
    return out


def windows(samples: np.ndarray, spec: AudioSpec) -> list[np.ndarray]:
    """The audio in consecutive pieces of the model's window (30 s for Whisper), the last one shorter."""
    size = spec.chunk_length * spec.sampling_rate
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def log_mel(samples: np.ndarray, spec: AudioSpec) -> np.ndarray:
    """Whisper's log-mel spectrogram [feature_size, frames] of one window: padded with zeros (cut) to the window,
    Hann-windowed STFT (centred, reflect padding), power, Slaney mel filters, log10, floored 8 below the
    peak, scaled (x + 4) / 4: WhisperFeatureExtractor's features."""
    size = spec.chunk_length * spec.sampling_rate
    audio = np.zeros(size, np.float64)
    audio[: min(size, len(samples))] = samples[:size]
    half = spec.n_fft // 2
    audio = np.pad(audio, half, mode="reflect")
    frames = 1 + (len(audio) - spec.n_fft) // spec.hop_length
    index = np.arange(spec.n_fft)[None, :] + spec.hop_length * np.arange(frames)[:, None]
    window = np.hanning(spec.n_fft + 1)[:-1]  # periodic
    power = np.abs(np.fft.rfft(audio[index] * window, n=spec.n_fft, axis=1)) ** 2  # [frames, bins]
    mel = mel_filters(spec) @ power.T  # [mels, frames]
    log = np.log10(np.maximum(mel, 1e-10))[:, :-1]
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """The Slaney mel scale: linear below 1 kHz, logarithmic above."""
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), hz)


def mel_filters(spec: AudioSpec) -> np.ndarray:
    """[feature_size, 1 + n_fft / 2] triangular filters on the Slaney mel scale from 0 Hz to half the rate (at most
    8 kHz), each normalised to unit area (Slaney), as WhisperFeatureExtractor builds them."""
    top = min(8000.0, spec.sampling_rate / 2)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(top)), spec.feature_size + 2))
    bins = np.linspace(0, spec.sampling_rate // 2, 1 + spec.n_fft // 2)
    slopes = edges[None, :] - bins[:, None]
    diff = np.diff(edges)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[None, :]
    return filters.T
