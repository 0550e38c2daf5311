"""Training step time and peak memory: mlx-moonshine vs PyTorch + PEFT, same configuration, one run.

Configuration (issue #4): Moonshine base, batch 2, LoRA r=8 alpha=16 on every q_proj/v_proj (encoder
self-attention, decoder self- and cross-attention), AdamW lr 1e-3, fp32, the same ATC clips in the same order.
A second configuration puts the adapters in the decoder only and feeds precomputed encoder outputs (what the
trainer does automatically when no adapter sits in the encoder).

Each framework runs in its own subprocess so that peak RSS is its own, and the PyTorch one without the
OpenBLAS preload (see `REFERENCE_ENV`). Audio loading and batch building happen before the timed steps; the
first --warmup steps (compilation) are not timed.

    python benchmarks/bench_train.py --model BASE_MLX_DIR --hf BASE_HF_DIR \
        --manifest examples/atc/domain_train.jsonl [--steps 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlx_moonshine._blas import ENV_DISABLE  # the switch that keeps OpenBLAS out of a process

CONFIGS = {
    "all q/v (encoder + decoder)": {"scope": None, "cached_encoder": False},
    "decoder q/v, cached encoder": {"scope": ["decoder_self", "decoder_cross"], "cached_encoder": True},
}
BATCH, RANK, ALPHA, LR = 2, 8, 16.0, 1e-3


# PyTorch runs without mlx_moonshine's OpenBLAS preload: a process-wide RTLD_GLOBAL OpenBLAS takes over
# torch's BLAS calls too and made transformers ~4.6x slower here (beckett.wav greedy 0.73 s -> 3.37 s).
REFERENCE_ENV = {ENV_DISABLE: "1"}


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)  # bytes on macOS, KiB on Linux


def batches_of(manifest: str, steps: int):
    from mlx_moonshine.data import load_manifest

    samples = load_manifest(manifest).samples[: BATCH * steps]
    return [samples[i:i + BATCH] for i in range(0, len(samples), BATCH)]


def run_mlx(args, config: dict) -> dict:
    import mlx_moonshine  # noqa: F401
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_moonshine import fastmath
    from mlx_moonshine.adapters import AdapterConfig, apply_adapters
    from mlx_moonshine.loading import load
    from mlx_moonshine.train_batches import EncoderCache, make_batch
    from mlx_moonshine.train_step import Stepper, default_loss
    from mlx_moonshine.trainer import TrainArgs

    model, processor = load(args.model)
    kw = {"scope": config["scope"]} if config["scope"] else {}
    apply_adapters(model, AdapterConfig(kind="lora", r=RANK, alpha=ALPHA, dropout=0.0,
                                        targets=["q_proj", "v_proj"], **kw))
    model.train()
    # As `train` runs it: the training allocator cache (before the encoder cache fills), the step compiled
    # only off the CPU backend.
    fastmath.training_cpu_cache()
    targs = TrainArgs(batch_size=BATCH)
    cache = EncoderCache(model, processor, targs.pad_seconds) if config["cached_encoder"] else None
    batches = [make_batch(b, processor, targs, cache=cache) for b in batches_of(args.manifest, args.steps)]
    mx.eval([list(b.values()) for b in batches])
    compile_step = mx.default_device().type != mx.DeviceType.cpu
    stepper = Stepper(model, optim.AdamW(learning_rate=LR), default_loss, compile=compile_step)
    times, losses = [], []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        loss, _, _ = stepper([batch])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    return {"step_s": statistics.median(times), "peak_rss_gb": peak_rss_gb(),
            "mlx_peak_gb": mx.get_peak_memory() / 1024 ** 3, "first_loss": losses[0], "last_loss": losses[-1]}


def run_torch(args, config: dict) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MoonshineForConditionalGeneration

    import mlx_moonshine  # noqa: F401
    from mlx_moonshine.audio import AudioConfig, pad_batch, prepare_audio
    from mlx_moonshine.tokenizer import Tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = MoonshineForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    if config["scope"]:
        names = [n for n in names if ".decoder." in n]
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names))
    model.train()
    tok = Tokenizer(Path(args.hf) / "tokenizer.json")
    batches = []
    for samples in batches_of(args.manifest, args.steps):
        x, lengths = pad_batch([prepare_audio(s.audio_path, AudioConfig()) for s in samples])
        ids = [tok.encode(s.text) for s in samples]
        L = max(len(i) for i in ids) + 1
        dec = np.full((len(ids), L), tok.eos_id)
        lab = np.full((len(ids), L), -100)
        for j, i in enumerate(ids):
            dec[j, : len(i) + 1] = [tok.bos_id] + i
            lab[j, : len(i) + 1] = i + [tok.eos_id]
        mask = (np.arange(x.shape[1])[None] < lengths[:, None]).astype(np.int64)
        b = {"input_values": torch.from_numpy(x), "attention_mask": torch.from_numpy(mask),
             "decoder_input_ids": torch.from_numpy(dec), "labels": torch.from_numpy(lab)}
        if config["cached_encoder"]:
            with torch.no_grad():
                enc = model.base_model.model.model.encoder(b["input_values"], attention_mask=b["attention_mask"])
            b["encoder_outputs"] = (enc.last_hidden_state,)
            b["encoder_attention_mask"] = enc.attention_mask
        batches.append(b)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    times, losses = [], []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        if config["cached_encoder"]:
            out = model.base_model.model.model.decoder(input_ids=b["decoder_input_ids"],
                                                       encoder_hidden_states=b["encoder_outputs"][0],
                                                       encoder_attention_mask=b["encoder_attention_mask"])
            logits = model.base_model.model.proj_out(out.last_hidden_state)
        else:
            logits = model(input_values=b["input_values"], attention_mask=b["attention_mask"],
                           decoder_input_ids=b["decoder_input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    return {"step_s": statistics.median(times), "peak_rss_gb": peak_rss_gb(), "first_loss": losses[0],
            "last_loss": losses[-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="mlx-moonshine base folder (from `convert`)")
    ap.add_argument("--hf", required=True, help="the same weights as a Hugging Face checkpoint folder")
    ap.add_argument("--manifest", default=str(Path(__file__).parents[1] / "examples/atc/domain_train.jsonl"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--engine", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.engine:  # child process: one framework, one configuration
        fn = run_mlx if args.engine == "mlx" else run_torch
        print(json.dumps(fn(args, CONFIGS[args.config])))
        return

    results = {"batch": BATCH, "rank": RANK, "steps": args.steps, "warmup": args.warmup, "configs": {}}
    for name in CONFIGS:
        row = {}
        for engine in ("mlx", "torch"):
            cmd = [sys.executable, __file__, "--engine", engine, "--config", name, "--model", args.model,
                   "--hf", args.hf, "--manifest", args.manifest, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            env = dict(os.environ, **REFERENCE_ENV) if engine == "torch" else None
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                row[engine] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
            else:
                row[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        results["configs"][name] = row

    print(f"\nbatch {BATCH}, LoRA r={RANK} on q/v, fp32, median of {args.steps - args.warmup} steps")
    print(f"{'configuration':30s} {'engine':14s} {'s/step':>8s} {'peak RSS GB':>12s} {'loss first→last':>18s}")
    for name, row in results["configs"].items():
        for engine, label in (("mlx", "mlx-moonshine"), ("torch", "PyTorch+PEFT")):
            r = row[engine]
            if "error" in r:
                print(f"{name:30s} {label:14s} error: {r['error']}")
                continue
            print(f"{name:30s} {label:14s} {r['step_s']:8.3f} {r['peak_rss_gb']:12.2f} "
                  f"{r['first_loss']:8.3f}→{r['last_loss']:.3f}")
        if "error" not in row["mlx"] and "error" not in row["torch"]:
            print(f"{'':30s} {'ratio':14s} PyTorch/MLX step time {row['torch']['step_s'] / row['mlx']['step_s']:.2f}x, "
                  f"memory {row['mlx']['peak_rss_gb'] / row['torch']['peak_rss_gb']:.2f}x of PyTorch's")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
