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


REPLAY = Path(__file__).resolve().parents[1] / "mlx_moonshine" / "general_replay" / "general_replay.jsonl"
SHARED_HELDOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "atc" / "heldout_manifest.jsonl"
needs_replay = pytest.mark.skipif(not REPLAY.is_file(), reason="no replay set (make_data.py --replay-only)")


def _norm(text: str) -> str:
    # case, punctuation, apostrophes and hyphens do not make a sentence new
    return " ".join("".join(c for c in text.lower().replace("-", "") if c.isalnum() or c.isspace()).split())


def _replay_rows() -> list[dict]:
    return [json.loads(line) for line in REPLAY.read_text().splitlines() if line.strip()]


@needs_replay
def test_replay_manifest_loads_and_is_clean_general_speech():
    m = load_manifest(REPLAY)
    rows = _replay_rows()
    assert len(m) == len(rows) > 0 and not m.skipped
    assert all(r["domain"] == "general" and r["split"] == "replay" and "snr_db" not in r for r in rows)
    assert all(r["audio"].startswith("audio/") for r in rows)
    # several voices per sentence, but never a heldout voice
    assert len(rows) > len({r["text"] for r in rows})
    assert not {r["speaker"] for r in rows} & {r["speaker"] for r in _rows("heldout_manifest.jsonl")}


@needs_replay
@pytest.mark.parametrize("heldout", [ATC / "heldout_manifest.jsonl", SHARED_HELDOUT], ids=["bundled", "shared"])
def test_replay_text_never_appears_in_heldout(heldout):
    if not heldout.is_file():
        pytest.skip(f"{heldout} not found")
    held = [_norm(json.loads(line)["text"]) for line in heldout.read_text().splitlines() if line.strip()]
    replay = {_norm(r["text"]) for r in _replay_rows()}
    assert not replay & set(held), sorted(replay & set(held))[:5]
    # near-copies leak too: make_data.py drops replay lines with >= 60% word overlap with a heldout sentence
    for r in replay:
        a = set(r.split())
        worst = max(held, key=lambda h: len(a & set(h.split())) / len(a | set(h.split())))
        assert len(a & set(worst.split())) < 0.6 * len(a | set(worst.split())), (r, worst)
