"""Merged models: fuse an adapter into an MLX model folder, or write a Hugging Face checkpoint.

    fuse("base-mlx", "runs/atc", "atc-mlx")           # MLX folder, adapters merged (load() reads it)
    export_hf("base-mlx", "atc-hf", adapter="runs/atc")
    # torch: MoonshineForConditionalGeneration.from_pretrained("atc-hf"); AutoProcessor.from_pretrained("atc-hf")

Fusing replaces every adapter layer by W + scale * B @ A (DoRA: m * V / ||V||). A PiSSA layer's base is
the residual W_res, so its fused weight W_res + scale * B @ A is already the full weight of the tuned
model: nothing else to undo.

The Hugging Face layout differs from ours only in the conv kernels, torch (out, in, k) vs MLX
(out, k, in), and in `proj_out.weight`, which transformers leaves out of the file when it is tied to
`embed_tokens` (and rebuilds on load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import ModelError
from ..io import atomic_dir, atomic_save_safetensors, atomic_write_json, prepare_out_dir
from .peft import resolve_adapter

PathLike = Union[str, Path]
_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def load_fused(model_dir: PathLike, adapter: Optional[PathLike] = None):
    """(model, processor) from `model_dir`, with `adapter` (run or adapter folder) fused in if given."""
    from ..adapters.apply import fuse_model
    from ..loading import load

    if adapter is not None:
        config_file, _ = resolve_adapter(adapter)
        adapter = config_file.parent
    model, processor = load(model_dir, adapter=adapter)
    fuse_model(model)
    mx.eval(model.parameters())
    return model, processor


def fuse(model_dir: PathLike, adapter: PathLike, out_dir: PathLike, *, force: bool = False) -> Path:
    """Write an MLX model folder with `adapter` merged into the weights of `model_dir`.

    Args:
        model_dir: Base MLX model folder (or HF checkpoint / Hub id).
        adapter: Training run folder or adapter folder.
        out_dir: Model folder to write.
        force: Overwrite a non-empty `out_dir`.

    Returns:
        out_dir.
    """
    from ..loading import save

    out_dir = prepare_out_dir(out_dir, force)
    model, processor = load_fused(model_dir, adapter)
    return save(model, processor, out_dir, record={"fused_from": {"model": str(model_dir), "adapter": str(adapter)}})


def hf_state_dict(model) -> dict[str, mx.array]:
    """The model's weights with transformers' names and layouts."""
    out = {}
    for key, value in tree_flatten(model.parameters()):
        if key.startswith("model.encoder.conv") and key.endswith(".weight") and value.ndim == 3:
            value = value.transpose(0, 2, 1)  # MLX (out, k, in) -> torch Conv1d (out, in, k)
        out[key] = mx.contiguous(value)
    # Tied head: transformers saves only embed_tokens and re-ties proj_out on load; with untied
    # embeddings the model has its own proj_out.weight, already in `out`.
    return out


def _tokenizer_config(processor, max_length: int) -> dict:
    tok = processor.tokenizer._tok
    names = {"bos_token": processor.tokenizer.bos_id, "eos_token": processor.tokenizer.eos_id, "unk_token": 0}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length}
    for name, idx in names.items():
        token = tok.id_to_token(idx)
        if token is not None:
            cfg[name] = token
    return cfg


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from e


def write_hf(model, processor, out_dir: Path) -> Path:
    """Write `model` (no adapter layers) as a transformers checkpoint folder, atomically."""
    from ..models.moonshine import Model

    if not isinstance(model, Model):
        raise ModelError(f"export hf supports model_type 'moonshine' only, not {model.args.model_type!r}")
    weights = hf_state_dict(model)
    mx.eval(weights)
    config = model.args.to_dict()
    config["dtype"] = _DTYPE_NAMES.get(weights["model.decoder.embed_tokens.weight"].dtype, "float32")
    src = Path(processor.path)
    with atomic_dir(out_dir) as tmp:
        atomic_save_safetensors(tmp / "model.safetensors", weights, metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        for name in ("tokenizer.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        tok_cfg = _read_json(src / "tokenizer_config.json") or _tokenizer_config(
            processor, model.args.max_position_embeddings)
        atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
        pre = _read_json(src / "preprocessor_config.json")
        for key, value in (("feature_extractor_type", "Wav2Vec2FeatureExtractor"), ("feature_size", 1),
                           ("padding_side", "right"), ("padding_value", 0.0), ("return_attention_mask", True),
                           ("do_normalize", False)):
            pre.setdefault(key, value)
        atomic_write_json(tmp / "preprocessor_config.json", processor.audio.to_preprocessor_config(pre))
        generation = _read_json(src / "generation_config.json") or {}
        generation.setdefault("bos_token_id", model.args.bos_token_id)
        generation.setdefault("decoder_start_token_id", processor.start_id)
        generation.setdefault("eos_token_id", processor.eos_id)
        atomic_write_json(tmp / "generation_config.json", generation)
    return out_dir


def export_hf(model_dir: PathLike, out_dir: PathLike, adapter: Optional[PathLike] = None, *,
              force: bool = False) -> Path:
    """Write a Hugging Face checkpoint (`MoonshineForConditionalGeneration` + `AutoProcessor` files).

    Args:
        model_dir: MLX model folder (or HF checkpoint / Hub id).
        out_dir: Checkpoint folder to write: config.json, model.safetensors, tokenizer.json,
            tokenizer_config.json, preprocessor_config.json, generation_config.json.
        adapter: Optional training run or adapter folder, fused into the weights.
        force: Overwrite a non-empty `out_dir`.

    Returns:
        out_dir.
    """
    out_dir = prepare_out_dir(out_dir, force)
    model, processor = load_fused(model_dir, adapter)
    return write_hf(model, processor, out_dir)
