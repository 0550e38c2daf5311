"""LoRA/DoRA training of Moonshine: teacher-forced cross entropy, AdamW, periodic validation, resume.

    model, processor = load("base-mlx")
    args = TrainArgs(max_steps=300, lr=1e-3, rank=8)
    summary = train(model, processor, train_samples, val_samples, args, run_dir="runs/atc")

One training step sees `batch_size * grad_accum` utterances:
    decoder input = [start] + tokenizer.encode(text)     labels = tokenizer.encode(text) + [eos]
and the loss is the mean cross entropy over the real label tokens of the whole step. Audio goes
through `audio.prepare_audio` (the function transcribe and eval use), is padded with
`audio.pad_batch`, and the model masks the padding from the sample lengths.

`train()` is the loop's parts (parts.py) put together; each can be swapped: `loss(model, batch)`, the
`optimizer` (default: AdamW on the lr schedule), `iterate_batches` (the row order), and `callback`
(every metrics row). `Session` runs the steps, validations, checkpoints and stopping rules and writes
the summary, with a `PhaseClock` saying where the time went (teacher, validation, steps, steps on new
batch shapes, checkpoints).

The step is compiled with explicit state (model, optimizer, RNG) and evaluated once. A step whose
loss or gradient is not finite changes nothing (weights, optimizer moments, step count) and is
counted. The data order is a pure function of (seed, epoch), so a checkpoint only stores where in
the epoch it was (see state.py for the run folder and checkpoints).

When every adapter sits in the decoder and no augmentation is on, the encoder is frozen and
deterministic: its outputs are computed once per utterance and kept in RAM (`EncoderCache`).

Under `mlx.launch` each process trains on its rows of every global batch and the step averages the
processes' token-weighted sums; validation and WER batches are shared out (see distributed.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.optimizers as optim

from ..distributed import world as _world
from ..models import fastmath
from . import state as ts
from .batches import epoch_batches, iterate_batches, make_batch, replay_parts
from .config import TrainArgs, TrainingError
from .parts import PhaseClock, RunRows, adapt, default_optimizer, encoder_caches, replay_teacher, run_rows
from .step import Stepper, default_loss, set_grad_checkpoint, step_compiled
from .teacher import distill_loss
from .validation import validation_pass

# -- the loop -----------------------------------------------------------------------------------


def train(model, processor, train_set, val_set, args: TrainArgs, *, run_dir=None, heldout_set=None,
          replay_set=None, loss: Callable = default_loss, optimizer: Optional[optim.Optimizer] = None,
          iterate_batches=iterate_batches, callback: Optional[Callable[[dict], None]] = None,
          decoding=None, resume: bool = False, log: Callable[[str], None] = print, progress: bool = True,
          record: Optional[dict] = None) -> dict:
    """Train adapters on `model` in place and write the run folder.

    Args:
        model, processor: From `loading.load` (base model, no adapters; with `resume` the adapters come
            from the run's checkpoint).
        train_set, val_set: Manifests or lists of `data.Sample`.
        args: Training arguments.
        run_dir: Run folder (required): adapters, checkpoint/, best/, metrics.jsonl, plots, train_config.json.
        heldout_set: Optional general-speech rows whose loss is tracked (never used for decisions).
        replay_set: Optional general-speech rows mixed into training at `args.replay_ratio`; its first
            `args.aux_loss_rows` rows are held out and their loss joins the early-stopping metric.
        loss: `loss(model, batch) -> (mean loss, tokens)`.
        optimizer: An `mlx.optimizers.Optimizer` for the adapter weights (default: `default_optimizer`);
            with `resume` its state comes from the checkpoint.
        iterate_batches: `iterate_batches(samples, batch_size, shuffle=, seed=)` yielding lists of samples.
        callback: Called with every metrics row (dict).
        decoding: `DecodingOptions` for the val WER (default: greedy, the eval defaults).
        resume: Continue from `run_dir/checkpoint` (exactly where it stopped).
        log: Where progress lines go.
        progress: Show a tqdm bar.
        record: Extra keys for train_config.json (e.g. the paths the CLI was given).

    Returns:
        Summary dict: steps, best (step, val_loss, val_wer), final val loss/WER, skipped steps, timings
        (`phases`: seconds per phase of this session), peak memory, paths.
    """
    from ..decoding import DecodingOptions

    if run_dir is None:
        raise TrainingError("train() needs run_dir, the folder to write the run into")
    run = Path(run_dir)
    decoding = decoding or DecodingOptions()
    rows = run_rows(train_set, val_set, args, heldout_set, replay_set)
    clock = PhaseClock()
    teacher = None
    if rows.replay_train or rows.replay_val:  # the frozen base as the teacher, before any adapter exists
        with clock("teacher"):
            teacher = replay_teacher(model, processor, rows, args, run, decoding, log)
    if teacher is not None:
        loss = distill_loss(loss, args.replay_kd)

    checkpoint, config, n_trainable, optimizer, progress_state = _adapted(model, args, run, resume, optimizer,
                                                                         rows.warnings)
    caches, cache_line = encoder_caches(model, processor, args)
    ts.write_run_files(run, model, processor, args, config, decoding, train_set, val_set, heldout_set, replay_set,
                       extra=dict(n_trainable=int(n_trainable), encoder_cache=bool(caches),
                                  adapter_modules=len(config.modules or []), **(record or {})))
    log(f"adapters: {config.kind} r={config.r} on {len(config.modules or [])} layers, "
        f"{n_trainable:,} trainable parameters")
    log(cache_line)
    for w in rows.warnings:
        log(f"warning: {w}")
    session = Session(model, processor, args, run, rows, loss=loss, optimizer=optimizer, caches=caches,
                      teacher=teacher, decoding=decoding, progress=progress_state, resumed=checkpoint is not None,
                      iterate_batches=iterate_batches, callback=callback, log=log, clock=clock, config=config)
    summary = session.run(show_bar=progress)
    summary.update(n_trainable=int(n_trainable))
    ts.write_summary(run, summary)
    if summary["stop_reason"].startswith("diverged"):
        err = TrainingError(f"training stopped, {summary['stop_reason']}; lower --lr (it was {args.lr:g}), use "
                            f"--dtype float32, or check the data ({run / 'summary.json'} and report.md say so)")
        err.summary = summary  # run_training still writes report.md from it
        raise err
    return summary


def _adapted(model, args: TrainArgs, run: Path, resume: bool, optimizer, warnings: list):
    """The adapters on `model` and the optimizer with its state, fresh or from the run's checkpoint:
    (checkpoint or None, adapter config, trainable parameter count, optimizer, progress)."""
    checkpoint = ts.find_checkpoint(run) if resume else None
    if resume and checkpoint is None:
        raise TrainingError(f"{run}: no checkpoint to resume from (expected {run / ts.CHECKPOINT}/state.json)")
    config, n_trainable = adapt(model, args, checkpoint)
    optimizer = optimizer if optimizer is not None else default_optimizer(args)
    optimizer.init(model.trainable_parameters())
    if checkpoint is not None:
        return checkpoint, config, n_trainable, optimizer, ts.restore(checkpoint, optimizer, model, args, warnings)
    mx.random.seed(args.seed)
    return checkpoint, config, n_trainable, optimizer, ts.TrainProgress()


class Session:
    """One sitting of a run: steps, periodic validation, checkpoints and the stopping rules, then the summary."""

    def __init__(self, model, processor, args: TrainArgs, run: Path, rows: RunRows, *, loss, optimizer, caches,
                 teacher, decoding, progress: ts.TrainProgress, resumed: bool, iterate_batches, callback, log,
                 clock: PhaseClock, config):
        self.model, self.processor, self.args, self.run_dir, self.rows = model, processor, args, run, rows
        self.loss, self.optimizer, self.caches, self.teacher, self.decoding = loss, optimizer, caches, teacher, decoding
        self.p, self.resumed, self.iterate_batches, self.callback, self.log = progress, resumed, iterate_batches, callback, log
        self.clock, self.config = clock, config
        self.world = _world()  # under mlx.launch: this process's share of every global batch (distributed.py)
        self.max_len = model.args.max_position_embeddings
        if args.grad_checkpoint:
            set_grad_checkpoint(model, True)
        self.stepper = Stepper(model, optimizer, loss, compile=step_compiled(args.compile),
                               reduce=self.world.reduce_step if self.world.size > 1 else None)
        self.writer = ts.RunWriter(run, resume_step=progress.step if resumed else None)
        self.shapes: set = set()
        self.window = self._new_window()
        self.batches: list = []
        self._replay_ids = {id(s) for s in rows.replay_train}  # epoch_batches mixes in these very objects

    @staticmethod
    def _new_window() -> dict:
        return dict(loss=0.0, tokens=0, steps=0, seconds=0.0)

    def emit(self, row: dict) -> None:
        self.writer.append(row)
        if self.callback is not None:
            self.callback(row)

    # -- the session --------------------------------------------------------------------------------

    def run(self, show_bar: bool = True) -> dict:
        args, p = self.args, self.p
        self.model.train()
        restore_cache = fastmath.training_cpu_cache()  # None, or the allocator cache limit to restore at the end
        mx.reset_peak_memory()
        self.tic_run = time.perf_counter()
        if not self.resumed and args.eval_every:
            row = self.validate(0)
            p.best = dict(step=0, monitor=row["monitor"], val_loss=row["val_loss"], val_wer=row.get("val_wer"))
            p.first_val = row
            self.emit(row)
            self.log(_val_line(row))
        self.batches = epoch_batches(self.rows.train, args, p.epoch, self.iterate_batches, self.rows.replay_train)
        bar = None
        if show_bar and self.world.is_main:
            from tqdm import tqdm

            bar = tqdm(total=args.max_steps, initial=p.step, desc="train", dynamic_ncols=True, leave=True)
        stop_reason = "max_steps"
        while p.step < args.max_steps:
            value, stop = self.step()
            if stop:
                stop_reason = stop
                break
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value.item():.3f}", lr=f"{self.optimizer.learning_rate.item():.2e}",
                                mem=f"{mx.get_peak_memory() / 2**30:.2f}G", refresh=False)
            if p.step % args.log_every == 0 or p.step == args.max_steps:
                self.log_train()
            if p.step % args.eval_every == 0 or p.step == args.max_steps:
                stop = self.validate_and_keep()
                if stop:
                    stop_reason = stop
                    break
            stop = self.over_budget()
            if stop:
                stop_reason = stop
                break
        if bar is not None:
            bar.close()
        return self.finish(stop_reason, restore_cache)

    def step(self):
        """One optimizer step over the next micro-batches: (loss, stop reason or None)."""
        args, p = self.args, self.p
        tic = time.perf_counter()
        micro = [b for _ in range(args.grad_accum) for b in self._next_batch()]
        shape = tuple(tuple((k, tuple(v.shape)) for k, v in sorted(b.items()) if hasattr(v, "shape"))
                      for b in micro if b is not None)
        value, ntoks, finite = self.stepper(micro)
        p.step += 1
        new_shape = shape not in self.shapes
        self.shapes.add(shape)
        if not finite.item():
            p.skipped += 1
            p.nonfinite_run += 1
            if p.nonfinite_run >= args.max_nonfinite:
                reason = f"diverged: loss or gradient was not finite for {p.nonfinite_run} steps in a row (step {p.step})"
                self.log(reason)
                return value, reason
        else:
            p.nonfinite_run = 0
            self.window["loss"] += value.item()
            self.window["tokens"] += int(ntoks.item())
            self.window["steps"] += 1
        seconds = time.perf_counter() - tic
        self.window["seconds"] += seconds
        # A step on a batch shape not seen before traces (and on the CPU builds kernels) when compiled.
        self.clock.add("new_shape_steps" if new_shape and self.stepper.compiled else "steps", seconds)
        return value, None

    def _next_batch(self) -> list[Optional[dict]]:
        """The next global batch as this process's micro-batches: its domain rows and replay rows apart when
        that saves padding (`replay_parts`), [None] when it has no rows of it."""
        args, p = self.args, self.p
        if p.batch_index >= len(self.batches):
            p.epoch, p.batch_index = p.epoch + 1, 0
            self.batches = epoch_batches(self.rows.train, args, p.epoch, self.iterate_batches, self.rows.replay_train)
        samples, positions = self.world.shard(self.batches[p.batch_index])  # all of it in one process
        aug_seed = (args.seed, p.epoch, p.batch_index) if args.augment_kinds else None
        p.batch_index += 1
        if not samples:
            return [None]
        out = []
        for part, where in replay_parts(samples, positions, lambda s: id(s) in self._replay_ids):
            batch = make_batch(part, self.processor, args, cache=self.caches.get("train"), augment_seed=aug_seed,
                               max_len=self.max_len, positions=where)
            out.append(self.teacher.attach(batch, part) if self.teacher is not None else batch)
        return out

    def log_train(self) -> None:
        args, p, w = self.args, self.p, self.window
        secs = max(w["seconds"], 1e-9)
        n_steps = args.log_every if p.step % args.log_every == 0 else p.step % args.log_every
        self.emit({"step": p.step, "kind": "train", "epoch": p.epoch,
                   "loss": w["loss"] / max(w["steps"], 1) if w["steps"] else float("nan"),
                   "lr": self.optimizer.learning_rate.item(), "it_per_s": n_steps / secs,
                   "tokens_per_s": w["tokens"] / secs, "step_seconds": secs / n_steps,
                   "peak_memory_gb": mx.get_peak_memory() / 2**30, "rss_gb": ts.peak_rss_gb(), "skipped": p.skipped})
        self.window = self._new_window()

    def validate(self, step: int) -> dict:
        """Val loss (+ replay/heldout loss) and val WER at `step`, from one encoder pass per row."""
        t0 = time.perf_counter()
        args, rows = self.args, self.rows
        self.model.eval()
        val = validation_pass(self.model, self.processor, rows.val, self.loss, cache=self.caches.get("val"),
                              max_len=self.max_len, loss_rows=args.val_batches * args.batch_size or None,
                              wer_rows=args.val_wer_samples, options=self.decoding)
        row = {"step": step, "kind": "val", "val_loss": val["loss"]}
        for key, extra in (("replay_loss", rows.replay_val), ("heldout_loss", rows.heldout)):
            if extra:
                row[key] = validation_pass(self.model, self.processor, extra, self.loss,
                                           cache=self.caches.get(key.split("_")[0]), max_len=self.max_len)["loss"]
        if args.val_wer_samples:
            wer = val["wer"]
            row.update(val_wer=wer["wer"], val_cer=wer["cer"], val_wer_n=wer["n"])
        row["monitor"] = row["val_loss"] + row.get("replay_loss", 0.0)
        row["val_seconds"] = round(time.perf_counter() - t0, 2)
        self.clock.add("validation", time.perf_counter() - t0)
        self.model.train()
        return row

    def validate_and_keep(self) -> Optional[str]:
        """Validate, keep the best adapter and a checkpoint; a stop reason when the run should end."""
        p = self.p
        row = self.validate(p.step)
        self.emit(row)
        self.log(_val_line(row))
        with self.clock("checkpoints"):
            if p.best is None or row["monitor"] < p.best["monitor"]:
                p.best = dict(step=p.step, monitor=row["monitor"], val_loss=row["val_loss"], val_wer=row.get("val_wer"))
                p.bad_evals = 0
                ts.save_best(self.run_dir, self.model, self.config)
            else:
                p.bad_evals += 1
            p.last_val = row
            p.elapsed = p.elapsed + time.perf_counter() - self.tic_run
            self.tic_run = time.perf_counter()
            ts.save_checkpoint(self.run_dir, self.model, self.config, self.optimizer, p, self.args)
        reason = None
        if not math.isfinite(row["monitor"]):  # the adapter itself is broken: more steps cannot help
            reason = f"diverged: validation loss is {row['val_loss']} at step {p.step}"
        elif self.args.patience and p.bad_evals >= self.args.patience:
            reason = f"early stop: no improvement in {p.bad_evals} validations"
        if reason:
            self.log(reason)
        return reason

    def over_budget(self) -> Optional[str]:
        args, p = self.args, self.p
        spent = p.elapsed + time.perf_counter() - self.tic_run
        if args.max_minutes is None or not self.world.any(spent > 60 * args.max_minutes) or p.step >= args.max_steps:
            return None
        reason = f"time budget: stopped after {p.step} steps ({spent / 60:.1f} of {args.max_minutes:g} min)"
        self.log(reason)
        return reason

    def finish(self, stop_reason: str, restore_cache) -> dict:
        """The last validation if none was taken at this step, the final checkpoint, plots and the summary."""
        args, p, run = self.args, self.p, self.run_dir
        if args.grad_checkpoint:
            set_grad_checkpoint(self.model, False)
        p.elapsed += time.perf_counter() - self.tic_run
        if p.last_val is None or p.last_val["step"] != p.step:  # resumed after the final step, or max_steps 0
            p.last_val = self.validate(p.step)
        warnings = self.rows.warnings + _health_warnings(p, stop_reason, run / ts.BEST)
        with self.clock("checkpoints"):
            ts.save_checkpoint(run, self.model, self.config, self.optimizer, p, args)
        if self.world.is_main:
            self.writer.plot()
        self.model.eval()
        if restore_cache is not None:
            mx.set_cache_limit(restore_cache)
        train_cache = self.caches.get("train")
        return dict(
            steps=p.step, epochs=p.epoch + p.batch_index / max(len(self.batches), 1), stop_reason=stop_reason,
            skipped_steps=p.skipped, best=p.best, final=p.last_val, first_val=p.first_val,
            train_seconds=round(p.elapsed, 2), encoder_cache=bool(self.caches),
            encoder_cache_mb=round(train_cache.nbytes / 2**20, 1) if train_cache is not None else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 2**30, peak_rss_gb=ts.peak_rss_gb(),
            step_seconds=self.writer.mean_step_seconds(), phases=self.clock.as_dict(), warnings=warnings,
            run_dir=str(run), adapters=str(run / "adapters.safetensors"), best_dir=str(run / ts.BEST))


def _health_warnings(p, stop_reason: str, best_dir: Path) -> list[str]:
    """What report.md and summary.json must say about a run whose numbers went non-finite."""
    out = []
    if stop_reason.startswith("diverged"):
        kept = (f"{best_dir} holds the adapter of step {p.best['step']} (the best validation)"
                if (best_dir / "adapters.safetensors").is_file() and p.best else "no validation improved on step 0")
        out.append(f"training {stop_reason}; {kept}")
    if p.skipped:
        out.append(f"{p.skipped} of {p.step} steps had a non-finite loss or gradient and changed nothing; "
                   "lower --lr or use --dtype float32")
    final = (p.last_val or {}).get("val_loss")
    if final is not None and not math.isfinite(final):
        out.append(f"the final validation loss is {final}: the adapter transcribes nothing useful")
    return out


def _val_line(row: dict) -> str:
    parts = [f"step {row['step']}: val loss {row['val_loss']:.4f}"]
    if "val_wer" in row:
        parts.append(f"val WER {row['val_wer']:.4f} ({row['val_wer_n']} rows)")
    for key in ("replay_loss", "heldout_loss"):
        if key in row:
            parts.append(f"{key.replace('_', ' ')} {row[key]:.4f}")
    return ", ".join(parts) + f" [{row['val_seconds']:.1f} s]"


__all__ = ["train", "Session"]
