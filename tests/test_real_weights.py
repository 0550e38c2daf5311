"""Slow truth: converted real Moonshine base weights against transformers on real speech.

Needs ../models/base-hf (made by ../shared/tools/moonshine_base_from_ort.py, or set MLX_MOONSHINE_BASE_HF)
and the moonshine-voice wheel's clips; skips cleanly without them.
"""

import math
import subprocess
import sys

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401
import mlx.core as mx

from mlx_moonshine.audio import AudioConfig, prepare_audio, split_on_silence
from mlx_moonshine.decoding import DecodingOptions, decode_batch

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CLIPS = ("beckett.wav", "two_cities.wav", "endgame_nagg_nell.wav")


@pytest.fixture(scope="module")
def mlx_dir(base_hf_dir, tmp_path_factory):
    from mlx_moonshine.loading import convert

    out = tmp_path_factory.mktemp("base-mlx")
    return convert(str(base_hf_dir), out, force=True, log=lambda m: None)


@pytest.fixture(scope="module")
def models(base_hf_dir, mlx_dir):
    from mlx_moonshine.loading import load

    ref = transformers.MoonshineForConditionalGeneration.from_pretrained(str(base_hf_dir),
                                                                         dtype=torch.float32).eval()
    model, processor = load(mlx_dir)
    return ref, model, processor


def pieces(voice_assets, name):
    audio = prepare_audio(voice_assets / name, AudioConfig())
    return [audio[s:e] for s, e in split_on_silence(audio, max_seconds=20.0)]


def hf_greedy(ref, audio):
    budget = max(8, math.ceil(6.5 * len(audio) / 16000))
    x = torch.from_numpy(audio)[None]
    with torch.inference_mode():
        out = ref.generate(input_values=x, attention_mask=torch.ones_like(x, dtype=torch.long),
                           max_new_tokens=budget, do_sample=False, num_beams=1)
    return [t for t in out[0].tolist()[1:] if t != 2]


def test_batch_whose_rows_leave_equals_each_clip_alone_without_blocked_products(models, voice_assets, monkeypatch):
    """Decoding 3 clips together (rows leave as they finish: compiled steps for 3, 2 and 1 rows, the blocked
    one- and two-row head products first built inside a trace) gives each clip's tokens decoded alone with
    the plain products (fastmath's blocks off)."""
    from mlx_moonshine.models import fastmath

    _, model, processor = models
    clips = [p[0][: 16000 * s] for p, s in zip((pieces(voice_assets, n) for n in CLIPS), (9, 4, 6))]
    together = [r.tokens for r in decode_batch(model, processor, clips)]
    monkeypatch.setattr(fastmath, "_BLOCK_ROWS", 0)  # read at every call: the eager steps take the plain product
    plain = [decode_batch(model, processor, [c], compile=False)[0].tokens for c in clips]
    assert together == plain and all(together)


@pytest.mark.parametrize("name", CLIPS)
def test_greedy_tokens_match_transformers(models, voice_assets, name):
    ref, model, processor = models
    for piece in pieces(voice_assets, name):
        assert len(piece) <= 20 * 16000
        expected = hf_greedy(ref, piece)
        (got,) = decode_batch(model, processor, [piece], DecodingOptions())
        assert got.tokens == expected, (processor.tokenizer.decode(got.tokens),
                                        processor.tokenizer.decode(expected))


def test_logits_match_transformers_on_10s_clip(models, voice_assets):
    ref, model, processor = models
    audio = prepare_audio(voice_assets / "beckett.wav", AudioConfig())[: 10 * 16000]
    ids = [1] + hf_greedy(ref, audio)
    with torch.no_grad():
        expected = ref(input_values=torch.from_numpy(audio)[None],
                       decoder_input_ids=torch.tensor([ids])).logits.numpy()
    got = np.array(model(mx.array(audio[None]), mx.array([ids])))
    # The issue asks for <= 1e-3; with fp32-careful GroupNorm statistics we are at ~3e-5.
    assert np.abs(got - expected).max() <= 1e-4


def test_cli_transcribe_prints_transformers_words(models, mlx_dir, voice_assets):
    ref, _, processor = models
    path = voice_assets / "beckett.wav"
    out = subprocess.run([sys.executable, "-m", "mlx_moonshine", "transcribe", "--model", str(mlx_dir),
                          str(path)], capture_output=True, text=True, check=True)
    expected = processor.tokenizer.decode(hf_greedy(ref, prepare_audio(path, AudioConfig())))
    assert out.stdout.strip() == expected
