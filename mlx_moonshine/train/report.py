"""report.md of a training run, and the verdict it states (the rule `compare` uses, on the final evals).

The report follows the project's final-report sections: run summary, hypothesis, success criteria,
configuration, baseline vs tuned WER/CER on the domain test and held-out sets, sample transcripts and
format drift, duration (where the time went), artefacts, decision, warnings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..io import atomic_write_text, read_jsonl
from .config import TrainArgs

GENERIC_HYPOTHESIS = ("A low-rank adapter trained on in-domain speech cuts the domain WER, while replayed general "
                      "speech, with the frozen base model as its teacher, keeps general speech (the held-out set "
                      "and real recordings) as the base transcribes it, in the base's casing and punctuation.")
PHASES = (("teacher", "the base as teacher of the replay rows (transcripts + top-k table; the teacher cache "
            "keeps them for the next run on this base)"),
          ("steps", "training steps"),
          ("new_shape_steps", "steps on a batch shape not seen before (trace, and on the CPU kernel builds)"),
          ("validation", "validations"),
          ("checkpoints", "checkpoints and best/"))


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
        for r in read_jsonl(path):
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
    adapter = json.loads((run / "adapter_config.json").read_text()) if (run / "adapter_config.json").is_file() else {}
    L = ["# Training report", ""]
    L += _summary_section(summary, args, paths, adapter)
    L += ["## Hypothesis", "", hypothesis or GENERIC_HYPOTHESIS, ""]
    L += _criteria_section(th)
    L += ["## Configuration", "", "```json", json.dumps(dict(train_args=args.to_dict(), decoding=decoding.to_dict(),
                                                          thresholds=th, paths={k: v for k, v in paths.items() if v}),
                                                     indent=2), "```", ""]
    L += ["## Results", ""] + _results_section(evals, verdict)
    L += _validation_lines(summary)
    L += _samples_sections(evals)
    L += _duration_section(summary, elapsed)
    L += _artefacts_section(run)
    L += ["## Decision", "", _decision(verdict), "", verdict["verdict"], ""]
    warnings = list(summary.get("warnings", [])) + list(notes or [])
    L += ["## Warnings", ""] + ([f"* {w}" for w in warnings] or ["* none"]) + [""]
    atomic_write_text(run / "report.md", "\n".join(L))
    return run / "report.md"


def _summary_section(summary: dict, args: TrainArgs, paths: dict, adapter: dict) -> list[str]:
    best = summary.get("best") or {}
    return [
        "## Run summary", "",
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


def _criteria_section(th: dict) -> list[str]:
    dom = th["domain_min_reduction"]
    return [
        "## Success criteria", "",
        f"* domain test WER relative reduction >= {dom:.0%}" if dom else "* domain test WER not worse than the base's",
        f"* held-out WER rise <= {th['heldout_max_rise']:.1f} absolute point",
        f"* real-speech canary WER rise <= {th['canary_max_rise']:.1f} absolute point",
        f"* format drift (casing/punctuation unlike the base's) on held-out and canary <= {th['format_drift_max']:.0%} "
        "of utterances",
        "* every criterion measured (an unmeasured one makes the decision \"not measured\", never yes)", ""]


def _validation_lines(summary: dict) -> list[str]:
    best, final, first = summary.get("best") or {}, summary.get("final") or {}, summary.get("first_val") or {}
    return [
        "Validation during training (first val rows, shared decoder):", "",
        f"* step 0: val loss {first.get('val_loss', float('nan')):.4f}, val WER {first.get('val_wer', float('nan')):.4f}",
        f"* best (step {best.get('step')}): val loss {best.get('val_loss', float('nan')):.4f}, "
        f"val WER {(best.get('val_wer') if best.get('val_wer') is not None else float('nan')):.4f}",
        f"* final (step {final.get('step')}): val loss {final.get('val_loss', float('nan')):.4f}, "
        f"val WER {final.get('val_wer', float('nan')):.4f}", ""]


def _samples_sections(evals: dict) -> list[str]:
    """Five sample transcripts per set, then (outside the domain) five whose format drifted from the base's."""
    L = []
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
    return L


def _duration_section(summary: dict, elapsed: float) -> list[str]:
    return [
        "## Duration", "",
        f"* wall time {_hms(elapsed)} ({elapsed:.0f} s elapsed), of which the training loop "
        f"(validations included) {_hms(summary['train_seconds'])}",
        f"* mean step time {summary.get('step_seconds')} s; peak MLX memory {summary['peak_memory_gb']:.2f} GiB; "
        f"peak RSS {summary['peak_rss_gb']:.2f} GiB; skipped (non-finite) steps {summary['skipped_steps']}",
        f"* encoder cache: {'on' if summary['encoder_cache'] else 'off'}",
        *_phase_lines(summary.get("phases") or {}, elapsed), ""]


def _artefacts_section(run: Path) -> list[str]:
    return [
        "## Artefacts", "",
        *[f"* `{run / name}`" for name in ("adapters.safetensors", "adapter_config.json", "best/", "checkpoint/",
                                            "metrics.jsonl", "loss.png", "wer.png", "train_config.json",
                                            "summary.json", "manifests/")],
        *([f"* `{run / 'replay_targets.jsonl'}` (the base's transcripts of the replay audio)"]
          if (run / "replay_targets.jsonl").is_file() else []),
        *([f"* `{run / 'fused'}`"] if (run / "fused").is_dir() else []), ""]


def _decision(verdict: dict) -> str:
    failed = [c["name"] for c in verdict["criteria"] if c["passed"] is False]
    missing = verdict["not_measured"]
    if verdict["decision"]:
        return "**yes**: every criterion was measured and passes."
    if failed:
        return "**no**: " + "; ".join(failed) + " failed" + (f"; not measured: {'; '.join(missing)}" if missing else "") + "."
    return "**not measured**: " + ("; ".join(missing) or "no final evaluation") + ". Nothing failed, but " \
           "what was not measured is not certified."


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


__all__ = ["write_report", "decide", "GENERIC_HYPOTHESIS", "PHASES"]
