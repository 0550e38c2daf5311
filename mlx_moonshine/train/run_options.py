"""Where a training run's options come from: defaults < a resumed run's train_config.json < YAML < CLI.

`resolve_args` gives the `TrainArgs`, the run's paths (model, manifests, out, baseline_run) and the
report's keys (the verdict thresholds and the hypothesis). Unknown YAML keys are an error naming the close
ones; replay is on by default with the bundled general-English set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import TrainArgs, TrainingError
from .state import TRAIN_CONFIG, read_train_config

PATH_KEYS = ("model", "train", "val", "heldout", "eval_test", "replay", "canary", "out", "baseline_run")
# The verdict's thresholds and the report's hypothesis: the user's, from the CLI or YAML (verdict.Thresholds).
VERDICT_KEYS = {"domain_target": "domain_min_reduction", "max_heldout_regression": "heldout_max_rise",
                "max_canary_regression": "canary_max_rise", "max_format_drift": "format_drift_max"}
REPORT_KEYS = (*VERDICT_KEYS, "hypothesis")
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


def verdict_thresholds(report: dict):
    """The verdict's `Thresholds` from the report keys `resolve_args` found (the rest keep their defaults)."""
    from ..eval.verdict import Thresholds

    return Thresholds(**{VERDICT_KEYS[k]: float(v) for k, v in report.items() if k in VERDICT_KEYS})


__all__ = ["resolve_args", "verdict_thresholds", "BUILTIN_REPLAY", "DEFAULT_REPLAY_RATIO", "PATH_KEYS", "REPORT_KEYS"]
