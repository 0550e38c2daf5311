"""Moonshine Streaming in MLX (mlx_moonshine/streaming.py) against transformers, on random weights.

Widths, heads and windows follow the published checkpoints (tiny 320/320, small 620/512,
medium 768/640 encoder/decoder); layers are cut to two and audio to about a second to stay fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before anything imports mlx)
import mlx.core as mx

from mlx_moonshine.models.streaming import StreamingArgs, StreamingModel, frame_lengths

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {
    # name: (encoder width, decoder width, heads); 8 heads in both, 4x MLPs.
    "tiny": (320, 320, 8),
    "small": (620, 512, 8),  # encoder head_dim 77: projections are 616 wide, not 620
    "medium": (768, 640, 8),
}
VOCAB = 512  # real checkpoints use 32768; the head's width does not change the maths


def hf_config(name: str, layers: int = 2):
    enc, dec, heads = SHAPES[name]
    return transformers.MoonshineStreamingConfig(
        encoder_config=dict(hidden_size=enc, intermediate_size=4 * enc, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads,
                            sliding_windows=[[16, 4], [16, 0], [16, 4]][:layers]),
        vocab_size=VOCAB, hidden_size=dec, intermediate_size=4 * dec, num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,  # not a declared field, but transformers' decoder reads it
        decoder_start_token_id=1,
    )


def torch_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.MoonshineStreamingForConditionalGeneration(hf_config(name)).eval()
    # transformers initialises norms to identity and biases to zero; randomise them so that a
    # misplaced unit offset, bias or compression constant cannot hide.
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma") or key.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif "norm" in key:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif key.endswith("log_k"):
                p.fill_(float(np.log(0.6)))
    return model


def to_mlx(tmodel, tmp_path, dtype=None) -> StreamingModel:
    """Through the real loading path: save_pretrained, then `loading.load_model` (config + sanitize)."""
    from mlx_moonshine.loading import load_model

    tmodel.save_pretrained(tmp_path)
    return load_model(Path(tmp_path), dtype)


def audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000) // 80 * 80
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(name, tmp_path):
    tmodel = torch_model(name)
    model = to_mlx(tmodel, tmp_path)
    x = np.stack([audio(1.0, 1), audio(1.0, 2)])
    ids = np.array([[1, 5, 9, 17, 33], [1, 7, 3, 250, 2]], dtype=np.int64)
    with torch.no_grad():
        # An all-ones mask: without one transformers drops the encoder's sliding windows.
        out = tmodel(input_values=torch.from_numpy(x), attention_mask=torch.ones(x.shape, dtype=torch.long),
                     decoder_input_ids=torch.from_numpy(ids))
    memory, valid = model.encode(mx.array(x))
    assert valid is None
    np.testing.assert_allclose(np.array(memory), out.encoder_last_hidden_state.numpy()
                               - tmodel.model.decoder.pos_emb.weight[: memory.shape[1]].detach().numpy(),
                               atol=1e-4)  # transformers adds pos_emb to its encoder output in place
    logits = model(mx.array(x), mx.array(ids.astype(np.int32)))
    diff = np.abs(np.array(logits) - out.logits.numpy()).max()
    print(f"{name}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4


def test_padded_batch_equals_clips_alone(tmp_path):
    model = to_mlx(torch_model("tiny"), tmp_path)
    lengths = [16000, 11237, 4880]  # one not a multiple of 80: its partial 5 ms frame is dropped
    clips = [audio(n / 16000 + 0.01, i)[:n] for i, n in enumerate(lengths)]
    N = max(lengths)
    batch = np.zeros((3, N), np.float32)
    mask = np.zeros((3, N), np.int32)
    for i, c in enumerate(clips):
        batch[i, : len(c)], mask[i, : len(c)] = c, 1
    ids = np.array([[1, 5, 9, 17], [1, 7, 3, 250], [1, 2, 4, 8]], dtype=np.int32)

    memory, valid = model.encode(mx.array(batch), mx.array(mask))
    logits = model(mx.array(batch), mx.array(ids), mx.array(mask))
    np.testing.assert_array_equal(np.array(valid).sum(1), np.array(frame_lengths(mx.array(lengths))))
    by_count, valid_count = model.encode(mx.array(batch), mx.array(lengths))  # (B,) sample counts
    np.testing.assert_array_equal(np.array(valid_count), np.array(valid))
    np.testing.assert_allclose(np.array(by_count), np.array(memory), atol=1e-6)
    for i, c in enumerate(clips):
        alone, none_mask = model.encode(mx.array(c[None]))
        assert none_mask is None
        T = alone.shape[1]
        assert int(np.array(valid)[i].sum()) == T
        np.testing.assert_allclose(np.array(memory)[i, :T], np.array(alone)[0], atol=1e-4)
        ref = model(mx.array(c[None]), mx.array(ids[i : i + 1]))
        np.testing.assert_allclose(np.array(logits)[i], np.array(ref)[0], atol=1e-4)
    # An all-ones mask is the same as no mask (the windows apply either way).
    ones = model(mx.array(batch[:1]), mx.array(ids[:1]), mx.array(np.ones((1, N), np.int32)))
    unmasked = model(mx.array(batch[:1]), mx.array(ids[:1]))
    np.testing.assert_allclose(np.array(ones), np.array(unmasked), atol=1e-5)


def test_cached_decoding_equals_full_recomputation(tmp_path):
    model = to_mlx(torch_model("small"), tmp_path)
    x = np.zeros((2, 12000), np.float32)
    x[0], x[1, :8000] = audio(0.75, 3), audio(0.5, 4)
    mask = (np.arange(12000)[None] < np.array([[12000], [8000]])).astype(np.int32)
    ids = np.array([[1, 5, 9, 17, 33, 2, 40], [1, 7, 3, 250, 2, 11, 12]], dtype=np.int32)
    full = np.array(model(mx.array(x), mx.array(ids), mx.array(mask)))

    memory, valid = model.encode(mx.array(x), mx.array(mask))
    # Without a cache: one uncached pass, the same as the forward.
    uncached, none = model.decode(mx.array(ids), memory, valid)
    np.testing.assert_allclose(np.array(uncached), full, atol=1e-5)
    assert none is None
    # Token by token on a cache from new_cache (cross K/V computed once).
    steps, cache = [], model.new_cache(memory, valid)
    for t in range(ids.shape[1]):
        logits, cache = model.decode(mx.array(ids[:, t : t + 1]), memory, valid, cache)
        steps.append(np.array(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)
    assert cache.offset == ids.shape[1]
    # A prompt of 3 in one call, then one at a time, on a cache from new_cache.
    cache = model.new_cache(memory, valid)
    first, cache = model.decode(mx.array(ids[:, :3]), cache=cache)
    rest = [np.array(model.decode(mx.array(ids[:, t : t + 1]), cache=cache)[0])
            for t in range(3, ids.shape[1])]
    np.testing.assert_allclose(np.concatenate([np.array(first)] + rest, axis=1), full, atol=1e-4)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_precision_runs(name, tmp_path):
    dtype = getattr(mx, name)
    tmodel = torch_model("tiny")
    ref = to_mlx(tmodel, tmp_path)
    model = to_mlx(tmodel, tmp_path, dtype=name)
    x = mx.array(audio(1.0, 5)[None])
    ids = mx.array([[1, 5, 9]], dtype=mx.int32)
    logits = model(x, ids)
    assert logits.dtype == dtype and logits.shape == (1, 3, VOCAB)
    out = np.array(logits.astype(mx.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.array(ref(x, ids)), atol=0.1, rtol=0.05)
    step, cache = model.decode(ids[:, :1], *model.encode(x))
    assert np.isfinite(np.array(step.astype(mx.float32))).all()


def test_args_from_nested_config_tolerate_unknown_keys():
    config = hf_config("medium").to_dict()
    config["some_future_key"] = 3
    config["encoder_config"]["another"] = "x"
    args = StreamingArgs.from_dict(config)
    assert args.model_type == "moonshine_streaming"
    assert args.encoder_config.hidden_size == 768 and args.hidden_size == 640
    assert args.encoder_config.sliding_windows == [(16, 4), (16, 0)]
    assert args.partial_rotary_factor == 0.8 and args.decoder_start_token_id == 1
    assert args.extra["some_future_key"] == 3
    # transformers leaves decoder_start_token_id None by default: fall back to bos.
    assert StreamingArgs.from_dict({"bos_token_id": 1}).decoder_start_token_id == 1
