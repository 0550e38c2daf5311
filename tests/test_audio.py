"""Audio loading, resampling, normalisation, silence splitting and padding (mlx_moonshine/audio.py)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from mlx_moonshine.audio import (
    MIN_SAMPLES,
    PREPROCESSOR_KEY,
    SAMPLE_RATE,
    AudioConfig,
    load_audio,
    load_audio_config,
    pad_batch,
    prepare_audio,
    rms_normalize,
    split_on_silence,
)
from mlx_moonshine.errors import AudioError


def sine(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def rms_dbfs(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


@pytest.mark.parametrize("sr", [8000, 16000, 44100, 48000])
def test_any_rate_is_resampled_to_16k(tmp_path, sr):
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, sine(0.5, sr), sr)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - SAMPLE_RATE // 2) <= 1
    # The 440 Hz tone survives resampling: same RMS (0.3 / sqrt(2)) away from the edges.
    assert np.sqrt(np.mean(x[1000:-1000] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)


def test_stereo_is_downmixed_by_mean(tmp_path):
    left, right = sine(0.2, 16000, amp=0.4), np.zeros(3200, np.float32)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 16000)
    np.testing.assert_allclose(load_audio(path), left / 2, atol=1e-4)
    # Arrays: (N, C), (C, N) and int16 PCM are all accepted.
    both = np.stack([left, right], axis=1)
    np.testing.assert_allclose(prepare_audio(both), left / 2, atol=1e-6)
    np.testing.assert_allclose(prepare_audio(both.T), left / 2, atol=1e-6)
    pcm = (left * 32767).astype(np.int16)
    np.testing.assert_allclose(prepare_audio(pcm), left, atol=1e-4)


def test_prepare_audio_accepts_array_with_rate_and_normalises(tmp_path):
    x = sine(0.5, 48000, amp=0.01)
    cfg = AudioConfig(normalize="rms", target_rms_dbfs=-20.0)
    y = prepare_audio((x, 48000), cfg)
    assert abs(len(y) - 8000) <= 1
    assert rms_dbfs(y) == pytest.approx(-20.0, abs=0.05)
    path = tmp_path / "quiet.wav"
    sf.write(path, x, 48000, subtype="FLOAT")
    np.testing.assert_allclose(prepare_audio(path, cfg), y, atol=1e-5)
    # Default config: samples as loaded (upstream Moonshine does no normalisation).
    assert rms_dbfs(prepare_audio(str(path))) == pytest.approx(rms_dbfs(x), abs=0.1)


def test_rms_normalize_hits_target_and_leaves_silence_alone():
    rng = np.random.default_rng(0)
    x = (0.05 * rng.standard_normal(16000)).astype(np.float32)
    for target in (-30.0, -20.0, -10.0):
        assert rms_dbfs(rms_normalize(x, target)) == pytest.approx(target, abs=1e-3)
    silence = np.zeros(16000, np.float32)
    np.testing.assert_array_equal(rms_normalize(silence, -20.0), silence)


def test_audio_config_round_trips_through_preprocessor_config(tmp_path):
    hf = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": False,
          "sampling_rate": 16000, "padding_value": 0.0}
    cfg = AudioConfig(normalize="rms", target_rms_dbfs=-23.0)
    out = cfg.to_preprocessor_config(hf)
    assert out[PREPROCESSOR_KEY] == {"method": "rms", "target_dbfs": -23.0}
    assert {k: out[k] for k in hf} == hf  # HF keys untouched, do_normalize included
    assert AudioConfig.from_preprocessor_config(out) == cfg
    (tmp_path / "preprocessor_config.json").write_text(__import__("json").dumps(out))
    assert load_audio_config(tmp_path) == cfg
    assert load_audio_config(tmp_path / "nowhere") == AudioConfig()
    assert AudioConfig.from_preprocessor_config(hf).normalize is None
    assert cfg.to_dict() == {"sample_rate": 16000, "normalize": "rms", "target_rms_dbfs": -23.0}


def _bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    text = tmp_path / "transcript.wav"
    text.write_text("cleared to land runway two seven\n")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    short = tmp_path / "short.wav"
    sf.write(short, np.ones(MIN_SAMPLES - 1, np.float32) * 0.1, 16000)
    zero_bytes = tmp_path / "zero.flac"
    zero_bytes.write_bytes(b"")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(4000, np.nan, np.float32), 16000, subtype="FLOAT")
    return {
        "missing": (tmp_path / "missing.wav", "not found"),
        "corrupt": (corrupt, "cannot read audio"),
        "text": (text, "text file"),
        "empty": (empty, "empty"),
        "short": (short, "too short"),
        "zero_bytes": (zero_bytes, "empty"),
        "nan": (nan, "NaN"),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "text", "empty", "short", "zero_bytes", "nan"])
def test_bad_audio_raises_audio_error_naming_the_file(tmp_path, case):
    path, needle = _bad_inputs(tmp_path)[case]
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_min_samples_is_the_shortest_clip_the_encoder_stem_can_encode():
    def conv_len(n, k, s):
        return (n - k) // s + 1

    def stem(n):
        return conv_len(conv_len(conv_len(n, 127, 64), 7, 3), 3, 2)

    assert stem(MIN_SAMPLES) == 1 and stem(MIN_SAMPLES - 1) == 0


def test_split_on_silence_cuts_in_the_gap():
    sr = 16000
    rng = np.random.default_rng(1)
    speech = lambda s: (0.2 * rng.standard_normal(int(s * sr))).astype(np.float32)  # noqa: E731
    # 7 s of "speech", 0.5 s of silence, 6 s of speech: max 10 s forces one cut, in the gap.
    x = np.concatenate([speech(7.0), np.zeros(sr // 2, np.float32), speech(6.0)])
    pieces = split_on_silence(x, max_seconds=10.0, sample_rate=sr, min_seconds=2.0)
    assert len(pieces) == 2
    (a0, a1), (b0, b1) = pieces
    assert a0 == 0 and a1 == b0 and b1 == len(x)
    assert 7 * sr <= a1 <= 7.5 * sr
    # Long audio without pauses is still split, never rejected, and pieces cover it.
    y = speech(45.0)
    pieces = split_on_silence(y, max_seconds=20.0, sample_rate=sr)
    assert all(e - s <= 20 * sr for s, e in pieces)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(y)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
    assert split_on_silence(speech(3.0), max_seconds=20.0) == [(0, 3 * sr)]


def test_pad_batch_right_pads_with_zeros():
    audio, lengths = pad_batch([np.ones(3, np.float32), np.ones(5, np.float32)])
    assert audio.shape == (2, 5) and audio.dtype == np.float32
    assert lengths.tolist() == [3, 5] and lengths.dtype == np.int32
    assert audio[0].tolist() == [1, 1, 1, 0, 0]


def test_mp3_loads_and_ffmpeg_formats_fall_back(tmp_path):
    import shutil
    import subprocess

    x = sine(0.5, 44100)
    mp3 = tmp_path / "tone.mp3"
    try:
        sf.write(mp3, x, 44100, format="MP3")
    except Exception:
        pytest.skip("this libsndfile cannot write MP3")
    assert abs(len(load_audio(mp3)) - 8000) < 200  # MP3 frames add a little padding
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    wav, m4a = tmp_path / "tone.wav", tmp_path / "tone.m4a"
    sf.write(wav, x, 44100)
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-i", str(wav), str(m4a)], check=True)
    assert abs(len(load_audio(m4a)) - 8000) < 1000
