"""CLI behaviour a user sees: clear one-line errors (exit 2, no traceback), convert, transcribe."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from mlx_moonshine.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_clean_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert str(needle) in result.output


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, (0.1 * np.random.RandomState(0).randn(16000)).astype(np.float32), 16000)
    return path


@pytest.mark.parametrize("args", [[], ["train"], ["eval"], ["export", "peft"], ["convert"]])
def test_help_does_not_import_mlx(args):
    """`--help` of the CLI and of its commands runs without importing MLX (the CLI imports lazily)."""
    code = ("import sys\nfrom mlx_moonshine.cli import main\n"
            f"try:\n    main({[*args, '--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('mlx.core imported' if 'mlx.core' in sys.modules else 'mlx.core not imported')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage:" in out.stdout and out.stdout.strip().endswith("mlx.core not imported"), out.stdout[-500:]


def test_version_names_the_blas():
    result = run("--version")
    assert result.exit_code == 0 and "BLAS:" in result.output


def test_transcribe_prints_one_line_per_file(tiny_model_dir, clip, tmp_path):
    other = tmp_path / "other.flac"
    sf.write(other, (0.1 * np.random.RandomState(1).randn(24000, 2)).astype(np.float32), 24000)  # stereo 24k
    result = run("transcribe", "--model", tiny_model_dir, clip, other)
    assert result.exit_code == 0, result.output
    assert len(result.output.rstrip("\n").split("\n")) == 2

    result = run("transcribe", "--model", tiny_model_dir, "--json", clip)
    row = json.loads(result.output)
    assert row["decoding"]["beam_size"] == 1 and "audio_normalization" in row


@pytest.mark.parametrize("kind", ["missing", "corrupt", "empty", "text"])
def test_transcribe_bad_audio_names_the_file(tiny_model_dir, clip, tmp_path, kind):
    bad = tmp_path / f"bad_{kind}.wav"
    if kind == "corrupt":
        bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + bytes(100))
    elif kind == "empty":
        sf.write(bad, np.zeros(0, np.float32), 16000)
    elif kind == "text":
        bad = tmp_path / "notes.wav"
        bad.write_text("these are my notes, not audio\n")
    result = run("transcribe", "--model", tiny_model_dir, clip, bad)
    assert_clean_error(result, bad.name)


def test_model_dir_without_weights(tiny_model_dir, clip, tmp_path):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    assert_clean_error(run("transcribe", "--model", broken, clip), "model.safetensors", "convert")
    assert_clean_error(run("transcribe", "--model", tmp_path / "nowhere", clip), "nowhere")


def test_convert_refuses_to_overwrite_and_round_trips(tiny_model_dir, clip, tmp_path):
    out = tmp_path / "converted"
    assert run("convert", tiny_model_dir, "-o", out).exit_code == 0
    record = json.loads((out / "conversion.json").read_text())
    assert record["dtype"] == "float32" and "model.safetensors" in record["inputs_sha256"]
    assert_clean_error(run("convert", tiny_model_dir, "-o", out), "--force")
    assert run("convert", tiny_model_dir, "-o", out, "--force", "--dtype", "float16").exit_code == 0
    a = run("transcribe", "--model", tiny_model_dir, clip)
    b = run("transcribe", "--model", out, clip)
    assert a.exit_code == b.exit_code == 0


def test_convert_unreachable_hub_names_offline_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("convert", "UsefulSensors/moonshine-tiny-does-not-exist", "-o", tmp_path / "x")
    assert_clean_error(result, "moonshine-cpp:base-en")


def test_bad_decoding_options_are_rejected(tiny_model_dir, clip):
    result = run("transcribe", "--model", tiny_model_dir, "--max-tokens-per-second", "-1", clip)
    assert_clean_error(result, "max_tokens_per_second")


def test_convert_records_rms_normalisation_used_everywhere(tiny_model_dir, tmp_path):
    from mlx_moonshine.audio import prepare_audio, rms_normalize
    from mlx_moonshine.loading import load

    out = tmp_path / "rms"
    assert run("convert", tiny_model_dir, "-o", out, "--normalize", "rms", "--target-dbfs", "-23").exit_code == 0
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["mlx_moonshine_audio_normalization"] == {"method": "rms", "target_dbfs": -23.0}
    _, processor = load(out)
    x = (0.3 * np.random.RandomState(0).randn(8000)).astype(np.float32)
    np.testing.assert_allclose(prepare_audio(x, processor.audio), rms_normalize(x, -23.0), rtol=1e-6)
    _, plain = load(tiny_model_dir)
    np.testing.assert_array_equal(prepare_audio(x, plain.audio), x)
