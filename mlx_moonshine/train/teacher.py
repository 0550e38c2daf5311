"""The frozen base model as the teacher of replay rows: keep what the base does on general speech.

Replaying general English with the manifest's own (lowercase, unpunctuated) texts teaches the adapter the
replay *words* and, as a side effect, a transcript style: every target in training is then lowercase
without punctuation, and the tuned model stops writing "He was not an ill-disposed young man," on any
speech. The base model is free to consult (the same weights before the adapter exists), so:

  * replay targets written by the base itself (`replay_targets="base"`): its own greedy transcripts of
    the replay audio, through the same audio pipeline and `DecodingOptions` as eval, cased and
    punctuated as it writes them. Training on them rewards "do what you did", not "write these words";
  * a distillation term on those rows (`replay_kd > 0`, learning without forgetting): the cross entropy
    of the adapted decoder against the base's token distribution (its top-k, renormalised), which also
    keeps the base's uncertainty where its greedy choice was a close call;
  * `transcript_style="domain"` puts the replay targets into the domain's style instead (lowercase, no
    punctuation), for users who want that style everywhere.

The teacher's outputs are computed once, before the adapters exist, and cached in the run folder
(`replay_targets.jsonl`), so a resumed run reuses them. Under a launcher both are computed in the same
chunks as in one process, the chunks shared out between the processes and the results gathered on all of
them (distributed.World.map_all): the same targets and table as one process, at a fraction of the time.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from ..distributed import world as _world
from ..io import read_jsonl
from .batches import IGNORE, make_batch

TARGETS_FILE = "replay_targets.jsonl"
REPLAY_TARGETS = ("base", "manifest")
STYLES = ("base", "domain")


def domain_style(text: str) -> str:
    """Lowercase, hyphens as spaces, no punctuation but in-word apostrophes: the style of typical ASR corpora."""
    t = text.lower().replace("-", " ")
    t = re.sub(r"[^\w\s']", " ", t)
    t = re.sub(r"(?<!\w)'|'(?!\w)", " ", t)
    return " ".join(t.split())


def base_targets(model, processor, samples, options, run_dir: Optional[Path], style: str = "base",
                 log: Callable[[str], None] = print, store=None) -> list:
    """`samples` with their text replaced by the base model's own transcripts (cached in run_dir, and in
    `store`, a `teacher_cache.TeacherStore`, between runs).

    Rows the base transcribes as empty keep an empty target (the base's "nothing here"); callers keep them,
    since that is behaviour worth preserving too.
    """
    from ..transcription import transcribe_clips

    cache = Path(run_dir) / TARGETS_FILE if run_dir is not None else None
    known: dict[str, str] = {}
    if cache is not None and cache.is_file():
        for row in read_jsonl(cache):  # without the torn line of a run killed mid-append
            if row.get("decoding") == options.to_dict():
                known[row["id"]] = row["text"]
    todo = [s for s in samples if s.id not in known]
    stored = _from_store(lambda: store.targets(todo, options.to_dict()), store, todo)
    if stored:
        log(f"replay targets: {len(stored)} of {len(todo)} from the teacher cache" + _where(store))
        known.update(stored)
        _append_targets(cache, [s for s in todo if s.id in stored], stored, options)
        todo = [s for s in todo if s.id not in stored]
    if todo:
        log(f"replay targets: the base model transcribes {len(todo)} replay clips (its own words, case and "
            "punctuation)")
        chunks = [todo[b:b + 32] for b in range(0, len(todo), 32)]
        texts = _world().map_all(chunks, lambda chunk: [r["text"] for r in transcribe_clips(
            model, processor, [s.audio_path for s in chunk], options)])
        new = {}
        for chunk, chunk_texts in zip(chunks, texts):
            new.update((s.id, text) for s, text in zip(chunk, chunk_texts))
        known.update(new)
        _append_targets(cache, todo, new, options)
        _to_store(lambda: store.add_targets(todo, new, options.to_dict()), store, log)
    restyle = domain_style if style == "domain" else (lambda t: t)
    return [dataclasses.replace(s, text=restyle(known[s.id])) for s in samples]


def _append_targets(cache: Optional[Path], samples, texts: dict, options) -> None:
    """Add the transcripts of `samples` to the run folder's record (read back on resume)."""
    if cache is None or not samples:
        return
    lines = [json.dumps(dict(id=s.id, text=texts[s.id], manifest_text=s.text, decoding=options.to_dict())) + "\n"
             for s in samples]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "a", encoding="utf-8") as f:
        f.writelines(lines)


def _from_store(read: Callable, store, todo):
    """Process 0 reads the teacher cache and every process gets its answer (the same work is left on all)."""
    world = _world()
    return world.broadcast(read() if world.is_main and store is not None and todo else {})  # one process: as is


def _where(store) -> str:
    return f" ({store.folder})" if store is not None else ""


def _to_store(write: Callable, store, log) -> None:
    if store is None or not _world().is_main:
        return
    try:
        write()
    except OSError as e:  # the cache only saves time: a full disk must not stop the run
        log(f"warning: could not write the teacher cache {store.folder}: {e}")


def manifest_targets(samples, style: str = "base") -> list:
    """The replay manifest's own texts, restyled to the domain's style when asked."""
    if style != "domain":
        return list(samples)
    return [dataclasses.replace(s, text=domain_style(s.text)) for s in samples]


@dataclasses.dataclass
class TeacherTable:
    """The base's top-k next-token distribution at every target position of each replay row, in RAM."""

    k: int
    ids: dict = dataclasses.field(default_factory=dict)  # sample id -> (L, k) int32
    probs: dict = dataclasses.field(default_factory=dict)  # sample id -> (L, k) float32, rows sum to 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.ids.values()) + sum(a.nbytes for a in self.probs.values())

    def attach(self, batch: dict, samples) -> dict:
        """Add teacher_ids/teacher_probs (B, L, k) and teacher_mask (B, L) to a training batch; a batch with no
        row of the table stays as it is (`distill_loss` adds nothing there, so it need not compute a term)."""
        if not any(s.id in self.ids for s in samples):
            return batch
        B, L = batch["labels"].shape
        ids = np.zeros((B, L, self.k), np.int32)
        probs = np.zeros((B, L, self.k), np.float32)
        mask = np.zeros((B, L), np.float32)
        for i, s in enumerate(samples):
            if s.id in self.ids:
                n = min(L, self.ids[s.id].shape[0])
                ids[i, :n], probs[i, :n] = self.ids[s.id][:n], self.probs[s.id][:n]
                mask[i, :n] = 1.0
        labels = np.array(batch["labels"])
        mask *= labels != IGNORE
        batch.update(teacher_ids=mx.array(ids), teacher_probs=mx.array(probs), teacher_mask=mx.array(mask))
        return batch


def teacher_table(model, processor, samples, args, k: int = 16, max_len=None, store=None,
                  log: Callable[[str], None] = print) -> TeacherTable:
    """Teacher-forced base distributions over `samples`' targets (call before adapters are applied); rows
    `store` (a `teacher_cache.TeacherStore`) holds are read from it, the others computed and added."""
    table = TeacherTable(k=k)
    stored = _from_store(lambda: {i: (a.tolist(), b.tolist()) for i, (a, b) in
                                  store.table_rows(samples, k, max_len).items()}, store, samples)
    for sid, (ids, probs) in stored.items():
        table.ids[sid] = np.array(ids, np.int32).reshape(-1, k)
        table.probs[sid] = np.array(probs, np.float32).reshape(-1, k)
    if stored:
        log(f"replay teacher: {len(stored)} of {len(samples)} rows from the teacher cache" + _where(store))
    samples = [s for s in samples if s.id not in stored]
    if not samples:
        return table
    was_training = model.training
    model.eval()

    def one(chunk):
        """[(ids, probs)] per row of `chunk`, as lists (gathered between processes exactly)."""
        part = TeacherTable(k=k)
        _teacher_chunk(model, processor, chunk, args, max_len, k, part)
        return [(part.ids[s.id].tolist(), part.probs[s.id].tolist()) for s in chunk]

    chunks = [samples[b:b + 8] for b in range(0, len(samples), 8)]
    for chunk, rows in zip(chunks, _world().map_all(chunks, one)):
        for s, (ids, probs) in zip(chunk, rows):
            table.ids[s.id] = np.array(ids, np.int32).reshape(-1, k)
            table.probs[s.id] = np.array(probs, np.float32).reshape(-1, k)
    model.train(was_training)
    _to_store(lambda: store.add_table_rows(samples, table, k, max_len), store, log)
    return table


def _teacher_chunk(model, processor, chunk, args, max_len, k: int, table: TeacherTable) -> None:
    """Fill `table` with the base's top-k distributions on one chunk of rows (one padded batch)."""
    from .step import forward_logits

    batch = make_batch(chunk, processor, args, max_len=max_len, buckets=False)  # eager: least padding
    logits = forward_logits(model, batch).astype(mx.float32)  # (B, L, V)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    top = mx.argpartition(-logp, kth=k - 1, axis=-1)[..., :k]
    top_logp = mx.take_along_axis(logp, top, axis=-1)
    p = mx.softmax(top_logp, axis=-1)  # renormalised over the top k
    mx.eval(top, p)
    labels = np.array(batch["labels"])
    for i, s in enumerate(chunk):
        n = int((labels[i] != IGNORE).sum())
        table.ids[s.id] = np.array(top[i, :n])
        table.probs[s.id] = np.array(p[i, :n])


def distill_loss(base_loss: Callable, weight: float) -> Callable:
    """`base_loss` plus `weight` x the soft cross entropy against the teacher on rows that carry one.

    loss = (sum of label CE + weight * sum over teacher tokens of -sum_k p_k log q_k) / label tokens,
    so with weight 0 (or no teacher rows) it is exactly `base_loss`.
    """
    from .step import forward_logits, token_cross_entropy

    if weight == 0:
        return base_loss

    def loss(model, batch: dict):
        if "teacher_ids" not in batch:
            return base_loss(model, batch)
        logits = forward_logits(model, batch).astype(mx.float32)
        ce_sum, ntoks = token_cross_entropy(logits, batch["labels"])
        logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logq, batch["teacher_ids"], axis=-1)  # (B, L, k)
        soft = -(batch["teacher_probs"] * picked).sum(axis=-1) * batch["teacher_mask"]
        total = ce_sum + weight * soft.sum()
        return total / mx.maximum(ntoks, 1), ntoks

    return loss


__all__ = ["base_targets", "manifest_targets", "domain_style", "teacher_table", "distill_loss", "TeacherTable"]
