"""Load and save MLX Moonshine models; `convert` any supported source into an MLX model folder.

A model folder holds:
    config.json               Hugging Face config (transformers can read it)
    model.safetensors         weights, HF names, MLX layout (conv kernels (out, k, in)); HF layout also loads
    tokenizer.json            BPE tokenizer
    preprocessor_config.json  sampling rate and the audio normalisation the model expects
    generation_config.json    start/eos token ids
    conversion.json           where it came from (source, sha256 of inputs, dtype, package version)
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from .errors import ModelError, MoonshineError
from .io import atomic_dir, sha256_file, writing
from .tokenizer import Tokenizer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                   "generation_config.json", "special_tokens_map.json", "processor_config.json")
MOONSHINE_CPP_PREFIX = "moonshine-cpp:"


@dataclass
class Processor:
    """Everything around the network: tokenizer, audio pipeline settings, generation ids."""

    tokenizer: Tokenizer
    audio: "AudioConfig"  # noqa: F821 - from .audio
    path: Path
    generation: dict = field(default_factory=dict)

    @property
    def start_id(self) -> int:
        return int(self.generation.get("decoder_start_token_id", self.tokenizer.bos_id))

    @property
    def eos_id(self) -> int:
        return int(self.generation.get("eos_token_id", self.tokenizer.eos_id))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from e


def resolve_model_dir(path_or_repo: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded with huggingface_hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: expected a model folder (config.json, model.safetensors), got a file")
        return path
    repo = str(path_or_repo)
    if repo.count("/") != 1 or repo.startswith((".", "/")):
        raise ModelError(f"{repo}: no such model folder (and not a Hub repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise ModelError(
            f"{repo}: could not download from the Hugging Face Hub ({type(e).__name__}). Offline, use a local "
            f"checkpoint folder, a folder with Moonshine ONNX/ORT files, or '{MOONSHINE_CPP_PREFIX}base-en' / "
            f"'moonshine-voice:tiny-en' (real base / tiny weights from PyPI)"
        ) from e


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        hint = " (found pytorch_model.bin: re-save it with safetensors)" if (model_dir / "pytorch_model.bin").exists() else ""
        raise ModelError(
            f"{model_dir}: no model.safetensors{hint}; make an MLX model with "
            f"`mlx-moonshine convert SOURCE -o DIR` and pass that DIR"
        )
    return files


def _config_problems(config: dict, args_cls) -> list[str]:
    """Fields of `config` whose value cannot be what `args_cls` declares (e.g. hidden_size: "sixty-four")."""
    problems = []
    for f in dataclasses.fields(args_cls):
        if f.name not in config or f.name == "extra" or config[f.name] is None:
            continue
        v = config[f.name]
        t = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
        base = t[len("Optional["):-1] if t.startswith("Optional[") else t
        if base == "int" and (isinstance(v, (str, bool, dict)) or isinstance(v, float) and not v.is_integer()):
            problems.append(f"{f.name}: {v!r} is not a whole number")
        elif base == "int" and isinstance(v, (int, float)) and v < 1 and f.name.endswith(_SIZE_SUFFIXES):
            problems.append(f"{f.name}: {v!r} must be >= 1")
        elif base == "float" and (isinstance(v, (str, bool, dict, list))
                                  or isinstance(v, float) and not math.isfinite(v)):
            problems.append(f"{f.name}: {v!r} is not a number")
        elif base == "bool" and not isinstance(v, (bool, int)):
            problems.append(f"{f.name}: {v!r} is not true/false")
    return problems


_SIZE_SUFFIXES = ("_size", "_layers", "_heads", "_embeddings")


def build_model(config: dict, source: str | Path = "config.json"):
    """The MLX module for a config dict, picked by `model_type`.

    Raises:
        ModelError: an unknown model_type, or every field whose value has the wrong type, named.
    """
    model_type = config.get("model_type", "moonshine")
    if model_type == "moonshine":
        from .models.moonshine import Model as cls, ModelArgs as args_cls
    elif model_type == "moonshine_streaming":
        from .models.streaming import StreamingArgs as args_cls, StreamingModel as cls
    else:
        raise ModelError(f"{source}: model_type {model_type!r} is not supported (moonshine, moonshine_streaming)")
    problems = _config_problems(config, args_cls)
    if problems:
        raise ModelError(f"{source}: bad value(s): {'; '.join(problems)}; fix them (a Moonshine config.json "
                         "from Hugging Face or `mlx-moonshine convert` has numbers there)")
    from .models import fastmath

    fastmath.configure_cpu_cache()  # the inference allocator setting, made where a model is built
    try:
        return cls(args_cls.from_dict(config))
    except MoonshineError:
        raise
    except Exception as e:  # MLX raises TypeError/ValueError/RuntimeError on impossible sizes
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"{source}: cannot build a model from it ({type(e).__name__}: {first_line})") from e


def load_model(model_dir: Path, dtype: Optional[str] = None):
    """Config + weights from a folder (MLX or Hugging Face layout) -> MLX model in eval mode."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{model_dir}: no config.json; is this a Moonshine checkpoint folder?")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ModelError(f"{config_path}: expected a JSON object of model settings, got {type(config).__name__}")
    model = build_model(config, config_path)
    weights = {}
    for f in _weight_files(model_dir):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ModelError(f"{f}: cannot read weights ({e}); the file is corrupt or incomplete") from e
    weights = model.sanitize(weights)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    bad_shape = [f"{k}: {tuple(weights[k].shape)} vs expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if bad_shape:
            parts.append(f"wrong shapes: {'; '.join(bad_shape[:3])}")
        raise ModelError(f"{model_dir}: weights do not match config.json: {'; '.join(parts)}")
    model.load_weights(list(weights.items()))
    if dtype is not None:
        cast_model(model, dtype)
    model.eval()
    mx.eval(model.parameters())
    return model


def cast_model(model, dtype: str):
    """Cast floating-point parameters to `dtype` ('float32' | 'float16' | 'bfloat16')."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    model.update(tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))


def _feature_extractor_config(model_dir: Path) -> dict:
    """The HF feature extractor settings: `preprocessor_config.json`, or, as transformers 5 processors
    (Moonshine Streaming's) save them, the `feature_extractor` entry of `processor_config.json`."""
    pre = _read_json(model_dir / "preprocessor_config.json")
    if pre:
        return pre
    nested = _read_json(model_dir / "processor_config.json").get("feature_extractor")
    return dict(nested) if isinstance(nested, dict) else {}


def load_processor(model_dir: Path) -> Processor:
    from .audio import AudioConfig

    generation = _read_json(model_dir / "generation_config.json")
    config = _read_json(model_dir / "config.json")
    bos = int(generation.get("bos_token_id", config.get("bos_token_id", 1)))
    eos = generation.get("eos_token_id", config.get("eos_token_id", 2))
    eos = int(eos[0] if isinstance(eos, list) else eos)
    if generation.get("decoder_start_token_id") is None:  # Streaming configs say null: start with <s>
        start = config.get("decoder_start_token_id")
        generation["decoder_start_token_id"] = bos if start is None else start
    generation["eos_token_id"] = eos
    tokenizer = Tokenizer(model_dir / "tokenizer.json", bos_id=bos, eos_id=eos)
    try:
        audio = AudioConfig.from_preprocessor_config(_feature_extractor_config(model_dir))
    except (ValueError, TypeError, AttributeError) as e:
        raise ModelError(f"{model_dir}: bad audio settings in preprocessor_config.json ({e})") from e
    return Processor(tokenizer=tokenizer, audio=audio, path=model_dir, generation=generation)


def load(path_or_repo: str | Path, adapter: Optional[str | Path] = None, dtype: Optional[str] = None):
    """Load an MLX Moonshine model and its processor.

    Args:
        path_or_repo: a model folder (from `convert`, or a Hugging Face checkpoint folder) or a Hub repo id.
        adapter: optional training run folder or adapter folder; its adapter is applied to the model.
        dtype: optional compute dtype ('float32', 'float16', 'bfloat16').

    Returns:
        (model, processor)
    """
    model_dir = resolve_model_dir(path_or_repo)
    model = load_model(model_dir, dtype)
    processor = load_processor(model_dir)
    if adapter is not None:
        from .adapters.apply import load_adapters

        load_adapters(model, adapter)
        model.eval()
    return model, processor


def save(model, processor: Processor, out_dir: str | Path, record: Optional[dict] = None):
    """Write a model folder (weights, config, processor files, optional conversion record) atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        weights = dict(tree_flatten(model.parameters()))
        with writing(out_dir / "model.safetensors"):
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        config = model.args.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in PROCESSOR_FILES:
            src = processor.path / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        # Record the audio normalisation the model expects, so every later step applies the same one.
        pre = _feature_extractor_config(tmp)
        pre.setdefault("sampling_rate", processor.audio.sample_rate)
        pre.setdefault("feature_extractor_type", "Wav2Vec2FeatureExtractor")
        pre.setdefault("do_normalize", False)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(processor.audio.to_preprocessor_config(pre), indent=2) + "\n")
        if not (tmp / "generation_config.json").exists():
            (tmp / "generation_config.json").write_text(json.dumps(processor.generation, indent=2) + "\n")
        if record is not None:
            (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _source_kind(source: str) -> str:
    from .convert.wheels import SHORTCUT_PREFIXES

    if source.startswith(SHORTCUT_PREFIXES):
        return source.split(":")[0]  # "moonshine-cpp" | "moonshine-voice": a PyPI wheel shortcut
    path = Path(source).expanduser()
    if path.is_dir():
        has_ort = any((path / f"encoder_model.{ext}").exists() for ext in ("onnx", "ort"))
        return "onnx" if has_ort else "hf-dir"
    if path.exists():
        raise ModelError(f"{source}: expected a folder (HF checkpoint or ONNX/ORT export), got a file")
    return "hub"


def convert(source: str, out_dir: str | Path, dtype: str = "float32", force: bool = False, log=print,
            audio: Optional["AudioConfig"] = None) -> Path:  # noqa: F821
    """Turn a Moonshine checkpoint into an MLX model folder.

    Args:
        source: a local Hugging Face checkpoint folder, a Hub repo id, a folder with Moonshine ONNX/ORT files
            (`encoder_model.{onnx,ort}`, `decoder_model_merged.{onnx,ort}`), or a PyPI shortcut
            (`moonshine-cpp:base-en`, `moonshine-voice:tiny-en`).
        out_dir: the MLX model folder to write.
        dtype: weight dtype of the result.
        force: overwrite an existing `out_dir`.
        audio: audio pipeline settings to record in the model (e.g. RMS normalisation); default: keep
            the source's (upstream Moonshine: raw samples, no normalisation).

    Returns:
        out_dir
    """
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ModelError(f"{out_dir} already exists; pass --force to overwrite it")
    kind = _source_kind(source)
    record = {"source": source, "source_kind": kind, "dtype": dtype,
              "mlx_moonshine_version": _version(), "mlx_version": mx.__version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="mlx-moonshine-convert-") as scratch:
        if kind in ("moonshine-cpp", "moonshine-voice", "onnx"):
            from .convert.ort import ort_to_hf
            from .convert.wheels import resolve_shortcut

            tokenizer_json = None
            if kind != "onnx":
                src_dir, tokenizer_json = resolve_shortcut(source, log=log)
            else:
                src_dir = Path(source)
            log(f"dequantising ONNX/ORT graphs in {src_dir}")
            hf_dir = Path(scratch) / "hf"
            record["ort"] = ort_to_hf(src_dir, hf_dir, tokenizer_json=tokenizer_json, log=log)
        else:
            hf_dir = resolve_model_dir(source)
        record["inputs_sha256"] = {p.name: sha256_file(p) for p in sorted(hf_dir.iterdir())
                                   if p.is_file() and p.suffix in (".json", ".safetensors")}
        model, processor = load(hf_dir, dtype=dtype)
        if audio is not None:
            processor.audio = audio
        record["audio_normalization"] = processor.audio.to_dict()
        save(model, processor, out_dir, record=record)
    log(f"wrote {out_dir} ({dtype})")
    return out_dir


def _version() -> str:
    from . import __version__

    return __version__
