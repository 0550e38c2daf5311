"""Hostile input across every command: one clear message (exit 2, no traceback), nothing earlier damaged.

The corpus is a table of cases, each a few lines that build a bad input in a fresh folder and the CLI call
that meets it. Every case asserts the exit code, that the output names the file/row/option at fault, that no
traceback leaked, and that the outputs made before (model, eval run, training run, data) are byte-identical
afterwards. Everything is generated at test time on the tiny random model from conftest; one module-scoped
set of outputs is shared by all cases. Subprocesses only where the kernel is involved: a file-size limit
(disk full) and a second live process holding a run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import write_tiny_corpus
from mlx_moonshine.cli import main

REPO = Path(__file__).resolve().parents[1]
# Fast training settings for the tiny model (CPU: no mx.compile, few distinct shapes, no val decoding).
FAST_YAML = "compile: false\npad_seconds: 2.0\nval_wer_samples: 0\nrank: 2\nwarmup_steps: 0\n"


def cli(*args) -> "Result":
    r = CliRunner().invoke(main, [str(a) for a in args])
    return Result(r.exit_code, r.output, r.stdout, r.exception)


@dataclass
class Result:
    code: int
    output: str  # stdout and stderr together
    stdout: str
    exception: BaseException | None


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (a snapshot to prove nothing was touched)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def wav(path: Path, seconds: float = 1.0, seed: int = 0, subtype: str | None = None, fill=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (0.1 * np.random.RandomState(seed).randn(int(seconds * 16000))).astype(np.float32)
    if fill is not None:
        x[:] = fill
    sf.write(path, x, 16000, subtype=subtype)
    return path


def truncated_wav(path: Path) -> Path:
    """A WAV whose header declares 1.5 s but whose file ends at 60% of that (a copy cut short)."""
    wav(path, 1.5)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- the shared outputs every case must leave untouched ---------------------------------------------------


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    """The tiny model, a small corpus, a baseline eval run, a short training run and its PEFT export."""
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    e = dict(root=root, model=tiny_model_dir, data=data,
             train=write_tiny_corpus(data, "train", 6, seed=3), val=write_tiny_corpus(data, "val", 3, seed=4),
             heldout=write_tiny_corpus(data, "heldout", 3, seed=5))
    e["clip"] = data / "audio" / "train_0.wav"
    (root / "fast.yaml").write_text(FAST_YAML)
    e["yaml"] = root / "fast.yaml"
    r = cli("eval", "--model", tiny_model_dir, "--manifest", e["val"], "--manifest", e["heldout"],
            "-o", root / "baseline", "--quiet")
    assert r.code == 0, r.output
    e["baseline"] = root / "baseline"
    r = cli("train", "--model", tiny_model_dir, "--train", e["train"], "--val", e["val"], "--replay", "none",
            "-c", e["yaml"], "--max-steps", 2, "--eval-every", 2, "-o", root / "run")
    assert r.code == 0, r.output
    e["run"] = root / "run"
    r = cli("export", "peft", e["run"], "-o", root / "peft")
    assert r.code == 0, r.output
    e["peft"] = root / "peft"
    r = cli("manifest", "split", e["train"], "--ratios", "60/20/20", "--quick", 2, "-o", root / "split")
    assert r.code == 0, r.output
    e["split"] = root / "split"
    e["protected"] = [tiny_model_dir, data, e["baseline"], e["run"], e["peft"], e["split"]]
    e["digest"] = {str(p): tree_digest(p) for p in e["protected"]}
    return e


# -- the corpus ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    make: Callable  # (env, tmp) -> argv, given a fresh folder tmp
    needles: tuple = ()  # each must appear in the output
    code: int = 2
    check: Callable | None = None  # (env, tmp, result) -> None, extra assertions
    absent: tuple = field(default=())  # must not appear


def _latin1_csv(e, t):
    p = t / "latin1.csv"
    p.write_bytes(f"audio,text\n{e['clip']},caf\xe9 alpha\n".encode("latin-1"))
    return p


def _bom_csv(e, t, first="id"):
    cols = ["id", "audio", "text"] if first == "id" else ["audio", "text", "id"]
    vals = {"id": "my_id_7", "audio": str(e["clip"]), "text": "alpha bravo"}
    p = t / "bom.csv"
    p.write_bytes(("\ufeff" + ",".join(cols) + "\n" + ",".join(vals[c] for c in cols) + "\n").encode("utf-8"))
    return p


def _row(e, **kw):
    return {"audio": str(e["clip"]), "text": "alpha bravo", **kw}


def _split_ids(e, t, r):
    ids = [json.loads(line)["id"] for line in (t / "out" / "train.jsonl").read_text().splitlines()]
    assert ids == ["my_id_7"]


def _bad_clips_manifest(e, t):
    empty = t / "empty.wav"
    empty.write_bytes(b"")
    nan = wav(t / "nan.wav", 1.0, subtype="FLOAT", fill=np.nan)
    short = wav(t / "short.wav", 0.01)
    return jsonl(t / "m.jsonl", [_row(e, audio=str(p)) for p in (empty, nan, short)] + [_row(e, id="ok")])


def _old_split(e, t):
    out = t / "split"
    shutil.copytree(e["split"], out)
    return out


def _split_unchanged(e, t, r):
    assert tree_digest(t / "split") == e["digest"][str(e["split"])]


def _split_forced(e, t, r):
    assert not (t / "split" / "test.jsonl").exists()
    assert {p.name for p in (t / "split").iterdir()} == {"train.jsonl", "val.jsonl", "quick.jsonl"}


def _truncated_json(e, t, r):
    row = json.loads(r.stdout.strip().splitlines()[-1])  # valid JSON
    assert any("truncated" in w for w in row["warnings"])


def _model_with_config(e, t, **change):
    m = t / "model"
    shutil.copytree(e["model"], m)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(change)
    (m / "config.json").write_text(json.dumps(cfg))
    return m


def _torn_run(e, t):
    b = t / "B"
    shutil.copytree(e["baseline"], b)
    pred = b / "predictions.jsonl"
    pred.write_text(pred.read_text()[:-40])  # the last row cut mid-line
    return b


def _pred_warnings(e, t, r):
    rows = [json.loads(line) for line in (t / "out" / "predictions.jsonl").read_text().splitlines()]
    assert any("truncated" in w for row in rows for w in row.get("warnings", []))
    summary = json.loads((t / "out" / "summary.json").read_text())
    assert summary["manifests"]["m"]["audio_warnings"]


def _yaml(t, text):
    p = t / "bad.yaml"
    p.write_text(FAST_YAML + text)
    return p


def _train(e, t, *extra, yaml=None):
    return ["train", "--model", e["model"], "--train", e["train"], "--val", e["val"], "--replay", "none",
            "-c", yaml or e["yaml"], "-o", t / "run", *extra]


def _diverged(e, t, r):
    report = (t / "run" / "report.md").read_text()
    warnings = report.split("## Warnings")[1]
    assert "diverged" in warnings and "* none" not in warnings
    summary = json.loads((t / "run" / "summary.json").read_text())
    assert summary["stop_reason"].startswith("diverged") and summary["warnings"]


def _stale_lock(e, t):
    out = t / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "command": "mlx-moonshine eval"}))
    return out


def _other_size_model(e, t):
    import mlx.core as mx

    from mlx_moonshine.audio import AudioConfig
    from mlx_moonshine.loading import Processor, load_processor, save
    from mlx_moonshine.models.moonshine import Model, ModelArgs

    base = load_processor(e["model"])
    mx.random.seed(1)
    model = Model(ModelArgs(vocab_size=base.tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
                            encoder_num_hidden_layers=1, decoder_num_hidden_layers=1, encoder_num_attention_heads=2,
                            decoder_num_attention_heads=2, max_position_embeddings=256, tie_word_embeddings=False))
    proc = Processor(tokenizer=base.tokenizer, audio=AudioConfig(), path=e["model"], generation=base.generation)
    return save(model, proc, t / "other")


def _no_staging_left(e, t, r):
    assert not [p for p in t.iterdir() if p.name.startswith(".")]


CASES = [
    # manifest stats: encodings, types, every bad row at once
    Case("stats-latin1-csv", lambda e, t: ["manifest", "stats", _latin1_csv(e, t)],
         ("latin1.csv", "line 2", "UTF-8")),
    Case("stats-bom-csv-id-first", lambda e, t: ["manifest", "stats", _bom_csv(e, t)], ("n ",), code=0),
    Case("split-bom-csv-keeps-id", lambda e, t: ["manifest", "split", _bom_csv(e, t), "--ratios", "1/0",
                                                 "--quick", 0, "-o", t / "out"], code=0, check=_split_ids),
    Case("stats-bom-csv-audio-first", lambda e, t: ["manifest", "stats", _bom_csv(e, t, "audio")], code=0,
         absent=("ufeff", "lacks")),
    Case("stats-bom-jsonl", lambda e, t: ["manifest", "stats", _write_bom_jsonl(e, t)], code=0),
    Case("stats-text-is-number", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e, text=123)])],
         ("m.jsonl", "line 1", "'text' must be a string", "int")),
    Case("stats-text-is-list", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e), _row(e, text=["a"], id="b")])],
         ("line 2", "list")),
    Case("stats-audio-is-number", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e, audio=5)])],
         ("line 1", "'audio' must be a path")),
    Case("stats-every-bad-clip-in-one-pass", lambda e, t: ["manifest", "stats", _bad_clips_manifest(e, t)],
         ("3 of 4 rows", "empty.wav", "nan.wav", "NaN", "short.wav", "too short")),
    Case("stats-missing-manifest", lambda e, t: ["manifest", "stats", t / "nope.jsonl"], ("nope.jsonl", "not found")),
    Case("stats-unknown-type", lambda e, t: ["manifest", "stats", _touch(t / "m.txt", "x")], ("m.txt", ".jsonl")),
    Case("stats-empty-manifest", lambda e, t: ["manifest", "stats", _touch(t / "m.jsonl", "\n")], ("m.jsonl", "no rows")),
    Case("stats-invalid-json-line", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e), "{oops"])],
         ("line 2", "not valid JSON")),
    Case("stats-json-array-row", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [[1, 2]])],
         ("line 1", "JSON object")),
    Case("stats-csv-without-text", lambda e, t: ["manifest", "stats", _touch(t / "m.csv", f"audio\n{e['clip']}\n")],
         ("m.csv", "lacks column", "text")),
    Case("stats-csv-extra-cells", lambda e, t: ["manifest", "stats", _touch(t / "m.csv", f"audio,text\n{e['clip']},a,b\n")],
         ("line 2", "cells")),
    Case("stats-duplicate-id", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e, id="x"), _row(e, id="x")])],
         ("line 2", "duplicate id 'x'")),
    Case("stats-missing-audio", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e, audio="gone.wav")])],
         ("gone.wav", "not found")),
    Case("stats-negative-duration", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e, duration=-1)])],
         ("line 1", "'duration'")),
    Case("stats-text-file-as-audio", lambda e, t: ["manifest", "stats", jsonl(t / "m.jsonl", [_row(e, audio=str(_touch(t / "notes.wav", "hello\n")))])],
         ("notes.wav",)),
    # manifest split
    Case("split-over-older-split", lambda e, t: ["manifest", "split", e["train"], "--ratios", "50/50", "-o", _old_split(e, t)],
         ("test.jsonl", "--force"), check=_split_unchanged),
    Case("split-over-older-split-force", lambda e, t: ["manifest", "split", e["train"], "--ratios", "50/50", "--quick", 1,
                                                        "--force", "-o", _old_split(e, t)], code=0, check=_split_forced),
    Case("split-bad-ratios", lambda e, t: ["manifest", "split", e["train"], "--ratios", "abc", "-o", t / "o"], ("--ratios",)),
    Case("split-by-speaker-without-speakers", lambda e, t: ["manifest", "split", e["train"], "--by", "speaker", "-o", t / "o"],
         ("speaker", "train.jsonl")),
    Case("split-too-few-rows", lambda e, t: ["manifest", "split", e["val"], "--ratios", "98/1/1", "-o", t / "o"],
         ("too few", "--ratios")),
    # transcribe
    Case("transcribe-tokens-per-second-nan", lambda e, t: ["transcribe", "--model", e["model"], e["clip"],
                                                           "--max-tokens-per-second", "nan"], ("max_tokens_per_second",)),
    Case("transcribe-tokens-per-second-inf", lambda e, t: ["transcribe", "--model", e["model"], e["clip"],
                                                           "--max-tokens-per-second", "inf"], ("max_tokens_per_second",)),
    Case("transcribe-length-penalty-nan", lambda e, t: ["transcribe", "--model", e["model"], e["clip"], "--beam-size", 2,
                                                        "--length-penalty", "nan", "--json"], ("length_penalty",)),
    Case("transcribe-truncated-wav", lambda e, t: ["transcribe", "--model", e["model"], "--json", truncated_wav(t / "cut.wav")],
         ("warning:", "cut.wav", "truncated"), code=0, check=_truncated_json),
    Case("transcribe-max-new-tokens-huge", lambda e, t: ["transcribe", "--model", e["model"], wav(t / "silence.wav", 1.0, fill=0.0),
                                                          "--max-new-tokens", 100000, "--max-tokens-per-second", 1000],
         ("warning:", "--max-new-tokens 100000", "capped at 256"), code=0),
    Case("transcribe-missing-audio", lambda e, t: ["transcribe", "--model", e["model"], e["clip"], t / "gone.wav"], ("gone.wav",)),
    Case("transcribe-corrupt-wav", lambda e, t: ["transcribe", "--model", e["model"], _touch(t / "bad.wav", b"RIFF\0\0\0\0WAVEjunk" + bytes(64))],
         ("bad.wav",)),
    Case("transcribe-adapter-folder-missing", lambda e, t: ["transcribe", "--model", e["model"], "--adapter", t / "no-run", e["clip"]],
         ("no-run", "no such adapter folder")),
    Case("transcribe-adapter-is-peft", lambda e, t: ["transcribe", "--model", e["model"], "--adapter", e["peft"], e["clip"]],
         ("PEFT adapter", "import peft")),
    Case("transcribe-config-hidden-size-text", lambda e, t: ["transcribe", "--model", _model_with_config(e, t, hidden_size="sixty-four"), e["clip"]],
         ("config.json", "hidden_size", "sixty-four")),
    Case("transcribe-config-not-json", lambda e, t: ["transcribe", "--model", _broken_config(e, t), e["clip"]],
         ("config.json", "not valid JSON")),
    Case("transcribe-tokenizer-not-json", lambda e, t: ["transcribe", "--model", _broken_file(_model_with_config(e, t), "tokenizer.json"),
                                                        e["clip"]], ("tokenizer.json",)),
    Case("transcribe-weights-truncated", lambda e, t: ["transcribe", "--model", _broken_file(_model_with_config(e, t), "model.safetensors"),
                                                       e["clip"]], ("model.safetensors", "corrupt")),
    Case("transcribe-audio-is-folder", lambda e, t: ["transcribe", "--model", e["model"], _mkdir(t / "clips.wav")],
         ("clips.wav", "not a file")),
    Case("transcribe-beam-size-zero", lambda e, t: ["transcribe", "--model", e["model"], "--beam-size", 0, e["clip"]],
         ("--beam-size",)),
    Case("transcribe-model-missing", lambda e, t: ["transcribe", "--model", t / "nomodel", e["clip"]], ("nomodel",)),
    # eval
    Case("eval-latin1-manifest", lambda e, t: ["eval", "--model", e["model"], "--manifest", _latin1_csv(e, t), "-o", t / "o"],
         ("latin1.csv", "UTF-8"), check=lambda e, t, r: _not_created(t / "o")),
    Case("eval-tokens-per-second-inf", lambda e, t: ["eval", "--model", e["model"], "--manifest", e["val"], "-o", t / "o",
                                                     "--max-tokens-per-second", "inf"], ("max_tokens_per_second",)),
    Case("eval-other-settings-into-old-run", lambda e, t: ["eval", "--model", e["model"], "--manifest", e["val"],
                                                           "-o", e["baseline"], "--beam-size", 2, "--quiet"],
         ("baseline", "different decoding", "--force")),
    Case("eval-stale-lock-taken-over", lambda e, t: ["eval", "--model", e["model"], "--manifest", e["val"], "-o", _stale_lock(e, t),
                                                     "--quiet"], ("note: took over", "no longer running"), code=0,
         check=lambda e, t, r: _assert(not (t / "out" / ".lock").exists())),
    Case("eval-truncated-clip-warns", lambda e, t: ["eval", "--model", e["model"], "--manifest",
                                                    jsonl(t / "m.jsonl", [_row(e, audio=str(truncated_wav(t / "cut.wav")))]),
                                                    "-o", t / "out", "--quiet"], ("warning:", "cut.wav"), code=0,
         check=_pred_warnings),
    Case("eval-bad-row-named", lambda e, t: ["eval", "--model", e["model"], "--manifest",
                                             jsonl(t / "m.jsonl", [_row(e), _row(e, id="z", text="")]), "-o", t / "o"],
         ("m.jsonl", "line 2", "--skip-invalid")),
    # compare
    Case("compare-torn-predictions", lambda e, t: ["compare", e["baseline"], _torn_run(e, t)],
         ("predictions.jsonl", "incomplete", "-o")),
    Case("compare-missing-run", lambda e, t: ["compare", e["baseline"], t / "nothing"], ("nothing", "no such run folder")),
    Case("compare-summary-not-json", lambda e, t: ["compare", e["baseline"], _broken_summary(e, t)],
         ("summary.json", "not valid JSON")),
    Case("compare-summary-without-wer", lambda e, t: ["compare", _edited_summary(e, t), e["baseline"]],
         ("summary.json", "val", "re-run eval")),
    # train
    Case("train-yaml-unknown-keys", lambda e, t: _train(e, t, yaml=_yaml(t, "learning_rate: 0.01\nbogus_key: 1\n")),
         ("bad.yaml", "learning_rate (did you mean lr?)", "bogus_key", "Valid keys", "max_steps"),
         check=lambda e, t, r: _not_created(t / "run")),
    Case("train-yaml-decoding-key", lambda e, t: _train(e, t, yaml=_yaml(t, "beam_size: 2\n")), ("beam_size", "--beam-size")),
    Case("train-yaml-lr-is-list", lambda e, t: _train(e, t, yaml=_yaml(t, "lr: [1, 2]\n")), ("lr=[1, 2]",)),
    Case("train-yaml-not-mapping", lambda e, t: _train(e, t, yaml=_touch(t / "list.yaml", "- a\n- b\n")), ("list.yaml", "mapping")),
    Case("train-lr-1e6-diverges", lambda e, t: _train(e, t, "--lr", "1e6", "--max-steps", 12, "--eval-every", 4),
         ("diverged", "--lr"), check=_diverged),
    Case("train-every-clip-too-long", lambda e, t: _train(e, t, "--max-seconds", 0.1), ("max_seconds=0.1", "--max-seconds")),
    Case("train-into-existing-run", lambda e, t: _train(e, t)[:-1] + [e["run"]], ("already holds a training run", "--resume")),
    Case("train-resume-not-a-run", lambda e, t: ["train", "--resume", _mkdir(t / "empty")], ("empty", "train_config.json")),
    Case("train-resume-damaged-optimizer", lambda e, t: ["train", "--resume", _damaged_run(e, t, "checkpoint/optimizer.safetensors")],
         ("checkpoint", "damaged checkpoint", "another -o")),
    Case("train-resume-damaged-state", lambda e, t: ["train", "--resume", _damaged_run(e, t, "checkpoint/state.json")],
         ("checkpoint", "damaged checkpoint")),
    Case("train-resume-damaged-config", lambda e, t: ["train", "--resume", _damaged_run(e, t, "train_config.json")],
         ("train_config.json", "not valid JSON")),
    Case("train-missing-val", lambda e, t: ["train", "--model", e["model"], "--train", e["train"], "-o", t / "r"], ("--val",)),
    Case("train-dropout-out-of-range", lambda e, t: _train(e, t, "--dropout", 1.5), ("--dropout",)),
    # convert, export, import, fuse
    Case("convert-over-existing-model", lambda e, t: ["convert", e["model"], "-o", e["model"]], ("--force",)),
    Case("convert-unknown-source", lambda e, t: ["convert", t / "nowhere", "-o", t / "o"], ("nowhere",)),
    Case("convert-config-hidden-size-text", lambda e, t: ["convert", _model_with_config(e, t, hidden_size="sixty-four"), "-o", t / "o"],
         ("hidden_size", "config.json")),
    Case("import-peft-without-config", lambda e, t: ["import", "peft", _mkdir(t / "p"), "-o", t / "o"], ("adapter_config.json",)),
    Case("import-peft-other-model-size", lambda e, t: ["import", "peft", e["peft"], "-o", t / "imported", "--model",
                                                       _other_size_model(e, t)],
         (str(Path("peft")), "does not fit", "shape"), check=_no_staging_left, absent=(".imported.",)),
    Case("export-peft-missing-source", lambda e, t: ["export", "peft", t / "gone", "-o", t / "o"], ("gone",)),
    Case("export-peft-over-nonempty", lambda e, t: ["export", "peft", e["run"], "-o", e["split"]], ("--force",)),
    Case("fuse-adapter-missing", lambda e, t: ["fuse", "--model", e["model"], "--adapter", t / "gone", "-o", t / "o"], ("gone",)),
    Case("export-hf-adapter-is-peft", lambda e, t: ["export", "hf", "--model", e["model"], "--adapter", e["peft"], "-o", t / "o"],
         ("import peft",)),
]


def _write_bom_jsonl(e, t):
    p = t / "bom.jsonl"
    p.write_bytes(("\ufeff" + json.dumps(_row(e)) + "\n").encode("utf-8"))
    return p


def _touch(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _broken_config(e, t):
    m = _model_with_config(e, t)
    (m / "config.json").write_text("{not json")
    return m


def _broken_file(folder: Path, name: str) -> Path:
    """`folder` with its file `name` cut to a third (a copy that did not finish)."""
    f = folder / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return folder


def _damaged_run(e, t, name: str) -> Path:
    run = t / "run"
    shutil.copytree(e["run"], run)
    return _broken_file(run, name)


def _edited_summary(e, t):
    b = t / "A"
    shutil.copytree(e["baseline"], b)
    summary = json.loads((b / "summary.json").read_text())
    del summary["manifests"]["val"]["wer"]
    (b / "summary.json").write_text(json.dumps(summary))
    return b


def _broken_summary(e, t):
    b = t / "B"
    shutil.copytree(e["baseline"], b)
    (b / "summary.json").write_text('{"run": ')
    return b


def _not_created(path: Path):
    assert not path.exists(), f"{path} was created by a refused command"


def _assert(cond):
    assert cond


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(env, tmp_path, case):
    argv = case.make(env, tmp_path)
    r = cli(*argv)
    print(f"$ mlx-moonshine {' '.join(map(str, argv))}\n{r.output}")  # shown by pytest when the case fails
    assert r.code == case.code, f"exit {r.code}, expected {case.code}:\n{r.output}"
    assert "Traceback" not in r.output, r.output
    if case.code == 2:
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert "error" in r.output.lower() or "Usage" in r.output, r.output
    for needle in case.needles:
        assert str(needle) in r.output, f"{needle!r} not in:\n{r.output}"
    for needle in case.absent:
        assert needle not in r.output, f"{needle!r} in:\n{r.output}"
    if case.check is not None:
        case.check(env, tmp_path, r)
    for p in env["protected"]:
        assert tree_digest(p) == env["digest"][str(p)], f"{p} changed"


def test_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 40
    commands = {c.name.split("-")[0] for c in CASES}
    assert commands >= {"stats", "split", "transcribe", "eval", "compare", "train", "convert", "import", "export", "fuse"}


# -- disk full: a file-size limit in a child process ----------------------------------------------------------


def _limited(limit_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def _run_limited(args, limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "mlx_moonshine", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=240, preexec_fn=_limited(limit_bytes))
    print(f"$ mlx-moonshine {' '.join(map(str, args))}  (file size limit {limit_bytes} B)\n{r.stderr}")
    return r


def test_disk_full_convert_eval_train(env, tmp_path):
    weights = (env["model"] / "model.safetensors").stat().st_size
    # convert --force over an existing model: the limit stops model.safetensors; the old folder stays whole.
    out = tmp_path / "model"
    shutil.copytree(env["model"], out)
    before = tree_digest(out)
    r = _run_limited(["convert", env["model"], "-o", out, "--force"], weights // 2, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "model.safetensors" in r.stderr and "ulimit" in r.stderr, r.stderr
    assert tree_digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    # eval: run.json and the manifest copy fit, predictions.jsonl (6 rows, ~3 KB) does not; the message names it,
    # and the same eval without the limit resumes the rows that were written.
    ev = tmp_path / "ev"
    r = _run_limited(["eval", "--model", env["model"], "--manifest", env["train"], "-o", ev, "--quiet",
                      "--batch-size", 1], 1800, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and f"cannot write {ev / 'predictions.jsonl'}" in r.stderr, r.stderr
    assert "ulimit" in r.stderr
    r = cli("eval", "--model", env["model"], "--manifest", env["train"], "-o", ev, "--quiet")
    assert r.code == 0, r.output
    assert len((ev / "predictions.jsonl").read_text().splitlines()) == 6

    # train: the config and metrics fit, the first adapter save (rank 16: ~30 KB, MLX's writer) does not.
    run = tmp_path / "run"
    r = _run_limited(_train(env, tmp_path, "--max-steps", 2, "--eval-every", 2, "--rank", 16), 12000, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "cannot write" in r.stderr and "adapters.safetensors" in r.stderr, r.stderr
    assert "/.best-" not in r.stderr and "/.checkpoint-" not in r.stderr  # the folder the user knows, not a staging one
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no staging folder, no lock left


# -- two runs into one folder --------------------------------------------------------------------------------


def test_second_training_into_a_busy_folder_is_refused(env, tmp_path):
    run = tmp_path / "run"
    yaml = _yaml(tmp_path, "eval_every: 1000\n")
    cmd = [sys.executable, "-m", "mlx_moonshine", *map(str, _train(env, tmp_path, "--max-steps", 100000, yaml=yaml))]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.time() + 120
        # train_config.json is written just after metrics.jsonl is opened: wait for both (a loaded box is slow).
        while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "train_config.json").exists()):
            assert first.poll() is None, "the first training ended early"
            time.sleep(0.05)
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == first.pid
        before = (run / "train_config.json").read_bytes()
        r = cli(*_train(env, tmp_path, "--max-steps", 2, yaml=yaml))
        assert r.code == 2 and "Traceback" not in r.output
        assert f"pid {first.pid}" in r.output and "mlx-moonshine train" in r.output and str(run) in r.output
        # eval into the same folder is refused just the same, and touched nothing
        r = cli("eval", "--model", env["model"], "--manifest", env["val"], "-o", run, "--quiet")
        assert r.code == 2 and f"pid {first.pid}" in r.output
        assert (run / "train_config.json").read_bytes() == before and not (run / "predictions.jsonl").exists()
    finally:
        first.kill()
        first.wait()
    # SIGKILL leaves the lock file behind; the next run takes it over with a note.
    from mlx_moonshine.io import run_lock

    assert json.loads((run / ".lock").read_text())["pid"] == first.pid
    notes = []
    with run_lock(run, "train", log=notes.append):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert notes and f"pid {first.pid}" in notes[0] and "no longer running" in notes[0]
    assert not (run / ".lock").exists()


# -- permissions ---------------------------------------------------------------------------------------------


def test_outputs_follow_the_umask(env, tmp_path):
    """Folders and files a command leaves are what mkdir/open give under the umask, not tempfile's 0700/0600."""
    old = os.umask(0o027)
    try:
        assert cli("convert", env["model"], "-o", tmp_path / "m").code == 0
        assert cli("export", "peft", env["run"], "-o", tmp_path / "p").code == 0
        r = cli("train", "--model", env["model"], "--train", env["train"], "--val", env["val"], "--replay", "none",
                "-c", env["yaml"], "--max-steps", 1, "--eval-every", 1, "-o", tmp_path / "run")
        assert r.code == 0, r.output
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for p in [tmp_path / "m", tmp_path / "m" / "model.safetensors", tmp_path / "p", tmp_path / "p" / "adapter_config.json",
              run, run / "best", run / "checkpoint", run / "checkpoint" / "state.json", run / "loss.png", run / "wer.png",
              run / "adapters.safetensors", run / "report.md", run / "eval" if (run / "eval").exists() else run]:
        want = 0o750 if p.is_dir() else 0o640
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
