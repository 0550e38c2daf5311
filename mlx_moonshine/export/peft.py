"""Our adapters <-> Hugging Face PEFT LoRA adapters (what `PeftModel.from_pretrained` loads).

    export_peft("runs/atc", "atc-peft", base_model_name_or_path="UsefulSensors/moonshine-base")
    # torch: PeftModel.from_pretrained(MoonshineForConditionalGeneration.from_pretrained(base), "atc-peft")
    import_peft("atc-peft", "adapters/atc")   # back to adapter_config.json + adapters.safetensors

A PEFT adapter folder holds `adapter_config.json` (a `LoraConfig`) and `adapter_model.safetensors` with
    base_model.model.<HF module path>.lora_A.weight        [r, in]
    base_model.model.<HF module path>.lora_B.weight        [out, r]
    base_model.model.<HF module path>.lora_magnitude_vector [out]     (DoRA only)
which is exactly what PEFT's own `save_pretrained` writes; our module paths are the HF ones, so keys
map one to one. `target_modules` is the list of full module paths trained: a bare `q_proj` would make
PEFT adapt cross-attention too.

PiSSA adapters live on a residual base W_res = W - s * B0 @ A0. They are exported as a plain LoRA on
the *original* base, like PEFT's `path_initial_model_for_weight_conversion`: rank 2r, A' = [A; A0],
B' = [B, -B0], alpha doubled, so s * B' @ A' = s * (B @ A - B0 @ A0) = (W_res + s * B @ A) - W.
This is exact for DoRA too: its V = W + s * B' @ A' is the same matrix as W_res + s * B @ A, so the
row norms and the trained magnitude carry over unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..adapters.apply import _PATH, BEST, CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, check_not_peft
from ..adapters.dora import DoRALinear
from ..errors import ModelError
from ..io import atomic_dir, atomic_save_safetensors, atomic_write_json, prepare_out_dir
from ..adapters.lora import LoRALinear
from ..train.state import CheckpointError, read_train_config

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
BEST_WEIGHTS = "adapters_best.safetensors"  # older runs kept their best adapter beside the final one
# init_lora_weights values whose adapters sit on a *modified* base: the file alone cannot be applied to
# the original weights (PEFT converts them only at save time with path_initial_model_for_weight_conversion).
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

PathLike = Union[str, Path]


# -- reading our adapters -----------------------------------------------------------------------------

def resolve_adapter(source: PathLike, best: bool = False) -> tuple[Path, Path]:
    """(adapter_config.json, weights file) of an adapter folder or a training run folder.

    A run keeps its final adapter at the top level and the best one in `best/` (or, in older runs,
    `adapters_best.safetensors`); `best=True` picks the latter.
    """
    src = Path(source)
    if not src.is_dir():
        raise ModelError(f"{src}: no such adapter or run folder")
    if best:
        if (src / BEST / CONFIG_FILE).is_file():
            src = src / BEST
        elif (src / BEST_WEIGHTS).is_file():
            return src / CONFIG_FILE, src / BEST_WEIGHTS
        else:
            raise ModelError(f"{src}: --best asked for, but the run has no {BEST}/ or {BEST_WEIGHTS}; "
                             "drop --best to export the final adapter")
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (src / n).is_file()]
    if missing:
        check_not_peft(src)
        raise ModelError(f"{src} lacks {' and '.join(missing)}; pass a training run folder or an adapter "
                         "folder written by save_adapters()")
    return src / CONFIG_FILE, src / WEIGHTS_FILE


def read_adapter(config_file: Path, weights_file: Path) -> tuple[AdapterConfig, dict[str, mx.array]]:
    """Config and float32 tensors of one of our adapters, checked for internal consistency.

    Raises:
        ModelError: one message listing every missing/unexpected tensor and every shape mismatch.
    """
    config = AdapterConfig.from_json(config_file)
    try:
        weights = {k: v.astype(mx.float32) for k, v in mx.load(str(weights_file)).items()}
    except Exception as e:  # mlx raises RuntimeError/ValueError on a corrupt file
        raise ModelError(f"cannot read adapter weights {weights_file}: {e}") from e
    modules = list(config.modules or sorted({k.rsplit(".", 1)[0] for k in weights}))
    keys = ["lora_A", "lora_B"] + (["magnitude"] if config.kind == "dora" else [])
    keys += ["pissa_A0", "pissa_B0"] if config.init.startswith("pissa") else []
    expected = {f"{m}.{k}" for m in modules for k in keys}
    problems = [f"missing tensor {k}" for k in sorted(expected - set(weights))]
    problems += [f"unexpected tensor {k}" for k in sorted(set(weights) - expected)]
    for m in modules:
        if any(f"{m}.{k}" not in weights for k in keys):
            continue
        A, B = weights[f"{m}.lora_A"], weights[f"{m}.lora_B"]
        want = {"lora_A": (config.r, A.shape[-1]), "lora_B": (B.shape[0], config.r), "magnitude": (B.shape[0],),
                "pissa_A0": (config.r, A.shape[-1]), "pissa_B0": (B.shape[0], config.r)}
        for k in keys:
            got = tuple(weights[f"{m}.{k}"].shape)
            if got != want[k]:
                problems.append(f"{m}.{k} has shape {list(got)}, expected {list(want[k])} (r={config.r})")
    if problems:
        raise ModelError(f"adapter {weights_file.parent} does not match its {config_file.name}: "
                         + "; ".join(problems))
    config.modules = modules
    return config, weights


def _layer(config: AdapterConfig, weights: dict, module: str) -> LoRALinear:
    """A standalone adapter layer (zero base weight) holding `module`'s tensors, for the factor algebra."""
    out_dims, in_dims = weights[f"{module}.lora_B"].shape[0], weights[f"{module}.lora_A"].shape[1]
    cls = DoRALinear if config.kind == "dora" else LoRALinear
    layer = cls(nn.Linear(in_dims, out_dims, bias=False), r=config.r, alpha=config.alpha,
                use_rslora=config.use_rslora)
    for key in ("lora_A", "lora_B", "magnitude", "pissa_A0", "pissa_B0"):
        if f"{module}.{key}" in weights:
            setattr(layer, key, weights[f"{module}.{key}"])
    return layer


# -- export --------------------------------------------------------------------------------------------

# model_type -> the transformers class a PEFT adapter's auto_mapping names, and its module.
BASE_CLASSES = {
    "moonshine": ("MoonshineForConditionalGeneration", "transformers.models.moonshine.modeling_moonshine"),
    "moonshine_streaming": ("MoonshineStreamingForConditionalGeneration",
                            "transformers.models.moonshine_streaming.modeling_moonshine_streaming"),
}


def base_model_type(adapter_dir_or_run: PathLike, model_dir: Optional[PathLike] = None,
                    base_model_name_or_path: Optional[str] = None) -> str:
    """The base's model_type: from the run's train_config.json, else the model folder, else a local
    base_model_name_or_path; "moonshine" when none says."""
    try:
        model_type = (read_train_config(adapter_dir_or_run) or {})["model"]["config"]["model_type"]
    except (CheckpointError, KeyError, TypeError):  # an adapter folder, or a record without it
        model_type = None
    if model_type in BASE_CLASSES:
        return model_type
    candidates = [Path(model_dir) / "config.json"] if model_dir is not None else []
    if base_model_name_or_path:
        candidates.append(Path(base_model_name_or_path) / "config.json")
    for f in candidates:
        try:
            model_type = json.loads(f.read_text()).get("model_type")
        except (OSError, ValueError):
            continue
        if model_type in BASE_CLASSES:
            return model_type
    return "moonshine"


def peft_config_dict(config: AdapterConfig, r: int, alpha: float, base_model_name_or_path: Optional[str],
                     model_type: str = "moonshine") -> dict:
    """The `adapter_config.json` PEFT 0.21 writes for this adapter (older PEFT ignores unknown keys)."""
    cls, module = BASE_CLASSES[model_type]
    return {
        "peft_type": "LORA",
        # None, not SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM's forward passes arguments Moonshine rejects.
        "task_type": None,
        "auto_mapping": {"base_model_class": cls, "parent_library": module},
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": bool(config.use_rslora),
        "use_dora": config.kind == "dora",
        "target_modules": list(config.modules),
        "exclude_modules": None,
        "lora_dropout": float(config.dropout),
        "init_lora_weights": True,  # the weights come from the file; PiSSA is already converted
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
        "loftq_config": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
    }


def peft_tensors(config: AdapterConfig, weights: dict) -> tuple[dict[str, mx.array], int, float]:
    """(PEFT state dict, r, lora_alpha) for our adapter tensors; PiSSA converted to the original base."""
    out, r, alpha = {}, config.r, config.alpha
    for module in config.modules:
        layer = _layer(config, weights, module)
        A, B, alpha = layer.lora_against_original_base()
        r = A.shape[0]
        out[f"{PREFIX}{module}.lora_A.weight"] = A
        out[f"{PREFIX}{module}.lora_B.weight"] = B
        if config.kind == "dora":
            out[f"{PREFIX}{module}.lora_magnitude_vector"] = layer.magnitude
    return out, r, alpha


def export_peft(adapter_dir_or_run: PathLike, out_dir: PathLike, base_model_name_or_path: Optional[str] = None,
                *, best: bool = False, force: bool = False, model_dir: Optional[PathLike] = None) -> Path:
    """Write one of our adapters as a PEFT LoRA/DoRA adapter folder.

    Args:
        adapter_dir_or_run: An adapter folder or a training run folder (its final adapter, or `best/`).
        out_dir: Folder to write `adapter_config.json` and `adapter_model.safetensors` into.
        base_model_name_or_path: Recorded in the config for PyTorch users (Hub id or path of the base).
        best: Export a run's best adapter instead of its final one.
        force: Overwrite a non-empty `out_dir`.
        model_dir: Optional base model folder; the adapter is then also checked against its shapes.

    Returns:
        out_dir.

    Raises:
        ModelError: a missing file, or one message listing every tensor that does not fit.
    """
    config_file, weights_file = resolve_adapter(adapter_dir_or_run, best)
    config, weights = read_adapter(config_file, weights_file)
    if model_dir is not None:
        check_against_model(model_dir, config_file, weights_file, name=adapter_dir_or_run)
    out_dir = prepare_out_dir(out_dir, force)
    tensors, r, alpha = peft_tensors(config, weights)
    mx.eval(tensors)
    with atomic_dir(out_dir) as tmp:
        atomic_save_safetensors(tmp / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
        model_type = base_model_type(adapter_dir_or_run, model_dir, base_model_name_or_path)
        atomic_write_json(tmp / PEFT_CONFIG, peft_config_dict(config, r, alpha, base_model_name_or_path, model_type))
    return out_dir


def adapter_folder(config_file: Path, weights_file: Path, scratch: Path) -> Path:
    """A folder `load_adapters` reads for (config, weights): the original one, or copies in `scratch`."""
    if weights_file.name == WEIGHTS_FILE and config_file.parent == weights_file.parent:
        return weights_file.parent
    shutil.copy2(config_file, scratch / CONFIG_FILE)
    shutil.copy2(weights_file, scratch / WEIGHTS_FILE)
    return scratch


def check_against_model(model_dir: PathLike, config_file: Path, weights_file: Path,
                        name: Optional[PathLike] = None) -> None:
    """Load the adapter onto the base model in `model_dir`; raises load_adapters' mismatch report.

    `name` is the folder the user gave, used in the message in place of a staging or scratch folder.
    """
    from ..adapters.apply import load_adapters
    from ..loading import load

    model, _ = load(model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        folder = adapter_folder(config_file, weights_file, Path(scratch))
        try:
            load_adapters(model, folder)
        except ModelError as e:
            if name is None:
                raise
            raise ModelError(str(e).replace(str(folder), str(name))
                             + f"\n(base model {model_dir}: pass the --model this adapter was trained for)") from e


# -- import --------------------------------------------------------------------------------------------

def _unsupported(cfg: dict) -> list[str]:
    """Every PEFT feature in `cfg` that our adapters cannot represent exactly.

    layers_to_transform, layers_pattern and exclude_modules only choose which modules get an adapter;
    the weights file names those modules exactly, so they need no support of their own.
    """
    bad = []
    if cfg.get("peft_type", "LORA") != "LORA":
        bad.append(f"peft_type {cfg.get('peft_type')!r} (only LORA, with or without DoRA)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "megatron_config",
                "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "arrow_config",
                "use_bdlora"):
        if cfg.get(key):
            bad.append(f"{key} {cfg[key]!r} (must be empty)")
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias {cfg['bias']!r} (only 'none')")
    for key in ("lora_bias", "fan_in_fan_out", "use_qalora"):
        if cfg.get(key):
            bad.append(f"{key}=true")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MUTATING_INITS):
        bad.append(f"init_lora_weights {cfg['init_lora_weights']!r} (the adapter belongs to a modified base; "
                   "re-save it in PEFT with path_initial_model_for_weight_conversion to get a plain LoRA)")
    return bad


def _split_key(key: str) -> tuple[str, str]:
    """PEFT tensor key -> (module path, our tensor name or the PEFT leaf if unsupported)."""
    k = key[len(PREFIX):] if key.startswith(PREFIX) else key
    k = k.replace(".default", "")  # adapter names only appear in in-memory state dicts
    for peft_name, ours in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                            (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude")):
        if k.endswith(peft_name):
            return k[: -len(peft_name)], ours
    module, _, leaf = k.rpartition(".")
    return module, leaf


def _read_peft(peft_dir: Path) -> tuple[dict, dict]:
    """(PEFT's adapter_config.json, its tensors) of a folder written by PEFT's save_pretrained."""
    config_file, weights_file = peft_dir / PEFT_CONFIG, peft_dir / PEFT_WEIGHTS
    if not config_file.is_file():
        raise ModelError(f"{peft_dir} has no {PEFT_CONFIG}; pass a folder written by PEFT's save_pretrained")
    if not weights_file.is_file():
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)" \
            if (peft_dir / "adapter_model.bin").is_file() else ""
        raise ModelError(f"{peft_dir} has no {PEFT_WEIGHTS}{hint}")
    try:
        return json.loads(config_file.read_text()), mx.load(str(weights_file))
    except Exception as e:
        raise ModelError(f"cannot read PEFT adapter {peft_dir}: {e}") from e


def _peft_tensors(raw: dict, problems: list) -> tuple[dict, list]:
    """Our adapter tensors (fp32, our names) and the adapted module paths; what cannot map goes to `problems`."""
    weights, modules = {}, []
    for key, value in raw.items():
        module, name = _split_key(key)
        if name not in ("lora_A", "lora_B", "magnitude"):
            problems.append(f"tensor {key} ({'embedding' if 'embedding' in name else 'unsupported'} adapter)")
            continue
        if _PATH.match(module) is None:
            problems.append(f"target {module} (only attention/MLP Linear layers of encoder/decoder layers)")
        elif value.ndim != (1 if name == "magnitude" else 2):
            problems.append(f"tensor {key} with shape {list(value.shape)} (conv adapters are not supported)")
        if module not in modules:
            modules.append(module)
        weights[f"{module}.{name}"] = value.astype(mx.float32)
    return weights, modules


def _tensor_problems(cfg: dict, weights: dict, modules: list) -> list[str]:
    """What in the tensors disagrees with PEFT's config: regex targets, missing tensors, ranks, magnitudes."""
    problems = []
    target = cfg.get("target_modules")
    if isinstance(target, str) and not any(re.fullmatch(target, m) for m in modules):
        problems.append(f"target_modules regex {target!r} matches none of the adapted modules {modules[:3]}")
    r, use_dora = cfg.get("r"), bool(cfg.get("use_dora", False))
    for module in modules:
        for name in ["lora_A", "lora_B"] + (["magnitude"] if use_dora else []):
            if f"{module}.{name}" not in weights:
                problems.append(f"missing tensor for {module}.{name}")
        A, B = weights.get(f"{module}.lora_A"), weights.get(f"{module}.lora_B")
        if A is not None and A.ndim == 2 and A.shape[0] != r or B is not None and B.ndim == 2 and B.shape[1] != r:
            problems.append(f"{module}: rank of lora_A/lora_B differs from r={r}")
    if not use_dora and any(k.endswith(".magnitude") for k in weights):
        problems.append("magnitude vectors present but use_dora is false")
    if not modules:
        problems.append(f"{PEFT_WEIGHTS} holds no LoRA tensors")
    return problems


def import_peft(peft_dir: PathLike, out_dir: PathLike, *, force: bool = False,
                model_dir: Optional[PathLike] = None) -> Path:
    """Turn a PEFT LoRA/DoRA adapter folder into one of ours (`adapter_config.json` + `adapters.safetensors`).

    Args:
        peft_dir: Folder with PEFT's `adapter_config.json` and `adapter_model.safetensors`.
        out_dir: Adapter folder to write; load it with `load(model, adapter=out_dir)`.
        force: Overwrite a non-empty `out_dir`.
        model_dir: Optional base model folder; the adapter is checked against its shapes before writing.

    Returns:
        out_dir.

    Raises:
        ModelError: missing files, or one message listing every unsupported feature (other PEFT types,
            rank/alpha patterns, biases, modules_to_save, embedding/conv or non-attention/MLP targets...).
    """
    peft_dir = Path(peft_dir)
    cfg, raw = _read_peft(peft_dir)
    problems = _unsupported(cfg)
    weights, modules = _peft_tensors(raw, problems)
    r, use_dora = cfg.get("r"), bool(cfg.get("use_dora", False))
    problems += _tensor_problems(cfg, weights, modules)
    if problems:
        raise ModelError(f"PEFT adapter {peft_dir} uses features mlx-moonshine cannot import: "
                         + "; ".join(dict.fromkeys(problems)))

    config = AdapterConfig(kind="dora" if use_dora else "lora", r=int(r), alpha=float(cfg.get("lora_alpha", 8)),
                           dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                           use_rslora=bool(cfg.get("use_rslora", False)), init="default",
                           targets=sorted({m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in modules}),
                           modules=modules)
    out_dir = prepare_out_dir(out_dir, force)
    mx.eval(weights)
    with atomic_dir(out_dir) as tmp:
        atomic_save_safetensors(tmp / WEIGHTS_FILE, weights, metadata={"format": "mlx"})
        config.to_json(tmp / CONFIG_FILE)
        if model_dir is not None:
            check_against_model(model_dir, tmp / CONFIG_FILE, tmp / WEIGHTS_FILE, name=peft_dir)
    return out_dir

