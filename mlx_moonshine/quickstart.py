"""The main job end to end on the bundled ATC example: model, baseline, LoRA, tuned eval, compare, report, export.

Every stage writes into its own folder of OUT and is skipped when already finished, so re-running
continues where it stopped (an interrupted training run resumes from its last checkpoint).

    OUT/model        the converted model (Hub moonshine-tiny when reachable, else the same tiny from PyPI)
    OUT/baseline     eval of the model on the example's domain test + heldout manifests
    OUT/lora         the training run: adapters, curves (loss.png, wer.png), report.md, eval/tuned
    OUT/compare.txt  per-sample comparison, baseline vs tuned, with the heldout guardrail verdict
    OUT/peft         the adapter in PEFT format (PeftModel.from_pretrained)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import MoonshineError
from .io import atomic_write_text

HUB_MODEL = "UsefulSensors/moonshine-tiny"
PYPI_MODEL = "moonshine-voice:tiny-en"  # the same tiny weights as the Hub's, from PyPI: one model on every machine
EXAMPLE = ("domain_train", "domain_val", "domain_test", "heldout_manifest")


class QuickstartError(MoonshineError):
    """The quickstart cannot run (no example data, no model source)."""


def find_example(data_dir: Optional[str | Path] = None) -> Path:
    """The bundled example folder (examples/atc in a source checkout) or `data_dir`."""
    candidates = [Path(data_dir)] if data_dir else [Path(__file__).resolve().parents[1] / "examples" / "atc",
                                                    Path.cwd() / "examples" / "atc"]
    for folder in candidates:
        if all((folder / f"{name}.jsonl").is_file() for name in EXAMPLE):
            return folder
    raise QuickstartError(
        f"bundled example not found (looked in {', '.join(str(c) for c in candidates)}); run from a source "
        f"checkout, pass --data DIR with {', '.join(n + '.jsonl' for n in EXAMPLE)}, or regenerate it with "
        "python examples/atc/make_data.py")


def get_model(out: Path, source: Optional[str], log: Callable[[str], None]) -> tuple[Path, str]:
    """Convert the model once; returns (folder, source used)."""
    from .loading import convert

    folder = out / "model"
    record = folder / "conversion.json"
    if record.is_file():
        used = json.loads(record.read_text()).get("source", "?")
        log(f"[1/6] model: reusing {folder} ({used})")
        return folder, used
    tried = [source] if source else [HUB_MODEL, PYPI_MODEL]
    errors = []
    for src in tried:
        try:
            log(f"[1/6] model: converting {src} ...")
            convert(src, folder, force=True, log=lambda m: None)
            log(f"[1/6] model: {src} -> {folder}")
            return folder, src
        except MoonshineError as e:
            errors.append(f"{src}: {e}")
            log(f"      {src} is not available here ({str(e).splitlines()[0][:120]})")
    raise QuickstartError("no model could be converted: " + " | ".join(errors))


def quickstart(out_dir: str | Path = "runs/quickstart", minutes: float = 12.0, steps: int = 300,
               data_dir: Optional[str | Path] = None, model_source: Optional[str] = None,
               log: Callable[[str], None] = print) -> dict:
    """Run (or finish) the whole main job; returns the summary printed at the end.

    Args:
        out_dir: where every stage writes (re-running reuses finished stages).
        minutes: wall-clock budget for the training stage (it stops early when the budget is spent).
        steps: optimizer steps planned for training (the lr schedule spans them).
        data_dir: a folder laid out like examples/atc (default: the bundled example).
        model_source: anything `convert` accepts; default: the Hub's moonshine-tiny, else real tiny from PyPI (moonshine-voice).
    """
    from .eval.canary import resolve_canary
    from .eval.compare import compare_runs
    from .decoding import DecodingOptions
    from .eval.evaluate import evaluate
    from .export.peft import export_peft
    from .loading import load

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = find_example(data_dir)
    manifest = {name: data / f"{name}.jsonl" for name in EXAMPLE}
    model_dir, source = get_model(out, model_source, log)
    options = DecodingOptions()

    # Real recordings beside the synthetic heldout: synthetic voices certify nothing about real ones.
    canary, why = resolve_canary(None, log=log)
    if canary is None:
        log(f"note: real-speech canary {why}: the verdict will say 'not measured' for it")
    guard = [manifest["domain_test"], manifest["heldout_manifest"]] + ([Path(canary)] if canary else [])
    log("[2/6] baseline eval (domain test + heldout" + (" + real-speech canary" if canary else "") + ") ...")
    model, processor = load(model_dir)
    evaluate(model, processor, guard, out / "baseline", options=options, model_path=model_dir, progress=True)
    del model

    run = out / "lora"
    _train_stage(run, model_dir, manifest, canary, out, steps, minutes, options, log)

    log("[4/6] compare baseline vs tuned ...")
    report, ok = compare_runs(out / "baseline", run / "eval" / "tuned")
    atomic_write_text(out / "compare.txt", report + "\n")

    log("[5/6] export PEFT adapter ...")
    peft_dir = export_peft(run, out / "peft", base_model_name_or_path=source if "/" in source else None,
                           force=True)

    summary = {"model": source, "rows": _wer_rows(out / "baseline", run / "eval" / "tuned", canary),
               "verdict_ok": ok, "seconds": time.perf_counter() - t0,
               "artefacts": {"model": str(model_dir), "baseline": str(out / "baseline"), "run": str(run),
                             "report": str(run / "report.md"), "curves": [str(run / "loss.png"), str(run / "wer.png")],
                             "compare": str(out / "compare.txt"), "peft": str(peft_dir)}}
    _print_summary(summary, report, log)
    return summary


def _train_stage(run: Path, model_dir, manifest: dict, canary, out: Path, steps: int, minutes: float, options,
                 log) -> None:
    """Stage 3: `train` on the example with its defaults (resumed from a checkpoint, or reused when finished)."""
    from .train.run import run_training

    if (run / "report.md").is_file() and (run / "eval" / "tuned" / "summary.json").is_file():
        log(f"[3/6] training: reusing finished run {run}")
        return
    log(f"[3/6] training LoRA (r=8 on q/v, {steps} steps, at most {minutes:g} min) ...")
    cli = dict(model=str(model_dir), train=str(manifest["domain_train"]), val=str(manifest["domain_val"]),
               heldout=str(manifest["heldout_manifest"]), eval_test=str(manifest["domain_test"]),
               canary=canary or "none", out=str(run), baseline_run=str(out / "baseline"), max_steps=steps,
               max_minutes=minutes, eval_every=100, val_wer_samples=20)
    # train's default mixes the bundled general-English replay set into every batch (ratio 0.5) with the
    # base model as its teacher: that is what keeps general speech (README, "General speech")
    resume = run if (run / "checkpoint").exists() else None
    run_training(cli, resume=resume, decoding=options, log=log)


def _wer_rows(baseline: Path, tuned: Path, canary) -> list[tuple]:
    """(set, baseline WER, tuned WER, relative change, points) for the domain test, heldout and canary."""
    from .eval.evaluate import manifest_name

    base = json.loads((baseline / "summary.json").read_text())["manifests"]
    after = json.loads((tuned / "summary.json").read_text())["manifests"]
    rows = []
    for name in ("domain_test", "heldout_manifest") + ((manifest_name(canary),) if canary else ()):
        b, t = base[name]["wer"], after[name]["wer"]
        rows.append((name, b, t, (t - b) / b if b else 0.0, 100 * (t - b)))
    return rows


def _print_summary(summary: dict, report: str, log) -> None:
    log("[6/6] done\n")
    log(f"{'set':18s} {'baseline WER':>13s} {'tuned WER':>10s} {'relative':>9s} {'abs pts':>8s}")
    for name, b, t, rel, pts in summary["rows"]:
        log(f"{name:18s} {b:13.2%} {t:10.2%} {rel:+9.1%} {pts:+8.2f}")
    log(f"\nguardrail: {report.strip().splitlines()[-1]}")
    log("\nartefacts:")
    for key, value in summary["artefacts"].items():
        log(f"  {key:9s} {', '.join(value) if isinstance(value, list) else value}")
    log(f"\ntotal {summary['seconds'] / 60:.1f} min")

