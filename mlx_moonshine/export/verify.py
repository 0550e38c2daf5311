"""Check exported adapters and checkpoints in PyTorch against the MLX model they came from.

Both sides run one teacher-forced pass on the same input (a given clip, or 3 s of seeded noise) and the
largest |logit difference| is reported; above `atol` the export is rejected (`ParityError`, exit 1).
Needs the `dev` extra (torch, transformers, peft); nothing here is imported unless asked for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from ..errors import MoonshineError

PathLike = Union[str, Path]
ATOL = 1e-3


class ParityError(MoonshineError):
    """The PyTorch side of an export does not reproduce the MLX model."""

    exit_code = 1


def require_torch(need_peft: bool = False) -> None:
    """Raise a MoonshineError with the install hint unless torch/transformers (and peft) import."""
    names = ["torch", "transformers"] + (["peft"] if need_peft else [])
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MoonshineError(f"--verify needs {', '.join(missing)}: pip install 'mlx-moonshine[dev]' "
                             "(or leave out --verify)")


def verification_inputs(processor, audio: Optional[PathLike] = None, seconds: float = 3.0, seed: int = 0):
    """(audio [1, N] float32, decoder ids [1, 6] int32): the clip at `audio`, or seeded noise."""
    if audio is not None:
        from ..audio import prepare_audio

        x = prepare_audio(audio, processor.audio)
    else:
        x = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * processor.audio.sample_rate))
    vocab = processor.tokenizer.vocab_size
    ids = [processor.start_id] + [(17 * i + 5) % vocab for i in range(1, 6)]
    return np.asarray(x, np.float32)[None], np.asarray([ids], np.int32)


def _mlx_logits(model, x, ids) -> np.ndarray:
    return np.array(model(mx.array(x), mx.array(ids)).astype(mx.float32))


def _torch_logits(tmodel, x, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = tmodel(input_values=torch.from_numpy(x), decoder_input_ids=torch.from_numpy(ids.astype(np.int64)),
                     use_cache=False)
    return out.logits.float().numpy()


def _check(name: str, diff: float, atol: float) -> None:
    if not np.isfinite(diff) or diff > atol:
        raise ParityError(f"{name}: max |logits diff| vs MLX is {diff:.3g} > {atol:g}; the export does not "
                          "reproduce the MLX model (check versions of transformers/peft, or report a bug)")


def verify_peft(model_dir: PathLike, adapter_dir_or_run: PathLike, peft_dir: PathLike, *, best: bool = False,
                audio: Optional[PathLike] = None, atol: float = ATOL) -> dict:
    """Load `peft_dir` with PEFT on the base of `model_dir` and compare logits with the MLX adapter.

    Returns:
        {"unmerged": max |diff|, "merged": max |diff| after merge_and_unload()}.

    Raises:
        ParityError: a difference above `atol`.
    """
    require_torch(need_peft=True)
    import transformers
    from peft import PeftModel

    from ..adapters.apply import load_adapters
    from ..loading import load
    from .hf import write_hf
    from .peft import adapter_folder, resolve_adapter

    model, processor = load(model_dir)
    x, ids = verification_inputs(processor, audio)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        hf_dir = write_hf(model, processor, scratch / "base-hf")
        load_adapters(model, adapter_folder(*resolve_adapter(adapter_dir_or_run, best), scratch))
        model.eval()
        expected = _mlx_logits(model, x, ids)
        base = transformers.MoonshineForConditionalGeneration.from_pretrained(hf_dir).eval()
        peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
        result = {"unmerged": float(np.abs(_torch_logits(peft_model, x, ids) - expected).max())}
        merged = peft_model.merge_and_unload().eval()
        result["merged"] = float(np.abs(_torch_logits(merged, x, ids) - expected).max())
    _check("PEFT adapter (unmerged)", result["unmerged"], atol)
    _check("PEFT adapter (merge_and_unload)", result["merged"], atol)
    return result


def verify_hf(hf_dir: PathLike, model_dir: PathLike, adapter: Optional[PathLike] = None, *,
              audio: Optional[PathLike] = None, atol: float = ATOL) -> dict:
    """Load `hf_dir` with transformers (model and AutoProcessor) and compare with MLX model + adapter.

    With `audio`, the greedy transcripts of both sides are compared too.

    Returns:
        {"logits": max |diff|, and with audio "mlx_text", "torch_text"}.

    Raises:
        ParityError: a difference above `atol`, or different transcripts.
    """
    require_torch()
    import torch
    import transformers

    from ..loading import load

    model, processor = load(model_dir, adapter=adapter)
    x, ids = verification_inputs(processor, audio)
    tmodel = transformers.MoonshineForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    try:
        transformers.AutoProcessor.from_pretrained(str(hf_dir))
    except Exception as e:
        raise ParityError(f"{hf_dir}: transformers' AutoProcessor cannot load it ({e})") from e
    result = {"logits": float(np.abs(_torch_logits(tmodel, x, ids) - _mlx_logits(model, x, ids)).max())}
    _check(f"{hf_dir} (transformers)", result["logits"], atol)
    if audio is not None:
        from ..decoding import DecodingOptions, decode_batch

        options = DecodingOptions()
        result["mlx_text"] = decode_batch(model, processor, [x[0]], options)[0].text
        budget = options.token_budget(x.shape[1] / processor.audio.sample_rate)
        with torch.no_grad():
            tokens = tmodel.generate(input_values=torch.from_numpy(x), max_new_tokens=budget, do_sample=False,
                                     num_beams=1)
        result["torch_text"] = processor.tokenizer.decode(tokens[0].tolist())
        if result["mlx_text"] != result["torch_text"]:
            raise ParityError(f"greedy transcripts differ: MLX {result['mlx_text']!r} vs transformers "
                              f"{result['torch_text']!r}")
    return result
