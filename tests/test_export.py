"""PEFT export/import, fuse and Hugging Face export against PEFT and transformers (tiny random models).

The same tiny weights exist on both sides: a transformers model saved with save_pretrained, converted
to MLX. Adapters get random nonzero B (and magnitude), so parity checks see the update.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_tiny_tokenizer
from mlx_moonshine.adapters.apply import AdapterConfig, adapter_layers, apply_adapters, save_adapters
from mlx_moonshine.cli import main
from mlx_moonshine.errors import ModelError, MoonshineError
from mlx_moonshine.export import export_hf, export_peft, import_peft
from mlx_moonshine.loading import convert, load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=48, encoder_num_hidden_layers=2,
            decoder_num_hidden_layers=2, encoder_num_attention_heads=2, decoder_num_attention_heads=2,
            max_position_embeddings=64, partial_rotary_factor=0.62, pad_head_dim_to_multiple_of=8)
KINDS = {"lora": ("lora", "default"), "dora": ("dora", "default"), "pissa": ("lora", "pissa"),
         "dora-pissa": ("dora", "pissa")}


def _tiny_hf(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.MoonshineForConditionalGeneration(transformers.MoonshineConfig(**dict(TINY, **overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF checkpoint folder, MLX model folder) of the same tiny random Moonshine."""
    root = tmp_path_factory.mktemp("export-base")
    hf = _tiny_hf(root / "hf")
    return hf, convert(str(hf), root / "mlx", log=lambda m: None)


def make_adapter(model_dir, out, kind="lora", seed=1):
    """A saved adapter on q/v/fc1 everywhere with random nonzero B (and magnitude) -> folder."""
    adapter_kind, init = KINDS[kind]
    model, _ = load(model_dir)
    config = AdapterConfig(kind=adapter_kind, r=4, alpha=6.0, init=init, targets=["q_proj", "v_proj", "fc1"],
                           use_rslora=kind == "pissa", seed=seed)
    apply_adapters(model, config)
    rng = np.random.default_rng(seed)
    for _, layer in adapter_layers(model):
        layer.lora_B = layer.lora_B + mx.array(0.05 * rng.standard_normal(layer.lora_B.shape), mx.float32)
        if "magnitude" in layer:
            layer.magnitude = layer.magnitude * mx.array(1 + 0.1 * rng.standard_normal(layer.magnitude.shape),
                                                         mx.float32)
    return save_adapters(out, model, config)


def inputs(seed=0):
    x = (0.1 * np.random.default_rng(seed).standard_normal((1, 9000))).astype(np.float32)
    return x, np.array([[1, 5, 7, 3, 9, 11]], np.int32)


def mlx_logits(model_dir, adapter=None):
    model, _ = load(model_dir, adapter=adapter)
    x, ids = inputs()
    return np.array(model(mx.array(x), mx.array(ids)))


def torch_logits(model):
    x, ids = inputs()
    with torch.no_grad():
        return model(input_values=torch.from_numpy(x), decoder_input_ids=torch.from_numpy(ids.astype(np.int64)),
                     use_cache=False).logits.numpy()


@pytest.mark.parametrize("kind", ["lora", "dora", "pissa", pytest.param("dora-pissa", marks=pytest.mark.slow)])
def test_peft_loads_export_with_parity(base, tmp_path, kind):
    peft = pytest.importorskip("peft")
    hf, mlx_dir = base
    adapter = make_adapter(mlx_dir, tmp_path / "adapter", kind)
    out = export_peft(adapter, tmp_path / "peft", base_model_name_or_path=str(hf))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] is None and cfg["init_lora_weights"] is True and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"][0] == "model.encoder.layers.0.self_attn.q_proj"
    assert cfg["r"] == (8 if "pissa" in kind else 4)

    expected = mlx_logits(mlx_dir, adapter)
    # PiSSA's MLX base is the residual; PEFT gets the ORIGINAL checkpoint.
    tbase = transformers.MoonshineForConditionalGeneration.from_pretrained(hf).eval()
    pm = peft.PeftModel.from_pretrained(tbase, str(out)).eval()
    # The file holds exactly what PEFT itself would save, and every tensor is used.
    ours = mx.load(str(out / "adapter_model.safetensors"))
    canonical = peft.get_peft_model_state_dict(pm)
    assert {k: tuple(v.shape) for k, v in canonical.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert np.abs(torch_logits(pm) - expected).max() <= 1e-4
    assert np.abs(torch_logits(pm.merge_and_unload()) - expected).max() <= 1e-4


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


def test_export_hf_and_fuse_match_mlx(base, tmp_path):
    hf, mlx_dir = base
    adapter = make_adapter(mlx_dir, tmp_path / "adapter", "pissa")
    expected = mlx_logits(mlx_dir, adapter)
    out = export_hf(mlx_dir, tmp_path / "hf-out", adapter=adapter)
    tmodel = transformers.MoonshineForConditionalGeneration.from_pretrained(out).eval()
    assert np.abs(torch_logits(tmodel) - expected).max() <= 1e-4
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.decode([5, 6], skip_special_tokens=True).strip()

    fused = CliRunner().invoke(main, ["fuse", "--model", str(mlx_dir), "--adapter", str(adapter),
                                      "-o", str(tmp_path / "fused")])
    assert fused.exit_code == 0, fused.output
    np.testing.assert_allclose(mlx_logits(tmp_path / "fused"), expected, atol=1e-5, rtol=0)
    again = CliRunner().invoke(main, ["fuse", "--model", str(mlx_dir), "--adapter", str(adapter),
                                      "-o", str(tmp_path / "fused")])
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.slow
def test_untied_head_exports(tmp_path):
    hf = _tiny_hf(tmp_path / "hf", seed=3, tie_word_embeddings=False, attention_bias=True)
    mlx_dir = convert(str(hf), tmp_path / "mlx", log=lambda m: None)
    out = export_hf(mlx_dir, tmp_path / "out")
    assert "proj_out.weight" in mx.load(str(out / "model.safetensors"))
    tmodel = transformers.MoonshineForConditionalGeneration.from_pretrained(out).eval()
    assert np.abs(torch_logits(tmodel) - mlx_logits(mlx_dir)).max() <= 1e-4


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
    other_mlx = convert(str(_tiny_hf(other / "hf", hidden_size=48, intermediate_size=40)), other / "mlx",
                        log=lambda m: None)
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


@pytest.mark.slow
def test_cli_verify_both_exports(base, tmp_path):
    pytest.importorskip("peft")
    _, mlx_dir = base
    adapter = make_adapter(mlx_dir, tmp_path / "a", "dora-pissa")
    result = CliRunner().invoke(main, ["export", "peft", str(adapter), "-o", str(tmp_path / "p"), "--verify",
                                       "--model", str(mlx_dir)])
    assert result.exit_code == 0, result.output
    assert "PEFT parity" in result.output
    result = CliRunner().invoke(main, ["export", "hf", "--model", str(mlx_dir), "--adapter", str(adapter),
                                       "-o", str(tmp_path / "h"), "--verify"])
    assert result.exit_code == 0, result.output
    assert "transformers parity" in result.output


def test_verify_rejects_a_wrong_export(base, tmp_path):
    pytest.importorskip("peft")
    from mlx_moonshine.export.verify import ParityError, verify_peft

    _, mlx_dir = base
    adapter = make_adapter(mlx_dir, tmp_path / "a", "lora", seed=1)
    other = export_peft(make_adapter(mlx_dir, tmp_path / "b", "lora", seed=5), tmp_path / "p")
    with pytest.raises(ParityError, match="max \\|logits diff\\|"):
        verify_peft(mlx_dir, adapter, other)
    assert MoonshineError  # ParityError is a MoonshineError with exit code 1
    assert ParityError.exit_code == 1
