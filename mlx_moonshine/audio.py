"""Audio in: load any common file, resample to 16 kHz mono float32, optionally RMS-normalise.

`prepare_audio` is the one function that turns a path or an array into model input; transcription,
evaluation and training all call it, so a model never sees audio prepared two different ways.
Moonshine consumes raw samples (no mel spectrogram), so this is the whole front end.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .errors import AudioError, ModelError

SAMPLE_RATE = 16000  # Hz; Moonshine was trained on 16 kHz audio only

# The encoder stem is three unpadded convolutions: conv1 (kernel 127, stride 64), conv2 (7, 3),
# conv3 (3, 2). conv3 needs >= 3 conv2 frames, conv2 needs >= 7 + 3 * (3 - 1) = 13 conv1 frames,
# and conv1 needs 127 + 64 * (13 - 1) samples for 13 frames. Anything shorter encodes to nothing.
MIN_SAMPLES = 127 + 64 * (13 - 1)  # 895 samples, about 56 ms at 16 kHz

DEFAULT_TARGET_DBFS = -20.0  # dB relative to a full-scale (+-1.0) constant; speech is typically -30..-15
_SILENCE_RMS = 1e-6  # below this (-120 dBFS) a clip is treated as silence and never amplified

# Formats libsndfile may not decode (depends on its build); we hand these to ffmpeg if it is installed.
_FFMPEG_SUFFIXES = {".mp3", ".m4a", ".aac", ".mp4", ".webm", ".wma", ".opus", ".mkv"}

# Our own key in preprocessor_config.json. HF's `do_normalize` means zero-mean/unit-variance
# (Wav2Vec2FeatureExtractor), which is a different operation, so we do not reuse it.
PREPROCESSOR_KEY = "mlx_moonshine_audio_normalization"

AudioSource = Union[str, Path, np.ndarray, "tuple[np.ndarray, int]"]


class AudioWarning(UserWarning):
    """Audio that loads but is not what its file says (e.g. truncated): transcribed, with a warning."""


def _wav_declared_frames(path: Path) -> int | None:
    """Frames a RIFF/WAVE header declares for its data chunk (libsndfile reports only those present)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(size + size % 2)
                    block_align = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else None
                elif cid == b"data":
                    # 0 and 0xFFFFFFFF are what streaming writers leave when they never patch the size.
                    return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
                else:
                    f.seek(size + size % 2, 1)
    except (OSError, struct.error):
        return None


def _warn_if_truncated(path: Path, frames_read: int, sample_rate: int, declared: int | None) -> None:
    if declared is not None and frames_read < declared:
        warnings.warn(AudioWarning(
            f"{path}: truncated: its header declares {declared / sample_rate:.2f} s but the file holds "
            f"{frames_read / sample_rate:.2f} s; only that part is transcribed; re-copy or re-export the file"))


@dataclass(frozen=True)
class AudioConfig:
    """How raw audio becomes model input. Saved with a model so training and inference agree.

    Attributes:
        sample_rate: Model input rate in Hz. Moonshine uses 16000.
        normalize: None (feed samples as loaded, like upstream Moonshine) or "rms".
        target_rms_dbfs: RMS level in dBFS (dB relative to full scale 1.0) that "rms" scales to.
    """

    sample_rate: int = SAMPLE_RATE
    normalize: str | None = None
    target_rms_dbfs: float = DEFAULT_TARGET_DBFS

    def __post_init__(self):
        if self.normalize not in (None, "rms"):
            raise ValueError(f"AudioConfig.normalize must be None or 'rms', got {self.normalize!r}")
        if self.sample_rate <= 0:
            raise ValueError(f"AudioConfig.sample_rate must be positive, got {self.sample_rate}")

    @classmethod
    def from_preprocessor_config(cls, config: dict) -> "AudioConfig":
        """Read our settings from a parsed HF `preprocessor_config.json` (unknown keys ignored)."""
        spec = config.get(PREPROCESSOR_KEY) or {}
        method = spec.get("method")
        return cls(
            sample_rate=int(config.get("sampling_rate", SAMPLE_RATE)),
            normalize=None if method in (None, "none") else method,
            target_rms_dbfs=float(spec.get("target_dbfs", DEFAULT_TARGET_DBFS)),
        )

    def to_preprocessor_config(self, config: dict | None = None) -> dict:
        """Return a copy of `config` with our settings written in; every other key is kept as is."""
        out = dict(config or {})
        out["sampling_rate"] = self.sample_rate
        out[PREPROCESSOR_KEY] = (
            None if self.normalize is None
            else {"method": self.normalize, "target_dbfs": self.target_rms_dbfs}
        )
        return out

    def to_dict(self) -> dict:
        return {
            "sample_rate": self.sample_rate,
            "normalize": self.normalize,
            "target_rms_dbfs": self.target_rms_dbfs,
        }


def load_audio_config(model_dir: str | Path) -> AudioConfig:
    """AudioConfig from `model_dir/preprocessor_config.json`; the default (no normalisation) if absent."""
    import json

    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return AudioConfig()
    try:
        return AudioConfig.from_preprocessor_config(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, AttributeError) as e:
        raise ModelError(
            f"{path}: bad audio settings ({e}); fix or delete the '{PREPROCESSOR_KEY}' entry"
        ) from e


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decode_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    # ffmpeg resamples and downmixes itself; f32le on stdout avoids a temporary file.
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path),
           "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"]
    try:
        out = subprocess.run(cmd, capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        msg = e.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(
            f"{path}: ffmpeg could not decode it ({msg[-1] if msg else 'no details'}); "
            "check the file plays, or convert it to 16 kHz WAV/FLAC"
        ) from e
    return np.frombuffer(out, dtype=np.float32).copy()


def _check_samples(x: np.ndarray, name: str) -> np.ndarray:
    if x.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples); remove it or replace it with a real recording")
    if x.size < MIN_SAMPLES:
        raise AudioError(
            f"{name}: audio is too short ({x.size} samples at 16 kHz, minimum {MIN_SAMPLES} = "
            f"{MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms for Moonshine's encoder); remove it or pad it"
        )
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{name}: audio contains NaN or infinite samples; re-export the file")
    return x


def _to_mono_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        # PCM integers -> [-1, 1): int16 full scale is 32768.
        x = x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        # (samples, channels) as soundfile returns it; (channels, samples) also accepted:
        # the channel axis is the short one.
        x = x.mean(axis=1 if x.shape[1] <= x.shape[0] else 0)
    elif x.ndim != 1:
        raise AudioError(f"audio array must be 1-D or 2-D, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(x: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 audio with soxr (high quality)."""
    if orig_rate == target_rate or x.size == 0:
        return x
    import soxr

    return soxr.resample(x, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Load an audio file as mono float32 at `sample_rate`.

    WAV/FLAC/OGG/Opus (and MP3 where libsndfile supports it) go through soundfile; other
    formats fall back to ffmpeg when it is installed. Channels are averaged.

    Args:
        path: Audio file.
        sample_rate: Output rate in Hz.

    Returns:
        float32 array of shape (N,).

    Raises:
        AudioError: missing, unreadable, empty, too short or non-finite audio.
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found; check the path (relative paths are resolved "
                         "against the manifest's folder)")
    if not path.is_file():
        raise AudioError(f"{path}: is not a file; pass an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty (0 bytes); re-export or remove it")
    try:
        with sf.SoundFile(str(path)) as f:
            declared, sr = f.frames, f.samplerate
            x = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        if path.suffix.lower() in _FFMPEG_SUFFIXES and shutil.which("ffmpeg"):
            return _check_samples(_decode_ffmpeg(path, sample_rate), str(path))
        if _looks_like_text(path):
            raise AudioError(f"{path}: this is a text file, not audio; point to the audio file "
                             "(is a manifest or transcript in the audio column?)") from e
        hint = " or install ffmpeg" if path.suffix.lower() in _FFMPEG_SUFFIXES else ""
        raise AudioError(f"{path}: cannot read audio ({e}); the file may be corrupt or an unsupported "
                         f"format: convert it to WAV/FLAC{hint}") from e
    _warn_if_truncated(path, len(x), sr, _wav_declared_frames(path) or declared)
    x = resample(np.ascontiguousarray(x.mean(axis=1)), sr, sample_rate)  # (N, C) -> (N,)
    return _check_samples(x, str(path))


def rms_normalize(x: np.ndarray, target_dbfs: float = DEFAULT_TARGET_DBFS) -> np.ndarray:
    """Scale `x` so its RMS is `target_dbfs` dB relative to full scale (1.0).

    Silence (RMS below -120 dBFS) is returned unchanged rather than blown up into noise.
    The result is NOT clipped: quiet clips with loud peaks may exceed +-1.0 after scaling, which
    the model handles (its input is float); clipping would distort the very peaks it needs.
    """
    x = np.asarray(x, dtype=np.float32)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    if rms < _SILENCE_RMS:
        return x
    gain = 10.0 ** (target_dbfs / 20.0) / rms
    return (x * gain).astype(np.float32)


def prepare_audio(source: AudioSource, config: AudioConfig | None = None) -> np.ndarray:
    """Turn a file or an array into model input: mono float32 at `config.sample_rate`, normalised.

    Args:
        source: A path, an `(array, sample_rate)` tuple, or an array already at
            `config.sample_rate`. Arrays may be int PCM or float, (N,), (N, C) or (C, N).
        config: How to prepare; the default is 16 kHz with no normalisation.

    Returns:
        float32 array of shape (N,).
    """
    config = config or AudioConfig()
    if isinstance(source, (str, Path)):
        x = load_audio(source, config.sample_rate)
        name = str(source)
    else:
        if isinstance(source, tuple):
            if len(source) != 2:
                raise AudioError("audio tuple must be (array, sample_rate)")
            array, sr = source
        else:
            array, sr = source, config.sample_rate
        x = _check_samples(resample(_to_mono_float(array), int(sr), config.sample_rate), "audio array")
        name = "audio array"
    if config.normalize == "rms":
        x = rms_normalize(x, config.target_rms_dbfs)
    assert x.dtype == np.float32 and x.ndim == 1, name
    return x


def split_on_silence(
    x: np.ndarray,
    max_seconds: float = 20.0,
    sample_rate: int = SAMPLE_RATE,
    min_seconds: float | None = None,
    frame_seconds: float = 0.02,
) -> list[tuple[int, int]]:
    """Cut long audio into pieces of at most `max_seconds`, each cut at the quietest point.

    The cut for each piece is the lowest-energy frame between `min_seconds` and `max_seconds`
    from the piece start, so pieces end in pauses where there are any. Nothing is rejected: audio
    with no pause is still cut (at its quietest frame), and short audio is one piece.

    Args:
        x: Mono audio, shape (N,).
        max_seconds: Longest piece.
        sample_rate: Rate of `x` in Hz.
        min_seconds: Shortest piece except the last; default half of `max_seconds`.
        frame_seconds: Energy frame length (20 ms).

    Returns:
        (start, end) sample indices covering `x` in order, end exclusive.
    """
    n = len(x)
    max_len = int(max_seconds * sample_rate)
    min_len = int((max_seconds / 2 if min_seconds is None else min_seconds) * sample_rate)
    if max_len <= 0 or not 0 <= min_len <= max_len:
        raise ValueError(f"need 0 <= min_seconds <= max_seconds and max_seconds > 0, "
                         f"got {min_seconds=}, {max_seconds=}")
    frame = max(1, int(frame_seconds * sample_rate))
    pieces, start = [], 0
    while n - start > max_len:
        lo, hi = start + min_len, start + max_len
        hi = max(lo, min(hi, n - min_len))  # leave the final piece at least min_len when possible
        seg = np.asarray(x[lo:hi], dtype=np.float32)
        n_frames = len(seg) // frame
        if n_frames == 0:
            cut = hi
        else:
            energy = np.square(seg[: n_frames * frame].reshape(n_frames, frame)).mean(axis=1)
            cut = lo + int(np.argmin(energy)) * frame + frame // 2
        cut = max(cut, start + 1)
        pieces.append((start, cut))
        start = cut
    if start < n:
        pieces.append((start, n))
    return pieces


def pad_batch(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D clips into a right-zero-padded batch.

    Returns:
        audio: float32 (B, N_max); lengths: int32 (B,) true sample counts.
    """
    if not arrays:
        raise ValueError("pad_batch needs at least one array")
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    out = np.zeros((len(arrays), int(lengths.max())), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, lengths
