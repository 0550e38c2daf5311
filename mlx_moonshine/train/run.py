"""A whole training run from paths: options merged, train, final eval, fuse, report.md.

`run_training` is what `mlx-moonshine train` calls; its parts are usable on their own:
`run_options.resolve_args` (CLI > YAML > resumed run > defaults), `final_eval.final_eval`,
`report.decide` and `report.write_report`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..io import run_lock
from .config import TrainArgs, TrainingError
from .final_eval import final_eval
from .report import decide, write_report
from .run_options import resolve_args, verdict_thresholds
from .state import read_train_config


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


def _run_training(args: TrainArgs, paths: dict, t0: float, report_opts: dict, *, resume, fuse: bool, decoding,
                  skip_invalid: bool, log: Callable[[str], None]) -> dict:
    from ..data import load_manifest
    from ..decoding import DecodingOptions
    from ..distributed import world
    from ..eval.canary import resolve_canary
    from ..loading import load
    from .state import BEST
    from .trainer import train

    thresholds = verdict_thresholds(report_opts)
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
        _fuse(paths["model"], adapter_dir, run / "fused")
        log(f"wrote {run / 'fused'}")
    elapsed = time.perf_counter() - t0
    verdict = decide(evals, thresholds, canary_note)
    notes = [f"real-speech canary {canary_note}"] if canary_note else []
    report = write_report(run, summary, args, paths, decoding, evals, elapsed, report_opts.get("hypothesis"),
                          verdict=verdict, notes=notes)
    log(f"wrote {report}")
    return dict(summary=summary, evals={k: v for k, v in evals.items() if k in ("names", "baseline_dirs", "tuned_dir")},
                decision=verdict, report=str(report))


def _fuse(model_path, adapter_dir: Path, out: Path) -> None:
    """OUT: a plain MLX model folder, the base with the adapter merged in."""
    from ..adapters.apply import fuse_model, load_adapters
    from ..loading import load, save

    fused, processor = load(model_path)
    load_adapters(fused, adapter_dir)
    fuse_model(fused)
    save(fused, processor, out, record=dict(base=str(model_path), adapter=str(adapter_dir)))


__all__ = ["run_training"]
