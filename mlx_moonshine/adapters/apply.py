"""Put LoRA/DoRA adapters on a Moonshine model, save and load them, fuse them away.

    config = AdapterConfig(kind="lora", r=8, targets=["q_proj", "v_proj"])
    paths = apply_adapters(model, config)     # model.freeze(); only adapter weights train
    ...train...
    save_adapters("adapters/atc", model, config)
    config = load_adapters(fresh_model, "adapters/atc")
    fuse_model(fresh_model)                   # plain nn.Linear layers again

An adapter directory holds `adapter_config.json` (this module's `AdapterConfig`, with the exact list
of adapted module paths) and `adapters.safetensors` (float32; keys are the full module path plus
`.lora_A` [r, in], `.lora_B` [out, r], `.magnitude` [out] for DoRA, and `.pissa_A0`/`.pissa_B0` for
PiSSA, the frozen initial factors needed to rebuild the residual base from the original weights).

Targeting works on Hugging Face module paths (see model.py):
    model.encoder.layers.{i}.self_attn.{q,k,v,o}_proj, .mlp.fc1/fc2          scope "encoder"
    model.decoder.layers.{i}.self_attn.{q,k,v,o}_proj                        scope "decoder_self"
    model.decoder.layers.{i}.encoder_attn.{q,k,v,o}_proj                     scope "decoder_cross"
    model.decoder.layers.{i}.mlp.fc1/fc2                                     either decoder scope
A target is a leaf name (`q_proj`, which matches self- *and* cross-attention) or a dotted suffix
(`encoder_attn.q_proj`) to be specific.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .dora import DoRALinear
from ..errors import ModelError
from ..io import atomic_save_safetensors, atomic_write_text
from .lora import LoRALinear, check_init, dense_weight

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
BEST = "best"  # a training run's best adapter (lowest val WER), in RUN/best/
KINDS = {"lora": LoRALinear, "dora": DoRALinear}
SCOPES = ("encoder", "decoder_self", "decoder_cross")
TRAINABLE_KEYS = ("lora_A", "lora_B", "magnitude")
BUFFER_KEYS = ("pissa_A0", "pissa_B0")  # saved, never trained

# (encoder|decoder).layers.{i}.(self_attn|encoder_attn|mlp).{leaf}, optionally under a prefix ("model.").
_PATH = re.compile(r"^(?:.*\.)?(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn|mlp)\.(\w+)$")
_BLOCK_ORDER = {"self_attn": 0, "encoder_attn": 1, "mlp": 2}


@dataclass
class AdapterConfig:
    """What to adapt and how; saved as `adapter_config.json`. Unknown keys are ignored on load."""

    kind: str = "lora"  # "lora" or "dora"
    r: int = 8
    alpha: float = 16.0  # PEFT's lora_alpha: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"  # "default", "pissa" or "pissa_niter_N"
    targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    scope: list = field(default_factory=lambda: list(SCOPES))
    layers: Optional[list] = None  # layer indices (negative counts from the end) in each stack; None: all
    perturb_sigma: float = 0.0  # Flat-LoRA weight-noise level during training; 0: off
    seed: int = 0  # lora_A init and randomized-SVD seed
    modules: Optional[list] = None  # exact module paths adapted; filled by apply_adapters

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} (use 'lora' or 'dora')")
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r {self.r!r} (use a positive integer)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout {self.dropout!r} (use 0 <= dropout < 1)")
        if self.perturb_sigma < 0:
            problems.append(f"perturb_sigma {self.perturb_sigma!r} (use >= 0)")
        try:
            check_init(self.init)
        except ValueError as e:
            problems.append(str(e))
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.scope, str):
            self.scope = [s.strip() for s in self.scope.split(",") if s.strip()]
        if not self.targets:
            problems.append("targets is empty (e.g. ['q_proj', 'v_proj'])")
        bad_scope = [s for s in self.scope if s not in SCOPES]
        if bad_scope or not self.scope:
            problems.append(f"scope {self.scope!r} (use a non-empty subset of {list(SCOPES)})")
        if problems:
            raise ModelError("invalid adapter config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "AdapterConfig":
        """Read a config file, raising ModelError naming the file when it is unreadable."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"cannot read adapter config {path}: {e}") from e

    def to_json(self, path: Union[str, Path]) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def _is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear))


def _in_scope(stack: str, block: str, scope) -> bool:
    if stack == "encoder":
        return "encoder" in scope
    if block == "mlp":
        return "decoder_self" in scope or "decoder_cross" in scope
    return ("decoder_self" if block == "self_attn" else "decoder_cross") in scope


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module paths of the Linear layers `config` selects (targets x scope x layers), encoder first.

    Raises:
        ModelError: a target or layer index matches nothing, or the model already holds adapters.
    """
    candidates = {}  # path -> (stack, layer, block, leaf)
    depth = {"encoder": 0, "decoder": 0}  # layers per stack
    for path, module in model.named_modules():
        m = _PATH.match(path)
        if m is None:
            continue
        if isinstance(module, LoRALinear):
            raise ModelError(f"{path} already has an adapter; fuse_model() it or start from a fresh model")
        stack, layer, block, leaf = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        depth[stack] = max(depth[stack], layer + 1)
        if _is_linear(module):
            candidates[path] = (stack, layer, block, leaf)

    def hits(path: str, target: str) -> bool:
        return path == target or path.endswith("." + target)

    unknown = [t for t in config.targets if not any(hits(p, t) for p in candidates)]
    if unknown:
        leaves = sorted({c[3] for c in candidates.values()})
        raise ModelError(f"adapter targets {unknown} match no Linear layer; known leaf names: {leaves}")

    wanted = None
    if config.layers is not None:
        wanted = {stack: {i % n for i in config.layers if -n <= i < n} for stack, n in depth.items()}
        if not any(wanted.values()):
            raise ModelError(f"adapter layers {config.layers} are out of range (encoder has "
                             f"{depth['encoder']} layers, decoder {depth['decoder']})")

    chosen = []
    for path, (stack, layer, block, leaf) in candidates.items():
        if not any(hits(path, t) for t in config.targets) or not _in_scope(stack, block, config.scope):
            continue
        if wanted is not None and layer not in wanted[stack]:
            continue
        chosen.append(path)
    if not chosen:
        raise ModelError(f"adapter targets {config.targets} with scope {config.scope} and layers "
                         f"{config.layers} select no layer; widen one of them")
    def order(path):  # encoder before decoder, then layer, block, leaf
        stack, layer, block, leaf = candidates[path]
        return stack != "encoder", layer, _BLOCK_ORDER[block], leaf

    return sorted(chosen, key=order)


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(path, layer) of every LoRA/DoRA layer in `model`, sorted by path."""
    return sorted((p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear))


def freeze_for_adapters(model: nn.Module) -> None:
    """Freeze everything but the adapter weights (PiSSA's A0/B0 stay frozen too)."""
    model.freeze()
    model.unfreeze(keys=list(TRAINABLE_KEYS), strict=False)


def apply_adapters(model: nn.Module, config: AdapterConfig, init: Optional[str] = None) -> list[str]:
    """Wrap the selected Linear layers of `model` in adapters, in place, and freeze the rest.

    Args:
        model: A Moonshine `Model` (or any module tree with the same Hugging Face paths).
        config: What to adapt. `config.modules`, when set, is used as the exact list of paths;
            otherwise it is computed from targets/scope/layers and stored there.
        init: Override of `config.init` (loading uses "default": the weights come from the file).

    Returns:
        The adapted module paths, e.g. `model.decoder.layers.3.encoder_attn.v_proj`.
    """
    modules = dict(model.named_modules())
    if config.modules:
        done = [p for p in config.modules if isinstance(modules.get(p), LoRALinear)]
        if done:
            raise ModelError(f"{done[0]} already has an adapter; fuse_model() it or start from a fresh model")
        bad = [p for p in config.modules if not _is_linear(modules.get(p))]
        if bad:
            raise ModelError(f"adapter modules {bad} are not Linear layers of this model")
        paths = list(config.modules)
    else:
        paths = find_targets(model, config)
    cls = KINDS[config.kind]
    keys = mx.random.split(mx.random.key(config.seed), len(paths))
    new = []
    for i, path in enumerate(paths):
        layer = cls.from_base(modules[path], r=config.r, alpha=config.alpha, dropout=config.dropout,
                              use_rslora=config.use_rslora, init=init or config.init,
                              perturb_sigma=config.perturb_sigma, key=keys[i], seed=config.seed + i)
        new.append((path, layer))
    model.update_modules(tree_unflatten(new))
    freeze_for_adapters(model)
    config.modules = paths
    return paths


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """Every adapter array of `model` as float32, keyed by full module path + `.lora_A` etc."""
    out = {}
    for path, layer in adapter_layers(model):
        for key in TRAINABLE_KEYS + BUFFER_KEYS:
            if key in layer:
                out[f"{path}.{key}"] = layer[key].astype(mx.float32)
    return out


def save_adapters(path_dir: Union[str, Path], model: nn.Module, config: AdapterConfig) -> Path:
    """Write `adapters.safetensors` and `adapter_config.json` into `path_dir` (atomically).

    Returns:
        The directory written.
    """
    weights = adapter_weights(model)
    if not weights:
        raise ModelError("the model has no adapter layers to save; call apply_adapters() first")
    path_dir = Path(path_dir)
    paths = [p for p, _ in adapter_layers(model)]
    if set(config.modules or ()) != set(paths):  # keep the config's order unless the model differs
        config = dataclasses.replace(config, modules=paths)
    mx.eval(weights)
    atomic_save_safetensors(path_dir / WEIGHTS_FILE, weights, metadata={"format": "mlx"})
    config.to_json(path_dir / CONFIG_FILE)
    return path_dir


def _expected_shapes(model: nn.Module, config: AdapterConfig, paths: list[str]):
    """({key: shape} the adapter file must hold for `paths`, [paths that are no Linear of the model])."""
    modules = dict(model.named_modules())
    expected, absent = {}, []
    keys = ["lora_A", "lora_B"] + (["magnitude"] if config.kind == "dora" else [])
    keys += list(BUFFER_KEYS) if config.init.startswith("pissa") else []
    for path in paths:
        module = modules.get(path)
        if not _is_linear(module):
            absent.append(path)
            continue
        out_dims, in_dims = dense_weight(module).shape
        shapes = {"lora_A": (config.r, in_dims), "lora_B": (out_dims, config.r), "magnitude": (out_dims,),
                  "pissa_A0": (config.r, in_dims), "pissa_B0": (out_dims, config.r)}
        expected.update({f"{path}.{k}": shapes[k] for k in keys})
    return expected, absent


def check_not_peft(path: Path) -> None:
    """Raise a ModelError saying how to convert it when `path` holds a PEFT adapter, not one of ours."""
    if (path / "adapter_model.safetensors").is_file() or (path / "adapter_model.bin").is_file():
        raise ModelError(f"{path} is a PEFT adapter (adapter_model.*), not an mlx-moonshine one; convert it with "
                         f"`mlx-moonshine import peft {path} -o ADAPTER_DIR` and pass ADAPTER_DIR")


def load_adapters(model: nn.Module, path: Union[str, Path]) -> AdapterConfig:
    """Apply the adapters saved in directory `path` to `model` and load their weights.

    Nothing in `model` changes unless the whole adapter fits.

    Returns:
        The adapter's config.

    Raises:
        ModelError: a missing file, or one message listing every mismatch (modules the model lacks,
            missing and unexpected tensors, wrong shapes with the shape this model expects).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such adapter folder; pass a training run folder (train -o) or an adapter "
                         "folder (adapter_config.json + adapters.safetensors)")
    if not path.is_dir():
        raise ModelError(f"{path}: is a file; pass the folder that holds adapter_config.json and adapters.safetensors")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    missing_files = [f.name for f in (config_file, weights_file) if not f.is_file()]
    if missing_files:
        check_not_peft(path)
        raise ModelError(f"adapter directory {path} lacks {' and '.join(missing_files)}; "
                         "point to a training run folder or a directory written by save_adapters()")
    config = AdapterConfig.from_json(config_file)
    try:
        weights = mx.load(str(weights_file))
    except Exception as e:  # mlx raises RuntimeError/ValueError on a corrupt file
        raise ModelError(f"cannot read adapter weights {weights_file}: {e}") from e

    paths = list(config.modules) if config.modules else find_targets(model, config)
    expected, absent = _expected_shapes(model, config, paths)
    problems = [f"module {p} is not a Linear layer of this model" for p in absent]
    for key in sorted(set(expected) - set(weights)):
        problems.append(f"missing tensor {key} {list(expected[key])}")
    for key in sorted(set(weights) - set(expected)):
        if key.rsplit(".", 1)[0] not in absent:
            problems.append(f"unexpected tensor {key}")
    for key in sorted(set(expected) & set(weights)):
        if tuple(weights[key].shape) != tuple(expected[key]):
            problems.append(f"{key} has shape {list(weights[key].shape)}, this model expects "
                            f"{list(expected[key])}")
    if problems:
        raise ModelError(f"adapter {path} does not fit this model ({len(problems)} problems; was it "
                         "trained on another model size or config?):\n  " + "\n  ".join(problems))

    config.modules = paths
    apply_adapters(model, config, init="default")
    for p, layer in adapter_layers(model):
        if config.init.startswith("pissa"):
            layer.set_pissa(weights[f"{p}.pissa_A0"], weights[f"{p}.pissa_B0"])
            layer.init = config.init
        for key in TRAINABLE_KEYS:
            if key in layer:
                setattr(layer, key, weights[f"{p}.{key}"].astype(mx.float32))
    freeze_for_adapters(model)
    mx.eval(model.parameters())
    return config


def fuse_model(model: nn.Module, de_quantize: bool = False) -> list[str]:
    """Replace every adapter layer by its fused plain layer, in place.

    Returns:
        The module paths fused.
    """
    layers = adapter_layers(model)
    if layers:
        model.update_modules(tree_unflatten([(p, layer.fuse(de_quantize)) for p, layer in layers]))
    return [p for p, _ in layers]
