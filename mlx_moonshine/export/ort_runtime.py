"""Run a Moonshine runtime model folder (encoder_model.ort, decoder_model_merged.ort) and compare with MLX.

`OrtRuntime` drives the two graphs greedily with onnxruntime, as Moonshine's runtime does (cross-attention
K/V computed at step 0, then the cached branch); `verify_runtime` transcribes one clip with it, with
`moonshine_cpp` where that package imports, and with the MLX model, and compares the words.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import MoonshineError
from .runtime import DECODER, ENCODER

PathLike = Union[str, Path]
ORT_HINT = "pip install 'mlx-moonshine[ort]'"
# int8 requantisation (and tiny's int8 activations) may change a word of a clip; more means a broken export.
MAX_WER = 0.1


class RuntimeMismatch(MoonshineError):
    """The exported runtime folder does not transcribe like the MLX model."""

    exit_code = 1


class OrtRuntime:
    """Greedy decoding over a runtime folder's graphs with onnxruntime (CPU)."""

    def __init__(self, folder: PathLike, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MoonshineError(f"running the runtime graphs needs onnxruntime: {ORT_HINT}") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        folder = Path(folder)
        self.enc = ort.InferenceSession(str(folder / ENCODER), opts, providers=["CPUExecutionProvider"])
        self.dec = ort.InferenceSession(str(folder / DECODER), opts, providers=["CPUExecutionProvider"])
        self.enc_inputs = {i.name for i in self.enc.get_inputs()}
        # past_key_values.<layer>.<decoder|encoder>.<key|value>: [B, kv_heads, T, head_dim]
        self.past = {i.name: i.shape for i in self.dec.get_inputs() if i.name.startswith("past_key_values.")}
        self.dec_inputs = {i.name for i in self.dec.get_inputs()}
        self.outputs = [o.name for o in self.dec.get_outputs()]

    def greedy(self, audio: np.ndarray, budget: int, start: int = 1, eos: int = 2) -> list[int]:
        """Token ids (without start and eos) for one 16 kHz clip, at most `budget` of them."""
        x = np.asarray(audio, np.float32)[None]
        mask = np.ones(x.shape, np.int64)
        feeds = {"input_values": x, **({"attention_mask": mask} if "attention_mask" in self.enc_inputs else {})}
        hidden = self.enc.run(None, feeds)[0]  # (1, frames, hidden)
        past = {name: np.zeros((1, shape[1], 0, shape[3]), np.float32) for name, shape in self.past.items()}
        fixed = {"encoder_hidden_states": hidden}
        if "encoder_attention_mask" in self.dec_inputs:
            fixed["encoder_attention_mask"] = mask  # over samples, as the encoder's: the graph downsamples it
        tokens = [start]
        for step in range(budget):
            outs = self.dec.run(None, {"input_ids": np.array([[tokens[-1]]], np.int64),
                                       "use_cache_branch": np.array([step > 0]), **fixed, **past})
            nxt = int(outs[0][0, -1].argmax())
            if nxt == eos:
                break
            tokens.append(nxt)
            for name, value in zip(self.outputs[1:], outs[1:]):
                if step == 0 or ".decoder." in name:  # cross-attention K/V are fixed after step 0
                    past[name.replace("present.", "past_key_values.")] = value
        return tokens[1:]


def default_clip() -> Path:
    """moonshine-voice's beckett.wav (real speech), for --verify without --audio."""
    spec = importlib.util.find_spec("moonshine_voice")
    clip = Path(spec.origin).parent / "assets" / "beckett.wav" if spec is not None and spec.origin else None
    if clip is None or not clip.is_file():
        raise MoonshineError("--verify needs a speech clip: pass --audio CLIP (or pip install moonshine-voice, "
                             "whose beckett.wav is the default)")
    return clip


def moonshine_cpp_transcribe(folder: PathLike, architecture: str, audio: np.ndarray) -> Optional[str]:
    """moonshine_cpp's transcript of `audio` from `folder`, or None when it cannot run this folder.

    moonshine-cpp 0.1.4 runs base only: it feeds no attention_mask, which moonshine-voice's tiny graphs
    need (it aborts the process), so tiny is left to onnxruntime and moonshine-voice.
    """
    if architecture != "base" or importlib.util.find_spec("moonshine_cpp") is None:
        return None
    import moonshine_cpp
    import soundfile as sf

    model = moonshine_cpp.MoonshineModel(model_dir_path=str(folder), model_type=architecture)
    with tempfile.TemporaryDirectory() as scratch:
        wav = Path(scratch) / "clip.wav"
        sf.write(wav, audio, 16000, subtype="PCM_16")
        return model.transcribe_wav(str(wav)).strip()


def verify_runtime(out_dir: PathLike, model_dir: PathLike, adapter: Optional[PathLike] = None, *,
                   audio: PathLike, architecture: str, max_wer: float = MAX_WER) -> dict:
    """Transcribe `audio` with the exported folder (onnxruntime, and moonshine_cpp if installed) and MLX.

    Returns:
        {"mlx": text, "onnxruntime": text, "moonshine_cpp": text or None, "wer": of onnxruntime vs MLX}.

    Raises:
        RuntimeMismatch: onnxruntime's words differ from MLX's by more than `max_wer`.
    """
    from ..audio import prepare_audio, split_on_silence
    from ..decoding import DecodingOptions, decode_batch
    from ..loading import load
    from ..metrics import score

    model, processor = load(model_dir, adapter=adapter)
    x = prepare_audio(audio, processor.audio)
    options = DecodingOptions()
    runtime = OrtRuntime(out_dir)
    mlx_words, ort_words = [], []
    for s, e in split_on_silence(x, max_seconds=20.0):
        piece = x[s:e]
        mlx_words.append(decode_batch(model, processor, [piece], options)[0].text)
        ids = runtime.greedy(piece, options.token_budget(len(piece) / processor.audio.sample_rate),
                             processor.start_id, processor.eos_id)
        ort_words.append(processor.tokenizer.decode(ids))
    result = {"mlx": " ".join(w for w in mlx_words if w), "onnxruntime": " ".join(w for w in ort_words if w),
              "moonshine_cpp": moonshine_cpp_transcribe(out_dir, architecture, x)}
    result["wer"] = score(result["mlx"], result["onnxruntime"])["wer"]  # MLX's words as the reference
    if result["wer"] > max_wer:
        raise RuntimeMismatch(f"{out_dir}: onnxruntime transcribes {audio} differently from MLX (WER "
                              f"{100 * result['wer']:.1f}% > {100 * max_wer:g}%): MLX {result['mlx']!r} vs "
                              f"runtime {result['onnxruntime']!r}")
    return result
