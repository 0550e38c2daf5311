"""One validation of `train`, before and after train_eval.py, on real weights: same numbers, less time.

Before: val loss at the training batch (2) in manifest order, then the val WER rows encoded again and
decoded at batch 8 (validation.eval_loss + validation.eval_wer). After: `validation.validation_pass`, one encoder
pass per row (sorted by duration, batch 8) serving both. Fresh LoRA r=8 q/v adapters (B = 0: the base's
numbers), model in eval mode, as `train` validates.

    python benchmarks/bench_validation.py --model BASE_MLX_DIR --val data/atc/domain_val.jsonl [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--wer-rows", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import mlx_moonshine  # noqa: F401
    from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters
    from mlx_moonshine.data import load_manifest
    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.loading import load
    from mlx_moonshine.train.validation import validation_pass
    from mlx_moonshine.train.config import TrainArgs
    from mlx_moonshine.train.step import default_loss
    from mlx_moonshine.train.validation import eval_loss, eval_wer

    model, processor = load(args.model)
    apply_adapters(model, AdapterConfig(kind="lora", r=8, alpha=16.0, dropout=0.0, targets=["q_proj", "v_proj"]))
    model.eval()
    samples = load_manifest(args.val).samples
    max_len = model.args.max_position_embeddings
    targs = TrainArgs()
    out = {"rows": len(samples), "wer_rows": args.wer_rows, "load_avg_start": os.getloadavg()[0]}

    t = time.perf_counter()
    loss = eval_loss(model, processor, samples, targs, default_loss, None, 0, max_len)
    wer = eval_wer(model, processor, samples[: args.wer_rows], DecodingOptions())
    out["before"] = {"seconds": time.perf_counter() - t, "val_loss": loss, "val_wer": wer["wer"]}

    t = time.perf_counter()
    one = validation_pass(model, processor, samples, default_loss, wer_rows=args.wer_rows,
                          options=DecodingOptions(), max_len=max_len)
    out["after"] = {"seconds": time.perf_counter() - t, "val_loss": one["loss"], "val_wer": one["wer"]["wer"]}
    out["same_transcripts"] = [r["hyp"] for r in wer["samples"]] == [r["hyp"] for r in one["wer"]["samples"]]
    out["load_avg_end"] = os.getloadavg()[0]
    for k in ("before", "after"):
        r = out[k]
        print(f"{k:7s} {r['seconds']:7.1f} s  val loss {r['val_loss']:.5f}  val WER {r['val_wer']:.4f}")
    print(f"speed-up {out['before']['seconds'] / out['after']['seconds']:.2f}x, same transcripts: "
          f"{out['same_transcripts']}; load average {out['load_avg_start']:.2f} -> {out['load_avg_end']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
