"""mlx-tune 0.6.0's side of the training race (bench_train.py --race); runs in mlx-tune's own venv.

Never imports mlx_moonshine: it reads the prepared 16 kHz clips and texts from an .npz the parent wrote
(the same samples our trainer sees), trains with mlx-tune's own `STTSFTTrainer` and writes the fused
q/v weights back for the parent to decode with the shared decoder.

Framing handed to mlx-tune (without it, it cannot train Moonshine): its processor falls back to Whisper's
start/end ids (50258/50257), outside Moonshine's 32768-token vocabulary, and the run segfaults at step 1.
We give its collator Moonshine's framing: decoder input [1] + text, labels text + [2], padding with 2,
and the HF tokenizer without its added <s> (add_special_tokens=False), exactly what mlx-moonshine trains on.

    python mlxtune_child.py --hf HF_DIR_NAMED_moonshine --data clips.npz --out result.json --weights fused.safetensors
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


class MoonshineFraming:
    """The tokenizer mlx-tune's collator reads: Moonshine's ids instead of Whisper's fallbacks."""

    sot_sequence = (1,)  # decoder_start_token_id
    eot = 2  # </s>
    eos_id = 2

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer

    def encode(self, text, **_):
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids, **kw):
        return self._tok.decode(ids, skip_special_tokens=True, **kw)


def preload_openblas() -> str:
    """The same OpenBLAS preload mlx_moonshine does (before mlx is imported): MLX's Linux wheel links a
    reference BLAS ~50x slower, so without it mlx-tune would race with its matmuls tied behind its back."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return "macOS (Accelerate/Metal)"
    for name in filter(None, (ctypes.util.find_library("openblas"), "libopenblas.so.0")):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return f"OpenBLAS ({name})"
        except OSError:
            continue
    return "MLX reference BLAS (no OpenBLAS found)"


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True, help="HF Moonshine folder whose path contains 'moonshine' (profile detection)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--mlx-blas", action="store_true", help="keep MLX's reference BLAS (mlx-tune as installed)")
    args = ap.parse_args()
    blas = "MLX reference BLAS (as installed)" if args.mlx_blas else preload_openblas()

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_tune import FastSTTModel
    from mlx_tune.stt import STTDataCollator, STTSFTConfig, STTSFTTrainer

    data = np.load(args.data, allow_pickle=False)
    n = int(data["n"])
    rows = [{"audio": {"array": data[f"audio_{i}"], "sampling_rate": 16000}, "text": str(data[f"text_{i}"])}
            for i in range(n)]
    audio_s = sum(len(r["audio"]["array"]) for r in rows) / 16000

    model, processor = FastSTTModel.from_pretrained(args.hf)
    processor.tokenizer = MoonshineFraming(processor.tokenizer)
    processor._whisper_tokenizer = None
    model = FastSTTModel.get_peft_model(model, r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                        target_modules=["q_proj", "v_proj"])
    collator = STTDataCollator(model, processor)
    config = STTSFTConfig(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=n,
                          learning_rate=args.lr, warmup_steps=0, logging_steps=10, output_dir=str(args.out) + ".d")
    trainer = STTSFTTrainer(model=model, processor=processor, data_collator=collator, train_dataset=rows,
                            args=config)
    from profile_cpu import Sampling  # perf's sampling switch (profile_cpu.py); a no-op otherwise

    t = time.perf_counter()
    with Sampling():
        trainer.train()
    wall = time.perf_counter() - t

    # Fuse and hand back only the adapted q/v weights, named as in the HF checkpoint (model.<path>).
    inner = model.model
    fused = []
    for path, module in inner.named_modules():
        if hasattr(module, "fuse") and hasattr(module, "lora_a"):
            fused.append((path, module.fuse()))
    weights = {f"model.{path}.weight": lin.weight for path, lin in fused}
    mx.save_safetensors(args.weights, weights)
    n_lora = sum(v.size for k, v in tree_flatten(inner.trainable_parameters()))
    json.dump({"wall_s": wall, "steps": n, "batch": 1, "audio_s": audio_s, "audio_s_per_s": audio_s / wall,
               "step_s": wall / n, "peak_rss_gb": peak_rss_gb(), "adapted_layers": len(fused),
               "trainable": int(n_lora), "optimizer": "Adam (mlx-tune's), constant lr", "blas": blas},
              open(args.out, "w"))
    del nn


if __name__ == "__main__":
    main()
