"""A whole training run from paths: config merge (CLI > YAML > defaults), train, final eval, report.md, fuse.

`run_training` is what `mlx-moonshine train` calls; the pieces (`resolve_args`, `final_eval`,
`write_report`) are usable on their own. The report follows the project's final-report sections:
summary, hypothesis, success criteria, configuration, baseline vs tuned WER/CER on the domain test
and held-out sets (measured with `evaluate.evaluate` and the run's decoding options), sample
transcripts, timings, artefacts, decision, warnings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import MoonshineError
from ..io import atomic_write_text, run_lock
from .config import TrainArgs, TrainingError
from .state import TRAIN_CONFIG, read_train_config

PATH_KEYS = ("model", "train", "val", "heldout", "eval_test", "replay", "canary", "out", "baseline_run")
# The verdict's thresholds and the report's hypothesis: the user's, from the CLI or YAML (verdict.Thresholds).
VERDICT_KEYS = {"domain_target": "domain_min_reduction", "max_heldout_regression": "heldout_max_rise",
                "max_canary_regression": "canary_max_rise", "max_format_drift": "format_drift_max"}
REPORT_KEYS = (*VERDICT_KEYS, "hypothesis")
GENERIC_HYPOTHESIS = ("A low-rank adapter trained on in-domain speech cuts the domain WER, while replayed general "
                      "speech, with the frozen base model as its teacher, keeps general speech (the held-out set "
                      "and real recordings) as the base transcribes it, in the base's casing and punctuation.")
# Mixed into training unless told otherwise: 270 clean general-English clips (espeak-ng voices none of the
# heldout sets use, no heldout sentence), made by examples/atc/make_data.py --replay-only.
BUILTIN_REPLAY = Path(__file__).resolve().parents[1] / "general_replay" / "general_replay.jsonl"
DEFAULT_REPLAY_RATIO = 0.5
NO_REPLAY = ("none", "off", "no", "")


def _read_yaml(path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        raise TrainingError(f"{path}: cannot read the training config ({e})") from e
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: the training config must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    _check_yaml_keys(path, data)
    return data


# Decoding options are click flags shared with transcribe/eval; a YAML value for them would be ignored.
_DECODING_KEYS = ("beam_size", "length_penalty", "max_tokens_per_second", "max_new_tokens", "no_repeat_ngram_size",
                  "suppress_blank")
_ALIASES = {"learning_rate": "lr", "steps": "max_steps", "epochs": "max_steps", "output": "out", "out_dir": "out",
            "output_dir": "out", "train_manifest": "train", "val_manifest": "val", "lora_rank": "rank", "r": "rank",
            "lora_alpha": "alpha", "lora_dropout": "dropout", "use_dora": "dora", "target_modules": "targets"}


def _check_yaml_keys(path, data: dict) -> None:
    """Unknown keys are an error (a typo would silently train with the default), with the valid ones listed."""
    import difflib

    valid = sorted(set(TrainArgs.__dataclass_fields__) | set(PATH_KEYS) | set(REPORT_KEYS))
    problems = []
    for key in data:
        if key in valid:
            continue
        if key in _DECODING_KEYS:
            problems.append(f"{key} (a decoding option: give it on the command line, --{key.replace('_', '-')})")
            continue
        close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, valid, n=1)
        problems.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    if problems:
        raise TrainingError(f"{path}: unknown option(s) {'; '.join(problems)}. Valid keys: {', '.join(valid)}")


def resolve_args(cli: dict, config_file=None, resume=None, report: Optional[dict] = None) -> tuple[TrainArgs, dict]:
    """Merge defaults < resumed run's train_config.json < YAML < CLI (None means "not given").

    Args:
        report: If given, receives the verdict thresholds and hypothesis (REPORT_KEYS) found in the merge.

    Returns:
        (TrainArgs, paths) with paths holding model/train/val/heldout/eval_test/replay/canary/out/baseline_run.
    """
    merged: dict = {}
    if resume is not None:
        prev = read_train_config(resume)
        if prev is None:
            raise TrainingError(f"{resume}: not a training run (no {TRAIN_CONFIG}); pass the run folder")
        merged.update(prev.get("train_args", {}))
        merged["model"] = prev.get("model", {}).get("path")
        for name, rec in (prev.get("manifests") or {}).items():
            if rec and rec.get("source"):
                merged[name] = rec["source"]
        merged.update({k: v for k, v in (prev.get("paths") or {}).items() if v is not None})
        merged.update(prev.get("report") or {})
        merged["out"] = str(resume)
    if config_file is not None:
        merged.update(_read_yaml(config_file))
    merged.update({k: v for k, v in cli.items() if v is not None})
    paths = {k: merged.pop(k, None) for k in PATH_KEYS}
    found = {k: merged.pop(k) for k in REPORT_KEYS if k in merged}
    if report is not None:
        report.update({k: v for k, v in found.items() if v is not None})
    _default_replay(paths, merged)
    missing = [k for k in ("model", "train", "val", "out") if not paths[k]]
    if missing:
        flags = ", ".join("-o" if k == "out" else f"--{k}" for k in missing)
        raise TrainingError(f"missing {flags} (give it on the command line or in the -c YAML file)")
    try:
        return TrainArgs.from_dict(merged), paths
    except TrainingError as e:
        if config_file is None:
            raise
        raise TrainingError(f"{e} (options come from the command line and {config_file})") from e


def _default_replay(paths: dict, merged: dict) -> None:
    """Replay unless told otherwise: no --replay means the bundled general-English set, at ratio 0.5.

    Training on a narrow domain alone makes general speech worse (on the shared ATC set: heldout WER +7.8
    points without replay; README "General speech" has the measured options); `--replay none` or
    `--replay-ratio 0` turns it off.
    """
    replay = paths["replay"]
    if isinstance(replay, str) and replay.strip().lower() in NO_REPLAY:
        paths["replay"] = None
        return
    if replay is None and merged.get("replay_ratio", DEFAULT_REPLAY_RATIO) > 0 and BUILTIN_REPLAY.is_file():
        paths["replay"] = str(BUILTIN_REPLAY)
    if paths["replay"] is not None:
        merged.setdefault("replay_ratio", DEFAULT_REPLAY_RATIO)


def _eval(model, processor, manifests: dict, out_dir: Path, options, model_path, adapter_path, log) -> dict:
    from ..eval.evaluate import evaluate

    paths = [p for p in manifests.values() if p]
    log(f"evaluating {', '.join(Path(p).name for p in paths)} -> {out_dir}")
    summary = evaluate(model, processor, paths, out_dir, options=options, model_path=model_path,
                       adapter_path=adapter_path, progress=False)
    return summary


def final_eval(run: Path, paths: dict, decoding, adapter_dir: Path, log=print) -> dict:
    """Baseline and tuned eval of eval_test/heldout/canary into RUN/eval/{baseline,tuned}.

    With `paths['baseline_run']` the baseline comes from that `eval` run; sets it lacks (e.g. the canary)
    are evaluated with the base model into RUN/eval/baseline.
    """
    from ..eval.evaluate import manifest_name
    from ..loading import load

    wanted = {k: paths.get(k) for k in ("eval_test", "heldout", "canary") if paths.get(k)}
    if not wanted:
        return {}
    names = {k: manifest_name(p) for k, p in wanted.items()}
    out = {"names": names, "baseline_dirs": []}
    base = {"manifests": {}}
    todo = dict(wanted)
    if paths.get("baseline_run"):
        summary_file = Path(paths["baseline_run"]) / "summary.json"
        if not summary_file.is_file():
            raise TrainingError(f"{paths['baseline_run']}: no summary.json; pass an `mlx-moonshine eval` run folder")
        base = json.loads(summary_file.read_text())
        recorded = base.get("run", {}).get("decoding")
        if recorded is not None and recorded != decoding.to_dict():
            raise TrainingError(f"{paths['baseline_run']} was decoded with {recorded}, this run uses "
                                f"{decoding.to_dict()}; evaluate the baseline again with the same options")
        out["baseline_dirs"].append(str(paths["baseline_run"]))
        todo = {k: p for k, p in wanted.items() if names[k] not in base.get("manifests", {})}
    if todo:
        model, processor = load(paths["model"])
        extra = _eval(model, processor, todo, run / "eval" / "baseline", decoding, paths["model"], None, log)
        base.setdefault("manifests", {}).update(extra["manifests"])
        out["baseline_dirs"].append(str(run / "eval" / "baseline"))
    out["baseline"] = base
    out["baseline_dir"] = out["baseline_dirs"][0]
    model, processor = load(paths["model"], adapter=adapter_dir)
    out["tuned"] = _eval(model, processor, wanted, run / "eval" / "tuned", decoding, paths["model"], adapter_dir, log)
    out["tuned_dir"] = str(run / "eval" / "tuned")
    return out


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _prediction_rows(dirs, name: str) -> dict:
    """{id: prediction row} of manifest `name` from eval run folders (later folders win)."""
    out = {}
    for d in [dirs] if isinstance(dirs, (str, Path)) else dirs:
        path = Path(d) / "predictions.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("manifest") == name:
                out[str(r["id"])] = r
    return out


def _samples_table(base_dirs, tuned_dir: str, name: str, n: int = 5, only=None) -> list[str]:
    base, tuned = _prediction_rows(base_dirs, name), _prediction_rows(tuned_dir, name)
    ids = [i for i in sorted(set(base) & set(tuned)) if only is None or i in only][:n]
    lines = ["| id | reference | baseline | tuned |", "|---|---|---|---|"]
    for i in ids:
        ref = tuned[i].get("ref", "") or tuned[i].get("ref_norm", "")
        lines.append(f"| {i} | {ref} | {base[i].get('hyp', '')} | {tuned[i].get('hyp', '')} |")
    return lines if ids else []


def decide(evals: dict, thresholds=None, canary_note: Optional[str] = None) -> dict:
    """The verdict (verdict.judge, the rule `compare` uses) on the final evals, with format drift.

    Returns:
        dict(criteria=[dict], decision=bool, not_measured=[...], sets={name: role}, lines=[str], verdict=str).
    """
    from ..eval.verdict import Thresholds, format_drift, judge, verdict_line

    thresholds = thresholds or Thresholds()
    names = evals.get("names", {})
    roles = {n: {"eval_test": "domain", "heldout": "heldout", "canary": "canary"}[k] for k, n in names.items()}
    base = evals.get("baseline", {}).get("manifests", {})
    tuned = evals.get("tuned", {}).get("manifests", {})
    drift = {n: format_drift(_prediction_rows(evals.get("baseline_dirs") or [], n),
                             _prediction_rows(evals.get("tuned_dir", ""), n))
             for n, r in roles.items() if r != "domain"}
    result = judge(base, tuned, roles, thresholds, drift)
    if canary_note:
        for c in result["criteria"]:
            if c.role == "canary" and c.passed is None:
                c.detail = f"not measured: real-speech canary {canary_note}"
    return dict(criteria=[c.to_dict() for c in result["criteria"]], decision=result["decision"],
                not_measured=result["not_measured"], sets=result["sets"],
                lines=[c.line() for c in result["criteria"]], verdict=verdict_line(result),
                thresholds=thresholds.to_dict())


def _drifted_ids(evals: dict, name: str) -> set:
    from ..eval.verdict import style

    base, tuned = _prediction_rows(evals.get("baseline_dirs") or [], name), _prediction_rows(evals["tuned_dir"], name)
    return {i for i in base if i in tuned and base[i].get("hyp", "").strip() and tuned[i].get("hyp", "").strip()
            and style(base[i]["hyp"]) != style(tuned[i]["hyp"])}


def _results_section(evals: dict, verdict: dict) -> list[str]:
    from ..eval.verdict import ROLE_LABELS

    names = evals.get("names", {})
    if not names:
        return ["No --eval-test / --heldout / --canary set was evaluated: no final evaluation.", ""]
    roles = {"eval_test": "domain", "heldout": "heldout", "canary": "canary"}
    L = ["| set | role | n | baseline WER | tuned WER | baseline CER | tuned CER |", "|---|---|---|---|---|---|---|"]
    for key, name in names.items():
        b = evals["baseline"]["manifests"].get(name, {})
        t = evals["tuned"]["manifests"].get(name, {})
        L.append(f"| {name} | {ROLE_LABELS[roles[key]]} | {t.get('n', '-')} | {b.get('wer', float('nan')):.4f} | "
                 f"{t.get('wer', float('nan')):.4f} | {b.get('cer', float('nan')):.4f} | {t.get('cer', float('nan')):.4f} |")
    L += ["", f"Baseline: {', '.join(f'`{d}`' for d in evals.get('baseline_dirs', []))}; tuned (best adapter): "
              f"`{evals.get('tuned_dir')}`. Synthetic held-out voices certify nothing about real voices: the real "
              "canary is the set that does, and ten clips are only a canary; bring real general speech of your "
              "own with --canary.", ""]
    L += [f"* {line}" for line in verdict["lines"]] + [""]
    return L


def write_report(run: Path, summary: dict, args: TrainArgs, paths: dict, decoding, evals: dict,
                 elapsed: float, hypothesis: Optional[str] = None, verdict: Optional[dict] = None,
                 notes: Optional[list] = None) -> Path:
    """report.md in the final-report template's sections."""
    run = Path(run)
    verdict = verdict or decide(evals)
    th = verdict["thresholds"]
    best, final, first = summary.get("best") or {}, summary.get("final") or {}, summary.get("first_val") or {}
    adapter = json.loads((run / "adapter_config.json").read_text()) if (run / "adapter_config.json").is_file() else {}
    L = ["# Training report", ""]
    L += ["## Run summary", "",
          f"{adapter.get('kind', 'lora').upper()} r={args.rank} alpha={args.alpha:g} on {args.targets} "
          f"({len(adapter.get('modules') or [])} layers, {summary.get('n_trainable', 0):,} trainable parameters), "
          f"{summary['steps']} steps ({summary['epochs']:.2f} epochs) of batch {args.batch_size} x {args.grad_accum}. "
          f"Stopped by: {summary['stop_reason']}. Best validation at step {best.get('step')} "
          f"(val loss {best.get('val_loss', float('nan')):.4f}"
          + (f", val WER {best['val_wer']:.4f}" if best.get("val_wer") is not None else "") + ").",
          "", f"Replay: {'none' if not paths.get('replay') else paths['replay']} at ratio {args.replay_ratio:g}, "
              f"targets written by {'the base model' if args.replay_targets == 'base' else 'the manifest'}, "
              f"distillation weight {args.replay_kd:g}, transcript style outside the domain: {args.transcript_style}.",
          ""]
    L += ["## Hypothesis", "", hypothesis or GENERIC_HYPOTHESIS, ""]
    dom = th["domain_min_reduction"]
    L += ["## Success criteria", "",
          f"* domain test WER relative reduction >= {dom:.0%}" if dom else "* domain test WER not worse than the base's",
          f"* held-out WER rise <= {th['heldout_max_rise']:.1f} absolute point",
          f"* real-speech canary WER rise <= {th['canary_max_rise']:.1f} absolute point",
          f"* format drift (casing/punctuation unlike the base's) on held-out and canary <= {th['format_drift_max']:.0%} "
          "of utterances",
          "* every criterion measured (an unmeasured one makes the decision \"not measured\", never yes)", ""]
    L += ["## Configuration", "", "```json", json.dumps(dict(train_args=args.to_dict(), decoding=decoding.to_dict(),
                                                          thresholds=th, paths={k: v for k, v in paths.items() if v}),
                                                     indent=2), "```", ""]
    L += ["## Results", ""] + _results_section(evals, verdict)
    L += ["Validation during training (first val rows, shared decoder):", "",
          f"* step 0: val loss {first.get('val_loss', float('nan')):.4f}, val WER {first.get('val_wer', float('nan')):.4f}",
          f"* best (step {best.get('step')}): val loss {best.get('val_loss', float('nan')):.4f}, "
          f"val WER {(best.get('val_wer') if best.get('val_wer') is not None else float('nan')):.4f}",
          f"* final (step {final.get('step')}): val loss {final.get('val_loss', float('nan')):.4f}, "
          f"val WER {final.get('val_wer', float('nan')):.4f}", ""]
    for key, name in evals.get("names", {}).items():
        table = _samples_table(evals["baseline_dirs"], evals["tuned_dir"], name)
        if table:
            L += [f"### Sample transcripts: {name}", "", *table, ""]
        if key != "eval_test":
            drifted = _drifted_ids(evals, name)
            table = _samples_table(evals["baseline_dirs"], evals["tuned_dir"], name, only=drifted)
            if table:
                L += [f"### Format drift: {name} (casing/punctuation unlike the base's; first 5 of {len(drifted)})",
                      "", *table, ""]
    L += ["## Duration", "",
          f"* wall time {_hms(elapsed)} ({elapsed:.0f} s elapsed), of which the training loop "
          f"(validations included) {_hms(summary['train_seconds'])}",
          f"* mean step time {summary.get('step_seconds')} s; peak MLX memory {summary['peak_memory_gb']:.2f} GiB; "
          f"peak RSS {summary['peak_rss_gb']:.2f} GiB; skipped (non-finite) steps {summary['skipped_steps']}",
          f"* encoder cache: {'on' if summary['encoder_cache'] else 'off'}",
          *_phase_lines(summary.get("phases") or {}, elapsed), ""]
    L += ["## Artefacts", "",
          *[f"* `{run / name}`" for name in ("adapters.safetensors", "adapter_config.json", "best/", "checkpoint/",
                                              "metrics.jsonl", "loss.png", "wer.png", "train_config.json",
                                              "summary.json", "manifests/")],
          *([f"* `{run / 'replay_targets.jsonl'}` (the base's transcripts of the replay audio)"]
            if (run / "replay_targets.jsonl").is_file() else []),
          *([f"* `{run / 'fused'}`"] if (run / "fused").is_dir() else []), ""]
    failed = [c["name"] for c in verdict["criteria"] if c["passed"] is False]
    missing = verdict["not_measured"]
    if verdict["decision"]:
        decision = "**yes**: every criterion was measured and passes."
    elif failed:
        decision = "**no**: " + "; ".join(failed) + " failed" + (f"; not measured: {'; '.join(missing)}" if missing else "") + "."
    else:
        decision = "**not measured**: " + ("; ".join(missing) or "no final evaluation") + ". Nothing failed, but " \
                   "what was not measured is not certified."
    L += ["## Decision", "", decision, "", verdict["verdict"], ""]
    warnings = list(summary.get("warnings", [])) + list(notes or [])
    L += ["## Warnings", ""] + ([f"* {w}" for w in warnings] or ["* none"]) + [""]
    atomic_write_text(run / "report.md", "\n".join(L))
    return run / "report.md"


def run_training(cli: dict, *, config_file=None, resume=None, fuse: bool = False, decoding=None,
                 skip_invalid: bool = False, log: Callable[[str], None] = print) -> dict:
    """Everything `mlx-moonshine train` does: merge options, load, train, evaluate, report, fuse.

    Args:
        cli: Options given on the command line (None = not given): TrainArgs fields, PATH_KEYS and REPORT_KEYS.
        config_file: Optional YAML of the same keys.
        resume: A run folder to continue (its train_config.json gives the defaults, its checkpoint the state).
        fuse: Also write RUN/fused, a plain MLX model folder with the best adapter merged in.
        decoding: DecodingOptions for validation WER and the final eval.

    Returns:
        dict(summary=train summary, evals=final eval summaries, decision=..., report=path).

    Raises:
        RunLockedError: another live process is training into the same run folder.
        TrainingError: bad options or data, or the run diverged (report.md is written first).
    """
    from ..distributed import world

    t0 = time.perf_counter()
    report_opts: dict = {}
    w = world()
    if w.size > 1:  # under mlx.launch: rank 0 writes the run; the others work in a private copy of it
        resume = w.local_folder(resume, skip=("eval", "fused", "manifests")) if resume is not None else None
        log = log if w.is_main else (lambda m: None)
    args, paths = resolve_args(cli, config_file, resume, report=report_opts)
    if not w.is_main:
        paths["out"] = str(resume if resume is not None else w.private_folder())
    # Two trainings into one folder would interleave metrics.jsonl and overwrite each other's adapters.
    with run_lock(Path(paths["out"]), "train", log=log):
        return _run_training(args, paths, t0, report_opts, resume=resume, fuse=fuse, decoding=decoding,
                             skip_invalid=skip_invalid, log=log)


PHASES = (("teacher", "the base as teacher of the replay rows (transcripts + top-k table; the teacher cache "
            "keeps them for the next run on this base)"),
          ("steps", "training steps"),
          ("new_shape_steps", "steps on a batch shape not seen before (trace, and on the CPU kernel builds)"),
          ("validation", "validations"),
          ("checkpoints", "checkpoints and best/"))


def _phase_lines(phases: dict, elapsed: float) -> list[str]:
    """Where the time went, phase by phase (this session; the final evaluation is the rest of the wall time)."""
    if not phases:
        return []
    out = ["* where the time went (this session):"]
    for key, what in PHASES:
        if key in phases:
            secs, n = phases[key]["seconds"], phases[key]["count"]
            share = f", {100 * secs / elapsed:.0f}% of the wall time" if elapsed > 0 else ""
            out.append(f"  * {what}: {_hms(secs)} ({n} x {secs / max(n, 1):.2f} s{share})")
    return out


def _run_training(args: TrainArgs, paths: dict, t0: float, report_opts: dict, *, resume, fuse: bool, decoding,
                  skip_invalid: bool, log: Callable[[str], None]) -> dict:
    from ..adapters.apply import fuse_model, load_adapters
    from ..eval.canary import resolve_canary
    from ..distributed import world
    from ..data import load_manifest
    from ..decoding import DecodingOptions
    from ..loading import load, save
    from .trainer import train
    from .state import BEST
    from ..eval.verdict import Thresholds

    thresholds = Thresholds(**{VERDICT_KEYS[k]: float(v) for k, v in report_opts.items() if k in VERDICT_KEYS})
    decoding = decoding or DecodingOptions()
    run = Path(paths["out"])
    if resume is not None:
        recorded = (read_train_config(resume) or {}).get("decoding")
        if recorded and recorded != decoding.to_dict():
            log(f"warning: decoding options differ from the run's ({recorded}); validation WERs before and "
                "after the resume are not comparable")
    if resume is None and (run / "checkpoint").exists():
        raise TrainingError(f"{run} already holds a training run; continue it with --resume {run} or pick another -o")
    canary_note = None
    paths["canary"], canary_note = resolve_canary(paths.get("canary"), log=log)
    sets = {k: load_manifest(paths[k], skip_invalid=skip_invalid) if paths.get(k) else None
            for k in ("train", "val", "heldout", "replay", "eval_test", "canary")}
    model, processor = load(paths["model"])
    try:
        summary = train(model, processor, sets["train"], sets["val"], args, run_dir=run, heldout_set=sets["heldout"],
                        replay_set=sets["replay"], decoding=decoding, resume=resume is not None, log=log,
                        record=dict(paths={k: (str(v) if v else None) for k, v in paths.items()},
                                    report=report_opts))
    except TrainingError as e:
        if getattr(e, "summary", None) is None:
            raise
        # Diverged: the report says so (no final evaluation of a broken adapter), then the error stops the CLI.
        e.summary["warnings"].append("no final evaluation: training diverged")
        verdict = decide({}, thresholds, canary_note)
        log(f"wrote {write_report(run, e.summary, args, paths, decoding, {}, time.perf_counter() - t0, verdict=verdict)}")
        raise
    adapter_dir = run / BEST if (run / BEST / "adapters.safetensors").is_file() else run
    evals = final_eval(run, paths, decoding, adapter_dir, log=log)
    if fuse and world().is_main:
        fused, processor = load(paths["model"])
        load_adapters(fused, adapter_dir)
        fuse_model(fused)
        save(fused, processor, run / "fused", record=dict(base=str(paths["model"]), adapter=str(adapter_dir)))
        log(f"wrote {run / 'fused'}")
    elapsed = time.perf_counter() - t0
    verdict = decide(evals, thresholds, canary_note)
    notes = [f"real-speech canary {canary_note}"] if canary_note else []
    report = write_report(run, summary, args, paths, decoding, evals, elapsed, report_opts.get("hypothesis"),
                          verdict=verdict, notes=notes)
    log(f"wrote {report}")
    return dict(summary=summary, evals={k: v for k, v in evals.items() if k in ("names", "baseline_dirs", "tuned_dir")},
                decision=verdict, report=str(report))


__all__ = ["run_training", "resolve_args", "final_eval", "write_report", "decide", "MoonshineError"]
