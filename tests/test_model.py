"""The MLX model against transformers (random tiny configs) and against itself (padding, cache, dtypes)."""

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx

from mlx_moonshine.models.moonshine import Model, ModelArgs, frame_lengths

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=120, hidden_size=64, intermediate_size=96, encoder_num_hidden_layers=2,
            decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
            max_position_embeddings=64)
CONFIGS = {
    "tiny-like": dict(TINY, partial_rotary_factor=0.9),
    "base-like-padded-head": dict(TINY, hidden_size=52 * 2, encoder_num_attention_heads=2,
                                  decoder_num_attention_heads=2, pad_head_dim_to_multiple_of=8,
                                  partial_rotary_factor=0.62),
    "untied-bias": dict(TINY, tie_word_embeddings=False, attention_bias=True),
}


def torch_model(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.MoonshineConfig(**cfg)
    model = transformers.MoonshineForConditionalGeneration(config).eval()
    # Random init leaves LayerNorm/GroupNorm at identity; perturb so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def mlx_from_torch(tmodel, cfg: dict, **overrides) -> Model:
    model = Model(ModelArgs.from_dict(dict(tmodel.config.to_dict(), **overrides)))
    weights = {k: mx.array(v.detach().numpy()) for k, v in tmodel.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    model.eval()
    return model


def clips(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [(0.1 * rng.randn(n)).astype(np.float32) for n in lengths]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = CONFIGS[name]
    tmodel = torch_model(cfg)
    model = mlx_from_torch(tmodel, cfg)
    x = np.stack(clips([12000, 12000]))
    ids = np.array([[1, 5, 6, 7, 8], [1, 9, 3, 2, 4]])
    with torch.no_grad():
        ref = tmodel(input_values=torch.tensor(x), decoder_input_ids=torch.tensor(ids)).logits.numpy()
    out = np.array(model(mx.array(x), mx.array(ids)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_gqa_matches_transformers_with_shared_heads():
    # transformers 5.x cannot run GQA Moonshine (it reshapes queries with the kv-head count). A GQA model
    # equals an MHA model whose k/v heads are repeated per group, so compare against that.
    cfg = dict(TINY, partial_rotary_factor=0.9)
    tmodel = torch_model(cfg, seed=1)
    n_rep, head_dim = 2, cfg["hidden_size"] // cfg["encoder_num_attention_heads"]
    sd = tmodel.state_dict()
    with torch.no_grad():
        for key, w in sd.items():
            if key.endswith(("k_proj.weight", "v_proj.weight")):
                heads = w.view(-1, head_dim, w.shape[-1])
                shared = heads[::n_rep].repeat_interleave(n_rep, dim=0)
                w.copy_(shared.reshape(w.shape))
    model = Model(ModelArgs.from_dict(dict(tmodel.config.to_dict(), encoder_num_key_value_heads=2,
                                           decoder_num_key_value_heads=2)))
    weights = {}
    for k, v in sd.items():
        v = v.numpy()
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            v = v.reshape(-1, head_dim, v.shape[-1])[::n_rep].reshape(-1, v.shape[-1])
        weights[k] = mx.array(v)
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    assert model.model.encoder.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    x = np.stack(clips([9000]))
    ids = np.array([[1, 5, 6, 7]])
    with torch.no_grad():
        ref = tmodel(input_values=torch.tensor(x), decoder_input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(model(mx.array(x), mx.array(ids))), ref, atol=1e-4, rtol=0)


def test_padded_batch_equals_one_by_one():
    cfg = CONFIGS["tiny-like"]
    model = mlx_from_torch(torch_model(cfg), cfg)
    lengths = [16000, 5000, 9123]
    audio = clips(lengths, seed=3)
    ids = np.array([[1, 5, 6, 7]] * 3)
    x = np.zeros((3, max(lengths)), np.float32)
    mask = np.zeros_like(x, dtype=np.int32)
    for i, a in enumerate(audio):
        x[i, : len(a)] = a
        mask[i, : len(a)] = 1
    batched = np.array(model(mx.array(x), mx.array(ids), attention_mask=mx.array(mask)))
    for i, a in enumerate(audio):
        alone = np.array(model(mx.array(a[None]), mx.array(ids[i: i + 1])))
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-4, rtol=0)


def test_groupnorm_statistics_ignore_padding():
    # A short clip padded to a long batch: transformers' GroupNorm would see the zeros; ours must not.
    cfg = CONFIGS["tiny-like"]
    model = mlx_from_torch(torch_model(cfg), cfg)
    (a,) = clips([3000], seed=4)
    x = np.zeros((1, 40000), np.float32)
    x[0, :3000] = a
    memory_pad, valid = model.encode(mx.array(x), mx.array([3000]))
    memory_alone, _ = model.encode(mx.array(a[None]))
    n = memory_alone.shape[1]
    assert int(valid.sum()) == n == int(frame_lengths(mx.array([3000])).item())
    np.testing.assert_allclose(np.array(memory_pad[:, :n]), np.array(memory_alone), atol=1e-5)


def test_cached_decoding_equals_full_recomputation():
    cfg = CONFIGS["base-like-padded-head"]
    model = mlx_from_torch(torch_model(cfg), cfg)
    (a,) = clips([11000], seed=5)
    ids = mx.array([[1, 7, 3, 9, 4, 4, 8]])
    memory, valid = model.encode(mx.array(a[None]))
    full, _ = model.decode(ids, memory, valid)
    cache = model.new_cache(memory, valid)
    # Two tokens at once, then one at a time: both cache paths.
    steps = [model.decode(ids[:, :2], cache=cache)[0]]
    for t in range(2, ids.shape[1]):
        steps.append(model.decode(ids[:, t: t + 1], cache=cache)[0])
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_close_to_fp32(dtype):
    from mlx_moonshine.loading import cast_model

    cfg = CONFIGS["tiny-like"]
    tmodel = torch_model(cfg)
    ref_model, model = mlx_from_torch(tmodel, cfg), mlx_from_torch(tmodel, cfg)
    cast_model(model, dtype)
    x = mx.array(np.stack(clips([8000])))
    ids = mx.array([[1, 5, 6]])
    out = model(x, ids)
    assert out.dtype == getattr(mx, dtype)
    ref = np.array(ref_model(x, ids))
    assert np.isfinite(np.array(out.astype(mx.float32))).all()
    assert np.abs(np.array(out.astype(mx.float32)) - ref).max() < 0.1 * np.abs(ref).max() + 0.05
