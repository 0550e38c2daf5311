"""io.atomic_dir: the one way every folder the package writes (model, export, checkpoint, best/) lands;
io.read_jsonl: the one way files appended to line by line (metrics, the teacher's transcripts) are read back."""

from __future__ import annotations

import json

import pytest

from mlx_moonshine.errors import ModelError, OutputError
from mlx_moonshine.io import atomic_dir, prepare_out_dir, read_jsonl


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_replaces_the_old_folder_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # nothing visible before the block ends
    assert _names(out) == ["new.txt"]
    assert _names(tmp_path) == ["out"]  # no staging folder, no out.old


def test_atomic_dir_replaces_a_file_in_the_way(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("x")
    assert out.is_dir() and _names(tmp_path) == ["out"]


def test_a_failure_inside_leaves_the_old_folder_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise ValueError("boom")
    assert _names(out) == ["old.txt"] and _names(tmp_path) == ["out"]


def test_an_output_error_names_the_folder_asked_for_not_the_staging_one(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        with atomic_dir(out) as tmp:
            raise OutputError(f"cannot write {tmp / 'model.safetensors'}: disk full")
    assert str(out / "model.safetensors") in str(e.value) and "/.out." not in str(e.value)
    assert not out.exists() and _names(tmp_path) == []


def test_staging_parent_and_prefix(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with atomic_dir(run / "checkpoint", prefix=".checkpoint-") as tmp:
        assert tmp.parent == run and tmp.name.startswith(".checkpoint-")
        (tmp / "state.json").write_text("{}")
    assert _names(run) == ["checkpoint"]


def test_prepare_out_dir_refuses_a_non_empty_folder_without_force(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelError, match="--force"):
        prepare_out_dir(tmp_path, force=False)
    assert prepare_out_dir(tmp_path, force=True) == tmp_path
    assert prepare_out_dir(tmp_path / "new", force=False) == tmp_path / "new"


# -- read_jsonl -----------------------------------------------------------------------------------------

def _lines(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(_lines({"a": 1}, {"a": 2}) + b'{"a": 3, "b": "hal')  # killed mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_bytes(_lines({"a": 1}))
    assert read_jsonl(path) == [{"a": 1}]
    path.write_bytes(b"")
    assert read_jsonl(path) == []


def test_read_jsonl_skips_a_bad_line_in_the_middle_and_keeps_the_rest(tmp_path):
    path = tmp_path / "rows.jsonl"
    # A torn line the next run appended after: its first row is glued onto the fragment, the rest is whole.
    path.write_bytes(_lines({"a": 1}) + b'{"a": 2, "b' + _lines({"a": 3}, {"a": 4}))
    assert read_jsonl(path) == [{"a": 1}, {"a": 4}]
    # Blank, not JSON, not an object, not UTF-8: each left out, the rows around kept.
    path.write_bytes(_lines({"a": 1}) + b"\n  \nnot json\n[1, 2]\n7\n\"s\"\n" + b'{"a": "\xff\xfe"}\n' + _lines({"a": 2}))
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_cuts_lines_at_newlines_only(tmp_path):
    path = tmp_path / "rows.jsonl"
    row = {"text": "a\u2028b\x85c\u2029d", "n": "\u00e9"}
    path.write_bytes(json.dumps(row, ensure_ascii=False).encode() + b"\r\n" + _lines({"a": 1}))
    assert read_jsonl(path) == [row, {"a": 1}]


def test_the_train_readers_skip_a_torn_line_wherever_it_is(tmp_path, monkeypatch):
    from mlx_moonshine.data import Sample
    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.train import state, teacher, teacher_cache

    torn = b'{"step": 9, "lo'
    run = tmp_path / "run"
    run.mkdir()
    (run / state.METRICS).write_bytes(_lines({"step": 1}, {"step": 2}) + torn + _lines({"step": 3}, {"step": 4})
                                      + torn)
    writer = state.RunWriter(run, resume_step=3)
    assert writer.rows == [{"step": 1}, {"step": 2}]  # the glued step-3 row is lost, step 4 is past the resume
    assert read_jsonl(run / state.METRICS) == writer.rows and (run / state.METRICS).read_bytes().endswith(b"\n")

    clips = []
    for i in range(3):
        clips.append(tmp_path / f"{i}.wav")
        clips[-1].write_bytes(bytes([i]) * 8)
    samples = [Sample(id=f"s{i}", audio_path=clip, text=f"manifest {i}") for i, clip in enumerate(clips)]
    options = DecodingOptions()
    decoding = options.to_dict()

    store = teacher_cache.TeacherStore(tmp_path / "store", "f" * 64)
    store.folder.mkdir(parents=True)
    rows = [dict(clip=store.clip(c), decoding=decoding, text=f"base {i}") for i, c in enumerate(clips)]
    (store.folder / "targets.jsonl").write_bytes(_lines(rows[0]) + torn + _lines(rows[1], rows[2]) + torn)
    assert store.targets(samples, decoding) == {"s0": "base 0", "s2": "base 2"}

    rows = [dict(id=s.id, text=f"base {i}", manifest_text=s.text, decoding=decoding) for i, s in enumerate(samples)]
    (run / teacher.TARGETS_FILE).write_bytes(_lines(rows[0]) + torn + _lines(rows[1], rows[2]) + torn)
    asked = []
    monkeypatch.setattr("mlx_moonshine.transcription.transcribe_clips", lambda model, processor, paths, options:
                        asked.extend(paths) or [{"text": "again"} for _ in paths])
    out = teacher.base_targets(None, None, samples, options, run, log=lambda m: None)
    assert asked == [clips[1]] and [s.text for s in out] == ["base 0", "again", "base 2"]
