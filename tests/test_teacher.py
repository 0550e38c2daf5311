"""The frozen base as the teacher of replay rows: targets it writes itself, and the distillation term."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import write_tiny_corpus
from mlx_moonshine.train import teacher as teach
from mlx_moonshine.train import trainer as tr
from mlx_moonshine.train.config import TrainArgs
from mlx_moonshine.data import load_manifest
from mlx_moonshine.decoding import DecodingOptions
from mlx_moonshine.loading import load
from mlx_moonshine.train.batches import make_batch
from mlx_moonshine.train.step import default_loss, forward_logits


def _args(**kw):
    base = dict(max_steps=12, lr=1e-2, batch_size=2, warmup_steps=0, eval_every=100, log_every=4,
                val_wer_samples=0, rank=4, alpha=8, dropout=0.0, max_seconds=None, pad_seconds=2.0, compile=False,
                aux_loss_rows=0)
    base.update(kw)
    return TrainArgs(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return {"train": write_tiny_corpus(root, "train", 6, seed=5), "replay": write_tiny_corpus(root, "replay", 6, seed=6)}


def test_domain_style():
    assert teach.domain_style("He was not an ill-disposed young man, Mr. Dashwood's!") == \
        "he was not an ill disposed young man mr dashwood's"


def test_base_targets_are_the_base_transcripts_and_are_cached(tiny_model_dir, corpus, tmp_path, monkeypatch):
    from mlx_moonshine.transcription import transcribe

    model, processor = load(tiny_model_dir)
    rows = load_manifest(corpus["replay"]).samples
    options = DecodingOptions()
    out = teach.base_targets(model, processor, rows, options, tmp_path, log=lambda m: None)
    assert [s.text for s in out] == transcribe(model, processor, [s.audio_path for s in rows], options)
    assert [s.id for s in out] == [s.id for s in rows] and (tmp_path / teach.TARGETS_FILE).is_file()

    def no_decoding(*a, **k):
        raise AssertionError("the cached targets should have been reused")

    monkeypatch.setattr("mlx_moonshine.transcription.transcribe_clips", no_decoding)
    again = teach.base_targets(model, processor, rows, options, tmp_path, style="domain", log=lambda m: None)
    assert [s.text for s in again] == [teach.domain_style(s.text) for s in out]


def _replay_batch(tiny_model_dir, corpus):
    model, processor = load(tiny_model_dir)
    rows = load_manifest(corpus["replay"]).samples[:4]
    args = _args()
    table = teach.teacher_table(model, processor, rows, args, k=4)
    return model, table.attach(make_batch(rows, processor, args), rows), rows, table


def test_weight_zero_is_plain_replay_and_rows_without_teacher_are_untouched(tiny_model_dir, corpus):
    model, batch, _, _ = _replay_batch(tiny_model_dir, corpus)
    assert teach.distill_loss(default_loss, 0.0) is default_loss  # weight 0: exactly the plain loss
    plain, n = default_loss(model, batch)
    masked = dict(batch, teacher_mask=mx.zeros_like(batch["teacher_mask"]))
    kd, n2 = teach.distill_loss(default_loss, 3.0)(model, masked)
    assert kd.item() == plain.item() and n.item() == n2.item()  # rows without a teacher: plain cross entropy
    with_teacher, _ = teach.distill_loss(default_loss, 3.0)(model, batch)
    assert with_teacher.item() > plain.item()  # the soft term is added where the teacher is


def _kl_to_base(model, base, batch):
    """Mean KL(base || model) over the label positions of `batch` (full vocabulary)."""
    lb = forward_logits(base, batch).astype(mx.float32)
    lm = forward_logits(model, batch).astype(mx.float32)
    pb = mx.softmax(lb, axis=-1)
    kl = (pb * (mx.log(pb + 1e-12) - (lm - mx.logsumexp(lm, axis=-1, keepdims=True)))).sum(-1)
    mask = batch["labels"] != -100
    return float((kl * mask).sum().item() / mask.sum().item())


def test_distillation_pulls_the_adapted_model_toward_the_base(tiny_model_dir, corpus, tmp_path):
    """Replay rows whose manifest targets the base does not say: with kd > 0 the tuned model stays closer."""
    base, processor = load(tiny_model_dir)
    base.eval()
    replay = load_manifest(corpus["replay"]).samples
    probe = make_batch(replay[:4], processor, _args())
    kls = {}
    for kd in (0.0, 5.0):
        model, processor = load(tiny_model_dir)
        tr.train(model, processor, load_manifest(corpus["train"]), load_manifest(corpus["train"]),
                 _args(replay_ratio=0.5, replay_targets="manifest", replay_kd=kd), run_dir=tmp_path / f"kd{kd}",
                 replay_set=load_manifest(corpus["replay"]), log=lambda m: None, progress=False)
        model.eval()
        kls[kd] = _kl_to_base(model, base, probe)
    assert kls[5.0] < 0.7 * kls[0.0], kls


# -- the teacher cache: the base's answers kept between runs -----------------------------------------


def test_a_second_run_reads_the_base_answers_from_the_teacher_cache(tiny_model_dir, corpus, tmp_path, monkeypatch):
    from mlx_moonshine.train import teacher_cache

    monkeypatch.setenv(teacher_cache.ENV, str(tmp_path / "store"))
    model, processor = load(tiny_model_dir)
    rows = load_manifest(corpus["replay"]).samples
    options, args = DecodingOptions(), _args()
    store = teacher_cache.open_store(model, processor)
    assert store is not None and store.folder.parent == tmp_path / "store"
    first = teach.base_targets(model, processor, rows, options, tmp_path / "run1", log=lambda m: None, store=store)
    table = teach.teacher_table(model, processor, first, args, k=4, store=store, log=lambda m: None)

    def no_model(*a, **k):
        raise AssertionError("the teacher cache should have answered")

    monkeypatch.setattr("mlx_moonshine.transcription.transcribe_clips", no_model)
    monkeypatch.setattr(teach, "_teacher_chunk", no_model)
    lines = []
    store2 = teacher_cache.open_store(model, processor)  # a new run: a fresh run folder, the same base
    again = teach.base_targets(model, processor, rows, options, tmp_path / "run2", log=lines.append, store=store2)
    table2 = teach.teacher_table(model, processor, again, args, k=4, store=store2, log=lines.append)
    assert [s.text for s in again] == [s.text for s in first]
    assert (tmp_path / "run2" / teach.TARGETS_FILE).read_text().count("\n") == len(rows)  # the run records them
    assert table2.ids.keys() == table.ids.keys()
    for sid in table.ids:
        np.testing.assert_array_equal(table2.ids[sid], table.ids[sid])
        np.testing.assert_array_equal(table2.probs[sid], table.probs[sid])
    assert f"{len(rows)} of {len(rows)} from the teacher cache" in lines[0], lines


def test_the_teacher_cache_misses_on_other_weights_options_or_audio(tiny_model_dir, corpus, tmp_path, monkeypatch):
    from mlx_moonshine.train import teacher_cache

    monkeypatch.setenv(teacher_cache.ENV, str(tmp_path / "store"))
    model, processor = load(tiny_model_dir)
    rows = load_manifest(corpus["replay"]).samples[:3]
    store = teacher_cache.open_store(model, processor)
    teach.base_targets(model, processor, rows, DecodingOptions(), None, log=lambda m: None, store=store)
    assert len(store.targets(rows, DecodingOptions().to_dict())) == 3  # control: a hit
    assert store.targets(rows, DecodingOptions(max_tokens_per_second=3.0).to_dict()) == {}

    moved = tmp_path / "other.wav"  # the same bytes under another path: still a hit; other bytes: a miss
    moved.write_bytes(rows[0].audio_path.read_bytes())
    import dataclasses

    assert len(store.targets([dataclasses.replace(rows[0], audio_path=moved)], DecodingOptions().to_dict())) == 1
    moved.write_bytes(rows[1].audio_path.read_bytes())
    store._clips.clear()
    changed = store.targets([dataclasses.replace(rows[0], audio_path=moved)], DecodingOptions().to_dict())
    assert changed == {rows[0].id: store.targets([rows[1]], DecodingOptions().to_dict())[rows[1].id]}

    from mlx.utils import tree_flatten

    name, w = tree_flatten(model.parameters())[0]  # one weight changed: another fingerprint
    before = teacher_cache.model_fingerprint(model, processor)
    assert teacher_cache.model_fingerprint(model, processor) == before
    model.load_weights([(name, w + 1e-3)], strict=False)
    assert teacher_cache.model_fingerprint(model, processor) != before

    monkeypatch.setenv(teacher_cache.ENV, "off")
    assert teacher_cache.open_store(model, processor) is None


def test_replay_rows_apart_give_the_same_step_as_one_batch(tiny_model_dir, corpus):
    """Domain rows and replay rows as two micro-batches (the domain part carries no teacher arrays): the same
    distillation loss, tokens and adapter update as one padded batch of all of them."""
    import mlx.optimizers as optim

    from mlx_moonshine.adapters.apply import adapter_weights, apply_adapters
    from mlx_moonshine.train.step import Stepper

    domain = load_manifest(corpus["train"]).samples[:2]
    _, _, replay, table = _replay_batch(tiny_model_dir, corpus)
    replay = replay[:2]
    args = _args()
    assert table.attach(make_batch(domain, load(tiny_model_dir)[1], args), domain).keys() == \
        {"tokens", "labels", "audio", "lengths"}  # no row of the table: nothing to attach
    results = []
    for parts in ([domain + replay], [domain, replay]):
        model, processor = load(tiny_model_dir)
        apply_adapters(model, args.adapter_config())
        model.train()
        stepper = Stepper(model, optim.AdamW(learning_rate=1e-2), teach.distill_loss(default_loss, 2.0),
                          compile=False)
        loss, ntoks, _ = stepper([table.attach(make_batch(p, processor, args), p) for p in parts])
        results.append((loss.item(), ntoks.item(), {k: np.array(v) for k, v in adapter_weights(model).items()}))
    (l1, n1, w1), (l2, n2, w2) = results
    assert n1 == n2 and l1 == pytest.approx(l2, rel=1e-5)
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-4, atol=2e-5)
