"""DecodingOptions and the shared decoding loop (greedy, beam, batching, budgets, filters)."""

import json

import numpy as np
import pytest

from mlx_moonshine.decoding import DecodingError, DecodingOptions, decode_batch
from mlx_moonshine.loading import load


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir)


def clips(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [(0.1 * rng.randn(n)).astype(np.float32) for n in lengths]


def test_options_round_trip_through_json_and_validate_once():
    opts = DecodingOptions(beam_size=4, length_penalty=0.6, no_repeat_ngram_size=3)
    assert DecodingOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    with pytest.raises(DecodingError) as e:
        DecodingOptions(beam_size=0, max_tokens_per_second=-1)
    assert "beam_size" in str(e.value) and "max_tokens_per_second" in str(e.value)
    with pytest.raises(DecodingError, match="unknown"):
        DecodingOptions.from_dict({"beam": 2})
    with pytest.raises(Exception):
        opts.beam_size = 2  # frozen


def test_token_budget_follows_the_clip_length():
    opts = DecodingOptions()
    assert opts.token_budget(0.1) == 8  # floor
    assert opts.token_budget(10.0) == 65  # ceil(6.5 * 10)
    assert opts.token_budget(100.0) == 224  # cap


def test_batched_greedy_equals_one_by_one(tiny):
    model, processor = tiny
    audio = clips([16000, 5000, 30000, 9000], seed=1)
    batched = decode_batch(model, processor, audio)
    for a, res in zip(audio, batched):
        (alone,) = decode_batch(model, processor, [a])
        assert res.tokens == alone.tokens


def test_budget_stops_runaway_decoding(tiny):
    model, processor = tiny
    opts = DecodingOptions(max_tokens_per_second=2.0, min_token_budget=1)
    for res, a in zip(decode_batch(model, processor, clips([16000, 32000]), opts), (16000, 32000)):
        assert len(res.tokens) <= opts.token_budget(a / 16000)


def test_beam_search_runs_batched_and_scores(tiny):
    model, processor = tiny
    audio = clips([12000, 7000], seed=2)
    beams = decode_batch(model, processor, audio, DecodingOptions(beam_size=3))
    alone = [decode_batch(model, processor, [a], DecodingOptions(beam_size=3))[0] for a in audio]
    assert [b.tokens for b in beams] == [a.tokens for a in alone]
    assert all(b.score is not None for b in beams)


def test_no_repeat_ngram_blocks_repeats(tiny):
    model, processor = tiny
    opts = DecodingOptions(no_repeat_ngram_size=2, max_tokens_per_second=20.0)
    for res in decode_batch(model, processor, clips([16000, 24000], seed=3), opts):
        pairs = list(zip(res.tokens, res.tokens[1:]))
        assert len(pairs) == len(set(pairs))


def test_suppress_blank_never_returns_empty(tiny):
    model, processor = tiny
    for res in decode_batch(model, processor, clips([4000, 8000], seed=4), DecodingOptions(suppress_blank=True)):
        assert res.tokens


@pytest.mark.parametrize("beam", [1, 3])
def test_compiled_step_gives_the_eager_tokens(tiny, beam):
    # The compiled per-token graph (fixed-capacity KV cache, offset as an array) against the same loop run
    # op by op; rows leaving the batch retrace it at the smaller batch size.
    model, processor = tiny
    audio = clips([16000, 5000, 30000, 9000], seed=5)
    opts = DecodingOptions(beam_size=beam)
    compiled = decode_batch(model, processor, audio, opts)
    eager = decode_batch(model, processor, audio, opts, compile=False)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]


def test_kv_cache_keeps_its_shape_and_grows_in_blocks(tiny):
    import mlx.core as mx

    model, _ = tiny
    memory, valid = model.encode(mx.array(clips([8000])[0][None]))
    cache = model.new_cache(memory, valid)
    shapes = set()
    for t in range(70):
        model.decode(mx.array([[1]]), cache=cache)
        shapes.add(tuple(cache.self_attn[0].keys.shape))
    assert cache.length == 70 and int(cache.offset) == 70
    assert sorted(s[2] for s in shapes) == [64, 128]  # capacity: one block, then a second at token 65
