"""PEFT export/import of our adapters without torch: tensor round trips, run folders, refusals, messages.

The checks against real PEFT and transformers (logit parity) are in test_export.py.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from adapter_helpers import make_adapter, mlx_logits, write_mlx_model
from mlx_moonshine.cli import main
from mlx_moonshine.errors import ModelError
from mlx_moonshine.export import export_peft, import_peft


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(None, MLX model folder): the shape test_export.py's fixture has, without the HF side."""
    return None, write_mlx_model(tmp_path_factory.mktemp("peft-io") / "mlx")


@pytest.mark.parametrize("kind", ["dora", "pissa"])
def test_round_trip_reproduces_tensors(base, tmp_path, kind):
    _, mlx_dir = base
    adapter = make_adapter(mlx_dir, tmp_path / "adapter", kind)
    peft_dir = export_peft(adapter, tmp_path / "peft")
    back = import_peft(peft_dir, tmp_path / "back", model_dir=mlx_dir)
    exported, imported = mx.load(str(peft_dir / "adapter_model.safetensors")), mx.load(str(back / "adapters.safetensors"))
    names = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}
    assert len(exported) == len(imported)
    for key, value in exported.items():
        module = key[len("base_model.model."):]
        leaf = next(n for n in names if module.endswith("." + n))
        ours = imported[module[: -len(leaf) - 1] + "." + names[leaf]]
        assert ours.dtype == mx.float32 and mx.array_equal(ours, value)
    if kind == "dora":  # no conversion: the original tensors come back bit for bit
        original = mx.load(str(adapter / "adapters.safetensors"))
        assert all(mx.array_equal(original[k], imported[k]) for k in imported)
    # PiSSA comes back as a plain rank-2r LoRA on the original base: same model.
    np.testing.assert_allclose(mlx_logits(mlx_dir, back), mlx_logits(mlx_dir, adapter), atol=1e-4, rtol=0)


def test_run_folder_best_and_bad_adapters(base, tmp_path):
    _, mlx_dir = base
    run = make_adapter(mlx_dir, tmp_path / "run", "lora", seed=1)
    make_adapter(mlx_dir, run / "best", "lora", seed=2)
    final, best = export_peft(run, tmp_path / "final"), export_peft(run, tmp_path / "best", best=True)
    a = mx.load(str(final / "adapter_model.safetensors"))
    b = mx.load(str(best / "adapter_model.safetensors"))
    assert not all(mx.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ModelError, match="--best"):
        export_peft(tmp_path / "final", tmp_path / "x", best=True)

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["export", "peft", str(tmp_path / "empty"), "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "adapters.safetensors" in result.output

    # An adapter for another model size: every mismatch in one message, exit 2.
    other = tmp_path / "other"
    other_mlx = write_mlx_model(other / "mlx", hidden_size=48, intermediate_size=40)
    wrong = make_adapter(other_mlx, tmp_path / "wrong")
    result = CliRunner().invoke(main, ["export", "peft", str(wrong), "-o", str(tmp_path / "z"),
                                       "--model", str(mlx_dir)])
    assert result.exit_code == 2
    # 16 modules (encoder q, v, fc1; decoder self q, v, cross q, v, fc1; 2 layers each) x (A, B)
    assert "(32 problems" in result.output and result.output.count("lora_A") == 16
    assert not (tmp_path / "z").exists()

    # Internal inconsistency (rank) is reported without a model too.
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(dict(cfg, r=3)))
    with pytest.raises(ModelError, match="expected \\[3, 32\\]"):
        export_peft(run, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def _peft_dir(tmp_path, base, config_changes=None, extra_tensors=None):
    hf, mlx_dir = base
    adapter = make_adapter(mlx_dir, tmp_path / "a", "dora")
    out = export_peft(adapter, tmp_path / "p", force=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(dict(cfg, **(config_changes or {}))))
    if extra_tensors:
        tensors = dict(mx.load(str(out / "adapter_model.safetensors")), **extra_tensors)
        mx.save_safetensors(str(out / "adapter_model.safetensors"), tensors)
    return out


def test_import_refuses_unsupported_features(base, tmp_path):
    bad = _peft_dir(tmp_path, base, {"peft_type": "IA3", "rank_pattern": {"q_proj": 8}, "bias": "all",
                                     "modules_to_save": ["proj_out"], "target_modules": "nothing.*"},
                    {"base_model.model.model.decoder.embed_tokens.lora_embedding_A": mx.zeros((4, 40)),
                     "base_model.model.model.encoder.conv2.lora_A.weight": mx.zeros((4, 32, 7))})
    with pytest.raises(ModelError) as err:
        import_peft(bad, tmp_path / "out")
    message = str(err.value)
    for word in ("IA3", "rank_pattern", "bias", "modules_to_save", "embedding", "conv2", "nothing.*"):
        assert word in message
    pissa = _peft_dir(tmp_path, base, {"init_lora_weights": "pissa"})
    result = CliRunner().invoke(main, ["import", "peft", str(pissa), "-o", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "path_initial_model_for_weight_conversion" in result.output
    with pytest.raises(ModelError, match="no adapter_model.safetensors"):
        (pissa / "adapter_model.safetensors").unlink()
        import_peft(pissa, tmp_path / "o3")


def test_verify_without_torch_says_how_to_install(base, tmp_path, monkeypatch):
    import sys

    _, mlx_dir = base
    adapter = make_adapter(mlx_dir, tmp_path / "a")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    result = CliRunner().invoke(main, ["export", "peft", str(adapter), "-o", str(tmp_path / "p"), "--verify",
                                       "--model", str(mlx_dir)])
    assert result.exit_code == 2 and "mlx-moonshine[dev]" in result.output
    assert not (tmp_path / "p").exists()


def test_base_model_type_comes_from_the_run_record_first(tmp_path):
    from mlx_moonshine.export.peft import base_model_type

    run, model = tmp_path / "run", tmp_path / "model"
    run.mkdir()
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "moonshine_streaming"}))
    assert base_model_type(run) == "moonshine"  # no record, no model folder: the default
    assert base_model_type(run, model) == "moonshine_streaming"
    (run / "train_config.json").write_text(json.dumps({"model": {"config": {"model_type": "moonshine_streaming"}}}))
    assert base_model_type(run) == "moonshine_streaming"
    (run / "train_config.json").write_text(json.dumps({"model": {"config": {"model_type": "moonshine"}}}))
    assert base_model_type(run, model) == "moonshine"  # the run's record wins over the folder
    for damaged in ('{"model": {"conf', "[]", '{"model": null}', '{"model": {"config": {"model_type": "whisper"}}}'):
        (run / "train_config.json").write_text(damaged)
        assert base_model_type(run, model) == "moonshine_streaming", damaged
