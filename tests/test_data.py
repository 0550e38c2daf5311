"""Manifests: loading, validation, stats and copies (data.py), splits (splits.py), the training row order
(train/batches.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from mlx_moonshine.cli import main
from mlx_moonshine.data import copy_manifest, load_manifest, manifest_stats
from mlx_moonshine.errors import ManifestError
from mlx_moonshine.io import sha256_file
from mlx_moonshine.splits import split_manifest
from mlx_moonshine.train.batches import iterate_batches


def write_wav(path: Path, seconds: float, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * sr), np.float32), sr)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """12 clips by 4 speakers, audio in a subfolder referenced relatively."""
    rows = []
    for i in range(12):
        write_wav(tmp_path / "audio" / f"c{i}.wav", 0.5 + 0.1 * i)
        rows.append({"audio": f"audio/c{i}.wav", "text": f"utterance {i}", "speaker": f"s{i % 4}",
                     "snr_db": 20 + i})
    return write_jsonl(tmp_path / "all.jsonl", rows)


def test_load_jsonl_resolves_paths_and_keeps_extras(corpus):
    m = load_manifest(corpus)
    assert len(m) == 12 and m.skipped == [] and m.sha256 == sha256_file(corpus)
    s = m.samples[3]
    assert s.id == "c3" and s.audio_path == corpus.parent / "audio" / "c3.wav"
    assert s.audio_path.is_file() and s.text == "utterance 3" and s.speaker == "s3"
    assert s.duration == pytest.approx(0.8) and s.extra == {"snr_db": 23}


@pytest.mark.parametrize("sep,ext", [(",", "csv"), ("\t", "tsv")])
def test_load_csv_and_tsv(tmp_path, sep, ext):
    write_wav(tmp_path / "a.wav", 0.5)
    path = tmp_path / f"m.{ext}"
    path.write_text(sep.join(["audio", "text", "speaker"]) + "\n" + sep.join(["a.wav", "hello there", "x"]) + "\n")
    m = load_manifest(path)
    assert [(s.id, s.text, s.speaker) for s in m.samples] == [("a", "hello there", "x")]
    bad = tmp_path / f"nohead.{ext}"
    bad.write_text(sep.join(["a.wav", "hello"]) + "\n")
    with pytest.raises(ManifestError, match="audio"):
        load_manifest(bad)


def _broken_manifest(tmp_path: Path) -> Path:
    write_wav(tmp_path / "ok.wav", 0.5)
    write_wav(tmp_path / "long.wav", 3.0)
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all")
    return write_jsonl(tmp_path / "broken.jsonl", [
        {"audio": "ok.wav", "text": "fine", "id": "u1"},        # line 1: good
        '{"audio": "ok.wav", "text": ',                          # line 2: not JSON
        {"audio": "ok.wav"},                                     # line 3: no text
        {"audio": "ok.wav", "text": "  "},                       # line 4: empty text
        {"audio": "nowhere.wav", "text": "x"},                   # line 5: missing file
        {"audio": "garbage.wav", "text": "x"},                   # line 6: unreadable
        {"audio": "long.wav", "text": "x"},                      # line 7: too long
        {"audio": "ok.wav", "text": "again", "id": "u1"},       # line 8: duplicate id
    ])


def test_every_bad_row_is_listed_in_one_error(tmp_path):
    path = _broken_manifest(tmp_path)
    with pytest.raises(ManifestError) as err:
        load_manifest(path, max_seconds=2.0)
    msg = str(err.value)
    assert str(path) in msg and "7 of 8 rows" in msg and "--skip-invalid" in msg
    for line, needle in [(2, "JSON"), (3, "text"), (4, "empty"), (5, "not found"),
                         (6, "unreadable"), (7, "longer than"), (8, "duplicate id 'u1'")]:
        assert any(f"line {line}:" in l and needle in l for l in msg.splitlines()), (line, msg)
    assert "line 1:" not in msg


def test_skip_invalid_keeps_good_rows_and_records_the_rest(tmp_path):
    m = load_manifest(_broken_manifest(tmp_path), max_seconds=2.0, skip_invalid=True)
    assert [s.id for s in m.samples] == ["u1"]
    assert m.n_skipped == 7 and [line for line, _ in m.skipped] == [2, 3, 4, 5, 6, 7, 8]


def test_missing_manifest_and_unknown_extension(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match=".jsonl, .csv or .tsv"):
        load_manifest(tmp_path / "m.txt")


def test_cli_stats_on_broken_manifest_exits_2_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["manifest", "stats", str(_broken_manifest(tmp_path))])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert "line 5:" in result.output


def test_cli_stats_and_split(corpus, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["manifest", "stats", str(corpus)])
    assert result.exit_code == 0, result.output
    assert "speakers" in result.output and "12" in result.output
    out = tmp_path / "splits"
    result = runner.invoke(main, ["manifest", "split", str(corpus), "--ratios", "50/25/25",
                                  "--by", "speaker", "--quick", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["quick.jsonl", "test.jsonl", "train.jsonl", "val.jsonl"]
    bad = runner.invoke(main, ["manifest", "split", str(corpus), "--ratios", "a/b", "-o", str(out)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_split_is_deterministic_disjoint_and_paths_resolve(corpus, tmp_path):
    m = load_manifest(corpus)
    a = split_manifest(m, tmp_path / "a", ratios=(50, 25, 25), quick=3, seed=7)
    b = split_manifest(corpus, tmp_path / "b", ratios=(50, 25, 25), quick=3, seed=7)
    ids = {k: [s.id for s in load_manifest(p).samples] for k, p in a.items()}  # loading checks paths
    assert ids == {k: [s.id for s in load_manifest(p).samples] for k, p in b.items()}
    assert [len(ids[k]) for k in ("train", "val", "test")] == [6, 3, 3]
    assert set(ids["train"]) | set(ids["val"]) | set(ids["test"]) == {s.id for s in m.samples}
    assert set(ids["quick"]) <= set(ids["train"]) and len(ids["quick"]) == 3
    row = json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])
    assert "snr_db" in row and "speaker" in row


def test_split_by_speaker_keeps_speakers_apart(corpus, tmp_path):
    paths = split_manifest(corpus, tmp_path / "s", ratios=(50, 25, 25), by="speaker", seed=1)
    spk = {k: {s.speaker for s in load_manifest(paths[k]).samples} for k in ("train", "val", "test")}
    assert all(spk[k] for k in spk)
    assert not (spk["train"] & spk["val"]) and not (spk["train"] & spk["test"]) and not (spk["val"] & spk["test"])
    # val holds one speaker: it cannot be split three ways without sharing that speaker.
    with pytest.raises(ManifestError, match="too few"):
        split_manifest(paths["val"], tmp_path / "t", by="speaker")


def test_manifest_stats(corpus):
    st = manifest_stats(corpus)
    durations = [0.5 + 0.1 * i for i in range(12)]
    assert st["n"] == 12 and st["speakers"] == 4
    assert st["hours"] == pytest.approx(sum(durations) / 3600)
    assert st["duration_min"] == pytest.approx(0.5) and st["duration_max"] == pytest.approx(1.6)
    assert st["duration_median"] == pytest.approx(np.median(durations))


def test_copy_manifest_is_exact(corpus, tmp_path):
    rec = copy_manifest(corpus, tmp_path / "run")
    assert Path(rec["path"]).read_bytes() == corpus.read_bytes()
    assert rec["sha256"] == sha256_file(corpus)


def test_iterate_batches_buckets_by_length_and_is_deterministic(corpus):
    samples = load_manifest(corpus).samples
    first = [[s.id for s in b] for b in iterate_batches(samples, 4, shuffle=True, seed=3)]
    again = [[s.id for s in b] for b in iterate_batches(samples, 4, shuffle=True, seed=3)]
    assert first == again and sorted(sum(first, [])) == sorted(s.id for s in samples)
    assert [len(b) for b in first] == [4, 4, 4]
    # One sorting chunk covers everything here, so batches are contiguous in duration.
    for b in iterate_batches(samples, 4, shuffle=True, seed=3):
        d = [s.duration for s in b]
        assert max(d) - min(d) < 0.35
    plain = [s.id for b in iterate_batches(samples, 5, shuffle=False, bucket=False) for s in b]
    assert plain == [s.id for s in samples]
