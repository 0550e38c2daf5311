"""The training run folder: checkpoints (atomic, resumable), best adapter, metrics, plots, config.

    RUN/
      adapters.safetensors, adapter_config.json   last adapter (`load(model, adapter=RUN)` reads it)
      best/                                       adapter with the best validation metric
      checkpoint/                                 everything to resume exactly (state.json written last)
      metrics.jsonl, loss.png, wer.png            one row per log step / validation
      train_config.json, summary.json             arguments, decoding, audio, model and data hashes
      manifests/                                  byte copies of the manifests used (with sha256)
      tokenizer.json, preprocessor_config.json    the processor the adapter was trained with

A checkpoint is written into a fresh temporary folder and swapped in with renames
(checkpoint -> checkpoint.old, tmp -> checkpoint, remove checkpoint.old); a kill at any moment leaves
either `checkpoint/` or `checkpoint.old/` complete, and `find_checkpoint` takes whichever is.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters.apply import BEST, save_adapters
from ..errors import MoonshineError
from ..io import (atomic_dir, atomic_path, atomic_save_safetensors, atomic_write_bytes, atomic_write_json,
                 atomic_write_text, read_jsonl, sha256_file, writing)

CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"


class CheckpointError(MoonshineError):
    """A checkpoint, or the run's train_config.json, that cannot be read back."""


@dataclass
class TrainProgress:
    """Where a run is: saved in checkpoint/state.json."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next batch of the epoch's (seed, epoch)-determined order
    skipped: int = 0  # steps whose loss/gradient was not finite (no update)
    nonfinite_run: int = 0
    bad_evals: int = 0  # validations since the best one
    elapsed: float = 0.0  # training seconds so far (all sessions)
    best: Optional[dict] = None
    first_val: Optional[dict] = None
    last_val: Optional[dict] = None
    extra: dict = field(default_factory=dict)


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def find_checkpoint(run: Path) -> Optional[Path]:
    """The complete checkpoint folder of `run` (checkpoint/, or checkpoint.old/ after a kill mid-swap)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (Path(run) / name / STATE_FILE).is_file():
            return Path(run) / name
    return None


def save_checkpoint(run: Path, model, config, optimizer, progress: TrainProgress, args) -> Path:
    """Write RUN/adapters.* and RUN/checkpoint/ (adapters, optimizer state, RNG key, state.json)."""
    run = Path(run)
    save_adapters(run, model, config)
    with atomic_dir(run / CHECKPOINT, prefix=f".{CHECKPOINT}-") as tmp:
        save_adapters(tmp, model, config)
        opt = dict(tree_flatten(optimizer.state))
        mx.eval(opt)
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt)
        key = [int(v) for v in mx.random.state[0].tolist()]
        state = asdict(progress)
        state.update(
            random_key=key, args=args.to_dict(),
            schedule=dict(kind=args.schedule, lr=args.lr, warmup_steps=args.warmup_steps,
                          steps=args.total_schedule_steps),
            data_order="pure function of (seed, epoch); resume at (epoch, batch_index)",
            saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(tmp / STATE_FILE, state)  # last: its presence marks a complete checkpoint
    return run / CHECKPOINT


def restore(checkpoint: Path, optimizer, model, args, warnings: list) -> TrainProgress:
    """Load optimizer state, RNG key and progress from `checkpoint` (adapters are loaded by the caller)."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        flat = mx.load(str(checkpoint / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: MLX on a damaged safetensors file
        raise CheckpointError(f"{checkpoint}: damaged checkpoint ({e}); it cannot be resumed: start a new run "
                              "with another -o") from e
    optimizer.state = tree_unflatten(list(flat.items()))
    optimizer.init(model.trainable_parameters())  # keeps the loaded moments, marks it initialised
    hi, lo = state["random_key"]
    mx.random.seed((hi << 32) | lo)  # seed(k) sets the key to (k >> 32, k & 0xffffffff)
    saved_steps = state.get("schedule", {}).get("steps")
    if saved_steps is not None and saved_steps != args.total_schedule_steps:
        warnings.append(f"the lr schedule changes from {saved_steps} to {args.total_schedule_steps} steps; "
                        "the resumed run will not match an uninterrupted one")
    names = TrainProgress.__dataclass_fields__
    return TrainProgress(**{k: v for k, v in state.items() if k in names})


def save_best(run: Path, model, config) -> None:
    with atomic_dir(Path(run) / BEST, prefix=f".{BEST}-") as tmp:
        save_adapters(tmp, model, config)


class RunWriter:
    """metrics.jsonl (append one JSON line per row) and the loss/WER plots."""

    def __init__(self, run: Path, resume_step: Optional[int] = None):
        self.path = Path(run) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = []
        if resume_step is not None and self.path.exists():
            # Rows after the checkpoint are redone by the resumed run; a torn last line is dropped.
            self.rows = [row for row in read_jsonl(self.path) if row.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def mean_step_seconds(self) -> Optional[float]:
        rows = [r for r in self.rows if r.get("kind") == "train" and r.get("step_seconds")]
        return round(sum(r["step_seconds"] for r in rows) / len(rows), 4) if rows else None

    def plot(self) -> None:
        """loss.png (train and val loss) and wer.png (val WER) next to metrics.jsonl."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.rows if r.get("kind") == "train"]
        val = [r for r in self.rows if r.get("kind") == "val"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
        for key in ("replay_loss", "heldout_loss"):
            pts = [(r["step"], r[key]) for r in val if key in r]
            if pts:
                ax.plot(*zip(*pts), "s--", label=key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        _save_fig(fig, self.path.parent / "loss.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = [(r["step"], r["val_wer"]) for r in val if "val_wer" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label="val WER")
        ax.set_xlabel("step")
        ax.set_ylabel("WER")
        if pts:
            ax.legend()
        ax.grid(alpha=0.3)
        _save_fig(fig, self.path.parent / "wer.png")


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:  # final file follows the umask (mkstemp's is 0600)
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def _manifest_record(m, run: Path) -> Optional[dict]:
    if m is None:
        return None
    from ..data import copy_manifest

    path = getattr(m, "path", None)
    if path is None:  # a plain list of samples: nothing to copy
        return {"rows": len(m)}
    rec = copy_manifest(path, run)
    rec["rows"] = len(m)
    rec["skipped_rows"] = getattr(m, "n_skipped", 0)
    return rec


def write_run_files(run: Path, model, processor, args, config, decoding, train_set, val_set, heldout_set,
                    replay_set, extra: dict) -> None:
    """train_config.json, manifest copies and the processor snapshot (tokenizer, preprocessor config)."""
    from .. import __version__
    from ..metrics import DEFAULT_NORMALIZER

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    manifests = {name: _manifest_record(m, run) for name, m in
                 dict(train=train_set, val=val_set, heldout=heldout_set, replay=replay_set).items()}
    model_dir = Path(processor.path)
    weights = model_dir / "model.safetensors"
    pre_src = model_dir / "preprocessor_config.json"
    pre = json.loads(pre_src.read_text()) if pre_src.is_file() else {}
    atomic_write_json(run / "preprocessor_config.json", processor.audio.to_preprocessor_config(pre))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            atomic_write_bytes(run / name, (model_dir / name).read_bytes())
    previous = read_train_config(run) or {}
    record = dict(
        train_args=args.to_dict(), adapter=config.to_dict(), decoding=decoding.to_dict(),
        audio_normalization=processor.audio.to_dict(), text_normalizer=DEFAULT_NORMALIZER.to_dict(),
        model=dict(path=str(model_dir.resolve()),
                   sha256=previous.get("model", {}).get("sha256") or (sha256_file(weights) if weights.is_file() else None),
                   config=model.args.to_dict()),
        manifests=manifests, mlx_version=mx.__version__, mlx_moonshine_version=__version__,
        started=previous.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        resumed=[*previous.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S")] if previous else [],
        **extra)
    atomic_write_json(run / TRAIN_CONFIG, record)


def read_train_config(run: Path) -> Optional[dict]:
    """RUN/train_config.json as `write_run_files` wrote it, or None when `run` holds none.

    Raises:
        CheckpointError: the file is there but not a JSON object.
    """
    path = Path(run) / TRAIN_CONFIG
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # also: not UTF-8
        raise CheckpointError(f"{path}: not valid JSON ({e}); the run cannot be resumed, start a new one") from e
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: not a training run's record (a JSON object); the run cannot be resumed, "
                              "start a new one")
    return record


def write_summary(run: Path, summary: dict) -> None:
    atomic_write_json(Path(run) / "summary.json", summary)
