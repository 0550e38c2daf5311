"""LoRA/DoRA training of Moonshine: teacher-forced cross entropy, AdamW, periodic validation, resume.

    model, processor = load("base-mlx")
    args = TrainArgs(max_steps=300, lr=1e-3, rank=8)
    summary = train(model, processor, train_samples, val_samples, args, run_dir="runs/atc")

One training step sees `batch_size * grad_accum` utterances:
    decoder input = [start] + tokenizer.encode(text)     labels = tokenizer.encode(text) + [eos]
and the loss is the mean cross entropy over the real label tokens of the whole step. Audio goes
through `audio.prepare_audio` (the function transcribe and eval use), is padded with
`audio.pad_batch`, and the model masks the padding from the sample lengths.

The step is compiled with explicit state (model, optimizer, RNG) and evaluated once. A step whose
loss or gradient is not finite changes nothing (weights, optimizer moments, step count) and is
counted. The data order is a pure function of (seed, epoch), so a checkpoint only stores where in
the epoch it was (see train_state.py for the run folder and checkpoints).

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
from mlx.utils import tree_flatten

from .. import data as data_lib
from ..models import fastmath
from ..distributed import world as _world
from ..adapters.apply import adapter_layers, apply_adapters, load_adapters
from .teacher import base_targets, distill_loss, manifest_targets, teacher_table
from .batches import AUGMENTS, IGNORE, EncoderCache, load_clips, make_batch, tokenize, use_buckets  # noqa: F401
from .config import TrainArgs, TrainingError, lr_schedule  # noqa: F401  (the loop's inputs; config.py)
from .validation import validation_pass
from .step import Stepper, default_loss, set_grad_checkpoint, step_compiled

# -- validation ---------------------------------------------------------------------------------


def eval_loss(model, processor, samples, args: TrainArgs, loss: Callable = default_loss,
              cache: Optional[EncoderCache] = None, max_batches: int = 0, max_len=None) -> float:
    """Token-weighted mean loss over `samples` (fixed order; the first `max_batches` batches if > 0).

    Under a launcher the batches are shared out between the processes and their values gathered: the
    same batches, the same sum in the same order as in one process.
    """
    batches = list(data_lib.iterate_batches(samples, args.batch_size, shuffle=False))
    if max_batches:
        batches = batches[:max_batches]

    def one(b):
        value, ntoks = loss(model, make_batch(b, processor, args, cache=cache, max_len=max_len, buckets=False))
        mx.eval(value, ntoks)
        return value.item(), ntoks.item()

    total, count = 0.0, 0
    for value, ntoks in _world().map_all(batches, one):
        total += value * ntoks
        count += ntoks
    return total / max(count, 1)


def eval_wer(model, processor, samples, options, batch_size: int = 8) -> dict:
    """Corpus WER/CER of the transcripts `eval` would write for `samples`: the same `transcribe_clips`
    (audio pipeline, <= 20 s splitting, length-sorted batches) and the same decoding options."""
    from ..eval.evaluate import _sample_length
    from ..metrics import corpus_scores, score
    from ..transcription import transcribe_clips

    order = sorted(samples, key=_sample_length)  # the batches `eval` decodes: length-sorted groups

    def one(chunk):
        results = transcribe_clips(model, processor, [s.audio_path for s in chunk], options, batch_size)
        return [dict(score(s.text, res["text"]), id=s.id) for s, res in zip(chunk, results)]

    chunks = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    rows = [r for part in _world().map_all(chunks, one) for r in part]  # decode batches shared out, gathered
    out = corpus_scores(rows)
    out["samples"] = sorted(rows, key=lambda r: r["id"])
    return out


# -- the loop -----------------------------------------------------------------------------------


def _filter_long(samples, max_seconds, name, warnings):
    if max_seconds is None:
        return list(samples)
    kept = [s for s in samples if (s.duration or data_lib.sample_duration(s)) <= max_seconds]
    if len(kept) < len(samples):
        warnings.append(f"{name}: left out {len(samples) - len(kept)} clips longer than {max_seconds:g} s")
    if not kept:
        raise TrainingError(f"{name}: every clip is longer than max_seconds={max_seconds:g}; raise --max-seconds "
                            "(or set max_seconds: null in the -c YAML to keep every clip)")
    return kept


def _samples(x):
    return list(x.samples) if hasattr(x, "samples") else list(x)


def epoch_batches(samples, args: TrainArgs, epoch: int, iterate_batches=data_lib.iterate_batches,
                  replay=None) -> list[list]:
    """The training batches of `epoch`: a pure function of (seed, epoch), replay rows mixed in.

    With replay ratio r, batch k gets round((k+1) * c) - round(k * c) replay rows, c = B * r / (1 - r),
    so replay rows make up a share r of all rows; which rows is a pure function of (seed, epoch, k).
    """
    batches = [list(b) for b in iterate_batches(samples, args.batch_size, shuffle=True, seed=args.seed + epoch)]
    if replay and args.replay_ratio > 0:
        import random

        c = args.batch_size * args.replay_ratio / (1 - args.replay_ratio)
        for k, b in enumerate(batches):
            n = round((k + 1) * c) - round(k * c)
            rng = random.Random(f"replay-{args.seed}-{epoch}-{k}")
            b.extend(rng.sample(replay, min(n, len(replay))))
    return batches


def _replay_teacher(model, processor, replay_train, replay_val, args: TrainArgs, run: Path, decoding, log):
    """Replay rows with their targets (the base's transcripts or the manifest's, restyled as asked) and,
    with `replay_kd` > 0, the base's token distributions on the training rows. The model must be the base."""
    from .teacher_cache import open_store

    rows = replay_val + replay_train
    store = open_store(model, processor) if _world().is_main else None  # the base's answers from earlier runs
    if args.replay_targets == "base":
        rows = base_targets(model, processor, rows, decoding, run, args.transcript_style, log=log, store=store)
    else:
        rows = manifest_targets(rows, args.transcript_style)
    replay_val, replay_train = rows[: len(replay_val)], rows[len(replay_val):]
    teacher = None
    if args.replay_kd > 0 and replay_train:
        teacher = teacher_table(model, processor, replay_train, args, k=args.kd_topk,
                                max_len=model.args.max_position_embeddings, store=store, log=log)
        log(f"replay teacher: base distributions (top {args.kd_topk}) on {len(replay_train)} replay rows, "
            f"{teacher.nbytes / 2**20:.1f} MB, distillation weight {args.replay_kd:g}")
    return replay_train, replay_val, teacher


def train(model, processor, train_set, val_set, args: TrainArgs, *, run_dir=None, heldout_set=None,
          replay_set=None, loss: Callable = default_loss, iterate_batches=data_lib.iterate_batches,
          callback: Optional[Callable[[dict], None]] = None, decoding=None, resume: bool = False,
          log: Callable[[str], None] = print, progress: bool = True, record: Optional[dict] = None) -> dict:
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
        iterate_batches: `iterate_batches(samples, batch_size, shuffle=, seed=)` yielding lists of samples.
        callback: Called with every metrics row (dict).
        decoding: `DecodingOptions` for the val WER (default: greedy, the eval defaults).
        resume: Continue from `run_dir/checkpoint` (exactly where it stopped).
        log: Where progress lines go.
        progress: Show a tqdm bar.
        record: Extra keys for train_config.json (e.g. the paths the CLI was given).

    Returns:
        Summary dict: steps, best (step, val_loss, val_wer), final val loss/WER, skipped steps, timings,
        peak memory, paths.
    """
    from . import state as ts
    from ..decoding import DecodingOptions

    if run_dir is None:
        raise TrainingError("train() needs run_dir, the folder to write the run into")
    run = Path(run_dir)
    world = _world()  # under mlx.launch: this process's share of every global batch (distributed.py)
    progress = progress and world.is_main
    decoding = decoding or DecodingOptions()
    warnings: list[str] = []
    train_samples = _filter_long(_samples(train_set), args.max_seconds, "train", warnings)
    val_samples = _samples(val_set)
    replay_train, replay_val = [], []
    if replay_set is not None:
        rows = _samples(replay_set)
        n_hold = min(args.aux_loss_rows, len(rows) // 4)
        replay_val, replay_train = rows[:n_hold], _filter_long(rows[n_hold:], args.max_seconds, "replay", warnings)
    heldout_rows = _samples(heldout_set)[: args.aux_loss_rows] if heldout_set is not None else []
    if args.replay_ratio > 0 and not replay_train:
        raise TrainingError("replay_ratio > 0 needs a replay set (--replay MANIFEST)")

    # The frozen base as the teacher of replay rows, consulted before any adapter exists (teacher.py).
    teacher = None
    if replay_train or replay_val:
        replay_train, replay_val, teacher = _replay_teacher(model, processor, replay_train, replay_val, args,
                                                            run, decoding, log)
    if teacher is not None:
        loss = distill_loss(loss, args.replay_kd)

    # Model: compute dtype, adapters (fresh, or the checkpoint's), frozen base.
    checkpoint = ts.find_checkpoint(run) if resume else None
    if resume and checkpoint is None:
        raise TrainingError(f"{run}: no checkpoint to resume from (expected {run / ts.CHECKPOINT}/state.json)")
    if args.dtype != "float32":
        from ..loading import cast_model

        cast_model(model, args.dtype)
    if checkpoint is not None:
        config = load_adapters(model, checkpoint)
    else:
        config = args.adapter_config()
        apply_adapters(model, config)
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    in_encoder = [p for p, _ in adapter_layers(model) if ".encoder." in p]
    can_cache = not in_encoder and not args.augment_kinds
    if args.cache_encoder == "on" and not can_cache:
        raise TrainingError("cache_encoder=on needs every adapter in the decoder (scope decoder_self/"
                            f"decoder_cross) and no augmentation; {len(in_encoder)} adapters are in the encoder")
    use_cache = can_cache and args.cache_encoder != "off"
    caches = {}
    if use_cache:
        for name in ("train", "val", "replay", "heldout"):
            caches[name] = EncoderCache(model, processor, args.pad_seconds, buckets=use_buckets(args))
    max_len = model.args.max_position_embeddings

    optimizer = optim.AdamW(learning_rate=lr_schedule(args), weight_decay=args.weight_decay)
    optimizer.init(model.trainable_parameters())
    progress_state = ts.TrainProgress()
    if checkpoint is not None:
        progress_state = ts.restore(checkpoint, optimizer, model, args, warnings)
    else:
        mx.random.seed(args.seed)
    if args.grad_checkpoint:
        set_grad_checkpoint(model, True)
    compile_step = step_compiled(args.compile)
    stepper = Stepper(model, optimizer, loss, compile=compile_step,
                      reduce=world.reduce_step if world.size > 1 else None)

    writer = ts.RunWriter(run, resume_step=progress_state.step if checkpoint is not None else None)
    ts.write_run_files(run, model, processor, args, config, decoding, train_set, val_set, heldout_set,
                       replay_set, extra=dict(n_trainable=int(n_trainable), encoder_cache=use_cache,
                                              adapter_modules=len(config.modules or []), **(record or {})))
    log(f"adapters: {config.kind} r={config.r} on {len(config.modules or [])} layers, "
        f"{n_trainable:,} trainable parameters")
    log("encoder cache: " + ("on (every adapter is in the decoder: frozen encoder outputs are computed once "
                             "per utterance and kept in RAM)" if use_cache else
                             f"off ({'adapters in the encoder' if in_encoder else 'augmentation on' if args.augment_kinds else 'disabled'})"))
    for w in warnings:
        log(f"warning: {w}")

    def emit(row: dict):
        writer.append(row)
        if callback is not None:
            callback(row)

    def validate(step: int) -> dict:
        t0 = time.perf_counter()
        model.eval()
        # One encoder pass per val row serves the val loss and the val WER (train_eval.py).
        val = validation_pass(model, processor, val_samples, loss, cache=caches.get("val"), max_len=max_len,
                              loss_rows=args.val_batches * args.batch_size or None,
                              wer_rows=args.val_wer_samples, options=decoding)
        row = {"step": step, "kind": "val", "val_loss": val["loss"]}
        for key, rows in (("replay_loss", replay_val), ("heldout_loss", heldout_rows)):
            if rows:
                row[key] = validation_pass(model, processor, rows, loss, cache=caches.get(key.split("_")[0]),
                                           max_len=max_len)["loss"]
        if args.val_wer_samples:
            wer = val["wer"]
            row.update(val_wer=wer["wer"], val_cer=wer["cer"], val_wer_n=wer["n"])
        row["monitor"] = row["val_loss"] + row.get("replay_loss", 0.0)
        row["val_seconds"] = round(time.perf_counter() - t0, 2)
        model.train()
        return row

    model.train()
    restore_cache = fastmath.training_cpu_cache()  # None, or the allocator cache limit to restore at the end
    mx.reset_peak_memory()
    p = progress_state
    tic_run = time.perf_counter()
    if checkpoint is None and args.eval_every:
        row = validate(0)
        p.best = dict(step=0, monitor=row["monitor"], val_loss=row["val_loss"], val_wer=row.get("val_wer"))
        p.first_val = row
        emit(row)
        log(_val_line(row))
    batches = epoch_batches(train_samples, args, p.epoch, iterate_batches, replay_train)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_steps, initial=p.step, desc="train", dynamic_ncols=True, leave=True)
    window = dict(loss=0.0, tokens=0, steps=0, seconds=0.0)
    stop_reason = "max_steps"
    while p.step < args.max_steps:
        tic = time.perf_counter()
        micro = []
        for _ in range(args.grad_accum):
            if p.batch_index >= len(batches):
                p.epoch, p.batch_index = p.epoch + 1, 0
                batches = epoch_batches(train_samples, args, p.epoch, iterate_batches, replay_train)
            samples, positions = world.shard(batches[p.batch_index])  # all of it in one process
            aug_seed = (args.seed, p.epoch, p.batch_index) if args.augment_kinds else None
            batch = make_batch(samples, processor, args, cache=caches.get("train"), augment_seed=aug_seed,
                               max_len=max_len, positions=positions) if samples else None
            micro.append(teacher.attach(batch, samples) if teacher is not None and batch is not None else batch)
            p.batch_index += 1
        value, ntoks, finite = stepper(micro)
        p.step += 1
        if not finite.item():
            p.skipped += 1
            p.nonfinite_run += 1
            if p.nonfinite_run >= args.max_nonfinite:
                stop_reason = (f"diverged: loss or gradient was not finite for {p.nonfinite_run} steps in a row "
                               f"(step {p.step})")
                log(stop_reason)
                break
        else:
            p.nonfinite_run = 0
            window["loss"] += value.item()
            window["tokens"] += int(ntoks.item())
            window["steps"] += 1
        window["seconds"] += time.perf_counter() - tic
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.3f}", lr=f"{optimizer.learning_rate.item():.2e}",
                            mem=f"{mx.get_peak_memory() / 2**30:.2f}G", refresh=False)
        if p.step % args.log_every == 0 or p.step == args.max_steps:
            secs = max(window["seconds"], 1e-9)
            n_steps = args.log_every if p.step % args.log_every == 0 else p.step % args.log_every
            emit({"step": p.step, "kind": "train", "epoch": p.epoch,
                  "loss": window["loss"] / max(window["steps"], 1) if window["steps"] else float("nan"),
                  "lr": optimizer.learning_rate.item(), "it_per_s": n_steps / secs,
                  "tokens_per_s": window["tokens"] / secs, "step_seconds": secs / n_steps,
                  "peak_memory_gb": mx.get_peak_memory() / 2**30, "rss_gb": ts.peak_rss_gb(),
                  "skipped": p.skipped})
            window = dict(loss=0.0, tokens=0, steps=0, seconds=0.0)
        if p.step % args.eval_every == 0 or p.step == args.max_steps:
            row = validate(p.step)
            emit(row)
            log(_val_line(row))
            improved = p.best is None or row["monitor"] < p.best["monitor"]
            if improved:
                p.best = dict(step=p.step, monitor=row["monitor"], val_loss=row["val_loss"], val_wer=row.get("val_wer"))
                p.bad_evals = 0
                ts.save_best(run, model, config)
            else:
                p.bad_evals += 1
            p.last_val = row
            p.elapsed = p.elapsed + time.perf_counter() - tic_run
            tic_run = time.perf_counter()
            ts.save_checkpoint(run, model, config, optimizer, p, args)
            if not math.isfinite(row["monitor"]):  # the adapter itself is broken: more steps cannot help
                stop_reason = f"diverged: validation loss is {row['val_loss']} at step {p.step}"
                log(stop_reason)
                break
            if args.patience and p.bad_evals >= args.patience:
                stop_reason = f"early stop: no improvement in {p.bad_evals} validations"
                log(stop_reason)
                break
        spent = p.elapsed + time.perf_counter() - tic_run
        if args.max_minutes is not None and world.any(spent > 60 * args.max_minutes) and p.step < args.max_steps:
            stop_reason = f"time budget: stopped after {p.step} steps ({spent / 60:.1f} of {args.max_minutes:g} min)"
            log(stop_reason)
            break
    if bar is not None:
        bar.close()
    if args.grad_checkpoint:
        set_grad_checkpoint(model, False)
    p.elapsed += time.perf_counter() - tic_run
    if p.last_val is None or p.last_val["step"] != p.step:  # resumed after the final step, or max_steps 0
        p.last_val = validate(p.step)
    warnings += _health_warnings(p, stop_reason, run / ts.BEST)
    ts.save_checkpoint(run, model, config, optimizer, p, args)
    if world.is_main:
        writer.plot()
    model.eval()
    summary = dict(
        steps=p.step, epochs=p.epoch + p.batch_index / max(len(batches), 1), stop_reason=stop_reason,
        skipped_steps=p.skipped, best=p.best, final=p.last_val, first_val=p.first_val,
        train_seconds=round(p.elapsed, 2), n_trainable=int(n_trainable), encoder_cache=use_cache,
        encoder_cache_mb=round(caches["train"].nbytes / 2**20, 1) if use_cache else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 2**30, peak_rss_gb=ts.peak_rss_gb(),
        step_seconds=writer.mean_step_seconds(), warnings=warnings, run_dir=str(run),
        adapters=str(run / "adapters.safetensors"), best_dir=str(run / ts.BEST))
    ts.write_summary(run, summary)
    if restore_cache is not None:
        mx.set_cache_limit(restore_cache)
    if stop_reason.startswith("diverged"):
        err = TrainingError(f"training stopped, {stop_reason}; lower --lr (it was {args.lr:g}), use --dtype float32, "
                            f"or check the data ({run / 'summary.json'} and report.md say so)")
        err.summary = summary  # run_training still writes report.md from it
        raise err
    return summary


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

