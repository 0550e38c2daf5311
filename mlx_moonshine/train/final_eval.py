"""The run's final evaluation: the base and the best adapter on the domain test, held-out and canary sets.

Both go through `eval.evaluate` with the run's decoding options into RUN/eval/baseline and RUN/eval/tuned;
an earlier `mlx-moonshine eval` run (`baseline_run`) can stand in for the baseline, decoded the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import TrainingError


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


__all__ = ["final_eval"]
