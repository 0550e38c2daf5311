"""Shared fixtures: paths to reference material that tests skip cleanly without."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before anything imports mlx)

REPO = Path(__file__).resolve().parents[1]

# Tiny random models transcribe real speech as noise: the tests turn the real-speech canary off unless a test
# asks for it (test_canary.py builds it from a fake sdist), so the suite needs no download for it.
os.environ.setdefault("MLX_MOONSHINE_CANARY", "none")
# Runs must not share the base's replay answers through ~/.cache: each test computes its own, and
# test_teacher.py turns the store on in a temporary folder to test it.
os.environ.setdefault("MLX_MOONSHINE_TEACHER_CACHE", "off")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's shared reference folder (tools/, data/), next to the repo."""
    path = REPO.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared reference folder not found at {path}")
    return path


@pytest.fixture(scope="session")
def base_hf_dir() -> Path:
    """Real Moonshine base weights in HF format.

    $MLX_MOONSHINE_BASE_HF, else ../models/base-hf, else built once with the project's own ORT
    converter from the PyPI wheel moonshine-cpp into ~/.cache/mlx-moonshine/base-hf (skips offline).
    """
    env = os.environ.get("MLX_MOONSHINE_BASE_HF")
    path = Path(env) if env else REPO.parent / "models" / "base-hf"
    if (path / "config.json").is_file():
        return path
    if env:
        pytest.skip(f"MLX_MOONSHINE_BASE_HF={env} has no config.json")
    from mlx_moonshine.errors import MoonshineError

    cache = Path(os.environ.get("MLX_MOONSHINE_CACHE", Path.home() / ".cache" / "mlx-moonshine"))
    built = cache / "base-hf"
    if not (built / "model.safetensors").is_file():
        try:
            from mlx_moonshine.convert.ort import ort_to_hf
            from mlx_moonshine.convert.wheels import resolve_moonshine_cpp

            src, tokenizer_json = resolve_moonshine_cpp("moonshine-cpp:base-en")
            ort_to_hf(src, built, tokenizer_json=tokenizer_json)
        except (MoonshineError, ImportError) as e:
            pytest.skip(f"no real base weights: {e}")
    return built


@pytest.fixture(scope="session")
def voice_assets() -> Path:
    """The moonshine_voice package's assets folder (real speech clips)."""
    spec = importlib.util.find_spec("moonshine_voice")
    if spec is None or not spec.origin:
        pytest.skip("moonshine_voice is not installed")
    path = Path(spec.origin).parent / "assets"
    if not path.is_dir():
        pytest.skip(f"moonshine_voice assets not found at {path}")
    return path


# --- Tiny random model folder, tokenizer and audio corpus (fast end-to-end tests) ---------------------

TINY_WORDS = ("alpha", "bravo", "charlie", "delta", "heading", "one", "two", "three", "niner", "zero",
              "climb", "descend", "flight", "level", "runway")


def write_tiny_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json: <unk>, <s>, </s> = ids 0, 1, 2, then TINY_WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(("<unk>", "<s>", "</s>") + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved MLX model folder with a tiny random Moonshine and the tiny tokenizer."""
    import mlx.core as mx

    from mlx_moonshine.audio import AudioConfig
    from mlx_moonshine.loading import Processor, save
    from mlx_moonshine.models.moonshine import Model, ModelArgs
    from mlx_moonshine.tokenizer import Tokenizer

    src = tmp_path_factory.mktemp("tiny-src")
    tok = Tokenizer(write_tiny_tokenizer(src / "tokenizer.json"))
    mx.random.seed(0)
    model = Model(ModelArgs(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                            encoder_num_hidden_layers=1, decoder_num_hidden_layers=1,
                            encoder_num_attention_heads=2, decoder_num_attention_heads=2,
                            max_position_embeddings=256, tie_word_embeddings=False))
    # Random weights mostly predict <s> forever; never predicting <unk>/<s> and sharper logits give
    # short, audio-dependent word sequences that end in </s>.
    keep = mx.array([0.0, 0.0] + [4.0] * (tok.vocab_size - 2))[:, None]
    model.proj_out.weight = model.proj_out.weight * keep
    processor = Processor(tokenizer=tok, audio=AudioConfig(), path=src,
                          generation={"bos_token_id": 1, "decoder_start_token_id": 1, "eos_token_id": 2})
    return save(model, processor, tmp_path_factory.mktemp("tiny") / "model")


def write_tiny_corpus(folder: Path, name: str, n: int, seed: int = 0) -> Path:
    """`n` noisy 16 kHz WAV clips (0.4-1.9 s) in folder/audio and a JSONL manifest folder/name.jsonl."""
    import json

    import numpy as np
    import soundfile as sf

    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        audio = folder / "audio" / f"{name}_{i}.wav"
        audio.parent.mkdir(parents=True, exist_ok=True)
        seconds = 0.4 + (i * 0.37) % 1.5
        sf.write(audio, (0.1 * rng.randn(int(seconds * 16000))).astype(np.float32), 16000)
        text = " ".join(rng.choice(TINY_WORDS, size=3 + i % 4))
        rows.append({"id": f"{name}_{i:03d}", "audio": f"audio/{audio.name}", "text": text})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_corpus(tmp_path) -> dict:
    """Manifests in tmp_path/data by name: 'domain_test' (9 clips), 'heldout' (5) and 'real_canary' (4; a stand-in
    for the real-speech canary, whose role comes from its name)."""
    folder = tmp_path / "data"
    return {"domain_test": write_tiny_corpus(folder, "domain_test", 9, seed=1),
            "heldout": write_tiny_corpus(folder, "heldout", 5, seed=2),
            "real_canary": write_tiny_corpus(folder, "real_canary", 4, seed=4)}
