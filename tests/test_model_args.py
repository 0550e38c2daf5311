"""Model configs: what needs neither torch nor transformers (the parity files skip without them)."""

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before mlx)
from mlx_moonshine.models.moonshine import ModelArgs

# test_model.py's TINY (imported from there, this file would skip without torch too)
TINY = dict(vocab_size=120, hidden_size=64, intermediate_size=96, encoder_num_hidden_layers=2,
            decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
            max_position_embeddings=64)


def test_config_tolerates_unknown_keys_and_round_trips():
    args = ModelArgs.from_dict(dict(TINY, some_future_field=3, rope_parameters={"rope_theta": 500.0,
                                                                                  "partial_rotary_factor": 0.5}))
    assert args.rope_theta == 500.0 and args.partial_rotary_factor == 0.5
    assert args.encoder_num_key_value_heads == 4
    back = ModelArgs.from_dict(args.to_dict())
    assert back.to_dict() == args.to_dict()
    assert back.to_dict()["some_future_field"] == 3


def test_a_folder_without_config_json_is_named_in_the_error(tmp_path):
    import pytest

    from mlx_moonshine.errors import ModelError
    from mlx_moonshine.loading import load_model

    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)
