"""`TrainArgs`: everything that shapes a training run (CLI, YAML, train_config.json), validated once, and
the learning-rate schedule it describes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.optimizers as optim

from ..adapters.apply import AdapterConfig
from ..errors import MoonshineError
from .batches import AUGMENTS

SCHEDULES = ("cosine", "linear", "constant")


class TrainingError(MoonshineError):
    """Training cannot start or cannot go on (bad arguments, loss not finite for too long)."""


@dataclass
class TrainArgs:
    """Everything that shapes a training run; saved in `train_config.json`. Unknown keys are ignored."""

    max_steps: int = 400  # optimizer steps (each: batch_size * grad_accum utterances)
    schedule_steps: Optional[int] = None  # length of the lr schedule; None: max_steps. Set it to stop early and resume exactly
    lr: float = 1e-3
    batch_size: int = 2
    grad_accum: int = 1
    warmup_steps: int = 20  # linear warm-up from 0 to lr
    schedule: str = "cosine"  # after warm-up: "cosine" or "linear" decay to 0, or "constant"
    weight_decay: float = 0.01  # AdamW, on the adapter weights only (the base is frozen)
    # Adapter (see adapters.AdapterConfig)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = "q_proj,v_proj"
    scope: str = "encoder,decoder_self,decoder_cross"
    layers: Optional[list] = None  # layer indices per stack; None: all
    dora: bool = False
    init: str = "default"  # "default", "pissa" or "pissa_niter_N"
    rslora: bool = False
    perturb_sigma: float = 0.0  # Flat-LoRA weight noise; 0: off
    seed: int = 0
    # Validation and stopping
    eval_every: int = 100  # steps between validations and checkpoints (each costs ~50 steps of time on a CPU)
    log_every: int = 10  # steps between metrics rows
    val_batches: int = 0  # batches of val for the val loss; 0: all rows
    val_wer_samples: int = 60  # first rows of val decoded for the val WER; 0: none
    aux_loss_rows: int = 60  # rows of replay/heldout whose loss is tracked at each validation
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    max_minutes: Optional[float] = None  # wall-clock budget for the training loop (checked every step); None: none
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops as diverged
    # Data
    max_seconds: Optional[float] = 30.0  # longer clips are left out of training (and counted)
    replay_ratio: float = 0.0  # share of training rows drawn from the replay set
    # Who writes the replay targets: "base" (the frozen base model's own transcripts: its words, case and
    # punctuation) or "manifest" (the replay manifest's texts). See teacher.py.
    replay_targets: str = "base"
    replay_kd: float = 2.0  # weight of the distillation term toward the base's distribution on replay rows; 0: off
    kd_topk: int = 16  # teacher tokens kept per position for the distillation term
    transcript_style: str = "base"  # outside the domain: "base" keeps the base's style, "domain" adopts the domain's
    augment: str = ""  # comma list of noise, speed, timemask; "" = off
    cache_encoder: str = "auto"  # "auto" (on when legal), "on" (error if not legal), "off"
    # Compute
    dtype: str = "float32"  # base weights; adapter weights stay float32
    grad_checkpoint: bool = False
    # mx.compile the step: None = on (train_step.step_compiled). Every new batch shape costs a trace
    # (and on the CPU kernel builds), so compiled batches pad to a few length buckets (train_batches).
    compile: Optional[bool] = None
    buckets: Optional[bool] = None  # pad batches to the length buckets; None: whenever the step is compiled
    pad_seconds: float = 0.5  # unbucketed audio padded to a multiple of this

    def __post_init__(self):
        problems = []
        for name in ("max_steps", "batch_size", "grad_accum", "rank", "eval_every", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "val_batches", "val_wer_samples", "aux_loss_rows", "patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            problems.append(f"max_minutes must be > 0 (got {self.max_minutes})")
        if self.lr <= 0 or not math.isfinite(self.lr):
            problems.append(f"lr must be a positive number (got {self.lr})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.schedule_steps is not None and self.schedule_steps < self.max_steps:
            problems.append(f"schedule_steps {self.schedule_steps} is shorter than max_steps {self.max_steps}")
        if self.replay_targets not in ("base", "manifest"):
            problems.append(f"replay_targets must be base or manifest (got {self.replay_targets!r})")
        if self.transcript_style not in ("base", "domain"):
            problems.append(f"transcript_style must be base or domain (got {self.transcript_style!r})")
        if not (self.replay_kd >= 0 and math.isfinite(self.replay_kd)):
            problems.append(f"replay_kd must be a number >= 0 (got {self.replay_kd})")
        if self.kd_topk < 1:
            problems.append(f"kd_topk must be >= 1 (got {self.kd_topk})")
        if not 0.0 <= self.replay_ratio < 1.0:
            problems.append(f"replay_ratio must be in [0, 1) (got {self.replay_ratio})")
        bad = [a for a in self.augment_kinds if a not in AUGMENTS]
        if bad:
            problems.append(f"augment {bad} unknown; use a comma list of {', '.join(AUGMENTS)}")
        if self.cache_encoder not in ("auto", "on", "off"):
            problems.append(f"cache_encoder must be auto, on or off (got {self.cache_encoder!r})")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"dtype {self.dtype!r} is not float32, float16 or bfloat16")
        if problems:
            raise TrainingError("invalid training arguments: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        """Build from a dict (YAML, JSON), ignoring unknown keys; '-' in keys reads as '_'.

        Numbers written as strings (YAML 1.1 reads `1e-3` as a string) are converted.
        """
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        known = {}
        for key, value in d.items():
            key = key.replace("-", "_")
            if key not in types or value is None and "Optional" not in str(types[key]):
                continue
            known[key] = _coerce(key, value, str(types[key]))
        return cls(**known)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def augment_kinds(self) -> list[str]:
        return [a.strip() for a in str(self.augment or "").split(",") if a.strip()]

    @property
    def total_schedule_steps(self) -> int:
        return self.schedule_steps or self.max_steps

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(kind="dora" if self.dora else "lora", r=self.rank, alpha=self.alpha,
                             dropout=self.dropout, use_rslora=self.rslora, init=self.init,
                             targets=self.targets, scope=self.scope, layers=self.layers,
                             perturb_sigma=self.perturb_sigma, seed=self.seed)


def _coerce(key: str, value, type_name: str):
    try:
        if "bool" in type_name and isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1", "on")
        if "float" in type_name and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if "int" in type_name and isinstance(value, str):
            return int(value)
        if type_name.replace("Optional[", "").rstrip("]") in ("int", "float") and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(value)
        if key in ("targets", "scope", "augment") and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
    except ValueError:
        raise TrainingError(f"training argument {key}={value!r} is not a valid {type_name}") from None
    return value


def lr_schedule(args: TrainArgs) -> Callable:
    """Linear warm-up to `args.lr`, then cosine/linear decay to 0 (or constant) at the schedule's end."""
    steps = args.total_schedule_steps
    warmup = min(args.warmup_steps, steps)
    rest = max(steps - warmup, 1)
    if args.schedule == "cosine":
        main = optim.cosine_decay(args.lr, rest, 0.0)
    elif args.schedule == "linear":
        main = optim.linear_schedule(args.lr, 0.0, rest)
    else:
        main = lambda step: mx.array(args.lr, dtype=mx.float32)  # noqa: E731
    if warmup == 0:
        return main
    # Warm-up starts one step above 0 so the first update is not wasted.
    return optim.join_schedules([optim.linear_schedule(args.lr / (warmup + 1), args.lr, warmup), main], [warmup])
