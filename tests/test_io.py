"""io.atomic_dir: the one way every folder the package writes (model, export, checkpoint, best/) lands."""

from __future__ import annotations

import pytest

from mlx_moonshine.errors import ModelError, OutputError
from mlx_moonshine.io import atomic_dir, prepare_out_dir


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
