"""Training: loss goes down, audio is prepared like eval, encoder cache, exact resume, guards, outputs, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import soundfile as sf
from mlx.utils import tree_flatten

from mlx_moonshine.train import batches, config, step, validation
from mlx_moonshine.train import trainer as tr
from mlx_moonshine.audio import prepare_audio
from mlx_moonshine.data import load_manifest, write_manifest, Sample
from mlx_moonshine.loading import load
from mlx_moonshine.models.moonshine import Model, ModelArgs

TEXTS = ["climb flight level two", "turn left heading three", "contact tower one one eight",
         "descend four thousand", "cleared to land runway two", "hold short runway niner"]
TINY = dict(hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=2, decoder_num_hidden_layers=2,
            encoder_num_attention_heads=2, decoder_num_attention_heads=2, max_position_embeddings=64,
            partial_rotary_factor=0.9)


def _tokenizer_json(path: Path, texts) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model folder plus train/val manifests of synthetic tone clips."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    model_dir.mkdir()
    vocab = _tokenizer_json(model_dir / "tokenizer.json", TEXTS)
    mx.random.seed(0)
    model = Model(ModelArgs(vocab_size=vocab, **TINY))
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (model_dir / "config.json").write_text(json.dumps(model.args.to_dict()))
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000}))
    rng = np.random.default_rng(0)
    samples = []
    (root / "audio").mkdir()
    for i, text in enumerate(TEXTS):
        n = 16000 * (6 + i) // 10  # 0.6 .. 1.1 s
        t = np.arange(n) / 16000
        x = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.01 * rng.standard_normal(n)
        path = root / "audio" / f"c{i}.wav"
        sf.write(path, x.astype(np.float32), 16000)
        samples.append(Sample(id=f"c{i}", audio_path=path, text=text, duration=n / 16000))
    write_manifest(samples, root / "train.jsonl")
    write_manifest(samples[:4], root / "val.jsonl")
    return root


def _args(**kw):
    base = dict(max_steps=12, lr=3e-3, batch_size=2, warmup_steps=2, eval_every=6, log_every=2,
                val_wer_samples=2, rank=4, alpha=8, dropout=0.0, max_seconds=None, pad_seconds=2.0,
                compile=False)  # CPU mx.compile JIT-builds kernels per shape: slow cold; one test covers it
    base.update(kw)
    return config.TrainArgs(**base)


def _train(tiny, run, progress=False, **kw):
    model, processor = load(tiny / "model")
    resume = kw.pop("resume", False)
    args = _args(**kw)
    rows = []
    summary = tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
                       args, run_dir=run, callback=rows.append, resume=resume, log=lambda m: None,
                       progress=progress)
    return summary, rows, model


def _losses(rows):
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_loss_decreases_and_outputs_exist(tiny, tmp_path):
    run = tmp_path / "run"
    summary, rows, _ = _train(tiny, run, max_steps=30, eval_every=15, lr=1e-2)
    losses = _losses(rows)
    assert losses[-1] < 0.75 * losses[0], losses  # a random tiny base: LoRA alone cannot memorise it all
    val = [r for r in rows if r["kind"] == "val"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    for name in ("adapters.safetensors", "adapter_config.json", "best/adapters.safetensors", "metrics.jsonl",
                 "loss.png", "wer.png", "train_config.json", "summary.json", "tokenizer.json",
                 "preprocessor_config.json", "checkpoint/state.json", "checkpoint/optimizer.safetensors",
                 "manifests/train.jsonl", "manifests/val.jsonl"):
        assert (run / name).is_file(), name
    config = json.loads((run / "train_config.json").read_text())
    assert config["manifests"]["train"]["sha256"] and config["decoding"]["beam_size"] == 1
    assert config["model"]["sha256"] and config["train_args"]["rank"] == 4
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in metrics if r["kind"] == "train")
    assert {"loss", "lr", "it_per_s", "tokens_per_s", "peak_memory_gb", "rss_gb"} <= set(train_row)
    assert {"val_loss", "val_wer"} <= set(metrics[0])  # step 0: the base model
    assert summary["steps"] == 30 and summary["skipped_steps"] == 0
    phases = summary["phases"]  # where the time went: every step is counted once, three validations
    assert phases["steps"]["count"] + phases.get("new_shape_steps", {}).get("count", 0) == 30
    assert phases["validation"]["count"] == 3 and phases["checkpoints"]["seconds"] >= 0
    # The run folder is an adapter folder that load() applies.
    model, _ = load(tiny / "model", adapter=run)
    assert any("lora_A" in k for k, _ in tree_flatten(model.parameters()))


def test_train_takes_an_injected_optimizer_and_loss(tiny, tmp_path):
    import mlx.optimizers as optim

    calls = {"update": 0, "loss": 0}

    class CountingSGD(optim.SGD):
        def apply_gradients(self, gradients, parameters):
            calls["update"] += 1
            return super().apply_gradients(gradients, parameters)

    def loss(model, batch):
        calls["loss"] += 1
        return step.default_loss(model, batch)

    model, processor = load(tiny / "model")
    summary = tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
                       _args(max_steps=4, eval_every=4), run_dir=tmp_path / "run", loss=loss,
                       optimizer=CountingSGD(learning_rate=0.5), log=lambda m: None, progress=False)
    assert summary["steps"] == 4 and calls["update"] == 4 and calls["loss"] >= 4  # eager: one trace per call
    sgd = np.array(mx.load(str(tmp_path / "run" / "adapters.safetensors"))[
        next(k for k in mx.load(str(tmp_path / "run" / "adapters.safetensors")) if k.endswith("lora_B"))])
    _, _, adamw = _train(tiny, tmp_path / "adamw", max_steps=4, eval_every=4)
    assert not np.allclose(sgd, np.array(next(v for k, v in tree_flatten(adamw.trainable_parameters())
                                                 if k.endswith("lora_B"))))  # control: the optimizer mattered


def test_training_audio_is_prepare_audio(tiny):
    _, processor = load(tiny / "model")
    samples = load_manifest(tiny / "train.jsonl").samples[:3]
    batch = batches.make_batch(samples, processor, _args())
    audio, lengths = np.array(batch["audio"]), np.array(batch["lengths"])
    for i, s in enumerate(samples):
        ref = prepare_audio(s.audio_path, processor.audio)
        assert lengths[i] == len(ref)
        np.testing.assert_array_equal(audio[i, : len(ref)], ref)
        assert not audio[i, len(ref):].any()
    tokens, labels = np.array(batch["tokens"]), np.array(batch["labels"])
    ids = processor.tokenizer.encode(samples[0].text)
    assert tokens[0, : len(ids) + 1].tolist() == [processor.start_id] + ids
    assert labels[0, : len(ids) + 1].tolist() == ids + [processor.eos_id]
    assert (labels[0, len(ids) + 1:] == batches.IGNORE).all()


def test_encoder_cache_same_loss_curve(tiny, tmp_path):
    kw = dict(scope="decoder_self,decoder_cross", max_steps=10, eval_every=5, log_every=1)
    s_on, rows_on, _ = _train(tiny, tmp_path / "on", cache_encoder="on", **kw)
    s_off, rows_off, _ = _train(tiny, tmp_path / "off", cache_encoder="off", **kw)
    assert s_on["encoder_cache"] and not s_off["encoder_cache"]
    np.testing.assert_allclose(_losses(rows_on), _losses(rows_off), rtol=1e-5, atol=1e-5)
    with pytest.raises(config.TrainingError, match="decoder"):
        _train(tiny, tmp_path / "bad", cache_encoder="on", max_steps=1)


def test_resume_equals_uninterrupted(tiny, tmp_path):
    kw = dict(max_steps=12, eval_every=4, dropout=0.1)  # dropout: the RNG state must resume too
    full, rows_full, _ = _train(tiny, tmp_path / "full", **kw)
    part = tmp_path / "part"
    _train(tiny, part, **dict(kw, max_steps=8, schedule_steps=12))
    resumed, rows_res, _ = _train(tiny, part, resume=True, **kw)
    assert resumed["steps"] == 12
    assert resumed["final"]["val_loss"] == pytest.approx(full["final"]["val_loss"], rel=1e-4)
    metrics = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [r["step"] for r in rows_full if r["kind"] == "train"]


def test_patience_stops_when_validation_stops_improving(tiny, tmp_path):
    def flat(model, batch):  # the same loss everywhere: no validation ever improves on step 0
        value, ntoks = step.default_loss(model, batch)
        return 0.0 * value + 1.0, ntoks

    model, processor = load(tiny / "model")
    summary = tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
                       _args(max_steps=40, eval_every=3, patience=2, val_wer_samples=0), run_dir=tmp_path / "run",
                       loss=flat, log=lambda m: None, progress=False)
    assert summary["steps"] == 6  # validations at steps 3 and 6 both fail to beat step 0
    assert summary["stop_reason"].startswith("early stop")
    assert summary["best"]["step"] == 0
    assert (tmp_path / "run" / "checkpoint").is_dir()


def _cache_limit() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


def test_training_loop_runs_with_the_smaller_allocator_cache(tiny, tmp_path, monkeypatch):
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("the allocator cache is tuned for the CPU backend only")
    monkeypatch.delenv("MLX_MOONSHINE_CPU_CACHE_MB", raising=False)
    seen = []
    model, processor = load(tiny / "model")  # loading sets the inference cache
    before = _cache_limit()
    tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
             _args(max_steps=4, eval_every=4, val_wer_samples=0), run_dir=tmp_path / "run",
             callback=lambda row: seen.append(_cache_limit()), log=lambda m: None, progress=False)
    assert set(seen) == {256 * 2**20}  # inside the loop: 256 MiB (same speed, less resident memory)
    assert _cache_limit() == before  # the inference setting comes back afterwards


def test_nonfinite_batch_skipped_and_counted(tiny, tmp_path):
    def poisoned(model, batch):
        loss, ntoks = step.default_loss(model, batch)
        bad = mx.array(float("nan")) if poisoned.calls in (2, 3) else mx.array(0.0)
        poisoned.calls += 1
        return loss + bad, ntoks

    poisoned.calls = 0
    model, processor = load(tiny / "model")
    args = _args(max_steps=6, eval_every=6, compile=False)
    before = None

    def snapshot(row):
        nonlocal before
        if row["kind"] == "train" and row["step"] == 2:
            from mlx_moonshine.adapters.apply import adapter_weights
            before = {k: np.array(v) for k, v in adapter_weights(model).items()}

    summary = tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
                       args, run_dir=tmp_path / "run", loss=poisoned, callback=snapshot, log=lambda m: None,
                       progress=False)
    assert summary["skipped_steps"] == 2
    assert np.isfinite(summary["final"]["val_loss"])
    with pytest.raises(config.TrainingError, match="not finite for 3 steps"):
        poisoned.calls = -100  # every call poisoned below
        def always_nan(model, batch):
            loss, ntoks = step.default_loss(model, batch)
            return loss * mx.array(float("nan")), ntoks
        model, processor = load(tiny / "model")
        tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
                 _args(max_steps=6, max_nonfinite=3), run_dir=tmp_path / "nan", loss=always_nan,
                 log=lambda m: None, progress=False)


def test_train_args_tolerant_and_checked():
    args = config.TrainArgs.from_dict({"lr": "1e-3", "max-steps": "5", "dora": "true", "unknown": 1,
                                   "targets": ["q_proj", "k_proj"]})
    assert args.lr == 1e-3 and args.max_steps == 5 and args.dora and args.targets == "q_proj,k_proj"
    with pytest.raises(config.TrainingError, match="schedule"):
        config.TrainArgs(schedule="step")


def test_compiled_step_matches_eager(tiny, tmp_path):
    kw = dict(max_steps=4, eval_every=4, log_every=1, val_wer_samples=0, dropout=0.0)
    _, eager, _ = _train(tiny, tmp_path / "eager", compile=False, **kw)
    _, compiled, _ = _train(tiny, tmp_path / "compiled", compile=True, **kw)
    np.testing.assert_allclose(_losses(compiled), _losses(eager), rtol=1e-5, atol=1e-5)


def test_encoder_cache_encodes_each_utterance_once(tiny, tmp_path):
    model, processor = load(tiny / "model")
    calls = []
    encode = model.encode
    model.encode = lambda x, lengths=None: (calls.append(x.shape[0]), encode(x, lengths))[1]
    args = _args(scope="decoder_self,decoder_cross", max_steps=9, eval_every=100, val_wer_samples=0)
    summary = tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
                       args, run_dir=tmp_path / "run", log=lambda m: None, progress=False)
    assert summary["encoder_cache"] and summary["epochs"] >= 2
    assert sum(calls) == len(TEXTS) + 4  # each train clip once over 3 epochs, plus the 4 val clips


def test_cli_precedence_cli_over_yaml_over_defaults(tiny, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlx_moonshine import cli
    from mlx_moonshine.train import run as train_run
    from mlx_moonshine.train.run_options import resolve_args

    seen = {}
    monkeypatch.setattr(train_run, "run_training", lambda cli_opts, **kw: seen.update(cli=cli_opts, **kw) or
                        {"decision": {"criteria": [], "lines": []}, "report": "-"})
    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: 5e-3\nrank: 16\nmax_steps: 7\nmodel: m\ntrain: t.jsonl\nval: v.jsonl\n")
    result = CliRunner().invoke(cli.main, ["train", "-c", str(cfg), "--lr", "0.02", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    args, paths = resolve_args(seen["cli"], seen["config_file"])
    assert args.lr == 0.02 and args.rank == 16 and args.max_steps == 7  # CLI > YAML
    assert args.alpha == config.TrainArgs().alpha and args.targets == "q_proj,v_proj"  # defaults
    assert paths["model"] == "m" and paths["out"] == str(tmp_path / "r")
    with pytest.raises(config.TrainingError, match="--val"):
        resolve_args({"model": "m", "train": "t", "out": "o"})


def test_replay_is_on_by_default_and_can_be_turned_off():
    from mlx_moonshine.train import run_options

    base = {"model": "m", "train": "t", "val": "v", "out": "o"}
    args, paths = run_options.resolve_args(dict(base))
    assert paths["replay"] == str(run_options.BUILTIN_REPLAY) and args.replay_ratio == run_options.DEFAULT_REPLAY_RATIO == 0.5
    assert load_manifest(run_options.BUILTIN_REPLAY).samples  # ships with the package and loads
    args, paths = run_options.resolve_args(dict(base, replay="none"))
    assert paths["replay"] is None and args.replay_ratio == 0.0
    args, paths = run_options.resolve_args(dict(base, replay_ratio=0.0))
    assert paths["replay"] is None and args.replay_ratio == 0.0
    args, paths = run_options.resolve_args(dict(base, replay="my.jsonl"))
    assert paths["replay"] == "my.jsonl" and args.replay_ratio == 0.5
    args, paths = run_options.resolve_args(dict(base, replay_ratio=0.25))
    assert paths["replay"] == str(run_options.BUILTIN_REPLAY) and args.replay_ratio == 0.25


def test_bad_manifest_is_a_clear_cli_error(tiny, tmp_path):
    from click.testing import CliRunner

    from mlx_moonshine import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "missing.wav", "text": "x"}\n')
    result = CliRunner().invoke(cli.main, ["train", "--model", str(tiny / "model"), "--train", str(bad),
                                           "--val", str(tiny / "val.jsonl"), "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "missing.wav" in result.output


def test_run_training_report_and_fuse(tiny, tmp_path):
    from mlx_moonshine.train.run import run_training

    cfg = tmp_path / "t.yaml"
    cfg.write_text("compile: false\npad_seconds: 2.0\nval_wer_samples: 2\nmax_seconds: null\nrank: 4\n")
    out = run_training(dict(model=str(tiny / "model"), train=str(tiny / "train.jsonl"), val=str(tiny / "val.jsonl"),
                            eval_test=str(tiny / "val.jsonl"), heldout=str(tiny / "train.jsonl"),
                            out=str(tmp_path / "run"), max_steps=4, eval_every=2, lr=1e-2),
                       config_file=cfg, fuse=True, log=lambda m: None)
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    for section in ("## Run summary", "## Hypothesis", "## Success criteria", "## Configuration", "## Results",
                    "## Duration", "## Artefacts", "## Decision", "## Warnings"):
        assert section in report
    criteria = {c["role"]: c for c in out["decision"]["criteria"]}
    assert set(criteria) == {"domain", "heldout", "canary"}  # every role is reported, measured or not
    assert criteria["canary"]["passed"] is None and "not measured" in criteria["canary"]["detail"]
    assert not out["decision"]["decision"] and "**not measured**" in report or "**no**" in report
    assert "Decision: yes" not in report and "**yes**" not in report
    assert (run / "fused" / "model.safetensors").is_file() and (run / "eval" / "tuned" / "summary.json").is_file()
    fused, _ = load(run / "fused")
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))


def test_sigkill_then_resume_matches_uninterrupted(tiny, tmp_path):
    cfg = tmp_path / "t.yaml"
    opts = dict(max_steps=40, eval_every=5, log_every=1, lr=3e-3, warmup_steps=2, rank=4, alpha=8, dropout=0.1,
                val_wer_samples=0, max_seconds=None, pad_seconds=2.0, compile=False)
    cfg.write_text("".join(f"{k}: {'null' if v is None else v}\n" for k, v in opts.items()))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlx_moonshine", "train", "--model", str(tiny / "model"), "--replay", "none",
           "--train", str(tiny / "train.jsonl"), "--val", str(tiny / "val.jsonl"), "-c", str(cfg)]
    proc = subprocess.Popen(cmd + ["-o", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        state = run / "checkpoint" / "state.json"
        if state.is_file() and json.loads(state.read_text())["step"] >= 10:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not killed:
        pytest.skip("the run finished before it could be killed")
    done = subprocess.run(cmd + ["--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run / "summary.json").read_text())
    model, processor = load(tiny / "model")
    ref = tr.train(model, processor, load_manifest(tiny / "train.jsonl"), load_manifest(tiny / "val.jsonl"),
                   config.TrainArgs(**opts), run_dir=tmp_path / "ref", log=lambda m: None, progress=False)
    assert resumed["steps"] == 40
    assert resumed["final"]["val_loss"] == pytest.approx(ref["final"]["val_loss"], rel=1e-4)


def test_grad_checkpoint_same_losses(tiny, tmp_path):
    kw = dict(max_steps=3, eval_every=3, log_every=1, val_wer_samples=0)
    _, plain, _ = _train(tiny, tmp_path / "plain", **kw)
    _, ckpt, model = _train(tiny, tmp_path / "ckpt", grad_checkpoint=True, **kw)
    np.testing.assert_allclose(_losses(ckpt), _losses(plain), rtol=1e-5, atol=1e-6)
    assert type(model.model.encoder.layers[0]).__name__ == "EncoderLayer"  # switched off after training


def test_replay_mix_and_augment_are_pure_functions_of_position(tiny):
    samples = load_manifest(tiny / "train.jsonl").samples
    replay = [Sample(id=f"r{i}", audio_path=s.audio_path, text=s.text, duration=s.duration)
              for i, s in enumerate(samples * 5)]
    args = _args(batch_size=2, replay_ratio=0.3)
    a = batches.epoch_batches(samples * 10, args, epoch=1, replay=replay)
    b = batches.epoch_batches(samples * 10, args, epoch=1, replay=replay)
    assert [[s.id for s in x] for x in a] == [[s.id for s in x] for x in b]
    rows = [s for x in a for s in x]
    share = sum(s.id.startswith("r") for s in rows) / len(rows)
    assert abs(share - 0.3) < 0.03
    from mlx_moonshine.train.batches import augment_audio

    x = prepare_audio(samples[0].audio_path)
    kinds = ["noise", "speed", "timemask"]
    y1 = augment_audio(x, kinds, np.random.default_rng([0, 1, 2, 0]))
    y2 = augment_audio(x, kinds, np.random.default_rng([0, 1, 2, 0]))
    np.testing.assert_array_equal(y1, y2)
    assert y1.dtype == np.float32 and not np.array_equal(y1[: len(x)], x[: len(y1)])


def test_replay_rows_are_a_micro_batch_of_their_own_when_that_saves_padding(tiny):
    samples = load_manifest(tiny / "train.jsonl").samples  # 0.6 .. 1.1 s
    long = [Sample(id=f"r{i}", audio_path=s.audio_path, text=s.text, duration=9.0) for i, s in enumerate(samples[:2])]
    alike = [Sample(id=f"q{i}", audio_path=s.audio_path, text=s.text, duration=s.duration)
             for i, s in enumerate(samples[:1])]
    is_replay = lambda s: s.id[0] in "rq"  # noqa: E731
    rows = samples[:2] + long
    parts = batches.replay_parts(rows, [0, 2, 4, 6], is_replay)  # positions as a process's shard has them
    assert [[s.id for s in p] for p, _ in parts] == [["c0", "c1"], ["r0", "r1"]]
    assert [pos for _, pos in parts] == [[0, 2], [4, 6]]  # augmentation seeds follow the rows
    # Alike lengths (one 2 s bucket for all): one batch; no replay rows, or only replay rows: one batch.
    assert len(batches.replay_parts(samples[:2] + alike, [0, 1, 2], is_replay)) == 1
    assert len(batches.replay_parts(samples[:2], [0, 1], is_replay)) == 1
    assert len(batches.replay_parts(long, [0, 1], is_replay)) == 1


def test_grad_accum_equals_one_big_batch(tiny):
    import mlx.optimizers as optim

    from mlx_moonshine.adapters.apply import adapter_weights, apply_adapters

    samples = load_manifest(tiny / "train.jsonl").samples[:4]
    args = _args()
    results = []
    for split in (False, True):
        model, processor = load(tiny / "model")
        apply_adapters(model, args.adapter_config())
        model.train()
        opt = optim.AdamW(learning_rate=1e-2)
        stepper = step.Stepper(model, opt, step.default_loss, compile=False)
        if split:
            micro = [batches.make_batch(samples[:2], processor, args), batches.make_batch(samples[2:], processor, args)]
        else:
            micro = [batches.make_batch(samples, processor, args)]
        loss, ntoks, finite = stepper(micro)
        results.append((loss.item(), ntoks.item(), {k: np.array(v) for k, v in adapter_weights(model).items()}))
    (l1, n1, w1), (l2, n2, w2) = results
    assert n1 == n2 and l1 == pytest.approx(l2, rel=1e-5)
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-4, atol=2e-5)  # Adam step ~ lr * sign(g): tiny g are touchy


def test_bucketed_batches_give_the_same_loss(tiny):
    # Padding to the length buckets (the compiled step's shapes) is masked: the loss does not move.
    from mlx_moonshine.train.batches import AUDIO_BUCKETS, TOKEN_BUCKETS
    from mlx_moonshine.train.step import default_loss

    model, processor = load(tiny / "model")
    samples = load_manifest(tiny / "train.jsonl").samples
    for pair in (samples[:2], samples[3:5]):
        plain = batches.make_batch(pair, processor, _args(compile=False, pad_seconds=0.1))
        bucketed = batches.make_batch(pair, processor, _args(compile=True, pad_seconds=0.1))
        assert bucketed["audio"].shape[1] / 16000 in AUDIO_BUCKETS and bucketed["tokens"].shape[1] in TOKEN_BUCKETS
        assert bucketed["audio"].shape[1] > plain["audio"].shape[1]
        a, b = default_loss(model, plain), default_loss(model, bucketed)
        np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-5)
        assert int(a[1]) == int(b[1])


def test_one_pass_validation_measures_what_the_separate_passes_did(tiny):
    # Val loss (token-weighted mean) and val WER of the same rows, from one encoder pass per row sorted by
    # duration at batch 8, equal the separate passes: loss at the training batch, WER decoded from audio.
    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.train.validation import validation_pass

    model, processor = load(tiny / "model")
    samples = load_manifest(tiny / "train.jsonl").samples
    args = _args()
    one = validation_pass(model, processor, samples, step.default_loss, wer_rows=3, max_len=64)
    np.testing.assert_allclose(one["loss"], validation.eval_loss(model, processor, samples, args, max_len=64), rtol=1e-5)
    separate = validation.eval_wer(model, processor, samples[:3], DecodingOptions())
    assert one["wer"]["samples"] == separate["samples"] and one["wer"]["wer"] == separate["wer"]
    first4 = validation_pass(model, processor, samples, step.default_loss, loss_rows=4, max_len=64)
    np.testing.assert_allclose(first4["loss"], validation.eval_loss(model, processor, samples, args, max_batches=2,
                                                            max_len=64), rtol=1e-5)
    assert "wer" not in first4
