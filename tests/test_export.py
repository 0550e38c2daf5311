"""PEFT export, fuse and Hugging Face export against PEFT and transformers (tiny random models).

The same tiny weights exist on both sides: a transformers model saved with save_pretrained, converted
to MLX. Adapters get random nonzero B (and magnitude), so parity checks see the update. What needs no torch
(PEFT tensor round trips, run folders, refusals) is in test_peft_io.py.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from adapter_helpers import TINY, inputs, make_adapter, mlx_logits
from conftest import write_tiny_tokenizer
from mlx_moonshine.cli import main
from mlx_moonshine.errors import MoonshineError
from mlx_moonshine.export import export_hf, export_peft
from mlx_moonshine.loading import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


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
