"""Replay rows as a micro-batch of their own vs padded into one batch with the domain rows: the default `train`.

    python benchmarks/bench_replay_split.py --model BASE_MLX_DIR --train data/atc/domain_quick.jsonl \
        --val data/atc/domain_val.jsonl [--steps 30] [--rounds 2]

Runs `mlx-moonshine train` with its defaults (replay of the bundled general-English set with the base as
teacher) and `val_wer_samples: 0`, alternating "split" (the default: `trainer.replay_parts` decides) and
"joined" (replay_parts patched to keep every batch whole), each in its own process, after one warm-up run that
fills the teacher cache and MLX's kernel cache. Reads each run's summary.json: seconds of warm steps and of
steps on new batch shapes, and the final validation losses (the same step, so the same losses up to float
rounding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def child(variant: str, argv: list[str]) -> None:
    import mlx_moonshine  # noqa: F401
    from mlx_moonshine.train import trainer

    if variant == "joined":
        trainer.replay_parts = lambda samples, positions, is_replay: [(samples, positions)]
    from mlx_moonshine.cli import main

    main(argv)


def main():
    if sys.argv[1:2] == ["--child"]:  # the child: --child VARIANT then the CLI's own arguments
        return child(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    rows = {"split": [], "joined": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "train.yaml"
        config.write_text("val_wer_samples: 0\n")
        order = ["split"] + ["joined", "split"] * args.rounds  # the first run warms the caches
        for i, variant in enumerate(order):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, __file__, "--child", variant, "train", "-c", str(config), "--model", args.model,
                   "--train", args.train, "--val", args.val, "--max-steps", str(args.steps), "-o", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if i:
                s = json.loads((out / "summary.json").read_text())
                rows[variant].append(dict(phases=s["phases"], val_loss=s["final"]["val_loss"],
                                          replay_loss=s["final"].get("replay_loss")))
    print("| replay rows | warm steps (s/step) | steps on new shapes (count, s) | all steps (s) | final val loss |")
    print("|---|---|---|---|---|")
    for variant, runs in rows.items():
        for r in runs:
            warm, new = r["phases"]["steps"], r["phases"].get("new_shape_steps", {"seconds": 0.0, "count": 0})
            print(f"| {variant} | {warm['seconds'] / max(warm['count'], 1):.2f} | {new['count']}, {new['seconds']:.1f} "
                  f"| {warm['seconds'] + new['seconds']:.1f} | {r['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
