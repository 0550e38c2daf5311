"""Moonshine Streaming through the user path of tiny/base: convert, transcribe/decode_batch, adapters,
PEFT export, on a tiny random-init transformers checkpoint (the real streaming weights are not
reachable here). Parity of the network itself is in test_streaming.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before anything imports mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_moonshine.adapters.apply import (AdapterConfig, apply_adapters, find_targets, fuse_model, load_adapters,
                                    save_adapters)
from mlx_moonshine.decoding import DecodingOptions, decode_batch
from mlx_moonshine.loading import convert, load
from mlx_moonshine.models.streaming import StreamingModel
from mlx_moonshine.transcription import transcribe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import write_tiny_tokenizer  # noqa: E402  (tests/ is on sys.path under pytest)

VOCAB = 18  # the tiny word tokenizer: <unk> <s> </s> + 15 words
ENC, DEC = 32, 48  # different widths, so the decoder's adapter `proj` exists


def hf_streaming_model(seed: int = 0):
    config = transformers.MoonshineStreamingConfig(
        encoder_config=dict(hidden_size=ENC, intermediate_size=2 * ENC, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, sliding_windows=[[16, 4], [16, 0]]),
        vocab_size=VOCAB, hidden_size=DEC, intermediate_size=2 * DEC, num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,  # undeclared, but transformers' decoder reads it
    )  # decoder_start_token_id stays None, as in transformers' defaults
    torch.manual_seed(seed)
    model = transformers.MoonshineStreamingForConditionalGeneration(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 2:  # transformers' std-0.02 init decodes one token forever; use unit scale
                std = 1.0 if key.endswith(("embed_tokens.weight", "pos_emb.weight")) else p.shape[1] ** -0.5
                p.copy_(std * torch.randn_like(p))
            elif key.endswith(("gamma", "bias")):  # non-identity norms, so misplaced offsets show
                p.add_(0.1 * torch.randn_like(p))
        head = model.proj_out.weight
        head.mul_(6.0)  # sharp logits: clear argmax margins (ties would make greedy parity flaky)
        head[:2] = 0.0  # never <unk>/<s>
        head[2].mul_(0.5)  # </s> on some clips only
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """What a streaming checkpoint folder holds: save_pretrained of the model and of its processor
    (transformers 5 nests the feature extractor in processor_config.json, no preprocessor_config.json)."""
    path = tmp_path_factory.mktemp("streaming-hf")
    hf_streaming_model().save_pretrained(path)
    write_tiny_tokenizer(path / "tokenizer.json")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                                     bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False,
                                                      return_attention_mask=True)
    transformers.MoonshineStreamingProcessor(extractor, tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mlx_dir(hf_dir, tmp_path_factory) -> Path:
    return convert(str(hf_dir), tmp_path_factory.mktemp("streaming-mlx") / "model", log=lambda m: None)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.MoonshineStreamingForConditionalGeneration.from_pretrained(hf_dir).eval()


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) + 0.1 * rng.standard_normal(t.size)).astype(np.float32)


def hf_logits(hf_model, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():  # an all-ones mask: without one transformers drops the sliding windows
        return hf_model(input_values=torch.from_numpy(x), attention_mask=torch.ones(x.shape, dtype=torch.long),
                        decoder_input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()


IDS = np.array([[1, 5, 9, 12, 3], [1, 7, 3, 17, 2]], dtype=np.int32)


# -- convert ---------------------------------------------------------------------------------------


def test_convert_streaming_checkpoint(hf_dir, mlx_dir, hf_model):
    model, processor = load(mlx_dir)
    assert isinstance(model, StreamingModel) and "proj" in model.model.decoder
    assert processor.start_id == 1 and processor.eos_id == 2  # config's decoder_start_token_id is null
    assert processor.audio.sample_rate == 16000 and processor.audio.normalize is None
    # The written config loads back in transformers as the same config (start id now concrete).
    saved = transformers.AutoConfig.from_pretrained(mlx_dir)
    assert isinstance(saved, transformers.MoonshineStreamingConfig)
    a, b = saved.to_diff_dict(), transformers.AutoConfig.from_pretrained(hf_dir).to_diff_dict()
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert diff == {"decoder_start_token_id": (1, None)}
    assert json.loads((mlx_dir / "preprocessor_config.json").read_text())["sampling_rate"] == 16000
    assert isinstance(transformers.AutoProcessor.from_pretrained(mlx_dir), transformers.MoonshineStreamingProcessor)

    x = np.stack([clip(1.0, 1), clip(1.0, 2)])
    ours = np.array(model(mx.array(x), mx.array(IDS)))
    assert np.abs(ours - hf_logits(hf_model, x, IDS)).max() <= 1e-4

    # A converted folder converts again (MLX conv layout), and half precision casts every weight.
    half_dir = convert(str(mlx_dir), mlx_dir.parent / "half", dtype="float16", log=lambda m: None)
    half, _ = load(half_dir)
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.float16}
    np.testing.assert_allclose(np.array(half(mx.array(x), mx.array(IDS)).astype(mx.float32)), ours,
                               atol=0.1 * np.abs(ours).max())


# -- decoding --------------------------------------------------------------------------------------


def hf_greedy(hf_model, x: np.ndarray, max_new_tokens: int) -> list[int]:
    # transformers cannot frame a trailing partial 5 ms frame (MLX drops it): give it whole frames.
    x = x[: x.size // 80 * 80]
    with torch.no_grad():
        out = hf_model.generate(input_values=torch.from_numpy(x[None]),
                                attention_mask=torch.ones((1, x.size), dtype=torch.long),
                                decoder_start_token_id=1, eos_token_id=2, pad_token_id=0,
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    seq = out[0, 1:].tolist()  # drop the start token; cut at </s>
    return seq[: seq.index(2)] if 2 in seq else seq


def test_greedy_decode_batch_equals_transformers_generate(mlx_dir, hf_model):
    model, processor = load(mlx_dir)
    clips = [clip(1.3, 3), clip(0.55, 4), clip(0.9013, 5)]  # one not a multiple of 80 samples
    options = DecodingOptions(max_tokens_per_second=12.0)
    batched = decode_batch(model, processor, clips, options)
    for c, res in zip(clips, batched):
        alone = decode_batch(model, processor, [c], options)[0]
        assert alone.tokens == res.tokens and alone.truncated == res.truncated
        budget = options.token_budget(c.size / 16000)
        assert res.tokens == hf_greedy(hf_model, c, budget)
        assert 0 < len(res.tokens) <= budget
    assert len({tuple(r.tokens) for r in batched}) > 1  # audio-dependent output, not one fixed loop
    assert transcribe(model, processor, clips[0], options) == batched[0].text


def test_beam_search_batched_equals_alone_and_rescores(mlx_dir):
    model, processor = load(mlx_dir)
    clips = [clip(0.7, 6), clip(1.1, 7)]
    options = DecodingOptions(beam_size=3, max_tokens_per_second=10.0)
    batched = decode_batch(model, processor, clips, options)
    for c, res in zip(clips, batched):
        alone = decode_batch(model, processor, [c], options)[0]
        assert alone.tokens == res.tokens and alone.score == pytest.approx(res.score, abs=1e-4)
        # The incremental score (cache reordered every step) equals a full uncached pass.
        assert res.score == pytest.approx(_mean_logprob(model, c, res.tokens, res.truncated), abs=1e-4)


def _mean_logprob(model, x, tokens, truncated) -> float:
    """Beam search's ranking score (mean log-prob per token, no length penalty) of a hypothesis."""
    seq = [1] + tokens + ([] if truncated else [2])
    logits = model(mx.array(x[None]), mx.array([seq[:-1]], dtype=mx.int32))[0].astype(mx.float32)
    lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return float(lp[np.arange(len(seq) - 1), seq[1:]].sum()) / max(len(tokens), 1)


# -- adapters --------------------------------------------------------------------------------------


def test_find_targets_covers_streaming_attention(mlx_dir):
    model, _ = load(mlx_dir)
    paths = find_targets(model, AdapterConfig(targets=["q_proj", "v_proj"]))
    for stack, block in (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn")):
        for i in range(2):
            for leaf in ("q_proj", "v_proj"):
                assert f"model.{stack}.layers.{i}.{block}.{leaf}" in paths
    assert len(paths) == 12
    mlp = find_targets(model, AdapterConfig(targets=["fc1", "fc2"], scope=["encoder"]))
    assert mlp == [f"model.encoder.layers.{i}.mlp.{f}" for i in range(2) for f in ("fc1", "fc2")]
    cross = find_targets(model, AdapterConfig(targets=["k_proj"], scope=["decoder_cross"], layers=[-1]))
    assert cross == ["model.decoder.layers.1.encoder_attn.k_proj"]


def _ce(model, x, ids):
    logits = model(x, ids[:, :-1])
    return nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:]).mean()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_identity_at_init_then_train_save_load_fuse(kind, mlx_dir, tmp_path):
    model, _ = load(mlx_dir)
    x = mx.array(np.stack([clip(0.6, 8), clip(0.6, 9)]))
    rng = np.random.default_rng(0)
    ids = mx.array(np.concatenate([np.ones((2, 1)), rng.integers(3, VOCAB, (2, 6))], axis=1).astype(np.int32))
    before = np.array(model(x, ids))
    config = AdapterConfig(kind=kind, r=4, alpha=8.0, targets=["q_proj", "v_proj", "fc1"])
    apply_adapters(model, config)
    np.testing.assert_array_equal(np.array(model(x, ids)), before)  # B = 0: exactly the base model
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B", "magnitude") for k in trainable)

    model.train()
    optimizer = optim.SGD(learning_rate=0.05)
    step = nn.value_and_grad(model, _ce)
    losses = []
    for _ in range(5):
        loss, grads = step(model, x, ids)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.1, losses
    tuned = np.array(model(x, ids))
    assert np.abs(tuned - before).max() > 1e-3

    save_adapters(tmp_path / "adapter", model, config)
    fresh, _ = load(mlx_dir)
    load_adapters(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(np.array(fresh(x, ids)), tuned, atol=1e-5)
    fuse_model(fresh)
    np.testing.assert_allclose(np.array(fresh(x, ids)), tuned, atol=1e-3)


# -- PEFT export and the train command --------------------------------------------------------------


def _peft_logits(hf_dir, peft_dir, x, ids):
    peft = pytest.importorskip("peft")
    base = transformers.MoonshineStreamingForConditionalGeneration.from_pretrained(hf_dir).eval()
    return hf_logits(peft.PeftModel.from_pretrained(base, str(peft_dir)).eval(), x, ids)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_export_loads_on_transformers_streaming(kind, hf_dir, mlx_dir, tmp_path):
    from mlx_moonshine.export import peft as export
    model, _ = load(mlx_dir)
    config = AdapterConfig(kind=kind, r=4, alpha=8.0, targets=["q_proj", "v_proj", "fc2"])
    apply_adapters(model, config)
    rng = np.random.default_rng(1)
    for path, layer in ((p, m) for p, m in model.named_modules() if "lora_B" in m):
        layer.lora_B = mx.array(0.1 * rng.standard_normal(layer.lora_B.shape), mx.float32)  # nonzero update
        if "magnitude" in layer:
            layer.magnitude = layer.magnitude * mx.array(1 + 0.1 * rng.standard_normal(layer.magnitude.shape),
                                                         mx.float32)
    adapter = save_adapters(tmp_path / "adapter", model, config)
    out = export.export_peft(adapter, tmp_path / "peft", base_model_name_or_path=str(hf_dir))
    mapping = json.loads((out / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "MoonshineStreamingForConditionalGeneration", mapping

    x = np.stack([clip(0.8, 10), clip(0.8, 11)])
    ours = np.array(model(mx.array(x), mx.array(IDS)))
    base = np.array(load(mlx_dir)[0](mx.array(x), mx.array(IDS)))
    assert np.abs(ours - base).max() > 1e-2  # the adapter really changes the output
    diff = np.abs(_peft_logits(hf_dir, out, x, IDS) - ours).max()
    assert diff <= 1e-3, diff  # ~1e-5 expected


@pytest.mark.slow  # the whole user path, ~7 s
def test_train_cli_then_peft_parity(hf_dir, mlx_dir, tmp_path):
    """convert -> `mlx-moonshine train` (a few steps) -> export peft -> PEFT in transformers."""
    from mlx_moonshine.export import peft as export
    from click.testing import CliRunner

    from conftest import write_tiny_corpus
    from mlx_moonshine import cli

    train = write_tiny_corpus(tmp_path / "data", "train", 4, seed=3)
    cfg = tmp_path / "train.yaml"
    cfg.write_text("compile: false\npad_seconds: 2.0\nval_wer_samples: 0\nmax_seconds: null\nrank: 4\n"
                   "batch_size: 2\nwarmup_steps: 0\neval_every: 3\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(cli.main, ["train", "-c", str(cfg), "--model", str(mlx_dir), "--train", str(train),
                                           "--val", str(train), "--max-steps", "3", "--lr", "0.01",
                                           "--targets", "q_proj,v_proj", "-o", str(run)])
    assert result.exit_code == 0, result.output
    out = export.export_peft(run, tmp_path / "peft")  # the architecture from the run's train_config.json
    mapping = json.loads((out / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "MoonshineStreamingForConditionalGeneration", mapping
    assert mapping["parent_library"].endswith("modeling_moonshine_streaming")

    x = np.stack([clip(0.8, 12), clip(0.8, 13)])
    model, _ = load(mlx_dir, adapter=run)
    ours = np.array(model(mx.array(x), mx.array(IDS)))
    base = np.array(load(mlx_dir)[0](mx.array(x), mx.array(IDS)))
    assert np.abs(ours - base).max() > 1e-4  # three steps moved the adapter off zero
    diff = np.abs(_peft_logits(hf_dir, out, x, IDS) - ours).max()
    assert diff <= 1e-3, diff


def test_encoder_cache_keeps_every_streaming_frame(mlx_dir, tmp_path):
    from mlx_moonshine.train.batches import EncoderCache, load_clips
    from conftest import write_tiny_corpus
    from mlx_moonshine.data import load_manifest

    model, processor = load(mlx_dir)
    samples = list(load_manifest(write_tiny_corpus(tmp_path, "cache", 3, seed=4)).samples)
    memory, valid = EncoderCache(model, processor, pad_seconds=2.0).batch(samples)
    for i, s in enumerate(samples):
        alone, _ = model.encode(mx.array(load_clips([s], processor)[0][None]))
        assert int(np.array(valid[i]).sum()) == alone.shape[1]
        np.testing.assert_allclose(np.array(memory[i, : alone.shape[1]]), np.array(alone[0]), atol=1e-4)
