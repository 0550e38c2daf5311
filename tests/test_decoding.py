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


def forced_scores(model, monkeypatch, eos_first: bool = False):
    """Make the head ignore the audio: a fixed preference 5 > 6 > 7 > ... over the vocabulary (</s> last,
    or first when `eos_first`), so a filter's effect is certain, not an accident of random weights."""
    import mlx.core as mx

    vocab = model.args.vocab_size
    bias = -np.arange(vocab, dtype=np.float32) / vocab
    bias[:5] = -10.0
    bias[2] = 10.0 if eos_first else -10.0  # </s>
    fixed = mx.array(bias)
    monkeypatch.setattr(model, "logits", lambda hidden: mx.zeros(hidden.shape[:-1] + (vocab,)) + fixed)


def test_budget_stops_runaway_decoding(tiny, monkeypatch):
    model, processor = tiny
    forced_scores(model, monkeypatch)  # never picks </s>: only the budget ends a row
    audio = clips([16000, 32000])
    small = DecodingOptions(max_tokens_per_second=2.0, min_token_budget=1)
    for res, a in zip(decode_batch(model, processor, audio, small, compile=False), audio):
        assert len(res.tokens) == small.token_budget(len(a) / 16000) == 2 * len(a) // 16000
    # Control: a larger budget really lets the same rows run longer.
    for res, a in zip(decode_batch(model, processor, audio, DecodingOptions(), compile=False), audio):
        assert len(res.tokens) == DecodingOptions().token_budget(len(a) / 16000) > small.token_budget(len(a) / 16000)


def test_beam_search_runs_batched_and_scores(tiny):
    model, processor = tiny
    audio = clips([12000, 7000], seed=2)
    beams = decode_batch(model, processor, audio, DecodingOptions(beam_size=3))
    alone = [decode_batch(model, processor, [a], DecodingOptions(beam_size=3))[0] for a in audio]
    assert [b.tokens for b in beams] == [a.tokens for a in alone]
    assert all(b.score is not None for b in beams)


def test_no_repeat_ngram_blocks_repeats(tiny, monkeypatch):
    model, processor = tiny
    forced_scores(model, monkeypatch)  # greedy alone writes 5 5 5 5 ...
    audio = clips([16000, 24000], seed=3)
    plain = decode_batch(model, processor, audio, DecodingOptions(), compile=False)
    assert all(len(set(zip(r.tokens, r.tokens[1:]))) < len(r.tokens) - 1 for r in plain)  # control: repeats
    opts = DecodingOptions(no_repeat_ngram_size=2)
    for res in decode_batch(model, processor, audio, opts, compile=False):
        pairs = list(zip(res.tokens, res.tokens[1:]))
        assert len(pairs) > 4 and len(pairs) == len(set(pairs))


def test_suppress_blank_never_returns_empty(tiny, monkeypatch):
    model, processor = tiny
    forced_scores(model, monkeypatch, eos_first=True)  # greedy alone ends at once: empty transcripts
    audio = clips([4000, 8000], seed=4)
    assert all(not r.tokens for r in decode_batch(model, processor, audio, DecodingOptions(), compile=False))
    for res in decode_batch(model, processor, audio, DecodingOptions(suppress_blank=True), compile=False):
        assert res.tokens


@pytest.mark.parametrize("beam", [1, 3])
def test_compiled_step_gives_the_eager_tokens(tiny, beam):
    # The compiled per-token graph (fixed-capacity KV cache, offset as an array) against the same loop run
    # op by op; rows leaving the batch retrace it at the smaller batch size.
    model, processor = tiny
    audio = clips([16000, 5000, 30000, 9000], seed=5)
    opts = DecodingOptions(beam_size=beam)
    from mlx_moonshine.decoding import decode_step

    model._decode_step = None  # a fresh step: its first call runs step 0 eagerly and primes it
    compiled = decode_batch(model, processor, audio, opts)
    assert decode_step(model).primed
    again = decode_batch(model, processor, audio, opts)  # primed: every step compiled, step 0 included
    eager = decode_batch(model, processor, audio, opts, compile=False)
    assert [r.tokens for r in compiled] == [r.tokens for r in again] == [r.tokens for r in eager]


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
