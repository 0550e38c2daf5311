"""Slow truth for real tiny weights and the runtime export: the wheels' own graphs under onnxruntime.

Needs the pinned wheels (moonshine-voice==0.1.0 for tiny, moonshine-cpp==0.1.4 for base; fetched from PyPI
into $MLX_MOONSHINE_CACHE once) and moonshine-voice's speech clips (the dev extra installs 0.1.5).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_moonshine.adapters.apply import AdapterConfig, adapter_layers, apply_adapters, save_adapters
from mlx_moonshine.audio import AudioConfig, prepare_audio, split_on_silence
from mlx_moonshine.decoding import DecodingOptions, decode_batch
from mlx_moonshine.errors import MoonshineError
from mlx_moonshine.loading import convert, load
from mlx_moonshine.metrics import score

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime", reason="pip install 'mlx-moonshine[ort]' (onnxruntime, flatbuffers)")

CLIPS = ("beckett.wav", "two_cities.wav", "endgame_nagg_nell.wav")


def _shortcut(spec: str):
    from mlx_moonshine.convert.wheels import resolve_shortcut

    try:
        return resolve_shortcut(spec)[0]
    except MoonshineError as e:
        pytest.skip(f"{spec} unavailable: {e} (needs PyPI once, or $MLX_MOONSHINE_CACHE holding the unpacked wheel)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(MLX tiny folder converted from moonshine-voice:tiny-en, the wheel's runtime folder)."""
    ref = _shortcut("moonshine-voice:tiny-en")
    out = convert("moonshine-voice:tiny-en", tmp_path_factory.mktemp("tiny") / "mlx", log=lambda m: None)
    return out, ref


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    ref = _shortcut("moonshine-cpp:base-en")
    out = convert("moonshine-cpp:base-en", tmp_path_factory.mktemp("base") / "mlx", log=lambda m: None)
    return out, ref


def pieces(voice_assets, name):
    audio = prepare_audio(voice_assets / name, AudioConfig())
    return [audio[s:e] for s, e in split_on_silence(audio, max_seconds=20.0)]


def runtime_tokens(folder, audio_pieces):
    from mlx_moonshine.export.ort_runtime import OrtRuntime

    runtime, options = OrtRuntime(folder), DecodingOptions()
    return [runtime.greedy(p, options.token_budget(len(p) / 16000)) for p in audio_pieces]


def mlx_tokens(model, processor, audio_pieces):
    return [decode_batch(model, processor, [p], DecodingOptions())[0].tokens for p in audio_pieces]


@pytest.mark.parametrize("name", CLIPS)
def test_tiny_greedy_tokens_match_onnxruntime_on_the_shipped_graphs(tiny, voice_assets, name):
    mlx_dir, ref = tiny
    model, processor = load(mlx_dir)
    audio = pieces(voice_assets, name)
    got, want = mlx_tokens(model, processor, audio), runtime_tokens(ref, audio)
    for g, w in zip(got, want):
        assert g == w, (processor.tokenizer.decode(g), processor.tokenizer.decode(w))


def test_tiny_logits_match_transformers_after_export_hf(tiny, voice_assets, tmp_path):
    torch = pytest.importorskip("torch", reason="pip install 'mlx-moonshine[dev]' for the transformers oracle")
    transformers = pytest.importorskip("transformers", reason="pip install 'mlx-moonshine[dev]'")
    from mlx_moonshine.export import export_hf

    mlx_dir, _ = tiny
    hf_dir = export_hf(mlx_dir, tmp_path / "hf")
    ref = transformers.MoonshineForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model, processor = load(mlx_dir)
    audio = prepare_audio(voice_assets / "beckett.wav", AudioConfig())[: 10 * 16000]
    ids = [1] + decode_batch(model, processor, [audio], DecodingOptions())[0].tokens
    with torch.no_grad():
        want = ref(input_values=torch.from_numpy(audio)[None], decoder_input_ids=torch.tensor([ids])).logits.numpy()
    got = np.array(model(mx.array(audio[None]), mx.array([ids])))
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("which", ["tiny", "base"])
def test_unadapted_export_is_the_shipped_runtime_folder(which, request, tmp_path):
    from mlx_moonshine.export.runtime import DECODER, ENCODER, export_runtime

    mlx_dir, ref = request.getfixturevalue(which)
    export_runtime(mlx_dir, tmp_path / "out")
    for name in (ENCODER, DECODER, "tokenizer.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (ref / name).read_bytes(), name


def test_adapted_tiny_export_transcribes_like_mlx(tiny, voice_assets, tmp_path):
    """A random LoRA (q/v/fc1, B small enough to keep the words sane): exactly the adapted matrices are
    requantised, and onnxruntime on them stays within 5% WER of MLX with the adapter fused."""
    from mlx_moonshine.export.hf import load_fused
    from mlx_moonshine.export.runtime import DECODER, ENCODER, export_runtime

    mlx_dir, ref = tiny
    model, _ = load(mlx_dir)
    config = AdapterConfig(kind="lora", r=8, alpha=16.0, targets=["q_proj", "v_proj", "fc1"], seed=0)
    apply_adapters(model, config)
    rng = np.random.default_rng(0)
    for _, layer in adapter_layers(model):
        layer.lora_B = layer.lora_B + mx.array(0.002 * rng.standard_normal(layer.lora_B.shape), mx.float32)
    adapter = save_adapters(tmp_path / "adapter", model, config)
    adapted = {f"{name}.weight" for name, _ in adapter_layers(model)}
    record = export_runtime(mlx_dir, tmp_path / "out", adapter=adapter)
    assert set(record["graphs"][ENCODER]["rewritten"]) | set(record["graphs"][DECODER]["rewritten"]) == adapted

    fused, processor = load_fused(mlx_dir, adapter)
    audio = pieces(voice_assets, "beckett.wav") + pieces(voice_assets, "endgame_nagg_nell.wav")
    mlx_text = " ".join(processor.tokenizer.decode(t) for t in mlx_tokens(fused, processor, audio))
    ort_text = " ".join(processor.tokenizer.decode(t) for t in runtime_tokens(tmp_path / "out", audio))
    assert score(mlx_text, ort_text)["wer"] <= 0.05, (mlx_text, ort_text)


def test_a_config_that_differs_from_the_graph_is_refused(tiny, tmp_path):
    import shutil

    from mlx_moonshine.export.runtime import RuntimeExportError, export_runtime

    mlx_dir, _ = tiny
    edited = shutil.copytree(mlx_dir, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["encoder_hidden_act"], config["rope_theta"] = "silu", 5000.0
    config["rope_parameters"]["rope_theta"] = 5000.0
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeExportError, match=r"encoder_hidden_act='silu'.*rope theta"):
        export_runtime(edited, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

