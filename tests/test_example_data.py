"""The bundled ATC example (examples/atc): manifests load, audio is 16 kHz mono, splits are sound, it stays small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from mlx_moonshine.data import load_manifest

ATC = Path(__file__).resolve().parents[1] / "examples" / "atc"
MANIFESTS = ["domain_train.jsonl", "domain_val.jsonl", "domain_test.jsonl", "domain_quick.jsonl",
             "heldout_manifest.jsonl"]
MAX_BYTES = 10 * 1024 * 1024  # the example is committed: keep it under 10 MiB

pytestmark = pytest.mark.skipif(not (ATC / "domain_train.jsonl").is_file(),
                                reason="examples/atc has not been generated (python examples/atc/make_data.py)")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ATC / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_loads_and_audio_is_16k_mono(name):
    m = load_manifest(ATC / name)  # validates every row and every audio header
    assert len(m) == len(_rows(name)) > 0 and not m.skipped
    for s in m.samples:
        info = sf.info(str(s.audio_path))
        assert (info.samplerate, info.channels) == (16000, 1), s.audio_path
        assert abs(info.frames / info.samplerate - s.duration) < 0.05, s.id
        assert s.text == s.text.lower().strip() and s.speaker


def test_one_file_decodes():
    s = load_manifest(ATC / "domain_test.jsonl").samples[0]
    audio, sr = sf.read(str(s.audio_path), dtype="float32")
    assert sr == 16000 and audio.ndim == 1 and 0.01 < abs(audio).max() <= 1.0


def test_splits_are_speaker_and_text_disjoint():
    speakers = {sp: {r["speaker_group"] for r in _rows(f"domain_{sp}.jsonl")} for sp in ("train", "val", "test")}
    assert not speakers["train"] & speakers["test"]
    assert not speakers["train"] & speakers["val"]
    assert not speakers["val"] & speakers["test"]
    texts = [r["text"] for sp in ("train", "val", "test") for r in _rows(f"domain_{sp}.jsonl")]
    assert len(texts) == len(set(texts))
    train_ids = {r["id"] for r in _rows("domain_train.jsonl")}
    assert {r["id"] for r in _rows("domain_quick.jsonl")} <= train_ids


def test_heldout_is_general_english():
    rows = _rows("heldout_manifest.jsonl")
    assert all(r["domain"] == "general" for r in rows)
    assert not {w for r in rows for w in r["text"].split()} & {"niner", "squawk", "runway", "wilco"}


def test_total_size_is_commit_sized():
    total = sum(p.stat().st_size for p in ATC.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"examples/atc is {total / 2**20:.1f} MiB; regenerate with a lower --kbps"
