"""Data-parallel scaling on one machine: 1 process x T threads vs N processes (mlx.launch) x T/N threads.

    python benchmarks/bench_distributed.py --model ../models/base --train ../shared/data/atc/domain_train.jsonl \
        --val ../shared/data/atc/domain_quick.jsonl --steps 20 --batch-size 4 --threads 2 --procs 2

Both runs train the same global batches (same seed, same --batch-size) with `--replay none`, validate once
at step 0 on one val batch and never decode, so the figures are the training loop's: steps/s and seconds of
audio trained per second, from rank 0's metrics.jsonl (a data-parallel step time includes the gradient
all-reduce and the wait for the slowest process). Prints a markdown table and the load average around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def audio_seconds(run: Path, steps: int) -> float:
    """Seconds of audio in the first `steps` global batches of `run` (its own arguments and manifest)."""
    sys.path.insert(0, str(REPO))
    from mlx_moonshine.data import load_manifest
    from mlx_moonshine.train.batches import epoch_batches
    from mlx_moonshine.train.config import TrainArgs
    from mlx_moonshine.train.state import read_train_config

    record = read_train_config(run)
    args = TrainArgs.from_dict(record["train_args"])
    samples = [s for s in load_manifest(record["manifests"]["train"]["source"]).samples
               if args.max_seconds is None or (s.duration or 0) <= args.max_seconds]
    total, epoch, batches = 0.0, 0, []
    for _ in range(steps * args.grad_accum):
        if not batches:
            batches = epoch_batches(samples, args, epoch)
            epoch += 1
        total += sum(s.duration or 0.0 for s in batches.pop(0))
    return total


def run_once(procs: int, threads: int, a, out: Path) -> dict:
    cfg = out.parent / "bench.yaml"
    cfg.write_text("val_wer_samples: 0\nval_batches: 1\nlog_every: 5\ndropout: 0.0\n")  # dropout 0: the same curve
    cli = [sys.executable, "-m", "mlx_moonshine", "train", "--model", a.model, "--train", a.train, "--val", a.val,
           "--replay", "none", "--max-steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--eval-every", "100000", "-c", str(cfg), "-o", str(out)]
    cmd = cli if procs == 1 else ["mlx.launch", "-n", str(procs), "--backend", "ring", "-p", str(_port()), "--", *cli]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MLX_MOONSHINE_CANARY="none", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    # mlx.launch (MLX 0.32.4) polls its stdin and spins at EOF (~35% of a core here, under </dev/null or from a
    # script): give it a pipe that stays open and silent instead.
    quiet_in, keep_open = os.pipe()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=quiet_in)
    finally:
        os.close(quiet_in)
        os.close(keep_open)
    wall = time.perf_counter() - t0
    if done.returncode != 0 or "error:" in done.stderr:
        raise SystemExit(done.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    seconds = sum(r["step_seconds"] * n for r, n in zip(train, _window_sizes(train)))  # the training loop only
    return dict(procs=procs, threads=threads, steps_per_s=a.steps / seconds,
                audio_s_per_s=audio_seconds(out, a.steps) / seconds, loop_s=seconds, wall_s=wall,
                load_before=load_before, load_after=os.getloadavg()[0],
                final_loss=train[-1]["loss"] if train else None)


def _window_sizes(train_rows: list[dict]) -> list[int]:
    """Steps behind each metrics row (log_every, the last one possibly fewer)."""
    prev, out = 0, []
    for r in train_rows:
        out.append(r["step"] - prev)
        prev = r["step"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="threads of the one process; split between the others")
    p.add_argument("--procs", type=int, default=2)
    a = p.parse_args()
    if shutil.which("mlx.launch") is None:
        raise SystemExit("mlx.launch is not on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        results = [run_once(1, a.threads, a, tmp / "one"),
                   run_once(a.procs, max(a.threads // a.procs, 1), a, tmp / "many")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"global batch {a.batch_size}, {a.steps} steps, `--replay none`, fp32, LoRA r=8 q/v (encoder+decoder)\n")
    print("| processes x threads | steps/s | audio s/s | loop s | wall s | load avg before/after | last train loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['procs']} x {r['threads']} | {r['steps_per_s']:.3f} | {r['audio_s_per_s']:.2f} | "
              f"{r['loop_s']:.1f} | {r['wall_s']:.1f} | {r['load_before']:.2f} / {r['load_after']:.2f} | "
              f"{r['final_loss']:.4f} |")
    print(f"\nspeed-up {results[0]['loop_s'] / results[1]['loop_s']:.2f}x")


if __name__ == "__main__":
    main()
