"""The eval workflow end to end on a tiny random model: run folder, resume, batching, CLI, compare."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before mlx)
from mlx_moonshine import decoding
from mlx_moonshine.cli import main
from mlx_moonshine.decoding import DecodingOptions
from mlx_moonshine.eval.evaluate import EvalError, evaluate
from mlx_moonshine.io import sha256_file
from mlx_moonshine.loading import load

ROW_KEYS = {"manifest", "id", "audio", "ref", "hyp", "ref_norm", "hyp_norm", "wer", "cer", "substitutions",
            "deletions", "insertions", "ref_words", "seconds", "truncated"}
SCORES = ("n", "n_skipped", "wer", "cer", "word_errors", "ref_words", "n_truncated", "audio_seconds")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir)


def _eval(tiny, manifests, out, **kw):
    model, processor = tiny
    kw.setdefault("options", DecodingOptions())
    return evaluate(model, processor, list(manifests), out, progress=False, **kw)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


def _hyps(run: Path) -> dict:
    return {(r["manifest"], r["id"]): r["hyp"] for r in _rows(run)}


def _scores(summary: dict) -> dict:
    return {name: {k: s[k] for k in SCORES} for name, s in summary["manifests"].items()}


def test_run_folder_records_everything(tiny, tiny_model_dir, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    opts = DecodingOptions(max_tokens_per_second=5.0)
    summary = _eval(tiny, tiny_corpus.values(), run, options=opts)
    assert json.loads((run / "summary.json").read_text()) == summary
    rows = _rows(run)
    assert len(rows) == 9 + 5 + 4 and ROW_KEYS <= set(rows[0])
    assert any(r["hyp"] for r in rows), "the tiny model should say something"
    rec = json.loads((run / "run.json").read_text())
    assert rec["decoding"] == opts.to_dict() == summary["run"]["decoding"]
    assert rec["audio_normalization"]["normalize"] is None and rec["text_normalizer"]["lowercase"]
    assert rec["model"]["sha256"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert rec["adapter"] is None and rec["mlx_moonshine_version"] and rec["created"]
    for name, src in tiny_corpus.items():
        m = rec["manifests"][name]
        assert m["sha256"] == sha256_file(src) == sha256_file(run / m["copy"])
        s = summary["manifests"][name]
        assert s["n"] == {"domain_test": 9, "heldout": 5, "real_canary": 4}[name] and s["n_skipped"] == 0
        assert 0 <= s["wer"] and s["hours"] > 0 and s["rtf"] > 0
        mine = [r for r in rows if r["manifest"] == name]
        errors = sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in mine)
        assert math.isclose(s["wer"], errors / sum(r["ref_words"] for r in mine))


def test_resume_decodes_only_missing_rows_and_gives_same_summary(tiny, tiny_corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = _eval(tiny, tiny_corpus.values(), run)
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    # Lose the last row and leave a torn half-written one, as a kill mid-write would.
    (run / "predictions.jsonl").write_text("".join(lines[:-2]) + lines[-2][:25])
    calls = []
    real = decoding.decode_batch
    monkeypatch.setattr("mlx_moonshine.transcription.decode_batch",
                        lambda m, p, audios, o: calls.append(len(audios)) or real(m, p, audios, o))
    second = _eval(tiny, tiny_corpus.values(), run)
    assert sum(calls) == 2
    assert _scores(second) == _scores(first)
    before = [json.loads(x) for x in lines]
    assert _hyps(run) == {(r["manifest"], r["id"]): r["hyp"] for r in before}
    assert len(_rows(run)) == len(lines)


def test_a_transcript_holding_a_line_separator_survives_resume_and_compare(tiny, tiny_corpus, tmp_path):
    # Rows are written with ensure_ascii=False: U+2028/U+0085 inside a hyp are not line ends for any reader.
    from mlx_moonshine.eval.compare import compare_runs
    from mlx_moonshine.eval.evaluate import _read_predictions

    run = tmp_path / "run"
    _eval(tiny, tiny_corpus.values(), run)
    pred = run / "predictions.jsonl"
    rows = [json.loads(x) for x in pred.read_text(encoding="utf-8").split("\n") if x]
    rows[0]["hyp"] = "over\u2028and\u0085out"
    pred.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [r["hyp"] for r in _read_predictions(pred)] == [r["hyp"] for r in rows]
    assert pred.read_text(encoding="utf-8").count("\n") == len(rows)  # nothing to repair, nothing rewritten
    report, _ = compare_runs(run, run)
    assert "not JSON" not in report


def test_resume_with_other_options_is_refused_unless_forced(tiny, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    _eval(tiny, [tiny_corpus["heldout"]], run, limit=2)
    with pytest.raises(EvalError, match="different decoding.*--force"):
        _eval(tiny, [tiny_corpus["heldout"]], run, options=DecodingOptions(beam_size=2))
    summary = _eval(tiny, [tiny_corpus["heldout"]], run, options=DecodingOptions(beam_size=2), force=True)
    assert summary["manifests"]["heldout"]["n"] == 5 and summary["run"]["decoding"]["beam_size"] == 2


def test_batch_size_does_not_change_predictions(tiny, tiny_corpus, tmp_path):
    _eval(tiny, tiny_corpus.values(), tmp_path / "b1", batch_size=1)
    _eval(tiny, tiny_corpus.values(), tmp_path / "b4", batch_size=4)
    assert _hyps(tmp_path / "b4") == _hyps(tmp_path / "b1")


def test_beam_search_with_one_beam_equals_greedy(tiny, tiny_corpus, tmp_path, monkeypatch):
    _eval(tiny, tiny_corpus.values(), tmp_path / "greedy", batch_size=4)
    # decode_batch picks greedy for beam_size 1; force the beam strategy with a single beam instead.
    monkeypatch.setattr(decoding, "GreedyStrategy",
                        lambda n, eos: decoding.BeamSearchStrategy(n, eos, 1, None))
    _eval(tiny, tiny_corpus.values(), tmp_path / "beam1", batch_size=4)
    assert _hyps(tmp_path / "beam1") == _hyps(tmp_path / "greedy")


def _five_broken_rows(folder: Path) -> Path:
    good = json.loads(Path(folder / "heldout.jsonl").read_text().splitlines()[0])
    rows = [json.dumps(good),
            '{"audio": "audio/heldout_1.wav", "text": ',  # line 2: not JSON
            json.dumps({"text": "alpha"}),  # 3: no audio
            json.dumps({"audio": "audio/heldout_2.wav", "text": "  "}),  # 4: empty text
            json.dumps({"audio": "audio/missing.wav", "text": "bravo"}),  # 5: no such file
            json.dumps({"audio": "audio/heldout_3.wav", "text": "one", "duration": -1}),  # 6: bad duration
            json.dumps({**good, "id": "other"})]
    path = folder / "broken.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_eval_lists_every_bad_row_and_exits_2(tiny_model_dir, tiny_corpus, tmp_path):
    broken = _five_broken_rows(tiny_corpus["heldout"].parent)
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_model_dir), "--manifest", str(broken),
                                       "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert "5 of 7 rows are bad" in result.output
    for line in range(2, 7):
        assert f"line {line}:" in result.output
    assert not (tmp_path / "run").exists()
    # --skip-invalid evaluates the two good rows and counts the five bad ones.
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_model_dir), "--manifest", str(broken),
                                       "-o", str(tmp_path / "run"), "--skip-invalid", "--quiet"])
    assert result.exit_code == 0, result.output
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["manifests"]["broken"]
    assert (s["n"], s["n_skipped"]) == (2, 5)


def _edit_run(run: Path, name: str, wer_delta: float, worse_id: str | None = None):
    summary = json.loads((run / "summary.json").read_text())
    m = summary["manifests"][name]
    m["wer"] += wer_delta
    if "word_errors" in m:  # keep the summary consistent: pooled WERs are recomputed from the counts
        m["word_errors"] = round(m["wer"] * m["ref_words"])
    (run / "summary.json").write_text(json.dumps(summary))
    if worse_id:
        rows = _rows(run)
        for r in rows:
            if r["id"] == worse_id:
                r.update(hyp_norm="totally wrong words", wer=r["wer"] + 1.0, insertions=r["insertions"] + 3)
        (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_eval_and_compare_verdicts(tiny_model_dir, tiny_corpus, tmp_path):
    runner = CliRunner()
    a = tmp_path / "a"
    result = runner.invoke(main, ["eval", "--model", str(tiny_model_dir), "--manifest", str(tiny_corpus["domain_test"]),
                                  "--manifest", str(tiny_corpus["heldout"]), "-o", str(a), "--batch-size", "4",
                                  "--canary", str(tiny_corpus["real_canary"]), "--quiet"])
    assert result.exit_code == 0, result.output
    assert all(n in result.stdout for n in ("domain_test", "heldout", "real_canary", "WER"))

    b = tmp_path / "b"
    shutil.copytree(a, b)
    result = runner.invoke(main, ["compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("VERDICT: PASS")
    assert "WARNING" not in result.stdout

    # Held-out regresses by 2 points (limit 1): FAIL, and the edited row leads the worst regressions.
    _edit_run(b, "heldout", 0.02, worse_id="heldout_003")
    result = runner.invoke(main, ["compare", str(a), str(b)])
    assert result.exit_code == 1, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("VERDICT: FAIL") and "heldout" in last
    assert "heldout_003" in result.stdout and "totally wrong words" in result.stdout
    assert "1 regressed" in result.stdout
    result = runner.invoke(main, ["compare", str(a), str(b), "--max-heldout-regression", "3"])
    assert result.exit_code == 0 and "VERDICT: PASS" in result.stdout

    # The real canary regresses by 2 points: FAIL, named in the verdict.
    _edit_run(b, "real_canary", 0.02)
    result = runner.invoke(main, ["compare", str(a), str(b), "--max-heldout-regression", "3"])
    last = result.stdout.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("VERDICT: FAIL") and "real canary" in last, result.output

    # Domain worse -> FAIL.
    _edit_run(b, "domain_test", 0.05)
    result = runner.invoke(main, ["compare", str(a), str(b), "--max-heldout-regression", "3",
                                  "--max-canary-regression", "3"])
    assert result.exit_code == 1 and "domain WER relative reduction" in result.stdout.splitlines()[-1]
    from mlx_moonshine.eval.compare import compare_runs

    # A criterion with no set to measure it: NOT MEASURED, never PASS, and the missing set is named.
    c = tmp_path / "c"
    shutil.copytree(a, c)
    for run in (a, c):
        s = json.loads((run / "summary.json").read_text())
        del s["manifests"]["real_canary"]
        (run / "summary.json").write_text(json.dumps(s))
    report, ok = compare_runs(a, c)
    last = report.splitlines()[-1]
    assert not ok and last.startswith("VERDICT: NOT MEASURED") and "real canary" in last, report
    assert "heldout (held-out (synthetic))" in last and "domain_test (domain)" in last  # the sets it used

    # Different decode options: a loud warning.
    rec = json.loads((c / "run.json").read_text())
    rec["decoding"]["beam_size"] = 4
    (c / "run.json").write_text(json.dumps(rec))
    report, _ = compare_runs(a, c)
    assert "WARNING: decode options differ" in report

    result = runner.invoke(main, ["compare", str(a), str(tmp_path / "nope")])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_real_base_model_matches_transformers_wer_on_atc(shared_dir, base_hf_dir, tmp_path):
    """First 20 rows of each ATC manifest: our eval's WER within 0.5 points of transformers' greedy."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import soundfile as sf
    from tokenizers import Tokenizer

    from mlx_moonshine.metrics import corpus_scores, score

    n_rows = 20
    manifests = [shared_dir / "data" / "atc" / f for f in ("domain_test.jsonl", "heldout_manifest.jsonl")]
    if not all(m.is_file() for m in manifests):
        pytest.skip("ATC manifests not found in shared/data/atc")
    hf = transformers.MoonshineForConditionalGeneration.from_pretrained(base_hf_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(base_hf_dir / "tokenizer.json"))
    reference = {}
    for m in manifests:
        scores = []
        for line in m.read_text().splitlines()[:n_rows]:
            row = json.loads(line)
            y, sr = sf.read(m.parent / row["audio"], dtype="float32")
            assert sr == 16000
            x = torch.from_numpy(y if y.ndim == 1 else y.mean(1))[None]
            budget = max(8, math.ceil(6.5 * x.shape[1] / sr))  # as shared/tools/eval_moonshine_wer.py
            with torch.inference_mode():
                out = hf.generate(input_values=x, attention_mask=torch.ones_like(x, dtype=torch.long),
                                  max_new_tokens=budget, do_sample=False, num_beams=1)
            scores.append(score(row["text"], tok.decode(out[0].tolist(), skip_special_tokens=True)))
        reference[m.stem] = corpus_scores(scores)["wer"]

    model, processor = load(base_hf_dir)
    summary = evaluate(model, processor, manifests, tmp_path / "run", options=DecodingOptions(),
                       batch_size=8, limit=n_rows, progress=False)
    for name, wer in reference.items():
        ours = summary["manifests"][name]["wer"]
        assert summary["manifests"][name]["n"] == n_rows
        assert abs(ours - wer) <= 0.005, f"{name}: MLX WER {ours:.4f} vs transformers {wer:.4f}"


def test_in_training_wer_decodes_like_eval_even_past_20_seconds(tiny, tmp_path):
    """Validation WER during training (validation.eval_wer and the training loop's one-encoder-pass
    validation) decodes as `eval` does: a 26 s clip is split alike."""
    import numpy as np
    import soundfile as sf

    from mlx_moonshine.data import load_manifest
    from mlx_moonshine.train.validation import eval_wer

    rng = np.random.default_rng(3)
    folder = tmp_path / "long"
    (folder / "audio").mkdir(parents=True)
    rows = []
    for i, seconds in enumerate((26.0, 1.3, 21.5)):
        x = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
        x[int(16000 * seconds / 2):int(16000 * seconds / 2) + 8000] = 0.0  # a quiet point to split at
        sf.write(folder / "audio" / f"l{i}.wav", x, 16000)
        rows.append({"id": f"l{i}", "audio": f"audio/l{i}.wav", "text": "alpha bravo charlie"})
    manifest = folder / "long.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, processor = tiny
    summary = _eval(tiny, [manifest], tmp_path / "run")
    in_training = eval_wer(model, processor, load_manifest(manifest).samples, DecodingOptions())
    by_id = {r["id"]: r for r in _rows(tmp_path / "run")}
    assert {r["id"]: r["hyp"] for r in in_training["samples"]} == {i: r["hyp_norm"] for i, r in by_id.items()}
    assert in_training["wer"] == summary["manifests"]["long"]["wer"]

    from mlx_moonshine.train.validation import validation_pass
    from mlx_moonshine.train.step import default_loss

    samples = load_manifest(manifest).samples
    val = validation_pass(model, processor, samples, default_loss, wer_rows=len(samples), options=DecodingOptions())
    assert {r["id"]: r["hyp"] for r in val["wer"]["samples"]} == {i: r["hyp_norm"] for i, r in by_id.items()}
    assert val["wer"]["wer"] == summary["manifests"]["long"]["wer"]
