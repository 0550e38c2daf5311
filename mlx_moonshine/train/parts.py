"""The parts `train()` puts together, each usable alone: the run's rows (`run_rows`), the frozen base as the
teacher of replay rows (`replay_teacher`), the adapters (`adapt`), the encoder caches (`encoder_caches`), the
default optimizer, and `PhaseClock` (where a session's time went)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..adapters.apply import adapter_layers, apply_adapters, load_adapters
from ..distributed import world as _world
from .batches import EncoderCache, filter_long, rows_of, use_buckets
from .config import TrainArgs, TrainingError, lr_schedule
from .teacher import base_targets, manifest_targets, teacher_table


@dataclass
class RunRows:
    """The rows of a run: training rows, val rows, replay rows (trained on / tracked) and heldout rows."""

    train: list
    val: list
    replay_train: list = field(default_factory=list)
    replay_val: list = field(default_factory=list)
    heldout: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def run_rows(train_set, val_set, args: TrainArgs, heldout_set=None, replay_set=None) -> RunRows:
    """Rows over `args.max_seconds` left out (and said); the first `aux_loss_rows` replay rows (at most a
    quarter) held out for tracking, the same number of heldout rows tracked."""
    warnings: list[str] = []
    rows = RunRows(train=filter_long(rows_of(train_set), args.max_seconds, "train", warnings),
                   val=rows_of(val_set), warnings=warnings)
    if replay_set is not None:
        replay = rows_of(replay_set)
        n_hold = min(args.aux_loss_rows, len(replay) // 4)
        rows.replay_val = replay[:n_hold]
        rows.replay_train = filter_long(replay[n_hold:], args.max_seconds, "replay", warnings)
    if heldout_set is not None:
        rows.heldout = rows_of(heldout_set)[: args.aux_loss_rows]
    if args.replay_ratio > 0 and not rows.replay_train:
        raise TrainingError("replay_ratio > 0 needs a replay set (--replay MANIFEST)")
    return rows


def replay_teacher(model, processor, rows: RunRows, args: TrainArgs, run: Optional[Path], decoding, log):
    """Give the replay rows their targets (the base's transcripts or the manifest's, restyled as asked) and,
    with `replay_kd` > 0, return the base's token distributions on the training rows (else None). The model
    must still be the base; answers known from earlier runs on the same base come from the teacher cache."""
    from .teacher_cache import open_store

    both = rows.replay_val + rows.replay_train
    store = open_store(model, processor) if _world().is_main else None
    if args.replay_targets == "base":
        both = base_targets(model, processor, both, decoding, run, args.transcript_style, log=log, store=store)
    else:
        both = manifest_targets(both, args.transcript_style)
    rows.replay_val, rows.replay_train = both[: len(rows.replay_val)], both[len(rows.replay_val):]
    if args.replay_kd <= 0 or not rows.replay_train:
        return None
    teacher = teacher_table(model, processor, rows.replay_train, args, k=args.kd_topk,
                            max_len=model.args.max_position_embeddings, store=store, log=log)
    log(f"replay teacher: base distributions (top {args.kd_topk}) on {len(rows.replay_train)} replay rows, "
        f"{teacher.nbytes / 2**20:.1f} MB, distillation weight {args.replay_kd:g}")
    return teacher


def adapt(model, args: TrainArgs, checkpoint: Optional[Path]):
    """Compute dtype, then the adapters (fresh, or the checkpoint's) on the frozen base: (config, trainable)."""
    if args.dtype != "float32":
        from ..loading import cast_model

        cast_model(model, args.dtype)
    if checkpoint is not None:
        config = load_adapters(model, checkpoint)
    else:
        config = args.adapter_config()
        apply_adapters(model, config)
    return config, sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def encoder_caches(model, processor, args: TrainArgs) -> tuple[dict, str]:
    """One `EncoderCache` per row set when the encoder is frozen and deterministic, and the log line."""
    in_encoder = [p for p, _ in adapter_layers(model) if ".encoder." in p]
    can_cache = not in_encoder and not args.augment_kinds
    if args.cache_encoder == "on" and not can_cache:
        raise TrainingError("cache_encoder=on needs every adapter in the decoder (scope decoder_self/"
                            f"decoder_cross) and no augmentation; {len(in_encoder)} adapters are in the encoder")
    if not can_cache or args.cache_encoder == "off":
        why = "adapters in the encoder" if in_encoder else "augmentation on" if args.augment_kinds else "disabled"
        return {}, f"encoder cache: off ({why})"
    caches = {name: EncoderCache(model, processor, args.pad_seconds, buckets=use_buckets(args))
              for name in ("train", "val", "replay", "heldout")}
    return caches, ("encoder cache: on (every adapter is in the decoder: frozen encoder outputs are computed "
                    "once per utterance and kept in RAM)")


def default_optimizer(args: TrainArgs) -> optim.Optimizer:
    """AdamW on the lr schedule, weight decay on the adapter weights (the only trainable ones)."""
    return optim.AdamW(learning_rate=lr_schedule(args), weight_decay=args.weight_decay)


class PhaseClock:
    """Wall seconds and counts per phase of one session: where a run's time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, phase: str, seconds: float, count: int = 1) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.counts[phase] = self.counts.get(phase, 0) + count

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def as_dict(self) -> dict:
        return {k: dict(seconds=round(v, 2), count=self.counts[k]) for k, v in self.seconds.items()}


__all__ = ["RunRows", "run_rows", "replay_teacher", "adapt", "encoder_caches", "default_optimizer",
           "PhaseClock"]
